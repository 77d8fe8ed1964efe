"""Capture and replay: the third and later calls replay kernels without building or
scheduling a graph, and give the same results as running eagerly."""
import numpy as np
import pytest
import minift.tensor
from minift import Tensor, jit
from minift.optim import AdamW


def _model():
  rng = np.random.default_rng(0)
  w1 = Tensor(rng.standard_normal((8, 16)).astype(np.float32) * 0.3, requires_grad=True)
  w2 = Tensor(rng.standard_normal((16, 4)).astype(np.float32) * 0.3, requires_grad=True)
  return w1, w2


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
  fn = jit(step) if use_jit else step
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
