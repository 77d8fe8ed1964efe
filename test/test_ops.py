"""Every op of the Tensor API against torch: forward values and the gradient of every input.

Shapes are small on purpose; they cover broadcasting, non-contiguous inputs, size-1 dims and
empty dims. Every test takes the `device` fixture (conftest.py), so the same file runs on
every backend minift has.
"""
import math
import numpy as np
import pytest
import torch
import torch.nn.functional as TF
import minift
from minift import Tensor, dtypes
from helpers import helper_test_op, compare, TORCH_DTYPE

UNARY_SHAPES = [(), (1,), (5,), (2, 3), (2, 1, 4), (0,), (2, 0, 3)]


# ---------------------------------------------------------------- creation

class TestCreation:
  @pytest.mark.parametrize("data", [[1.0, 2.5, -3.0], [[1, 2], [3, 4]], [True, False], 3, 2.5, True, [], [[]]])
  def test_from_python(self, data, device):
    t, ref = Tensor(data, device=device), torch.tensor(data)
    assert t.device == device
    assert TORCH_DTYPE[t.dtype.name] == ref.dtype, f"{data!r}: {t.dtype} vs {ref.dtype}"
    compare("values", t.numpy(), ref, 0, 0)

  @pytest.mark.parametrize("npdtype,want", [(np.float32, "float32"), (np.float16, "float16"), (np.int32, "int32"),
                                            (np.int64, "int64"), (np.bool_, "bool"), (np.float64, "float32")])
  def test_from_numpy(self, npdtype, want, device):
    arr = (np.arange(12).reshape(3, 4) - 5).astype(npdtype)
    t = Tensor(arr, device=device)
    assert t.dtype.name == want and t.shape == (3, 4)
    np.testing.assert_array_equal(t.numpy(), arr.astype(t.dtype.np))
    # the tensor does not alias the caller's array
    arr[0, 0] = 1
    assert t.numpy()[0, 0] == np.asarray(-5).astype(t.dtype.np)

  def test_from_numpy_noncontiguous(self, device):
    arr = np.arange(24, dtype=np.float32).reshape(4, 6)[::2, ::-3].T
    np.testing.assert_array_equal(Tensor(arr, device=device).numpy(), arr)

  def test_explicit_dtype(self, device):
    t = Tensor([1.7, -2.2], dtype=dtypes.int32, device=device)
    assert t.dtype is dtypes.int32
    np.testing.assert_array_equal(t.numpy(), torch.tensor([1.7, -2.2]).to(torch.int32).numpy())
    assert Tensor([1, 2], dtype="float16", device=device).dtype is dtypes.float16

  @pytest.mark.parametrize("fn", ["zeros", "ones"])
  @pytest.mark.parametrize("shape", [(), (3,), (2, 3), (0, 2)])
  def test_zeros_ones(self, fn, shape, device):
    t = getattr(Tensor, fn)(*shape, device=device)
    compare(fn, t.numpy(), getattr(torch, fn)(shape), 0, 0)
    assert t.dtype is dtypes.float32
    t2 = getattr(Tensor, fn)(shape, dtype=dtypes.int32, device=device)
    assert t2.dtype is dtypes.int32 and t2.shape == shape

  @pytest.mark.parametrize("value", [3, 2.5, True, -1])
  def test_full(self, value, device):
    t, ref = Tensor.full((2, 3), value, device=device), torch.full((2, 3), value)
    assert TORCH_DTYPE[t.dtype.name] == ref.dtype
    compare("full", t.numpy(), ref, 0, 0)
    assert Tensor.full((2,), 7, dtype=dtypes.float16, device=device).numpy().dtype == np.float16

  def test_like(self, device):
    x = Tensor(np.ones((2, 3), np.int32), device=device)
    for t, v in [(x.zeros_like(), 0), (x.ones_like(), 1), (x.full_like(4), 4)]:
      assert t.shape == (2, 3) and t.dtype is dtypes.int32 and (t.numpy() == v).all()

  @pytest.mark.parametrize("args", [(5,), (2, 7), (1, 10, 3), (10, 0, -3), (0.0, 1.0, 0.1), (-1.5, 2.0, 0.5), (3, 3)])
  def test_arange(self, args, device):
    t, ref = Tensor.arange(*args, device=device), torch.arange(*args)
    assert TORCH_DTYPE[t.dtype.name] == ref.dtype
    compare(f"arange{args}", t.numpy(), ref, 1e-6, 1e-6)
    assert Tensor.arange(4, dtype=dtypes.float32, device=device).dtype is dtypes.float32

  def test_rand_reproducible(self, device):
    Tensor.manual_seed(1234)
    a, b = Tensor.rand(100, device=device).numpy(), Tensor.rand(100, device=device).numpy()
    Tensor.manual_seed(1234)
    a2, b2 = Tensor.rand(100, device=device).numpy(), Tensor.rand(100, device=device).numpy()
    np.testing.assert_array_equal(a, a2)
    np.testing.assert_array_equal(b, b2)
    assert not np.array_equal(a, b), "two draws after one seed must differ"
    Tensor.manual_seed(4321)
    assert not np.array_equal(Tensor.rand(100, device=device).numpy(), a), "different seeds must differ"
    # counter-based: every backend draws the same numbers
    Tensor.manual_seed(1234)
    np.testing.assert_array_equal(Tensor.rand(100, device="numpy").numpy(), a)

  def test_rand_stats(self, device):
    Tensor.manual_seed(0)
    x = Tensor.rand(64, 256, device=device)
    assert x.shape == (64, 256) and x.dtype is dtypes.float32
    v = x.numpy()
    assert v.min() >= 0.0 and v.max() < 1.0
    assert abs(v.mean() - 0.5) < 0.01 and abs(v.std() - math.sqrt(1 / 12)) < 0.01
    # no two rows identical: the counter advances per element
    assert len({r.tobytes() for r in v}) == 64
    assert Tensor.rand(3, 2, dtype=dtypes.float16, device=device).dtype is dtypes.float16
    assert Tensor.rand((2, 3), device=device).shape == (2, 3)

  def test_randn_stats(self, device):
    Tensor.manual_seed(0)
    v = Tensor.randn(128, 256, device=device).numpy()
    assert v.shape == (128, 256) and v.dtype == np.float32 and np.isfinite(v).all()
    assert abs(v.mean()) < 0.02 and abs(v.std() - 1.0) < 0.02
    assert abs((np.abs(v) < 1).mean() - 0.6827) < 0.01   # normal, not just unit variance
    Tensor.manual_seed(0)
    np.testing.assert_array_equal(Tensor.randn(128, 256, device=device).numpy(), v)

  def test_uniform(self, device):
    Tensor.manual_seed(3)
    v = Tensor.uniform(64, 128, low=-3.0, high=5.0, device=device).numpy()
    assert v.min() >= -3.0 and v.max() < 5.0
    assert abs(v.mean() - 1.0) < 0.1 and abs(v.std() - 8 / math.sqrt(12)) < 0.05

  def test_rand_requires_grad(self, device):
    x = Tensor.randn(3, 4, requires_grad=True, device=device)
    assert x.requires_grad and x._ctx is None   # a leaf, not part of a graph
    (x * 2).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), np.full((3, 4), 2.0))


# ---------------------------------------------------------------- dtypes and cast

ALL_DTYPES = ["float32", "float16", "int32", "int64", "bool"]
CAST_VALUES = np.array([-2.7, -1.0, -0.5, 0.0, 0.4, 1.0, 3.9, 100.0], dtype=np.float32)


class TestDtypes:
  @pytest.mark.parametrize("src", ALL_DTYPES)
  @pytest.mark.parametrize("dst", ALL_DTYPES)
  def test_cast(self, src, dst, device):
    arr = CAST_VALUES.astype(src) if src != "bool" else CAST_VALUES != 0
    helper_test_op(None, lambda x: x.to(TORCH_DTYPE[dst]), lambda x: x.cast(dst), vals=[arr], device=device,
                   forward_only=not (src.startswith("float") and dst.startswith("float")), atol=1e-3 if "float16" in (src, dst) else 1e-6)

  def test_cast_shorthands(self, device):
    x = Tensor([1.5, -2.5], device=device)
    assert x.half().dtype is dtypes.float16 and x.int().dtype is dtypes.int32
    assert x.long().dtype is dtypes.int64 and x.bool().dtype is dtypes.bool and x.int().float().dtype is dtypes.float32
    np.testing.assert_array_equal(x.int().numpy(), [1, -2])

  def test_cast_gradient_is_cast_back(self, device):
    helper_test_op([(3, 4)], lambda x: x.half().float() * 2, lambda x: x.half().float() * 2, device=device, atol=2e-3, rtol=1e-3)

  @pytest.mark.parametrize("da,db", [("int32", "int32"), ("int32", "int64"), ("int64", "float32"), ("int32", "float16"),
                                     ("float16", "float32"), ("bool", "int32"), ("bool", "float32")])
  @pytest.mark.parametrize("op", ["add", "mul", "sub", "maximum"])
  def test_promotion(self, da, db, op, device):
    a = (np.arange(6).reshape(2, 3) - 2).astype(da)
    b = (np.arange(3) + 1).astype(db)
    fn = {"add": lambda x, y: x + y, "mul": lambda x, y: x * y, "sub": lambda x, y: x - y, "maximum": lambda x, y: x.maximum(y)}[op]
    # torch refuses bool - x; minift promotes the bool first, so the reference does too
    tfn = (lambda x, y: fn(x.to(y.dtype), y)) if op == "sub" and da == "bool" else fn
    helper_test_op(None, tfn, fn, vals=[a, b], forward_only=True, device=device, atol=1e-3)

  def test_int_with_float_scalar(self, device):
    # a float scalar (python or numpy) with an int tensor gives a float result, never a truncated int
    a = np.array([1, -2, 3], np.int32)
    helper_test_op(None, lambda x: x + np.float32(2.5), vals=[a], device=device)
    helper_test_op(None, lambda x: x * np.float64(0.5), vals=[a], device=device)
    helper_test_op(None, lambda x: torch.where(x > 0, 0.5, x), lambda x: (x > 0).where(0.5, x), vals=[a], device=device)
    helper_test_op(None, lambda x: torch.where(x > 0, x, -1.5), lambda x: (x > 0).where(x, -1.5), vals=[a], device=device)
    helper_test_op(None, lambda x: torch.where(x > 0, x, 7), lambda x: (x > 0).where(x, 7), vals=[a], device=device)

  def test_int_arithmetic(self, device):
    a = np.array([[7, -7, 5], [0, 3, -4]], np.int32)
    b = np.array([2, 3, -3], np.int32)
    helper_test_op(None, lambda x, y: x / y, vals=[a, b], device=device)          # true division gives float
    helper_test_op(None, lambda x: x + 2.5, vals=[a], device=device)              # int + python float is float
    helper_test_op(None, lambda x: x * 3, vals=[a], device=device)                # int * python int stays int32
    helper_test_op(None, lambda x: -x, vals=[a.astype(np.int64)], device=device)
    helper_test_op(None, lambda x: x.sum(), vals=[a], device=device)              # int32 sums to int64, as torch
    helper_test_op(None, lambda x: x.sum(0), vals=[a > 0], device=device)         # so do bools
    helper_test_op(None, lambda x: x.max(1).values if isinstance(x, torch.Tensor) else x.max(1), vals=[a], device=device)

  @pytest.mark.parametrize("name", ["add", "mul", "div", "exp", "sum", "max", "matmul", "softmax", "gelu", "layernorm"])
  def test_float16(self, name, device):
    fns = {"add": (2, lambda x, y: x + y), "mul": (2, lambda x, y: x * y), "div": (2, lambda x, y: x / (y.abs() + 1)),
           "exp": (1, lambda x: x.exp()), "sum": (1, lambda x: x.sum(-1)), "matmul": (2, lambda x, y: x @ y.transpose(-1, -2)),
           "max": (1, lambda x: x.amax(-1) if isinstance(x, torch.Tensor) else x.max(-1)),
           "softmax": (1, lambda x: x.softmax(-1)), "gelu": (1, lambda x: TF.gelu(x) if isinstance(x, torch.Tensor) else x.gelu()),
           "layernorm": (1, lambda x: TF.layer_norm(x, (8,)) if isinstance(x, torch.Tensor) else x.layernorm())}
    n, fn = fns[name]
    helper_test_op([(4, 8)] * n, fn, dtype=np.float16, atol=5e-3, rtol=5e-3, grad_atol=2e-2, grad_rtol=2e-2, device=device)


# ---------------------------------------------------------------- elementwise

def _t_gelu_tanh(x): return TF.gelu(x, approximate="tanh")


# name: (torch fn, minift fn, low, high)
UNARY_OPS = {
  "neg": (lambda x: -x, lambda x: -x, -2, 2),
  "neg_method": (lambda x: x.neg(), None, -2, 2),
  "exp": (torch.exp, Tensor.exp, -2, 2),
  "log": (torch.log, Tensor.log, 0.1, 3),
  "sqrt": (torch.sqrt, Tensor.sqrt, 0.1, 3),
  "rsqrt": (torch.rsqrt, Tensor.rsqrt, 0.1, 3),
  "reciprocal": (torch.reciprocal, Tensor.reciprocal, 0.5, 3),
  "tanh": (torch.tanh, Tensor.tanh, -3, 3),
  "sigmoid": (torch.sigmoid, Tensor.sigmoid, -4, 4),
  "relu": (torch.relu, Tensor.relu, -2, 2),
  "gelu": (TF.gelu, Tensor.gelu, -3, 3),
  "gelu_tanh": (_t_gelu_tanh, lambda x: x.gelu(approximate="tanh"), -3, 3),
  "silu": (TF.silu, Tensor.silu, -3, 3),
  "sin": (torch.sin, Tensor.sin, -3, 3),
  "cos": (torch.cos, Tensor.cos, -3, 3),
  "erf": (torch.erf, Tensor.erf, -2, 2),
  "abs": (torch.abs, Tensor.abs, -2, 2),
  "square": (torch.square, Tensor.square, -2, 2),
  "clip": (lambda x: x.clamp(-0.5, 0.7), lambda x: x.clip(-0.5, 0.7), -2, 2),
  "clamp_lo": (lambda x: x.clamp(min=0.1), lambda x: x.clamp(lo=0.1), -2, 2),
}


class TestUnary:
  @pytest.mark.parametrize("name", list(UNARY_OPS))
  @pytest.mark.parametrize("shape", UNARY_SHAPES)
  def test_unary(self, name, shape, device):
    tf, mf, lo, hi = UNARY_OPS[name]
    helper_test_op([shape], tf, mf, low=lo, high=hi, device=device, atol=2e-6 if name == "erf" else 1e-5)

  @pytest.mark.parametrize("name", list(UNARY_OPS))
  def test_unary_noncontig(self, name, device):
    tf, mf, lo, hi = UNARY_OPS[name]
    helper_test_op([(3, 4)], tf, mf, low=lo, high=hi, noncontig=True, device=device)

  @pytest.mark.parametrize("name", ["sigmoid", "silu", "tanh", "gelu", "gelu_tanh", "exp", "relu"])
  def test_extreme_inputs(self, name, device):
    # far in the tails the value and the gradient stay finite and match torch (no inf * 0)
    tf, mf, _, _ = UNARY_OPS[name]
    vals = np.array([-100.0, -30.0, -12.0, 0.0, 12.0, 30.0, 80.0], np.float32)
    helper_test_op(None, tf, mf, vals=[vals], device=device, atol=1e-5, rtol=1e-4, grad_atol=1e-5)

  @pytest.mark.parametrize("name", ["sigmoid", "silu", "tanh"])
  def test_extreme_inputs_fp16(self, name, device):
    tf, mf, _, _ = UNARY_OPS[name]
    helper_test_op(None, tf, mf, vals=[np.array([-20.0, -12.0, -1.0, 0.0, 3.0, 12.0, 20.0], np.float16)], device=device,
                   atol=1e-3, rtol=1e-3, grad_atol=1e-3, grad_rtol=1e-2)

  def test_clip_at_bounds(self, device):
    # at x == lo or hi torch's clamp passes the whole gradient
    v = np.array([-0.5, 0.7, 0.0, -1.0, 2.0], np.float32)
    helper_test_op(None, lambda x: x.clamp(-0.5, 0.7), lambda x: x.clip(-0.5, 0.7), vals=[v], device=device)
    helper_test_op(None, lambda x: x.clamp(max=0.0), lambda x: x.clip(hi=0.0), vals=[v], device=device)
    helper_test_op(None, lambda x: x.clamp(-1, 1), lambda x: x.clip(-1, 1), vals=[np.array([-3, 0, 1, 5], np.int32)], device=device)

  def test_relu_abs_at_zero(self, device):
    # torch's relu and abs gradients at exactly 0 are 0
    helper_test_op(None, torch.relu, Tensor.relu, vals=[np.array([-1.0, 0.0, 2.0], np.float32)], device=device)
    helper_test_op(None, torch.abs, Tensor.abs, vals=[np.array([-1.0, 0.0, 2.0], np.float32)], device=device)
    helper_test_op(None, torch.abs, Tensor.abs, vals=[np.array([-1, 0, 2], np.int32)], device=device)

  def test_unary_on_int(self, device):
    a = np.array([1, 4, 9], np.int32)
    for f in [lambda x: x.exp(), lambda x: x.sqrt(), lambda x: x.log(), lambda x: x.sigmoid()]:
      helper_test_op(None, f, vals=[a], device=device)
    helper_test_op(None, torch.relu, Tensor.relu, vals=[np.array([-2, 0, 3], np.int64)], device=device)

  def test_bad_gelu_mode(self, device):
    with pytest.raises(ValueError, match="approximate"): Tensor([1.0], device=device).gelu("fast")


BINARY_SHAPES = [((2, 3), (2, 3)), ((2, 3), (3,)), ((3,), (2, 3)), ((2, 1, 4), (3, 1)), ((1,), (2, 3)), ((), (2, 3)),
                 ((2, 3), ()), ((0, 3), (1, 3)), ((2, 0), (2, 1)), ((4, 1), (1, 5))]


class TestBinary:
  @pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
  @pytest.mark.parametrize("shapes", BINARY_SHAPES)
  def test_arith(self, op, shapes, device):
    fn = {"add": lambda x, y: x + y, "sub": lambda x, y: x - y, "mul": lambda x, y: x * y, "div": lambda x, y: x / y}[op]
    if op == "div":   # keep the divisor away from zero
      helper_test_op(list(shapes), lambda x, y: x / (y.abs() + 0.5), device=device, grad_atol=1e-4, grad_rtol=1e-3)
    else:
      helper_test_op(list(shapes), fn, device=device)

  @pytest.mark.parametrize("op", ["add", "sub", "mul", "div", "maximum", "minimum", "pow"])
  def test_noncontig(self, op, device):
    fn = {"add": lambda x, y: x + y, "sub": lambda x, y: x - y, "mul": lambda x, y: x * y, "div": lambda x, y: x / (y.abs() + 0.5),
          "maximum": lambda x, y: x.maximum(y), "minimum": lambda x, y: x.minimum(y), "pow": lambda x, y: (x.abs() + 0.5) ** y}[op]
    helper_test_op([(3, 4), (3, 4)], fn, noncontig=True, device=device)
    helper_test_op([(3, 4), (4,)], fn, noncontig=True, device=device)

  def test_same_tensor_twice(self, device):
    helper_test_op([(3, 4)], lambda x: x * x + x / (x.abs() + 1) - x, device=device)

  @pytest.mark.parametrize("name,tf,mf", [
    ("radd", lambda x: 2 + x, None), ("rsub", lambda x: 2 - x, None), ("rmul", lambda x: 3.5 * x, None),
    ("rdiv", lambda x: 1 / (x.abs() + 0.5), None), ("sub_scalar", lambda x: x - 1.5, None), ("div_scalar", lambda x: x / 4, None),
    ("add_method", lambda x: x.add(2), None), ("mul_method", lambda x: x.mul(x), None), ("sub_method", lambda x: x.sub(1), None),
    ("div_method", lambda x: x.div(2.0), None), ("add_list", lambda x: x + torch.tensor([1.0, 2.0, 3.0]), lambda x: x + [1.0, 2.0, 3.0]),
  ])
  def test_scalar(self, name, tf, mf, device):
    helper_test_op([(2, 3)], tf, mf, device=device)

  @pytest.mark.parametrize("exponent", [0, 1, 2, 3, 0.5, -1, 1.5, -0.5])
  def test_pow_scalar(self, exponent, device):
    helper_test_op([(2, 3)], lambda x: x ** exponent, low=0.5, high=2, device=device)
    helper_test_op([(2, 3)], lambda x: x.pow(exponent), low=0.5, high=2, device=device)

  def test_pow_int_exponent_negative_base(self, device):
    helper_test_op([(2, 3)], lambda x: x ** 3, low=-2, high=2, device=device)
    helper_test_op([(2, 3)], lambda x: x ** 2, low=-2, high=2, device=device)

  def test_pow_tensor(self, device):
    helper_test_op([(2, 3), (2, 3)], lambda x, y: x ** y, low=0.5, high=2, device=device)
    helper_test_op([(2, 3), (3,)], lambda x, y: x.pow(y), low=0.5, high=2, device=device)

  def test_pow_zero_base(self, device):
    # torch's gradient w.r.t. the exponent is 0 where the base is 0 (not 0 * log(0) = nan)
    helper_test_op(None, lambda x, y: x ** y, vals=[np.array([0.0, 1.0, 2.0, 0.0], np.float32), np.array([2.0, 2.0, 0.5, 1.0], np.float32)], device=device)

  def test_rpow(self, device):
    helper_test_op([(2, 3)], lambda x: 2 ** x, device=device)
    helper_test_op([(2, 3)], lambda x: 0.5 ** x, device=device)

  @pytest.mark.parametrize("shapes", BINARY_SHAPES)
  @pytest.mark.parametrize("op", ["maximum", "minimum"])
  def test_maximum_minimum(self, op, shapes, device):
    helper_test_op(list(shapes), lambda x, y: getattr(x, op)(y), device=device)

  @pytest.mark.parametrize("op", ["maximum", "minimum"])
  def test_maximum_minimum_ties(self, op, device):
    # equal inputs: torch splits the gradient in half between the two
    a = np.array([1.0, 2.0, 3.0, -1.0], np.float32)
    b = np.array([1.0, 0.0, 3.0, 5.0], np.float32)
    helper_test_op(None, lambda x, y: getattr(x, op)(y), vals=[a, b], device=device)

  @pytest.mark.parametrize("op", ["maximum", "minimum"])
  def test_maximum_scalar(self, op, device):
    helper_test_op([(2, 3)], lambda x: getattr(x, op)(torch.tensor(0.5)) if isinstance(x, torch.Tensor) else getattr(x, op)(0.5), device=device)

  def test_where(self, device):
    rng = np.random.default_rng(1)
    for cs, xs, ys in [((2, 3), (2, 3), (2, 3)), ((2, 3), (3,), (2, 1)), ((3,), (2, 3), ()), ((4, 1), (1, 5), (4, 5)), ((0, 3), (3,), (1,))]:
      cond = rng.random(cs) > 0.5
      x, y = rng.standard_normal(xs).astype(np.float32), rng.standard_normal(ys).astype(np.float32)
      helper_test_op(None, lambda c, a, b: torch.where(c, a, b), lambda c, a, b: c.where(a, b), vals=[cond, x, y], device=device)

  def test_where_scalars(self, device):
    cond = np.array([[True, False, True], [False, False, True]])
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    helper_test_op(None, lambda c, a: torch.where(c, a, 0.0), lambda c, a: c.where(a, 0.0), vals=[cond, x], device=device)
    helper_test_op(None, lambda c, a: torch.where(c, -1.0, a), lambda c, a: c.where(-1.0, a), vals=[cond, x], device=device)
    helper_test_op(None, lambda c: torch.where(c, 2.0, 3.0), lambda c: c.where(2.0, 3.0), vals=[cond], device=device)
    # a non-bool condition counts non-zero as true
    helper_test_op(None, lambda c, a: torch.where(c != 0, a, 0.0), lambda c, a: c.where(a, 0.0), vals=[x - 2, x], device=device)

  def test_where_noncontig(self, device):
    helper_test_op([(3, 4), (3, 4), (3, 4)], lambda c, a, b: torch.where(c > 0, a, b), lambda c, a, b: (c > 0).where(a, b),
                   noncontig=True, device=device)

  @pytest.mark.parametrize("op", ["lt", "gt", "le", "ge", "eq", "ne"])
  def test_compare(self, op, device):
    fn = {"lt": lambda x, y: x < y, "gt": lambda x, y: x > y, "le": lambda x, y: x <= y, "ge": lambda x, y: x >= y,
          "eq": lambda x, y: x == y, "ne": lambda x, y: x != y}[op]
    a = np.array([[1.0, 2.0, 3.0], [-1.0, 0.0, 5.0]], np.float32)
    b = np.array([1.0, 3.0, 2.0], np.float32)
    helper_test_op(None, fn, vals=[a, b], device=device)
    helper_test_op(None, lambda x: fn(x, 2.0), vals=[a], device=device)
    helper_test_op(None, lambda x: fn(x, 2), vals=[a], device=device)
    helper_test_op(None, lambda x: fn(2.0, x), vals=[a], device=device)   # reflected: 2.0 < x is x > 2.0
    helper_test_op(None, fn, vals=[a.astype(np.int32), b.astype(np.int64)], device=device)
    helper_test_op(None, fn, vals=[a > 0, b > 1], device=device)
    helper_test_op([(0, 3), (3,)], fn, forward_only=True, device=device)
    helper_test_op([(3, 4), (3, 4)], fn, noncontig=True, forward_only=True, device=device)

  def test_compare_in_graph_has_no_grad(self, device):
    helper_test_op([(2, 3)], lambda x: x * (x > 0).float(), device=device)

  def test_logical_not(self, device):
    helper_test_op(None, torch.logical_not, Tensor.logical_not, vals=[np.array([True, False, True])], device=device)


# ---------------------------------------------------------------- reductions

REDUCE_AXES = [None, 0, -1, 1, (0, 2), (0, 1, 2), (-1, 0)]


def _amax(x, axis=None, keepdim=False):
  if axis is None: axis = tuple(range(x.ndim))
  return torch.amax(x, axis, keepdim)


def _amin(x, axis=None, keepdim=False):
  if axis is None: axis = tuple(range(x.ndim))
  return torch.amin(x, axis, keepdim)


def _tsum(x, axis=None, keepdim=False): return x.sum() if axis is None and not keepdim else x.sum(tuple(range(x.ndim)) if axis is None else axis, keepdim)
def _tmean(x, axis=None, keepdim=False): return x.mean() if axis is None and not keepdim else x.mean(tuple(range(x.ndim)) if axis is None else axis, keepdim)


class TestReduce:
  @pytest.mark.parametrize("name", ["sum", "mean", "max", "min"])
  @pytest.mark.parametrize("axis", REDUCE_AXES)
  @pytest.mark.parametrize("keepdim", [False, True])
  def test_reduce(self, name, axis, keepdim, device):
    tf = {"sum": _tsum, "mean": _tmean, "max": _amax, "min": _amin}[name]
    helper_test_op([(2, 3, 4)], lambda x: tf(x, axis, keepdim), lambda x: getattr(x, name)(axis, keepdim), device=device)

  @pytest.mark.parametrize("name", ["sum", "mean", "max", "min"])
  def test_reduce_shapes(self, name, device):
    tf = {"sum": _tsum, "mean": _tmean, "max": _amax, "min": _amin}[name]
    for shape, axis in [((), None), ((5,), 0), ((1,), None), ((3, 1), 1), ((1, 4), 0), ((2, 3, 4), (1,))]:
      helper_test_op([shape], lambda x: tf(x, axis), lambda x: getattr(x, name)(axis), device=device)
    helper_test_op([(3, 5)], lambda x: tf(x, 0), lambda x: getattr(x, name)(0), noncontig=True, device=device)
    helper_test_op([(3, 5)], lambda x: tf(x, 1, True), lambda x: getattr(x, name)(1, True), noncontig=True, device=device)

  @pytest.mark.parametrize("name", ["sum", "mean"])
  def test_reduce_empty(self, name, device):
    tf = {"sum": _tsum, "mean": _tmean}[name]
    for shape, axis in [((0,), None), ((0, 3), 0), ((0, 3), 1), ((2, 0), None), ((2, 0, 3), (0, 2))]:
      helper_test_op([shape], lambda x: tf(x, axis), lambda x: getattr(x, name)(axis), device=device)

  def test_max_ties_share_gradient(self, device):
    # torch.amax splits the gradient evenly between equal maxima; so does minift's max
    a = np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0], [-1.0, 0.0, -5.0]], np.float32)
    helper_test_op(None, lambda x: _amax(x, 1), lambda x: x.max(1), vals=[a], device=device)
    helper_test_op(None, lambda x: _amax(x), lambda x: x.max(), vals=[a], device=device)
    helper_test_op(None, lambda x: _amin(x, 0), lambda x: x.min(0), vals=[a], device=device)

  @pytest.mark.parametrize("name", ["var", "std"])
  @pytest.mark.parametrize("axis", [None, 0, -1, (0, 2)])
  @pytest.mark.parametrize("keepdim", [False, True])
  @pytest.mark.parametrize("correction", [1, 0])
  def test_var_std(self, name, axis, keepdim, correction, device):
    def tf(x):
      ax = tuple(range(x.ndim)) if axis is None else axis
      return getattr(torch, name)(x, ax, correction=correction, keepdim=keepdim)
    helper_test_op([(2, 3, 4)], tf, lambda x: getattr(x, name)(axis, keepdim, correction=correction), device=device)

  def test_var_edge(self, device):
    helper_test_op([(3, 1)], lambda x: x.var(1), lambda x: x.var(1), device=device, forward_only=True)   # n - 1 == 0: nan
    helper_test_op([(4, 5)], lambda x: x.std(0), lambda x: x.std(0), noncontig=True, device=device)

  @pytest.mark.parametrize("axis", [None, 0, 1, -1])
  @pytest.mark.parametrize("keepdim", [False, True])
  def test_argmax_argmin(self, axis, keepdim, device):
    rng = np.random.default_rng(0)
    for arr in [rng.standard_normal((3, 5)).astype(np.float32),
                np.array([[1, 3, 3, 0], [2, 2, 2, 2], [5, -1, 5, 4]], np.float32),   # ties: the first index wins
                rng.integers(-3, 3, (4, 3)).astype(np.int32)]:
      helper_test_op(None, lambda x: x.argmax(axis, keepdim) if axis is not None or not keepdim else x.argmax().reshape(1, 1),
                     lambda x: x.argmax(axis, keepdim), vals=[arr], device=device)
      helper_test_op(None, lambda x: x.argmin(axis, keepdim) if axis is not None or not keepdim else x.argmin().reshape(1, 1),
                     lambda x: x.argmin(axis, keepdim), vals=[arr], device=device)

  def test_argmax_3d_noncontig(self, device):
    helper_test_op([(2, 3, 4)], lambda x: x.argmax(1), device=device, noncontig=True)
    helper_test_op([(2, 3, 4)], lambda x: x.argmax(0, keepdim=True), device=device)

  def test_softmax_family(self, device):
    for shape, axis in [((2, 5), -1), ((2, 5), 0), ((2, 3, 4), 1), ((3, 1), -1), ((5,), 0), ((0, 4), -1)]:
      helper_test_op([shape], lambda x: x.softmax(axis), device=device)
      helper_test_op([shape], lambda x: x.log_softmax(axis), device=device)
    helper_test_op([(3, 4)], lambda x: x.softmax(-1), noncontig=True, device=device)
    helper_test_op([(3, 4)], lambda x: x.log_softmax(0), noncontig=True, device=device)
    helper_test_op([(3, 4)], lambda x: x.softmax(-1), low=50, high=90, device=device)   # large logits: no overflow

  @pytest.mark.parametrize("axis", [-1, 0, 1])
  @pytest.mark.parametrize("keepdim", [False, True])
  def test_logsumexp(self, axis, keepdim, device):
    helper_test_op([(2, 3, 4)], lambda x: torch.logsumexp(x, axis, keepdim), lambda x: x.logsumexp(axis, keepdim), device=device)
    helper_test_op([(3, 4)], lambda x: torch.logsumexp(x, -1, keepdim), lambda x: x.logsumexp(-1, keepdim), low=80, high=100, device=device)
    helper_test_op([(3, 4)], lambda x: torch.logsumexp(x, 0, keepdim), lambda x: x.logsumexp(0, keepdim), noncontig=True, device=device)


# ---------------------------------------------------------------- movement

def torch_index(x, idx):
  """NumPy-style basic indexing in torch (which has no negative-step slices): each slice
  becomes an index_select of the positions np.arange(n)[slice]."""
  idx = idx if isinstance(idx, tuple) else (idx,)
  consumed = sum(1 for i in idx if i is not None and i is not Ellipsis)
  if Ellipsis in idx:
    pos = idx.index(Ellipsis)
    idx = idx[:pos] + (slice(None),) * (x.ndim - consumed) + idx[pos + 1:]
  idx = idx + (slice(None),) * (x.ndim - consumed - (len(idx) - sum(1 for i in idx if i is None) - consumed))
  d = 0
  for i in idx:
    if i is None: x = x.unsqueeze(d); d += 1
    elif isinstance(i, int): x = x.select(d, i)
    else:
      x = x.index_select(d, torch.tensor(np.arange(x.shape[d])[i].copy(), dtype=torch.int64)); d += 1
  return x


GETITEM_CASES = [
  1, -1, (0, 1), (-1, -2, 2), slice(None), slice(1, None), slice(None, -1), slice(0, 0), slice(5, 10), slice(-10, 2),
  (slice(None), 2), (slice(None, None, 2), slice(1, None, 2)), (slice(None, None, -1),), (slice(None), slice(None, None, -2)),
  (slice(2, 0, -1), slice(-1, None, -3)), (slice(None, None, 3),), (None, 1), (1, None, slice(None, None, -1)),
  (Ellipsis, 0), (Ellipsis, None), (0, Ellipsis, slice(1, 3)), (None, Ellipsis, None), (slice(None), None, slice(None), -1),
  (slice(1, 2), slice(1, 2), slice(1, 2)), (-2, slice(None, 1, -1)), (), Ellipsis,
]


class TestMovement:
  @pytest.mark.parametrize("shape,new", [((2, 3), (3, 2)), ((2, 3), (6,)), ((2, 3), (-1,)), ((2, 3, 4), (4, -1)),
                                         ((6,), (1, 2, 1, 3, 1)), ((), (1, 1)), ((1,), ()), ((0, 3), (3, 0)), ((0, 3), (-1, 3)),
                                         ((2, 3, 4), (2, 12))])
  def test_reshape(self, shape, new, device):
    helper_test_op([shape], lambda x: x.reshape(new), device=device)
    helper_test_op([shape], lambda x: x.reshape(*new) if new else x.reshape(()), device=device)
    helper_test_op([shape], lambda x: x.view(new), device=device)

  def test_reshape_noncontig(self, device):
    # a transposed view cannot be merged by strides: minift must copy
    helper_test_op([(3, 4)], lambda x: x.reshape(12), noncontig=True, device=device)
    helper_test_op([(3, 4)], lambda x: x.reshape(2, 6) * 2, noncontig=True, device=device)
    helper_test_op([(2, 3, 4)], lambda x: x.reshape(6, 4).exp(), noncontig=True, device=device)

  @pytest.mark.parametrize("shape,order", [((2, 3), (1, 0)), ((2, 3, 4), (2, 0, 1)), ((2, 3, 4), (0, 2, 1)), ((2, 1, 3), (-1, 0, 1)),
                                           ((0, 2, 3), (1, 2, 0)), ((5,), (0,)), ((), ())])
  def test_permute(self, shape, order, device):
    helper_test_op([shape], lambda x: x.permute(order), device=device)
    if order: helper_test_op([shape], lambda x: x.permute(*order), device=device)
    if shape: helper_test_op([shape], lambda x: x.permute(order), noncontig=True, device=device)

  def test_transpose_T(self, device):
    helper_test_op([(2, 3, 4)], lambda x: x.transpose(0, 2), device=device)
    helper_test_op([(2, 3, 4)], lambda x: x.transpose(-1, 1), device=device)
    helper_test_op([(2, 3, 4)], lambda x: x.transpose(-2, -1), lambda x: x.transpose(), device=device)
    helper_test_op([(2, 3)], lambda x: x.T, device=device)
    helper_test_op([(3, 4)], lambda x: x.T @ x, noncontig=True, device=device)

  @pytest.mark.parametrize("shape,new", [((1,), (4,)), ((3, 1), (3, 5)), ((1, 3), (2, 4, 3)), ((3,), (2, 3)), ((2, 1, 1), (2, 3, 4)),
                                         ((3, 1), (-1, 2)), ((1, 1), (0, 2)), ((), (2, 2)), ((2, 3), (2, 3))])
  def test_expand(self, shape, new, device):
    helper_test_op([shape], lambda x: x.expand(new), device=device)
    helper_test_op([shape], lambda x: x.expand(*new), device=device)
    helper_test_op([shape], lambda x: x.broadcast_to(tuple(s if s != -1 else x.shape[i - len(new) + x.ndim] for i, s in enumerate(new))),
                   device=device)

  def test_expand_then_reduce(self, device):
    helper_test_op([(3, 1)], lambda x: x.expand(3, 4).sum(0), device=device)
    helper_test_op([(3, 1)], lambda x: (x.expand(3, 4) * x.expand(3, 4).T.T).mean(), device=device)

  @pytest.mark.parametrize("shape,pads", [((3,), ((1, 2),)), ((2, 3), ((0, 1), (2, 0))), ((2, 3), ((1, 1),)), ((2, 3, 4), ((1, 0), (0, 0), (2, 3))),
                                          ((0, 3), ((1, 1), (0, 0))), ((2, 0), ((0, 0), (1, 2))), ((), ()), ((1, 1), ((0, 0), (0, 0)))])
  @pytest.mark.parametrize("value", [0.0, 1.5, -2.0])
  def test_pad(self, shape, pads, value, device):
    tpad = [p for pair in reversed(pads) for p in pair]   # torch: last dim first
    helper_test_op([shape], lambda x: TF.pad(x, tpad, value=value), lambda x: x.pad(pads, value=value), device=device)

  def test_pad_noncontig_and_chain(self, device):
    helper_test_op([(3, 4)], lambda x: TF.pad(x, [1, 2, 0, 1]), lambda x: x.pad(((0, 1), (1, 2))), noncontig=True, device=device)
    helper_test_op([(3, 4)], lambda x: TF.pad(TF.pad(x, [1, 1]).exp(), [0, 0, 2, 0], value=3.0) * 2,
                   lambda x: x.pad(((0, 0), (1, 1))).exp().pad(((2, 0), (0, 0)), value=3.0) * 2, device=device)
    helper_test_op([(3, 4)], lambda x: TF.pad(x, [1, 1, 1, 1]).sum(0), lambda x: x.pad(((1, 1), (1, 1))).sum(0), device=device)

  def test_pad_int(self, device):
    a = np.arange(6, dtype=np.int32).reshape(2, 3)
    helper_test_op(None, lambda x: TF.pad(x, [1, 0], value=7), lambda x: x.pad(((0, 0), (1, 0)), value=7), vals=[a], device=device)

  def test_shrink(self, device):
    helper_test_op([(4, 5)], lambda x: x[1:3, 0:4], lambda x: x.shrink(((1, 3), (0, 4))), device=device)
    helper_test_op([(4, 5)], lambda x: x[:, 2:2], lambda x: x.shrink((None, (2, 2))), device=device)
    helper_test_op([(4, 5)], lambda x: x[1:3, 1:], lambda x: x.shrink(((1, 3), (1, 5))), noncontig=True, device=device)

  @pytest.mark.parametrize("idx", GETITEM_CASES, ids=[repr(i) for i in GETITEM_CASES])
  def test_getitem(self, idx, device):
    helper_test_op([(4, 3, 5)], lambda x: torch_index(x, idx), lambda x: x[idx], device=device)
    helper_test_op([(4, 3, 5)], lambda x: torch_index(x, idx), lambda x: x[idx], noncontig=True, device=device)

  def test_getitem_torch_agrees(self, device):
    # the torch_index reference itself agrees with torch's own indexing where torch has it
    x = torch.arange(60).reshape(4, 3, 5)
    for idx in [i for i in GETITEM_CASES if all(not isinstance(s, slice) or (s.step or 1) > 0 for s in (i if isinstance(i, tuple) else (i,)))]:
      assert torch.equal(torch_index(x, idx), x[idx]), idx

  def test_getitem_numpy_ints(self, device):
    helper_test_op([(4, 3)], lambda x: x[2, 1], lambda x: x[np.int64(2), np.int32(1)], device=device)

  def test_getitem_then_compute(self, device):
    helper_test_op([(6, 5)], lambda x: torch_index(x, (slice(None, None, -2), slice(1, None, 2))).exp().sum(0),
                   lambda x: x[::-2, 1::2].exp().sum(0), device=device)
    helper_test_op([(6, 5)], lambda x: x[1:4] * x[2:5], device=device)

  @pytest.mark.parametrize("shape,idx", [((5, 3), [0, 2, 2, 4]), ((5,), [1, 1, 0]), ((5, 2, 3), [[0, 1], [4, 4]]), ((4, 3), []),
                                         ((4, 3), [-1, 0, -4])])
  def test_getitem_int_tensor(self, shape, idx, device):
    idx = np.asarray(idx, dtype=np.int64).reshape(np.shape(idx))
    helper_test_op([shape], lambda x: x[torch.tensor(idx)], lambda x: x[Tensor(idx, device=device)], device=device)
    helper_test_op([shape], lambda x: x[torch.tensor(idx, dtype=torch.int32)], lambda x: x[Tensor(idx.astype(np.int32), device=device)], device=device)
    if idx.ndim == 1: helper_test_op([shape], lambda x: x[idx.tolist()], lambda x: x[idx.tolist()], device=device)
    helper_test_op([shape], lambda x: x[torch.tensor(idx)], lambda x: x[Tensor(idx, device=device)], noncontig=True, device=device)

  @pytest.mark.parametrize("shape,args", [((2, 3, 4), ()), ((2, 3, 4), (1,)), ((2, 3, 4), (0, 1)), ((2, 3, 4), (-2, -1)),
                                          ((2, 3, 4), (1, 1)), ((), ()), ((3,), ()), ((2, 0, 3), (1,))])
  def test_flatten(self, shape, args, device):
    helper_test_op([shape], lambda x: x.flatten(*args), device=device)

  def test_flatten_noncontig(self, device):
    helper_test_op([(3, 4)], lambda x: x.flatten(), noncontig=True, device=device)

  def test_unflatten(self, device):
    helper_test_op([(2, 12)], lambda x: x.unflatten(1, (3, 4)), device=device)
    helper_test_op([(2, 12)], lambda x: x.unflatten(-1, (2, 2, 3)), device=device)
    helper_test_op([(6, 2)], lambda x: x.unflatten(0, (3, 2)), noncontig=True, device=device)

  @pytest.mark.parametrize("shape,dim", [((1, 3, 1), None), ((1, 3, 1), 0), ((1, 3, 1), -1), ((1, 3, 1), 1), ((1,), None), ((), None),
                                         ((2, 1, 0), 1)])
  def test_squeeze(self, shape, dim, device):
    helper_test_op([shape], lambda x: x.squeeze() if dim is None else x.squeeze(dim), device=device)

  def test_squeeze_dims(self, device):
    helper_test_op([(1, 3, 1, 1)], lambda x: x.squeeze((0, 2)), device=device)
    helper_test_op([(1, 3, 1)], lambda x: x.squeeze((1, -1)), device=device)

  @pytest.mark.parametrize("shape,dim", [((3,), 0), ((3,), 1), ((3,), -1), ((2, 3), -2), ((2, 3), 1), ((), 0), ((0,), 0)])
  def test_unsqueeze(self, shape, dim, device):
    helper_test_op([shape], lambda x: x.unsqueeze(dim), device=device)

  @pytest.mark.parametrize("shapes,dim", [([(2, 3), (4, 3)], 0), ([(2, 3), (2, 1), (2, 4)], 1), ([(2, 3), (2, 3)], -1),
                                          ([(2, 3, 4), (2, 1, 4)], -2), ([(3,), (0,), (2,)], 0), ([(2, 0), (2, 3)], 1), ([(4,)], 0)])
  def test_cat(self, shapes, dim, device):
    helper_test_op(shapes, lambda *xs: torch.cat(xs, dim), lambda *xs: Tensor.cat(xs, dim), device=device)
    helper_test_op(shapes, lambda *xs: torch.cat(xs, dim), lambda *xs: Tensor.cat(list(xs), dim=dim), noncontig=True, device=device)

  def test_cat_same_tensor_and_dtypes(self, device):
    helper_test_op([(2, 3)], lambda x: torch.cat([x, x * 2, x], 0), lambda x: Tensor.cat([x, x * 2, x], 0), device=device)
    helper_test_op(None, lambda a, b: torch.cat([a, b], 0), lambda a, b: Tensor.cat([a, b], 0),
                   vals=[np.array([1, 2], np.int32), np.array([0.5], np.float32)], device=device)
    helper_test_op(None, lambda a, b: torch.cat([a, b], 0), lambda a, b: Tensor.cat([a, b], 0),
                   vals=[np.array([1, 2], np.int64), np.array([3], np.int64)], device=device)

  @pytest.mark.parametrize("shapes,dim", [([(2, 3), (2, 3)], 0), ([(2, 3), (2, 3), (2, 3)], 1), ([(2, 3), (2, 3)], -1),
                                          ([(3,), (3,)], 0), ([(), ()], 0), ([(2, 0)], 1)])
  def test_stack(self, shapes, dim, device):
    helper_test_op(shapes, lambda *xs: torch.stack(xs, dim), lambda *xs: Tensor.stack(xs, dim), device=device)
    helper_test_op(shapes, lambda *xs: torch.stack(xs, dim), lambda *xs: Tensor.stack(xs, dim), noncontig=True, device=device)

  @pytest.mark.parametrize("shape,sizes,dim", [((6, 3), 2, 0), ((6, 3), 4, 0), ((6, 3), [1, 2, 3], 0), ((2, 5), 2, 1), ((2, 5), [5], -1),
                                               ((2, 5), [0, 5], 1), ((2, 5), 10, 1), ((0, 3), 2, 0)])
  def test_split(self, shape, sizes, dim, device):
    helper_test_op([shape], lambda x: x.split(sizes, dim), device=device)
    helper_test_op([shape], lambda x: x.split(sizes, dim), noncontig=True, device=device)

  @pytest.mark.parametrize("shape,chunks,dim", [((6, 3), 3, 0), ((6, 3), 4, 0), ((5, 3), 2, 0), ((2, 7), 3, 1), ((2, 7), 7, -1),
                                                ((2, 3), 5, 1), ((3, 2), 1, 0)])
  def test_chunk(self, shape, chunks, dim, device):
    helper_test_op([shape], lambda x: x.chunk(chunks, dim), device=device)
    helper_test_op([shape], lambda x: torch.chunk(x, chunks, dim), lambda x: x.chunk(chunks, dim), noncontig=True, device=device)

  @pytest.mark.parametrize("shape,axes", [((3,), (0,)), ((2, 3, 4), (0,)), ((2, 3, 4), (1, 2)), ((2, 3, 4), (-1,)), ((2, 3, 4), (0, 1, 2)),
                                          ((0, 3), (0,)), ((1, 3), (0,))])
  def test_flip(self, shape, axes, device):
    helper_test_op([shape], lambda x: x.flip(axes), device=device)
    helper_test_op([shape], lambda x: torch.flip(x, axes), lambda x: x.flip(*axes), noncontig=True, device=device)

  def test_movement_chain(self, device):
    helper_test_op([(2, 3, 4)], lambda x: x.permute(2, 0, 1).flip(1).reshape(4, 6)[1:, ::2].expand(2, 3, 3).sum(0),
                   lambda x: x.permute(2, 0, 1).flip(1).reshape(4, 6)[1:, ::2].expand(2, 3, 3).sum(0), device=device)

  def test_size_helpers(self, device):
    x = Tensor.zeros(2, 3, 4, device=device)
    assert x.size() == (2, 3, 4) and x.size(-1) == 4 and x.numel() == 24 and len(x) == 2 and x.ndim == 3
    assert Tensor.zeros(0, 3).numel() == 0


# ---------------------------------------------------------------- matmul and nn ops

MATMUL_SHAPES = [((3,), (3,)), ((3,), (3, 4)), ((2, 3), (3,)), ((2, 3), (3, 4)), ((1, 3), (3, 1)), ((2, 2, 3), (3, 4)), ((3,), (2, 3, 4)),
                 ((2, 2, 3), (2, 3, 4)), ((2, 1, 2, 3), (3, 3, 4)), ((1, 2, 3), (4, 3, 5)), ((2, 3), (2, 1, 3, 2)), ((0, 3), (3, 4)),
                 ((2, 0), (0, 3)), ((2, 3), (3, 0)), ((5, 1), (1, 4))]


class TestMatmul:
  @pytest.mark.parametrize("shapes", MATMUL_SHAPES, ids=[str(s) for s in MATMUL_SHAPES])
  def test_matmul(self, shapes, device):
    helper_test_op(list(shapes), lambda x, y: x @ y, device=device, atol=1e-5, rtol=1e-4)
    helper_test_op(list(shapes), lambda x, y: x.matmul(y), device=device)

  @pytest.mark.parametrize("shapes", [((3, 4), (4, 5)), ((2, 3, 4), (2, 4, 5)), ((3, 4), (4,)), ((2, 3, 4), (4, 2))])
  def test_matmul_noncontig(self, shapes, device):
    helper_test_op(list(shapes), lambda x, y: x @ y, noncontig=True, device=device)

  def test_matmul_epilogue_and_reuse(self, device):
    helper_test_op([(4, 3), (3, 5), (5,)], lambda x, w, b: (x @ w + b).relu(), device=device)
    helper_test_op([(4, 3), (3, 4)], lambda x, w: (x @ w) @ (x @ w), device=device)
    helper_test_op([(4, 3)], lambda x: x @ x.T, device=device)
    helper_test_op([(4, 3), (3, 5)], lambda x, w: (x.exp() @ (w * 2)).softmax(-1), device=device)

  def test_matmul_int(self, device):
    a, b = np.arange(6, dtype=np.int32).reshape(2, 3), np.arange(12, dtype=np.int32).reshape(3, 4) - 4
    helper_test_op(None, lambda x, y: x @ y, vals=[a, b], device=device)

  def test_matmul_with_list(self, device):
    helper_test_op([(2, 3)], lambda x: x @ torch.ones(3, 2), lambda x: x @ np.ones((3, 2), np.float32), device=device)

  def test_dot(self, device):
    helper_test_op([(3,), (3,)], lambda x, y: x.dot(y), device=device)
    helper_test_op([(2, 3), (3, 2)], lambda x, y: torch.matmul(x, y), lambda x, y: x.dot(y), device=device)

  @pytest.mark.parametrize("bias", [True, False])
  def test_linear(self, bias, device):
    shapes = [(2, 3, 4), (5, 4)] + ([(5,)] if bias else [])
    helper_test_op(shapes, lambda x, w, *b: TF.linear(x, w, *b), lambda x, w, *b: x.linear(w, *b), device=device)
    helper_test_op(shapes, lambda x, w, *b: TF.linear(x, w, *b), lambda x, w, *b: x.linear(w, *b), noncontig=True, device=device)


class TestNN:
  @pytest.mark.parametrize("shape", [(2, 5), (2, 3, 8), (1, 1), (4, 1)])
  @pytest.mark.parametrize("affine", [True, False])
  def test_layernorm(self, shape, affine, device):
    c = shape[-1]
    if affine:
      helper_test_op([shape, (c,), (c,)], lambda x, w, b: TF.layer_norm(x, (c,), w, b), lambda x, w, b: x.layernorm(w, b), device=device)
      helper_test_op([shape, (c,)], lambda x, w: TF.layer_norm(x, (c,), w), lambda x, w: x.layernorm(w), device=device)
    else:
      helper_test_op([shape], lambda x: TF.layer_norm(x, (c,)), lambda x: x.layernorm(), device=device)
    helper_test_op([shape], lambda x: TF.layer_norm(x, (c,), eps=1e-2), lambda x: x.layernorm(eps=1e-2), device=device)

  def test_layernorm_noncontig_axis(self, device):
    helper_test_op([(3, 6), (6,), (6,)], lambda x, w, b: TF.layer_norm(x, (6,), w, b), lambda x, w, b: x.layernorm(w, b), noncontig=True, device=device)
    # axis=0: normalise columns
    helper_test_op([(5, 3)], lambda x: TF.layer_norm(x.T, (5,)).T, lambda x: x.layernorm(axis=0), device=device)
    helper_test_op([(4, 8)], lambda x: TF.layer_norm(x, (8,)), lambda x: x.layernorm(), low=100, high=101, device=device, atol=1e-3, rtol=1e-3,
                   grad_atol=5e-2, grad_rtol=1e-2)   # large offset: the mean is subtracted first

  @pytest.mark.parametrize("shape", [(2, 5), (2, 3, 8), (1, 1)])
  def test_rmsnorm(self, shape, device):
    c = shape[-1]
    helper_test_op([shape, (c,)], lambda x, w: TF.rms_norm(x, (c,), w, eps=1e-6), lambda x, w: x.rmsnorm(w), device=device)
    helper_test_op([shape], lambda x: TF.rms_norm(x, (c,), eps=1e-6), lambda x: x.rmsnorm(), device=device)
    helper_test_op([shape], lambda x: TF.rms_norm(x, (c,), eps=0.1), lambda x: x.rmsnorm(eps=0.1), noncontig=True, device=device)

  @pytest.mark.parametrize("idx", [[0, 2, 2, 4, 0], [[1, 1], [3, 0]], [3], [[[0]]]])
  @pytest.mark.parametrize("idx_dtype", [np.int64, np.int32])
  def test_embedding(self, idx, idx_dtype, device):
    idx = np.array(idx, dtype=idx_dtype)
    helper_test_op(None, lambda t, i: TF.embedding(i, t), lambda t, i: t.embedding(i), vals=[np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32), idx],
                   device=device)

  def test_embedding_noncontig_and_repeat_grad(self, device):
    idx = np.array([[1, 1, 1], [0, 1, 4]], np.int64)
    helper_test_op([(5, 4)], lambda t: TF.embedding(torch.tensor(idx), t) * 3, lambda t: t.embedding(Tensor(idx, device=device)) * 3,
                   noncontig=True, device=device)
    # an index array from numpy / list
    helper_test_op([(5, 2)], lambda t: TF.embedding(torch.tensor(idx), t), lambda t: t.embedding(idx), device=device)
    helper_test_op([(5, 2)], lambda t: TF.embedding(torch.tensor([4, 4]), t), lambda t: t.embedding([4, 4]), device=device)

  @pytest.mark.parametrize("head", ["linear_cross_entropy", "two_lookups", "transposed"])
  def test_tied_table_grad_scatters_onto_the_other_grad(self, head, device):
    """A table used as an embedding and again (a tied LM head): its gradient is the lookup's
    rows scatter-added onto the other use's gradient, one SCATTER_ADD kernel with no zeroed
    table and no ADD of two tables, where that gradient is a whole buffer. Through a matmul
    with table.T the other gradient is a permuted view, and the ADD stays."""
    from minift.lazy import Op
    rng = np.random.default_rng(0)
    table, h = rng.standard_normal((11, 6)).astype(np.float32), rng.standard_normal((3, 6)).astype(np.float32)
    idx, idx2, target = np.array([[2, 7, 2, 10], [0, 2, 7, 7]]), np.array([1, 2, 2]), np.array([4, 2, 9])
    def loss(t, hh, lib):
      emb = (lambda i: TF.embedding(torch.tensor(i), t)) if lib is torch else t.embedding
      rows = emb(idx).sum(1).square().sum()
      if head == "linear_cross_entropy":
        if lib is torch: return rows + TF.cross_entropy(hh @ t.T, torch.tensor(target))
        return rows + hh.linear_cross_entropy(t, Tensor(target, device=device), chunk_rows=2)
      if head == "two_lookups": return rows + emb(idx2).square().sum()
      return rows + (hh @ t.T).square().sum()
    tt = torch.tensor(table, requires_grad=True)
    loss(tt, torch.tensor(h), torch).backward()
    mt = Tensor(table, requires_grad=True, device=device)
    loss(mt, Tensor(h, device=device), minift).backward()
    grad = mt.grad.lazydata
    if head == "transposed": assert grad.base.op is Op.ADD
    else: assert grad.base.op is Op.SCATTER_ADD and len(grad.base.srcs) == 3
    np.testing.assert_allclose(mt.grad.numpy(), tt.grad.numpy(), atol=1e-5, rtol=1e-5)

  @pytest.mark.parametrize("head", ["linear_cross_entropy", "two_lookups"])
  def test_tied_table_grad_in_a_jitted_step_scatters_in_place(self, head, device):
    """Under jit, a scatter-add onto a gradient that nothing after it reads writes into that
    gradient's buffer (jit._donated) instead of a copy; each replayed step still equals torch."""
    rng = np.random.default_rng(1)
    table = rng.standard_normal((11, 6)).astype(np.float32)
    idx, idx2, target = np.array([[2, 7, 2, 10], [0, 2, 7, 7]]), np.array([1, 2, 2]), np.array([4, 2, 9])
    def loss(t, hh, lib):
      emb = (lambda i: TF.embedding(torch.tensor(i), t)) if lib is torch else t.embedding
      rows = emb(idx).sum(1).square().sum()
      if head == "two_lookups": return rows + (emb(idx2) * hh).sum()
      if lib is torch: return rows + TF.cross_entropy(hh @ t.T, torch.tensor(target))
      return rows + hh.linear_cross_entropy(t, Tensor(target, device=device), chunk_rows=2)
    mt = Tensor(table, requires_grad=True, device=device)
    def step(hh):
      mt.grad = None
      loss(mt, hh, minift).backward()
      return mt.grad
    jitted = minift.jit(step)
    for call in range(4):   # a plain call, the capture, two replays
      h = rng.standard_normal((3, 6)).astype(np.float32)
      tt = torch.tensor(table, requires_grad=True)
      loss(tt, torch.tensor(h), torch).backward()
      np.testing.assert_allclose(jitted(Tensor(h, device=device)).numpy(), tt.grad.numpy(), atol=1e-5, rtol=1e-5)
    assert len(jitted.recording.donated) == 1

  def test_scatter_onto_a_returned_buffer_is_not_done_in_place(self, device):
    """The third operand of a scatter-add that the step returns (or a later kernel reads) keeps
    its values: the scatter writes a copy of it."""
    from minift.lazy import Op
    rng = np.random.default_rng(2)
    idx = Tensor(np.array([3, 0, 3]), device=device)
    def step(w, g, keep):
      onto = (w * 2).contiguous()
      rows = g.lazydata.own_kernel(Op.SCATTER_ADD, (g.lazydata, idx.lazydata), 4, (4, 5))
      total = Tensor(rows.alu(Op.ADD, onto.lazydata))
      assert total.lazydata.base.op is Op.SCATTER_ADD and len(total.lazydata.base.srcs) == 3
      return (total, onto) if keep == "returned" else (total, onto * 3) if keep == "read_later" else (total,)
    for keep in ("returned", "read_later", "dead"):
      jitted = minift.jit(step)
      for call in range(4):
        w, g = rng.standard_normal((4, 5)).astype(np.float32), rng.standard_normal((3, 5)).astype(np.float32)
        out = jitted(Tensor(w, device=device), Tensor(g, device=device), keep)
        want = 2 * w
        np.add.at(want, [3, 0, 3], g)
        np.testing.assert_allclose(out[0].numpy(), want, atol=1e-6)
        if keep == "returned": np.testing.assert_allclose(out[1].numpy(), 2 * w, atol=1e-6)
        if keep == "read_later": np.testing.assert_allclose(out[1].numpy(), 6 * w, atol=1e-6)
      if keep != "read_later":   # (read later: donated only where the scatter happens to run after that read)
        assert bool(jitted.recording.donated) == (keep == "dead"), keep

  @pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
  @pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
  @pytest.mark.parametrize("ignore", [False, True])
  def test_cross_entropy(self, reduction, label_smoothing, ignore, device):
    rng = np.random.default_rng(0)
    for shape in [(6, 5), (2, 3, 4), (1, 1)]:
      logits = rng.standard_normal(shape).astype(np.float32) * 2
      target = rng.integers(0, shape[-1], shape[:-1]).astype(np.int64)
      if ignore and target.size > 1: target.reshape(-1)[::3] = -100
      def tf(x, t):
        out = TF.cross_entropy(x.reshape(-1, shape[-1]), t.reshape(-1), reduction=reduction, label_smoothing=label_smoothing)
        return out.reshape(t.shape) if reduction == "none" else out
      helper_test_op(None, tf, lambda x, t: x.cross_entropy(t, reduction=reduction, label_smoothing=label_smoothing), vals=[logits, target], device=device)

  def test_cross_entropy_ignore_index_and_noncontig(self, device):
    logits = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    target = np.array([0, 3, 3, 1, 2], np.int64)
    helper_test_op(None, lambda x, t: TF.cross_entropy(x, t, ignore_index=3), lambda x, t: x.cross_entropy(t, ignore_index=3), vals=[logits, target], device=device)
    helper_test_op(None, lambda x, t: TF.cross_entropy(x, t.long()), lambda x, t: x.cross_entropy(t), vals=[logits, target.astype(np.int32)], device=device)
    helper_test_op(None, lambda x, t: TF.cross_entropy(x, t), lambda x, t: x.cross_entropy(t), vals=[logits, target], noncontig=True, device=device)
    helper_test_op(None, lambda x: TF.cross_entropy(x, torch.tensor(target)), lambda x: x.cross_entropy(target.tolist()), vals=[logits], device=device)
    # large logits stay finite
    helper_test_op(None, lambda x, t: TF.cross_entropy(x * 100, t), lambda x, t: x.mul(100).cross_entropy(t), vals=[logits, target], device=device,
                   atol=1e-3, rtol=1e-4)

  @pytest.mark.parametrize("hshape,vocab,chunk_rows", [((8, 6), 7, 3), ((2, 5, 4), 11, 4), ((4, 3), 5, 1024), ((7, 4), 3, 2)])
  @pytest.mark.parametrize("ignore", [False, True])
  def test_linear_cross_entropy(self, hshape, vocab, chunk_rows, ignore, device):
    rng = np.random.default_rng(2)
    h = rng.standard_normal(hshape).astype(np.float32)
    w = (rng.standard_normal((vocab, hshape[-1])) * 0.5).astype(np.float32)
    t = rng.integers(0, vocab, hshape[:-1]).astype(np.int64)
    if ignore: t.reshape(-1)[1::3] = -100
    helper_test_op(None, lambda h, w, t: TF.cross_entropy((h @ w.T).reshape(-1, vocab), t.reshape(-1)),
                   lambda h, w, t: h.linear_cross_entropy(w, t, chunk_rows=chunk_rows), vals=[h, w, t], device=device)
    # targets as numpy, and a non-contiguous hidden/weight
    helper_test_op(None, lambda h, w: TF.cross_entropy((h @ w.T).reshape(-1, vocab), torch.tensor(t).reshape(-1)),
                   lambda h, w: h.linear_cross_entropy(w, t, chunk_rows=chunk_rows), vals=[h, w], noncontig=True, device=device)

  def test_linear_cross_entropy_frozen_weight_and_no_grad(self, device):
    rng = np.random.default_rng(3)
    h, w = rng.standard_normal((6, 4)).astype(np.float32), rng.standard_normal((9, 4)).astype(np.float32)
    t = rng.integers(0, 9, 6)
    th = torch.tensor(h, requires_grad=True)
    TF.cross_entropy(th @ torch.tensor(w).T, torch.tensor(t)).backward()
    mh, mw = Tensor(h, requires_grad=True, device=device), Tensor(w, device=device)   # weight frozen
    loss = mh.linear_cross_entropy(mw, Tensor(t, device=device), chunk_rows=4)
    loss.backward()
    np.testing.assert_allclose(mh.grad.numpy(), th.grad.numpy(), atol=1e-5, rtol=1e-4)
    assert mw.grad is None
    with minift.no_grad():
      l2 = Tensor(h, requires_grad=True, device=device).linear_cross_entropy(mw, t, chunk_rows=4)
    assert not l2.requires_grad
    np.testing.assert_allclose(l2.item(), loss.item(), rtol=1e-6)

  def test_linear_cross_entropy_scaled_loss(self, device):
    # the stored gradients are scaled by the upstream gradient (loss * 3 + other terms)
    rng = np.random.default_rng(4)
    h, w = rng.standard_normal((5, 4)).astype(np.float32), rng.standard_normal((6, 4)).astype(np.float32)
    t = rng.integers(0, 6, 5)
    helper_test_op(None, lambda h, w: TF.cross_entropy(h @ w.T, torch.tensor(t)) * 3 + (h * h).sum(),
                   lambda h, w: h.linear_cross_entropy(w, t, chunk_rows=2) * 3 + (h * h).sum(), vals=[h, w], device=device)


# ---------------------------------------------------------------- dropout

class TestDropout:
  @pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
  def test_dropout_train(self, p, device):
    Tensor.training = True
    Tensor.manual_seed(7)
    xv = np.random.default_rng(0).uniform(0.5, 1.5, (100, 200)).astype(np.float32)
    x = Tensor(xv, requires_grad=True, device=device)
    y = x.dropout(p)
    w = np.random.default_rng(1).standard_normal(xv.shape).astype(np.float32)
    (y * Tensor(w, device=device)).sum().backward()
    yv = y.numpy()
    keep = yv != 0
    assert abs((~keep).mean() - p) < 0.015, f"dropped {(~keep).mean():.3f}, expected {p}"
    np.testing.assert_allclose(yv[keep], xv[keep] / (1 - p), rtol=1e-6)
    np.testing.assert_allclose(x.grad.numpy(), w * keep / (1 - p), rtol=1e-6, atol=1e-7)
    # mean is preserved in expectation
    assert abs(yv.mean() / xv.mean() - 1) < 0.03

  def test_dropout_reproducible_and_fresh(self, device):
    Tensor.training = True
    x = Tensor.ones(50, 50, device=device)
    Tensor.manual_seed(11)
    a, b = x.dropout(0.5).numpy(), x.dropout(0.5).numpy()
    Tensor.manual_seed(11)
    np.testing.assert_array_equal(x.dropout(0.5).numpy(), a)
    assert not np.array_equal(a, b), "two dropout calls must draw different masks"

  def test_dropout_identity(self, device):
    xv = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    Tensor.training = True
    helper_test_op(None, lambda x: TF.dropout(x, 0.0), lambda x: x.dropout(0.0), vals=[xv], device=device)
    Tensor.training = False
    helper_test_op(None, lambda x: TF.dropout(x, 0.5, training=False), lambda x: x.dropout(0.5), vals=[xv], device=device)

  def test_dropout_bad_p(self, device):
    with pytest.raises(ValueError, match="dropout probability"): Tensor([1.0], device=device).dropout(1.0)


# ---------------------------------------------------------------- attention

def torch_attention(q, k, v, causal=False, window=None, mask=None, scale=None):
  """softmax(q k^T * scale + mask) v by hand, with the kv heads repeated for grouped queries
  and the causal mask aligned bottom-right (the last query sees every key)."""
  hq, hkv = q.shape[1], k.shape[1]
  k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
  t, s = q.shape[2], k.shape[2]
  scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
  scores = (q @ k.transpose(-1, -2)) * scale
  qi, kj = torch.arange(s - t, s).reshape(t, 1), torch.arange(s).reshape(1, s)
  allowed = torch.ones(t, s, dtype=torch.bool)
  if causal: allowed &= kj <= qi
  if window is not None: allowed &= kj > qi - window
  scores = scores.masked_fill(~allowed, -math.inf)
  if mask is not None: scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask
  return scores.softmax(-1) @ v


class TestAttention:
  @pytest.mark.parametrize("b,hq,hkv,t,s,d", [(2, 2, 2, 5, 5, 4), (1, 4, 2, 6, 6, 8), (2, 2, 1, 3, 7, 4), (1, 3, 3, 1, 4, 2), (1, 6, 2, 4, 4, 3)])
  @pytest.mark.parametrize("causal,window", [(False, None), (True, None), (True, 2), (False, 3)])
  def test_sdpa(self, b, hq, hkv, t, s, d, causal, window, device):
    helper_test_op([(b, hq, t, d), (b, hkv, s, d), (b, hkv, s, d)], lambda q, k, v: torch_attention(q, k, v, causal, window),
                   lambda q, k, v: q.scaled_dot_product_attention(k, v, is_causal=causal, window=window), device=device)

  @pytest.mark.parametrize("block", [2, 3])
  @pytest.mark.parametrize("window", [None, 3])
  def test_sdpa_causal_in_query_blocks(self, block, window, device, monkeypatch):
    # a long causal attention runs per block of queries against only the keys they see
    import minift.tensor
    monkeypatch.setattr(minift.tensor, "ATTENTION_BLOCK", block)
    helper_test_op([(2, 4, 7, 4), (2, 2, 7, 4), (2, 2, 7, 4)], lambda q, k, v: torch_attention(q, k, v, True, window),
                   lambda q, k, v: q.scaled_dot_product_attention(k, v, is_causal=True, window=window), device=device)

  @pytest.mark.parametrize("causal", [False, True])
  @pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2)])
  def test_sdpa_vs_torch_builtin(self, causal, hq, hkv, device):
    # torch's own kernel (square T == S, where its top-left causal alignment equals ours)
    helper_test_op([(2, hq, 5, 4), (2, hkv, 5, 4), (2, hkv, 5, 4)],
                   lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True),
                   lambda q, k, v: q.scaled_dot_product_attention(k, v, is_causal=causal), device=device)

  def test_sdpa_scale_masks_noncontig(self, device):
    shapes = [(1, 4, 3, 4), (1, 2, 3, 4), (1, 2, 3, 4)]
    helper_test_op(shapes, lambda q, k, v: torch_attention(q, k, v, scale=0.3), lambda q, k, v: q.scaled_dot_product_attention(k, v, scale=0.3), device=device)
    helper_test_op(shapes, lambda q, k, v: torch_attention(q, k, v, True), lambda q, k, v: q.scaled_dot_product_attention(k, v, is_causal=True),
                   noncontig=True, device=device)
    bmask = np.array([[True, False, True], [True, True, False], [False, True, True]])
    helper_test_op(shapes, lambda q, k, v: torch_attention(q, k, v, mask=torch.tensor(bmask)),
                   lambda q, k, v: q.scaled_dot_product_attention(k, v, attn_mask=Tensor(bmask, device=device)), device=device)
    fmask = np.random.default_rng(0).standard_normal((1, 1, 3, 3)).astype(np.float32)
    helper_test_op(shapes, lambda q, k, v: torch_attention(q, k, v, mask=torch.tensor(fmask)),
                   lambda q, k, v: q.scaled_dot_product_attention(k, v, attn_mask=Tensor(fmask, device=device)), device=device)
    hmask = np.random.default_rng(1).random((1, 4, 3, 3)) > 0.3
    hmask[..., 0] = True   # every row keeps a key
    helper_test_op(shapes, lambda q, k, v: torch_attention(q, k, v, mask=torch.tensor(hmask)),
                   lambda q, k, v: q.scaled_dot_product_attention(k, v, attn_mask=Tensor(hmask, device=device)), device=device)


  # The NumPy backend runs attention as one ATTENTION kernel and its gradients as one
  # ATTENTION_BACKWARD kernel (kernels/attention.c's C loops, or NumPy without a compiler). The shapes cross
  # the 32-query blocks and 64-key tiles of the C loops and NumPy's 128-query blocks, and have
  # head sizes that are not whole 16-float vectors, fewer queries than keys, one query.
  @pytest.mark.parametrize("cloops", ["1", "0"])
  @pytest.mark.parametrize("b,hq,hkv,t,s,d,dv", [(1, 9, 3, 70, 70, 64, 64), (2, 4, 1, 37, 37, 256, 256), (2, 6, 2, 5, 70, 24, 8),
                                                 (1, 2, 2, 1, 50, 16, 16), (1, 3, 1, 33, 33, 80, 80), (1, 1, 1, 3, 3, 1, 1),
                                                 (1, 2, 1, 150, 150, 16, 16)])
  @pytest.mark.parametrize("causal,window", [(False, None), (True, None), (True, 5), (False, 7)])
  def test_sdpa_as_attention_kernels(self, b, hq, hkv, t, s, d, dv, causal, window, cloops, monkeypatch):
    from minift.lazy import Op
    monkeypatch.setenv("MINIFT_CLOOPS", cloops)
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(shape).astype(np.float32) for shape in [(b, hq, t, d), (b, hkv, s, d), (b, hkv, s, dv), (b, hq, t, dv)]]
    q, k, v = (Tensor(x, requires_grad=True) for x in arrays[:3])
    out = q.scaled_dot_product_attention(k, v, is_causal=causal, window=window)
    assert out.lazydata.base.op is Op.ATTENTION
    out.backward(Tensor(arrays[3]))
    assert q.grad.lazydata.base.op is Op.ATTENTION_BACKWARD
    tq, tk, tv = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in arrays[:3])
    want = torch_attention(tq, tk, tv, causal, window)
    want.backward(torch.tensor(arrays[3], dtype=torch.float64))
    np.testing.assert_allclose(out.numpy(), want.detach().numpy(), atol=2e-6, rtol=1e-5)
    for mine, theirs in zip((q, k, v), (tq, tk, tv)):
      np.testing.assert_allclose(mine.grad.numpy(), theirs.grad.numpy(), atol=2e-5, rtol=1e-4)

  def test_sdpa_attention_kernels_in_parts_give_the_same_bits(self, monkeypatch):
    # 2 x 6 heads of 256 queries: the C loops are cut into parts (one per thread); a block of
    # queries (forward) or a (batch, kv head) pair (backward) is computed the same way in
    # whichever part it falls
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal(shape).astype(np.float32) for shape in [(2, 6, 256, 32), (2, 2, 256, 32), (2, 2, 256, 32), (2, 6, 256, 32)]]
    results = []
    for threads in ("1", "3"):
      monkeypatch.setenv("MINIFT_THREADS", threads)
      q, k, v = (Tensor(x, requires_grad=True) for x in arrays[:3])
      out = q.scaled_dot_product_attention(k, v, is_causal=True)
      out.backward(Tensor(arrays[3]))
      results.append([out.numpy(), q.grad.numpy(), k.grad.numpy(), v.grad.numpy()])
    for one, three in zip(*results): np.testing.assert_array_equal(one, three)


# ---------------------------------------------------------------- tensor plumbing and autograd

class TestPlumbing:
  def test_contiguous_detach_realize(self, device):
    helper_test_op([(3, 4)], lambda x: x.T.contiguous() * 2, device=device)
    helper_test_op([(3, 4)], lambda x: x * x.detach(), device=device)
    x = Tensor(np.arange(6, dtype=np.float32).reshape(2, 3), requires_grad=True, device=device)
    y = (x * 2).realize()
    assert y.lazydata.base.realized and y.requires_grad
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.full((2, 3), 2.0))
    d = x.detach()
    assert not d.requires_grad and d._ctx is None
    np.testing.assert_array_equal(d.numpy(), x.numpy())

  def test_realize_all(self, device):
    a, b = Tensor([1.0, 2.0], device=device) * 2, Tensor([3.0], device=device).exp()
    ra, rb = Tensor.realize_all(a, b)
    assert ra is a and rb is b and a.lazydata.base.realized and b.lazydata.base.realized
    np.testing.assert_allclose(b.numpy(), np.exp([3.0]), rtol=1e-6)

  def test_to_device(self, device):
    # .to() is differentiable, as in torch: the gradient comes back to the source device
    xv = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    w = np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)
    for other in minift.available_devices():
      x = Tensor(xv, requires_grad=True, device=device)
      y = x.T.to(other)
      assert y.device == other and y.requires_grad and (x.to(device) is x)
      np.testing.assert_array_equal(y.numpy(), xv.T)
      (y * Tensor(w.T, device=other)).sum().backward()
      assert x.grad.device == device
      np.testing.assert_allclose(x.grad.numpy(), w, rtol=1e-6)
    assert not Tensor([1, 2], device=device).to("numpy").requires_grad

  def test_numpy_item_tolist(self, device):
    x = Tensor(np.arange(6, dtype=np.float32).reshape(2, 3), device=device)
    out = x.T.numpy()
    assert out.shape == (3, 2) and out.dtype == np.float32
    np.testing.assert_array_equal(out, np.arange(6).reshape(2, 3).T)
    out[0, 0] = 99   # numpy() returns a copy the caller may write
    assert x.numpy()[0, 0] == 0
    assert x[1, 2].item() == 5.0 and isinstance(x[1, 2].item(), float)
    assert Tensor([3], device=device).item() == 3 and isinstance(Tensor([3], device=device).item(), int)
    assert Tensor(True, device=device).item() is True
    assert x.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert float(x.sum()) == 15.0 and int(x.max()) == 5 and bool(x.max() > 4)
    assert Tensor.zeros(0, 2, device=device).numpy().shape == (0, 2)

  def test_no_grad(self, device):
    x = Tensor(np.ones((2, 2), np.float32), requires_grad=True, device=device)
    with minift.no_grad():
      y = (x * 2).exp().sum()
    assert not y.requires_grad and y._ctx is None
    with pytest.raises(RuntimeError, match="does not require grad"): y.backward()
    assert x.grad is None
    assert not Tensor.no_grad   # restored on exit

    @minift.no_grad()
    def f(t): return t * 3
    assert not f(x).requires_grad
    assert (x * 3).requires_grad

  def test_requires_grad_propagation(self, device):
    a = Tensor([1.0, 2.0], device=device)
    b = Tensor([3.0, 4.0], requires_grad=True, device=device)
    assert not (a * 2).requires_grad and (a * b).requires_grad
    assert not (b > 2).requires_grad and not b.argmax().requires_grad
    (a * b).sum().backward()
    assert a.grad is None
    np.testing.assert_array_equal(b.grad.numpy(), [1.0, 2.0])
    c = Tensor([1.0], device=device).requires_grad_()
    assert c.requires_grad

  def test_backward_accumulates(self, device):
    xv = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    tx, mx = torch.tensor(xv, requires_grad=True), Tensor(xv, requires_grad=True, device=device)
    for f in [lambda x: (x * x).sum(), lambda x: x.exp().mean()]:
      f(tx).backward()
      f(mx).backward()
      np.testing.assert_allclose(mx.grad.numpy(), tx.grad.numpy(), atol=1e-5, rtol=1e-5)

  def test_backward_through_freed_graph_raises(self, device):
    # torch refuses a second backward through a freed graph; silently skipping it loses gradients
    x = Tensor([1.0, 2.0], requires_grad=True, device=device)
    y = (x * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="freed"): y.backward()
    trunk = x.exp()
    trunk.sum().backward()
    with pytest.raises(RuntimeError, match="freed"): (trunk * 2).sum().backward()
    # the supported way: build the graph again, or sum the losses first
    x2, t2 = Tensor([1.0, 2.0], requires_grad=True, device=device), torch.tensor([1.0, 2.0], requires_grad=True)
    for x_ in (x2, t2):
      tr = x_.exp()
      (tr.sum() + (tr * 2).sum()).backward()
    np.testing.assert_allclose(x2.grad.numpy(), t2.grad.numpy(), rtol=1e-6)

  def test_backward_with_gradient(self, device):
    xv = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    gv = np.random.default_rng(1).standard_normal((3,)).astype(np.float32)
    tx, mx = torch.tensor(xv, requires_grad=True), Tensor(xv, requires_grad=True, device=device)
    (tx * 2).sum(1).backward(torch.tensor(gv))
    (mx * 2).sum(1).backward(Tensor(gv, device=device))
    np.testing.assert_allclose(mx.grad.numpy(), tx.grad.numpy(), rtol=1e-6)
    my = Tensor(xv, requires_grad=True, device=device)
    my.sum(1).backward(gv)   # numpy gradient works too
    np.testing.assert_allclose(my.grad.numpy(), np.broadcast_to(gv[:, None], (3, 4)))

  def test_diamond_graph(self, device):
    # one input used along several paths: the gradients add
    helper_test_op([(3,)], lambda x: (x.exp() * x.sin() + x.tanh() / (x * x + 1)).sum() * x, device=device)

  def test_repr(self, device):
    assert "shape=(2, 3)" in repr(Tensor.zeros(2, 3, device=device)) and "float32" in repr(Tensor.zeros(2, 3, device=device))
