"""Capture and replay: the third and later calls replay kernels without building or
scheduling a graph, and give the same results as running eagerly."""
import numpy as np
import pytest
import minift.tensor
from minift import Tensor, jit
from minift.optim import AdamW
from minift.runtime.device import FusedAssigns
from minift.runtime.executor import repeating


def _model():
  rng = np.random.default_rng(0)
  w1 = Tensor(rng.standard_normal((8, 16)).astype(np.float32) * 0.3, requires_grad=True)
  w2 = Tensor(rng.standard_normal((16, 4)).astype(np.float32) * 0.3, requires_grad=True)
  return w1, w2


def _as_if_jitted(fn, *args):
  with repeating(): return fn(*args)


def _run(use_jit, steps=6, dropout=0.0, lrs=None):
  Tensor.manual_seed(123)
  w1, w2 = _model()
  opt = AdamW([w1, w2], lr=1e-2)
  def step(x, y):
    Tensor.training = True
    h = (x @ w1).gelu().dropout(dropout)
    loss = ((h @ w2 - y) ** 2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    Tensor.training = False
    return loss, h
  # eager kernels are built as a jitted call's (the NumPy backend compiles a jitted function's
  # small kernels and evaluates an eager call's in NumPy): what differs is replay alone
  fn = jit(step) if use_jit else lambda *a: _as_if_jitted(step, *a)
  rng = np.random.default_rng(1)
  losses, hs = [], []
  for i in range(steps):
    if lrs: opt.set_lr(lrs[i])
    loss, h = fn(Tensor(rng.standard_normal((5, 8)).astype(np.float32)), Tensor(rng.standard_normal((5, 4)).astype(np.float32)))
    losses.append(loss); hs.append(h)
  return [l.item() for l in losses], [h.numpy() for h in hs], w1.numpy()


def test_replay_equals_eager():
  le, he, we = _run(False)
  lj, hj, wj = _run(True)
  np.testing.assert_allclose(lj, le, rtol=1e-6)
  np.testing.assert_allclose(wj, we, rtol=1e-6, atol=1e-7)
  for a, b in zip(hj, he): np.testing.assert_allclose(a, b, rtol=1e-6)   # old outputs keep their values


def test_dropout_masks_advance_under_replay():
  le, he, _ = _run(False, dropout=0.5)
  lj, hj, _ = _run(True, dropout=0.5)
  np.testing.assert_allclose(lj, le, rtol=1e-6)
  assert not np.array_equal(hj[3] == 0, hj[4] == 0), "each replay must draw a new mask"


def test_learning_rate_changes_reach_replayed_steps():
  lrs = [1e-2, 1e-2, 1e-2, 0.0, 0.0, 5e-2]
  le, _, we = _run(False, lrs=lrs)
  lj, _, wj = _run(True, lrs=lrs)
  np.testing.assert_allclose(wj, we, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("warmup", [1, 0, 2])
def test_replay_skips_graph_building_and_scheduling(monkeypatch, warmup):
  w1, w2 = _model()
  calls = {"fn": 0, "schedule": 0}
  real = minift.tensor.create_schedule
  def counting(outs):
    calls["schedule"] += 1
    return real(outs)
  monkeypatch.setattr(minift.tensor, "create_schedule", counting)
  def f(x):
    calls["fn"] += 1
    return (x @ w1).relu() @ w2
  f = jit(f, warmup=warmup)
  x = np.ones((3, 8), np.float32)
  outs = [f(Tensor(x * i)).numpy() for i in range(5)]
  assert calls["fn"] == warmup + 1   # the plain calls and the recorded one; the rest replayed
  for i, o in enumerate(outs):
    np.testing.assert_allclose(o, np.maximum((x * i) @ w1.numpy(), 0) @ w2.numpy(), rtol=1e-5)
  n = calls["schedule"]
  f(Tensor(x))
  assert calls["schedule"] == n   # a replayed call schedules nothing


def test_jit_warmup_must_not_be_negative():
  with pytest.raises(ValueError, match="warmup must be >= 0"): jit(lambda x: x, warmup=-1)


def test_new_shapes_recapture():
  w1, _ = _model()
  f = jit(lambda x: x @ w1)
  for rows in (2, 2, 2, 3, 3, 3):
    x = np.full((rows, 8), 0.5, np.float32)
    np.testing.assert_allclose(f(Tensor(x)).numpy(), x @ w1.numpy(), rtol=1e-5)


def _fused_items(fn):
  return sum(isinstance(item[0], FusedAssigns) for item in fn.recording.steps)


def test_optimizer_updates_run_as_one_loop_with_the_same_bits(monkeypatch):
  """Replayed, each weight's AdamW m, v and p updates (weight decay, a clipping factor) run as
  one compiled loop (jit._fuse_assigns): the same bits as three loops, and torch's numbers."""
  import torch
  from minift.backends.numpy import NumpyDevice
  from minift.optim import clip_scale, grad_norm
  rng = np.random.default_rng(4)
  init = [rng.standard_normal(s).astype(np.float32) * 0.2 for s in [(48, 96), (96,), (96, 80)]]
  xs = rng.standard_normal((5, 16, 48)).astype(np.float32)
  def run(fuse):
    if not fuse: monkeypatch.setattr(NumpyDevice, "fuses_assigns", False)
    ps = [Tensor(w, requires_grad=True) for w in init]
    opt = AdamW(ps, lr=1e-2, weight_decay=0.1)
    def step(x):
      opt.zero_grad()
      loss = ((x @ ps[0] + ps[1]).tanh() @ ps[2]).square().mean()
      loss.backward()
      opt.step(clip_scale(grad_norm(ps), 0.5))
      return loss
    fn = jit(step)
    losses = [fn(Tensor(x)).item() for x in xs]
    monkeypatch.undo()
    return fn, losses, [t.numpy() for t in ps + opt.m + opt.v]
  fused, losses, state = run(True)
  unfused, losses_unfused, state_unfused = run(False)
  assert _fused_items(fused) == 3 and _fused_items(unfused) == 0
  assert losses == losses_unfused and all(np.array_equal(a, b) for a, b in zip(state, state_unfused))
  tp = [torch.tensor(w, requires_grad=True) for w in init]
  topt = torch.optim.AdamW(tp, lr=1e-2, weight_decay=0.1)
  for x, got in zip(xs, losses):
    loss = ((torch.tensor(x) @ tp[0] + tp[1]).tanh() @ tp[2]).square().mean()
    topt.zero_grad(); loss.backward()
    torch.nn.utils.clip_grad_norm_(tp, 0.5); topt.step()
    assert abs(got - loss.item()) <= 1e-5 * abs(loss.item())
  for a, t in zip(state, tp): np.testing.assert_allclose(a, t.detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reads", ["same element", "other elements"])
def test_updates_fuse_only_where_each_element_reads_its_own(reads):
  """b's update reading a's new values at the element it writes fuses with a's; reading them
  elsewhere (a flip) would need elements another part of the loop writes: not fused. Both
  replay the eager results."""
  rng = np.random.default_rng(5)
  a0, b0 = rng.standard_normal((2, 100, 64)).astype(np.float32)
  a, b = Tensor(a0.copy()), Tensor(b0.copy())
  def step(x):
    a.assign(a * 0.5 + x)
    b.assign(b + (a if reads == "same element" else a.flip(0)) * 2)
    Tensor.realize_all(a, b)
  fn = jit(step)
  want_a, want_b = a0.copy(), b0.copy()
  for _ in range(4):
    x = rng.standard_normal((100, 64)).astype(np.float32)
    fn(Tensor(x))
    want_a = want_a * np.float32(0.5) + x
    want_b = want_b + (want_a if reads == "same element" else want_a[::-1]) * np.float32(2)
  np.testing.assert_allclose(a.numpy(), want_a, rtol=1e-6)
  np.testing.assert_allclose(b.numpy(), want_b, rtol=1e-6)
  assert _fused_items(fn) == (1 if reads == "same element" else 0)


@pytest.mark.parametrize("device", ["numpy", "opencl", "vulkan"])
def test_a_kernel_output_kept_past_the_capture_is_rewritten_by_each_replay(device):
  """A buffer the captured call made that is still alive after it (kept, not returned) is
  state: each replay writes it in place and later kernels read it there. An attention kernel's
  output kept so was left as the capture made it on NumPy (its result went to a new buffer)."""
  import torch
  kept = []
  def f(q):
    a = q.scaled_dot_product_attention(q, q, is_causal=True)
    kept[:] = [a]
    return a.sum(-1)
  fn = jit(f)
  rng = np.random.default_rng(0)
  qs = [rng.standard_normal((1, 2, 5, 4)).astype(np.float32) for _ in range(4)]
  for q in qs:
    out = fn(Tensor(q, device=device)).numpy()
    want = torch.nn.functional.scaled_dot_product_attention(*[torch.tensor(q)] * 3, is_causal=True).numpy()
    np.testing.assert_allclose(out, want.sum(-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kept[0].numpy(), want, rtol=1e-5, atol=1e-5)
