"""Energy-aware training: read the device's battery and temperature, slow the steps down when
the battery is low or the device is hot, and pause (after a checkpoint) when either is
critical. The throttle only waits: it never touches the math, so a throttled run trains the
same adapter as an unthrottled one.

Sources (read() returns a Reading; a field is None where the source cannot tell):
  sysfs   <root>/sys/class/power_supply/*/{capacity,status,temp} of the supplies of type Battery
          (Android: battery/, Linux laptops: BAT0/, BAT1/), the kernel's ABI on both
  termux  the JSON of `termux-battery-status` (Termux:API), for phones whose sysfs is hidden
  sim     scripted readings from a file, one per read (tests and demos)
sysfs and termux also read <root>/sys/class/thermal/thermal_zone*/{type,temp}. The temperature
the policy acts on is the hottest of the battery and of the thermal zones whose type contains
one of `zone_types` (default: battery and skin sensors; CPU zones pass 70 C under any load,
and the kernel throttles the CPU itself).

Throttle(source, policy).before_step(step) is called before every step: it reads the source
every policy.interval steps, pauses while the battery or the temperature is critical, sleeps
1/Hz seconds as the policy says (or a --pm_schedule range's milliseconds), and returns the fields
of the step's metrics row.
"""
from __future__ import annotations
import glob, json, math, os, re, shutil, signal, subprocess, time
from dataclasses import dataclass, field

ZONE_TYPES = ("batt", "skin")
SOURCES = "auto, sysfs, termux, sim:FILE or off"
MAX_SLEEP_S = 86400.0   # the longest sleep a frequency, a --pm_schedule range or --pm_poll_s may ask for (one day): past it, sleep() overflows


@dataclass
class Reading:
  battery_pct: float | None = None
  charging: bool | None = None     # on external power: charging, full, or plugged in but not charging
  temp_c: float | None = None      # the hottest of the battery and the selected thermal zones
  zones: list = field(default_factory=list)   # every thermal zone seen: (folder, type, C)

  def __str__(self):
    battery = "battery unknown" if self.battery_pct is None else f"battery {self.battery_pct:g}%"
    if self.charging is not None: battery += " charging" if self.charging else " discharging"
    return battery + (", temperature unknown" if self.temp_c is None else f", {self.temp_c:.1f} C")


# ---- sources

def _read(path):
  """A sysfs file's text, or None where it is missing or unreadable."""
  try:
    with open(path, errors="replace") as f: return f.read().strip()
  except OSError:
    return None


def _number(value):
  """A finite float from text or JSON, or None for anything else (garbage, booleans, NaN)."""
  if isinstance(value, bool) or value is None: return None
  try:
    number = float(value)
  except (TypeError, ValueError):
    return None
  return number if math.isfinite(number) else None


def _read_number(path):
  return _number(_read(path))


def _celsius(value):
  """value if it is a believable device temperature; disabled sensors read -273 C and the like."""
  return value if value is not None and -40 <= value <= 150 else None


def _on_power(statuses):
  """Charging state from power_supply status words: any battery discharging means the device
  drains; Charging, Full and Not charging mean a charger is plugged in."""
  statuses = [s.lower().replace("_", " ") for s in statuses if s]
  if "discharging" in statuses: return False
  if any(s in ("charging", "full", "not charging") for s in statuses): return True
  return None


def _selected(zone_type, zone_types):
  return any(t.lower() in zone_type.lower() for t in zone_types)


def _hottest(temps):
  temps = [t for t in temps if t is not None]
  return max(temps) if temps else None


def read_thermal_zones(root="/"):
  """[(folder, type, C)] of every thermal zone with a type and a believable temperature."""
  zones = []
  folders = glob.glob(os.path.join(root, "sys/class/thermal/thermal_zone*"))
  for folder in sorted(folders, key=lambda p: int(re.sub(r"\D", "", os.path.basename(p)) or 0)):
    zone_type, raw = _read(os.path.join(folder, "type")), _read_number(os.path.join(folder, "temp"))
    if not zone_type or raw is None: continue
    # the kernel ABI says milli-C; some old Android kernels write whole degrees
    temp = _celsius(raw / 1000 if abs(raw) >= 1000 else raw)
    if temp is not None: zones.append((os.path.basename(folder), zone_type, temp))
  return zones


def _with_zones(reading, root, zone_types):
  reading.zones = read_thermal_zones(root)
  reading.temp_c = _hottest([reading.temp_c] + [t for _, kind, t in reading.zones if _selected(kind, zone_types)])
  return reading


class SysfsSource:
  """The kernel's power_supply and thermal ABI, on Android and on Linux laptops alike."""
  name = "sysfs"

  def __init__(self, root="/", zone_types=ZONE_TYPES):
    self.root, self.zone_types = root, zone_types

  def batteries(self):
    """Supplies of type Battery, except those of scope Device (a wireless mouse's battery)."""
    found = []
    for folder in sorted(glob.glob(os.path.join(self.root, "sys/class/power_supply/*"))):
      if _read(os.path.join(folder, "type")) == "Battery" and _read(os.path.join(folder, "scope")) != "Device":
        found.append(folder)
    return found

  def read(self):
    percents, sizes, statuses, temps = [], [], [], []
    for folder in self.batteries():
      percent = _read_number(os.path.join(folder, "capacity"))
      if percent is not None and 0 <= percent <= 100:
        percents.append(percent)
        sizes.append(_read_number(os.path.join(folder, "energy_full")) or _read_number(os.path.join(folder, "charge_full")))
      statuses.append(_read(os.path.join(folder, "status")))
      temp = _read_number(os.path.join(folder, "temp"))
      temps.append(_celsius(temp / 10) if temp is not None else None)   # power_supply temp is in tenths of C
    if not percents: battery = None
    elif all(sizes): battery = round(sum(p * s for p, s in zip(percents, sizes)) / sum(sizes), 1)   # two laptop batteries: by size
    else: battery = round(sum(percents) / len(percents), 1)
    return _with_zones(Reading(battery, _on_power(statuses), _hottest(temps)), self.root, self.zone_types)


def parse_termux(text):
  """A Reading from termux-battery-status's JSON; garbage gives an empty Reading."""
  try:
    data = json.loads(text)
  except ValueError:
    return Reading()
  if not isinstance(data, dict): return Reading()
  percent = _number(data.get("percentage"))
  plugged, status = data.get("plugged"), data.get("status")
  charging = plugged.upper() != "UNPLUGGED" if isinstance(plugged, str) else _on_power([status] if isinstance(status, str) else [])
  return Reading(percent if percent is not None and 0 <= percent <= 100 else None, charging, _celsius(_number(data.get("temperature"))))


class TermuxSource:
  """termux-battery-status (Termux:API) plus the thermal zones. The command hangs when the
  Termux:API app is missing, and now and then even with it: it runs with a timeout, in a
  process group of its own that is killed whole (its termux-api child too)."""
  name = "termux"

  def __init__(self, command=("termux-battery-status",), root="/", zone_types=ZONE_TYPES, timeout_s=10):
    self.command, self.root, self.zone_types, self.timeout_s = list(command), root, zone_types, timeout_s

  def read(self):
    try:
      proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    except OSError:
      return _with_zones(Reading(), self.root, self.zone_types)
    try:
      text, _ = proc.communicate(timeout=self.timeout_s)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.communicate()
      text = ""
    return _with_zones(parse_termux(text), self.root, self.zone_types)


class SimSource:
  """Scripted readings: the n-th read() returns the n-th reading, the last one repeats."""
  name = "sim"
  KEYS = {"battery_pct", "charging", "temp_c"}

  def __init__(self, readings):
    if not readings: raise ValueError("a simulated source needs at least one reading")
    self.readings, self.reads = [r if isinstance(r, Reading) else self.parse(r, f"reading {i}") for i, r in enumerate(readings)], 0

  @classmethod
  def from_file(cls, path):
    """A JSON list of readings or JSON lines, each like {"battery_pct": 80, "charging": false, "temp_c": 35}."""
    try:
      with open(path) as f: text = f.read()
    except OSError as e:
      raise ValueError(f"--pm_source sim:{path}: {e.strerror}") from None
    try:
      if text.lstrip().startswith("["): return cls([cls.parse(r, f"{path}: reading {i}") for i, r in enumerate(json.loads(text))])
      return cls([cls.parse(json.loads(line), f"{path}:{n}") for n, line in enumerate(text.splitlines(), 1) if line.strip()])
    except json.JSONDecodeError as e:
      raise ValueError(f"--pm_source sim:{path}: not JSON ({e})") from None

  @classmethod
  def parse(cls, entry, where):
    if not isinstance(entry, dict) or not set(entry) <= cls.KEYS:
      raise ValueError(f"{where}: a reading is an object with keys from {sorted(cls.KEYS)}, got {entry!r}")
    battery, charging, temp = entry.get("battery_pct"), entry.get("charging"), entry.get("temp_c")
    if battery is not None and not (isinstance(battery, (int, float)) and _number(battery) is not None and 0 <= battery <= 100):
      raise ValueError(f"{where}: battery_pct must be a number in [0, 100] or null, got {battery!r}")
    if charging is not None and not isinstance(charging, bool): raise ValueError(f"{where}: charging must be true, false or null, got {charging!r}")
    if temp is not None and not (isinstance(temp, (int, float)) and _number(temp) is not None):
      raise ValueError(f"{where}: temp_c must be a number or null, got {temp!r}")
    return Reading(battery, charging, temp)

  def read(self):
    reading = self.readings[min(self.reads, len(self.readings) - 1)]
    self.reads += 1
    return reading


def _usable(reading):
  return reading.battery_pct is not None or reading.temp_c is not None


def detect(root="/", zone_types=ZONE_TYPES, termux="termux-battery-status"):
  """[(source, reading)] of the sources this device may have (sysfs; Termux:API where its
  command is on PATH), best first: with a battery, with a temperature only, with nothing."""
  sources = [SysfsSource(root, zone_types)] + ([TermuxSource((termux,), root, zone_types)] if shutil.which(termux) else [])
  return sorted(((s, s.read()) for s in sources), key=lambda sr: (sr[1].battery_pct is None, sr[1].temp_c is None))


def open_source(spec, root="/", zone_types=ZONE_TYPES, log=print):
  """The source --pm_source names; auto takes the best detect() finds and says once when there
  is none (the throttle is then off)."""
  if spec == "off": return None
  if spec.startswith("sim:"): return SimSource.from_file(spec[4:])
  if spec in ("sysfs", "termux"):
    source = SysfsSource(root, zone_types) if spec == "sysfs" else TermuxSource(root=root, zone_types=zone_types)
    if not _usable(source.read()): raise ValueError(f"--pm_source {spec}: reports no battery and no temperature here (see --pm_probe)")
    return source
  if spec != "auto": raise ValueError(f"--pm_source must be {SOURCES}, not {spec!r}")
  source, reading = detect(root, zone_types)[0]
  if not _usable(reading):
    log("energy: no battery or temperature source found; throttle off (--pm_probe lists what was tried)")
    return None
  log(f"energy: {source.name}: {reading}")
  return source


def probe(root="/", zone_types=ZONE_TYPES, termux="termux-battery-status", log=print):
  """Print every source there is with its reading and thermal zones (for --pm_probe)."""
  if not shutil.which(termux): log(f"termux: {termux} is not on PATH (pkg install termux-api, and the Termux:API app)")
  found = detect(root, zone_types, termux)
  for source, reading in found:
    log(f"{source.name}: {reading}")
    for folder, zone_type, temp in reading.zones:
      log(f"  {folder:<16} {zone_type:<24} {temp:6.1f} C{'  (selected)' if _selected(zone_type, zone_types) else ''}")
  if _usable(found[0][1]): log(f"--pm_source auto uses: {found[0][0].name}")
  else: log(f"no battery or temperature source found (thermal zones are selected by type: --pm_temp_zones {','.join(zone_types)})")


# ---- policy

@dataclass
class Policy:
  """fb_*/ft_* are frequencies in Hz: F means a sleep of 1/F s before each step; 0 means no sleep.
  schedule values are the sleep itself, in milliseconds (as the seed documents --pm_schedule)."""
  interval: int = 10             # steps between readings
  batt_thresh: float = 20.0      # %: below it, discharging, the battery is low
  fb_high: float = 0.0           # Hz while the battery is not low
  fb_low: float = 0.0            # Hz while it is low
  temp_thresh: float = 40.0      # C: above it the device is hot
  ft_high: float = 0.0           # Hz while not hot
  ft_low: float = 0.0            # Hz while hot
  schedule: list = field(default_factory=list)   # [(first step, last step or None, ms of sleep)], overrides the above
  hysteresis: float = 2.0        # % and C a reading must recover past a threshold to switch back
  batt_critical: float = 10.0    # %: below it, not charging: checkpoint and pause; 0 never pauses
  temp_critical: float = 50.0    # C: above it: checkpoint and pause; 0 never pauses
  poll_s: float = 60.0           # seconds between readings while paused


def parse_schedule(text):
  """'0-99:300,100-199:200,200-:100' -> [(0, 99, 300.0), (100, 199, 200.0), (200, None, 100.0)]:
  milliseconds of sleep before each step of a range (steps 0-99 sleep 300 ms, 100-199 200 ms,
  200 on 100 ms). 0-based step indices, ranges inclusive, the last may be open; overlaps are refused."""
  entries = []
  for entry in text.split(","):
    match = re.fullmatch(r"\s*(\d+)-(\d*):([^,]*?)\s*", entry)
    if not match: raise ValueError(f"--pm_schedule entry {entry.strip()!r}: expected FIRST-LAST:MS or FIRST-:MS (milliseconds of sleep per step), e.g. 0-99:300")
    first, last = int(match[1]), int(match[2]) if match[2] else None
    ms = _number(match[3])
    if last is not None and last < first: raise ValueError(f"--pm_schedule entry {entry.strip()!r}: the range ends before it starts")
    if ms is None or ms < 0: raise ValueError(f"--pm_schedule entry {entry.strip()!r}: the sleep must be a number of milliseconds >= 0")
    if ms > MAX_SLEEP_S * 1000:
      raise ValueError(f"--pm_schedule entry {entry.strip()!r}: {ms:g} ms would sleep longer than a day before each step")
    entries.append((first, last, ms, entry.strip()))
  entries.sort()
  for (_, last, _, a), (first, _, _, b) in zip(entries, entries[1:]):
    if last is None or last >= first: raise ValueError(f"--pm_schedule entries {a!r} and {b!r} overlap")
  return [entry[:3] for entry in entries]


def add_flags(ap):
  """The energy flags of tools/finetune.py (and any tool that trains)."""
  d = Policy()
  a = ap.add_argument
  a("--pm_source", default="auto", help=f"battery and temperature readings: {SOURCES} (default auto)")
  a("--pm_probe", action="store_true", help="print the energy sources found, their readings and thermal zones, and exit")
  a("--pm_root", default="/", help="folder the sysfs paths are read under (default /; a captured tree for demos)")
  a("--pm_temp_zones", default=",".join(ZONE_TYPES), help=f"thermal zone types (substrings) the temperature comes from (default {','.join(ZONE_TYPES)})")
  a("--pm_interval", type=int, default=d.interval, help=f"steps between readings (default {d.interval})")
  a("--pm_batt_thresh", type=float, default=d.batt_thresh, help=f"battery %% below which, discharging, --pm_fb_low applies (default {d.batt_thresh:g})")
  a("--pm_fb_high", type=float, default=d.fb_high, help="Hz while the battery is not low or is charging: a sleep of 1000/Hz ms before each step; 0 no sleep (default 0)")
  a("--pm_fb_low", type=float, default=d.fb_low, help="Hz while the battery is low (default 0)")
  a("--pm_temp_thresh", type=float, default=d.temp_thresh, help=f"C above which --pm_ft_low applies (default {d.temp_thresh:g})")
  a("--pm_ft_high", type=float, default=d.ft_high, help="Hz while not hot (default 0)")
  a("--pm_ft_low", type=float, default=d.ft_low, help="Hz while hot (default 0)")
  a("--pm_schedule", default="", help='step ranges with their own sleep in milliseconds (not Hz), overriding the above: '
    '"0-99:300,100-199:200,200-:100" sleeps 300 ms before each of steps 0-99, 200 ms for 100-199, 100 ms from 200 on')
  a("--pm_hysteresis", type=float, default=d.hysteresis, help=f"%% and C past a threshold before switching back (default {d.hysteresis:g})")
  a("--pm_batt_critical", type=float, default=d.batt_critical, help=f"battery %% below which, not charging, training checkpoints and pauses; 0 never (default {d.batt_critical:g})")
  a("--pm_temp_critical", type=float, default=d.temp_critical, help=f"C above which training checkpoints and pauses; 0 never (default {d.temp_critical:g})")
  a("--pm_poll_s", type=float, default=d.poll_s, help=f"seconds between readings while paused (default {d.poll_s:g})")


def policy_from_flags(args):
  """The Policy of parsed add_flags flags; ValueError naming the flag for a bad value."""
  if args.pm_source not in ("auto", "sysfs", "termux", "off") and not args.pm_source.startswith("sim:"):
    raise ValueError(f"--pm_source must be {SOURCES}, not {args.pm_source!r}")
  if args.pm_interval < 1: raise ValueError(f"--pm_interval must be at least 1, got {args.pm_interval}")
  ranges = {"--pm_batt_thresh": (args.pm_batt_thresh, 0, 100), "--pm_batt_critical": (args.pm_batt_critical, 0, 100),
            "--pm_temp_thresh": (args.pm_temp_thresh, 0, 150), "--pm_temp_critical": (args.pm_temp_critical, 0, 150),
            "--pm_hysteresis": (args.pm_hysteresis, 0, 50), "--pm_fb_high": (args.pm_fb_high, 0, math.inf),
            "--pm_fb_low": (args.pm_fb_low, 0, math.inf), "--pm_ft_high": (args.pm_ft_high, 0, math.inf),
            "--pm_ft_low": (args.pm_ft_low, 0, math.inf)}
  for flag, (value, low, high) in ranges.items():
    if not (math.isfinite(value) and low <= value <= high): raise ValueError(f"{flag} must be a number in [{low:g}, {high:g}], got {value:g}")
  for flag in ("--pm_fb_high", "--pm_fb_low", "--pm_ft_high", "--pm_ft_low"):
    hz = getattr(args, flag[2:])
    if 0 < hz < 1 / MAX_SLEEP_S: raise ValueError(f"{flag} {hz:g} Hz would sleep longer than a day before each step (0 means no sleep)")
  if not (math.isfinite(args.pm_poll_s) and 0 < args.pm_poll_s <= MAX_SLEEP_S):
    raise ValueError(f"--pm_poll_s must be a number > 0 and at most {MAX_SLEEP_S:g} (a day), got {args.pm_poll_s:g}")
  for fast, slow in (("--pm_fb_high", "--pm_fb_low"), ("--pm_ft_high", "--pm_ft_low")):
    hz_fast, hz_slow = getattr(args, fast[2:]), getattr(args, slow[2:])
    if _sleep(hz_slow) < _sleep(hz_fast):
      raise ValueError(f"{slow} {hz_slow:g} would be faster than {fast} {hz_fast:g} (0 means no sleep): the low frequency must be the slower")
  return Policy(interval=args.pm_interval, batt_thresh=args.pm_batt_thresh, fb_high=args.pm_fb_high, fb_low=args.pm_fb_low,
                temp_thresh=args.pm_temp_thresh, ft_high=args.pm_ft_high, ft_low=args.pm_ft_low,
                schedule=parse_schedule(args.pm_schedule) if args.pm_schedule.strip() else [], hysteresis=args.pm_hysteresis,
                batt_critical=args.pm_batt_critical, temp_critical=args.pm_temp_critical, poll_s=args.pm_poll_s)


def _sleep(hz):
  return 1.0 / hz if hz else 0.0


# ---- the throttle

class Throttle:
  """before_step(step) before every training step (step: 0-based, as the learning-rate
  schedule's) returns the step's metrics fields; summary() the run's totals. clock and sleep
  are injectable so tests count sleeps without sleeping. on_pause() runs before a pause (the
  trainer saves a checkpoint there, so a phone that dies while paused loses nothing)."""

  def __init__(self, source, policy, clock=time.monotonic, sleep=time.sleep, on_pause=None, log=print):
    self.source, self.policy, self.clock, self.sleep, self.on_pause, self.log = source, policy, clock, sleep, on_pause, log
    self.active = source is not None or bool(policy.schedule)
    self.reading, self.battery_low, self.hot, self.calls = Reading(), False, False, 0
    self.throttled_s, self.paused_s = 0.0, 0.0
    self.drain_from, self.drained_pct, self.drained_steps = None, 0.0, 0   # battery use over discharging stretches

  def before_step(self, step):
    paused_s, pause_reason = 0.0, ""
    if self.source is not None and self.calls % self.policy.interval == 0:
      self._read()
      self._count_drain(step)
      pause_reason = self._critical(band=0.0)
      if pause_reason: paused_s = self._pause(pause_reason)
    self.calls += 1
    sleep_s, state = self._policy_sleep(step)
    if sleep_s:
      start = self.clock()
      self.sleep(sleep_s)
      self.throttled_s += self.clock() - start
    r = self.reading
    return {"battery_pct": r.battery_pct, "charging": r.charging, "temp_c": r.temp_c, "sleep_s": sleep_s,
            "paused_s": paused_s, "pm_state": pause_reason or state}

  def summary(self):
    per_100 = round(100 * self.drained_pct / self.drained_steps, 2) if self.drained_steps else None
    return {"throttled_s": round(self.throttled_s, 3), "paused_s": round(self.paused_s, 3), "battery_pct_per_100_steps": per_100}

  def _read(self):
    r, p = self.source.read(), self.policy
    self.reading = r
    # hysteresis: a state switches back only once the reading is `hysteresis` past the threshold
    if r.battery_pct is None or r.charging: self.battery_low = False
    else: self.battery_low = r.battery_pct < p.batt_thresh + (p.hysteresis if self.battery_low else 0)
    if r.temp_c is None: self.hot = False
    else: self.hot = r.temp_c > p.temp_thresh - (p.hysteresis if self.hot else 0)

  def _count_drain(self, step):
    """Battery used between consecutive discharging readings, and the steps it paid for."""
    r = self.reading
    if r.battery_pct is None or r.charging is not False:
      self.drain_from = None
      return
    if self.drain_from is not None:
      self.drained_pct += self.drain_from[1] - r.battery_pct
      self.drained_steps += step - self.drain_from[0]
    self.drain_from = (step, r.battery_pct)

  def _critical(self, band):
    """Why training must not go on ("" if it may); band > 0 while paused, so it resumes only
    once the reading has recovered past the threshold by the hysteresis."""
    r, p = self.reading, self.policy
    reasons = []
    if r.battery_pct is not None and not r.charging and r.battery_pct < p.batt_critical + band: reasons.append("battery_critical")
    if p.temp_critical and r.temp_c is not None and r.temp_c > p.temp_critical - band: reasons.append("temp_critical")
    return "+".join(reasons)

  def _pause(self, reason):
    p = self.policy
    if self.on_pause is not None: self.on_pause()
    until = []
    if "battery" in reason: until.append(f"charging or battery {p.batt_critical + p.hysteresis:g}%")
    if "temp" in reason: until.append(f"{p.temp_critical - p.hysteresis:g} C")
    self.log(f"energy: {self.reading}: {reason}{'; checkpoint saved' if self.on_pause else ''}; "
             f"paused until {' and '.join(until)} (reading every {p.poll_s:g} s)")
    start = self.clock()
    while True:
      self.sleep(p.poll_s)
      self._read()
      if not self._critical(band=p.hysteresis): break
    paused_s = self.clock() - start
    self.paused_s += paused_s
    self.drain_from = None   # the idle drain of a pause is no step's cost
    self.log(f"energy: resumed after {paused_s:.0f} s paused: {self.reading}")
    return paused_s

  def _policy_sleep(self, step):
    """(seconds, state): a --pm_schedule range overrides; else the slower of the battery and
    the temperature branches that have a reading."""
    for first, last, ms in self.policy.schedule:
      if first <= step and (last is None or step <= last): return ms / 1000, "schedule"
    if self.source is None: return 0.0, "off"
    r, p = self.reading, self.policy
    sleeps = [0.0]
    if r.battery_pct is not None: sleeps.append(_sleep(p.fb_low if self.battery_low else p.fb_high))
    if r.temp_c is not None: sleeps.append(_sleep(p.ft_low if self.hot else p.ft_high))
    state = "+".join(name for name, on in (("battery_low", self.battery_low), ("hot", self.hot)) if on)
    return max(sleeps), state or "normal"
