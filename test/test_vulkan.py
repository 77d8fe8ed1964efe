"""The Vulkan backend (minift/backends/vulkan) on the Vulkan device here (Mesa's lavapipe in CI):
one submit per realize, tiny models trained as on NumPy, tensors over maxStorageBufferRange, the
shader caches, compile errors, kernel counts against OpenCL and the fallback. The op suite
(test_ops.py) runs on Vulkan through the device fixture; vk.py itself is test_vulkan_runtime.py's."""
import json, os, subprocess, sys
from pathlib import Path
import numpy as np
import pytest

import minift
from minift import Tensor, GlobalCounters, dtypes, jit
from minift.lazy import Op
from minift.runtime import device as runtime_device
from minift.runtime.device import get_device

# CI installs lavapipe and glslang (.ci/run): there a missing Vulkan device is a failure, not a skip
if "vulkan" not in minift.available_devices():
  if os.environ.get("CI"): raise RuntimeError("no usable Vulkan device in CI: mesa-vulkan-drivers and glslang-tools should be installed by .ci/run")
  pytest.skip("no usable Vulkan device (or no glslangValidator/glslc)", allow_module_level=True)

from minift.backends.vulkan import VulkanDevice, codegen as cg, vk

ROOT = Path(__file__).resolve().parent.parent
rng = np.random.default_rng(0)
def randn(*shape): return rng.standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module")
def dev(): return get_device("vulkan")


def _child(code, **env):
  r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT), **env),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  return r


# ---- dispatch: one submit per realize

def test_one_submit_per_realize(dev):
  x, w, table = randn(6, 8), randn(8, 5), randn(10, 8)
  idx = np.array([3, 0, 9, 3, 1, 3], np.int64)
  xt, wt, tt = (Tensor(a, device="vulkan") for a in (x, w, table))
  it = Tensor(idx, device="vulkan")
  for t in (xt, wt, tt, it): t.realize()
  out = ((xt @ wt).relu().sum(1) + tt.embedding(it)[:, :6].max(1)).softmax(0)
  kernels = len(Tensor.schedule(out))
  assert kernels >= 4
  submits, dispatches = dev.stats["submits"], dev.stats["dispatches"]
  out.realize()
  assert dev.stats["submits"] - submits == 1 and dev.stats["dispatches"] - dispatches >= kernels
  got = out.numpy()   # nothing left pending: reading it submits nothing more
  assert dev.stats["submits"] - submits == 1
  h = np.maximum(x @ w, 0).sum(1) + table[idx][:, :6].max(1)
  np.testing.assert_allclose(got, np.exp(h - h.max()) / np.exp(h - h.max()).sum(), rtol=1e-5, atol=1e-6)


def test_one_submit_per_jit_replay(dev):
  w = Tensor(randn(8, 8), device="vulkan", requires_grad=True)
  step = jit(lambda x: ((x @ w).tanh() * 2).sum(1).realize())
  x = randn(4, 8)
  for _ in range(3): step(Tensor(x, device="vulkan"))   # warm-up, capture, then replays
  xt = Tensor(x, device="vulkan").realize()
  submits = dev.stats["submits"]
  got = step(xt)
  assert dev.stats["submits"] - submits == 1
  np.testing.assert_allclose(got.numpy(), (np.tanh(x @ w.numpy()) * 2).sum(1), rtol=1e-5)


def test_index_error_is_raised_at_the_submit(dev):
  table = Tensor(randn(5, 3), device="vulkan")
  with pytest.raises(IndexError, match=r"indices span \[0, 7\] but the table has 5 rows"):
    table.embedding(Tensor(np.array([0, 7], np.int32), device="vulkan")).realize()
  np.testing.assert_array_equal(table.embedding(Tensor(np.array([4], np.int32), device="vulkan")).numpy(), table.numpy()[[4]])   # cleared


def test_int_widened_to_int64_compares_right(dev):
  # lavapipe (LLVM 15) folded int64_t(int) >= 5 to true for 0..4: codegen widens through packInt2x32
  i = np.array([0, 4, 5, 7, -3], np.int32)
  got = (Tensor(i, device="vulkan").cast(dtypes.int64) >= 5).numpy()
  np.testing.assert_array_equal(got, i >= 5)


def test_nan_survives_multiplying_by_a_known_zero(dev):
  # the mean of an empty tensor is 0 * NaN: lavapipe folds it to 0 unless the shader keeps NaNs
  assert np.isnan(Tensor(np.zeros(0, np.float32), device="vulkan").mean().numpy())


# ---- float16 weights

def _same(f, *arrays, rtol=1e-5, atol=1e-6):
  want, got = ([r.numpy() for r in (lambda out: out if isinstance(out, (list, tuple)) else [out])(f(*[Tensor(a, device=d) for a in arrays]))]
               for d in ("numpy", "vulkan"))
  for w, g in zip(want, got):
    assert w.dtype == g.dtype and w.shape == g.shape
    np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), rtol=rtol, atol=atol)


def test_matmul_reads_half_weights_directly(dev):
  x, w = randn(40, 32), randn(24, 32).astype(np.float16)
  f = lambda p, q: p.linear(q)
  (k,) = Tensor.schedule(f(Tensor(x, device="vulkan"), Tensor(w, device="vulkan")))
  assert k.kind == "matmul" and [i.dtype for i in k.inputs] == [dtypes.float32, dtypes.float16]
  if dev.storage.half16:   # 16-bit storage: the weight stays half in memory and in the shader
    src = cg.render(k, (dtypes.float32, dtypes.float16), (x.size, w.size), (1, 1, 1), dev.target).src
    assert "float16_t data1[]" in src.replace("HALF_T", "float16_t") and "#define HALF_T float16_t" in src
    assert dev.vk.download(Tensor(w, device="vulkan").realize().lazydata.base.buffer.data, np.float16).nbytes == w.nbytes
  _same(f, x, w)


def test_devices_without_8_and_16_bit_storage_store_32_bits_wide(monkeypatch, tmp_path):
  import dataclasses
  wide = VulkanDevice(cache_dir=tmp_path / "vk")
  wide.storage = cg.Storage(bool8=False, half16=False, int64=wide.storage.int64, nan_preserve=wide.storage.nan_preserve)
  wide.target = dataclasses.replace(wide.target, storage=wide.storage)
  monkeypatch.setitem(runtime_device._devices, "vulkan", wide)
  try:
    x, w, h = randn(6, 8), randn(5, 8).astype(np.float16), (randn(6, 5) * 100).astype(np.float16)
    _same(lambda p, q, r: [p.linear(q), (p.linear(q).cast(dtypes.float16) + r) * 3, r > 0], x, w, h)
    buf = Tensor(h, device="vulkan").realize().lazydata.base.buffer
    assert buf.data.nbytes == h.size * 4   # half held as float
  finally:
    wide.vk.close()


# ---- tensors larger than one binding (maxStorageBufferRange)

@pytest.fixture
def small_window(monkeypatch, tmp_path):
  """The vulkan backend with 4 KiB bindings: tensors over 1024 floats are bound in pieces, as
  ones over maxStorageBufferRange (128 MiB on lavapipe and many phones) are."""
  small = VulkanDevice(window=4096, cache_dir=tmp_path / "vk")
  monkeypatch.setitem(runtime_device._devices, "vulkan", small)
  yield small
  small.vk.close()


def test_tensor_over_one_binding_in_matmul_and_embedding(small_window):
  x, w, table = randn(40, 96), randn(96, 48), randn(100, 48)   # w: 4608 floats (5 pieces), table: 4800 (5 pieces)
  idx = np.array([[0, 99, 57], [31, 31, 2]], np.int64)
  out = {}
  for device in ("numpy", "vulkan"):
    ts = [Tensor(a, device=device, requires_grad=True) for a in (x, w, table)]
    h = (ts[0] @ ts[1]).relu()                              # a 40 x 48 output: 2 pieces written through st_dst
    e = ts[2].embedding(Tensor(idx, device=device))
    loss = h.sum() * 0.01 + (e * e).sum() + (h[:2, :3, None] * 0 + e[:, :, :1]).sum()
    loss.backward()
    out[device] = [loss.numpy(), h.numpy(), e.numpy()] + [t.grad.numpy() for t in ts]
    if device == "vulkan": assert max(len(t.lazydata.base.buffer.data.pieces) for t in ts) == 5
  for name, a, b in zip(["loss", "matmul", "embedding", "dx", "dw", "dtable"], out["numpy"], out["vulkan"]):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=name)


# ---- caches and compile errors

def test_second_process_compiles_nothing(tmp_path):
  code = ("import json, numpy as np\nfrom minift import Tensor\nfrom minift.runtime.device import get_device\n"
          "x = Tensor(np.arange(12, dtype=np.float32).reshape(3, 4), device='vulkan')\n"
          "y = ((x @ x.T).relu() + x.sum(1, keepdim=True)).softmax(-1).numpy()\n"
          "d = get_device('vulkan')\n"
          "print(json.dumps({**d.vk.compiler.stats, 'pipelines': d.stats['pipelines'], 'loaded': d.vk.pipeline_cache_loaded}))")
  first = json.loads(_child(code, MINIFT_CACHE_DIR=str(tmp_path)).stdout.splitlines()[-1])
  second = json.loads(_child(code, MINIFT_CACHE_DIR=str(tmp_path)).stdout.splitlines()[-1])
  assert first["compiled"] >= 4 and first["cache_hits"] == 0   # the self-check and the schedule's kernels
  assert second["compiled"] == 0 and second["cache_hits"] == first["compiled"]
  assert len(list((tmp_path / "vk").glob("*.spv"))) == first["compiled"]
  assert second["loaded"] > 0 and second["pipelines"] == first["pipelines"]   # the driver's pipeline cache was read back


def test_compile_error_names_the_kernel_and_carries_the_compiler_message(dev, monkeypatch, tmp_path):
  monkeypatch.setitem(cg.GLSLLanguage.math_fns, Op.EXP, "exp_not_declared_anywhere")   # a renderer bug, as it would show
  monkeypatch.setattr(dev.vk, "compiler", vk.GLSLCompiler(tmp_path))                    # not from the disk cache
  x = Tensor(randn(3, 4), device="vulkan")
  with pytest.raises(vk.ShaderCompileError) as e:
    (x.exp() + 1).realize()
  assert "elementwise_3x4" in str(e.value) and "exp_not_declared_anywhere" in str(e.value)


# ---- training: the NumPy backend's losses, the same kernels as OpenCL

def _train(folder, text, kind, device, monkeypatch, steps=3):
  """Losses of `steps` LoRA steps on `device`, kernels run per step, and the model."""
  import test_finetune as ft   # its models, LoRA targets and Trainer set-up
  monkeypatch.setenv("MINIFT_DEVICE", device)
  counts = []
  real = ft.Trainer.train_step
  def counted(self, *a, **kw):
    before = GlobalCounters.kernel_count
    out = real(self, *a, **kw)
    counts.append(GlobalCounters.kernel_count - before)
    return out
  monkeypatch.setattr(ft.Trainer, "train_step", counted)
  model, _, _, losses = ft.minift_run(folder, text, steps, kind=kind)
  monkeypatch.undo()
  return losses, counts, model


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_lora_training_matches_numpy_and_loads_in_peft(tiny, kind, monkeypatch, tmp_path):
  import peft, transformers
  from minift.lora import save_adapter
  ref, _, _ = _train(tiny[kind], tiny["text"], kind, "numpy", monkeypatch)
  losses, counts, model = _train(tiny[kind], tiny["text"], kind, "vulkan", monkeypatch)
  assert model.parameters()[0].device == "vulkan"
  np.testing.assert_allclose(losses, ref, rtol=1e-4)
  save_adapter(model, str(tmp_path / "adapter"))
  peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tiny[kind]), str(tmp_path / "adapter"))
  if "opencl" in minift.available_devices():   # CI has PoCL: the same kernels, step by step
    _, cl_counts, _ = _train(tiny[kind], tiny["text"], kind, "opencl", monkeypatch)
    assert counts == cl_counts


# ---- fallback

PROGRAM = "import numpy as np; from minift import Tensor; x = Tensor(np.ones((2, 3), np.float32)); print('device', x.device, 'sum', (x @ x.T).sum().item())"


def test_no_glsl_compiler_falls_back_to_numpy(tmp_path):
  r = _child(PROGRAM, MINIFT_DEVICE="vulkan", PATH=str(tmp_path))   # no glslangValidator, no glslc
  assert "device numpy sum 12.0" in r.stdout
  warnings = [l for l in r.stderr.splitlines() if "Vulkan unavailable" in l]
  assert len(warnings) == 1 and "NumPy" in warnings[0] and "glslangValidator" in warnings[0]


def test_no_vulkan_device_falls_back_to_numpy():
  r = _child(PROGRAM, MINIFT_DEVICE="vulkan", MINIFT_VK_DEVICE="no-such-device-xyz")
  assert "device numpy sum 12.0" in r.stdout
  warnings = [l for l in r.stderr.splitlines() if "Vulkan unavailable" in l]
  assert len(warnings) == 1 and "no-such-device-xyz" in warnings[0]


# ---- tools

def test_kernel_test_tool_on_vulkan(tmp_path):
  """What a user runs on a phone: every check passes and the report names the device."""
  r = subprocess.run([sys.executable, str(ROOT / "tools" / "kernel_test.py"), "--device", "vulkan", "--quick", "--repeat", "1",
                      "--json", str(tmp_path / "out.json")], capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout + r.stderr
  report = json.loads((tmp_path / "out.json").read_text())
  assert report["device"] == "vulkan" and report["caps"]["name"] == get_device("vulkan").caps.name
  checks = {row["check"] for row in report["results"]}
  assert {"matmul.comp float", "softmax", "gpt2 block fwd+bwd"} <= checks and all(row["status"] == "pass" for row in report["results"])
  assert report["summary"]["fail"] == report["summary"]["skip"] == 0 and " passed, 0 failed, 0 skipped" in r.stdout and "shaders compiled" in r.stdout


def test_bench_tool_takes_vulkan_and_task_lists(tmp_path, monkeypatch):
  monkeypatch.syspath_prepend(str(ROOT / "tools"))
  monkeypatch.setenv("MINIFT_DEVICE", "numpy")   # bench.main sets it: restored after the test
  import bench
  rows = bench.main(["--device", "vulkan", "--task", "elementwise,layernorm", "--repeat", "1", "--json", str(tmp_path / "b.json")])
  assert [r["task"] for r in rows] == ["elementwise", "softmax", "layernorm"] and all(r["minift_ms"] > 0 for r in rows)
  with pytest.raises(SystemExit): bench.main(["--task", "matmul,nope"])


def test_generate_tool_on_vulkan_writes_what_numpy_writes(tiny, monkeypatch):
  import io
  monkeypatch.syspath_prepend(str(ROOT / "tools"))
  monkeypatch.setenv("MINIFT_DEVICE", "numpy")   # --device sets it: restored after the test
  import generate
  texts = {}
  for device in ("numpy", "vulkan"):
    out = io.StringIO()
    generate.main(["--model", tiny["gpt2"], "--prompt", "To be", "--max_new_tokens", "12", "--temperature", "1.0", "--seed", "0", "--device", device], out=out)
    texts[device] = out.getvalue().splitlines()[0]
  assert texts["vulkan"] == texts["numpy"] and len(set(texts["numpy"])) > 2, texts   # sampled: a stream of varied tokens
