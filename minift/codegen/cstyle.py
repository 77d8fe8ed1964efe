"""The C-style kernel languages' shared half (OpenCL C, the CPU C loops)."""
import numpy as np
from minift.dtype import dtypes


def literal(value, dtype):
  """A C literal of `value` as `dtype` computes (negative values parenthesised)."""
  if dtype is dtypes.bool: return "1" if value else "0"
  if dtype is dtypes.int32:
    value = int(np.int32(value))
    return "(-2147483647-1)" if value == -2**31 else (f"({value})" if value < 0 else str(value))
  if dtype is dtypes.int64:
    value = int(value)
    return "(-9223372036854775807L-1L)" if value == -2**63 else (f"({value}L)" if value < 0 else f"{value}L")
  v = float(np.float16(value)) if dtype is dtypes.float16 else float(np.float32(value))
  if v != v: return "NAN"
  if v in (float("inf"), float("-inf")): return "INFINITY" if v > 0 else "(-INFINITY)"
  return f"({v!r}f)" if v < 0 or (v == 0 and np.signbit(v)) else f"{v!r}f"
