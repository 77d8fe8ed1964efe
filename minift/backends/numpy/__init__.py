"""The NumPy backend (always there): NumPy and BLAS, with fused kernels compiled to C loops where
a C compiler is found.

  device.py     NumpyDevice: memory, running kernels, evaluating a kernel's AST with NumPy
  cloops.py     the C dialect and the CPU loop nests: elementwise, reductions, matmul epilogues,
                fused optimizer updates
  compiler.py   building C into cached shared libraries
  attention.py  attention kernels: kernels/attention.c compiled, or NumPy without a compiler
  parallel.py   a compiled loop's outermost range cut into one part per core
"""
from minift.backends.numpy.device import NumpyDevice
