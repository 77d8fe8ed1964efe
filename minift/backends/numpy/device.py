"""The NumPy backend's device: matmuls go to BLAS; elementwise kernels, reductions and matmul
epilogues run as compiled C loops where cloops.py can build them (a C compiler, the kernel's ops
and dtypes covered), and every other kernel's AST is evaluated with NumPy.

Loads are strided views of the input buffers (no copies, pads become np.pad); temporaries
made inside a kernel are reused in place where the shape and dtype allow it.
"""
import itertools
import numpy as np
from numpy.lib.stride_tricks import as_strided
from minift.dtype import dtypes
from minift.helpers import WeakIdMap, prod
from minift.lazy import Op
from minift.runtime.buffer import Buffer, is_paged
from minift.runtime.device import Device, FusedAssigns
from minift.runtime.executor import is_repeating
from minift.schedule import matmul_axes
from minift.view import View
from minift.backends.numpy import cloops, quant
from minift.backends.numpy.attention import ATTENTION_ROWS, attention_functions, attention_numpy, attention_backward_numpy
from minift.backends.numpy import parallel


def erf(x):
  """Abramowitz and Stegun 7.1.26 (absolute error < 1.5e-7), vectorised."""
  t = 1.0 / (1.0 + 0.3275911 * np.abs(x))
  poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
  return (np.sign(x) * (1.0 - poly * np.exp(-x * x))).astype(x.dtype, copy=False)


def rand_uniform(n, seed, counter):
  """The counter-based generator shared by all backends: murmur3's finalizer over
  (counter + i) * golden ratio, xor a seed word; 24 random bits per float32 in [0, 1)."""
  key = np.uint32((seed * 0x9E3779B1 + (counter >> 32) * 0x85EBCA77) & 0xFFFFFFFF)
  x = np.arange(n, dtype=np.uint32) + np.uint32(counter & 0xFFFFFFFF)
  x = x * np.uint32(0x9E3779B9) ^ key
  x ^= x >> np.uint32(16); x *= np.uint32(0x85EBCA6B)
  x ^= x >> np.uint32(13); x *= np.uint32(0xC2B2AE35)
  x ^= x >> np.uint32(16)
  return (x >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def _where(c, x, y, dtype):
  """np.where, but a select against zero (relu, masked gradients, one-hot picks) is a multiply:
  NumPy's boolean selects run about 20x slower than arithmetic. Only for finite values, where
  multiplying by 0 or 1 is exact."""
  for keep, zero, cond in ((x, y, c), (y, x, None)):
    if np.ndim(zero) == 0 and zero == 0 and np.issubdtype(np.asarray(keep).dtype, np.floating) and np.isfinite(keep).all():
      mask = c if cond is not None else np.logical_not(c)
      return np.multiply(keep, mask, dtype=dtype)
  return np.where(c, x, y)


def sigmoid(x, out=None):
  """1 / (1 + exp(-x)) in float32, rounded once to x's dtype (as the OpenCL kernel does). For
  x << 0 exp overflows to inf and the result is exactly 0, the float32 value of the true one."""
  y = np.negative(x, dtype=np.float32)
  if np.ndim(y) == 0: return (np.float32(1.0) / (np.float32(1.0) + np.exp(y))).astype(np.asarray(x).dtype)
  np.exp(y, out=y)
  y += np.float32(1.0)
  np.reciprocal(y, out=y)
  return y if y.dtype == x.dtype else y.astype(x.dtype)


UNARY = {Op.NEG: np.negative, Op.EXP: np.exp, Op.LOG: np.log, Op.SQRT: np.sqrt, Op.RECIP: np.reciprocal,
         Op.TANH: np.tanh, Op.SIN: np.sin, Op.SIGMOID: sigmoid}
BINARY = {Op.ADD: np.add, Op.SUB: np.subtract, Op.MUL: np.multiply, Op.DIV: np.true_divide,
          Op.MAX: np.maximum, Op.POW: np.power, Op.CMPLT: np.less, Op.CMPEQ: np.equal}


def view_array(flat, view, compact=False):
  """The NumPy array a View describes over a flat array (zeros where masked). compact: a dim
  the view broadcasts (stride 0) stays size 1, so ops on it run at its real size (a layernorm's
  (B, T, 1) statistics, a bias) and broadcast where they meet a full-size operand."""
  if view.mask is None:
    shape, strides, offset = _strided(view, flat.itemsize, compact)
    if shape is None: return np.empty(view.shape, flat.dtype)
    # the ndarray constructor, not as_strided: a kernel makes several of these every run, and
    # as_strided's detour through __array_interface__ cost more than many small kernels' math
    arr = np.ndarray(shape, flat.dtype, flat, offset, strides)
    arr.flags.writeable = False   # a load never writes its input (a kernel that only loads must copy it)
    return arr
  if prod(view.shape) == 0: return np.empty(view.shape, flat.dtype)
  out = np.zeros(view.shape, flat.dtype)
  region, inner = masked_parts(flat, view)
  if region is not None: out[region] = inner
  return out


_LAYOUTS = WeakIdMap()   # View -> {(itemsize, compact): _strided's answer}


def _strided(view, itemsize, compact):
  """(shape, byte strides, byte offset) of an unmasked view; shape None when it is empty. Kept
  per View (immutable; a model's weights are loaded through the same View in every call)."""
  cache = _LAYOUTS.get(view)
  if cache is None: cache = _LAYOUTS[view] = {}
  key = (itemsize, compact)
  if key not in cache:
    if prod(view.shape) == 0: cache[key] = None, None, None
    else:
      shape = tuple(1 if compact and st == 0 else n for n, st in zip(view.shape, view.strides))
      cache[key] = shape, tuple(st * itemsize for st in view.strides), view.offset * itemsize
  return cache[key]


def masked_parts(flat, view):
  """(the box of a masked view that holds values, as slices; those values), or (None, None)
  when nothing is valid: the rest of the view reads as zero."""
  if any(lo >= hi for lo, hi in view.mask): return None, None
  inner_offset = view.offset + sum(lo * st for (lo, _), st in zip(view.mask, view.strides))
  inner_shape = tuple(hi - lo for lo, hi in view.mask)
  inner = as_strided(flat[inner_offset:], inner_shape, tuple(s * flat.itemsize for s in view.strides), writeable=False)
  return tuple(slice(lo, hi) for lo, hi in view.mask), inner


def _holds_result(x, other, dtype):
  """x (an array the caller owns) can take the result of x op other in place: the broadcast of
  the two has x's shape and x has the result's dtype."""
  if not isinstance(x, np.ndarray) or x.dtype != dtype: return False
  o = np.shape(other)
  return len(o) <= x.ndim and all(d == 1 or d == e for d, e in zip(reversed(o), reversed(x.shape)))


def _take(arr, region):
  """Block `region` of an array that may be size 1 (broadcast) on some of the block's axes."""
  return arr[tuple(r if arr.shape[i] != 1 else slice(None) for i, r in enumerate(region))]


# A kernel of at least BLOCKED_FROM elements is evaluated BLOCK elements at a time: NumPy makes
# a temporary array for every op of a kernel, and blocks keep those small (in the core's cache,
# and out of the peak memory: a step's cross-entropy over 50k-token logits made several 50 MB
# temporaries). Smaller kernels run whole: there, the Python cost of each block outweighed the
# gain (measured on a GPT-2 LoRA step; this machine's 300 MB L3 holds whole kernels anyway).
BLOCK = 1 << 16
BLOCKED_FROM = 1 << 21


class _Env:
  """What evaluating one kernel's AST needs: the input arrays, AST nodes used twice (computed
  once), what was worked out once per node (_KernelState.per_node), and when evaluating block
  by block, the arrays made once for every block (loads, BLAS results) and the block of the
  output being computed."""
  __slots__ = ("flats", "shared", "per_node", "memo", "whole", "region")

  def __init__(self, flats, shared, per_node, whole=None, region=None):
    self.flats, self.shared, self.per_node, self.memo, self.whole, self.region = flats, shared, per_node, {}, whole, region


_UNPREPARED = object()   # _KernelState.loop before cloops.prepare looked at the kernel


class _KernelState:
  """What the NumPy backend works out once per kernel, kept while the kernel lives (jit replays
  run the same kernels every step): its compiled loop (a cloops.CLoop; None: NumPy evaluates it)
  and that loop's function, its blocks ((BLOCK, BLOCKED_FROM) they were cut for, the blocks),
  and per AST node: a matmul's operand layout, the padded load of an x + pad(y)."""
  __slots__ = ("loop", "fn", "blocks", "per_node")

  def __init__(self):
    self.loop, self.fn, self.blocks, self.per_node = _UNPREPARED, None, None, {}


def _block_shape(shape, region):
  return tuple(r.stop - r.start for r in region) + tuple(shape[len(region):])


def blocks(kernel):
  """The blocks (tuples of slices over the leading axes) to evaluate kernel in, or None when
  it is evaluated whole: small kernels, gathers and the like, a matmul with nothing after it
  (BLAS writes its output in one go), and reductions whose reduced axes are not all inside a
  block (a bias gradient summed over the batch)."""
  if kernel.kind not in ("elementwise", "reduce", "matmul") or (kernel.kind == "matmul" and kernel.ast is kernel.reduce): return None
  shape = kernel.reduce.arg.shape if kernel.kind == "reduce" else kernel.shape
  if prod(shape) < BLOCKED_FROM: return None
  inner, ax = 1, len(shape) - 1   # blocks split axis ax; the axes after it are whole in every block
  while inner * shape[ax] <= BLOCK: inner *= shape[ax]; ax -= 1
  if kernel.kind == "reduce":
    if min(kernel.reduce.arg.axes) <= ax or tuple(kernel.shape[:ax + 1]) != tuple(shape[:ax + 1]): return None
  step = max(1, BLOCK // inner)
  return [tuple(slice(i, i + 1) for i in outer) + (slice(s, min(s + step, shape[ax])),)
          for outer in itertools.product(*[range(n) for n in shape[:ax]]) for s in range(0, shape[ax], step)]


class NumpyDevice(Device):
  name = "numpy"
  runs_attention = True   # one kernel each way (attention_functions, or attention.py without a compiler)
  fuses_assigns = True    # an optimizer's updates of one weight as one C loop (cloops.render_fused)
  quantized_types = frozenset(quant.TYPES)   # matmuls and lookups read them (quant.py)

  def alloc_from(self, arr):
    arr = np.ascontiguousarray(arr).reshape(-1)
    return Buffer(self, arr.size, dtypes.from_any(arr.dtype), arr)

  def from_numpy(self, arr, dtype):
    # copy a writeable array (as torch.tensor does): the caller may change it later, and assign
    # must not write into it; a read-only one (a memory-mapped weight file) is shared, zero-copy
    arr = np.asarray(arr)
    if dtype.is_quantized:   # arr: the blocks' bytes
      raw = (np.array(arr, np.uint8) if arr.flags.writeable else np.asarray(arr, np.uint8)).reshape(-1)
      return Buffer(self, raw.size // dtype.itemsize * dtype.block, dtype, raw)
    return self.alloc_from(np.array(arr, dtype=dtype.np) if arr.flags.writeable else np.asarray(arr, dtype=dtype.np))

  def to_numpy(self, buf):
    return buf.data

  def copy_in(self, buf, arr):
    buf.data[...] = np.asarray(arr, dtype=buf.dtype.np).reshape(-1)

  def is_writable(self, buf): return buf.data.flags.writeable

  def __init__(self):
    self._states = WeakIdMap()   # schedule.Kernel -> _KernelState

  def _state(self, kernel):
    state = self._states.get(kernel)
    if state is None: state = self._states[kernel] = _KernelState()
    return state

  def prepare(self, kernels):
    """Build the C loops of a schedule's kernels in one compiler run (cloops.py)."""
    self._prepare(kernels, lambda k: [b.dtype for b in k.inputs])

  def _prepare(self, kernels, in_dtypes_of):
    todo = [(k, state) for k in kernels for state in [self._state(k)] if state.loop is _UNPREPARED]
    # a jitted function's kernels run again on every replay: compiled whatever their size
    loops = cloops.prepare([k for k, _ in todo], in_dtypes_of, 1 if is_repeating() else cloops.C_FROM)
    if loops is not None:   # (None: no compiler; asked again next time)
      for (_, state), loop in zip(todo, loops): state.loop = loop

  def fuse_assigns(self, kernels, in_maps, in_dtypes, targets):
    """A FusedAssigns that runs these in-place elementwise updates of one shape (consecutive
    in a jit recording) as one compiled loop, or None where cloops.render_fused does not cover them
    or there is no compiler. in_maps, in_dtypes: see render_fused; targets: the buffers written."""
    def writable(b):   # a page on disk comes back as a fresh array
      return b.device is self and ((b.data is not None and b.data.flags.writeable) or is_paged(b))
    if not cloops.compiler.available or not all(map(writable, targets)): return None
    try: name, src, outer = cloops.render_fused(kernels, in_maps, in_dtypes)
    except cloops.Unsupported: return None
    if cloops.compiler.get(name) is None: cloops.compiler.build({name: src})
    fn = cloops.compiler.get(name)
    if fn is None: return None
    fn.argtypes = parallel.LOOP_ARGTYPES
    return FusedAssigns(kernels, [m[k.assign_target] for k, m in zip(kernels, in_maps)], (fn, outer))

  def run_fused(self, fused, ins):
    (fn, outer), flats = fused.program, [b.data for b in ins]
    parallel.call_in_parts(fn, flats[fused.targets[0]], [f.ctypes.data for f in flats], outer, fused.numel * len(flats))
    return ins[fused.targets[0]]

  def run(self, kernel, ins, assign_out=None, rand_key=None):
    if isinstance(kernel, FusedAssigns): return self.run_fused(kernel, ins)
    flats = [b.data if b.device is self else b.device.to_numpy(b) for b in ins]   # a copy from another device
    state = self._state(kernel)
    fn = state.fn
    if fn is None and kernel.kind in cloops.C_KINDS:
      if state.loop is _UNPREPARED: self._prepare([kernel], lambda k: [b.dtype for b in ins])
      loop = state.loop
      if isinstance(loop, cloops.CLoop):
        fn = state.fn = cloops.compiler.get(loop.name)
        if fn is not None: fn.argtypes = parallel.LOOP_ARGTYPES
    if fn: return self.run_c(kernel, state, fn, flats, assign_out)
    if kernel.kind == "scatter_add" and assign_out is not None:   # onto its third operand's buffer, in place (jit._donated)
      if assign_out.data.flags.writeable:
        g, idx = (view_array(flats[n.arg.input], n.arg.view) for n in kernel.ast.srcs[:2])
        np.add.at(assign_out.data.reshape(kernel.shape), idx.reshape(-1), g.reshape(-1, kernel.shape[-1]))
        return assign_out
      assign_out = None   # a read-only buffer: onto a copy of it after all
    if kernel.kind in ("attention", "attention_backward"):
      res = self.attention(kernel, flats)
      if assign_out is None: return self.alloc_from(res)
      assign_out.data[...] = res   # a buffer the replay keeps (jit: state made by the captured call)
      return assign_out
    with np.errstate(all="ignore"):
      if kernel.kind == "rand":
        seed, counter = rand_key
        res = rand_uniform(prod(kernel.shape), seed, counter).reshape(kernel.shape)
      else:
        if state.blocks is None or state.blocks[0] != (BLOCK, BLOCKED_FROM):   # (tests change them)
          state.blocks = (BLOCK, BLOCKED_FROM), blocks(kernel)
        regions = state.blocks[1]
        if regions is not None:
          if assign_out is not None and _reads_only_its_own_elements(kernel):   # write the blocks straight into the target
            self.run_blocks(kernel, state, flats, regions, assign_out.data.reshape(kernel.shape))
            return assign_out
          res = self.run_blocks(kernel, state, flats, regions, np.empty(kernel.shape, kernel.dtype.np))
        else:
          res, _ = self.eval(kernel.ast, _Env(flats, kernel.shared, state.per_node), kernel.shape)
    res = np.asarray(res)
    if res.dtype != kernel.dtype.np: res = res.astype(kernel.dtype.np)
    if res.shape != kernel.shape: res = np.broadcast_to(res, kernel.shape)
    if assign_out is not None:
      assign_out.data[...] = res.reshape(-1)
      return assign_out
    # a kernel that only loads (contiguous, copy, a constant) gives a read-only view of its
    # input: the output must own its memory, or an assign to it fails or writes the input
    return self.alloc_from(res if res.flags.writeable else res.copy())

  def run_c(self, kernel, state, fn, flats, assign_out):
    """Run a kernel's compiled loop; a matmul's product comes from BLAS first, and its
    epilogue is written over it (each element reads only its own product)."""
    extra, out, loop = [], None, state.loop
    if kernel.kind == "matmul":
      mm = np.ascontiguousarray(self.matmul(kernel.reduce, flats, kernel.shape, state.per_node), dtype=np.float32).reshape(-1)
      extra = [mm.ctypes.data]
      if kernel.dtype is dtypes.float32: out = mm
    in_place = assign_out is not None and _reads_only_its_own_elements(kernel)
    if in_place: out = assign_out.data
    elif out is None: out = np.empty(prod(kernel.shape), kernel.dtype.np)
    args = [f.ctypes.data for f in flats] + extra
    if loop.chunks:   # a reduction to one value: partial sums in parts, then added up in order
      part = np.empty(2 * loop.chunks, np.float64)
      args.append(part.ctypes.data)
    parallel.call_in_parts(fn, out, args, loop.outer, loop.size)
    if loop.chunks: fn(parallel.pack([out.ctypes.data, *args]), -1, 0)
    if in_place: return assign_out
    if assign_out is not None:
      assign_out.data[...] = out
      return assign_out
    return self.alloc_from(out)

  def attention(self, kernel, flats):
    """An ATTENTION kernel's output (B, Hq, T, Dv), or an ATTENTION_BACKWARD kernel's gradients
    of q, k and v one after the other, flat: the compiled loops where there is a compiler, else
    NumPy, a block of queries at a time."""
    arrays = [np.ascontiguousarray(view_array(flats[n.arg.input], n.arg.view)) for n in kernel.ast.srcs]
    q, k, v = arrays[:3]
    backward, (scale, causal, window) = kernel.kind == "attention_backward", kernel.ast.arg
    B, Hq, T, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    fns = attention_functions()
    if fns is None:
      with np.errstate(all="ignore"):
        if not backward: return attention_numpy(q, k, v, scale, causal, window).reshape(-1)
        return np.concatenate([g.reshape(-1) for g in attention_backward_numpy(q, k, v, arrays[3], scale, causal, window)])
    out, failed, scale_f = np.empty(prod(kernel.shape), np.float32), np.zeros(1, np.int32), np.array([scale], np.float32)
    # parts: blocks of queries forward; (batch, kv head) pairs backward, each owning its keys' gradients
    units = B * Hkv if backward else B * Hq * -(-T // ATTENTION_ROWS)
    parallel.call_in_parts(fns[backward], out, [a.ctypes.data for a in arrays] + [failed.ctypes.data, scale_f.ctypes.data, B, Hq, Hkv, T, S, D, Dv, int(causal), window or 0],
                           units, B * Hq * T * max(S, 1))
    if failed[0]: raise MemoryError(f"attention {q.shape} x {k.shape}: no memory for the scratch of {S} keys")
    return out

  def run_blocks(self, kernel, state, flats, regions, out):
    """Evaluate kernel block by block into out. Loads and BLAS matmuls are made once, whole;
    each block then slices them."""
    whole = {}
    for node in kernel._nodes():
      if node.op is Op.BUFFER and not node.dtype.is_quantized: whole[id(node)] = view_array(flats[node.arg.input], node.arg.view, compact=True)
      elif node.op is Op.SUM and node.arg.matmul: whole[id(node)] = self.matmul(node, flats, kernel.shape, state.per_node)
    for region in regions:
      res, _ = self.eval(kernel.ast, _Env(flats, kernel.shared, state.per_node, whole, region), _block_shape(kernel.shape, region))
      out[region] = res
    return out

  def eval(self, node, env, shape):
    """(array of `shape` or broadcastable scalar, owned) for a KNode; owned arrays may be
    overwritten by the caller. Nodes used twice in the AST are computed once."""
    if id(node) in env.shared:
      if id(node) not in env.memo: env.memo[id(node)] = self._eval(node, env, shape)[0]
      return env.memo[id(node)], False
    return self._eval(node, env, shape)

  def _eval(self, node, env, shape):
    op = node.op
    if env.whole is not None and id(node) in env.whole:   # made once for all blocks: this block's part
      return _take(env.whole[id(node)], env.region), False
    if op is Op.BUFFER:   # a masked view is made as a fresh array: the caller may write it
      return view_array(env.flats[node.arg.input], node.arg.view, compact=True), node.arg.view.mask is not None
    if op is Op.CONST:
      return node.dtype.np(node.arg), False
    if op in UNARY or op in (Op.ERF, Op.CAST):
      x, owned = self.eval(node.srcs[0], env, shape)
      if op is Op.CAST: return np.asarray(x).astype(node.arg.np), True
      if op is Op.ERF: return erf(np.asarray(x)), True
      if op is Op.RECIP and not np.issubdtype(np.asarray(x).dtype, np.floating): return 1 / x, True
      out = x if owned and isinstance(x, np.ndarray) else None
      return UNARY[op](x, out=out), True
    if op is Op.ADD and env.whole is None:
      if id(node) not in env.per_node:   # the padded load of x + pad(y), if any
        padded = [s for s in node.srcs if s.op is Op.BUFFER and s.arg.view.mask is not None and id(s) not in env.shared]
        env.per_node[id(node)] = padded[-1] if padded else None
      padded = env.per_node[id(node)]
      if padded is not None:   # x + pad(y) (a cat is a sum of such): add y into x's box only, never write pad(y)'s zeros
        other = node.srcs[0] if node.srcs[1] is padded else node.srcs[1]
        x, owned = self.eval(other, env, shape)
        if owned and isinstance(x, np.ndarray) and x.shape == tuple(shape) and x.dtype == node.dtype.np:
          region, inner = masked_parts(env.flats[padded.arg.input], padded.arg.view)
          if region is not None: x[region] += inner
          return x, True
        y, _ = self.eval(padded, env, shape)
        return np.add(x, y), True
    if op in BINARY:
      (a, ao), (b, bo) = self.eval(node.srcs[0], env, shape), self.eval(node.srcs[1], env, shape)
      out = None
      if op is not Op.CMPLT and op is not Op.CMPEQ:
        if ao and _holds_result(a, b, node.dtype.np): out = a
        elif bo and _holds_result(b, a, node.dtype.np): out = b
      res = BINARY[op](a, b, out=out)
      if op is Op.POW and res.dtype != node.dtype.np: res = res.astype(node.dtype.np)
      return res, True
    if op is Op.WHERE:
      c, _ = self.eval(node.srcs[0], env, shape)
      x, _ = self.eval(node.srcs[1], env, shape)
      y, _ = self.eval(node.srcs[2], env, shape)
      return _where(c, x, y, node.dtype.np), True
    if op in (Op.SUM, Op.RMAX):
      axes, in_shape, is_matmul = node.arg
      if is_matmul: return self.matmul(node, env.flats, shape, env.per_node), True
      if env.region is not None: in_shape = _block_shape(in_shape, env.region)
      x, _ = self.eval(node.srcs[0], env, in_shape)
      if np.shape(x) != tuple(in_shape): x = np.broadcast_to(x, in_shape)
      if op is Op.SUM:
        acc = np.float32 if node.dtype is dtypes.float16 else None
        r = np.sum(x, axis=axes, keepdims=True, dtype=acc)
      else:
        r = np.max(x, axis=axes, keepdims=True) if prod(in_shape) else np.full([1 if i in axes else s for i, s in enumerate(in_shape)], -np.inf, x.dtype)
      return np.asarray(r, dtype=node.dtype.np).reshape(shape), True
    full = lambda load: view_array(env.flats[load.arg.input], load.arg.view)   # operands of own kernels are loads
    if op is Op.GATHER:
      tnode, idx = node.srcs[0], full(node.srcs[1])
      rows, cols = tnode.arg.view.shape
      if idx.size and (idx.min() < 0 or idx.max() >= rows):
        raise IndexError(f"embedding index out of range: indices span [{idx.min()}, {idx.max()}] but the table has {rows} rows")
      if tnode.dtype.is_quantized:   # rows straight from the blocks (a row piece, a whole table: contiguous)
        raw = env.flats[tnode.arg.input]
        if tnode.arg.view == View.contiguous((rows, cols)): return quant.gather_rows(raw, tnode.dtype, cols, idx).reshape(idx.shape + (cols,)), True
        return view_array(self.dequantized(raw, tnode.dtype), tnode.arg.view)[idx], True
      return full(tnode)[idx], True
    if op is Op.DEQUANT:
      load = node.srcs[0]
      raw = env.flats[load.arg.input]
      whole = self.dequantized(raw, load.dtype)
      return (whole.reshape(shape) if load.arg.view == View.contiguous(tuple(shape)) else view_array(whole, load.arg.view)), True
    if op is Op.SCATTER_ADD:
      g, idx = full(node.srcs[0]), full(node.srcs[1])
      # onto zeros, or onto a copy of a third operand (LazyBuffer._scatter_onto)
      out = np.array(full(node.srcs[2]), g.dtype).reshape(node.arg, -1) if len(node.srcs) == 3 else np.zeros((node.arg, g.shape[-1]), g.dtype)
      np.add.at(out, idx.reshape(-1), g.reshape(-1, g.shape[-1]))
      return out, True
    if op is Op.COPY:
      return full(node.srcs[0]), False
    raise NotImplementedError(f"NumPy backend cannot run {op}")

  def dequantized(self, raw, dtype):
    """A quantized buffer's data (its blocks' bytes) as a flat float32 array."""
    return quant.dequantize(raw, dtype, quant.numel(raw, dtype))

  def matmul(self, node, flats, shape, per_node):
    """sum(a * b) over k axes as one BLAS call: (batch, m, k) @ (batch, k, n). A quantized
    operand is dequantized a panel at a time for BLAS (quant.py)."""
    axes, in_shape, _ = node.arg
    if prod(in_shape) == 0: return np.zeros(shape, node.dtype.np)   # an empty dim (k == 0 sums to zeros)
    la, lb = node.srcs[0].srcs
    if la.dtype.is_quantized or lb.dtype.is_quantized: return quantized_matmul(node, flats, shape, per_node)
    layout = per_node.get(id(node))   # a decode step runs the same few hundred small matmuls every token
    if layout is None: layout = per_node[id(node)] = _matmul_layout(la.arg.view, lb.arg.view, axes, in_shape)
    layout_a, layout_b, out_shape, out_order, swap = layout
    a3 = _operand(view_array(flats[la.arg.input], la.arg.view), layout_a)
    b3 = _operand(view_array(flats[lb.arg.input], lb.arg.view), layout_b)
    out = _product(a3, b3, swap).reshape(out_shape).transpose(out_order)
    return out.astype(node.dtype.np, copy=False).reshape(shape)


def _matmul_layout(va, vb, axes, in_shape):
  """How to lay out a matmul's operands as (*batch, rows, cols) arrays and its (*batch, m, n)
  result back in the kernel's axis order. Batch axes stay separate: merging them (attention's batch
  and heads) would copy an operand whose heads are interleaved in memory. swap: the kernel
  wants n before m (a weight gradient x^T @ dy written as (in, out)): compute b^T @ a^T, which
  BLAS writes in that order, instead of a transposed result that would then be copied."""
  batch, m, n, k = matmul_axes(va, vb, axes)
  size = lambda axs: prod(in_shape[i] for i in axs)
  batch_shape = tuple(in_shape[i] for i in batch)
  single = size(batch) == 1
  def operand(drop, order, rows, cols):   # index away the other side's axes, then order and merge the rest
    kept = [i for i in range(len(in_shape)) if i not in drop]
    return (tuple(0 if i in drop else slice(None) for i in range(len(in_shape))),
            tuple(kept.index(i) for i in order), (rows, cols) if single else batch_shape + (rows, cols))
  swap = sorted(batch + m + n) != list(batch + m + n) and sorted(batch + n + m) == list(batch + n + m)
  order = batch + n + m if swap else batch + m + n
  return (operand(n, batch + m + k, size(m), size(k)), operand(m, batch + k + n, size(k), size(n)),
          tuple(in_shape[i] for i in order), tuple(order.index(i) for i in sorted(order)), swap)


def _operand(x, layout):
  index, order, shape = layout
  return x[index].transpose(order).reshape(shape)


HALF_BLOCK = 1 << 21   # float16 elements converted to float32 at a time for BLAS (8 MiB of float32)


def _product(a3, b3, swap):
  """a3 @ b3 by BLAS in float32, or b3^T @ a3^T when swap. A float16 operand (frozen weights
  stored in half precision) is converted to float32 a slice along its own free axis at a time,
  each slice making its own columns (or rows) of the product: converted whole, a half-precision
  vocabulary table would be copied to float32 on every matmul, twice its own size in memory."""
  mm = (lambda a, b: np.matmul(b.swapaxes(-1, -2), a.swapaxes(-1, -2))) if swap else np.matmul
  if a3.dtype == np.float16 and b3.dtype == np.float16: a3 = a3.astype(np.float32)
  if np.float16 not in (a3.dtype, b3.dtype): return mm(a3, b3)
  half_b = b3.dtype == np.float16
  big = b3 if half_b else a3
  if big.size <= HALF_BLOCK: return mm(a3.astype(np.float32), b3.astype(np.float32))
  free = -1 if half_b else -2                       # b's columns (n) or a's rows (m)
  step = max(1, HALF_BLOCK // (big.size // big.shape[free]))
  batch = np.broadcast_shapes(a3.shape[:-2], b3.shape[:-2])
  m, n = a3.shape[-2], b3.shape[-1]
  out = np.empty(batch + ((n, m) if swap else (m, n)), np.float32)
  axis = -1 if half_b != swap else -2               # where that axis lands in the product
  for j in range(0, big.shape[free], step):
    part = mm(a3, b3[..., j:j + step].astype(np.float32)) if half_b else mm(a3[..., j:j + step, :].astype(np.float32), b3)
    if axis == -1: out[..., j:j + step] = part
    else: out[..., j:j + step, :] = part
  return out


def _reads_only_its_own_elements(kernel):
  """True when an assign kernel reads its target only at the element it writes, so blocks can
  be written straight into the target (a shifted or transposed read would see new values)."""
  own = View.contiguous(kernel.shape)
  return all(n.arg.view == own for n in kernel._nodes() if n.op is Op.BUFFER and n.arg.input == kernel.assign_target)


# ---- matmuls with a quantized operand (backends/numpy/quant.py runs them)

def quantized_matmul(node, flats, shape, per_node):
  """A matmul kernel's product (of `shape`) where an operand is quantized. The plan (plan_quantized_matmul)
  is worked out once per kernel and kept in per_node."""
  (la, lb), axes, in_shape = node.srcs[0].srcs, node.arg.axes, node.arg.shape
  if id(node) not in per_node:
    lq = la if la.dtype.is_quantized else lb
    per_node[id(node)] = plan_quantized_matmul(la, lb, axes, in_shape, quant.numel(flats[lq.arg.input], lq.dtype))
  plan = per_node[id(node)]
  if plan is None:   # no rectangle of blocks (never made by minift's layers): the whole weight as float32
    arrays = [view_array(quant.dequantize(flats[l.arg.input], l.dtype, quant.numel(flats[l.arg.input], l.dtype)), l.arg.view)
              if l.dtype.is_quantized else view_array(flats[l.arg.input], l.arg.view) for l in (la, lb)]
    layout_a, layout_b, out_shape, out_order, swap = _matmul_layout(la.arg.view, lb.arg.view, axes, in_shape)
    a3, b3 = _operand(arrays[0], layout_a), _operand(arrays[1], layout_b)
    out = np.matmul(b3.swapaxes(-1, -2), a3.swapaxes(-1, -2)) if swap else np.matmul(a3, b3)
    return out.reshape(out_shape).transpose(out_order).astype(node.dtype.np, copy=False).reshape(shape)
  q_is_a, float_layout, rc, out_shape, out_order, swap = plan
  lq, lf = (la, lb) if q_is_a else (lb, la)
  xf = _operand(view_array(flats[lf.arg.input], lf.arg.view), float_layout)   # a: (M, K); b: (K, N)
  x = xf.T if q_is_a else xf                                                  # the float side as (rows, K)
  prod_ = quant.matmul(x, flats[lq.arg.input], lq.dtype, rc)                   # (float side's free, quantized side's free)
  if q_is_a != swap: prod_ = prod_.T                                           # into (m, n), or (n, m) where swapped
  return prod_.reshape(out_shape).transpose(out_order).reshape(shape)


def plan_quantized_matmul(la, lb, axes, in_shape, numel):
  """What quantized_matmul works out once per kernel: (quantized operand is a, the float operand's
  layout, the Rect, output shape and order, swap), or None to dequantize the weight whole.
  numel: the elements of the quantized buffer."""
  batch, m, n, k = matmul_axes(la.arg.view, lb.arg.view, axes)
  if prod(in_shape[a] for a in batch) != 1 or (la.dtype.is_quantized and lb.dtype.is_quantized): return None
  q_is_a = la.dtype.is_quantized
  lq = la if q_is_a else lb
  rc = quant.rect(lq.arg.view, m if q_is_a else n, k, lq.dtype, numel)
  if rc is None: return None
  layout_a, layout_b, out_shape, out_order, swap = _matmul_layout(la.arg.view, lb.arg.view, axes, in_shape)
  return q_is_a, layout_b if q_is_a else layout_a, rc, out_shape, out_order, swap
