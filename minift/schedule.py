"""Turn a lazy graph into an ordered list of kernels (fusion happens here).

A kernel computes one base. Its AST is a tree of KNodes: LOAD (an input base through a View),
CONST, elementwise ops and at most one reduce. The fusion rules (DESIGN.md section 1):
  * a base is materialized when it is an output, an own-kernel op (contiguous, assign, gather,
    scatter-add, rand, copy, attention and its backward), used by two or more kernels-to-be, or cannot be inlined;
  * elementwise bases are inlined into their consumer, movement ops pushed down to the loads
    (a pad, or a view that cannot be pushed, materializes instead);
  * elementwise producers fuse into a reduce's input; elementwise consumers fuse as its epilogue
    when they see the reduce in its own element order (reduce -> broadcast -> reduce splits);
  * a sum of a product whose operands are broadcast on different axes is a matmul: its operands
    are materialized, and backends run it on BLAS or a tiled kernel, never as a broadcast product;
  * a quantized weight made float32 (DEQUANT) is read by a matmul straight from its blocks
    (narrow_source); any other reader materializes it as a kernel of its own (kind "dequant").
"""
from typing import NamedTuple
from minift.lazy import Op, ELEMENTWISE, REDUCE, OWN_KERNEL, LazyOp, LazyBuffer, SAVED_FOR_BACKWARD
from minift.view import View
from minift.helpers import prod
from minift.dtype import dtypes


class LoadArg(NamedTuple):
  """A LOAD's arg: which of the kernel's inputs it reads, through which View."""
  input: int
  view: View


class ReduceArg(NamedTuple):
  """A SUM's or RMAX's arg: the axes it reduces, the shape it reduces (its source's), and whether
  it is a matmul (a sum of a broadcast product of two loads: BLAS or a tiled kernel runs it)."""
  axes: tuple
  shape: tuple
  matmul: bool


class KNode:
  """One node of a kernel AST. LOAD (Op.BUFFER): arg a LoadArg. CONST: arg the value. SUM/RMAX:
  arg a ReduceArg. Elementwise ops: arg as in the lazy op."""
  __slots__ = ("op", "srcs", "arg", "dtype")

  def __init__(self, op, srcs, arg, dtype):
    self.op, self.srcs, self.arg, self.dtype = op, srcs, arg, dtype

  def __repr__(self):
    if self.op is Op.BUFFER: return f"LOAD{self.arg.input}{list(self.arg.view.shape)}"
    if self.op is Op.CONST: return repr(self.arg)
    return f"{self.op.name}({', '.join(map(repr, self.srcs))})"


class Kernel:
  """Computes `out` (a LazyOp) from `inputs` (LazyOps, realized before this runs)."""

  def __init__(self, out, inputs, ast, assign_target=None):
    self.out, self.inputs, self.ast, self.assign_target = out, inputs, ast, assign_target
    self.shape, self.dtype, self.device = out.shape, out.dtype, out.device
    nodes = self._nodes()
    ops = [n.op for n in nodes]
    reduces = [n for n in nodes if n.op in REDUCE]
    if any(o in (Op.GATHER, Op.SCATTER_ADD, Op.RAND, Op.ATTENTION, Op.ATTENTION_BACKWARD, Op.DEQUANT) for o in ops): self.kind = ast.op.name.lower()
    elif reduces and reduces[0].arg.matmul: self.kind = "matmul"
    elif reduces: self.kind = "reduce"
    else: self.kind = "elementwise"
    self.reduce = reduces[0] if reduces else None
    parents = {}
    for n in self._nodes():
      for src in n.srcs: parents[id(src)] = parents.get(id(src), 0) + 1
    self.shared = {k for k, v in parents.items() if v > 1}   # DAG nodes used more than once

  def _nodes(self, root=None, stop=None):
    """The AST's nodes under root (the whole AST by default), each once, not looking below stop."""
    seen, stack, out = set(), [self.ast if root is None else root], []
    while stack:
      n = stack.pop()
      if id(n) in seen: continue
      seen.add(id(n)); out.append(n)
      if n is not stop: stack.extend(n.srcs)
    return out

  @property
  def name(self):
    if self.kind == "matmul":
      axes, in_shape, _ = self.reduce.arg
      return f"matmul_{'x'.join(map(str, self.shape))}_k{prod(in_shape[a] for a in axes)}"
    if self.kind == "reduce":
      return f"r_{self.reduce.op.name.lower()}_{'x'.join(map(str, self.reduce.arg.shape))}"
    if self.assign_target is not None: return f"assign_{'x'.join(map(str, self.shape))}"
    return f"{self.kind}_{'x'.join(map(str, self.shape))}"

  def __repr__(self): return f"<Kernel {self.name}: {self.ast!r}>"


def _toposort(roots):
  """Unrealized bases reachable from roots, producers before consumers (iterative DFS)."""
  order, seen = [], set()
  stack = [(b, False) for b in reversed(roots)]
  while stack:
    base, expanded = stack.pop()
    if expanded: order.append(base); continue
    if id(base) in seen or base.realized: continue
    seen.add(id(base))
    stack.append((base, True))
    for s in reversed(base.srcs): stack.append((s.base, False))
  return order


class _KernelBuilder:
  def __init__(self, realize, todo):
    self.realize, self.todo = realize, todo

  def build(self, base):
    self.inputs, self.index, self.has_reduce, self.memo = [], {}, False, {}
    assign_target = None
    if base.op in ELEMENTWISE:
      ast = KNode(base.op, tuple(self.value(s, False) for s in base.srcs), base.arg, base.dtype)
    elif base.op in REDUCE:
      ast = self.reduce(base)
    elif base.op is Op.CONST:
      ast = KNode(Op.CONST, (), base.arg, base.dtype)
    elif base.op in (Op.CONTIGUOUS, Op.COPY):
      ast = self.value(base.srcs[0], False) if base.op is Op.CONTIGUOUS else KNode(Op.COPY, (self.operand(base.srcs[0]),), None, base.dtype)
    elif base.op is Op.ASSIGN:
      target, value = base.srcs
      assign_target = self.input_index(target.base)
      ast = self.value(value, False)
    elif base.op in (Op.GATHER, Op.SCATTER_ADD, Op.ATTENTION, Op.ATTENTION_BACKWARD, Op.DEQUANT):
      ast = KNode(base.op, tuple(self.operand(s) for s in base.srcs), base.arg, base.dtype)
    elif base.op is Op.RAND:
      ast = KNode(Op.RAND, (), base.arg, base.dtype)
    else:
      raise RuntimeError(f"cannot schedule {base}")
    return Kernel(base, self.inputs, ast, assign_target)

  def input_index(self, base):
    if id(base) not in self.index:
      self.index[id(base)] = len(self.inputs)
      self.inputs.append(base)
    return self.index[id(base)]

  def load(self, lb):
    return KNode(Op.BUFFER, (), LoadArg(self.input_index(lb.base), lb.view), lb.dtype)

  def materialize(self, lb):
    if not lb.base.realized and id(lb.base) not in self.realize:
      self.realize[id(lb.base)] = lb.base
      self.todo.append(lb.base)
    return self.load(lb)

  def operand(self, lb):
    """An input that must be a buffer (matmul operands, gather tables, copies)."""
    return self.load(lb) if lb.base.realized else self.materialize(lb)

  def value(self, lb, in_reduce):
    """AST for the values of lb (a view of its base), inlining what the fusion rules allow.
    The same base seen through the same view twice gives the same node (the AST is a DAG)."""
    key = (id(lb.base), lb.view, in_reduce)
    if key not in self.memo: self.memo[key] = (lb, self._value(lb, in_reduce))   # lb keeps the id alive
    return self.memo[key][1]

  def _value(self, lb, in_reduce):
    base = lb.base
    if base.realized or id(base) in self.realize: return self.load(lb)
    if base.op is Op.CONST:
      return KNode(Op.CONST, (), base.arg, base.dtype) if lb.view.mask is None else self.materialize(lb)
    if base.op in ELEMENTWISE:
      if any(kind == "pad" for kind, _ in lb.moves): return self.materialize(lb)
      srcs = [s.try_moves(lb.moves) for s in base.srcs]
      if any(s is None for s in srcs): return self.materialize(lb)
      return KNode(base.op, tuple(self.value(s, in_reduce) for s in srcs), base.arg, base.dtype)
    if base.op in REDUCE and not in_reduce and not self.has_reduce and lb.view.is_contiguous() \
        and lb.view.numel == prod(base.shape):
      return self.reduce(base)
    return self.materialize(lb)   # (a DEQUANT read by anything but a matmul: a kernel of its own)

  def reduce(self, base):
    self.has_reduce = True
    src = base.srcs[0]
    if base.op is Op.SUM:
      mm = self.matmul(base, src)
      if mm is not None: return mm
    return KNode(base.op, (self.value(src, True),), ReduceArg(base.arg, src.shape, False), base.dtype)

  def matmul(self, base, src):
    mul = src.base
    if mul.realized or id(mul) in self.realize or mul.op is not Op.MUL or not mul.dtype.is_float: return None
    if any(kind == "pad" for kind, _ in src.moves): return None
    a, b = (narrow_source(s.try_moves(src.moves)) for s in mul.srcs)
    if a is None or b is None or a.const_value is not None or b.const_value is not None: return None
    if matmul_axes(a.view, b.view, base.arg) is None: return None
    product = KNode(Op.MUL, (self.operand(a), self.operand(b)), None, mul.dtype)
    return KNode(Op.SUM, (product,), ReduceArg(base.arg, src.shape, True), base.dtype)


def matmul_axes(va, vb, reduce_axes):
  """Split the axes of a broadcast product a*b summed over reduce_axes into
  (batch, m, n, k): m axes are broadcast in b only, n axes in a only. None if not a matmul:
  one side must be broadcast somewhere (a matrix-vector product, e.g. a one-token decode step,
  counts; a plain dot product of two same-shape tensors does not)."""
  batch, m, n = [], [], []
  for i, size in enumerate(va.shape):
    if i in reduce_axes: continue
    a0, b0 = va.strides[i] == 0, vb.strides[i] == 0
    if size != 1 and b0 and not a0: m.append(i)
    elif size != 1 and a0 and not b0: n.append(i)
    else: batch.append(i)
  if not (m or n) or not reduce_axes: return None
  return tuple(batch), tuple(m), tuple(n), tuple(reduce_axes)


def narrow_source(lb):
  """For a matmul operand that is a float32 cast of float16 data, or a quantized weight made
  float32 (DEQUANT), that data (through the same moves): frozen half or quantized weights are
  read as they are stored by the matmul, never copied to float32."""
  if lb is None: return None
  base = lb.base
  if not base.realized and ((base.op is Op.CAST and base.dtype is dtypes.float32 and base.srcs[0].dtype is dtypes.float16)
                            or base.op is Op.DEQUANT):
    src = base.srcs[0].try_moves(lb.moves)
    if src is not None: return src
  return lb


# own kernels whose inputs are buffers (operand()), never fused into them
BUFFER_OPERANDS = {Op.GATHER, Op.SCATTER_ADD, Op.COPY, Op.ATTENTION, Op.ATTENTION_BACKWARD}


def _forced(base, lb, consumer):
  """Bases that a consumer cannot inline whatever the grouping: reduces seen through a view
  that changes element order (broadcasts), elementwise bases seen through a pad, matmul
  operands and the inputs of own kernels that read buffers (known here, so that
  _keep_saved_reductions knows a saved input is materialized anyway)."""
  b = lb.base
  if consumer.op in BUFFER_OPERANDS: return [b]
  out = []
  if b.op in REDUCE and not (lb.view.is_contiguous() and lb.view.numel == prod(b.shape)): out.append(b)
  if b.op in ELEMENTWISE and any(kind == "pad" for kind, _ in lb.moves): out.append(b)
  if consumer.op is Op.SUM and b.op is Op.MUL and not b.realized and b.dtype.is_float:
    ops = [narrow_source(x.try_moves(lb.moves)) for x in b.srcs]
    if None not in ops and all(o.const_value is None for o in ops) and matmul_axes(ops[0].view, ops[1].view, consumer.arg):
      out += [o.base for o in ops]
  return out


def snapshot_kernel(target, assign):
  """Before `assign` overwrites target's buffer: if lazy graphs that will be realized later
  still read the old value (e.g. a loss not realized before the optimizer step), return a copy
  kernel whose output those readers are redirected to, so they see the value they were built
  from (torch semantics). None when no such reader is alive."""
  own, stack = set(), [assign]
  while stack:   # the assign's own pending value graph reads the old value right now: fine
    b = stack.pop()
    if id(b) in own or b.realized and b is not assign: continue
    own.add(id(b)); stack.extend(s.base for s in b.srcs)
  readers = [c for c in (target.readers or ()) if not c.realized and id(c) not in own]
  if not readers: return None
  snap = LazyOp(Op.CONTIGUOUS, (), None, target.shape, target.dtype, target.device)
  for c in readers:
    c.srcs = tuple(LazyBuffer(snap, s.view, s.moves) if s.base is target else s for s in c.srcs)
    target.readers.discard(c)
  load = KNode(Op.BUFFER, (), LoadArg(0, View.contiguous(target.shape)), target.dtype)
  return Kernel(snap, [target], load)


def _keep_saved_reductions(order, realize):
  """A value the backward pass will read, but that this schedule only computes inside another
  kernel, would be recomputed from scratch by the backward, matmuls included (this happens when
  the forward is realized before the backward is built). Materialize the reductions inside it;
  its elementwise part stays cheap to recompute from them."""
  for base in order:
    if id(base) in realize or base not in SAVED_FOR_BACKWARD: continue
    stack, seen = [base], set()
    while stack:
      b = stack.pop()
      if id(b) in seen: continue
      seen.add(id(b))
      if b.op in REDUCE: realize[id(b)] = b; continue
      stack += [s.base for s in b.srcs if not s.base.realized and id(s.base) not in realize and s.base.op in ELEMENTWISE | REDUCE]


def create_schedule(outs):
  """Kernels that realize the LazyBuffers `outs`, in an order that respects dependencies."""
  roots = [lb.base for lb in outs if not lb.base.realized]
  order = _toposort(roots)
  consumers = {}
  realize = {id(b): b for b in roots}
  for base in order:
    if base.op in OWN_KERNEL: realize[id(base)] = base
    for s in base.srcs:
      if s.base.realized: continue
      consumers.setdefault(id(s.base), {})[id(base)] = base
      for f in _forced(s.base, s, base):
        if not f.realized and f.op is not Op.CONST: realize[id(f)] = f
  # consumers first: a base joins the kernel of its consumers when they all share one kernel;
  # used by two or more kernels it is materialized once instead of computed in each. A reduce
  # joins only as an epilogue (not inside another reduce's loop) and only one per kernel. A
  # DEQUANT goes to each consumer, as a constant does: matmuls read the blocks themselves (a
  # layer's forward and its input gradient in one schedule must not make the weight float32).
  group, in_loop, has_reduce = {}, {}, set()
  for base in reversed(order):
    cs = consumers.get(id(base), {}).values()
    groups = {group[id(c)] for c in cs}
    inline = id(base) not in realize and (len(groups) == 1 or base.op in (Op.CONST, Op.DEQUANT))
    if inline and base.op in REDUCE:
      g = next(iter(groups))
      inline = g not in has_reduce and not any(in_loop[id(c)] or c.op in REDUCE for c in cs)
    if not inline:
      realize[id(base)] = base
      group[id(base)] = id(base)
      in_loop[id(base)] = False
      if base.op in REDUCE: has_reduce.add(id(base))
      continue
    g = next(iter(groups)) if groups else id(base)
    group[id(base)] = g
    in_loop[id(base)] = any(group[id(c)] == g and (in_loop[id(c)] or c.op in REDUCE) for c in cs)
    if base.op in REDUCE: has_reduce.add(g)
  _keep_saved_reductions(order, realize)
  todo = list(realize.values())
  builder, kernels = _KernelBuilder(realize, todo), {}
  while todo:
    base = todo.pop()
    if id(base) not in kernels: kernels[id(base)] = builder.build(base)
  return _order_kernels(kernels, roots)


def _order_kernels(kernels, roots):
  # an assign overwrites a buffer: every other kernel reading that buffer must run first
  readers = {}
  for k in kernels.values():
    for i, inp in enumerate(k.inputs):
      if inp.realized and i != k.assign_target: readers.setdefault(id(inp.buffer), []).append(k)
  deps = {}
  for key, k in kernels.items():
    d = [kernels[id(inp)] for inp in k.inputs if id(inp) in kernels]
    if k.assign_target is not None:
      d += [r for r in readers.get(id(k.inputs[k.assign_target].buffer), []) if r is not k]
    deps[key] = d
  ordered, state = [], {}
  for root in [kernels[id(r)] for r in roots] + list(kernels.values()):
    stack = [(root, False)]
    while stack:
      k, done = stack.pop()
      if done: state[id(k.out)] = 2; ordered.append(k); continue
      st = state.get(id(k.out), 0)
      if st == 2: continue
      if st == 1: raise RuntimeError(f"cyclic schedule at {k.name}: a buffer is read after an assign that needs it")
      state[id(k.out)] = 1
      stack.append((k, True))
      for d in reversed(deps[id(k.out)]):
        if state.get(id(d.out), 0) != 2: stack.append((d, False))
  return ordered
