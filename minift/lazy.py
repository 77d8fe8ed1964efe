"""The lazy graph: LazyOp nodes compute contiguous arrays; LazyBuffers are views of them.

Movement ops never add nodes: they change the View of the same base. Elementwise, reduce and
special ops make a new base. Nothing is computed here; schedule.py turns a graph into kernels.
"""
import weakref
from enum import Enum, auto
from minift.dtype import dtypes
from minift.helpers import prod
from minift.view import View


class Op(Enum):
  # members are singletons: hash by identity in C (Enum's own __hash__ is Python code, called
  # for every `op in TABLE` of every kernel the NumPy backend evaluates)
  __hash__ = object.__hash__
  # leaves
  BUFFER = auto(); CONST = auto(); RAND = auto()
  # unary
  NEG = auto(); EXP = auto(); LOG = auto(); SQRT = auto(); RECIP = auto(); TANH = auto(); SIN = auto(); SIGMOID = auto()
  ERF = auto(); CAST = auto()
  # binary
  ADD = auto(); SUB = auto(); MUL = auto(); DIV = auto(); MAX = auto(); POW = auto(); CMPLT = auto(); CMPEQ = auto()
  # ternary
  WHERE = auto()
  # reduce
  SUM = auto(); RMAX = auto()
  # ops that always are kernels of their own
  CONTIGUOUS = auto(); ASSIGN = auto(); GATHER = auto(); SCATTER_ADD = auto(); COPY = auto(); ATTENTION = auto(); ATTENTION_BACKWARD = auto()
  # a quantized buffer as float32 (minift/quant.py): a kernel of its own, or read by a matmul straight
  # from the quantized buffer (schedule.narrow_source)
  DEQUANT = auto()


UNARY = {Op.NEG, Op.EXP, Op.LOG, Op.SQRT, Op.RECIP, Op.TANH, Op.SIN, Op.SIGMOID, Op.ERF, Op.CAST}
BINARY = {Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.MAX, Op.POW, Op.CMPLT, Op.CMPEQ}
ELEMENTWISE = UNARY | BINARY | {Op.WHERE}
REDUCE = {Op.SUM, Op.RMAX}
# Bases that a pending backward pass will read (held weakly: gone with their graph). Autograd
# (function.py) adds them, the scheduler keeps their costly parts (schedule._keep_saved_reductions).
SAVED_FOR_BACKWARD = weakref.WeakSet()

OWN_KERNEL = {Op.CONTIGUOUS, Op.ASSIGN, Op.GATHER, Op.SCATTER_ADD, Op.COPY, Op.RAND, Op.ATTENTION, Op.ATTENTION_BACKWARD}


class LazyOp:
  """A node that computes a contiguous array of `shape`. `buffer` is set once realized."""
  __slots__ = ("op", "srcs", "arg", "shape", "dtype", "device", "buffer", "readers", "__weakref__")

  def __init__(self, op, srcs, arg, shape, dtype, device, buffer=None):
    self.op, self.srcs, self.arg, self.shape, self.dtype, self.device, self.buffer = op, srcs, arg, tuple(shape), dtype, device, buffer
    self.readers = None
    for s in srcs:   # realized bases remember who reads them, so an in-place assign can protect them
      if s.base.buffer is not None:
        if s.base.readers is None: s.base.readers = weakref.WeakSet()
        s.base.readers.add(self)

  @property
  def realized(self): return self.buffer is not None

  @property
  def nbytes(self): return self.dtype.nbytes(prod(self.shape))

  def __repr__(self): return f"<LazyOp {self.op.name} {self.shape} {self.dtype.name}{' realized' if self.realized else ''}>"


class LazyBuffer:
  """A view of a LazyOp base, with the movement ops that made the view from the base."""
  __slots__ = ("base", "view", "moves")

  def __init__(self, base, view=None, moves=()):
    self.base, self.view, self.moves = base, view if view is not None else View.contiguous(base.shape), moves

  shape = property(lambda self: self.view.shape)
  dtype = property(lambda self: self.base.dtype)
  device = property(lambda self: self.base.device)
  realized = property(lambda self: self.base.realized)

  def __repr__(self): return f"<LazyBuffer {self.base!r} view={self.view.shape}>"

  def is_unviewed(self):
    """True when this is exactly its base (same shape, contiguous)."""
    return self.view.shape == self.base.shape and self.view.is_contiguous()

  # ---- constructors
  @staticmethod
  def from_buffer(buffer, shape, dtype, device):
    return LazyBuffer(LazyOp(Op.BUFFER, (), None, shape, dtype, device, buffer))

  @staticmethod
  def const(value, shape, dtype, device):
    base = LazyOp(Op.CONST, (), _cast_scalar(value, dtype), (), dtype, device)
    return LazyBuffer(base, View((), (), 0, None).reshape((1,) * len(shape)).expand(tuple(shape)) if shape else None)

  @staticmethod
  def rand(shape, seed, counter, device):
    """Uniform [0, 1) float32 from a counter-based hash of (seed, counter + flat index)."""
    return LazyBuffer(LazyOp(Op.RAND, (), (seed, counter), shape, dtypes.float32, device))

  def const_like(self, value, dtype=None):
    return LazyBuffer.const(value, self.shape, dtype or self.dtype, self.device)

  @property
  def const_value(self):
    """The value if this is an unmasked view of a constant, else None."""
    return self.base.arg if self.base.op is Op.CONST and self.view.mask is None else None

  # ---- compute ops
  def alu(self, op, *srcs, arg=None):
    for s in srcs:
      if s.shape != self.shape: raise ValueError(f"{op.name}: shapes {self.shape} and {s.shape} differ")
      if s.device != self.device: raise ValueError(f"{op.name}: tensors on devices {self.device} and {s.device}")
    if op is Op.MUL and self.dtype.is_float:   # x * 1 is exactly x (a loss's upstream gradient of ones, say): no pass over x
      if srcs[0].const_value == 1.0 and srcs[0].dtype == self.dtype: return self
      if self.const_value == 1.0 and srcs[0].dtype == self.dtype: return srcs[0]
    if op is Op.ADD:   # rows scatter-added onto zeros, plus y: scatter them onto y instead
      for scatter, onto in ((self, srcs[0]), (srcs[0], self)):
        if scatter._scatters_onto_zeros() and onto.is_unviewed() and onto.dtype == scatter.dtype: return scatter._scatter_onto(onto)
    if op is Op.CAST: dtype = arg
    elif op in (Op.CMPLT, Op.CMPEQ): dtype = dtypes.bool
    elif op is Op.WHERE: dtype = srcs[0].dtype
    else: dtype = self.dtype
    return LazyBuffer(LazyOp(op, (self,) + srcs, arg, self.shape, dtype, self.device))

  def _scatters_onto_zeros(self):
    return self.base.op is Op.SCATTER_ADD and len(self.base.srcs) == 2 and not self.realized and self.is_unviewed()

  def _scatter_onto(self, onto):
    """This scatter-add with `onto` (its shape, a whole buffer) as the start instead of zeros. A
    tied table's gradient (GPT-2's wte: the LM head's product plus the embedding's rows) then
    needs neither a zeroed (vocab, C) buffer nor a pass adding two of them."""
    base = self.base
    return LazyBuffer(LazyOp(Op.SCATTER_ADD, base.srcs + (onto,), base.arg, base.shape, base.dtype, base.device))

  def reduce(self, op, axes):
    """Reduce over axes, keeping them as size-1 dims."""
    axes = tuple(sorted(set(axes)))
    if not axes: return self
    shape = tuple(1 if i in axes else s for i, s in enumerate(self.shape))
    return LazyBuffer(LazyOp(op, (self,), axes, shape, self.dtype, self.device))

  def own_kernel(self, op, srcs, arg, shape, dtype=None):
    return LazyBuffer(LazyOp(op, tuple(srcs), arg, shape, dtype or self.dtype, self.device))

  def contiguous(self):
    if self.base.realized and self.is_unviewed(): return self
    return self.own_kernel(Op.CONTIGUOUS, (self,), None, self.shape)

  # ---- movement ops: a new view of the same base
  def _move(self, kind, arg, shape):
    if self.base.op is Op.CONST and self.view.mask is None and kind != "pad":
      return LazyBuffer.const(self.base.arg, shape, self.dtype, self.device)
    view = self.view.apply(kind, arg)
    if view is None:   # the view cannot express it: copy to a contiguous buffer first
      return self.contiguous()._move(kind, arg, shape)
    return LazyBuffer(self.base, view, self.moves + ((kind, arg),))

  def reshape(self, shape):
    shape = tuple(shape)
    return self if shape == self.shape else self._move("reshape", shape, shape)

  def permute(self, order):
    order = tuple(order)
    return self if order == tuple(range(len(order))) else self._move("permute", order, tuple(self.shape[i] for i in order))

  def expand(self, shape):
    shape = tuple(shape)
    return self if shape == self.shape else self._move("expand", shape, shape)

  def pad(self, pads):
    pads = tuple(tuple(p) for p in pads)
    if all(p == (0, 0) for p in pads): return self
    return self._move("pad", pads, tuple(s + b + a for s, (b, a) in zip(self.shape, pads)))

  def shrink(self, arg):
    arg = tuple(tuple(a) for a in arg)
    if all(a == (0, s) for a, s in zip(arg, self.shape)): return self
    return self._move("shrink", arg, tuple(e - b for b, e in arg))

  def flip(self, axes):
    axes = tuple(axes)
    return self if not axes else self._move("flip", axes, self.shape)

  def try_moves(self, moves):
    """Replay movement ops on this buffer; None if a view could not express one (no copies)."""
    lb = self
    for kind, arg in moves:
      if lb.base.op is Op.CONST and lb.view.mask is None and kind != "pad":
        shape = {"reshape": lambda: arg, "expand": lambda: arg, "flip": lambda: lb.shape,
                 "permute": lambda: tuple(lb.shape[i] for i in arg),
                 "shrink": lambda: tuple(e - b for b, e in arg)}[kind]()
        lb = LazyBuffer.const(lb.base.arg, shape, lb.dtype, lb.device)
        continue
      view = lb.view.apply(kind, arg)
      if view is None: return None
      lb = LazyBuffer(lb.base, view, lb.moves + ((kind, arg),))
    return lb


def _cast_scalar(value, dtype):
  if dtype is dtypes.bool: return bool(value)
  if dtype.is_int: return int(value)
  return float(value)
