"""Compiled loops on every core: a loop's outermost range cut into one part per thread.

ctypes lets go of the GIL while C runs, so the parts run at once. Each output element is
computed the same way in any part, so the thread count ($MINIFT_THREADS) never changes a result.
"""
import os
from concurrent.futures import ThreadPoolExecutor

PARTS_FROM = 1 << 17   # elements a kernel reads or writes per part at least: handing out a part costs ~20-60 us
_pool, _pool_size = None, 0   # worker threads, made on first use
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
if hasattr(os, "register_at_fork"):   # a forked child has none of the threads (no fork on Windows)
  os.register_at_fork(after_in_child=lambda: globals().update(_pool=None, _pool_size=0))


def thread_count():
  """Cores the compiled loops use: $MINIFT_THREADS, else every core this process may run on."""
  env = os.environ.get("MINIFT_THREADS")
  if env is None: return _CORES
  if not env.isdigit() or int(env) < 1: raise ValueError(f"MINIFT_THREADS={env!r}: expected a whole number of threads >= 1")
  return int(env)


def call_in_parts(fn, out, args, outer, work):
  """A compiled loop fn(out, *args, lo, hi) over [0, outer) of its outermost loop, cut into one
  part per thread when there is enough work (`work` elements read or written). ctypes lets go
  of the GIL while C runs, so the parts run at once. Each output element is computed the same
  way in any part, so the result does not depend on the thread count."""
  global _pool, _pool_size
  args = (out.ctypes.data, *args)
  parts = min(thread_count(), outer, work // PARTS_FROM)
  if parts <= 1: return fn(*args, 0, outer)
  if _pool_size < parts - 1:   # more threads asked for ($MINIFT_THREADS raised): a bigger pool
    if _pool is not None: _pool.shutdown(wait=False)
    _pool, _pool_size = ThreadPoolExecutor(parts - 1, thread_name_prefix="minift-loops"), parts - 1
  cuts = [outer * i // parts for i in range(parts + 1)]
  others = [_pool.submit(fn, *args, lo, hi) for lo, hi in zip(cuts[1:-1], cuts[2:])]
  fn(*args, cuts[0], cuts[1])
  interrupted = None
  for f in others:
    while True:
      try:
        f.result()
        break
      except KeyboardInterrupt as e:   # the part still writes into out: returning now would free it under the thread
        interrupted = e
  if interrupted is not None: raise interrupted
