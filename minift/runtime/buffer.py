"""Buffers: blocks of device memory with byte accounting (GlobalCounters), and the pager hook.

The pager (minift.sharder.Sharder while one is active: set_pager) may move a buffer's data out
of memory and back; everything that reads a buffer's data outside a kernel asks paged_in()
first, and the executor hands it every kernel's inputs (acquire) and what the kernel wrote
(release). Without a pager these cost one test of None.
"""
from minift.helpers import GlobalCounters


class Buffer:
  """Device memory for `size` elements of `dtype`. `device` is the runtime.device.Device that
  made it; `data` is that device's handle (a NumPy array, a cl.Buffer, ...). A quantized dtype's
  `size` elements take dtype.nbytes(size) bytes: its data are those bytes (uint8)."""
  __slots__ = ("device", "size", "dtype", "data", "nbytes", "__weakref__")

  def __init__(self, device, size, dtype, data):
    self.device, self.size, self.dtype, self.data = device, size, dtype, data
    self.nbytes = dtype.nbytes(size)
    GlobalCounters.mem_used += self.nbytes
    GlobalCounters.mem_peak = max(GlobalCounters.mem_peak, GlobalCounters.mem_used)

  def __del__(self):
    GlobalCounters.mem_used -= self.nbytes
    if self.data is not None: self.device.free(self)

  def __repr__(self): return f"<Buffer {self.device.name} {self.size} {self.dtype.name}>"


# ---- the pager hook

class Pager:
  """What a pager does (minift.sharder.Sharder is the one there is). acquire(bufs, upcoming):
  bring a kernel's input buffers into the memory kernels read and pin them, returning what
  release(pinned, written) unpins; written: the buffers the kernel wrote. fetch(buf, write):
  bring one buffer back into memory (write: it is about to be written). page_of(buf): its page,
  or None when it is not managed. optimizer_only: it pages nothing that forward and backward read."""
  optimizer_only = False
  def acquire(self, bufs, upcoming=None): raise NotImplementedError
  def release(self, pinned, written=()): raise NotImplementedError
  def fetch(self, buf, write=False): raise NotImplementedError
  def page_of(self, buf): raise NotImplementedError


_pager = None


def set_pager(pager):
  """Make `pager` (a Pager, or None) the one every buffer access goes through."""
  global _pager
  _pager = pager


def active_pager():
  """The active Pager, or None."""
  return _pager


def paged_in(buf, write=False):
  """buf, its data brought back into memory first if the pager paged it out."""
  if _pager is not None: _pager.fetch(buf, write)
  return buf


def is_paged(buf):
  return _pager is not None and _pager.page_of(buf) is not None
