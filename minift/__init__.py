"""minift: on-device LLM fine-tuning on a small lazy tensor framework."""
import os, sys
# OpenBLAS (NumPy's BLAS) keeps its idle threads spinning for 2^28 cycles (~0.1 s) after each
# matmul, on the cores that minift's compiled loops use between matmuls (backends/numpy/parallel.
# call_in_parts). 2^16 cycles (~30 us) still spans the gaps inside a batch of small matmuls
# (attention), where waking a sleeping thread for each costs more (2^4: 10-15% slower there).
# OpenBLAS reads this when NumPy loads it, so it is set only if NumPy is not loaded yet.
if "numpy" not in sys.modules: os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "16")
from minift.tensor import Tensor, no_grad
from minift.dtype import dtypes
from minift.runtime.device import available_devices
from minift.helpers import GlobalCounters
from minift.jit import jit

__all__ = ["Tensor", "no_grad", "dtypes", "jit", "available_devices", "GlobalCounters"]
