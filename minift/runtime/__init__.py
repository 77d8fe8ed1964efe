"""The runtime layer: what runs kernels, below the front end (tensor, autograd, scheduler) and
above the backends (minift/backends/), which plug into it.

  buffer.py    Buffer (device memory with byte accounting) and the pager hook (the sharder)
  device.py    Device, the contract a backend implements and declares its capabilities in, and
               the registry of backends by name (MINIFT_DEVICE, device=)
  executor.py  run_schedule / run_kernel, and the capture hook (jit)

Imports go one way: buffer <- device <- executor; nothing here imports a backend (the registry
names them as strings, imported on first use).
"""
