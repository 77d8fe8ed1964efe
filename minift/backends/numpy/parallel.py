"""Compiled loops on every core: a loop's outermost range cut into one part per thread.

Every compiled loop (cloops.py's rendered kernels, kernels/attention.c, kernels/qmatmul.c) has
one signature, void fn(const intptr_t* args, long lo, long hi): its arguments packed in an array
(pack), and the range [lo, hi) of its outermost loop that the call runs. The parts run on the
worker threads of kernels/parts.c, which stay awake between kernels (handing a part to a Python
thread cost ~100 us). ctypes lets go of the GIL while C runs. Each output element is computed
the same way in any part, so the thread count ($MINIFT_THREADS) never changes a result.
"""
import ctypes, functools, hashlib, os
from minift.helpers import read_kernel
from minift.backends.numpy import cloops

PARTS_FROM = 1 << 17   # elements a kernel reads or writes per part at least: below, one core is as fast
LOOP_ARGTYPES = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long]   # (args, lo, hi): every compiled loop's
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def thread_count():
  """Cores the compiled loops use: $MINIFT_THREADS, else every core this process may run on."""
  env = os.environ.get("MINIFT_THREADS")
  if env is None: return _CORES
  if not env.isdigit() or int(env) < 1: raise ValueError(f"MINIFT_THREADS={env!r}: expected a whole number of threads >= 1")
  return int(env)


def pack(args):
  """A compiled loop's arguments (addresses and whole numbers) as the array it takes."""
  return (ctypes.c_ssize_t * len(args))(*args)


@functools.lru_cache(maxsize=None)
def _parts_run(signature):
  """kernels/parts.c's parts_run, built with the C loops' compiler (cached like them)."""
  src = read_kernel("parts.c")
  name = "parts_run_" + hashlib.sha256((cloops.PRELUDE + src + signature).encode()).hexdigest()[:20]
  compiler = cloops.compiler
  if compiler.get(name) is None: compiler.build({name: f"#define PARTS_RUN {name}\n{src}"})
  fn = compiler.get(name)
  if fn is None: raise RuntimeError(f"the C compiler failed on kernels/parts.c:\n{compiler.failed}")
  fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int], ctypes.c_int
  return fn


def call_in_parts(fn, out, args, outer, work):
  """The compiled loop fn on its output array `out` and further arguments `args` over [0, outer)
  of its outermost loop, cut into one part per thread when there is enough work (`work`
  elements read or written)."""
  packed = pack([out.ctypes.data, *args])
  parts = min(thread_count(), outer, work // PARTS_FROM)
  if parts <= 1: return fn(packed, 0, outer)
  cuts = (ctypes.c_long * (parts + 1))(*[outer * i // parts for i in range(parts + 1)])
  _parts_run(cloops.compiler.signature)(ctypes.cast(fn, ctypes.c_void_p), packed, cuts, parts)
