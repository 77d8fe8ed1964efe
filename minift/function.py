"""Gradient rules on the primitive ops. Each forward and backward works on LazyBuffers, so the
backward pass is more lazy graph that is scheduled and fused like the forward."""
import math
from minift.dtype import dtypes
from minift.lazy import Op, LazyOp, LazyBuffer, SAVED_FOR_BACKWARD


def graph_node(t):
  """What an autograd graph links to for input t: its Function if an op made it, the tensor
  itself if it is a leaf that requires grad, None if no gradient flows to it. Not the tensor of
  an op's result: holding it would keep its buffer alive until backward even when no gradient
  rule reads it. A quantized tensor never gets a gradient, whatever its requires_grad says."""
  if not t.requires_grad or t.dtype.is_quantized: return None
  return t._ctx if t._ctx is not None else t


class Function:
  """One op in the autograd graph: parents are graph_node() of its inputs, in_shapes their
  shapes, and the attributes forward sets are what backward reads. reads_quantized: the op may
  take a quantized tensor (minift/quant.py: views of it, DEQUANT, an embedding lookup); any other
  op on one is refused."""
  reads_quantized = False

  def __init__(self, *tensors):
    self.needs_input_grad = [t.requires_grad and not t.dtype.is_quantized for t in tensors]
    self.requires_grad = any(self.needs_input_grad)

  def free(self):
    """Drop the links and saved values once backward has used them (parents None: freed)."""
    self.__dict__.clear()
    self.parents = None

  def forward(self, *args, **kwargs): raise NotImplementedError

  def backward(self, grad): raise NotImplementedError

  @classmethod
  def apply(cls, *tensors, **kwargs):
    # minift.tensor.Tensor, taken from the inputs: tensor.py imports this module, not the reverse
    Tensor = type(tensors[0])
    if not cls.reads_quantized and any(t.dtype.is_quantized for t in tensors):
      q = next(t for t in tensors if t.dtype.is_quantized)
      raise TypeError(f"{cls.__name__}: a quantized ({q.dtype.name}) tensor of shape {q.shape} is read only by matmuls and "
                      "embedding lookups; dequantize() it first")
    ctx = cls(*tensors)
    ctx.tensor = Tensor   # what the rules written in Tensor ops (LayerNorm, ...) wrap LazyBuffers in
    lb = ctx.forward(*[t.lazydata for t in tensors], **kwargs)
    out = Tensor(lb, requires_grad=ctx.requires_grad and not Tensor.no_grad and lb.dtype.is_float)
    if out.requires_grad:
      out._ctx, ctx.parents, ctx.in_shapes = ctx, tuple(graph_node(t) for t in tensors), tuple(t.shape for t in tensors)
      for v in vars(ctx).values():   # what backward will read: the scheduler keeps its costly parts
        if isinstance(v, LazyBuffer) and not v.base.realized: SAVED_FOR_BACKWARD.add(v.base)
    return out



# ---- unary

class Contiguous(Function):
  def forward(self, x): return x.contiguous()
  def backward(self, g): return (g,)


class Copy(Function):
  """To another device; the gradient is copied back to the source device."""
  def forward(self, x, device):
    self.in_device = x.device
    return _copy(x, device)
  def backward(self, g): return (_copy(g, self.in_device),)


def _copy(lb, device):
  lb = lb.contiguous()
  return LazyBuffer(LazyOp(Op.COPY, (lb,), None, lb.shape, lb.dtype, device))


class Dequantize(Function):
  """A quantized tensor's values as float32 (DEQUANT). No gradient: nothing quantized ever trains."""
  reads_quantized = True
  def forward(self, x): return LazyBuffer(LazyOp(Op.DEQUANT, (x,), None, x.shape, dtypes.float32, x.device))
  def backward(self, g): return (None,)


class Cast(Function):
  def forward(self, x, dtype):
    self.in_dtype = x.dtype
    return x.alu(Op.CAST, arg=dtype)
  def backward(self, g): return (g.alu(Op.CAST, arg=self.in_dtype),)


class Neg(Function):
  def forward(self, x): return x.alu(Op.NEG)
  def backward(self, g): return (g.alu(Op.NEG),)


class Exp(Function):
  def forward(self, x):
    self.out = x.alu(Op.EXP)
    return self.out
  def backward(self, g): return (g.alu(Op.MUL, self.out),)


class Log(Function):
  def forward(self, x):
    self.x = x
    return x.alu(Op.LOG)
  def backward(self, g): return (g.alu(Op.DIV, self.x),)


class Sqrt(Function):
  def forward(self, x):
    self.out = x.alu(Op.SQRT)
    return self.out
  def backward(self, g): return (g.alu(Op.DIV, self.out.alu(Op.MUL, self.out.const_like(2.0))),)


class Recip(Function):
  def forward(self, x):
    self.out = x.alu(Op.RECIP)
    return self.out
  def backward(self, g): return (g.alu(Op.MUL, self.out.alu(Op.MUL, self.out)).alu(Op.NEG),)


class Tanh(Function):
  def forward(self, x):
    self.out = x.alu(Op.TANH)
    return self.out
  def backward(self, g):
    one = self.out.const_like(1.0)
    return (g.alu(Op.MUL, one.alu(Op.SUB, self.out.alu(Op.MUL, self.out))),)


class Sigmoid(Function):
  def forward(self, x):
    self.out = x.alu(Op.SIGMOID)
    return self.out
  def backward(self, g):
    one = self.out.const_like(1.0)
    return (g.alu(Op.MUL, self.out.alu(Op.MUL, one.alu(Op.SUB, self.out))),)


class GeluTanh(Function):
  """GELU's tanh form 0.5 x (1 + tanh(c (x + a x^3))) (GPT-2's gelu_new, Gemma's
  gelu_pytorch_tanh), computed as x sigmoid(2c (x + a x^3)), the same function: 0.5 (1 + tanh(y))
  is sigmoid(2y). A sigmoid is one exp and a division, a tanh also needs its small-argument
  series, and far below zero the sigmoid keeps the tiny result that 1 + tanh rounds away.
  The derivative is written out, s + 2c x s (1 - s) (1 + 3a x^2), not left to the chain rule."""
  C, A = math.sqrt(2.0 / math.pi), 0.044715
  def forward(self, x):
    self.x, xt = x, self.tensor(x)
    return (xt * (xt * (2 * self.C + (2 * self.C * self.A) * (xt * xt))).sigmoid()).lazydata
  def backward(self, g):
    x = self.tensor(self.x)
    x2 = x * x
    s = (x * (2 * self.C + (2 * self.C * self.A) * x2)).sigmoid()
    d = s + (x * s) * (1.0 - s) * (2 * self.C + (6 * self.C * self.A) * x2)
    return ((self.tensor(g) * d).lazydata,)


class Sin(Function):
  def forward(self, x):
    self.x = x
    return x.alu(Op.SIN)
  def backward(self, g):
    cos = self.x.alu(Op.ADD, self.x.const_like(math.pi / 2)).alu(Op.SIN)
    return (g.alu(Op.MUL, cos),)


class Erf(Function):
  def forward(self, x):
    self.x = x
    return x.alu(Op.ERF)
  def backward(self, g):
    x = self.x
    d = x.alu(Op.MUL, x).alu(Op.NEG).alu(Op.EXP).alu(Op.MUL, x.const_like(2.0 / math.sqrt(math.pi)))
    return (g.alu(Op.MUL, d),)


# ---- binary (inputs already broadcast to one shape)

class Add(Function):
  def forward(self, x, y): return x.alu(Op.ADD, y)
  def backward(self, g): return (g if self.needs_input_grad[0] else None, g if self.needs_input_grad[1] else None)


class Sub(Function):
  def forward(self, x, y): return x.alu(Op.SUB, y)
  def backward(self, g): return (g if self.needs_input_grad[0] else None, g.alu(Op.NEG) if self.needs_input_grad[1] else None)


class Mul(Function):
  def forward(self, x, y):
    # keep only what a needed gradient reads: x @ frozen_w must not hold x for the backward
    self.x = x if self.needs_input_grad[1] else None
    self.y = y if self.needs_input_grad[0] else None
    return x.alu(Op.MUL, y)
  def backward(self, g):
    return (g.alu(Op.MUL, self.y) if self.needs_input_grad[0] else None,
            self.x.alu(Op.MUL, g) if self.needs_input_grad[1] else None)


class Div(Function):
  def forward(self, x, y):
    self.x = x if self.needs_input_grad[1] else None
    self.y = y
    return x.alu(Op.DIV, y)
  def backward(self, g):
    gx = g.alu(Op.DIV, self.y) if self.needs_input_grad[0] else None
    gy = g.alu(Op.MUL, self.x).alu(Op.DIV, self.y.alu(Op.MUL, self.y)).alu(Op.NEG) if self.needs_input_grad[1] else None
    return gx, gy


class Pow(Function):
  def forward(self, x, y):
    self.x, self.y = x, y
    self.out = x.alu(Op.POW, y)
    return self.out
  def backward(self, g):
    gx = gy = None
    if self.needs_input_grad[0]:
      ym1 = self.y.alu(Op.SUB, self.y.const_like(1.0))
      gx = g.alu(Op.MUL, self.y.alu(Op.MUL, self.x.alu(Op.POW, ym1)))
    if self.needs_input_grad[1]:   # where x == 0, out * log(x) is 0 * -inf: torch's gradient there is 0
      zero = self.x.const_like(0.0)
      gy = g.alu(Op.MUL, self.x.alu(Op.CMPEQ, zero).alu(Op.WHERE, zero, self.out.alu(Op.MUL, self.x.alu(Op.LOG))))
    return gx, gy


class Maximum(Function):
  """max(x, y); at ties the gradient is split in half, as torch.maximum does."""
  def forward(self, x, y):
    self.x, self.y = x, y
    return x.alu(Op.MAX, y)
  def backward(self, g):
    x, y = self.x, self.y
    half = x.const_like(0.5)
    wx = x.alu(Op.CMPLT, y).alu(Op.WHERE, x.const_like(0.0), x.alu(Op.CMPEQ, y).alu(Op.WHERE, half, x.const_like(1.0)))
    gx = g.alu(Op.MUL, wx) if self.needs_input_grad[0] else None
    gy = g.alu(Op.MUL, x.const_like(1.0).alu(Op.SUB, wx)) if self.needs_input_grad[1] else None
    return gx, gy


class Where(Function):
  def forward(self, cond, x, y):
    self.cond = cond
    return cond.alu(Op.WHERE, x, y)
  def backward(self, g):
    zero = g.const_like(0.0)
    return (None, self.cond.alu(Op.WHERE, g, zero) if self.needs_input_grad[1] else None,
            self.cond.alu(Op.WHERE, zero, g) if self.needs_input_grad[2] else None)


class Compare(Function):
  def forward(self, x, y, op): return x.alu(op, y)
  def backward(self, g): return (None, None)


# ---- reduce

class Sum(Function):
  def forward(self, x, axes):
    self.in_shape = x.shape
    return x.reduce(Op.SUM, axes)
  def backward(self, g): return (g.expand(self.in_shape),)


class Max(Function):
  """Gradient shared equally by all maxima, as torch.amax does."""
  def forward(self, x, axes):
    self.x, self.axes = x, axes
    self.out = x.reduce(Op.RMAX, axes)
    return self.out
  def backward(self, g):
    hit = self.x.alu(Op.CMPEQ, self.out.expand(self.x.shape)).alu(Op.CAST, arg=self.x.dtype)
    count = hit.reduce(Op.SUM, self.axes)
    return (hit.alu(Op.MUL, g.alu(Op.DIV, count).expand(self.x.shape)),)


# ---- movement

class Reshape(Function):
  reads_quantized = True
  def forward(self, x, shape):
    self.in_shape = x.shape
    return x.reshape(shape)
  def backward(self, g): return (g.reshape(self.in_shape),)


class Permute(Function):
  reads_quantized = True
  def forward(self, x, order):
    self.order = order
    return x.permute(order)
  def backward(self, g):
    inv = [0] * len(self.order)
    for i, o in enumerate(self.order): inv[o] = i
    return (g.permute(inv),)


class Expand(Function):
  reads_quantized = True
  def forward(self, x, shape):
    self.axes = tuple(i for i, (a, b) in enumerate(zip(x.shape, shape)) if a != b)
    return x.expand(shape)
  def backward(self, g): return (g.reduce(Op.SUM, self.axes),)


class Pad(Function):
  def forward(self, x, pads):
    self.narg = tuple((b, b + s) for (b, _), s in zip(pads, x.shape))
    return x.pad(pads)
  def backward(self, g): return (g.shrink(self.narg),)


class Shrink(Function):
  reads_quantized = True
  def forward(self, x, arg):
    self.pads = tuple((b, s - e) for (b, e), s in zip(arg, x.shape))
    return x.shrink(arg)
  def backward(self, g): return (g.pad(self.pads),)


class Flip(Function):
  reads_quantized = True
  def forward(self, x, axes):
    self.axes = axes
    return x.flip(axes)
  def backward(self, g): return (g.flip(self.axes),)


# ---- embedding

class Gather(Function):
  """rows of a (V, C) table picked by integer indices; backward scatter-adds into the table. The
  rows of a quantized table come out float32."""
  reads_quantized = True
  def forward(self, table, idx):
    self.idx, self.rows = idx, table.shape[0]
    return table.own_kernel(Op.GATHER, (table, idx), None, idx.shape + (table.shape[1],), dtypes.float32 if table.dtype.is_quantized else None)
  def backward(self, g):
    return (g.own_kernel(Op.SCATTER_ADD, (g, self.idx), self.rows, (self.rows, g.shape[-1])), None)


class Attention(Function):
  """softmax(q k^T * scale, masked) v as one kernel, and its gradients as one more, for backends
  that run them (runs_attention): the (T, S) scores and softmax are made inside the kernels and
  never stored; the backward makes them again from q and k."""
  def forward(self, q, k, v, scale, causal, window):
    self.q, self.k, self.v, self.arg = q, k, v, (scale, causal, window)
    return q.own_kernel(Op.ATTENTION, (q, k, v), self.arg, q.shape[:3] + (v.shape[3],))
  def backward(self, g):
    inputs = (self.q, self.k, self.v)
    sizes = [math.prod(x.shape) for x in inputs]
    flat = g.own_kernel(Op.ATTENTION_BACKWARD, (*inputs, g), self.arg, (sum(sizes),))   # dq, dk, dv one after the other
    starts = [0, sizes[0], sizes[0] + sizes[1], sum(sizes)]
    return tuple(flat.shrink(((a, b),)).reshape(x.shape) for a, b, x in zip(starts, starts[1:], inputs))


class Stored(Function):
  """An op whose gradients were computed (and realized) in forward; backward scales them. Its
  inputs are only linked to (a quantized LM head among them: it gets no gradient)."""
  reads_quantized = True
  def forward(self, *xs, value, grads):
    self.grads = grads
    return value
  def backward(self, g):
    out = []
    for need, gr in zip(self.needs_input_grad, self.grads):
      out.append(gr.alu(Op.MUL, g.reshape((1,) * len(gr.shape)).expand(gr.shape)) if need and gr is not None else None)
    return tuple(out)


# ---- normalisations and softmax: forward and backward written out (still in primitive ops),
# because the chain rule through their pieces gives several reductions where one or two do.
# The forwards build their cheap shifted input (x - mean, x - max) twice on purpose: each copy
# fuses into the kernel that reads it, instead of being written out once and read twice.
# self.tensor(lb) is a plain Tensor: ops on it build lazy graph but no autograd graph.

class LayerNorm(Function):
  """(x - mean) / sqrt(var + eps) over `axis`; dx = rstd (g - mean(g) - xhat mean(g xhat))."""
  def forward(self, x, axis, eps):
    xt = self.tensor(x)
    mean = xt.mean(axis, keepdim=True)
    var = ((xt - mean) * (xt - mean)).mean(axis, keepdim=True)
    rstd = (var + eps).rsqrt()
    self.x, self.mean, self.rstd, self.axis = x, mean.lazydata, rstd.lazydata, axis
    return ((xt - mean) * rstd).lazydata
  def backward(self, g):
    g, rstd = self.tensor(g), self.tensor(self.rstd)
    xhat = (self.tensor(self.x) - self.tensor(self.mean)) * rstd
    dx = rstd * (g - g.mean(self.axis, keepdim=True) - xhat * (g * xhat).mean(self.axis, keepdim=True))
    return (dx.lazydata,)


class RMSNorm(Function):
  """x / sqrt(mean(x^2) + eps) over `axis`; dx = rstd (g - xhat mean(g xhat))."""
  def forward(self, x, axis, eps):
    xt = self.tensor(x)
    rstd = ((xt * xt).mean(axis, keepdim=True) + eps).rsqrt()
    self.x, self.rstd, self.axis = x, rstd.lazydata, axis
    return (xt * rstd).lazydata
  def backward(self, g):
    g, rstd = self.tensor(g), self.tensor(self.rstd)
    xhat = self.tensor(self.x) * rstd
    return ((rstd * (g - xhat * (g * xhat).mean(self.axis, keepdim=True))).lazydata,)


class Softmax(Function):
  """exp(x - max) / sum; dx = y (g - sum(g y)). Backward reads the output y: where y was made
  (an attention's probabilities are, for the matmul with v) that is a load instead of three ops,
  and x need not be kept; where y stayed fused into its consumer, reading it recomputes it."""
  def forward(self, x, axis):
    xt = self.tensor(x)
    m = xt.max(axis, keepdim=True)
    s = (xt - m).exp().sum(axis, keepdim=True)
    self.out, self.axis = ((xt - m).exp() / s).lazydata, axis
    return self.out
  def backward(self, g):
    g, y = self.tensor(g), self.tensor(self.out)
    return ((y * (g - (g * y).sum(self.axis, keepdim=True))).lazydata,)


class LogSoftmax(Function):
  """x - max - log(sum(exp(x - max))); dx = g - exp(out) sum(g)."""
  def forward(self, x, axis):
    xt = self.tensor(x)
    m = xt.max(axis, keepdim=True)
    lse = (xt - m).exp().sum(axis, keepdim=True).log() + m
    self.x, self.lse, self.axis = x, lse.lazydata, axis
    return (xt - lse).lazydata
  def backward(self, g):
    g = self.tensor(g)
    p = (self.tensor(self.x) - self.tensor(self.lse)).exp()
    return ((g - p * g.sum(self.axis, keepdim=True)).lazydata,)
