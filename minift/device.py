"""Devices, buffers and running a schedule.

A Buffer is a block of device memory with byte accounting (GlobalCounters). A device runs
kernels (schedule.Kernel) on buffers. 'numpy' always exists; 'opencl' needs pyopencl and a
platform, and falls back to NumPy with one warning otherwise.
"""
import logging, os, time
from minift.helpers import DEBUG, GlobalCounters

log = logging.getLogger("minift")
if not log.handlers:
  _h = logging.StreamHandler()
  _h.setFormatter(logging.Formatter("minift: %(message)s"))
  log.addHandler(_h)
  log.setLevel(logging.INFO)
  log.propagate = False


class Buffer:
  """Device memory for `size` elements of `dtype`. `data` is the backend's handle."""
  __slots__ = ("device", "size", "dtype", "data", "nbytes", "__weakref__")

  def __init__(self, device, size, dtype, data):
    self.device, self.size, self.dtype, self.data = device, size, dtype, data
    self.nbytes = size * dtype.itemsize
    GlobalCounters.mem_used += self.nbytes
    GlobalCounters.mem_peak = max(GlobalCounters.mem_peak, GlobalCounters.mem_used)

  def __del__(self):
    GlobalCounters.mem_used -= self.nbytes
    if self.data is not None: self.device.free(self)

  def numpy(self):
    return self.device.to_numpy(paged_in(self))

  def __repr__(self): return f"<Buffer {self.device.name} {self.size} {self.dtype.name}>"


_devices = {}
_warned = set()


def available_devices():
  return ["numpy"] + (["opencl"] if _opencl_device() is not None else [])


opencl_error = None   # why OpenCL is unusable, once _opencl_device() found out


def _opencl_device():
  global opencl_error
  if "opencl" not in _devices:
    try:
      from minift.backend_opencl import OpenCLDevice
      _devices["opencl"] = OpenCLDevice()
    except Exception as e:   # no pyopencl, no platform, failed self-check: NumPy it is
      _devices["opencl"], opencl_error = None, f"{type(e).__name__}: {e}"
      if "opencl" not in _warned:
        _warned.add("opencl")
        hint = " (pip install 'minift[opencl]')" if isinstance(e, ImportError) and e.name == "pyopencl" else ""
        log.warning(f"OpenCL unavailable ({type(e).__name__}: {e}{hint}); using the NumPy backend")
  return _devices["opencl"]


def canonical_device(device=None):
  """'numpy' or 'opencl', from the argument or MINIFT_DEVICE; OpenCL falls back to NumPy."""
  name = (device or os.environ.get("MINIFT_DEVICE") or "numpy").lower()
  if name.startswith("cpu"): name = "numpy"
  if name not in ("numpy", "opencl"):
    raise ValueError(f"unknown device {name!r}; expected 'numpy' or 'opencl' (device= or MINIFT_DEVICE)")
  if name == "opencl" and _opencl_device() is None: return "numpy"
  return name


def get_device(name):
  if name == "opencl":
    dev = _opencl_device()
    if dev is not None: return dev
    name = "numpy"
  if "numpy" not in _devices:
    from minift.backend_numpy import NumpyDevice
    _devices["numpy"] = NumpyDevice()
  return _devices["numpy"]


# ---- paging (minift.sharder)

sharder = None   # the active minift.sharder.Sharder, which sets this


def paged_in(buf, write=False):
  """buf, its data brought back into memory first if the sharder paged it out."""
  if sharder is not None: sharder.fetch(buf, write)
  return buf


def is_paged(buf):
  return sharder is not None and sharder.page_of(buf) is not None


# ---- running kernels

def run_kernel(kernel, ins, assign_out=None, rand_key=None, upcoming=None):
  """Run one kernel on input buffers; returns its output buffer. upcoming(): the input
  buffers of the kernels that run next (the sharder prefetches what they need)."""
  device = get_device(kernel.device)
  st = time.perf_counter() if DEBUG >= 2 else 0.0
  if sharder is None: out = device.run(kernel, ins, assign_out, rand_key)
  else:
    pages = sharder.acquire(ins, upcoming)
    try: out = device.run(kernel, ins, assign_out, rand_key)
    finally: sharder.release(pages, [ins[i] for i in kernel.targets] if hasattr(kernel, "targets") else assign_out)   # a fused kernel writes several
  GlobalCounters.kernel_count += 1
  if DEBUG >= 2:
    et = device.synchronize_time(st)
    print(f"minift kernel {GlobalCounters.kernel_count:5d} {kernel.name:<40s} {str(kernel.shape):<24s} {et*1e3:9.3f} ms")
  return out


_capturing = []   # jit capture lists currently recording


def run_schedule(schedule):
  """Run kernels in order. Each kernel is detached from the graph after it runs, so
  intermediates are freed as soon as nothing later reads them."""
  for name in {k.device for k in schedule}:   # a backend may build the schedule's kernels in one go
    device = get_device(name)
    if hasattr(device, "prepare"): device.prepare([k for k in schedule if k.device == name])
  schedule.reverse()
  while schedule:
    k = schedule.pop()
    ins = [b.buffer for b in k.inputs]
    if any(b is None for b in ins): raise RuntimeError(f"kernel {k.name} ran before its inputs were realized")
    if k.assign_target is not None:
      from minift.schedule import snapshot_kernel
      snap = snapshot_kernel(k.inputs[k.assign_target], k.out)
      if snap is not None: schedule += [k, snap]; continue   # run the copy first
    rand_key = k.ast.arg if k.kind == "rand" else None
    upcoming = lambda: ([b.buffer for b in later.inputs if b.buffer is not None] for later in reversed(schedule))
    out = run_kernel(k, ins, ins[k.assign_target] if k.assign_target is not None else None, rand_key, upcoming)
    k.out.buffer, k.out.srcs = out, ()
    k.out = k.inputs = None
    for cap in _capturing: cap.record(k, out, ins, rand_key)
    del k, ins, out
