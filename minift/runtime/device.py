"""The backend contract (Device) and the registry of backends by name.

A backend is a package under minift/backends/ whose Device subclass runs the scheduler's
kernels (schedule.Kernel) on Buffers it makes. Adding one takes that package and one line in
BACKENDS below (or register() at run time); nothing else changes. What a backend does besides
the required methods it declares as class attributes, which the executor, jit and Tensor read
(they never probe a device with hasattr).

MINIFT_DEVICE (or device=) names the backend; 'numpy' always works. A backend that cannot
start here (no pyopencl or OpenCL platform, no Vulkan device or GLSL compiler, a failed
self-check) falls back to NumPy with one warning.
"""
import importlib, os, time
from dataclasses import dataclass
from minift.dtype import dtypes
from minift.helpers import log, prod


class Device:
  """A backend. Subclasses set `name`, implement the memory methods and run(), and declare:

  runs_attention  Tensor.scaled_dot_product_attention may make ATTENTION and ATTENTION_BACKWARD
                  kernels for this device (else attention is a graph of matmuls and softmax).
  fuses_assigns   fuse_assigns() may turn consecutive in-place updates of one shape into one
                  FusedAssigns program (jit asks, for the updates it replays).
  prepare()       called with the kernels of a schedule that run here before the first of them
                  runs (to build them all in one go); does nothing by default.
  submit()        called once the last kernel of a schedule or a jit replay has been run(): a
                  backend that records kernels into a command buffer (Vulkan) submits it here,
                  once per realize; does nothing by default.
  written()       the buffers a kernel run wrote in place (the pager marks their disk copies stale).
  page_out(), page_in()  a device-memory backend lets the pager (the sharder) take a buffer's memory
                  back and give it memory again.
  quantized_types the quantized dtypes (minift/quant.py, by name) whose buffers its matmul,
                  gather and dequant kernels read; a weight of another quantized type is made
                  float32 when it is loaded for this device (one log line). None by default.
  """
  name = None
  runs_attention = False
  fuses_assigns = False
  quantized_types = frozenset()

  # ---- memory
  def from_numpy(self, arr, dtype):
    """A Buffer of `dtype` holding arr (copied, or shared where arr is read-only)."""
    raise NotImplementedError

  def to_numpy(self, buf):
    """buf's elements as a flat NumPy array (the buffer's own memory where it is host memory)."""
    raise NotImplementedError

  def copy_in(self, buf, arr):
    """Overwrite buf's elements with arr (same size)."""
    raise NotImplementedError

  def alloc_from(self, arr):
    """A Buffer holding the NumPy array arr, of arr's dtype."""
    return self.from_numpy(arr, dtypes.from_any(arr.dtype))

  def free(self, buf):
    """buf is being deleted: take back its memory (buf.data)."""

  def is_writable(self, buf):
    """False when buf's memory cannot be written (a read-only mapping of a weight file)."""
    return True

  def forget_copies(self, buf):
    """buf was changed from outside a kernel (the pager paged it): drop copies made of it."""

  def synchronize(self):
    """Wait until the work queued on the device is done."""

  def submit(self):
    """The kernels of a schedule (or a jit replay) have all been run(): start what was recorded."""

  def page_out(self, buf):
    """Give buf's device memory back now (the pager keeps its bytes elsewhere); buf.data becomes None."""
    raise NotImplementedError(f"the {self.name} backend keeps buffers in host memory: the pager moves their arrays")

  def page_in(self, buf, arr):
    """Give a paged-out buf device memory again, holding the NumPy array arr."""
    raise NotImplementedError(f"the {self.name} backend keeps buffers in host memory: the pager moves their arrays")

  def synchronize_time(self, start):
    """Seconds since time.perf_counter() was `start`, once the device finished its work (DEBUG=2)."""
    return time.perf_counter() - start

  # ---- kernels
  def prepare(self, kernels): pass

  def run(self, kernel, ins, out=None, rand_key=None):
    """Run a schedule.Kernel (or a FusedAssigns this device made) on input Buffers ins and return
    its output Buffer. out: a buffer the result must be written into (an assign's target, which
    is one of ins), or None for a fresh one. rand_key: (seed, counter) of a 'rand' kernel."""
    raise NotImplementedError

  def fuse_assigns(self, kernels, in_maps, in_dtypes, targets):
    """A FusedAssigns running these in-place elementwise updates as one program, or None.
    in_maps[j][i]: the shared input that kernel j's input i is; in_dtypes: the shared inputs'
    dtypes; targets: the buffers they write."""
    return None

  def written(self, kernel, ins, out):
    if isinstance(kernel, FusedAssigns): return [ins[i] for i in kernel.targets]
    return [] if out is None else [out]


@dataclass(eq=False)
class FusedAssigns:
  """In-place updates (assign kernels, in order) that a device runs as one program over their
  inputs, each input once (Device.fuse_assigns); targets: the indices of the inputs they write.
  jit replays it in their place. `program` is the device's own (what it compiled)."""
  kernels: list
  targets: list
  program: object

  @property
  def device(self): return self.kernels[0].device

  @property
  def shape(self): return tuple(self.kernels[0].shape)

  @property
  def numel(self): return prod(self.shape)

  @property
  def name(self): return "fused_" + "_".join(k.name for k in self.kernels)


# ---- the registry

# name -> the Device subclass of each backend, as "module:class", imported on first use.
BACKENDS = {
  "numpy": "minift.backends.numpy:NumpyDevice",
  "opencl": "minift.backends.opencl:OpenCLDevice",
  "vulkan": "minift.backends.vulkan:VulkanDevice",
}
FALLBACK = "numpy"   # the backend that always starts

_devices, _warned = {}, set()
unavailable = {}   # name -> why that backend cannot start here (once start() found out), for tools to report


def register(name, device):
  """Make a backend known under `name`: a Device subclass (or any callable that returns a
  Device), or its "module:class" path. It starts on first use."""
  BACKENDS[name] = device
  _devices.pop(name, None)
  unavailable.pop(name, None)


def start(name):
  """The started Device of backend `name`, or None where it cannot start here (warned once)."""
  if name not in _devices:
    factory = BACKENDS[name]
    try:
      if isinstance(factory, str):
        module, _, cls = factory.partition(":")
        factory = getattr(importlib.import_module(module), cls)
      _devices[name] = factory()
    except Exception as e:   # no driver, no platform, a failed self-check: NumPy it is
      if name == FALLBACK: raise
      _devices[name] = None
      # a missing Python binding (pyopencl) comes with the backend's extra of the same name
      hint = f" (pip install 'minift[{name}]')" if isinstance(e, ModuleNotFoundError) and not (e.name or "").startswith("minift") else ""
      unavailable[name] = f"{type(e).__name__}: {e}{hint}"
      if name not in _warned:
        _warned.add(name)
        title = (BACKENDS[name].rpartition(":")[2] if isinstance(BACKENDS[name], str) else BACKENDS[name].__name__).removesuffix("Device")
        log.warning(f"{title} unavailable ({unavailable[name]}); using the NumPy backend")
  return _devices[name]


def available_devices():
  """The backends that start here, in registry order."""
  return [name for name in BACKENDS if start(name) is not None]


def canonical_device(device=None):
  """The backend name from the argument or MINIFT_DEVICE ('cpu...' means numpy); one that
  cannot start here gives FALLBACK."""
  name = (device or os.environ.get("MINIFT_DEVICE") or FALLBACK).lower()
  if name.startswith("cpu"): name = "numpy"
  if name not in BACKENDS:
    raise ValueError(f"unknown device {name!r}; expected one of {', '.join(map(repr, BACKENDS))} (device= or MINIFT_DEVICE)")
  return name if start(name) is not None else FALLBACK


def get_device(name):
  """The started Device of backend `name` (FALLBACK's where it cannot start)."""
  dev = start(name)
  return dev if dev is not None else start(FALLBACK)
