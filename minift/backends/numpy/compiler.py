"""The system C compiler (cc, or $CC) for the NumPy backend's C loops: builds sources into
shared libraries, one per batch, cached on disk under $MINIFT_CACHE_DIR/c or ~/.cache/minift/c
(kept under MINIFT_CACHE_MAX_MB); MINIFT_CLOOPS=0 turns it off.
"""
import ctypes, hashlib, os, platform, shutil, subprocess, tempfile
from pathlib import Path
from minift.helpers import log, prune_cache, touch_cache


def _cpu_id():
  try:
    with open("/proc/cpuinfo") as f:
      return next((line for line in f if line.split(":")[0].strip() in ("flags", "Features")), "")
  except OSError: return platform.machine() + platform.processor()


def cache_dir():
  env = os.environ.get("MINIFT_CACHE_DIR")
  return Path(env) / "c" if env else Path.home() / ".cache" / "minift" / "c"


class Compiler:
  """Builds rendered kernels into shared libraries, one per batch, cached on disk; finds a
  function again by its name (a hash of its source and of the compiler) in this process or in
  the cache."""

  FLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared"]
  OPTIONAL = ["-march=native", "-fopenmp-simd"]   # each dropped where the compiler refuses it

  def __init__(self, prelude):
    self.prelude = prelude   # the C every library starts with (the helper functions kernels call)
    self.functions, self.index, self._flags, self._signature, self.failed = {}, None, None, None, None
    self.cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")

  @property
  def available(self):
    return self.cc is not None and self.failed is None and os.environ.get("MINIFT_CLOOPS", "1") != "0" and self.flags is not None

  @property
  def flags(self):
    """The compiler's flags, found once by building a small loop with each optional flag."""
    if self._flags is None and self.failed is None:
      test = self.prelude + "void probe(float* x) {\n#pragma omp simd\n for (long i = 0; i < 64; i++) x[i] = exp_f(x[i]);\n}\n"
      flags = list(self.FLAGS)
      with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "p.c").write_text(test)
        for extra in ([*self.OPTIONAL], [self.OPTIONAL[1]], [self.OPTIONAL[0]], []):
          res = self._cc(flags + extra, Path(tmp) / "p.c", Path(tmp) / "p.so")
          if res.returncode == 0:
            self._flags = flags + extra
            break
        else: self._fail(res.stderr)
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
