"""The dtypes minift supports, with their NumPy and OpenCL C names.

Besides the arithmetic dtypes there are the quantized ones (minift/quant.py): GGUF's block
formats (Q8_0, Q4_0, ..., Q6_K), for frozen weight matrices only. A quantized dtype stores
`block` elements in `itemsize` bytes, so a buffer of n elements holds nbytes(n) bytes (NumPy
sees them as uint8); only a matmul and an embedding lookup read it (and DEQUANT, which makes it
float32), and nothing computes in it.
"""
from dataclasses import dataclass
import numpy as np


@dataclass(frozen=True)
class DType:
  name: str
  itemsize: int
  np: type
  cl: str          # OpenCL C type used for arithmetic
  priority: int    # for type promotion: higher wins
  block: int = 1   # elements per block of itemsize bytes (quantized dtypes; 1 for the others)

  def __repr__(self): return f"dtypes.{self.name}"

  @property
  def is_quantized(self): return self.block > 1

  def nbytes(self, numel):
    """Bytes that numel elements take (numel a multiple of block)."""
    return numel // self.block * self.itemsize

  @property
  def bytes_per_element(self): return self.itemsize / self.block

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
  # GGUF's block formats (minift/quant.py): block size, bytes per block as ggml lays them out
  q8_0 = DType("q8_0", 34, np.uint8, "uchar", -1, 32)
  q4_0 = DType("q4_0", 18, np.uint8, "uchar", -1, 32)
  q4_1 = DType("q4_1", 20, np.uint8, "uchar", -1, 32)
  q5_0 = DType("q5_0", 22, np.uint8, "uchar", -1, 32)
  q5_1 = DType("q5_1", 24, np.uint8, "uchar", -1, 32)
  q2_k = DType("q2_k", 84, np.uint8, "uchar", -1, 256)
  q3_k = DType("q3_k", 110, np.uint8, "uchar", -1, 256)
  q4_k = DType("q4_k", 144, np.uint8, "uchar", -1, 256)
  q5_k = DType("q5_k", 176, np.uint8, "uchar", -1, 256)
  q6_k = DType("q6_k", 210, np.uint8, "uchar", -1, 256)

  @staticmethod
  def all(): return (dtypes.bool, dtypes.int32, dtypes.int64, dtypes.float16, dtypes.float32)

  @staticmethod
  def quantized(): return (dtypes.q8_0, dtypes.q4_0, dtypes.q4_1, dtypes.q5_0, dtypes.q5_1, dtypes.q2_k, dtypes.q3_k, dtypes.q4_k, dtypes.q5_k, dtypes.q6_k)

  @staticmethod
  def from_any(x):
    """A DType from a DType, a string ('float32', 'half', ...) or a NumPy dtype."""
    if isinstance(x, DType): return x
    if isinstance(x, np.dtype) and x in _BY_NUMPY: return _BY_NUMPY[x]   # every kernel output asks
    if isinstance(x, str):
      alias = {"float": "float32", "half": "float16", "int": "int32", "long": "int64", "fp32": "float32", "fp16": "float16"}
      x = alias.get(x, x)
      for d in dtypes.all() + dtypes.quantized():
        if d.name == x.lower(): return d
      raise TypeError(f"unknown dtype {x!r}; expected one of {[d.name for d in dtypes.all() + dtypes.quantized()]}")
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
