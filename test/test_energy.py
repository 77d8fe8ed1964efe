"""The energy-aware throttle: sysfs and Termux readers on captured fixtures, schedule parsing,
the exact sleep of every policy branch, hysteresis, pauses around critical readings (with an
injected clock, so nothing sleeps), and a throttled fine-tuning run that trains the same adapter."""
import importlib.util, json, os, shutil, stat, sys, time
import numpy as np
import pytest
from minift.energy import (Reading, SysfsSource, TermuxSource, SimSource, Policy, Throttle, parse_termux, parse_schedule,
                           open_source, probe)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "test", "fixtures", "energy")
ANDROID, LAPTOP = os.path.join(FIXTURES, "android"), os.path.join(FIXTURES, "laptop")
ANDROID_ZONES = [("thermal_zone0", "aoss0-usr", 38.1), ("thermal_zone1", "cpu-0-0-usr", 61.2), ("thermal_zone4", "battery", 33.5),
                 ("thermal_zone5", "skin-therm", 36.512), ("thermal_zone10", "quiet-therm", 35.0)]


def load_finetune():
  spec = importlib.util.spec_from_file_location("finetune", os.path.join(ROOT, "tools", "finetune.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# ---- readers

def test_sysfs_reads_an_android_phone():
  r = SysfsSource(ANDROID).read()
  # battery/ only (bms/ is type BMS); the hottest of its 33.4 C and the battery and skin zones;
  # garbage, missing, typeless and disabled (-273 C) zones left out; "35" is an old kernel's whole degrees
  assert (r.battery_pct, r.charging, r.temp_c) == (57.0, False, 36.512)
  assert r.zones == ANDROID_ZONES
  assert SysfsSource(ANDROID, zone_types=("cpu",)).read().temp_c == 61.2
  assert SysfsSource(ANDROID, zone_types=("nothing",)).read().temp_c == 33.4   # the battery's own temp file


def test_sysfs_reads_a_linux_laptop():
  r = SysfsSource(LAPTOP).read()
  # BAT0 only (the mouse's battery has scope Device); no battery temperature and no battery/skin zone
  assert (r.battery_pct, r.charging, r.temp_c) == (76.0, False, None)
  assert r.zones == [("thermal_zone0", "acpitz", 45.0), ("thermal_zone1", "x86_pkg_temp", 52.0)]
  assert SysfsSource(LAPTOP, zone_types=("x86_pkg",)).read().temp_c == 52.0


def test_sysfs_garbage_missing_and_two_batteries(tmp_path):
  root = tmp_path / "phone"
  shutil.copytree(ANDROID, root)
  battery = root / "sys/class/power_supply/battery"
  (battery / "capacity").write_text("abc\n")
  (battery / "status").unlink()
  (battery / "temp").write_text("\n")
  r = SysfsSource(str(root)).read()
  assert (r.battery_pct, r.charging, r.temp_c) == (None, None, 36.512)
  for status, charging in (("Charging", True), ("Full", True), ("Not charging", True), ("Unknown", None)):
    (battery / "status").write_text(status + "\n")
    assert SysfsSource(str(root)).read().charging is charging, status
  assert SysfsSource(str(tmp_path / "nothing")).read() == Reading()
  # a laptop with two batteries: weighted by size; one discharging means the device drains
  laptop = tmp_path / "laptop"
  for name, capacity, full, status in (("BAT0", "50", "60000000", "Discharging"), ("BAT1", "100", "20000000", "Unknown")):
    folder = laptop / "sys/class/power_supply" / name
    folder.mkdir(parents=True)
    for key, value in (("type", "Battery"), ("capacity", capacity), ("energy_full", full), ("status", status)): (folder / key).write_text(value + "\n")
  assert (SysfsSource(str(laptop)).read().battery_pct, SysfsSource(str(laptop)).read().charging) == (62.5, False)
  (laptop / "sys/class/power_supply/BAT1/energy_full").unlink()
  assert SysfsSource(str(laptop)).read().battery_pct == 75.0   # sizes unknown: the mean


def test_termux_json():
  with open(os.path.join(FIXTURES, "termux_charging.json")) as f: r = parse_termux(f.read())
  assert (r.battery_pct, r.charging, round(r.temp_c, 3)) == (64, True, 31.3)
  with open(os.path.join(FIXTURES, "termux_unplugged_old.json")) as f: r = parse_termux(f.read())
  assert (r.battery_pct, r.charging, round(r.temp_c, 3)) == (18, False, 29.1)
  assert parse_termux('{"percentage": 100, "status": "FULL"}').charging is True   # no "plugged": from the status
  for garbage in ("", "termux-api: not found", "[64]", '{"percentage": "lots", "plugged": 3, "temperature": NaN}',
                  '{"percentage": 140, "temperature": -300}'):
    assert parse_termux(garbage) == Reading(), garbage


def test_termux_runs_the_command_with_a_timeout(tmp_path):
  cat = [sys.executable, "-c", f"print(open({os.path.join(FIXTURES, 'termux_unplugged_old.json')!r}).read())"]
  r = TermuxSource(cat, root=ANDROID).read()
  assert (r.battery_pct, r.charging, r.temp_c) == (18, False, 36.512)   # the skin zone is hotter than the battery
  # what it does without the Termux:API app: the script's termux-api child never answers
  pid_file = tmp_path / "child.pid"
  hangs = [sys.executable, "-c", "import subprocess, sys, time; "
           f"open({str(pid_file)!r}, 'w').write(str(subprocess.Popen(['sleep', '30']).pid)); time.sleep(30)"]
  start = time.monotonic()
  assert TermuxSource(hangs, root=str(tmp_path), timeout_s=0.5).read() == Reading()
  assert time.monotonic() - start < 5
  time.sleep(0.1)
  try:
    with open(f"/proc/{pid_file.read_text()}/status") as f: state = [l for l in f if l.startswith("State:")][0]
  except FileNotFoundError:
    state = "gone"
  assert state == "gone" or "zombie" in state, state   # the child was killed with the script
  assert TermuxSource(["/nonexistent/termux-battery-status"]).read() == Reading()


def fake_termux(folder, json_path):
  script = folder / "termux-battery-status"
  script.write_text(f"#!{sys.executable}\nprint(open({json_path!r}).read())\n")
  script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_auto_detection_and_probe(tmp_path, monkeypatch):
  monkeypatch.setenv("PATH", str(tmp_path / "bin"))   # no termux-battery-status
  log = []
  assert isinstance(open_source("auto", ANDROID, log=log.append), SysfsSource)
  assert log == ["energy: sysfs: battery 57% discharging, 36.5 C"]
  log.clear()
  assert open_source("auto", str(tmp_path), log=log.append) is None
  assert len(log) == 1 and "no battery or temperature source found" in log[0]
  assert open_source("auto", LAPTOP, log=log.append).read().battery_pct == 76
  assert open_source("off", ANDROID) is None
  with pytest.raises(ValueError, match="--pm_source sysfs: reports no battery"): open_source("sysfs", str(tmp_path))
  with pytest.raises(ValueError, match="--pm_source must be"): open_source("android", ANDROID)
  # Termux:API on PATH: chosen where sysfs has no battery, not where it has one
  (tmp_path / "bin").mkdir()
  fake_termux(tmp_path / "bin", os.path.join(FIXTURES, "termux_charging.json"))
  assert isinstance(open_source("auto", str(tmp_path), log=log.append), TermuxSource)
  assert isinstance(open_source("auto", ANDROID, log=log.append), SysfsSource)
  lines = []
  probe(ANDROID, log=lines.append)
  assert lines[0] == "sysfs: battery 57% discharging, 36.5 C"
  assert lines[4].split() == ["thermal_zone5", "skin-therm", "36.5", "C", "(selected)"]
  assert lines[2].split() == ["thermal_zone1", "cpu-0-0-usr", "61.2", "C"]   # not selected
  assert lines[6] == "termux: battery 64% charging, 36.5 C" and lines[-1] == "--pm_source auto uses: sysfs"


def test_probe_flag_prints_and_exits(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("PATH", str(tmp_path))
  with pytest.raises(SystemExit) as e: load_finetune().main(["--pm_probe", "--pm_root", LAPTOP])
  out = capsys.readouterr().out
  assert e.value.code == 0 and "sysfs: battery 76% discharging, temperature unknown" in out and "x86_pkg_temp" in out
  with pytest.raises(SystemExit) as e: load_finetune().main(["--pm_probe", "--pm_root", str(tmp_path)])
  assert e.value.code == 0 and "no battery or temperature source found" in capsys.readouterr().out


def test_sim_source_files(tmp_path):
  lines = tmp_path / "r.jsonl"
  lines.write_text('{"battery_pct": 50, "charging": false}\n\n{"temp_c": 41.5}\n')
  sim = SimSource.from_file(str(lines))
  assert [sim.read() for _ in range(3)] == [Reading(50, False, None), Reading(None, None, 41.5), Reading(None, None, 41.5)]
  listed = tmp_path / "r.json"
  listed.write_text('[{"battery_pct": 7}]')
  assert SimSource.from_file(str(listed)).read() == Reading(7, None, None)
  for text, message in (('{"battery_pct": 50}\n{"batery": 3}\n', "r.jsonl:2: a reading is an object"), ('{"battery_pct": 101}', "battery_pct must be"),
                        ('{"charging": "yes"}', "charging must be"), ('{"temp_c": "hot"}', "temp_c must be"), ("{oops", "not JSON"), ("", "at least one")):
    lines.write_text(text)
    with pytest.raises(ValueError, match=message): SimSource.from_file(str(lines))
  with pytest.raises(ValueError, match="No such file"): SimSource.from_file(str(tmp_path / "missing.jsonl"))


# ---- schedule

def test_schedule_parsing():
  assert parse_schedule("0-99:300,100-199:200,200-:100") == [(0, 99, 300.0), (100, 199, 200.0), (200, None, 100.0)]
  assert parse_schedule(" 200-:0.5, 0-9:4 ") == [(0, 9, 4.0), (200, None, 0.5)]


@pytest.mark.parametrize("text, message", [
  ("0-99:300,", "entry '': expected FIRST-LAST:MS"), ("0-99", "entry '0-99': expected"), ("a-9:3", "entry 'a-9:3': expected"),
  ("-5-9:3", "entry '-5-9:3': expected"), ("10-5:3", "entry '10-5:3': the range ends before it starts"),
  ("0-9:-1", "entry '0-9:-1': the sleep must be a number of milliseconds"), ("0-9:fast", "entry '0-9:fast': the sleep"),
  ("0-9:nan", "entry '0-9:nan': the sleep"), ("0-99:300,50-150:200", "entries '0-99:300' and '50-150:200' overlap"),
  ("10-20:2,0-:1", "entries '0-:1' and '10-20:2' overlap"), ("0-9:1,9-12:2", "entries '0-9:1' and '9-12:2' overlap"),
])
def test_bad_schedules(text, message):
  with pytest.raises(ValueError) as e: parse_schedule(text)
  assert message in str(e.value)


# ---- the throttle, with an injected clock

class FakeTime:
  def __init__(self): self.now, self.sleeps = 1000.0, []
  def clock(self): return self.now
  def sleep(self, seconds): self.sleeps.append(seconds); self.now += seconds


def throttled(readings, steps, source=True, log=None, on_pause=None, fake=None, **policy):
  fake = fake or FakeTime()
  sim = SimSource([Reading(*r) for r in readings]) if source else None
  throttle = Throttle(sim, Policy(**policy), fake.clock, fake.sleep, on_pause=on_pause, log=(log.append if log is not None else print))
  rows = [throttle.before_step(step) for step in range(steps)]
  return rows, fake, throttle


BRANCHES = dict(fb_high=4, fb_low=2, ft_high=8, ft_low=1)   # sleeps 0.25, 0.5, 0.125, 1 s


@pytest.mark.parametrize("reading, sleep_s, state", [
  ((50, False, 30), 0.25, "normal"),              # the slower of 4 Hz (battery) and 8 Hz (temperature)
  ((15, False, 30), 0.5, "battery_low"),
  ((15, None, 30), 0.5, "battery_low"),           # charging unknown: counted as discharging
  ((15, True, 30), 0.25, "normal"),               # charging: the battery is not low
  ((50, False, 45), 1.0, "hot"),
  ((15, False, 45), 1.0, "battery_low+hot"),
  ((None, None, 30), 0.125, "normal"),            # no battery: the temperature branch alone
  ((50, False, None), 0.25, "normal"),
  ((None, None, None), 0.0, "normal"),
])
def test_sleep_of_each_branch(reading, sleep_s, state):
  rows, fake, throttle = throttled([reading], 3, **BRANCHES)
  assert [r["sleep_s"] for r in rows] == [sleep_s] * 3 and fake.sleeps == ([sleep_s] * 3 if sleep_s else [])
  assert rows[0] == {"battery_pct": reading[0], "charging": reading[1], "temp_c": reading[2], "sleep_s": sleep_s, "paused_s": 0.0, "pm_state": state}
  assert throttle.summary()["throttled_s"] == 3 * sleep_s


def test_no_frequencies_no_sleep_and_no_source_off():
  rows, fake, _ = throttled([(15, False, 45)], 2)   # low and hot, but no --pm_f* given
  assert fake.sleeps == [] and rows[0]["pm_state"] == "battery_low+hot"
  rows, fake, throttle = throttled([], 2, source=False, **BRANCHES)
  assert fake.sleeps == [] and rows[0] == {"battery_pct": None, "charging": None, "temp_c": None, "sleep_s": 0.0, "paused_s": 0.0, "pm_state": "off"}
  assert not throttle.active and throttle.summary() == {"throttled_s": 0.0, "paused_s": 0.0, "battery_pct_per_100_steps": None}


def test_reads_every_interval():
  rows, _, throttle = throttled([(90, False, 30), (80, False, 30), (70, False, 30)], 7, interval=3)
  assert [r["battery_pct"] for r in rows] == [90, 90, 90, 80, 80, 80, 70] and throttle.source.reads == 3


def test_schedule_sleeps_milliseconds_as_the_seed_documents():
  # the seed: "steps 0-99: 300 ms sleep per step, 100-199: 200 ms, 200+: 100 ms"
  rows, fake, throttle = throttled([], 250, source=False, schedule=parse_schedule("0-99:300,100-199:200,200-:100"))
  assert fake.sleeps == [0.3] * 100 + [0.2] * 100 + [0.1] * 50
  assert [r["sleep_s"] for r in rows] == fake.sleeps and {r["pm_state"] for r in rows} == {"schedule"}
  assert throttle.summary()["throttled_s"] == pytest.approx(30 + 20 + 5)


def test_schedule_overrides_the_policy():
  rows, fake, _ = throttled([(50, False, 30)], 6, fb_high=1, schedule=parse_schedule("0-1:250,3-4:3.5,5-:0"))
  assert fake.sleeps == [0.25, 0.25, 1.0, 0.0035, 0.0035]   # step 2: the policy's 1 Hz; step 5: 0 ms, no sleep
  assert [r["pm_state"] for r in rows] == ["schedule", "schedule", "normal", "schedule", "schedule", "schedule"]
  rows, fake, throttle = throttled([], 3, source=False, schedule=parse_schedule("1-1:500"))   # a schedule needs no sensor
  assert fake.sleeps == [0.5] and [r["pm_state"] for r in rows] == ["off", "schedule", "off"] and throttle.active


def test_hysteresis():
  battery = [(b, False, 30) for b in (25, 19, 21, 22, 21, 19)]   # low below 20, back to normal at 22
  rows, _, _ = throttled(battery, 6, interval=1, fb_low=2)
  assert [r["sleep_s"] for r in rows] == [0, 0.5, 0.5, 0, 0, 0.5]
  temps = [(80, False, t) for t in (39, 41, 39, 38, 40, 40.5)]     # hot above 40, cool again at 38
  rows, _, _ = throttled(temps, 6, interval=1, ft_low=1)
  assert [r["sleep_s"] for r in rows] == [0, 1, 1, 0, 0, 1]
  assert [r["pm_state"] for r in rows] == ["normal", "hot", "hot", "normal", "normal", "hot"]


def test_pause_on_critical_battery_until_charging():
  events, log, fake = [], [], FakeTime()
  readings = [(50, False, 30), (9, False, 30), (8, False, 30), (11, False, 30), (11, True, 30), (30, False, 30)]
  rows, _, throttle = throttled(readings, 4, interval=1, on_pause=lambda: events.append(len(fake.sleeps)), log=log, fake=fake, poll_s=60)
  assert events == [0]                          # the checkpoint is saved before the first poll's sleep
  assert fake.sleeps == [60, 60, 60]            # 8% and 11% (below 10 + 2) keep it paused; charging resumes
  assert [r["paused_s"] for r in rows] == [0, 180, 0, 0] and rows[1]["pm_state"] == "battery_critical"
  assert rows[1]["battery_pct"] == 11 and rows[1]["charging"] is True and rows[2]["battery_pct"] == 30
  assert "battery_critical; checkpoint saved; paused until charging or battery 12%" in log[0] and "resumed after 180 s" in log[1]
  assert throttle.summary()["paused_s"] == 180


def test_pause_on_critical_temperature_until_cooled():
  readings = [(80, True, 45), (80, True, 51), (80, True, 49), (80, True, 48), (80, True, 47)]
  saved, log = [], []
  rows, fake, _ = throttled(readings, 3, interval=1, on_pause=lambda: saved.append(True), log=log, poll_s=30)
  assert fake.sleeps == [30, 30] and saved == [True]   # 49 C stays paused (50 - 2), 48 C resumes
  assert rows[1]["pm_state"] == "temp_critical" and rows[1]["paused_s"] == 60 and "paused until 48 C" in log[0]
  rows, fake, _ = throttled(readings, 3, interval=1, temp_critical=0)   # 0: never pause
  assert fake.sleeps == [] and rows[1]["pm_state"] == "hot"
  rows, fake, _ = throttled([(5, True, 30)], 2, interval=1)   # charging at 5%: no pause
  assert fake.sleeps == [] and rows[0]["pm_state"] == "normal"


def test_summary_battery_per_100_steps():
  readings = [(80, False, 30), (78, False, 30), (77, True, 30), (90, False, 30), (88, False, 30)]
  _, _, throttle = throttled(readings, 41, interval=10, fb_high=4)
  # 80 -> 78 over steps 0-10 and 90 -> 88 over 30-40; the charging stretch counts for nothing
  assert throttle.summary() == {"throttled_s": 41 * 0.25, "paused_s": 0.0, "battery_pct_per_100_steps": 20.0}


# ---- flags and a whole run

@pytest.mark.parametrize("argv, message", [
  (["--pm_batt_thresh", "120"], "--pm_batt_thresh must be a number in [0, 100], got 120"),
  (["--pm_temp_critical", "-1"], "--pm_temp_critical must be a number in [0, 150]"),
  (["--pm_hysteresis", "nan"], "--pm_hysteresis must be"),
  (["--pm_fb_high", "-3"], "--pm_fb_high must be"),
  (["--pm_interval", "0"], "--pm_interval must be at least 1"),
  (["--pm_poll_s", "0"], "--pm_poll_s must be a number > 0"),
  (["--pm_fb_high", "2", "--pm_fb_low", "10"], "--pm_fb_low 10 would be faster than --pm_fb_high 2"),
  (["--pm_ft_high", "5"], "--pm_ft_low 0 would be faster than --pm_ft_high 5"),
  (["--pm_schedule", "0-9:300,5-:1"], "--pm_schedule entries '0-9:300' and '5-:1' overlap"),
  (["--pm_source", "wifi"], "--pm_source must be auto, sysfs, termux, sim:FILE or off, not 'wifi'"),
])
def test_bad_energy_flags(argv, message, capsys):
  with pytest.raises(SystemExit) as e: load_finetune().parse_args(["--model", "m", "--data", "d", *argv])
  assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
  from tiny_lm import save_tiny, TEXT
  text = tmp_path_factory.mktemp("data") / "hamlet.txt"
  text.write_text(TEXT)
  return save_tiny("llama", tmp_path_factory.mktemp("llama")), str(text)


def test_throttled_run_trains_the_same_adapter(tiny_llama, tmp_path, capsys, monkeypatch):
  from safetensors.numpy import load_file
  from minift.trainer import Trainer
  model, text = tiny_llama
  common = ["--model", model, "--data", text, "--seq_len", "32", "--batch_size", "2", "--max_steps", "8", "--lora_dropout", "0.1", "--quiet"]
  finetune = load_finetune()
  finetune.main([*common, "--out", str(tmp_path / "plain"), "--pm_source", "off"])
  assert "energy:" not in capsys.readouterr().out
  saved_steps = []
  save = Trainer.save_checkpoint
  monkeypatch.setattr(Trainer, "save_checkpoint", lambda self, folder, state, **kw: (saved_steps.append(state["step"]), save(self, folder, state, **kw)))
  # sim_drain.jsonl, read every 2 steps: 30%; 19% at 42.5 C (low and hot); 9% (critical: pause, polls 9%, then 10% charging); 25% charging
  summary = finetune.main([*common, "--out", str(tmp_path / "throttled"), "--pm_source", "sim:" + os.path.join(FIXTURES, "sim_drain.jsonl"),
                           "--pm_interval", "2", "--pm_fb_low", "100", "--pm_ft_low", "50", "--pm_poll_s", "0.01", "--pm_schedule", "6-:5"])
  out = capsys.readouterr().out
  plain, throttled_ = load_file(str(tmp_path / "plain/adapter/adapter_model.safetensors")), load_file(str(tmp_path / "throttled/adapter/adapter_model.safetensors"))
  assert plain.keys() == throttled_.keys()
  for k in plain: np.testing.assert_array_equal(plain[k], throttled_[k], err_msg=k)
  assert saved_steps == [4, 8]   # the checkpoint before the pause, and the final one
  with open(tmp_path / "throttled/metrics.jsonl") as f: rows = [json.loads(line) for line in f]
  assert [r["battery_pct"] for r in rows] == [30, 30, 19, 19, 10, 10, 25, 25]
  assert [r["pm_state"] for r in rows] == ["normal", "normal", "battery_low+hot", "battery_low+hot", "battery_critical", "normal", "schedule", "schedule"]
  assert [r["sleep_s"] for r in rows] == [0, 0, 0.02, 0.02, 0, 0, 0.005, 0.005]
  assert rows[4]["paused_s"] >= 0.02 and rows[4]["charging"] is True and rows[2]["temp_c"] == 42.5
  with open(tmp_path / "throttled/summary.json") as f: assert json.load(f) == summary
  # 30 -> 19 -> 9 % over steps 0-4; the pause and the charging stretch count for nothing
  assert summary["battery_pct_per_100_steps"] == 525.0 and summary["paused_s"] >= 0.02 and summary["throttled_s"] >= 0.05
  assert "battery_critical; checkpoint saved" in out and "energy: throttled " in out and "525% per 100 steps" in out
