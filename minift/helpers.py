"""Small shared helpers: env flags, products, global counters."""
import math, os, sys

sys.setrecursionlimit(max(sys.getrecursionlimit(), 20000))


def getenv(key, default=0):
  """An integer (or string, if default is a str) from the environment."""
  val = os.environ.get(key)
  if val is None: return default
  return val if isinstance(default, str) else int(val)


DEBUG = getenv("DEBUG", 0)


prod = math.prod   # of a shape: 1 for ()


def strides_for(shape):
  """C-contiguous strides (in elements); size-1 dims get stride 0 so views compare equal."""
  strides, acc = [], 1
  for s in reversed(shape):
    strides.append(acc if s != 1 else 0)
    acc *= s
  return tuple(reversed(strides))


def normalize_axis(axis, ndim, what="axis"):
  if not -ndim <= axis < max(ndim, 1):
    raise IndexError(f"{what} {axis} is out of range for a tensor with {ndim} dims")
  return axis + ndim if axis < 0 else axis


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

