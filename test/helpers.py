"""The shared op-test helper, in the style of tinygrad's helper_test_op.

helper_test_op builds identical random inputs for torch and minift, runs both functions,
and compares the forward values and the gradient of every float input. The gradient is taken
of a random-weighted sum of the output(s), so every output element gets its own non-trivial
upstream gradient (a plain .sum() would hide transposed or permuted gradients).
"""
import numpy as np
import torch
from minift import Tensor

TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "int32": torch.int32, "int64": torch.int64, "bool": torch.bool}


def _as_list(x): return list(x) if isinstance(x, (list, tuple)) else [x]


def _make_inputs(shapes, vals, low, high, dtype, rng):
  """numpy arrays: random floats in [low, high) for each shape, or the given vals."""
  if vals is not None: return [np.asarray(v) for v in vals]
  return [rng.uniform(low, high, size=s).astype(dtype) for s in shapes]


def _noncontig(arr, rng):
  """A bigger array `big` and a function that turns a framework tensor of `big` into a
  non-contiguous view with arr's values: big is arr's transpose padded with junk by one in
  every dim; the view slices the junk off and transposes back."""
  if arr.ndim == 0: return arr, lambda t: t
  rev = arr.T
  big = rng.uniform(-3, 3, size=tuple(s + 1 for s in rev.shape)).astype(arr.dtype)
  big[tuple(slice(0, s) for s in rev.shape)] = rev
  def view(t):
    t = t[tuple(slice(0, s) for s in rev.shape)]
    return t.permute(*reversed(range(arr.ndim)))
  return big, view


def compare(name, got, want, atol, rtol):
  """got: numpy from minift, want: torch tensor; shapes must match exactly."""
  want = want.detach().numpy() if isinstance(want, torch.Tensor) else np.asarray(want)
  assert got.shape == want.shape, f"{name}: minift shape {got.shape} != torch shape {want.shape}"
  if want.dtype == np.bool_ or np.issubdtype(want.dtype, np.integer):
    np.testing.assert_array_equal(got, want, err_msg=name)
  else:
    np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), atol=atol, rtol=rtol, err_msg=name)


def helper_test_op(shapes, torch_fxn, minift_fxn=None, vals=None, atol=1e-5, rtol=1e-4, grad_atol=None, grad_rtol=None,
                   forward_only=False, low=-2.0, high=2.0, dtype=np.float32, noncontig=False, device="numpy", seed=0):
  """Compare minift_fxn(*minift_inputs) with torch_fxn(*torch_inputs).

  shapes: a list of input shapes (random floats in [low, high) of `dtype`), or vals: a list
  of explicit numpy arrays / lists (integer and bool inputs are passed without gradient).
  minift_fxn defaults to torch_fxn (for ops spelled the same way: x + y, x.exp(), ...).
  noncontig: feed both frameworks a sliced, transposed view of a bigger tensor; the gradient
  is then compared on the bigger tensor (zeros where the view does not reach).
  The function may return one tensor or a list/tuple of tensors.
  """
  minift_fxn = minift_fxn or torch_fxn
  rng = np.random.default_rng(seed)
  arrays = _make_inputs(shapes, vals, low, high, dtype, rng)
  leaves_np, views = [], []
  for a in arrays:
    if noncontig and a.dtype.kind == "f": big, view = _noncontig(a, rng)
    else: big, view = a, (lambda t: t)
    leaves_np.append(big); views.append(view)
  is_float = [a.dtype.kind == "f" for a in leaves_np]
  want_grad = [f and not forward_only for f in is_float]

  tt_leaves = [torch.tensor(a, requires_grad=g) for a, g in zip(leaves_np, want_grad)]
  mt_leaves = [Tensor(a, device=device, requires_grad=g) for a, g in zip(leaves_np, want_grad)]
  tt_out = _as_list(torch_fxn(*[v(t) for v, t in zip(views, tt_leaves)]))
  mt_out = _as_list(minift_fxn(*[v(t) for v, t in zip(views, mt_leaves)]))

  assert len(tt_out) == len(mt_out), f"torch returned {len(tt_out)} outputs, minift {len(mt_out)}"
  for i, (m, t) in enumerate(zip(mt_out, tt_out)):
    assert isinstance(m, Tensor), f"output {i}: minift returned {type(m).__name__}, not a Tensor"
    assert m.device == (device if device != "cpu" else "numpy"), f"output {i} on {m.device}, expected {device}"
    assert TORCH_DTYPE[m.dtype.name] == t.dtype, f"output {i}: minift dtype {m.dtype.name}, torch dtype {t.dtype}"
    compare(f"forward output {i}", m.numpy(), t, atol, rtol)
  if forward_only or not any(want_grad): return

  # backward of a random-weighted sum of the float outputs
  gt_loss, gm_loss = 0, None
  for m, t in zip(mt_out, tt_out):
    if not t.dtype.is_floating_point or not t.requires_grad: continue
    w = rng.uniform(-1, 1, size=tuple(t.shape)).astype(np.float32)
    gt_loss = gt_loss + (t * torch.tensor(w, dtype=t.dtype)).float().sum()
    term = (m * Tensor(w, dtype=m.dtype, device=device)).float().sum()
    gm_loss = term if gm_loss is None else gm_loss + term
  if gm_loss is None: return
  gt_loss.backward()
  gm_loss.backward()
  scale = 10.0 if dtype == np.float16 else 1.0
  grad_atol = grad_atol if grad_atol is not None else max(atol * 10, 1e-4 * scale)
  grad_rtol = grad_rtol if grad_rtol is not None else max(rtol * 10, 1e-3 * scale)
  for i, (m, t) in enumerate(zip(mt_leaves, tt_leaves)):
    if not want_grad[i]: continue
    if t.grad is None or not t.grad.any():   # input unused or empty (cat skips it): minift may skip it or give zeros
      assert m.grad is None or not m.grad.numpy().any(), f"input {i}: torch has no gradient, minift has a non-zero one"
      continue
    assert m.grad is not None, f"input {i}: torch has a gradient, minift has none"
    assert m.grad.dtype == m.dtype, f"input {i}: gradient dtype {m.grad.dtype.name} != input dtype {m.dtype.name}"
    compare(f"gradient of input {i}", m.grad.numpy(), t.grad, grad_atol, grad_rtol)
