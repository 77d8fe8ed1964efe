"""The OpenCL backend (phone GPUs; PoCL in CI): needs pyopencl and an OpenCL platform.

  device.py   OpenCLDevice: device selection and caps, memory, building (binary cache), launching
  codegen.py  the OpenCL C dialect and the kernel kinds (one work-item per output, work-group
              reductions, the matmul of kernels/matmul.cl specialised by defines)
"""
from minift.backends.opencl.device import OpenCLDevice
