"""Tensor: the user-facing API. Lazy: ops build a graph; values are computed on realize().

Everything here is written in terms of the primitive Functions in function.py, so every
backend gets every op and its gradient for free.
"""
import math, contextlib, functools
import numpy as np
from minift.dtype import dtypes
from minift.lazy import LazyBuffer, Op, SAVED_FOR_BACKWARD
from minift.runtime.buffer import paged_in, is_paged
from minift.runtime.device import canonical_device, get_device
from minift.runtime.executor import run_schedule
from minift.schedule import create_schedule
from minift.helpers import prod, normalize_axis, all_int
import minift.function as F


def _writable(buf):
  """Can buf be written in place? A paged-out buffer comes back as a fresh, writable array."""
  return (is_paged(buf) and buf.data is None) or buf.device.is_writable(buf)


def _broadcast_shape(*shapes):
  nd = max(len(s) for s in shapes)
  padded = [(1,) * (nd - len(s)) + tuple(s) for s in shapes]
  out = []
  for dims in zip(*padded):
    sizes = {d for d in dims if d != 1}
    if len(sizes) > 1: raise ValueError(f"cannot broadcast shapes {' and '.join(str(tuple(s)) for s in shapes)}")
    out.append(sizes.pop() if sizes else 1)
  return tuple(out)


class no_grad(contextlib.ContextDecorator):
  """Context manager and decorator: ops inside build no autograd graph."""
  def __enter__(self):
    self.prev, Tensor.no_grad = Tensor.no_grad, True
  def __exit__(self, *exc):
    Tensor.no_grad = self.prev


ATTENTION_BLOCK = 128   # query rows per block of a long causal attention


class Tensor:
  __slots__ = ("lazydata", "requires_grad", "grad", "_ctx", "__weakref__")
  no_grad = False
  training = False
  _seed, _rng_counter = 0, 0

  def __init__(self, data, dtype=None, device=None, requires_grad=False):
    dtype = dtypes.from_any(dtype) if dtype is not None else None
    if isinstance(data, LazyBuffer):
      lb = data if dtype is None or dtype == data.dtype else data.alu(Op.CAST, arg=dtype)
    elif isinstance(data, Tensor):
      lb = data.lazydata if dtype is None or dtype == data.dtype else data.cast(dtype).lazydata
    else:
      device = canonical_device(device)
      if isinstance(data, (bool, int, float)) and not isinstance(data, np.generic):
        dtype = dtype or (dtypes.bool if isinstance(data, bool) else dtypes.default_int if isinstance(data, int) else dtypes.default_float)
        lb = LazyBuffer.const(data, (), dtype, device)
      else:
        try: arr = np.asarray(data)
        except ValueError: arr = np.empty(0, object)   # numpy 2 raises on ragged lists: same error as below
        if arr.dtype == object: raise TypeError(f"cannot make a Tensor from {type(data).__name__} with mixed or ragged contents")
        dtype = dtype or dtypes.from_any(arr.dtype)
        buf = get_device(device).from_numpy(arr, dtype)
        lb = LazyBuffer.from_buffer(buf, arr.shape, dtype, device)
    self.lazydata = lb
    if requires_grad and not self.dtype.is_float:
      raise TypeError(f"only float tensors can require gradients, not {self.dtype.name}")
    self.requires_grad, self.grad, self._ctx = requires_grad, None, None

  # ---- properties
  shape = property(lambda self: self.lazydata.shape)
  dtype = property(lambda self: self.lazydata.dtype)
  device = property(lambda self: self.lazydata.device)
  ndim = property(lambda self: len(self.shape))
  def numel(self): return prod(self.shape)
  def size(self, dim=None): return self.shape if dim is None else self.shape[normalize_axis(dim, self.ndim, "dim")]
  def __len__(self):
    if not self.shape: raise TypeError("len() of a 0-d tensor")
    return self.shape[0]
  def __repr__(self):
    return f"<Tensor shape={self.shape} dtype={self.dtype.name} device={self.device}{' requires_grad' if self.requires_grad else ''}>"
  __hash__ = object.__hash__

  # ---- realizing
  @staticmethod
  def schedule(*tensors):
    """The kernels that realizing these tensors would run, without running them."""
    return create_schedule([t.lazydata for t in tensors])

  @staticmethod
  def realize_all(*tensors):
    run_schedule(create_schedule([t.lazydata for t in tensors]))
    return tensors

  def realize(self):
    run_schedule(create_schedule([self.lazydata]))
    return self

  def numpy(self):
    if self.dtype.is_quantized: return self.dequantize().numpy()   # the values, not the blocks' bytes
    lb = self.lazydata
    if not (lb.base.realized and lb.is_unviewed()):
      lb = lb.contiguous()
      run_schedule(create_schedule([lb]))
    return np.array(get_device(lb.device).to_numpy(paged_in(lb.base.buffer))).reshape(self.shape)

  def item(self):
    if self.numel() != 1: raise ValueError(f"item() needs a tensor with one element, not shape {self.shape}")
    return self.numpy().reshape(()).item()

  def tolist(self): return self.numpy().tolist()

  def __bool__(self):
    if self.numel() != 1: raise ValueError(f"the truth value of a tensor of shape {self.shape} is ambiguous")
    return bool(self.item())

  def __float__(self): return float(self.item())
  def __int__(self): return int(self.item())

  def detach(self): return Tensor(self.lazydata)

  # ---- quantized weights (minift/quant.py)
  @staticmethod
  def from_quantized(raw, shape, dtype, device=None):
    """A frozen weight of `shape` held as GGUF blocks of a quantized dtype (dtypes.q4_0, ...):
    raw is their bytes (uint8, shared zero-copy when read-only, as a memory-mapped file). Only
    matmuls and embedding lookups read it, and it never gets a gradient."""
    dtype, device = dtypes.from_any(dtype), canonical_device(device)
    shape = tuple(int(s) for s in shape)
    if not dtype.is_quantized: raise TypeError(f"from_quantized: {dtype.name} is not a quantized dtype")
    raw = np.asarray(raw)
    if not shape or shape[-1] % dtype.block or raw.nbytes != dtype.nbytes(prod(shape)):
      raise ValueError(f"from_quantized: {raw.nbytes} bytes of {dtype.name} do not hold shape {shape} (rows of whole {dtype.block}-value blocks: {dtype.nbytes(prod(shape)) if shape else 0} bytes)")
    dev = get_device(device)
    if dtype.name not in dev.quantized_types:   # a backend without its kernels: float32 values instead
      from minift.quant import dequantize_reference, note_once
      note_once(f"{device} reads no {dtype.name} weights: they are made float32")
      return Tensor(dequantize_reference(raw, dtype, shape), device=device)
    buf = dev.from_numpy(raw.view(np.uint8).reshape(-1), dtype)
    return Tensor(LazyBuffer.from_buffer(buf, shape, dtype, device))

  def quantize(self, dtype):
    """A float tensor (a frozen weight whose last dim is whole blocks) quantized to dtype (q8_0,
    q4_0, ...: the types gguf's quantizer writes), gguf's blocks bit for bit."""
    from minift.quant import quantize
    dtype = dtypes.from_any(dtype)
    return Tensor.from_quantized(quantize(self.numpy().reshape(-1, self.shape[-1]), dtype), self.shape, dtype, self.device)

  def dequantize(self):
    """A quantized tensor's values as float32 (lazy: a matmul reads the blocks themselves)."""
    return F.Dequantize.apply(self) if self.dtype.is_quantized else self

  def contiguous(self): return F.Contiguous.apply(self)

  def requires_grad_(self, flag=True):
    if flag and not self.dtype.is_float: raise TypeError(f"only float tensors can require gradients, not {self.dtype.name}")
    self.requires_grad = flag
    return self

  def to(self, device):
    device = canonical_device(device)
    if device == self.device: return self
    return F.Copy.apply(self, device=device)   # differentiable, as in torch (not a new leaf)

  def assign(self, x):
    """Write x into this tensor's buffer (in place, so jit-captured steps see new values)."""
    if not isinstance(x, Tensor):
      arr = np.asarray(x, dtype=self.dtype.np)
      if arr.shape != self.shape and arr.size != 1:
        raise ValueError(f"assign: value of shape {arr.shape} does not fit tensor of shape {self.shape}")
      self._make_buffer()
      get_device(self.device).copy_in(paged_in(self.lazydata.base.buffer, write=True), np.broadcast_to(arr, self.shape))
      return self
    if x.shape != self.shape: raise ValueError(f"assign: value of shape {x.shape} does not fit tensor of shape {self.shape}")
    if x.device != self.device: raise ValueError(f"assign: value on {x.device}, tensor on {self.device}")
    if x.dtype != self.dtype: x = x.cast(self.dtype)
    lb = self.lazydata
    # a reshaped view of a whole realized buffer (a matmul's (M, N, 1) output seen as (M, N)) is
    # written in place as it is; anything else first becomes a buffer of its own
    if not (lb.base.realized and lb.view.is_contiguous() and lb.view.numel == prod(lb.base.shape) and _writable(lb.base.buffer)):
      self._make_buffer()
    lb = self.lazydata
    self.lazydata = lb.own_kernel(Op.ASSIGN, (lb, x.lazydata), None, self.shape)
    return self

  def _make_buffer(self):
    """Make this tensor a realized, contiguous buffer that can be written in place (assign,
    optimizer updates). A read-only buffer (weights memory-mapped from a file) is copied first."""
    lb = self.lazydata
    if lb.base.realized and lb.is_unviewed() and _writable(lb.base.buffer): return
    self.lazydata = lb.own_kernel(Op.CONTIGUOUS, (lb,), None, lb.shape)
    self.realize()

  # ---- creation
  @staticmethod
  def full(shape, value, dtype=None, device=None, requires_grad=False):
    shape = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
    dtype = dtypes.from_any(dtype) if dtype else (dtypes.bool if isinstance(value, bool) else dtypes.default_int if isinstance(value, int) else dtypes.default_float)
    return Tensor(LazyBuffer.const(value, shape, dtype, canonical_device(device)), requires_grad=requires_grad)

  @staticmethod
  def zeros(*shape, dtype=None, device=None, requires_grad=False):
    return Tensor.full(_shape_arg(shape), 0.0, dtype or dtypes.default_float, device, requires_grad)

  @staticmethod
  def ones(*shape, dtype=None, device=None, requires_grad=False):
    return Tensor.full(_shape_arg(shape), 1.0, dtype or dtypes.default_float, device, requires_grad)

  def zeros_like(self, **kw): return Tensor.zeros(self.shape, dtype=kw.get("dtype", self.dtype), device=kw.get("device", self.device), requires_grad=kw.get("requires_grad", False))
  def ones_like(self, **kw): return Tensor.ones(self.shape, dtype=kw.get("dtype", self.dtype), device=kw.get("device", self.device), requires_grad=kw.get("requires_grad", False))
  def full_like(self, value, **kw): return Tensor.full(self.shape, value, dtype=kw.get("dtype", self.dtype), device=kw.get("device", self.device))

  @staticmethod
  def arange(start, stop=None, step=1, dtype=None, device=None):
    if stop is None: start, stop = 0, start
    dtype = dtypes.from_any(dtype) if dtype else (dtypes.default_int if all_int((start, stop, step)) else dtypes.default_float)
    return Tensor(np.arange(start, stop, step, dtype=dtype.np), dtype=dtype, device=device)

  @staticmethod
  def manual_seed(seed=0):
    Tensor._seed, Tensor._rng_counter = int(seed), 0

  @staticmethod
  def rand(*shape, dtype=None, device=None, requires_grad=False):
    """Uniform [0, 1), from a counter-based generator: the same numbers on every backend."""
    shape = _shape_arg(shape)
    lb = LazyBuffer.rand(shape, Tensor._seed, Tensor._rng_counter, canonical_device(device))
    Tensor._rng_counter += prod(shape)
    out = Tensor(lb)
    if dtype is not None and dtypes.from_any(dtype) != dtypes.float32: out = out.cast(dtype)
    return out.requires_grad_(requires_grad) if requires_grad else out

  @staticmethod
  def uniform(*shape, low=0.0, high=1.0, dtype=None, device=None, requires_grad=False):
    out = (Tensor.rand(*shape, device=device) * (high - low) + low)
    out = Tensor(out.cast(dtype or dtypes.default_float).lazydata)
    return out.requires_grad_(requires_grad) if requires_grad else out

  @staticmethod
  def randn(*shape, dtype=None, device=None, requires_grad=False):
    """Standard normal by Box-Muller on two uniform draws."""
    shape = _shape_arg(shape)
    u = Tensor.rand(2, *shape, device=device)
    r = (1.0 - u[0]).log().mul(-2.0).sqrt()
    out = r * (u[1] * (2 * math.pi)).cos()
    out = Tensor(out.cast(dtype or dtypes.default_float).lazydata)
    return out.requires_grad_(requires_grad) if requires_grad else out

  # ---- autograd
  def backward(self, gradient=None):
    """Fill .grad of every tensor created with requires_grad=True that this depends on."""
    if not self.requires_grad:
      raise RuntimeError(f"backward(): this tensor (shape {self.shape}) does not require grad; no input had requires_grad=True")
    if gradient is None:
      if self.numel() != 1:
        raise RuntimeError(f"backward() on a tensor of shape {self.shape} needs gradient=; only a one-element loss can be backpropagated without it")
      gradient = Tensor.ones(self.shape, dtype=self.dtype, device=self.device)
    elif not isinstance(gradient, Tensor):
      gradient = Tensor(gradient, dtype=self.dtype, device=self.device)
    if gradient.shape != self.shape:
      raise ValueError(f"backward(): gradient of shape {gradient.shape} does not match tensor of shape {self.shape}")
    if self._ctx is None:   # a leaf: its own gradient
      self.grad = Tensor(gradient.lazydata) if self.grad is None else self.grad + gradient
      return self
    order = _toposort(self._ctx)
    if any(isinstance(n, F.Function) and n.parents is None for n in order):   # torch raises here too; silently skipping would lose gradients
      raise RuntimeError("backward(): part of this graph was freed by an earlier backward(); compute the loss again")
    grads = {id(self._ctx): gradient.lazydata}
    with no_grad():
      for node in reversed(order):   # a Function (an op's result) or a leaf Tensor
        g = grads.pop(id(node), None)
        if g is None: continue
        if isinstance(node, Tensor):
          node.grad = Tensor(g) if node.grad is None else node.grad + Tensor(g)
          continue
        for parent, shape, pg in zip(node.parents, node.in_shapes, node.backward(g)):
          if pg is None or parent is None: continue
          if pg.shape != shape: raise RuntimeError(f"internal: gradient {pg.shape} for input {shape} in {type(node).__name__}")
          grads[id(parent)] = pg if id(parent) not in grads else grads[id(parent)].alu(Op.ADD, pg)
        for v in vars(node).values():   # its saved values are now read by the built backward graph
          if isinstance(v, LazyBuffer): SAVED_FOR_BACKWARD.discard(v.base)
        node.free()   # free the graph as it goes, as torch does without retain_graph
    return self

  # ---- broadcasting helpers
  def _const(self, value, dtype=None):
    return Tensor(LazyBuffer.const(value, (), dtype or self.dtype, self.device))

  def _binary_args(self, y, reverse=False):
    x = self
    if not isinstance(y, Tensor):
      if isinstance(y, (list, tuple, np.ndarray)): y = Tensor(y, device=self.device)
      elif isinstance(y, bool): y = x._const(y, x.dtype if x.dtype is not dtypes.bool else dtypes.bool)
      elif isinstance(y, (float, np.floating)) and not x.dtype.is_float: y = x._const(y, dtypes.default_float)
      elif isinstance(y, (int, float, np.generic)): y = x._const(y)
      else: raise TypeError(f"unsupported operand type {type(y).__name__}")
    dt = dtypes.promote(x.dtype, y.dtype)
    if x.dtype != dt: x = x.cast(dt)
    if y.dtype != dt: y = y.cast(dt)
    shape = _broadcast_shape(x.shape, y.shape)
    x, y = x._broadcast_to(shape), y._broadcast_to(shape)
    return (y, x) if reverse else (x, y)

  def _broadcast_to(self, shape):
    if self.shape == shape: return self
    x = self.reshape((1,) * (len(shape) - self.ndim) + self.shape) if self.ndim < len(shape) else self
    return x.expand(shape)

  # ---- elementwise
  def add(self, y, reverse=False): return F.Add.apply(*self._binary_args(y, reverse))
  def sub(self, y, reverse=False): return F.Sub.apply(*self._binary_args(y, reverse))
  def mul(self, y, reverse=False): return F.Mul.apply(*self._binary_args(y, reverse))
  def div(self, y, reverse=False):
    x, y = self._binary_args(y, reverse)
    if not x.dtype.is_float: x, y = x.float(), y.float()
    return F.Div.apply(x, y)
  def pow(self, y, reverse=False):
    if not reverse and isinstance(y, (int, float)) and not isinstance(y, bool):
      if y == 2: return self * self
      if y == 1: return self
      if y == 0.5: return self.sqrt()
    x, y = self._binary_args(y, reverse)
    return F.Pow.apply(x, y)
  def maximum(self, y): return F.Maximum.apply(*self._binary_args(y))
  def minimum(self, y): return -F.Maximum.apply(*(-t for t in self._binary_args(y)))

  __add__ = add
  __sub__ = sub
  __mul__ = mul
  __truediv__ = div
  __pow__ = pow
  def __radd__(self, y): return self.add(y, True)
  def __rsub__(self, y): return self.sub(y, True)
  def __rmul__(self, y): return self.mul(y, True)
  def __rtruediv__(self, y): return self.div(y, True)
  def __rpow__(self, y): return self.pow(y, True)
  def __neg__(self): return F.Neg.apply(self)
  def neg(self): return F.Neg.apply(self)
  def __matmul__(self, w): return self.matmul(w)
  def __rmatmul__(self, x): return Tensor(x).matmul(self) if not isinstance(x, Tensor) else x.matmul(self)

  def _cmp(self, y, op, reverse=False):
    x, y = self._binary_args(y, reverse)
    return F.Compare.apply(x, y, op=op)
  def __lt__(self, y): return self._cmp(y, Op.CMPLT)
  def __gt__(self, y): return self._cmp(y, Op.CMPLT, True)
  def __le__(self, y): return self._cmp(y, Op.CMPLT, True).logical_not()
  def __ge__(self, y): return self._cmp(y, Op.CMPLT).logical_not()
  def __eq__(self, y): return self._cmp(y, Op.CMPEQ)
  def __ne__(self, y): return self._cmp(y, Op.CMPEQ).logical_not()
  def logical_not(self): return F.Compare.apply(self.cast(dtypes.bool), self._const(False, dtypes.bool)._broadcast_to(self.shape), op=Op.CMPEQ)

  def where(self, x, y):
    """self is the condition: x where true, else y (broadcast together)."""
    cond = self if self.dtype is dtypes.bool else self.cast(dtypes.bool)
    if not isinstance(x, Tensor) and not isinstance(y, Tensor):
      x = Tensor(x, device=self.device)
    # a python float next to an int tensor makes the result float (as torch), not a truncated int
    if not isinstance(x, Tensor): x = y._const(x, dtypes.default_float if isinstance(x, (float, np.floating)) and not y.dtype.is_float else None)
    if not isinstance(y, Tensor): y = x._const(y, dtypes.default_float if isinstance(y, (float, np.floating)) and not x.dtype.is_float else None)
    dt = dtypes.promote(x.dtype, y.dtype)
    x, y = x.cast(dt), y.cast(dt)
    shape = _broadcast_shape(cond.shape, x.shape, y.shape)
    return F.Where.apply(cond._broadcast_to(shape), x._broadcast_to(shape), y._broadcast_to(shape))

  def cast(self, dtype):
    dtype = dtypes.from_any(dtype)
    if dtype.is_quantized and dtype != self.dtype: raise TypeError(f"cast: cannot cast to {dtype.name}; quantize with Tensor.quantize")
    if self.dtype.is_quantized and dtype != self.dtype: return self.dequantize().cast(dtype)
    return self if dtype == self.dtype else F.Cast.apply(self, dtype=dtype)
  def float(self): return self.cast(dtypes.float32)
  def half(self): return self.cast(dtypes.float16)
  def int(self): return self.cast(dtypes.int32)
  def long(self): return self.cast(dtypes.int64)
  def bool(self): return self.cast(dtypes.bool)

  def _float(self): return self if self.dtype.is_float else self.float()
  def exp(self): return F.Exp.apply(self._float())
  def log(self): return F.Log.apply(self._float())
  def sqrt(self): return F.Sqrt.apply(self._float())
  def rsqrt(self): return F.Recip.apply(self.sqrt())
  def reciprocal(self): return F.Recip.apply(self._float())
  def tanh(self): return F.Tanh.apply(self._float())
  def sin(self): return F.Sin.apply(self._float())
  def cos(self): return (self._float() + math.pi / 2).sin()
  def erf(self): return F.Erf.apply(self._float())
  def sigmoid(self):
    # one op with its own gradient s(1-s): composed of exp and divide, exp(-x) overflowing for
    # x << 0 made the gradient nan, and the stable composition took nine NumPy passes (SiLU in
    # every Llama MLP)
    return F.Sigmoid.apply(self._float())
  def relu(self): return (self > 0).where(self, 0.0 if self.dtype.is_float else 0)
  def silu(self): return self * self.sigmoid()
  def abs(self): return (self < 0).where(-self, (self > 0).where(self, 0.0 if self.dtype.is_float else 0))   # gradient 0 at 0, as torch
  def square(self): return self * self
  def clip(self, lo=None, hi=None):
    # where, not maximum/minimum: at x == lo or x == hi torch passes the whole gradient through
    out = self
    if lo is not None: out = (out < lo).where(lo, out)
    if hi is not None: out = (out > hi).where(hi, out)
    return out
  clamp = clip

  def gelu(self, approximate="none"):
    """GELU: 'none' is the exact erf form, 'tanh' the tanh approximation (GPT-2's gelu_new)."""
    if approximate == "tanh": return F.GeluTanh.apply(self._float())
    if approximate != "none": raise ValueError(f"gelu approximate must be 'none' or 'tanh', not {approximate!r}")
    return 0.5 * self * (1.0 + (self * (1.0 / math.sqrt(2.0))).erf())

  # ---- reductions
  def _axes(self, axis):
    if axis is None: return tuple(range(self.ndim))
    if isinstance(axis, int): axis = (axis,)
    return tuple(sorted({normalize_axis(a, self.ndim) for a in axis}))

  def _reduce(self, fn, axis, keepdim):
    axes = self._axes(axis)
    out = fn.apply(self, axes=axes)
    return out if keepdim else out.reshape(tuple(s for i, s in enumerate(self.shape) if i not in axes))

  def sum(self, axis=None, keepdim=False):
    x = self.cast(dtypes.int64) if self.dtype in (dtypes.bool, dtypes.int32) else self
    return x._reduce(F.Sum, axis, keepdim)

  def mean(self, axis=None, keepdim=False):
    x = self._float()
    count = prod(self.shape[a] for a in self._axes(axis))
    return x.sum(axis, keepdim) * (1.0 / count if count else math.nan)

  def max(self, axis=None, keepdim=False):
    if any(self.shape[a] == 0 for a in self._axes(axis)):   # only reducing over an empty dim has no answer
      raise ValueError(f"max() over an empty dim of a tensor of shape {self.shape} (axis={axis})")
    return self._reduce(F.Max, axis, keepdim)

  def min(self, axis=None, keepdim=False): return -((-self).max(axis, keepdim))

  def var(self, axis=None, keepdim=False, correction=1):
    """Variance with Bessel's correction by default (correction=1), as torch.var."""
    x = self._float()
    n = prod(self.shape[a] for a in self._axes(axis))
    d = x - x.mean(axis, keepdim=True)
    return (d * d).sum(axis, keepdim) * (1.0 / max(n - correction, 0) if n - correction > 0 else math.nan)

  def std(self, axis=None, keepdim=False, correction=1): return self.var(axis, keepdim, correction).sqrt()

  def argmax(self, axis=None, keepdim=False):
    """Index of the first maximum (int64), as torch.argmax."""
    x = self.detach()
    if axis is None:
      return x.reshape(-1).argmax(0).reshape(() if not keepdim else (1,) * self.ndim)
    axis = normalize_axis(axis, self.ndim)
    n = self.shape[axis]
    hit = x == x.max(axis, keepdim=True)
    rev = Tensor.arange(n, 0, -1, dtype=dtypes.int64, device=self.device).reshape((n,) + (1,) * (self.ndim - axis - 1))
    return n - (hit.where(rev, 0)).max(axis, keepdim)

  def argmin(self, axis=None, keepdim=False): return (-self).argmax(axis, keepdim)

  # ---- movement
  def reshape(self, *shape):
    shape = _shape_arg(shape)
    if shape.count(-1) > 1: raise ValueError(f"reshape: only one dimension can be -1, got {shape}")
    if -1 in shape:
      known = prod(s for s in shape if s != -1)
      if known == 0 or self.numel() % known: raise ValueError(f"reshape: cannot reshape tensor of shape {self.shape} into {shape}")
      shape = tuple(self.numel() // known if s == -1 else s for s in shape)
    if prod(shape) != self.numel() or any(s < 0 for s in shape):
      raise ValueError(f"reshape: cannot reshape tensor of shape {self.shape} ({self.numel()} elements) into {shape}")
    return self if shape == self.shape else F.Reshape.apply(self, shape=shape)
  view = reshape

  def permute(self, *order):
    order = _shape_arg(order)
    order = tuple(normalize_axis(o, self.ndim) for o in order)
    if sorted(order) != list(range(self.ndim)): raise ValueError(f"permute: {order} is not a permutation of the {self.ndim} dims of {self.shape}")
    return F.Permute.apply(self, order=order)

  def transpose(self, a=-2, b=-1):
    a, b = normalize_axis(a, self.ndim), normalize_axis(b, self.ndim)
    order = list(range(self.ndim))
    order[a], order[b] = order[b], order[a]
    return self.permute(order)

  @property
  def T(self): return self.permute(tuple(range(self.ndim))[::-1])

  def expand(self, *shape):
    shape = _shape_arg(shape)
    if len(shape) < self.ndim: raise ValueError(f"expand: target {shape} has fewer dims than {self.shape}")
    x = self.reshape((1,) * (len(shape) - self.ndim) + self.shape) if len(shape) > self.ndim else self
    shape = tuple(s if t == -1 else t for s, t in zip(x.shape, shape))
    for s, t in zip(x.shape, shape):
      if s != t and s != 1: raise ValueError(f"expand: cannot expand shape {self.shape} to {shape}")
    return x if shape == x.shape else F.Expand.apply(x, shape=shape)
  broadcast_to = expand

  def pad(self, pads, value=0.0):
    """pads: ((before, after), ...) for every dim, or for the last len(pads) dims."""
    pads = tuple(tuple(p) for p in pads)
    pads = ((0, 0),) * (self.ndim - len(pads)) + pads
    if any(b < 0 or a < 0 for b, a in pads): raise ValueError(f"pad: negative padding {pads}; use slicing to shrink")
    if value == 0: return F.Pad.apply(self, pads=pads)
    return F.Pad.apply(self - value, pads=pads) + value

  def shrink(self, arg):
    arg = tuple((0, s) if a is None else tuple(a) for a, s in zip(arg, self.shape))
    return F.Shrink.apply(self, arg=arg)

  def flip(self, *axes):
    axes = tuple(normalize_axis(a, self.ndim) for a in _shape_arg(axes))
    return F.Flip.apply(self, axes=axes)

  def flatten(self, start_dim=0, end_dim=-1):
    if self.ndim == 0: return self.reshape(1)
    s, e = normalize_axis(start_dim, self.ndim), normalize_axis(end_dim, self.ndim)
    return self.reshape(self.shape[:s] + (prod(self.shape[s:e + 1]),) + self.shape[e + 1:])

  def unflatten(self, dim, sizes):
    dim = normalize_axis(dim, self.ndim)
    return self.reshape(self.shape[:dim] + tuple(sizes) + self.shape[dim + 1:])

  def squeeze(self, dim=None):
    if dim is None: return self.reshape(tuple(s for s in self.shape if s != 1))
    if isinstance(dim, (tuple, list)):
      dims = {normalize_axis(d, self.ndim) for d in dim}
      return self.reshape(tuple(s for i, s in enumerate(self.shape) if not (i in dims and s == 1)))
    dim = normalize_axis(dim, self.ndim)
    return self if self.shape[dim] != 1 else self.reshape(self.shape[:dim] + self.shape[dim + 1:])

  def unsqueeze(self, dim):
    dim = normalize_axis(dim, self.ndim + 1)
    return self.reshape(self.shape[:dim] + (1,) + self.shape[dim:])

  @staticmethod
  def cat(tensors, dim=0):
    """Concatenate along dim (each piece padded into place, then summed: one fused kernel)."""
    tensors = list(tensors)
    if not tensors: raise ValueError("cat: expected a non-empty list of tensors")
    first = tensors[0]
    dim = normalize_axis(dim, first.ndim)
    for t in tensors[1:]:
      if t.ndim != first.ndim or any(a != b for i, (a, b) in enumerate(zip(t.shape, first.shape)) if i != dim):
        raise ValueError(f"cat: shapes {first.shape} and {t.shape} differ outside dim {dim}")
    dt = functools.reduce(dtypes.promote, [t.dtype for t in tensors])
    total = sum(t.shape[dim] for t in tensors)
    out, start = None, 0
    for t in tensors:
      pads = [(0, 0)] * first.ndim
      pads[dim] = (start, total - start - t.shape[dim])
      start += t.shape[dim]
      if t.shape[dim] == 0: continue
      piece = t.cast(dt).pad(pads)
      out = piece if out is None else out + piece
    if out is None: return Tensor.zeros(first.shape[:dim] + (0,) + first.shape[dim + 1:], dtype=dt, device=first.device)
    return out

  @staticmethod
  def stack(tensors, dim=0):
    tensors = list(tensors)
    if not tensors: raise ValueError("stack: expected a non-empty list of tensors")
    for t in tensors[1:]:
      if t.shape != tensors[0].shape: raise ValueError(f"stack: tensors must have equal shapes, got {tensors[0].shape} and {t.shape}")
    dim = normalize_axis(dim, tensors[0].ndim + 1)
    return Tensor.cat([t.unsqueeze(dim) for t in tensors], dim)

  def split(self, sizes, dim=0):
    dim = normalize_axis(dim, self.ndim)
    n = self.shape[dim]
    if isinstance(sizes, int):
      if sizes <= 0: raise ValueError(f"split: size must be positive, got {sizes}")
      sizes = [min(sizes, n - i) for i in range(0, n, sizes)] or [0]
    if sum(sizes) != n: raise ValueError(f"split: sizes {list(sizes)} do not add up to dim {dim} of {self.shape}")
    out, start = [], 0
    for s in sizes:
      arg = [(0, d) for d in self.shape]
      arg[dim] = (start, start + s)
      out.append(self.shrink(arg))
      start += s
    return out

  def chunk(self, chunks, dim=0):
    dim = normalize_axis(dim, self.ndim)
    return self.split(max(1, -(-self.shape[dim] // chunks)), dim)

  def __getitem__(self, idx):
    """Basic indexing (ints, slices with any step, None, ...) as views; an integer tensor or
    list indexes dim 0 by gathering rows."""
    if isinstance(idx, (Tensor, list)) or (isinstance(idx, np.ndarray) and idx.dtype != bool):
      return self._take_rows(idx)
    idx = idx if isinstance(idx, tuple) else (idx,)
    consumed = sum(1 for i in idx if i is not None and i is not Ellipsis)
    if sum(1 for i in idx if i is Ellipsis) > 1: raise IndexError("an index can have only one Ellipsis")
    if consumed > self.ndim: raise IndexError(f"too many indices ({consumed}) for a tensor of shape {self.shape}")
    if Ellipsis in [i if i is Ellipsis else None for i in idx]:
      pos = [k for k, i in enumerate(idx) if i is Ellipsis][0]
      idx = idx[:pos] + (slice(None),) * (self.ndim - consumed) + idx[pos + 1:]
    else:
      idx = idx + (slice(None),) * (self.ndim - consumed)
    x, dim, out_shape = self, 0, []
    shrink = []
    for i in idx:
      if i is None: out_shape.append(1); continue
      n = self.shape[dim]
      if isinstance(i, (int, np.integer)) and not isinstance(i, bool):
        j = int(i)
        if not -n <= j < n: raise IndexError(f"index {j} is out of bounds for dim {dim} with size {n}")
        j %= n
        shrink.append((j, j + 1, 1))
      elif isinstance(i, slice):
        start, stop, step = i.indices(n)
        if step > 0: lo, hi = start, max(start, stop)
        else: lo, hi = stop + 1, max(stop + 1, start + 1)
        count = len(range(start, stop, step))
        shrink.append((lo, hi, step))
        out_shape.append(count)
      else:
        raise IndexError(f"unsupported index {i!r} of type {type(i).__name__}")
      dim += 1
    x = x.shrink([(lo, hi) for lo, hi, _ in shrink])
    flip_axes = [d for d, (_, _, st) in enumerate(shrink) if st < 0]
    if flip_axes: x = x.flip(*flip_axes)
    for d, (lo, hi, st) in enumerate(shrink):
      step = abs(st)
      if step == 1 or x.shape[d] == 0: continue
      count = -(-x.shape[d] // step)
      pads = [(0, 0)] * x.ndim
      pads[d] = (0, count * step - x.shape[d])
      x = x.pad(pads)
      x = x.reshape(x.shape[:d] + (count, step) + x.shape[d + 1:])
      arg = [(0, s) for s in x.shape]
      arg[d + 1] = (0, 1)
      x = x.shrink(arg).reshape(x.shape[:d] + (count,) + x.shape[d + 2:])
    return x.reshape(tuple(out_shape))

  def _take_rows(self, idx):
    if not isinstance(idx, Tensor):
      arr = np.asarray(idx)
      idx = Tensor(arr if arr.size else arr.astype(np.int64), device=self.device)   # [] is an empty int index
    if idx.dtype not in (dtypes.int32, dtypes.int64): raise IndexError(f"tensor index must be int32 or int64, not {idx.dtype.name}")
    idx = (idx < 0).where(idx + self.shape[0], idx)   # negative indices count from the end, as in torch
    flat = self.reshape(self.shape[0], -1) if self.ndim != 2 else self
    return flat.embedding(idx).reshape(idx.shape + self.shape[1:])

  # ---- matmul and neural-net ops
  def matmul(self, w):
    """Batched, broadcasting matmul, written as a sum of a broadcast product that the
    scheduler recognises and sends to BLAS or a tiled kernel."""
    if not isinstance(w, Tensor): w = Tensor(w, device=self.device)
    x, w = self.dequantize(), w.dequantize()   # a quantized weight: the matmul reads its blocks (schedule.narrow_source)
    if x.ndim == 0 or w.ndim == 0: raise ValueError(f"matmul: both operands need at least 1 dim, got {x.shape} and {w.shape}")
    x2 = x.reshape(1, -1) if x.ndim == 1 else x
    w2 = w.reshape(-1, 1) if w.ndim == 1 else w
    if x2.shape[-1] != w2.shape[-2]:
      raise ValueError(f"matmul: shapes {self.shape} and {w.shape} do not align ({x2.shape[-1]} != {w2.shape[-2]})")
    dt = dtypes.promote(x.dtype, w.dtype)
    x2, w2 = x2.cast(dt), w2.cast(dt)
    try: batch = _broadcast_shape(x2.shape[:-2], w2.shape[:-2])
    except ValueError: raise ValueError(f"matmul: batch dims of shapes {self.shape} and {w.shape} do not broadcast") from None
    (m, k), n = x2.shape[-2:], w2.shape[-1]
    xe = x2.reshape(x2.shape[:-1] + (1, k))._broadcast_to(batch + (m, n, k))                  # (..., M, N, K)
    we = w2.transpose(-1, -2).reshape(w2.shape[:-2] + (1, n, k))._broadcast_to(batch + (m, n, k))
    out = F.Mul.apply(xe, we).sum(-1).cast(dt)   # (..., M, N); cast: sum widens int32 to int64
    if self.ndim == 1: out = out.reshape(out.shape[:-2] + (n,))
    if w.ndim == 1: out = out.reshape(out.shape[:-1])
    return out
  dot = matmul

  def linear(self, weight, bias=None):
    """x @ weight.T + bias, with weight stored (out, in) as in torch."""
    out = self @ weight.T
    return out + bias if bias is not None else out

  def softmax(self, axis=-1):
    return F.Softmax.apply(self._float(), axis=normalize_axis(axis, self.ndim))

  def log_softmax(self, axis=-1):
    return F.LogSoftmax.apply(self._float(), axis=normalize_axis(axis, self.ndim))

  def logsumexp(self, axis=-1, keepdim=False):
    m = self.detach().max(axis, keepdim=True)
    out = (self - m).exp().sum(axis, keepdim=True).log() + m
    return out if keepdim else out.squeeze(normalize_axis(axis, self.ndim))

  def layernorm(self, weight=None, bias=None, eps=1e-5, axis=-1):
    """Normalise over `axis` (the last by default) to zero mean and unit variance, then scale."""
    out = F.LayerNorm.apply(self._float(), axis=normalize_axis(axis, self.ndim), eps=eps)
    if weight is not None: out = out * weight
    if bias is not None: out = out + bias
    return out

  def rmsnorm(self, weight=None, eps=1e-6, axis=-1):
    out = F.RMSNorm.apply(self._float(), axis=normalize_axis(axis, self.ndim), eps=eps)
    return out * weight if weight is not None else out

  def embedding(self, idx):
    """Rows of this (V, C) table at integer indices idx: shape idx.shape + (C,)."""
    if self.ndim != 2: raise ValueError(f"embedding: table must be 2-d (vocab, dim), got {self.shape}")
    if not isinstance(idx, Tensor): idx = Tensor(np.asarray(idx), device=self.device)
    if idx.dtype not in (dtypes.int32, dtypes.int64): raise TypeError(f"embedding: indices must be int32 or int64, not {idx.dtype.name}")
    return F.Gather.apply(self, idx)

  def dropout(self, p=0.5):
    """Zero each element with probability p and scale the rest by 1/(1-p); only while
    Tensor.training is True, as in torch's module.train()."""
    if not 0 <= p < 1: raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not Tensor.training or p == 0: return self
    keep = Tensor.rand(*self.shape, device=self.device) >= p
    return keep.where(self * (1.0 / (1.0 - p)), 0.0)

  def cross_entropy(self, target, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """Cross-entropy of logits (..., C) against integer targets (...), as torch's
    F.cross_entropy; targets equal to ignore_index count for nothing."""
    if not isinstance(target, Tensor): target = Tensor(np.asarray(target), device=self.device)
    if target.shape != self.shape[:-1]:
      raise ValueError(f"cross_entropy: logits {self.shape} need targets of shape {self.shape[:-1]}, got {target.shape}")
    if reduction not in ("mean", "sum", "none"): raise ValueError(f"reduction must be mean, sum or none, not {reduction!r}")
    c = self.shape[-1]
    logp = self.log_softmax(-1)
    hit = target.unsqueeze(-1) == Tensor.arange(c, dtype=target.dtype, device=self.device)
    nll = -(hit.where(logp, 0.0).sum(-1))
    if label_smoothing: nll = (1 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    valid = (target != ignore_index)
    nll = valid.where(nll, 0.0)
    if reduction == "none": return nll
    if reduction == "sum": return nll.sum()
    return nll.sum() / valid.sum().float()

  def scaled_dot_product_attention(self, key, value, attn_mask=None, is_causal=False, scale=None, window=None):
    """softmax(q k^T * scale + mask) v for q (B, Hq, T, D), k and v (B, Hkv, S, D).
    Grouped-query heads (Hq a multiple of Hkv) share k and v without copying them. Causal masks
    align the last query with the last key; window keeps only the `window` most recent keys."""
    q, k, v = self, key, value
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
      raise ValueError(f"attention expects 4-d (batch, heads, seq, dim) q, k, v; got {q.shape}, {k.shape}, {v.shape}")
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    if hq % hkv or v.shape[1] != hkv or k.shape[3] != d or v.shape[2] != s:
      raise ValueError(f"attention: incompatible q {q.shape}, k {k.shape}, v {v.shape}")
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if (attn_mask is None and (window is None or window >= 1) and get_device(q.device).runs_attention
        and q.device == k.device == v.device and {q.dtype, k.dtype, v.dtype} == {dtypes.float32}):
      # one kernel (and one for the gradients) that never writes the scores out
      return F.Attention.apply(q, k, v, scale=float(scale), causal=bool(is_causal), window=window)
    if is_causal and attn_mask is None and t == s and t >= 2 * ATTENTION_BLOCK:
      # causal over a long sequence: each block of queries against only the keys it can see
      # (and, with a window, only those still inside it), so the masked-off half of the (T, S)
      # scores is never computed: 5/8 of the work at T = 512
      outs = []
      for i0 in range(0, t, ATTENTION_BLOCK):
        i1 = min(t, i0 + ATTENTION_BLOCK)
        lo = 0 if window is None else max(0, i0 - window + 1)
        outs.append(q[:, :, i0:i1].scaled_dot_product_attention(k[:, :, lo:i1], v[:, :, lo:i1], is_causal=True, scale=scale, window=window))
      return Tensor.cat(outs, dim=2)
    qg = q.reshape(b, hkv, g, t, d)                                     # (B, Hkv, G, T, D)
    kg, vg = k.reshape(b, hkv, 1, s, d), v.reshape(b, hkv, 1, s, v.shape[3])
    scores = (qg * scale) @ kg.transpose(-1, -2)                        # (B, Hkv, G, T, S); scaling q is T*D ops, not T*S
    if is_causal or window is not None:
      qi = Tensor.arange(s - t, s, device=self.device).reshape(t, 1)
      kj = Tensor.arange(s, device=self.device).reshape(1, s)
      allowed = (kj <= qi) if is_causal else Tensor.full((t, s), True, device=self.device)
      if window is not None: allowed = allowed * (kj > qi - window)
      # a small (T, S) additive bias made once and broadcast: cheaper than a full-size select
      scores = scores + allowed.where(0.0, -math.inf).contiguous()
    if attn_mask is not None:
      m = attn_mask.reshape((1,) * (5 - attn_mask.ndim) + attn_mask.shape) if attn_mask.ndim < 5 else attn_mask
      if attn_mask.ndim == 4: m = attn_mask.reshape(attn_mask.shape[0], -1 if attn_mask.shape[1] == 1 else hkv, 1 if attn_mask.shape[1] == 1 else g, t, s) if attn_mask.shape[1] in (1, hq) else attn_mask
      scores = m.where(scores, -math.inf) if m.dtype is dtypes.bool else scores + m
    # softmax(scores) @ v, written (e @ v) / l with e = exp(scores - max) and l = sum(e): the exp
    # is made once (the matmul needs it made, and the sum reads it), the division is T*Dv ops
    # instead of T*S, and the backward's row sum is sum(g * out) over Dv, not over S
    e = (scores - scores.detach().max(-1, keepdim=True)).exp()
    out = (e @ vg) / e.sum(-1, keepdim=True)                            # (B, Hkv, G, T, Dv)
    return out.reshape(b, hq, t, v.shape[3])

  def linear_cross_entropy(self, weight, target, ignore_index=-100, chunk_rows=256, denominator=None):
    """Mean cross-entropy of (self @ weight.T) against targets, without ever holding the full
    (rows, vocab) logits. Rows are processed in chunks; when gradients are needed, each chunk's
    gradients w.r.t. the hidden states and the weight are computed and realized right away, so
    only one chunk of logits (and its gradient) is alive at any moment.
    weight: a (vocab, C) tensor, or a list of row pieces of one (a table split by the sharder):
    each piece is read by its own kernels and gets its own gradient.
    denominator: divide the summed loss by this (a number or a Tensor) instead of by the number
    of targets here: gradient accumulation passes the count of the whole batch."""
    pieces = list(weight) if isinstance(weight, (list, tuple)) else [weight]
    h = self.reshape(-1, self.shape[-1])
    tgt = target.reshape(-1) if isinstance(target, Tensor) else Tensor(np.asarray(target).reshape(-1), device=self.device)
    if h.shape[0] != tgt.shape[0]: raise ValueError(f"linear_cross_entropy: {h.shape[0]} rows of hidden states but {tgt.shape[0]} targets")
    for w in pieces:
      if w.ndim != 2 or w.shape[1] != h.shape[1]:
        raise ValueError(f"linear_cross_entropy: weight {w.shape} does not fit hidden size {h.shape[1]}")
    # a lazy count, not a Python number, so a jit-captured step rescales every batch correctly
    n_valid = (tgt != ignore_index).sum().maximum(1).float() if denominator is None else denominator
    if not isinstance(n_valid, Tensor): n_valid = Tensor(float(n_valid), device=self.device)
    inv_n = n_valid.reciprocal().realize()
    need_h = self.requires_grad and not Tensor.no_grad
    need_w = [w.requires_grad and not Tensor.no_grad for w in pieces]
    starts = [sum(w.shape[0] for w in pieces[:k]) for k in range(len(pieces))]
    loss, dh_parts, dw = None, [], [None] * len(pieces)
    hd, wds = h.detach(), [w.detach() for w in pieces]
    with no_grad():
      hd.realize()
      # a paged table is read forth then back (logits, then gradients; or the logits of the next
      # chunk): the pieces read last are the ones most likely still in memory
      order = list(range(len(pieces)))
      for start in range(0, h.shape[0], chunk_rows):
        part, dh = _cross_entropy_chunk(hd[start:start + chunk_rows], tgt[start:start + chunk_rows], wds, starts, order,
                                        ignore_index, inv_n, need_h, need_w, dw)
        if dh is not None: dh_parts.append(dh)
        loss = part if loss is None else (loss + part).realize()
      dh = Tensor.cat(dh_parts, 0).reshape(self.shape) if need_h else None
      dw = [d.cast(w.dtype) if d is not None else None for d, w in zip(dw, pieces)]
    grads = (dh.lazydata if dh is not None else None, *[d.lazydata if d is not None else None for d in dw])
    return F.Stored.apply(self, *pieces, value=loss.lazydata, grads=grads)


def _cross_entropy_chunk(hc, tc, wds, starts, order, ignore_index, inv_n, need_h, need_w, dw):
  """One chunk of rows of linear_cross_entropy: (its share of the loss, its gradient w.r.t. the
  hidden states or None), realized; adds its weight gradients to dw. Its logits die with it.

  Each piece's logits l are one (rows, vocab) buffer, overwritten in place: first by
  e = exp(l - max), then, where the table trains, by the gradient e * scale / sum - scale *
  onehot(target). A frozen table's gradient is never written over the whole vocabulary: the
  hidden states' gradient is (e @ table) * scale / sum (a scale per row, on the product) minus
  scale times the target's row of the table (a gather)."""
  rows, valid = hc.shape[0], (tc != ignore_index)
  tc = valid.where(tc, 0).long()
  logits, maxes, insides, picked = [None] * len(wds), [None] * len(wds), [None] * len(wds), None
  for k in order:
    l = logits[k] = (hc @ wds[k].T).float().realize()                             # (rows, vocab_k)
    inside = insides[k] = (tc >= starts[k]).where(tc < starts[k] + l.shape[1], False)   # the target is in this piece
    flat = Tensor.arange(rows, device=hc.device) * l.shape[1] + inside.where(tc - starts[k], 0)
    part = l.reshape(-1, 1).embedding(flat).reshape(rows) * inside.float()        # the target's logit, if in this piece
    picked = part if picked is None else picked + part
    maxes[k] = l.max(-1, keepdim=True)                                             # (rows, 1)
    Tensor.realize_all(picked, maxes[k])                                           # read before l is overwritten
    l.assign((l - maxes[k]).exp())
  sums = [l.sum(-1, keepdim=True) for l in logits]
  if len(wds) == 1: lse = sums[0].log() + maxes[0]
  else:
    top = Tensor.cat(maxes, 1).max(-1, keepdim=True)                               # logsumexp over the pieces
    total = None
    for m, s in zip(maxes, sums): total = (m - top).exp() * s if total is None else total + (m - top).exp() * s
    lse = total.log() + top
  lse = lse.realize()                                                              # (rows, 1)
  part = (((lse.reshape(rows) - picked) * valid.float()).sum() * inv_n.reshape(())).realize()
  if not (need_h or any(need_w)):
    order.reverse()
    return part, None
  dh, todo = None, []
  scale = valid.float() * inv_n.reshape(())                                       # (rows,): d loss / d logit is scale * (p - onehot)
  for k in reversed(order):
    l, wd, s0 = logits[k], wds[k], starts[k]
    row_scale = scale.unsqueeze(-1) * (maxes[k] - lse).exp()                      # (rows, 1): softmax = e * row_scale
    if need_w[k]:   # the table trains: its gradient needs the whole gradient, one-hot part included
      soft = l * row_scale
      hit = tc.unsqueeze(-1) == Tensor.arange(s0, s0 + l.shape[1], dtype=tc.dtype, device=hc.device)
      g = l.assign(soft - hit.float() * scale.unsqueeze(-1))                       # in place
      if need_h: dh = g @ wd if dh is None else dh + g @ wd
      dwc = g.T @ hc                                                               # (vocab_k, C)
      dw[k] = dwc if dw[k] is None else dw[k].assign(dw[k] + dwc)
      todo.append(dw[k])
    elif need_h:    # frozen table: the one-hot part's product with it is a gathered row of it, and the
      # row scale is applied to the (rows, C) product, not written over the (rows, vocab) e
      hot = (scale * insides[k].float()).unsqueeze(-1)                             # (rows, 1)
      rows_k = wd.embedding(insides[k].where(tc - s0, 0))                         # (rows, C), float32 from a quantized table
      dhk = (l @ wd) * row_scale - rows_k * hot.cast(rows_k.dtype)
      dh = dhk if dh is None else dh + dhk
    if len(wds) > 1: Tensor.realize_all(*todo, *([dh] if dh is not None else []))   # one piece's gradient at a time
  if dh is not None: todo.append(dh)
  Tensor.realize_all(*todo)
  return part, dh


def _toposort(root):
  """Graph nodes (Functions, and leaf Tensors that require grad) reachable from root, inputs first."""
  order, seen, stack = [], set(), [(root, False)]
  while stack:
    n, done = stack.pop()
    if done: order.append(n); continue
    if id(n) in seen: continue
    seen.add(id(n))
    stack.append((n, True))
    for p in getattr(n, "parents", None) or ():
      if p is not None and id(p) not in seen: stack.append((p, False))
  return order


def _shape_arg(shape):
  if len(shape) == 1 and isinstance(shape[0], (tuple, list)): shape = tuple(shape[0])
  shape = tuple(int(s) for s in shape)
  return shape
