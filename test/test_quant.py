"""Quantized frozen weights (minift/quant.py): GGUF block types dequantized bit for bit as gguf's
reference dequantizer does, matmuls and embedding lookups that read the blocks, and no gradient
ever for a quantized matrix."""
import json
import numpy as np
import pytest
import gguf
from minift import Tensor
from minift.dtype import dtypes
from minift.lazy import Op
from minift.quant import quantize, SCALE_OFFSETS
from minift.backends.numpy import quant as nq

rng = np.random.default_rng(0)
TYPES = nq.TYPES


def random_blocks(name, rows, cols):
  """Random bytes as blocks of type `name` (rows, cols values), every fp16 scale a finite half of
  any magnitude (normal and subnormal, either sign): every bit pattern of the quantized values."""
  d = dtypes.from_any(name)
  raw = rng.integers(0, 256, (rows * cols // d.block, d.itemsize), dtype=np.uint8)
  for off in SCALE_OFFSETS[name]:
    bits = rng.integers(0, 0x7c00, raw.shape[0], dtype=np.uint16) | (rng.integers(0, 2, raw.shape[0], dtype=np.uint16) << 15)
    raw[:, off:off + 2] = bits.astype("<u2").view(np.uint8).reshape(-1, 2)
  return raw.reshape(rows, -1)


def reference(raw, name):
  return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name.upper()])


def same_bits(a, b): return np.array_equal(np.asarray(a, np.float32).view(np.uint32), np.asarray(b, np.float32).view(np.uint32))


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_bit_for_bit(name):
  """The C loops' blocks (kernels/qmatmul.c), a gathered row (an embedding lookup) and a DEQUANT
  kernel give gguf.quants.dequantize's float32 values bit for bit."""
  assert nq.functions() is not None, "the C loops need a compiler here"
  d = dtypes.from_any(name)
  rows, cols = 6, 2 * max(d.block, 256)
  raw = random_blocks(name, rows, cols)
  ref = reference(raw, name)
  assert same_bits(nq.dequantize(raw.reshape(-1), d, rows * cols).reshape(rows, cols), ref)
  idx = np.array([[4, 0], [5, 4]])
  assert same_bits(nq.gather_rows(raw.reshape(-1), d, cols, idx), ref[idx.reshape(-1)])
  w = Tensor.from_quantized(raw, (rows, cols), d)
  assert w.dtype is d and w.lazydata.base.buffer.nbytes == raw.nbytes   # held as its blocks
  assert same_bits(w.numpy(), ref)
  assert same_bits(w.embedding(Tensor(idx)).numpy(), ref[idx])
  assert same_bits(w[1:3, d.block:].dequantize().numpy(), ref[1:3, d.block:])   # a view of the blocks


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_quantize_matches_gguf(name):
  """quantize() writes gguf's blocks (the ones gguf's quantizer can write), and a quantized
  tensor's values are those blocks' values."""
  a = rng.standard_normal((8, 96)).astype(np.float32)
  raw = quantize(a, name)
  assert np.array_equal(raw, gguf.quants.quantize(a, gguf.GGMLQuantizationType[name.upper()]))
  assert same_bits(Tensor(a).quantize(name).numpy(), reference(raw, name))


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("m", [1, 3, 40])
def test_matmul_both_directions(name, m):
  """x @ W.T (a layer's forward; m <= 4 rows take the direct loop, more the BLAS panels) and
  g @ W (its input gradient) equal the products of the dequantized weight (in float64), within
  float32 summation error relative to the operands' magnitudes (the scales are of any size)."""
  d = dtypes.from_any(name)
  n, k = 48, 2 * max(d.block, 256)
  raw = random_blocks(name, n, k)
  w = Tensor.from_quantized(raw, (n, k), d)
  wv = reference(raw, name).astype(np.float64)
  x, g = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((m, n)).astype(np.float32)
  for got, want in (((Tensor(x) @ w.T).numpy(), x @ wv.T), ((Tensor(g) @ w).numpy(), g @ wv)):
    scale = np.abs(x).max() * np.abs(wv).max() * np.sqrt(max(n, k))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)


def test_matmul_row_panels_of_a_tall_weight(monkeypatch):
  """g @ W where column panels would be narrow (a tall weight: a vocabulary): panels of rows,
  products summed."""
  monkeypatch.setattr(nq, "PANEL_BYTES", 4096)   # column panels of 0 blocks: rows, 64 at a time
  raw = random_blocks("q4_k", 300, 512)
  wv = reference(raw, "q4_k").astype(np.float64)
  w = Tensor.from_quantized(raw, (300, 512), dtypes.q4_k)
  g = rng.standard_normal((7, 300)).astype(np.float32)
  want = g @ wv
  np.testing.assert_allclose((Tensor(g) @ w).numpy(), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_no_weight_gradient_for_a_quantized_matrix():
  """Training LoRA on a quantized base computes the input gradient through the quantized weight
  but never its own gradient: no kernel has the weight's shape, none makes it float32 (DEQUANT),
  and the weight gets no .grad even when asked for one."""
  n, k = 64, 96
  w = Tensor(rng.standard_normal((n, k)).astype(np.float32) * 0.1).quantize("q4_0")
  w.requires_grad = True   # asked for, never given
  a = Tensor(rng.standard_normal((4, k)).astype(np.float32) * 0.1, requires_grad=True)
  x = Tensor(rng.standard_normal((5, 7, k)).astype(np.float32), requires_grad=True)
  y = (x @ w.T + (x @ a.T) @ Tensor(np.ones((4, n), np.float32))).square().sum()
  y.backward()
  grads = [t.grad for t in (x, a)]
  sched = Tensor.schedule(*grads)
  assert sched and not any(node.op is Op.DEQUANT for kern in sched for node in kern._nodes())   # no float32 copy of it
  assert not any(tuple(kern.shape) in ((n, k), (k, n)) for kern in sched)
  assert w.grad is None
  wv = w.numpy().astype(np.float64)
  xv, av = x.numpy().astype(np.float64), a.numpy().astype(np.float64)
  h = xv @ wv.T + (xv @ av.T) @ np.ones((4, n))
  np.testing.assert_allclose(x.grad.numpy(), (2 * h) @ (wv + np.ones((n, 4)) @ av), rtol=1e-4, atol=1e-4)


def test_other_ops_refuse_a_quantized_tensor():
  w = Tensor(rng.standard_normal((4, 32)).astype(np.float32)).quantize("q8_0")
  with pytest.raises(TypeError, match="quantized"): w + 1
  with pytest.raises(TypeError, match="quantized"): w * w
  np.testing.assert_allclose((w.dequantize() + 1).numpy(), w.numpy() + 1)
  np.testing.assert_allclose(w.float().exp().numpy(), np.exp(w.numpy()), rtol=1e-6)   # a cast dequantizes


# ---- models with a quantized base

def forward_kernels(model, ids):
  from minift import no_grad
  with no_grad(): return Tensor.schedule(model(Tensor(ids)))


def logits(model, ids):
  from minift import no_grad
  with no_grad(): return model(Tensor(ids)).numpy()


def test_gguf_kept_quantized_gives_the_dequantized_logits(tmp_path):
  """A GGUF's Q8_0 matrices stay Q8_0 (`keep`; memory-mapped from the file, except Q and K whose
  rows the loader reorders), and the logits equal those of the base dequantized to float32 within
  float32 summation error; the tied LM head and every layer read the blocks (no DEQUANT kernel)."""
  import models
  from tiny_lm import save_tiny_gguf
  path, _ = save_tiny_gguf(tmp_path / "tiny.q8_0.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
  mq, _ = models.load(path, dtype="keep", with_tokenizer=False)
  mf, _ = models.load(path, with_tokenizer=False)
  params = dict(mq.named_parameters())
  assert {n for n, p in params.items() if p.dtype is dtypes.q8_0} == {n for n, p in params.items() if p.ndim == 2}
  assert all(p.dtype is dtypes.float32 for p in mf.parameters())
  buf = params["model.layers.0.mlp.up_proj.weight"].lazydata.base.buffer
  assert not buf.data.flags.writeable and not buf.data.flags.owndata   # a view of the file
  ids = rng.integers(0, 70, (2, 24))
  assert not any(node.op is Op.DEQUANT for kern in forward_kernels(mq, ids) for node in kern._nodes())
  want = logits(mf, ids)
  np.testing.assert_allclose(logits(mq, ids), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_type_without_kernel_is_made_float32_with_one_log_line(tmp_path, monkeypatch):
  """A bfloat16 folder under `keep`: no kernel reads bfloat16, so its weights become float32,
  with one log line for all of them."""
  import torch, models
  from tiny_lm import save_tiny
  folder = save_tiny("llama", tmp_path / "bf16")
  import transformers
  transformers.AutoModelForCausalLM.from_pretrained(folder).to(torch.bfloat16).save_pretrained(folder)
  from minift import quant
  said = []
  monkeypatch.setattr(quant.log, "info", said.append)
  model, _ = models.load(folder, dtype="keep", with_tokenizer=False)
  assert all(p.dtype is dtypes.float32 for p in model.parameters())
  lines = [line for line in said if "BF16" in line]
  assert len(lines) == 1 and "float32" in lines[0], lines


def test_lora_on_a_quantized_base_matches_peft_on_the_dequantized_base(tmp_path):
  """LoRA trained 20 steps on a base quantized to Q4_0 on load (an HF folder, `--quantize
  q4_0`) takes the steps torch + peft take on the dequantized base (losses within 1e-3: the
  input gradients through the quantized matmuls are right), and its adapter, loaded by peft onto
  the dequantized base in transformers, gives the same held-out perplexity as minift (0.2%)."""
  import math, torch, peft, transformers, models
  from tiny_lm import save_tiny, TEXT
  from minift.data import PackedData
  from minift.lora import apply_lora, lora_modules, save_adapter, adapter_state
  from minift.trainer import Trainer, lr_at
  from models.evaluate import perplexity_windows, windows_nll
  from test_finetune import train_args, torch_run, TARGETS
  folder = save_tiny("llama", tmp_path / "base")
  Tensor.manual_seed(0)
  model, tok = models.load(folder, dtype="q4_0")
  assert model.model.layers[0].mlp.up_proj.weight.dtype is dtypes.q4_0 and model.model.embed_tokens.weight.dtype is dtypes.q4_0
  dequantized = {name: p.numpy() for name, p in model.named_parameters()}
  apply_lora(model, TARGETS["llama"], r=4, alpha=8)
  init = adapter_state(model)
  named = [(f"{p}.{n}", getattr(m, n)) for p, m in lora_modules(model) for n in ("lora_A", "lora_B")]
  trainer = Trainer(model, [t for _, t in named], train_args(), named)
  (tmp_path / "train.txt").write_text(TEXT[:1200])
  data = PackedData(str(tmp_path / "train.txt"), tok, 32, val_fraction=0.0, seed=0)
  gen, batches, losses = data.batches(4, 0), [], []
  for step in range(20):
    try: _, x, y = next(gen)
    except StopIteration: gen = data.batches(4, step); _, x, y = next(gen)
    batches.append((x, y))
    losses.append(trainer.train_step([(x, y)], lr_at(step, 1e-2, 3, 20, "linear"))[0])
  save_adapter(model, str(tmp_path / "adapter"), base_model_path=folder)
  held_out = tok.encode("Whether 'tis nobler in the mind to suffer the slings and arrows, or to take arms.", add_special_tokens=False)
  windows = perplexity_windows(held_out, 32)
  nll, n = windows_nll(model, windows)
  ours = math.exp(nll / n)
  # the reference: transformers with the base's weights as minift holds them (dequantized)
  ref = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
  sd = ref.state_dict()
  assert {k for k in sd if k != "lm_head.weight"} == set(dequantized)
  with torch.no_grad():
    for name, v in dequantized.items(): sd[name].copy_(torch.tensor(v))
  ref.save_pretrained(tmp_path / "dequantized")
  _, ref_losses = torch_run(str(tmp_path / "dequantized"), init, batches)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-3)
  def ppl(m):
    total, count = 0.0, 0
    for x, t in windows:
      with torch.no_grad(): lg = m(torch.tensor([x])).logits[0]
      tt = torch.tensor(t)
      total += torch.nn.functional.cross_entropy(lg, tt, ignore_index=-100, reduction="sum").item()
      count += int((tt != -100).sum())
    return math.exp(total / count)
  base = ppl(ref)
  want = ppl(peft.PeftModel.from_pretrained(ref, str(tmp_path / "adapter")).eval())
  assert abs(ours / want - 1) < 0.002, (ours, want)
  assert abs(base / want - 1) > 0.02, "training must have changed the held-out perplexity"


def test_sharder_pages_quantized_weights_as_bytes(tmp_path):
  """Under a sharder, a quantized weight is paged as its blocks' bytes (read back from the GGUF
  file it is mapped from, never written); a table over the budget is split into row pieces that
  stay quantized; the logits are those of the unsharded model (the split head's pieces are
  separate products: float32 summation order)."""
  import models
  from minift.sharder import Sharder
  from tiny_lm import save_tiny_gguf
  from test_sharder import assert_bounded, KB
  path, _ = save_tiny_gguf(tmp_path / "tiny.q8_0.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
  ids = rng.integers(0, 70, (2, 24))
  whole, _ = models.load(path, dtype="keep", with_tokenizer=False)
  want = logits(whole, ids)
  with Sharder(ram_budget_mb=10 * KB, trace=True) as sh:
    model, _ = models.load(path, dtype="keep", with_tokenizer=False)
    assert sh.split_large(model) == ["model.embed_tokens"]   # 76 x 34 bytes a row of 32 values: over a quarter of 10 KiB
    pieces = model.model.embed_tokens.weight_pieces
    assert all(p.dtype is dtypes.q8_0 for p in pieces) and sum(p.shape[0] for p in pieces) == 76
    up = sh.page_of(model.model.layers[0].mlp.up_proj.weight.lazydata.base.buffer)
    assert up.nbytes == 64 * 34 and up.np_dtype == np.uint8 and up.source is not None and up.file is None
    got = logits(model, ids)
    assert_bounded(sh)
    assert any(event == "load" and name == up.name for event, name, _, _ in sh.trace)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())


# ---- the pip-shipped GGUFs (tools/get_assets.py --test): slow

REAL = {"smollm2": (44.19, 4771, {"q4_1", "q8_0"}), "gemma3": (52.63, 4514, {"q4_k", "q6_k"})}


@pytest.fixture(scope="module")
def real_models():
  """{name: (kept quantized, dequantized to float32, tokenizer)}, loaded on first use."""
  import models
  import test_real_weights as rw
  cache = {}
  def get(name):
    if name not in cache:
      path = {"smollm2": rw.smollm2_path, "gemma3": rw.gemma3_path}[name]()
      kept, tok = models.load(path, dtype="keep")
      cache[name] = kept, models.load(path, with_tokenizer=False)[0], tok
    return cache[name]
  return get


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_real_gguf_kept_quantized_logits_and_hamlet_perplexity(real_models, name):
  """SmolLM2-135M Q4_1 and Gemma 3 270M Q4_K_M with the base kept as the file stores it: the
  logits equal the float32-dequantized base's within float32 summation error (1e-5 of their
  magnitude), and the Hamlet perplexity is DESIGN.md's figure within 0.01%."""
  import math
  from test_real_weights import hamlet_ppl
  kept, dequantized, tok = real_models(name)
  figure, tokens, types = REAL[name]
  assert types <= {p.dtype.name for p in kept.parameters()}
  ids = np.array([tok.encode("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer")])
  want = logits(dequantized, ids)
  np.testing.assert_allclose(logits(kept, ids), want, rtol=0, atol=1e-5 * np.abs(want).max())
  ppl, n = hamlet_ppl(kept, tok)
  assert n == tokens and abs(ppl / figure - 1) < 1e-4, ppl
  if name == "smollm2":   # decoding (one row at a time: the direct loop) gives the same greedy tokens
    from models.generation import generate
    prompt = tok.encode("The capital of France is")
    assert list(generate(kept, prompt, 16)) == list(generate(dequantized, prompt, 16))


# ---- OpenCL (PoCL in CI): kernels/dequant.h read value by value inside the generated kernels

def opencl_or_skip():
  import os, minift
  if "opencl" in minift.available_devices(): return
  if os.environ.get("CI"): raise RuntimeError("no usable OpenCL device in CI: PoCL (pocl-opencl-icd) should be installed by .ci/run")
  pytest.skip("no usable OpenCL device")


def test_opencl_dequantize_bit_for_bit():
  """On OpenCL, a DEQUANT kernel of every type gives gguf's values bit for bit."""
  opencl_or_skip()
  for name in TYPES:
    d = dtypes.from_any(name)
    raw = random_blocks(name, 4, 256)
    assert same_bits(Tensor.from_quantized(raw, (4, 256), d, device="opencl").numpy(), reference(raw, name)), name


@pytest.mark.parametrize("name", ["q8_0", "q4_1", "q4_k", "q6_k"])
def test_opencl_matmuls_match_numpy(name):
  """On OpenCL an embedding lookup gives gguf's values bit for bit; x @ W.T and g @ W (the tiled
  matmul dequantizing its tile loads) and the input gradient of x @ W.T equal the NumPy
  backend's within float32 summation error."""
  opencl_or_skip()
  d = dtypes.from_any(name)
  n, k = 40, 512
  raw = random_blocks(name, n, k)
  ref = reference(raw, name)
  ws = {dev: Tensor.from_quantized(raw, (n, k), d, device=dev) for dev in ("numpy", "opencl")}
  idx = np.array([[4, 0], [39, 4]])
  assert same_bits(ws["opencl"].embedding(Tensor(idx, device="opencl")).numpy(), ref[idx])
  x, g = rng.standard_normal((6, k)).astype(np.float32), rng.standard_normal((6, n)).astype(np.float32)
  scale = np.abs(ref).max() * 4 * np.sqrt(k)
  want, got = {}, {}
  for dev, out in (("numpy", want), ("opencl", got)):
    xt = Tensor(x, device=dev, requires_grad=True)
    y = xt @ ws[dev].T
    (y * Tensor(g, device=dev)).sum().backward()   # the input gradient: g @ W
    out["fwd"], out["grad"] = y.numpy(), xt.grad.numpy()
  for key in want: np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-5 * scale, err_msg=key)


# ---- the tools' flags

def test_finetune_and_eval_base_dtype_flags(tiny, tmp_path):
  """finetune keeps a GGUF's Q8_0 blocks by default and quantizes an HF folder with --quantize,
  checkpointing half the blocks by default then (none for a float32 base; --grad_checkpoint 0
  turns it off); eval_ppl's perplexity with the base kept quantized is the float32 base's (1e-5); conflicting
  or misplaced flags are one-line errors."""
  import importlib.util, os
  from tiny_lm import save_tiny_gguf
  from test_finetune import run_cli, ROOT
  path, _ = save_tiny_gguf(tmp_path / "tiny.q8_0.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
  common = ["--data", tiny["text"], "--seq_len", "32", "--max_steps", "2"]
  r = run_cli("--model", path, "--out", str(tmp_path / "a"), *common)
  assert "(--base_dtype keep): " in r.stdout and "matrices stored as q8_0\n" in r.stdout, r.stdout
  half = "activation checkpointing (--grad_checkpoint 0.5): 1 of 2 blocks"
  assert half in r.stdout, r.stdout
  r = run_cli("--model", tiny["llama"], "--quantize", "q4_0", "--out", str(tmp_path / "b"), *common)
  assert "(--base_dtype q4_0): " in r.stdout and "matrices stored as q4_0\n" in r.stdout and half in r.stdout, r.stdout
  r = run_cli("--model", tiny["llama"], "--quantize", "q4_0", "--grad_checkpoint", "0", "--out", str(tmp_path / "b0"), *common)
  assert "activation checkpointing" not in r.stdout, r.stdout
  r = run_cli("--model", tiny["llama"], "--out", str(tmp_path / "c"), *common)
  assert "(--base_dtype float32): " in r.stdout and "matrices stored as float32\n" in r.stdout, r.stdout
  assert "activation checkpointing" not in r.stdout, r.stdout
  for argv, message in ((["--quantize", "q4_0", "--base_dtype", "float16"], "--quantize q4_0 and --base_dtype float16 disagree"),
                        (["--base_dtype", "q8_0", "--full_ft"], "--base_dtype q8_0 is for LoRA"),
                        (["--base_dtype", "q5_k"], "--base_dtype: invalid choice")):
    r = run_cli("--model", tiny["llama"], "--out", str(tmp_path / "d"), *common, *argv, check=False)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
  spec = importlib.util.spec_from_file_location("eval_ppl_tool", os.path.join(ROOT, "tools", "eval_ppl.py"))
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  ppl = {}
  for base in ("keep", "float32"):
    out = tmp_path / f"ppl_{base}.json"
    tool.main(["--model", path, "--text", tiny["text"], "--ctx", "32", "--base_dtype", base, "--json", str(out)])
    ppl[base] = json.load(open(out))["ppl"]
  assert abs(ppl["keep"] / ppl["float32"] - 1) < 1e-5, ppl


def test_merge_lora_of_a_quantized_base_is_float32():
  """merge_lora folds the update into a float32 copy of a quantized base (the blocks cannot hold
  it): W's dequantized values + scale * B @ A."""
  from minift.nn import Linear
  from minift.lora import LoRALinear
  lin = Linear(64, 32, bias=False)
  lin.weight = Tensor(rng.standard_normal((32, 64)).astype(np.float32)).quantize("q4_0")
  lora = LoRALinear(lin, r=4, alpha=8)
  lora.lora_B.assign(rng.standard_normal((32, 4)).astype(np.float32))
  merged = lora.merge()
  assert merged.weight.dtype is dtypes.float32
  want = lin.weight.numpy() + 2.0 * lora.lora_B.numpy() @ lora.lora_A.numpy()
  np.testing.assert_allclose(merged.weight.numpy(), want, rtol=1e-5, atol=1e-5)


def test_damaged_quantized_scale_is_refused_at_load(tmp_path):
  """A GGUF block whose fp16 scale is infinite (a damaged file) is a one-line FileError naming the
  tensor, before training starts, as for non-finite float weights."""
  import models
  from minift.errors import FileError
  from minift.io_gguf import GGUFFile
  from tiny_lm import save_tiny_gguf
  path, _ = save_tiny_gguf(tmp_path / "tiny.q8_0.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
  offset = GGUFFile(path).tensors["blk.1.ffn_up.weight"][2] + 34 * 5   # block 5's scale
  with open(path, "r+b") as f:
    f.seek(offset)
    f.write(np.array([0x7c00], "<u2").tobytes())   # +inf
  with pytest.raises(FileError, match=r"'blk.1.ffn_up.weight'.*non-finite q8_0 scale \(block 5\)"):
    models.load(path, dtype="keep", with_tokenizer=False)


def test_the_quantized_loops_are_named_by_all_their_source_and_settings(monkeypatch):
  """The compiled library's names hash its whole source with its settings: with DIRECT_ROWS
  changed, a library built for the old row count (whose gemv keeps fewer running sums) is
  never found and run."""
  before = nq._source.__wrapped__("sig")[0]
  monkeypatch.setattr(nq, "DIRECT_ROWS", nq.DIRECT_ROWS + 1)
  assert nq._source.__wrapped__("sig")[0] != before
