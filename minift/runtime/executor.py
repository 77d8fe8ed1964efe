"""Running kernels: run_schedule (a schedule from schedule.create_schedule, in order) and
run_kernel (one kernel on buffers; jit replays call it directly).

Two hooks plug into every kernel run, each set by its owner through a function here or in
runtime.buffer, never read elsewhere: the pager (runtime.buffer.set_pager; the sharder) gets
each kernel's inputs before it runs and what it wrote after, and the captures
(capturing(); jit) record every kernel run with its buffers. jit also says, with repeating(),
when the kernels scheduled are those of a function it will replay (a backend may then build
code for kernels too small to be worth building for one run).
"""
import contextlib, time
from minift.helpers import DEBUG, GlobalCounters
from minift.runtime.buffer import active_pager
from minift.runtime.device import get_device
from minift.schedule import snapshot_kernel

_captures = []   # what capturing() records into, innermost last
_timers = []     # what timing() reports to


@contextlib.contextmanager
def timing(report):
  """Within the block, report(kernel, ins, out, seconds, pager_seconds) after every kernel run:
  seconds from the call to the device having finished it (the device waits for each kernel, so
  asynchronous devices run slower than without), pager_seconds of it in the pager (the
  sharder's paging). bench.py --task breakdown adds these up by kernel class."""
  _timers.append(report)
  try: yield report
  finally: _timers.remove(report)


@contextlib.contextmanager
def capturing(capture):
  """Within the block, capture.record(kernel, out, ins, rand_key) is called after every kernel
  run_schedule runs (jit records a step's kernels so)."""
  _captures.append(capture)
  try: yield capture
  finally: _captures.remove(capture)


_repeating = [0]   # jitted calls running (warmup and capture): their kernels will be replayed


@contextlib.contextmanager
def repeating():
  """Within the block, the kernels scheduled belong to a jitted function whose replays run them
  again on every call (jit wraps its warmup and capturing calls in it)."""
  _repeating[0] += 1
  try: yield
  finally: _repeating[0] -= 1


def is_repeating():
  """Whether the kernels scheduled now will be replayed (see repeating)."""
  return _repeating[0] > 0


def run_kernel(kernel, ins, out=None, rand_key=None, upcoming=None):
  """Run one kernel (schedule.Kernel, or a device's FusedAssigns) on input buffers; returns its
  output buffer. out: the buffer to write the result into (an assign's target) or None.
  upcoming(): the input buffers of the kernels that run next (the pager prefetches what they need)."""
  device = get_device(kernel.device)
  timed = DEBUG >= 2 or _timers
  st = time.perf_counter() if timed else 0.0
  pager, paging = active_pager(), 0.0
  if pager is None: res = device.run(kernel, ins, out, rand_key)
  else:
    pinned = pager.acquire(ins, upcoming)
    if timed: paging = time.perf_counter() - st
    try: res = device.run(kernel, ins, out, rand_key)
    finally:
      if timed: pt = time.perf_counter()
      pager.release(pinned, device.written(kernel, ins, out))
      if timed: paging += time.perf_counter() - pt
  GlobalCounters.kernel_count += 1
  if timed:
    et = device.synchronize_time(st)
    if DEBUG >= 2: print(f"minift kernel {GlobalCounters.kernel_count:5d} {kernel.name:<40s} {str(kernel.shape):<24s} {et*1e3:9.3f} ms")
    for report in _timers: report(kernel, ins, res, et, paging)
  return res


def run_schedule(schedule):
  """Run kernels in order, then submit them (Device.submit: one submit per realize where a
  backend records them). Each kernel is detached from the graph after it runs, so
  intermediates are freed as soon as nothing later reads them."""
  devices = {k.device for k in schedule}
  for name in devices:   # a backend may build the schedule's kernels in one go
    get_device(name).prepare([k for k in schedule if k.device == name])
  schedule.reverse()
  while schedule:
    k = schedule.pop()
    ins = [b.buffer for b in k.inputs]
    if any(b is None for b in ins): raise RuntimeError(f"kernel {k.name} ran before its inputs were realized")
    if k.assign_target is not None:
      snap = snapshot_kernel(k.inputs[k.assign_target], k.out)
      if snap is not None: schedule += [k, snap]; continue   # run the copy first
    rand_key = k.ast.arg if k.kind == "rand" else None
    upcoming = lambda: ([b.buffer for b in later.inputs if b.buffer is not None] for later in reversed(schedule))
    out = run_kernel(k, ins, ins[k.assign_target] if k.assign_target is not None else None, rand_key, upcoming)
    k.out.buffer, k.out.srcs = out, ()
    k.out = k.inputs = None
    for cap in _captures: cap.record(k, out, ins, rand_key)
    del k, ins, out
  for name in devices: get_device(name).submit()
