"""Small shared helpers: env flags, the log, products, global counters, disk caches and the
hand-written kernels' folder."""
import logging, math, os, sys, weakref
from pathlib import Path

sys.setrecursionlimit(max(sys.getrecursionlimit(), 20000))


def getenv(key, default=0):
  """An integer (or string, if default is a str) from the environment."""
  val = os.environ.get(key)
  if val is None: return default
  return val if isinstance(default, str) else int(val)


DEBUG = getenv("DEBUG", 0)

log = logging.getLogger("minift")
if not log.handlers:
  _h = logging.StreamHandler()
  _h.setFormatter(logging.Formatter("minift: %(message)s"))
  log.addHandler(_h)
  log.setLevel(logging.INFO)
  log.propagate = False


prod = math.prod   # of a shape: 1 for ()


def strides_for(shape):
  """C-contiguous strides (in elements); size-1 dims get stride 0 so views compare equal."""
  strides, acc = [], 1
  for s in reversed(shape):
    strides.append(acc if s != 1 else 0)
    acc *= s
  return tuple(reversed(strides))


def write_cache_file(path, data):
  """Write a cache file (bytes or str) whole or not at all: a temp file named by this process,
  renamed over `path`, so a concurrent process never reads half of it. No fsync: a cache lost to
  a crash is built again. Raises OSError."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(f".{os.getpid()}.tmp")
  if isinstance(data, str): tmp.write_text(data)
  else: tmp.write_bytes(data)
  os.replace(tmp, path)


def prune_cache(folder, pattern, companions=()):
  """Keep a disk cache of built kernels (files `pattern` in `folder`) under MINIFT_CACHE_MAX_MB
  (512 by default; 0: no limit): delete the least recently used first, each with its companion
  files (the same name with another suffix). A load marks a file used (touch_cache). Best effort:
  an error leaves the cache as it is; the newest file always stays. Returns how many were deleted."""
  raw = os.environ.get("MINIFT_CACHE_MAX_MB", "512")
  try: limit = float(raw) * 2**20
  except ValueError: raise ValueError(f"MINIFT_CACHE_MAX_MB must be a number of megabytes, not {raw!r}") from None
  if limit <= 0: return 0
  try:
    files = []
    for f in folder.glob(pattern):
      st = f.stat()
      extra = sum(c.stat().st_size for c in (f.with_suffix(s) for s in companions) if c.exists())
      files.append((st.st_mtime, st.st_size + extra, f))
  except OSError: return 0
  total, deleted = sum(size for _, size, _ in files), 0
  for _, size, f in sorted(files, key=lambda x: x[0])[:-1]:
    if total <= limit: break
    try:
      for c in [f, *(f.with_suffix(s) for s in companions)]: c.unlink(missing_ok=True)
    except OSError: continue
    total, deleted = total - size, deleted + 1
  return deleted


def touch_cache(path):
  """Mark a cache file used now, for prune_cache's least-recently-used order."""
  try: os.utime(path)
  except OSError: pass   # a read-only cache is still a cache


# the hand-written kernels: kernels/ of a checkout, or minift/kernels of an installed package (setup.cfg)
KERNEL_DIR = next((d for d in (Path(__file__).resolve().parent.parent / "kernels", Path(__file__).resolve().parent / "kernels")
                   if (d / "matmul.cl").exists()), Path(__file__).resolve().parent.parent / "kernels")


def read_kernel(name):
  """The source of hand-written kernel `name` (kernels/matmul.cl, kernels/attention.c, ...)."""
  path = KERNEL_DIR / name
  try: return path.read_text()
  except OSError: raise RuntimeError(f"{path} is missing (reinstall minift: its kernels/ was not installed)") from None


def normalize_axis(axis, ndim, what="axis"):
  if not -ndim <= axis < max(ndim, 1):
    raise IndexError(f"{what} {axis} is out of range for a tensor with {ndim} dims")
  return axis + ndim if axis < 0 else axis


class WeakIdMap:
  """A map keyed by object identity that holds its keys weakly: an entry goes when its key does.
  For what a backend works out once per scheduler object (a kernel, a View) and keeps in objects
  of its own, never on those objects; looked up by id(), so a key's own __hash__ (a View's
  hashes every field) never runs."""
  __slots__ = ("_entries", "_remove")

  def __init__(self):
    entries = self._entries = {}
    self._remove = lambda ref: entries.pop(ref.key, None)

  def get(self, key, default=None):
    entry = self._entries.get(id(key))
    return default if entry is None else entry[1]

  def __setitem__(self, key, value):
    self._entries[id(key)] = (weakref.KeyedRef(key, self._remove, id(key)), value)

  def __len__(self): return len(self._entries)


class GlobalCounters:
  """Bytes held by live device buffers and kernels run; used by tests and benchmarks."""
  mem_used = 0
  mem_peak = 0
  kernel_count = 0

  @classmethod
  def reset_peak(cls):
    cls.mem_peak = cls.mem_used


def all_int(xs):
  return all(isinstance(x, int) and not isinstance(x, bool) for x in xs)

