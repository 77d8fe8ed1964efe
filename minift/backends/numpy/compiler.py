"""The system C compiler (cc, or $CC) for the NumPy backend's C loops: builds sources into
shared libraries, one per batch, cached on disk under $MINIFT_CACHE_DIR/c or ~/.cache/minift/c
(kept under MINIFT_CACHE_MAX_MB); MINIFT_CLOOPS=0 turns it off.
"""
import ctypes, hashlib, os, platform, shutil, subprocess, tempfile
from pathlib import Path
from minift.helpers import DEBUG, log, prune_cache, touch_cache


CPU_KEYS = ("vendor_id", "cpu family", "model", "flags",                        # x86
            "CPU implementer", "CPU architecture", "CPU variant", "CPU part", "Features")   # ARM


def _cpuinfo():
  with open("/proc/cpuinfo") as f: return f.read()


def _cpu_id():
  """The CPU that -march/-mcpu=native code is tuned for: the model and feature lines of
  /proc/cpuinfo (on ARM the implementer and part name the core, e.g. 0x41/0xd0c for a
  Neoverse-N1; Features alone are the same for many cores), each distinct value once (a phone's
  big and little cores both count)."""
  try: text = _cpuinfo()
  except OSError: return platform.machine() + platform.processor()
  seen = {}
  for line in text.splitlines():
    key, _, value = line.partition(":")
    if key.strip() in CPU_KEYS: seen.setdefault(key.strip(), set()).add(value.strip())
  return "; ".join(f"{k}={','.join(sorted(v))}" for k, v in sorted(seen.items())) or platform.machine() + platform.processor()


def cache_dir():
  env = os.environ.get("MINIFT_CACHE_DIR")
  return Path(env) / "c" if env else Path.home() / ".cache" / "minift" / "c"


class Compiler:
  """Builds rendered kernels into shared libraries, one per batch, cached on disk; finds a
  function again by its name (a hash of its source and of the compiler) in this process or in
  the cache."""

  FLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared"]
  # tuning for this CPU: gcc and x86 clang take -march=native; clang on aarch64 refuses it and
  # takes -mcpu=native (gcc there takes both); the first the compiler accepts is used
  ARCH = ["-march=native", "-mcpu=native"]
  SIMD = "-fopenmp-simd"

  def __init__(self, prelude):
    self.prelude = prelude   # the C every library starts with (the helper functions kernels call)
    self.functions, self.index, self._flags, self._signature, self.failed = {}, None, None, None, None
    self.cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")

  @property
  def available(self):
    return self.cc is not None and self.failed is None and os.environ.get("MINIFT_CLOOPS", "1") != "0" and self.flags is not None

  @property
  def flags(self):
    """The compiler's flags, found once by building a small loop with each optional flag: an
    ARCH flag and SIMD where the compiler takes them (DEBUG=1 says which, and why not)."""
    if self._flags is None and self.failed is None:
      test = self.prelude + "void probe(float* x) {\n#pragma omp simd\n for (long i = 0; i < 64; i++) x[i] = exp_f(x[i]);\n}\n"
      refused = []
      with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "p.c").write_text(test)
        tries = [[a, self.SIMD] for a in self.ARCH] + [[self.SIMD]] + [[a] for a in self.ARCH] + [[]]
        for extra in tries:
          res = self._cc(self.FLAGS + extra, Path(tmp) / "p.c", Path(tmp) / "p.so")
          if res.returncode == 0:
            self._flags = self.FLAGS + extra
            break
          refused.append((extra, (res.stderr.strip().splitlines() or ["?"])[0]))
        else: self._fail(res.stderr)
      if DEBUG >= 1 and self._flags is not None:
        dropped = "".join(f"\n  refused {' '.join(e) or '(no extra flags)'}: {why}" for e, why in refused)
        log.info(f"C loops: {self.cc} {' '.join(self._flags)}{dropped}")
    return self._flags

  def _cc(self, flags, c_file, so_file):
    try: return subprocess.run([self.cc, *flags, "-o", str(so_file), str(c_file), "-lm"], capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e: return subprocess.CompletedProcess([], 1, "", str(e))

  def _fail(self, stderr):
    self.failed = stderr[-2000:]
    log.warning(f"the C compiler {self.cc} failed; the NumPy backend evaluates every kernel with NumPy:\n{self.failed}")

  @property
  def signature(self):
    """What a cached library depends on besides its source: the compiler, its flags, and the
    CPU (-march=native code from one machine may not run on another sharing the home folder)."""
    if self._signature is None: self._signature = f"{self.cc} {' '.join(self.flags or [])} {_cpu_id()}"
    return self._signature

  def _load_index(self):
    """{function name: library path} of every library in the cache."""
    self.index = {}
    for listing in cache_dir().glob("*.txt"):
      lib = listing.with_suffix(".so")
      if lib.exists(): self.index.update((n, lib) for n in listing.read_text().split())

  def get(self, name):
    fn = self.functions.get(name)
    if fn is None:
      if self.index is None: self._load_index()
      lib = self.index.get(name)
      if lib is None: return None
      try: fn = getattr(ctypes.CDLL(str(lib)), name)
      except OSError:   # pruned by another process since the index was read: NumPy runs it
        self.index = {n: p for n, p in self.index.items() if p != lib}
        return None
      fn.restype = None
      self.functions[name] = fn
      touch_cache(lib)
    return fn

  def build(self, sources):
    """Compile {name: source} (names not yet built) into one library."""
    src = self.prelude + "\n".join(sources[n] for n in sorted(sources))
    key = hashlib.sha256((src + self.signature).encode()).hexdigest()[:32]
    folder = cache_dir()
    lib, listing = folder / f"{key}.so", folder / f"{key}.txt"
    try:
      folder.mkdir(parents=True, exist_ok=True)
      if not lib.exists():
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
          (Path(tmp) / "k.c").write_text(src)
          res = self._cc(self.flags, Path(tmp) / "k.c", Path(tmp) / "k.so")
          if res.returncode != 0: return self._fail(res.stderr)
          os.replace(Path(tmp) / "k.so", lib)   # atomic: another process may be building the same library
      if not listing.exists():
        tmp = listing.with_suffix(f".txt.{os.getpid()}")
        tmp.write_text("\n".join(sorted(sources)))
        os.replace(tmp, listing)
    except OSError as e:   # an unwritable cache folder, a full disk
      return self._fail(f"{folder}: {e}")
    if self.index is None: self._load_index()
    self.index.update((n, lib) for n in sources)
    if prune_cache(folder, "*.so", companions=(".txt",)):   # libraries this process loaded stay mapped
      kept = {p for p in set(self.index.values()) if p.exists()}
      self.index = {n: p for n, p in self.index.items() if p in kept}
