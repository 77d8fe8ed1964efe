"""minift: on-device LLM fine-tuning on a small lazy tensor framework."""
import os, sys
# OpenBLAS (NumPy's BLAS) keeps its idle threads spinning for 2^28 cycles (~0.1 s) after each
# matmul, on the cores that minift's compiled loops use between matmuls (backends/numpy/parallel.
# call_in_parts). 2^16 cycles (~30 us) still spans the gaps inside a batch of small matmuls
# (attention), where waking a sleeping thread for each costs more (2^4: 10-15% slower there).
# OpenBLAS reads this when NumPy loads it, so it is set only if NumPy is not loaded yet.
if "numpy" not in sys.modules: os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "16")


def _keep_freed_memory():
  """glibc hands every freed block over its mmap threshold (128 KiB, rising to at most 32 MiB)
  back to the kernel and trims the heap's top, so each training step faults its activations in
  again, page by page: about 100,000 page faults and 0.3-0.5 s of kernel time a step for GPT-2
  small or SmolLM2 at 4 x 128 (bench.py --task breakdown, issue #27). Blocks up to 1 GiB come
  from the heap instead and what a step frees stays there for the next one, which takes the
  same blocks again: peak RSS is the same, the faults are gone. MINIFT_KEEP_FREED=0 keeps
  glibc's defaults (other C libraries, Android's bionic among them, are left alone)."""
  if os.environ.get("MINIFT_KEEP_FREED", "1") == "0": return
  try:
    if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"): return
    import ctypes
    libc = ctypes.CDLL(None)
  except (ValueError, OSError, AttributeError): return
  M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
  libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
  libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)


_keep_freed_memory()
from minift.tensor import Tensor, no_grad
from minift.dtype import dtypes
from minift.runtime.device import available_devices
from minift.helpers import GlobalCounters
from minift.jit import jit

__all__ = ["Tensor", "no_grad", "dtypes", "jit", "available_devices", "GlobalCounters"]
