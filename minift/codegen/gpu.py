"""What the GPU backends (OpenCL, Vulkan) share below their dialects: indexing a buffer through a
View at named coordinates, the index width, matmul shapes and tiles, when an assign may write
its target in place, what a scatter-add starts from, the random-number key, and splitting a kernel that binds more buffers than
the device takes. Each backend keeps its own kernel structure (backends/opencl/codegen.py,
backends/vulkan/codegen.py); these are the pieces that are the same in both.

Indexing: a View maps a coordinate to an element. A kernel names its coordinates by "groups":
(variable, axes) pairs, where the variable is the row-major flat index over those axes (gid
over every axis of an elementwise kernel; gid over the kept and r over the reduced axes of a
reduce; b, i, j, k over the batch, m, n and k axes of a matmul). Axes that merge into one
stride cost one multiply, whatever their number; masked axes (pads) add a bounds check. The
expressions use only + * / % and comparisons on integers, which read the same in C and GLSL.
"""
import numpy as np
from minift.helpers import prod
from minift.lazy import LazyOp, Op
from minift.schedule import Kernel, KNode, LoadArg, matmul_axes
from minift.view import View


def _coord(var, inner, size, outermost):
  """Coordinate of one run of axes inside a group's flat index `var`."""
  c = var if inner == 1 else f"({var}/{inner})"
  return c if outermost else f"({c}%{size})"


def view_index(view, groups):
  """(index expression, validity condition or None) of `view` at the coordinates `groups`
  names. Axes in no group are at coordinate 0. The condition is "0" when nothing is valid."""
  covered = {a for _, axes in groups for a in axes}
  if view.mask is not None:
    for a, (lo, hi) in enumerate(view.mask):
      if lo >= hi or (a not in covered and not lo <= 0 < hi): return "0", "0"
  terms, conds = [], []
  for var, axes in groups:
    axes = [a for a in axes if view.shape[a] != 1]
    if not axes: continue
    sizes = [view.shape[a] for a in axes]
    inner = [prod(sizes[p + 1:]) for p in range(len(axes))]
    start = 0
    for p in range(1, len(axes) + 1):   # split into runs of axes that merge into one stride
      if p < len(axes) and view.strides[axes[p - 1]] == view.strides[axes[p]] * sizes[p]: continue
      stride = view.strides[axes[p - 1]]
      if stride != 0:
        c = _coord(var, inner[p - 1], prod(sizes[start:p]), start == 0)
        terms.append(c if stride == 1 else f"{c}*{stride}" if stride > 0 else f"{c}*({stride})")
      start = p
    if view.mask is not None:
      for p, a in enumerate(axes):
        lo, hi = view.mask[a]
        c = _coord(var, inner[p], sizes[p], p == 0)
        if lo > 0: conds.append(f"{c}>={lo}")
        if hi < view.shape[a]: conds.append(f"{c}<{hi}")
  if view.offset: terms.append(f"({view.offset})" if view.offset < 0 else str(view.offset))
  return " + ".join(terms) or "0", " && ".join(conds) or None


def wide_index(kernel, in_sizes):
  """True when some buffer or loop of the kernel is too big for 32-bit indices."""
  sizes = [prod(kernel.shape)] + list(in_sizes)
  if kernel.reduce is not None: sizes.append(prod(kernel.reduce.arg.shape))
  return max(sizes) >= 2**31 - 1


def round_up(n, m): return -(-n // m) * m


def pow2_floor(n):
  p = 1
  while p * 2 <= n: p *= 2
  return p


def assign_in_place_ok(kernel):
  """True when every output element reads the assign target only at its own index, outside any
  reduction, so writing the result straight into the target is safe."""
  target = kernel.assign_target
  out_shape = kernel.shape

  def walk(node, in_reduce):
    if node.op is Op.BUFFER:
      if node.arg.input != target: return True
      view = node.arg.view
      return not in_reduce and view.is_contiguous() and prod(view.shape) == prod(out_shape)
    inner = in_reduce or node.op in (Op.SUM, Op.RMAX, Op.GATHER, Op.SCATTER_ADD)
    return all(walk(s, inner) for s in node.srcs)
  return walk(kernel.ast, False)


def scatter_add_fill(kernel, backend):
  """What a scatter-add kernel's output holds before it adds: zeros ({"zero_fill": True}), or a
  third operand ({"fill_from": its input}), a whole buffer that the backend copies into the
  output first."""
  if len(kernel.ast.srcs) < 3: return {"zero_fill": True}
  onto = kernel.ast.srcs[2]
  if onto.op is not Op.BUFFER or onto.arg.view != View.contiguous(kernel.shape):
    raise NotImplementedError(f"{backend} codegen: a scatter-add onto anything but a whole buffer")
  return {"fill_from": onto.arg.input}


def rand_args(seed, counter):
  """The (key, counter) arguments of rand_uniform(n, seed, counter) (backends/numpy/device.py),
  which the GPU kernels compute bit for bit: murmur3's finalizer over the counter."""
  key = (seed * 0x9E3779B1 + (counter >> 32) * 0x85EBCA77) & 0xFFFFFFFF
  return np.uint32(key), np.uint32(counter & 0xFFFFFFFF)


# ---- matmul

# tiles (MatmulConfig, and which to try on a device) are in codegen/tiles.py


def matmul_shape(kernel):
  """(batch, m, n, k) axis groups and (batch, M, N, K) sizes of a matmul kernel."""
  axes, in_shape, _ = kernel.reduce.arg
  la, lb = kernel.reduce.srcs[0].srcs
  groups = matmul_axes(la.arg.view, lb.arg.view, axes)
  return groups, tuple(prod(in_shape[a] for a in g) for g in groups)


def fastest(view, axes):
  """True when the innermost of `axes` has stride 1 in view (loads along it coalesce)."""
  axes = [a for a in axes if view.shape[a] != 1]
  return bool(axes) and abs(view.strides[axes[-1]]) == 1


def matmul_out_index(kernel, batch, m, n):
  """The output's flat index at the matmul coordinates (b), (i), (j)."""
  axes, in_shape, _ = kernel.reduce.arg
  out_view = View.contiguous(tuple(1 if a in axes else s for a, s in enumerate(in_shape)))
  return view_index(out_view, [("(b)", batch), ("(i)", m), ("(j)", n)])[0]


# ---- splitting a kernel that reads too many buffers

def _loads(node, memo=None):
  """The set of input indices a subtree reads."""
  memo = {} if memo is None else memo
  if id(node) not in memo:
    memo[id(node)] = {node.arg.input} if node.op is Op.BUFFER else set().union(*[_loads(s, memo) for s in node.srcs])
  return memo[id(node)]


def _largest_subtree(kernel, limit, weights):
  """(node, shape it is computed in) of the elementwise subtree binding the most (weights[i]:
  what input i costs), at most limit, over two or more inputs; None when there is none."""
  best, memo, seen = None, {}, set()
  reduce_shape = kernel.reduce.arg.shape if kernel.reduce is not None else None
  stack = [(kernel.ast, kernel.shape)]
  while stack:
    node, shape = stack.pop()
    if id(node) in seen: continue
    seen.add(id(node))
    if node.op in (Op.GATHER, Op.SCATTER_ADD, Op.RAND, Op.COPY, Op.BUFFER, Op.CONST): continue
    if node.op in (Op.SUM, Op.RMAX):
      if not node.arg.matmul: stack.append((node.srcs[0], reduce_shape))   # a matmul's operands are loads
      continue
    loads = _loads(node, memo)
    n = sum(weights[i] for i in loads)
    if node is not kernel.ast and len(loads) >= 2 and n <= limit and (best is None or n > best[0]): best = (n, node, shape)
    stack.extend((s, shape) for s in node.srcs)
  return None if best is None else best[1:]


def _rebuild(ast, ins, shape, dtype, device, replace=None, assign_target=None):
  """A Kernel computing `ast` (with nodes swapped per `replace`) over just the buffers it reads."""
  replace, used = dict(replace or {}), {}
  def copy(node):
    if id(node) in replace: node = replace[id(node)]
    if node.op is Op.BUFFER:
      i, view = node.arg
      return KNode(Op.BUFFER, (), LoadArg(used.setdefault(i, len(used)), view), node.dtype)
    return KNode(node.op, tuple(copy_memo(s) for s in node.srcs), node.arg, node.dtype)
  memo = {}
  def copy_memo(node):   # keeps the DAG: a node used twice stays one node
    if id(node) not in memo: memo[id(node)] = copy(node)
    return memo[id(node)]
  new_ast = copy_memo(ast)
  order = sorted(used, key=used.get)
  target = used.get(assign_target) if assign_target is not None else None
  out = LazyOp(Op.CONTIGUOUS, (), None, shape, dtype, device)
  return Kernel(out, [None] * len(order), new_ast, target), [ins[i] for i in order]


def split_kernel(kernel, ins, limit, run, weight=lambda buf: 1):
  """A kernel reading more than `limit` (weight(buf): what binding one input buffer costs) made to
  fit: subtrees of its AST run as kernels of their own (run(kernel, ins) -> output buffer) and are
  read back as loads, until the rest fits. Returns (kernel, ins); None when it cannot be split."""
  while sum(map(weight, ins)) > limit:
    best = _largest_subtree(kernel, limit, [weight(b) for b in ins])
    if best is None: return None
    node, shape = best
    sub, sub_ins = _rebuild(node, ins, shape, node.dtype, kernel.device)
    part = run(sub, sub_ins)
    load = KNode(Op.BUFFER, (), LoadArg(len(ins), View.contiguous(shape)), node.dtype)
    kernel, ins = _rebuild(kernel.ast, ins + [part], kernel.shape, kernel.dtype, kernel.device, {id(node): load}, kernel.assign_target)
  return kernel, ins
