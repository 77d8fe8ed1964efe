"""The dtypes minift supports, with their NumPy and OpenCL C names."""
from dataclasses import dataclass
import numpy as np


@dataclass(frozen=True)
class DType:
  name: str
  itemsize: int
  np: type
  cl: str          # OpenCL C type used for arithmetic
  priority: int    # for type promotion: higher wins

  def __repr__(self): return f"dtypes.{self.name}"

  @property
  def is_float(self): return self.name in ("float16", "float32")

  @property
  def is_int(self): return self.name in ("int32", "int64")


class dtypes:
  bool = DType("bool", 1, np.bool_, "bool", 0)
  int32 = DType("int32", 4, np.int32, "int", 1)
  int64 = DType("int64", 8, np.int64, "long", 2)
  float16 = DType("float16", 2, np.float16, "half", 3)
  float32 = DType("float32", 4, np.float32, "float", 4)
  default_float = float32
  default_int = int64   # like torch: python ints become int64

  @staticmethod
  def all(): return (dtypes.bool, dtypes.int32, dtypes.int64, dtypes.float16, dtypes.float32)

  @staticmethod
  def from_any(x):
    """A DType from a DType, a string ('float32', 'half', ...) or a NumPy dtype."""
    if isinstance(x, DType): return x
    if isinstance(x, np.dtype) and x in _BY_NUMPY: return _BY_NUMPY[x]   # every kernel output asks
    if isinstance(x, str):
      alias = {"float": "float32", "half": "float16", "int": "int32", "long": "int64", "fp32": "float32", "fp16": "float16"}
      x = alias.get(x, x)
      for d in dtypes.all():
        if d.name == x: return d
      raise TypeError(f"unknown dtype {x!r}; expected one of {[d.name for d in dtypes.all()]}")
    npd = np.dtype(x)
    for d in dtypes.all():
      if np.dtype(d.np) == npd: return d
    if npd == np.float64: return dtypes.float32
    if npd.kind in "iu": return dtypes.int64 if npd.itemsize >= 8 else dtypes.int32
    raise TypeError(f"unsupported dtype {npd}; expected one of {[d.name for d in dtypes.all()]}")

  @staticmethod
  def promote(a, b):
    return a if a.priority >= b.priority else b


_BY_NUMPY = {np.dtype(d.np): d for d in dtypes.all()}
