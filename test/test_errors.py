"""Bad input raises a clear error at the call that made it, and the message names the shapes,
dims or values involved (so the user can find the bug without reading minift)."""
import re
import numpy as np
import pytest
from minift import Tensor, dtypes


def T(*shape, device="numpy", **kw): return Tensor(np.ones(shape, np.float32), device=device, **kw)


def esc(s): return re.escape(s)


class TestShapes:
  def test_binary_broadcast(self, device):
    with pytest.raises(ValueError, match=esc("cannot broadcast shapes (2, 3) and (4,)")): T(2, 3, device=device) + T(4, device=device)
    with pytest.raises(ValueError, match=esc("(2, 3) and (3, 2)")): T(2, 3, device=device) * T(3, 2, device=device)
    with pytest.raises(ValueError, match=esc("(2, 3) and (2,)")): T(2, 3, device=device).maximum(T(2, device=device))
    with pytest.raises(ValueError, match=esc("(2, 3) and (2,)")): T(2, 3, device=device) < T(2, device=device)
    with pytest.raises(ValueError, match=esc("(2, 3) and (4,)")): T(2, 3, device=device) + [1.0, 2.0, 3.0, 4.0]

  def test_where_broadcast(self, device):
    cond = Tensor(np.ones((2, 3), bool), device=device)
    with pytest.raises(ValueError, match=esc("(2, 3)") + ".*" + esc("(4,)")): cond.where(T(4, device=device), 0.0)

  def test_matmul(self, device):
    with pytest.raises(ValueError, match=esc("matmul: shapes (2, 3) and (4, 5) do not align (3 != 4)")): T(2, 3, device=device) @ T(4, 5, device=device)
    with pytest.raises(ValueError, match=esc("(3,) and (2,)")): T(3, device=device) @ T(2, device=device)
    with pytest.raises(ValueError, match=esc("batch dims of shapes (2, 2, 3) and (3, 3, 4) do not broadcast")): T(2, 2, 3, device=device) @ T(3, 3, 4, device=device)
    with pytest.raises(ValueError, match="at least 1 dim.*" + esc("()")): T(device=device) @ T(3, device=device)

  def test_reshape(self, device):
    with pytest.raises(ValueError, match=esc("cannot reshape tensor of shape (2, 3) (6 elements) into (4,)")): T(2, 3, device=device).reshape(4)
    with pytest.raises(ValueError, match=esc("(2, 3)") + ".*" + esc("(4, -1)")): T(2, 3, device=device).reshape(4, -1)
    with pytest.raises(ValueError, match="only one dimension can be -1"): T(2, 3, device=device).reshape(-1, -1)
    with pytest.raises(ValueError, match=esc("(2, 3)") + ".*" + esc("(-2, -3)")): T(2, 3, device=device).reshape(-2, -3)
    with pytest.raises(ValueError, match=esc("(2, 3)") + ".*" + esc("(2, 2)")): T(2, 3, device=device).view(2, 2)
    with pytest.raises(ValueError, match=esc("(2, 12)") + ".*" + esc("(2, 5, 2)")): T(2, 12, device=device).unflatten(1, (5, 2))

  def test_expand_permute_pad(self, device):
    with pytest.raises(ValueError, match=esc("cannot expand shape (2, 3) to (2, 4)")): T(2, 3, device=device).expand(2, 4)
    with pytest.raises(ValueError, match=esc("target (3,) has fewer dims than (2, 3)")): T(2, 3, device=device).expand(3)
    with pytest.raises(ValueError, match=esc("(0, 0)") + ".*not a permutation.*" + esc("(2, 3)")): T(2, 3, device=device).permute(0, 0)
    with pytest.raises(ValueError, match="negative padding"): T(2, 3, device=device).pad(((0, 0), (-1, 0)))

  def test_cat_stack_split(self, device):
    with pytest.raises(ValueError, match=esc("cat: shapes (2, 3) and (2, 4) differ outside dim 0")): Tensor.cat([T(2, 3, device=device), T(2, 4, device=device)])
    with pytest.raises(ValueError, match=esc("(2, 3) and (3,)")): Tensor.cat([T(2, 3, device=device), T(3, device=device)])
    with pytest.raises(ValueError, match="non-empty"): Tensor.cat([])
    with pytest.raises(ValueError, match=esc("stack: tensors must have equal shapes, got (2, 3) and (3, 2)")): Tensor.stack([T(2, 3, device=device), T(3, 2, device=device)])
    with pytest.raises(ValueError, match=esc("sizes [1, 1] do not add up to dim 0 of (3, 2)")): T(3, 2, device=device).split([1, 1])
    with pytest.raises(ValueError, match="must be positive, got 0"): T(3, 2, device=device).split(0)

  def test_nn_shapes(self, device):
    logits = T(4, 5, device=device)
    with pytest.raises(ValueError, match=esc("logits (4, 5) need targets of shape (4,), got (5,)")):
      logits.cross_entropy(Tensor(np.zeros(5, np.int64), device=device))
    with pytest.raises(ValueError, match="reduction must be mean, sum or none, not 'avg'"):
      logits.cross_entropy(Tensor(np.zeros(4, np.int64), device=device), reduction="avg")
    with pytest.raises(ValueError, match=esc("embedding: table must be 2-d (vocab, dim), got (2, 3, 4)")):
      T(2, 3, 4, device=device).embedding(Tensor(np.zeros(2, np.int64), device=device))
    with pytest.raises(ValueError, match=esc("q (1, 3, 4, 8), k (1, 2, 4, 8)")):
      T(1, 3, 4, 8, device=device).scaled_dot_product_attention(T(1, 2, 4, 8, device=device), T(1, 2, 4, 8, device=device))
    with pytest.raises(ValueError, match=esc("(2, 4, 8)")):
      T(2, 4, 8, device=device).scaled_dot_product_attention(T(2, 4, 8, device=device), T(2, 4, 8, device=device))
    with pytest.raises(ValueError, match="6 rows of hidden states but 5 targets"):
      T(6, 4, device=device).linear_cross_entropy(T(9, 4, device=device), Tensor(np.zeros(5, np.int64), device=device))
    with pytest.raises(ValueError, match=esc("weight (9, 3) does not fit hidden size 4")):
      T(6, 4, device=device).linear_cross_entropy(T(9, 3, device=device), Tensor(np.zeros(6, np.int64), device=device))

  def test_assign(self, device):
    with pytest.raises(ValueError, match=esc("value of shape (3,) does not fit tensor of shape (2, 3)")): T(2, 3, device=device).assign(T(3, device=device))
    with pytest.raises(ValueError, match=esc("value of shape (4,) does not fit tensor of shape (2, 3)")): T(2, 3, device=device).assign(np.ones(4))


class TestDtypes:
  def test_embedding_index_dtype(self, device):
    table = T(5, 3, device=device)
    with pytest.raises(TypeError, match="indices must be int32 or int64, not float32"): table.embedding(Tensor([1.0, 2.0], device=device))
    with pytest.raises(TypeError, match="indices must be int32 or int64, not bool"): table.embedding(Tensor([True], device=device))
    with pytest.raises(IndexError, match="tensor index must be int32 or int64, not float32"): table[Tensor([0.0], device=device)]

  def test_requires_grad_on_int(self, device):
    with pytest.raises(TypeError, match="only float tensors can require gradients, not int64"): Tensor([1, 2], requires_grad=True, device=device)
    with pytest.raises(TypeError, match="not int32"): Tensor(np.array([1], np.int32), device=device).requires_grad_()
    with pytest.raises(TypeError, match="not bool"): Tensor.full((2,), True, requires_grad=True, device=device)
    with pytest.raises(TypeError, match="not int64"): Tensor.zeros(2, dtype=dtypes.int64, requires_grad=True, device=device)

  def test_bad_dtype_and_data(self, device):
    with pytest.raises(TypeError, match="unknown dtype 'float8'"): Tensor([1.0], dtype="float8", device=device)
    with pytest.raises(TypeError, match="unsupported dtype complex64"): Tensor(np.ones(2, np.complex64), device=device)
    with pytest.raises(TypeError, match="ragged"): Tensor([[1, 2], [3]], device=device)
    with pytest.raises(TypeError, match="unsupported operand type str"): T(2, device=device) + "a"

  def test_bad_device(self):
    with pytest.raises(ValueError, match="unknown device 'cuda'"): Tensor([1.0], device="cuda")


class TestAutograd:
  def test_backward_non_scalar(self, device):
    x = T(2, 3, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match=esc("backward() on a tensor of shape (2, 3) needs gradient=")): (x * 2).backward()

  def test_backward_without_grad(self, device):
    with pytest.raises(RuntimeError, match=esc("(shape (2,)) does not require grad")): T(2, device=device).exp().backward(np.ones(2, np.float32))

  def test_backward_gradient_shape(self, device):
    x = T(2, 3, device=device, requires_grad=True)
    with pytest.raises(ValueError, match=esc("gradient of shape (3,) does not match tensor of shape (2, 3)")): (x * 2).backward(np.ones(3, np.float32))


class TestAxesAndIndices:
  @pytest.mark.parametrize("fn", [lambda x: x.sum(2), lambda x: x.mean(-3), lambda x: x.max(5), lambda x: x.softmax(2),
                                  lambda x: x.log_softmax(-3), lambda x: x.argmax(2), lambda x: x.var(axis=(0, 2)),
                                  lambda x: x.logsumexp(2), lambda x: x.layernorm(axis=2)])
  def test_bad_reduce_axis(self, fn, device):
    with pytest.raises(IndexError, match=r"axis -?\d is out of range for a tensor with 2 dims"): fn(T(2, 3, device=device))

  @pytest.mark.parametrize("fn", [lambda x: x.permute(0, 2), lambda x: x.transpose(0, 2), lambda x: x.flip(2), lambda x: x.unsqueeze(3),
                                  lambda x: x.squeeze(2), lambda x: x.flatten(0, 2), lambda x: x.split(1, dim=2), lambda x: x.chunk(2, dim=-3),
                                  lambda x: Tensor.cat([x, x], 2), lambda x: Tensor.stack([x, x], 3), lambda x: x.size(2)])
  def test_bad_dim(self, fn, device):
    with pytest.raises(IndexError, match=r"(axis|dim) -?\d is out of range for a tensor with \d dims"): fn(T(2, 3, device=device))

  def test_index_out_of_range(self, device):
    x = T(3, 4, device=device)
    with pytest.raises(IndexError, match="index 3 is out of bounds for dim 0 with size 3"): x[3]
    with pytest.raises(IndexError, match="index -5 is out of bounds for dim 1 with size 4"): x[0, -5]
    with pytest.raises(IndexError, match=esc("too many indices (3) for a tensor of shape (3, 4)")): x[0, 0, 0]
    with pytest.raises(IndexError, match="only one Ellipsis"): x[..., 0, ...]
    with pytest.raises(IndexError, match="unsupported index 1.5 of type float"): x[1.5]
    with pytest.raises(IndexError, match="index 0 is out of bounds for dim 0 with size 0"): T(0, 2, device=device)[0]

  def test_tensor_index_out_of_range(self, device):
    x = T(3, 4, device=device)
    # checked when the gather runs (the indices are data); the message names the range and the size
    with pytest.raises(IndexError, match=r"indices span \[0, 7\] but the table has 3 rows"): x[Tensor([0, 7], device=device)].numpy()
    with pytest.raises(IndexError, match=r"indices span \[-2, 1\] but the table has 3 rows"): x[Tensor([1, -5], device=device)].numpy()
    with pytest.raises(IndexError, match=r"indices span \[5, 5\] but the table has 5 rows"): T(5, 2, device=device).embedding(Tensor([5], device=device)).numpy()

  def test_scalar_conversions(self, device):
    x = T(2, 3, device=device)
    with pytest.raises(ValueError, match=esc("item() needs a tensor with one element, not shape (2, 3)")): x.item()
    with pytest.raises(ValueError, match=esc("truth value of a tensor of shape (2, 3) is ambiguous")): bool(x)
    with pytest.raises(TypeError, match="len.. of a 0-d tensor"): len(T(device=device))

  def test_empty_reductions(self, device):
    with pytest.raises(ValueError, match=esc("max() over an empty dim of a tensor of shape (0, 3)")): T(0, 3, device=device).max()
    with pytest.raises(ValueError, match=esc("(2, 0)")): T(2, 0, device=device).min(1)
    with pytest.raises(ValueError, match=esc("(0, 3)")): T(0, 3, device=device).argmax(0)

  def test_bad_args(self, device):
    with pytest.raises(ValueError, match="dropout probability must be in \\[0, 1\\), got 1.5"): T(2, device=device).dropout(1.5)
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh', not 'erf'"): T(2, device=device).gelu("erf")
