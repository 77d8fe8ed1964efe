"""--memory_mb: the memory model (minift/memplan.py) against measurements, the plan's choices,
and planned runs of tools/finetune.py whose peak RSS is measured."""
import json, os, re, subprocess, sys, tracemalloc
from dataclasses import replace
from types import SimpleNamespace
import numpy as np
import pytest
from minift import Tensor, memplan
from minift.helpers import GlobalCounters
from minift.lora import apply_lora, lora_modules
from minift.trainer import Trainer
import models
from tiny_lm import save_tiny, TEXT

FINETUNE = os.path.join(os.path.dirname(__file__), "..", "tools", "finetune.py")
ARGS = SimpleNamespace(optimizer="adamw", lr=1e-3, weight_decay=0.0, momentum=0.0, clip_grad_norm=1.0)


def step_peak(folder, targets, r, batch, seq):
  """Bytes a training step (Trainer, as finetune.py runs it) holds above what it holds between
  steps, by minift's buffer counters: the activations and the head, at its highest point."""
  model, _ = models.load(folder, with_tokenizer=False)
  apply_lora(model, targets, r=r, alpha=2 * r)
  named = [(f"{p}.{n}", getattr(m, n)) for p, m in lora_modules(model) for n in ("lora_A", "lora_B")]
  trainer = Trainer(model, [t for _, t in named], ARGS, named)
  x = np.random.default_rng(0).integers(3, 60, (batch, seq))
  peaks = []
  for _ in range(3):   # eager, captured, replayed
    base = GlobalCounters.mem_used
    GlobalCounters.reset_peak()
    trainer.train_step([(x, x)], 1e-3)
    peaks.append(GlobalCounters.mem_peak - base)
  return max(peaks)


@pytest.mark.parametrize("kind, targets", [("gpt2", None), ("gpt2", ["c_fc", "mlp.c_proj"]), ("llama", None), ("llama", ["o_proj"])])
def test_block_activations_match_buffer_counters(tmp_path, kind, targets):
  """What one block keeps for backward (memplan.activation_floats): the step's peak of a two-layer
  model minus a one-layer model's, measured, is at most the estimate and at most one hidden-size
  vector per token below it (the margin the rule adds)."""
  hidden, batch, seq, r = 64, 2, 32, 4
  folders = [save_tiny(kind, tmp_path / f"l{n}", layers=n, hidden=hidden) for n in (1, 2)]
  measured = (step_peak(folders[1], targets, r, batch, seq) - step_peak(folders[0], targets, r, batch, seq)) / (batch * seq * 4)
  m = memplan.read_model(folders[1])
  estimated = memplan.activation_floats(m, memplan.Settings(lora_rank=r, lora_targets=tuple(targets) if targets else None))
  assert measured <= estimated <= measured + hidden, (measured, estimated)


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
  """A Llama big enough that every lever matters: 4 layers of width 512, a 16k vocabulary
  (42 MB of float32 weights), and a text file."""
  folder = save_tiny("llama", tmp_path_factory.mktemp("medium"), layers=4, hidden=512, intermediate=1024, vocab=16384, context=128)
  text = tmp_path_factory.mktemp("data") / "hamlet.txt"
  text.write_text(TEXT * 4)
  return folder, str(text)


def test_plan_turns_levers_on_in_order(medium):
  """A generous limit leaves everything off; each tighter one adds the next lever: checkpointing,
  float16 frozen weights, then q8_0 and q4_0 ones (quantized on load), the sharder (with the
  largest budget that fits), micro-batches; below the smallest estimate the plan is refused,
  naming it. (With the base at q4_0 this model's sharder saves nothing: the sharder's steps are
  checked with --base_dtype float16 given.)"""
  folder, text = medium
  m = memplan.read_model(folder)
  s = memplan.Settings(batch_size=8, seq_len=128, data_bytes=os.path.getsize(text))
  E = lambda **kw: memplan.estimate(m, replace(s, **kw)).peak_mb
  steps = [E(), E(grad_checkpoint=True), E(grad_checkpoint=True, base_dtype="float16"), E(grad_checkpoint=True, base_dtype="q8_0"),
           E(grad_checkpoint=True, base_dtype="q4_0")]
  assert all(a > b + 1 for a, b in zip(steps, steps[1:])), steps   # each lever saves memory here

  def levers(room, settings=s, explicit=()):   # the levers of the plan for a limit that leaves this much room under its margin
    limit = memplan.limit_for(room)
    p = memplan.plan(m, settings, limit, explicit)
    assert p.estimate.peak_mb <= memplan.room(limit) < limit
    st = p.settings
    return st.grad_checkpoint, st.base_dtype, st.shard_budget_mb, st.grad_accum_steps

  assert levers(steps[0] + 1) == (False, "float32", None, 1)
  assert levers(steps[0] - 0.5) == (True, "float32", None, 1)
  assert levers(steps[1] - 0.5) == (True, "float16", None, 1)
  assert levers(steps[2] - 0.5) == (True, "q8_0", None, 1)
  assert levers(steps[3] - 0.5) == (True, "q4_0", None, 1)
  half = replace(s, base_dtype="float16")
  sharded = E(grad_checkpoint=True, base_dtype="float16", shard_budget_mb=memplan.MIN_BUDGET_MB)
  assert steps[2] > sharded + 1
  ckpt, base, budget, accum = levers(steps[2] - 0.5, half, ["base_dtype"])
  assert (ckpt, base, accum) == (True, "float16", 1) and memplan.MIN_BUDGET_MB <= budget
  # the largest budget that fits: one MB more would not
  assert E(grad_checkpoint=True, base_dtype="float16", shard_budget_mb=budget + 1) > steps[2] - 0.5
  ckpt, base, budget, accum = levers(sharded - 0.5, half, ["base_dtype"])
  assert (ckpt, base) == (True, "float16") and accum > 1
  with pytest.raises(memplan.PlanError) as e:
    memplan.plan(m, half, 100, ["base_dtype"])
  smallest = e.value.smallest_mb
  assert f"needs at least {smallest} MB" in str(e.value) and "8 micro-batches of 1" in str(e.value)
  memplan.plan(m, half, smallest, ["base_dtype"])   # fits
  with pytest.raises(memplan.PlanError): memplan.plan(m, half, smallest - 1, ["base_dtype"])
  with pytest.raises(memplan.PlanError) as e:   # q4_0 frozen weights are this model's smallest
    memplan.plan(m, s, steps[4] - 0.5)
  assert "q4_0 frozen weights" in str(e.value)


def test_a_smaller_base_dtype_is_one_more_entry(medium, monkeypatch):
  """The base lever is a table: an entry of BASE_BYTES and BASE_LEVERS (as a quantized base
  will be, issue #23) is estimated by its bytes per weight and tried after float16, before the
  sharder; the weights term shrinks by exactly the bytes saved on the weight matrices."""
  folder, text = medium
  m = memplan.read_model(folder)
  s = memplan.Settings(batch_size=8, seq_len=128, data_bytes=os.path.getsize(text), grad_checkpoint=True)
  monkeypatch.setitem(memplan.BASE_BYTES, "q8_0", 34 / 32)
  monkeypatch.setattr(memplan, "BASE_LEVERS", ("float16", "q8_0"))
  matrices = sum(np.prod(sh) for sh in m.params.values() if len(sh) >= 2)
  f16, q8 = (memplan.estimate(m, replace(s, base_dtype=d)) for d in ("float16", "q8_0"))
  assert f16.phases["step"] - q8.phases["step"] == pytest.approx(matrices * (2 - 34 / 32) / memplan.MB)
  p = memplan.plan(m, s, memplan.limit_for(f16.peak_mb - 0.5))
  assert (p.settings.base_dtype, p.settings.shard_budget_mb) == ("q8_0", None) and "q8_0 frozen weights" in p.line()


def test_checkpointing_a_fraction_of_the_blocks(medium):
  """--grad_checkpoint 0.5: half the blocks keep their inputs alone, so the step's activations
  are halfway between none and all checkpointed; the plan's first lever makes it every block."""
  folder, text = medium
  m = memplan.read_model(folder)
  assert memplan.checkpointed_blocks(m.layers, 0.5) == list(range(0, m.layers, 2))
  s = memplan.Settings(batch_size=8, seq_len=128, data_bytes=os.path.getsize(text))
  none, half, every = (memplan.estimate(m, replace(s, grad_checkpoint=f)).phases["step"] for f in (0.0, 0.5, 1.0))
  assert every < half < none and half == pytest.approx((none + every) / 2, rel=0.05), (none, half, every)
  p = memplan.plan(m, replace(s, grad_checkpoint=0.5), memplan.limit_for(every + 0.5))
  assert p.settings.grad_checkpoint == 1.0 and "activation checkpointing," in p.line()
  assert "checkpointing of 0.5 of the blocks" in memplan.plan(m, replace(s, grad_checkpoint=0.5), 1e6).line()


def test_plan_keeps_explicit_levers(medium):
  """A lever the user set stays as given, and the line says so; others are planned around it."""
  folder, text = medium
  m = memplan.read_model(folder)
  s = memplan.Settings(batch_size=8, seq_len=128, shard_budget_mb=40.0, base_dtype="float32")
  explicit = ["shard_budget_mb", "base_dtype"]
  limit = memplan.limit_for(memplan.estimate(m, replace(s, grad_checkpoint=True)).peak_mb + 0.5)
  p = memplan.plan(m, s, limit, explicit)
  assert (p.settings.shard_budget_mb, p.settings.base_dtype, p.settings.grad_checkpoint) == (40.0, "float32", True)
  assert "kept as given: --shard_budget_mb, --base_dtype" in p.line() and "sharder budget 40 MB" in p.line()
  with pytest.raises(memplan.PlanError) as e:
    memplan.plan(m, s, 100, explicit)
  assert "--shard_budget_mb, --base_dtype as given" in str(e.value)


def run_measured(*argv):
  """tools/finetune.py in a fresh process; (its result, its peak RSS in MB read from VmHWM at exit)."""
  wrapper = ("import atexit, runpy, sys\n"
             "def peak():\n"
             "  with open('/proc/self/status') as f: print('PEAK_RSS_MB', next(int(l.split()[1]) for l in f if l.startswith('VmHWM:')) / 1024, file=sys.stderr)\n"
             "atexit.register(peak)\n"
             "sys.argv = sys.argv[1:]\n"
             "runpy.run_path(sys.argv[0], run_name='__main__')\n")
  r = subprocess.run([sys.executable, "-c", wrapper, FINETUNE, "--quiet", *argv], capture_output=True, text=True, timeout=900)
  peaks = re.findall(r"PEAK_RSS_MB ([0-9.]+)", r.stderr)
  return r, float(peaks[-1]) if peaks else None


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak RSS is read from /proc (Linux, Android)")
@pytest.mark.slow
def test_planned_run_stays_under_its_limit(medium, tmp_path):
  """A limit that needs more than checkpointing and float16 frozen weights (the plan quantizes
  the base to q8_0 on load): the run's measured peak RSS stays under it, and the plan's line and
  summary say what it did."""
  folder, text = medium
  m = memplan.read_model(folder)
  s = memplan.Settings(batch_size=8, seq_len=128, data_bytes=os.path.getsize(text))
  limit = round(memplan.limit_for(memplan.estimate(m, replace(s, grad_checkpoint=True, base_dtype="float16")).peak_mb) - 4)
  out = str(tmp_path / "run")
  r, peak = run_measured("--model", folder, "--data", text, "--out", out, "--batch_size", "8", "--seq_len", "128",
                         "--max_steps", "3", "--memory_mb", str(limit), "--shard_dir", str(tmp_path))
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"memory plan for --memory_mb {limit}: activation checkpointing, q8_0 frozen weights, " in r.stdout
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert summary["memory_plan"]["levers"][1] == "q8_0 frozen weights"   # more than checkpointing and float16
  assert summary["memory_plan"]["limit_mb"] == limit and summary["peak_rss_mb"] <= peak + 1
  assert peak <= limit, (peak, limit, r.stdout)


def test_cli_refuses_before_loading(medium, tmp_path):
  """Too small a limit stops with an error naming the smallest that fits, before any weight is
  read; conflicting flags: explicit ones are kept (and an OpenCL device is refused)."""
  folder, text = medium
  r = subprocess.run([sys.executable, FINETUNE, "--model", folder, "--data", text, "--out", str(tmp_path / "o"), "--memory_mb", "80"],
                     capture_output=True, text=True, timeout=600)
  assert r.returncode != 0
  m = memplan.read_model(folder)
  with pytest.raises(memplan.PlanError) as e:
    memplan.plan(m, memplan.Settings(data_bytes=os.path.getsize(text)), 80)
  assert f"error: --memory_mb 80 is too small for this run: it needs at least {e.value.smallest_mb} MB" in r.stderr
  assert "parameters" not in r.stdout and not os.path.exists(tmp_path / "o" / "cache")   # neither the model nor the data was read
  bad = subprocess.run([sys.executable, FINETUNE, "--model", folder, "--data", text, "--memory_mb", "500", "--device", "opencl"],
                       capture_output=True, text=True, timeout=600)
  assert bad.returncode != 0 and "--memory_mb plans the NumPy backend" in bad.stderr
  bad = subprocess.run([sys.executable, FINETUNE, "--model", folder, "--data", text, "--memory_mb", "0"], capture_output=True, text=True, timeout=600)
  assert bad.returncode != 0 and "--memory_mb must be a positive number" in bad.stderr


def test_evaluation_in_micro_batches_gives_the_same_result(tmp_path):
  """finetune.py evaluates in micro-batches (no more memory than a step): the same perplexity."""
  folder = save_tiny("llama", tmp_path / "m")
  text = tmp_path / "t.txt"; text.write_text(TEXT)
  ppl = []
  for accum in ("1", "4"):
    out = str(tmp_path / f"o{accum}")
    r = subprocess.run([sys.executable, FINETUNE, "--quiet", "--model", folder, "--data", str(text), "--out", out, "--seq_len", "16",
                        "--max_steps", "1", "--grad_accum_steps", accum, "--val_fraction", "0.3"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    ppl.append(json.load(open(os.path.join(out, "summary.json")))["val_ppl_before"])
  np.testing.assert_allclose(ppl[0], ppl[1], rtol=1e-6)


def test_float16_frozen_weights_train_like_float32(tmp_path, monkeypatch):
  """LoRA over a base stored in float16 (--base_dtype float16, the plan's second lever) trains as
  over the float32 base, within float16's rounding of the base; with every kernel a C loop, as
  big kernels run, the matmul epilogues next to float16 weights included."""
  import minift.backends.numpy.cloops as cloops
  if not cloops.compiler.available: pytest.fail("no working C compiler (cc) on this machine")
  monkeypatch.setattr(cloops, "C_FROM", 0)
  folder = save_tiny("gpt2", tmp_path / "m", hidden=64)
  x = np.random.default_rng(0).integers(3, 60, (4, 32))
  losses = []
  for dtype in (None, "float16"):
    Tensor.manual_seed(0)
    model, _ = models.load(folder, dtype=dtype, with_tokenizer=False)
    apply_lora(model, None, r=4, alpha=8)
    named = [(f"{p}.{n}", getattr(m, n)) for p, m in lora_modules(model) for n in ("lora_A", "lora_B")]
    trainer = Trainer(model, [t for _, t in named], ARGS, named)
    losses.append([trainer.train_step([(x, x)], 1e-2)[0] for _ in range(4)])
  assert model.transformer.h[0].attn.c_attn.base.weight.dtype.name == "float16"
  np.testing.assert_allclose(losses[1], losses[0], rtol=2e-3)
  assert losses[0][-1] < losses[0][0]   # it trained


def test_float16_matmul_converts_a_block_at_a_time(monkeypatch):
  """A float32 x float16 product (a half-precision frozen weight) equals the product with the weight
  converted whole, without ever holding the whole float32 copy."""
  import minift.backends.numpy.device as B
  monkeypatch.setattr(B, "HALF_BLOCK", 1 << 16)
  rng = np.random.default_rng(0)
  x, w = rng.standard_normal((64, 256)).astype(np.float32), rng.standard_normal((4096, 256)).astype(np.float16)   # w: 2 MB as float32
  want = x @ w.astype(np.float32).T
  for swap in (False, True):   # x @ w.T, or (w @ x.T) as a kernel that wants it transposed
    tracemalloc.start()
    got = B._product(x, w.T, swap)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_allclose(got.T if swap else got, want, rtol=1e-5, atol=1e-4)
    assert peak < got.nbytes + w.nbytes, peak   # the result and a block, never w in float32 (4 MB) as well
  np.testing.assert_allclose(Tensor(x).matmul(Tensor(w).T).numpy(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak RSS is read from /proc (Linux, Android)")
def test_float16_load_drops_the_file_pages(medium):
  """Loading float32 safetensors as float16 reads each tensor's file pages and unmaps them once it
  is converted: at no time is the whole file resident next to the float16 copy. Norms are copied
  out of the mapping (used in place, each would map a megabyte or two of the file around it)."""
  folder, _ = medium
  code = ("import sys; sys.path.insert(0, %r); import models\n"
          "def hwm(): return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')) / 1024\n"
          "before = hwm(); model, _ = models.load(%r, dtype='float16', with_tokenizer=False); print(hwm() - before)\n"
          % (os.path.join(os.path.dirname(__file__), ".."), folder))
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr
  m = memplan.read_model(folder)
  half = memplan.param_bytes(m, memplan.Settings(base_dtype="float16"))[0] / memplan.MB
  whole = sum(np.prod(sh) for sh in m.params.values()) * 4 / memplan.MB
  largest = max(values for values, _, _ in m.load_order) * 4 / memplan.MB
  # the float16 weights and the largest tensor's float32 file pages, not the whole float32 file
  assert float(r.stdout.split()[-1]) < half + largest + 8 < half + whole, (r.stdout, half, whole)
  model, _ = models.load(folder, dtype="float16", with_tokenizer=False)
  base = model.model.layers[0].input_layernorm.weight.lazydata.base.buffer.data
  while not isinstance(base, np.memmap) and getattr(base, "base", None) is not None: base = base.base
  assert not isinstance(base, np.memmap)
  assert isinstance(model.model.layers[0].self_attn.q_proj.weight.lazydata.base.buffer.data, np.ndarray)
