"""Optimizers. State lives in realized buffers updated with Tensor.assign, so a jit-captured
training step replays with the same buffers; the learning rate is a buffer written from the
host (set_lr), so schedules work under jit too."""
import numpy as np
from minift.sharder import active as active_sharder
from minift.tensor import Tensor, no_grad
from minift.dtype import dtypes


def state_like(p, kind="optimizer"):
  """A float32 zero buffer shaped like p. An active sharder pages it from the start, so the
  optimizer's state is never all in memory at once."""
  t = Tensor.zeros(p.shape, dtype=dtypes.float32, device=p.device).contiguous().realize()
  sharder = active_sharder()
  if sharder is not None: sharder.manage(t, f"{kind} state", kind=kind)
  return t


class Optimizer:
  def __init__(self, params, lr):
    self.params = [p for p in params if p.requires_grad]
    if not self.params: raise ValueError("optimizer: no parameter requires grad")
    for p in self.params: p._make_buffer()
    if lr < 0: raise ValueError(f"learning rate must be >= 0, got {lr}")
    self.lr = Tensor(np.array([lr], dtype=np.float32), device=self.params[0].device)

  def set_lr(self, lr):
    self.lr.assign(np.float32(lr))

  def zero_grad(self):
    for p in self.params: p.grad = None

  def step(self, grad_scale=None):
    """Apply the update. grad_scale: a factor (a Tensor, e.g. clip_scale's) every gradient is
    multiplied by; folded into the update's constants, so no scaled gradient is ever written."""
    with no_grad():
      Tensor.realize_all(*self._updates(grad_scale))

  def state_tensors(self):
    return []


def grad_norm(params):
  """The global L2 norm of the gradients of params (a Tensor), as clip_grad_norm_ measures it."""
  grads = [p for p in params if p.grad is not None]
  if not grads: return Tensor(0.0)
  with no_grad(): return sum((p.grad.float() * p.grad.float()).sum() for p in grads).sqrt()


def clip_scale(norm, max_norm):
  """The factor torch.nn.utils.clip_grad_norm_ scales gradients by: min(1, max_norm / (norm + 1e-6))."""
  with no_grad(): return (max_norm / (norm + 1e-6)).minimum(1.0)


def clip_grad_norm(params, max_norm):
  """Scale gradients in place (lazily) so their global L2 norm is at most max_norm, as
  torch.nn.utils.clip_grad_norm_ does. Returns the norm before clipping (a Tensor). (A training
  loop can pass clip_scale(grad_norm(params), max_norm) to the optimizer's step instead.)"""
  total = grad_norm(params)
  scale = clip_scale(total, max_norm)
  with no_grad():
    for p in params:
      if p.grad is not None: p.grad = p.grad * scale.cast(p.grad.dtype)
  return total


class SGD(Optimizer):
  def __init__(self, params, lr=1e-3, momentum=0.0, weight_decay=0.0):
    super().__init__(params, lr)
    self.momentum, self.weight_decay = momentum, weight_decay
    self.buf = [state_like(p) for p in self.params] if momentum else []

  def _updates(self, grad_scale):
    out = []
    for i, p in enumerate(self.params):
      if p.grad is None: continue
      g = p.grad.float() if grad_scale is None else p.grad.float() * grad_scale
      if self.weight_decay: g = g + self.weight_decay * p.float()
      if self.momentum:
        g = self.buf[i].assign(self.buf[i] * self.momentum + g)
        out.append(self.buf[i])
      out.append(p.assign((p.float() - self.lr * g).cast(p.dtype)))
    return out

  def state_tensors(self): return list(self.buf)


class AdamW(Optimizer):
  """AdamW (decoupled weight decay, bias correction) with torch.optim.AdamW's update."""

  def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
    super().__init__(params, lr)
    self.b1, self.b2, self.eps, self.weight_decay = betas[0], betas[1], eps, weight_decay
    self.m = [state_like(p) for p in self.params]
    self.v = [state_like(p) for p in self.params]
    self.t = Tensor(np.zeros(1, dtype=np.float32), device=self.params[0].device)

  def _updates(self, grad_scale):
    t = self.t.assign(self.t + 1)
    step_size = self.lr / (1.0 - Tensor(self.b1, device=t.device) ** t)
    bc2_sqrt = (1.0 - Tensor(self.b2, device=t.device) ** t).sqrt()
    # torch's p -= step_size * m / (sqrt(v) / bc2_sqrt + eps), with the one-element factors
    # gathered so each full-size tensor sees as few ops as possible (12 per element in all)
    c1, c2 = 1.0 - self.b1, 1.0 - self.b2
    if grad_scale is not None: c1, c2 = grad_scale * c1, grad_scale * grad_scale * c2
    eps, factor = bc2_sqrt * self.eps, step_size * bc2_sqrt
    # the one-element factors first: made between one weight's m, v and p updates, they would
    # keep a jitted step from running those three as one loop (jit._fuse_assigns)
    Tensor.realize_all(*[x for x in (t, c1, c2, eps, factor) if isinstance(x, Tensor)])
    out = [t]
    for p, m, v in zip(self.params, self.m, self.v):
      if p.grad is None: continue
      g = p.grad.float()
      m.assign(m * self.b1 + g * c1)
      v.assign(v * self.b2 + (g * g) * c2)
      pf = p.float()
      if self.weight_decay: pf = pf * (1.0 - self.lr * self.weight_decay)
      pf = pf - m / (v.sqrt() + eps) * factor
      out += [m, v, p.assign(pf.cast(p.dtype))]
    return out

  def state_tensors(self): return self.m + self.v + [self.t]
