"""The backends: one package each, whose Device subclass (minift/runtime/device.py) runs the
scheduler's kernels. numpy/ always works; opencl/ needs pyopencl and an OpenCL platform.

Adding a backend: a package here with a Device subclass (memory methods, run(), and the
capabilities it declares), and one line naming it in minift.runtime.device.BACKENDS. A backend
that renders kernels to a C-like language subclasses minift.codegen.cstyle's language for its
dialect and keeps its own loop structure (see numpy/cloops.py and opencl/codegen.py).
"""
