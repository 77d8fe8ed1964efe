"""Fusion rules, tested by counting kernels (DESIGN.md section 1), and memory behaviour."""
import subprocess, sys, os
import numpy as np
from minift import Tensor, GlobalCounters, no_grad
from tiny_gpt import init_weights, block_minift

rng = np.random.default_rng(0)


def rand(*shape, grad=False):
  return Tensor(rng.standard_normal(shape).astype(np.float32), requires_grad=grad)


def kinds(*tensors):
  return [k.kind for k in Tensor.schedule(*tensors)]


def test_elementwise_chain_is_one_kernel():
  a, b = rand(8, 16), rand(16)
  y = ((a * 2 + b).exp().sqrt() - a / 3).tanh().gelu().silu()
  assert kinds(y) == ["elementwise"]


def test_matmul_bias_relu_is_one_kernel():
  x, w, b = rand(8, 16), rand(16, 32), rand(32)
  sched = Tensor.schedule((x @ w + b).relu())
  assert [k.kind for k in sched] == ["matmul"]
  np.testing.assert_allclose((x @ w + b).relu().numpy(), np.maximum(x.numpy() @ w.numpy() + b.numpy(), 0), rtol=1e-5, atol=1e-5)


def test_softmax_and_layernorm_kernel_counts():
  x = rand(4, 8, 32)
  assert len(Tensor.schedule(x.softmax(-1))) == 3
  assert len(Tensor.schedule(x.log_softmax(-1))) == 3
  assert len(Tensor.schedule(x.layernorm(rand(32), rand(32)))) == 3
  assert len(Tensor.schedule(x.rmsnorm(rand(32)))) == 2


def test_schedule_runs_nothing():
  x = rand(4, 4)
  y = (x @ x).softmax(-1)
  before = GlobalCounters.kernel_count
  assert len(Tensor.schedule(y)) == 4
  assert GlobalCounters.kernel_count == before and not y.lazydata.realized


def _block(requires_grad):
  weights, cfg = init_weights(layers=1)
  p = {k: Tensor(v, requires_grad=requires_grad) for k, v in weights.items()}
  x = rand(2, 16, 64, grad=True)
  return p, x, block_minift(p, 0, x, cfg["heads"])


# Pinned: a regression in fusion changes these numbers. Forward: 3 per layernorm (x2), qkv
# matmul, attention (one kernel on the NumPy backend: the scores, masks, softmax and att @ v
# are made inside it), head merge copy, proj matmul (+residual), fc matmul (+gelu), mlp matmul
# (+residual) = 12, + 1 because the weights train: a forward realized before its backward is
# built keeps the matmul result the backward will read (the fc output, under the gelu) instead
# of leaving it fused into the epilogue, where the backward would have to redo the matmul. The
# attention's gradients are one kernel too, and the gelu derivative is one fused expression.
GPT2_BLOCK_FORWARD_KERNELS = 13
GPT2_BLOCK_TRAIN_KERNELS = 46


def test_gpt2_block_kernel_counts():
  with no_grad(): _, _, inference = _block(False)
  assert len(Tensor.schedule(inference)) == GPT2_BLOCK_FORWARD_KERNELS - 1
  p, x, out = _block(True)
  assert len(Tensor.schedule(out)) == GPT2_BLOCK_FORWARD_KERNELS
  loss = (out * out).sum()
  loss.backward()
  sched = Tensor.schedule(loss, x.grad, *[t.grad for t in p.values() if t.grad is not None])
  assert len(sched) == GPT2_BLOCK_TRAIN_KERNELS


def test_frozen_weights_cost_no_weight_gradient_matmuls():
  def matmuls(requires_grad):
    p, x, out = _block(requires_grad)
    loss = (out * out).sum()
    loss.backward()
    grads = [t.grad for t in p.values() if t.grad is not None]
    sched = Tensor.schedule(loss, x.grad, *grads)
    return [k for k in sched if k.kind == "matmul"], p, grads
  frozen, p, grads = matmuls(False)
  trained, _, _ = matmuls(True)
  weight_shapes = [tuple(sorted(t.shape)) for k, t in p.items() if t.ndim == 2 and k.startswith("0.")]
  squeeze = lambda shape: tuple(sorted(s for s in shape if s != 1))   # grads may come out transposed
  assert not grads and not any(squeeze(k.shape) in weight_shapes for k in frozen)
  # exactly one weight-gradient matmul per 2-d weight, and only when the weights train
  # (8: the attention's products are inside its two kernels)
  assert len(frozen) == 8 and len(trained) - len(frozen) == len(weight_shapes) == 4
  assert sum(squeeze(k.shape) in weight_shapes for k in trained) == 4


def test_matmul_never_materialises_the_broadcast_product():
  x, w = rand(256, 256), rand(256, 256)
  x.realize(); w.realize()
  base = GlobalCounters.mem_used
  GlobalCounters.reset_peak()
  y = (x @ w).realize()
  # inputs are already counted in base; the output is 256 KiB; the product would be 64 MiB
  assert GlobalCounters.mem_peak - base <= 2 * 256 * 256 * 4
  np.testing.assert_allclose(y.numpy(), x.numpy() @ w.numpy(), rtol=1e-4, atol=1e-4)


def test_long_chain_frees_intermediates():
  x = rand(64, 1024)
  x.realize()
  nbytes = 64 * 1024 * 4
  y = x
  for _ in range(40): y = (y * 3.0).softmax(-1)    # 120 kernels, each output a full tensor
  base = GlobalCounters.mem_used
  GlobalCounters.reset_peak()
  y.realize()
  assert GlobalCounters.mem_peak - base <= 4 * nbytes, "intermediates must be freed after their last use"
  ref = x.numpy()
  for _ in range(40):
    e = np.exp(ref * 3 - (ref * 3).max(-1, keepdims=True)); ref = e / e.sum(-1, keepdims=True)
  np.testing.assert_allclose(y.numpy(), ref, rtol=1e-4, atol=1e-6)


def test_debug2_prints_one_line_per_kernel():
  code = "from minift import Tensor; import numpy as np; x = Tensor(np.ones((4, 4), np.float32)); (x @ x).softmax(-1).realize()"
  out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "DEBUG": "2"}, capture_output=True, text=True, check=True).stdout
  lines = [l for l in out.splitlines() if l.startswith("minift kernel")]
  assert len(lines) == 4 and all(" ms" in l for l in lines)
