"""Property tests of movement ops and views against NumPy.

Hypothesis draws a shape and a random program of reshape / permute / expand / pad / shrink /
flip / basic indexing (with elementwise ops, contiguous and realize mixed in, so views of
computed and of realized buffers both get exercised). The same program runs on a NumPy array
and on a minift Tensor; the values must be equal. The gradient is checked too: the program
also runs on an array of element indices (padding marked -1), so the expected gradient of a
weighted sum of the output is a bincount of the weights by source index.
"""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck
from minift import Tensor
from minift.helpers import prod

MAX_NUMEL = 1500


def _factor_pairs(n):
  return [(a, n // a) for a in range(2, n) if n % a == 0]


def draw_step(draw, shape):
  """One movement op valid for `shape`: (name, arg, new shape), or None to skip."""
  nd = len(shape)
  kind = draw(st.sampled_from(["reshape", "permute", "expand", "pad", "shrink", "flip", "getitem", "ewise", "contiguous", "realize"]))
  if kind == "reshape":
    how = draw(st.sampled_from(["flat", "split", "merge", "add1", "drop1"]))
    if how == "flat": new = (prod(shape),)
    elif how == "split":
      dims = [i for i, s in enumerate(shape) if _factor_pairs(s)]
      if not dims: return None
      i = draw(st.sampled_from(dims))
      new = shape[:i] + draw(st.sampled_from(_factor_pairs(shape[i]))) + shape[i + 1:]
    elif how == "merge":
      if nd < 2: return None
      i = draw(st.integers(0, nd - 2))
      new = shape[:i] + (shape[i] * shape[i + 1],) + shape[i + 2:]
    elif how == "add1":
      i = draw(st.integers(0, nd))
      new = shape[:i] + (1,) + shape[i:]
    else:
      ones = [i for i, s in enumerate(shape) if s == 1]
      if not ones: return None
      i = draw(st.sampled_from(ones))
      new = shape[:i] + shape[i + 1:]
    return ("reshape", new, new)
  if kind == "permute":
    order = tuple(draw(st.permutations(range(nd))))
    return ("permute", order, tuple(shape[i] for i in order))
  if kind == "expand":
    lead = draw(st.integers(0, 1)) if nd < 5 else 0
    new = (draw(st.integers(1, 3)),) * lead + tuple(draw(st.integers(1, 3)) if s == 1 else s for s in shape)
    return ("expand", new, new)
  if kind == "pad":
    pads = tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in shape)
    value = draw(st.sampled_from([0.0, 0.0, -1.5]))
    return ("pad", (pads, value), tuple(s + b + a for s, (b, a) in zip(shape, pads)))
  if kind == "shrink":
    arg = []
    for s in shape:
      b = draw(st.integers(0, s))
      arg.append((b, draw(st.integers(b, s))))
    return ("shrink", tuple(arg), tuple(e - b for b, e in arg))
  if kind == "flip":
    axes = tuple(sorted(draw(st.sets(st.integers(0, nd - 1), min_size=1)))) if nd else ()
    return ("flip", axes, shape) if axes else None
  if kind == "getitem":
    idx = []
    for s in shape:
      choice = draw(st.sampled_from(["slice", "slice", "int", "none"] if s else ["slice", "none"]))
      if choice == "int": idx.append(draw(st.integers(-s, s - 1)))
      elif choice == "none": idx += [None, slice(None)]
      else:
        start = draw(st.one_of(st.none(), st.integers(-s - 1, s + 1)))
        stop = draw(st.one_of(st.none(), st.integers(-s - 1, s + 1)))
        step = draw(st.sampled_from([None, 1, 2, 3, -1, -2, -3]))
        idx.append(slice(start, stop, step))
    idx = tuple(idx)
    new = np.empty(shape)[idx].shape
    return ("getitem", idx, new)
  return (kind, None, shape)


def apply_np(kind, arg, x, is_index=False):
  if kind == "reshape": return x.reshape(arg)
  if kind == "permute": return x.transpose(arg)
  if kind == "expand": return np.broadcast_to(x, arg)
  if kind == "pad":
    pads, value = arg
    return np.pad(x, pads, constant_values=-1 if is_index else value) if pads else x   # np.pad rejects () for 0-d
  if kind == "shrink": return x[tuple(slice(b, e) for b, e in arg)]
  if kind == "flip": return np.flip(x, arg)
  if kind == "getitem": return x[arg]
  if kind == "ewise": return x if is_index else x * 2 + 1
  return x   # contiguous, realize


def apply_mt(kind, arg, x):
  if kind == "reshape": return x.reshape(arg)
  if kind == "permute": return x.permute(arg)
  if kind == "expand": return x.expand(arg)
  if kind == "pad": return x.pad(arg[0], value=arg[1])
  if kind == "shrink": return x.shrink(arg)
  if kind == "flip": return x.flip(*arg)
  if kind == "getitem": return x[arg]
  if kind == "ewise": return x * 2 + 1
  if kind == "contiguous": return x.contiguous()
  return x.realize()


def run_program(data, device, allow_zero):
  lo = 0 if allow_zero else 1
  shape = tuple(data.draw(st.lists(st.integers(lo, 4), min_size=0, max_size=4), label="shape"))
  rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
  const = data.draw(st.sampled_from([False, False, False, True]), label="const")
  if const:   # a constant: movement ops fold into its view, pads give masked views of it
    x_np = np.full(shape, 1.5, np.float32)
    x = Tensor.full(shape, 1.5, device=device)
  else:
    x_np = rng.standard_normal(shape).astype(np.float32)
    x = Tensor(x_np, requires_grad=True, device=device)
  idx_np = np.arange(x_np.size).reshape(shape)
  y, y_np, cur, steps = x, x_np, shape, []
  for _ in range(data.draw(st.integers(1, 7), label="nsteps")):
    step = draw_step(data.draw, cur)
    if step is None or prod(step[2]) > MAX_NUMEL: continue
    kind, arg, new = step
    steps.append((kind, arg))
    y_np, idx_np, y = apply_np(kind, arg, y_np), apply_np(kind, arg, idx_np, True), apply_mt(kind, arg, y)
    assert y.shape == y_np.shape == new, f"after {steps}: minift {y.shape}, numpy {y_np.shape}"
    cur = new
  # optionally end in a sum or max over some axes: the reduce then reads the view the moves made
  reduce = data.draw(st.sampled_from([None, "sum", "max"]), label="reduce") if cur else None
  axes = tuple(sorted(data.draw(st.sets(st.integers(0, len(cur) - 1), min_size=1), label="axes"))) if reduce else ()
  if reduce == "max" and any(cur[a] == 0 for a in axes): reduce = None
  y_pre = y_np
  if reduce:
    y, y_np = getattr(y, reduce)(axes, keepdim=True), getattr(y_np, reduce)(axes, keepdims=True)
    steps = steps + [(reduce, axes)]
  note = f"{'const' if const else 'buffer'} shape {shape}, steps {steps}"
  np.testing.assert_allclose(y.numpy(), y_np, rtol=1e-5, atol=1e-5, err_msg=note)
  if const:
    assert not y.requires_grad
    return
  # gradient: every output element sends its weight back to the input element it came from
  w = rng.standard_normal(y_np.shape).astype(np.float32)
  (y * Tensor(w, device=device)).sum().backward()
  w = np.broadcast_to(w, cur)   # a sum's gradient broadcasts back over the summed axes
  if reduce == "max":   # max's goes to the maxima, split evenly between ties (as torch.amax)
    hit = y_pre == y_np
    w = w * hit / hit.sum(axes, keepdims=True)
  scale = 2.0 ** sum(1 for k, _ in steps if k == "ewise")   # each x*2+1 doubles the gradient
  valid = idx_np >= 0
  want = np.bincount(idx_np[valid].ravel(), weights=w[valid].ravel(), minlength=x_np.size).reshape(shape) * scale
  np.testing.assert_allclose(x.grad.numpy(), want, rtol=1e-5, atol=1e-5, err_msg=note)


# fewer examples off NumPy: every new shape there compiles new kernels
@pytest.mark.parametrize("allow_zero", [False, True], ids=["sizes>=1", "empty dims"])
def test_movement_programs(allow_zero, device):
  n = (80 if device == "numpy" else 20) // (2 if allow_zero else 1)

  @settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])
  @given(data=st.data())
  def check(data): run_program(data, device, allow_zero)
  check()


@pytest.mark.parametrize("steps", [
  [("permute", (1, 0)), ("reshape", (12,))],                       # merge of a transposed view: needs a copy
  [("pad", (((1, 1), (0, 2)), 0.0)), ("permute", (1, 0)), ("reshape", (30,))],   # reshape of a padded, transposed view
  [("flip", (0, 1)), ("getitem", (slice(None, None, -2), slice(1, None, 3)))],
  [("expand", (2, 3, 4)), ("permute", (2, 0, 1)), ("reshape", (4, 6))],
  [("shrink", ((1, 3), (0, 4))), ("pad", (((0, 0), (2, 0)), -1.5)), ("flip", (1,)), ("ewise", None), ("reshape", (12,))],
  [("realize", None), ("permute", (1, 0)), ("getitem", (None, slice(None), 2)), ("expand", (3, 4))],
])
def test_movement_cases(steps, device):
  """Hand-picked programs (what hypothesis found worth keeping), on every device."""
  x_np = np.arange(12, dtype=np.float32).reshape(3, 4)
  idx_np = np.arange(12).reshape(3, 4)
  x = Tensor(x_np, requires_grad=True, device=device)
  y, y_np = x, x_np
  for kind, arg in steps:
    y, y_np, idx_np = apply_mt(kind, arg, y), apply_np(kind, arg, y_np), apply_np(kind, arg, idx_np, True)
  np.testing.assert_array_equal(y.numpy(), y_np)
  w = np.random.default_rng(0).standard_normal(y_np.shape).astype(np.float32)
  (y * Tensor(w, device=device)).sum().backward()
  valid = idx_np >= 0
  want = np.bincount(idx_np[valid].ravel(), weights=w[valid].ravel(), minlength=12).reshape(3, 4)
  want *= 2.0 ** sum(1 for k, _ in steps if k == "ewise")
  np.testing.assert_allclose(x.grad.numpy(), want, rtol=1e-5, atol=1e-5)
