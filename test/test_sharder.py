"""The sharder: training under byte budgets gives the same numbers as without, the budgets hold
at every moment, pages come back in backward, prefetch changes nothing, a full disk loses
nothing; split embedding tables compute what the whole table does."""
import errno, os
import numpy as np
import pytest
import models
import minift.sharder as sharder_module
from minift import Tensor, no_grad
from minift.data import PackedData
from minift.lora import apply_lora, lora_modules
from minift.export import hf_state_dict
from minift.nn import Embedding, project
from minift.sharder import Sharder, ShardError
from minift.trainer import Trainer, lr_at
from test_finetune import TARGETS, train_args, run_cli, adapter_of

KB = 1 / 1024   # budgets are given in MiB


def train(folder, text, kind="llama", full_ft=False, steps=4, sharder=None, split=False, in_memory=False):
  """Losses and final trainable tensors (HF state dict for full fine-tuning) of a short run.
  split: let the sharder split weights larger than its budget (sums then run in another order).
  in_memory: weights copied off the memory-mapped file (as GGUF dequantization makes them)."""
  Tensor.manual_seed(0)
  model, tok = models.load(folder)
  if in_memory:
    for name, t in model.named_parameters(): model.set_parameter(name, Tensor(t.numpy().copy()))
  if full_ft:
    for p in model.parameters(): p.requires_grad = True
  if split: sharder.split_large(model)
  if full_ft: named = list(model.named_parameters())
  else:
    apply_lora(model, TARGETS[kind], r=4, alpha=8)
    named = [(f"{p}.{n}", getattr(m, n)) for p, m in lora_modules(model) for n in ("lora_A", "lora_B")]
  trainer = Trainer(model, [t for _, t in named], train_args(), named)
  if sharder is not None: sharder.manage_model(model, trainer.opt)
  data = PackedData(text, tok, 32, val_fraction=0.0, seed=0)
  batches, losses = data.batches(4, 0), []
  for step in range(steps):
    _, x, y = next(batches)
    losses.append(trainer.train_step([(x[:2], y[:2]), (x[2:], y[2:])], lr_at(step, 1e-2, 1, steps, "linear"))[0])
  final = hf_state_dict(model) if full_ft else {n: t.numpy() for n, t in named}
  return np.array(losses), final, model


def assert_bounded(sh):
  """Every recorded moment within every budget, and paging really happened."""
  assert sh.trace, "nothing was recorded"
  for event, name, gpu, ram in sh.trace:
    assert gpu <= sh.budget["gpu"] and ram <= sh.budget["ram"], (event, name, gpu, ram, sh.budget)
  assert sh.peak["ram"] <= sh.budget["ram"] and sh.peak["gpu"] <= sh.budget["gpu"]
  assert sh.stats["evictions"] > 0 and sh.stats["loads"] > 0


def through_mappings(monkeypatch, mapped):
  """Page every page (mapped) or none (copied) through a mapping of its file: by default only
  pages of a MiB or more are, and the tiny models here have none."""
  if mapped and not sharder_module.MAPPABLE: pytest.fail("mapped pages: this platform has no MADV_DONTNEED for shared mappings")
  monkeypatch.setattr(Sharder, "map_from", 1 if mapped else float("inf"))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("full_ft", [False, True], ids=["lora", "full"])
@pytest.mark.parametrize("mapped", [False, True], ids=["copied", "mapped"])
def test_sharded_training_is_exact_and_within_budget(tiny, kind, full_ft, mapped, monkeypatch):
  through_mappings(monkeypatch, mapped)
  ref_losses, ref_final, _ = train(tiny[kind], tiny["text"], kind, full_ft)
  budget = {("llama", False): 20, ("gpt2", False): 40, ("llama", True): 40, ("gpt2", True): 64}[kind, full_ft] * KB   # fits one kernel's pages
  with Sharder(ram_budget_mb=budget, trace=True) as sh:
    losses, final, model = train(tiny[kind], tiny["text"], kind, full_ft, sharder=sh)
    assert_bounded(sh)
    assert sum(p.nbytes for p in sh.pages.values()) > 2 * sh.budget["ram"]   # the state really did not fit
    if full_ft:
      assert sh.stats["writes"] > 0    # trainable state went to disk and came back
      assert any(p.kind == "gradient" and p.file for p in sh.pages.values())   # so did gradients
    assert any(p.mapping is not None for p in sh.pages.values()) == mapped
  np.testing.assert_array_equal(losses, ref_losses)
  assert ref_final.keys() == final.keys()
  for k in ref_final: np.testing.assert_array_equal(final[k], ref_final[k], err_msg=k)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("full_ft", [False, True], ids=["lora", "full"])
def test_split_weights_training_matches(tiny, kind, full_ft):
  """A budget below a weight's size splits it into row pieces (the embedding table and the
  MLP's Linear weights here, frozen under LoRA or trained); the losses, adapters and the
  exported model (pieces joined again, GPT-2's Conv1D layout restored) are the same."""
  ref_losses, ref_final, _ = train(tiny[kind], tiny["text"], kind, full_ft=full_ft)
  with Sharder(ram_budget_mb=24 * KB, trace=True) as sh:
    losses, final, model = train(tiny[kind], tiny["text"], kind, full_ft=full_ft, sharder=sh, split=True)
    split = [n for n, _ in model.named_parameters() if ".weight_pieces." in n]
    assert any(n.startswith(("model.embed_tokens.", "transformer.wte.")) for n in split)
    assert any(".mlp." in n for n in split), split
    assert_bounded(sh)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
  assert final.keys() == ref_final.keys()
  # Adam turns the ulps a different sum order leaves in a gradient into whole steps where the
  # gradient is nearly zero (GPT-2's fresh biases): 1e-5 absolute
  for k in ref_final: np.testing.assert_allclose(final[k], ref_final[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_frozen_weights_are_reloaded_in_backward_from_their_file(tiny):
  with Sharder(ram_budget_mb=20 * KB, trace=True) as sh:
    train(tiny["llama"], tiny["text"], steps=3, sharder=sh)
    page = next(p for p in sh.pages.values() if p.name.startswith("model.layers.0.self_attn.q_proj.") and p.name.endswith(".weight"))
    name = page.name   # paged while loading, renamed when LoRA wrapped the layer
    assert page.source is not None and page.source[0].endswith("model.safetensors")   # read from the weight file...
    assert page.file is None                                                          # ...never written
    loads = [i for i, (event, n, _, _) in enumerate(sh.trace) if event == "load" and n == name]
    # forward and backward of each of 3 steps read layer 0's weight: evicted in between
    assert len(loads) >= 6, loads


def test_prefetch_on_and_off_identical(tiny):
  results = []
  for prefetch in (True, False):
    with Sharder(ram_budget_mb=20 * KB, prefetch=prefetch) as sh:
      losses, final, _ = train(tiny["llama"], tiny["text"], sharder=sh)
      results.append((losses, final, sh.stats["prefetched"]))
  (l1, f1, n1), (l2, f2, n2) = results
  assert n1 > 0 and n2 == 0
  np.testing.assert_array_equal(l1, l2)
  for k in f1: np.testing.assert_array_equal(f1[k], f2[k])


@pytest.mark.parametrize("full_ft", [False, True], ids=["lora", "full"])
def test_fp16_disk(tiny, full_ft):
  """--shard_fp16_disk: frozen weights (not from a file) go to disk as float16;
  --shard_fp16_trainable: trainable weights too; optimizer moments never."""
  ref_losses, ref_final, _ = train(tiny["llama"], tiny["text"], full_ft=full_ft, in_memory=True)
  with Sharder(ram_budget_mb=40 * KB if full_ft else 20 * KB, fp16_disk=True, fp16_trainable=full_ft) as sh:
    losses, final, _ = train(tiny["llama"], tiny["text"], full_ft=full_ft, sharder=sh, in_memory=True)
    files = [p for p in sh.pages.values() if p.file]
    halves = {p.kind for p in files if os.path.getsize(p.file) * 2 == p.nbytes}
    assert halves == {"trainable" if full_ft else "frozen"}
    assert all(os.path.getsize(p.file) == p.nbytes for p in files if p.kind == "optimizer")   # Adam's g^2 underflows float16
  assert not np.array_equal(losses, ref_losses)               # rounding happened...
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-3)   # ...within float16 precision
  for k in ref_final: np.testing.assert_allclose(final[k], ref_final[k], atol=1e-2, err_msg=k)   # Adam steps are at most ~lr = 1e-2


@pytest.mark.parametrize("device", ["opencl", "vulkan"])
def test_gpu_tiers_exact(tiny, monkeypatch, device):
  """GPU -> RAM -> disk with OpenCL or Vulkan buffers in the GPU tier (PoCL and lavapipe in CI):
  the same bits as without paging."""
  monkeypatch.setenv("MINIFT_DEVICE", device)
  from minift.runtime.device import canonical_device
  if canonical_device() != device: pytest.fail(f"{device} is not available (CI installs PoCL and lavapipe)")
  ref_losses, ref_final, _ = train(tiny["llama"], tiny["text"], steps=3)
  with Sharder(ram_budget_mb=24 * KB, gpu_budget_mb=16 * KB, trace=True) as sh:
    losses, final, _ = train(tiny["llama"], tiny["text"], steps=3, sharder=sh)
    assert_bounded(sh)
    assert sh.peak["gpu"] > 0 and any(event == "upload" for event, *_ in sh.trace)
  np.testing.assert_array_equal(losses, ref_losses)
  for k in ref_final: np.testing.assert_array_equal(final[k], ref_final[k])


def test_disk_full_loses_nothing(monkeypatch, tmp_path):
  rng = np.random.default_rng(0)
  values = [rng.standard_normal((16, 16)).astype(np.float32) for _ in range(3)]
  with Sharder(ram_budget_mb=2.5 * 1024 * KB / 1024, directory=str(tmp_path)) as sh:   # room for two of them
    ts = [Tensor(v, requires_grad=True) for v in values]
    for i, t in enumerate(ts): sh.manage(t, f"w{i}")
    def full(f, arr): raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(sharder_module, "write_array", full)
    with pytest.raises(ShardError, match=r"--shard_dir .*cannot write w\d .*No space left on device.*Nothing was lost"):
      for t in ts: (t * 2).realize()
    monkeypatch.undo()
    for t, v in zip(ts, values): np.testing.assert_array_equal(t.numpy(), v)   # all intact, readable again


def test_bad_shard_dir_and_budgets(tmp_path):
  not_a_dir = tmp_path / "file"
  not_a_dir.write_text("x")
  with pytest.raises(ShardError, match="--shard_dir"): Sharder(64, directory=str(not_a_dir / "shards"))
  with pytest.raises(ValueError, match="--shard_budget_mb must be a positive"): Sharder(0)
  with Sharder(4 * KB) as sh:
    with pytest.raises(ShardError, match="larger than the smallest sharding budget"):
      sh.manage(Tensor(np.zeros((64, 64), np.float32)), "big")
    folder = sh.dir
    assert os.path.isdir(folder) and oct(os.stat(folder).st_mode & 0o777) == "0o700"
  assert not os.path.exists(folder)   # cleaned on close


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("mapped", [False, True], ids=["copied", "mapped"])
def test_paging_only_optimizer_moments_is_exact(tiny, kind, mapped, monkeypatch):
  """Full fine-tuning with only Adam's moments paged: the same bits as in memory, within the
  budget, weights and gradients never paged, and each moment written back to its one file again
  and again (mapped: written once, when it is made, then read and written in place through its
  mapping)."""
  through_mappings(monkeypatch, mapped)
  ref_losses, ref_final, _ = train(tiny[kind], tiny["text"], kind, full_ft=True)
  model, _ = models.load(tiny[kind], with_tokenizer=False)
  largest = max(t.numpy().nbytes for t in model.parameters())
  with Sharder(ram_budget_mb=3 * largest / 2**20, trace=True, optimizer_only=True) as sh:   # one weight's two moments and a bit
    losses, final, _ = train(tiny[kind], tiny["text"], kind, full_ft=True, sharder=sh, split=True)   # (split: nothing is)
    assert_bounded(sh)
    assert {p.kind for p in sh.pages.values()} == {"optimizer"}
    assert sum(p.nbytes for p in sh.pages.values()) > 2 * sh.budget["ram"]
    files = {p.file for p in sh.pages.values() if p.file}
    if mapped: assert sh.stats["writes"] == len(files) == len(sh.pages) and sh.stats["bytes_read"] == 0 and sh.stats["evictions"] > 2 * len(files)
    else: assert sh.stats["writes"] > len(files)   # pages went out more than once, each to its own file
  np.testing.assert_array_equal(losses, ref_losses)
  for k in ref_final: np.testing.assert_array_equal(final[k], ref_final[k], err_msg=k)
  with Sharder(ram_budget_mb=largest / 2**20, optimizer_only=True) as sh:   # a weight's two moments cannot fit together
    with pytest.raises(ShardError, match=r"optimizer update of .* reads its 2 moments .* raise --shard_budget_mb to at least"):
      train(tiny[kind], tiny["text"], kind, full_ft=True, sharder=sh)


def _rss_file_kb():
  with open("/proc/self/status") as f: return next(int(l.split()[1]) for l in f if l.startswith("RssFile:"))


def three_doubled_pages(sh):
  """Three 4 MiB tensors managed by sh (a 9 MiB budget holds two), each doubled in place by a
  kernel: loading one evicts another. Returns the tensors, their values before, their pages and
  the writes made while managing them."""
  rng = np.random.default_rng(0)
  values = [rng.standard_normal((1024, 1024)).astype(np.float32) for _ in range(3)]
  ts = [Tensor(v.copy(), requires_grad=True) for v in values]
  pages = [sh.manage(t, f"w{i}") for i, t in enumerate(ts)]
  written = sh.stats["writes"]
  for t in ts: t.assign(t * 2).realize()
  return ts, values, pages, written


def test_mapped_pages_leave_memory_and_keep_their_bytes_in_the_file(tmp_path):
  """A large page goes through a shared mapping of its file: evicted, its memory leaves this
  process (the budget is what it really holds); what kernels wrote is in the file without a
  write; closing brings it back as an ordinary array before the file is removed."""
  if not sharder_module.MAPPABLE: pytest.fail("this platform has no MADV_DONTNEED for shared mappings")
  with Sharder(ram_budget_mb=9, directory=str(tmp_path)) as sh:
    ts, values, pages, written = three_doubled_pages(sh)
    assert all(p.mapping is not None and p.file for p in pages) and written == 3   # each written when managed
    resident = _rss_file_kb()
    page = next(p for p in pages if p.tier == "ram")
    sh._evict(page)
    assert resident - _rss_file_kb() > 3.9 * 1024   # its 4 MiB left this process
    np.testing.assert_array_equal(np.fromfile(page.file, np.float32), 2 * values[pages.index(page)].reshape(-1))   # written through
    assert sh.stats["writes"] == 3 and sh.stats["bytes_read"] == 0 and sh.stats["bytes_mapped"] == sh.stats["loads"] * 4 * 2**20 > 0
    for t, v in zip(ts, values): np.testing.assert_array_equal(t.numpy(), 2 * v)
  assert not os.listdir(tmp_path)
  for t, v in zip(ts, values):
    buf = t.lazydata.base.buffer
    assert not isinstance(buf.data.base, type(pages[0].mapping))   # off the removed file
    np.testing.assert_array_equal(t.numpy(), 2 * v)


def test_a_file_system_that_cannot_map_pages_gets_them_copied(tmp_path, monkeypatch):
  class NoMappings:   # mmap as on a file system without shared mappings
    MADV_DONTNEED = 4
    @staticmethod
    def mmap(*args, **kwargs): raise OSError(errno.ENODEV, "No such device")
  monkeypatch.setattr(sharder_module, "mmap", NoMappings)
  with Sharder(ram_budget_mb=9, directory=str(tmp_path)) as sh:
    ts, values, pages, _ = three_doubled_pages(sh)
    assert all(p.mapping is None for p in pages) and sh.stats["bytes_read"] > 0 and sh.stats["bytes_mapped"] == 0
    for t, v in zip(ts, values): np.testing.assert_array_equal(t.numpy(), 2 * v)


def test_split_embedding_and_pieces_cross_entropy_match_whole():
  rng = np.random.default_rng(0)
  table = rng.standard_normal((50, 16)).astype(np.float32)
  h = rng.standard_normal((3, 7, 16)).astype(np.float32)
  idx, tgt = rng.integers(0, 50, (3, 7)), rng.integers(0, 50, (3, 7))
  tgt[0, 0] = -100
  results = []
  for split in (None, 13):
    emb = Embedding(50, 16)
    emb.weight = Tensor(table.copy(), requires_grad=True)
    if split: emb.split(split)
    hidden = Tensor(h, requires_grad=True)
    x = emb(Tensor(idx)) + hidden
    loss = x.linear_cross_entropy(emb.rows(), Tensor(tgt), chunk_rows=8)
    loss.backward()
    params = emb.rows() if split else [emb.weight]
    grad = np.concatenate([p.grad.numpy() for p in params])
    logits = project(Tensor(h), emb.rows()).numpy()
    results.append((loss.item(), hidden.grad.numpy(), grad, logits))
  (l1, h1, g1, o1), (l2, h2, g2, o2) = results
  assert len(emb.rows()) == 4
  np.testing.assert_allclose(l2, l1, rtol=1e-6)
  np.testing.assert_allclose(h2, h1, atol=1e-6)
  np.testing.assert_allclose(g2, g1, atol=1e-6)
  np.testing.assert_allclose(o2, o1, atol=1e-5)
  np.testing.assert_allclose(o1, h @ table.T, atol=1e-4)   # and both are what NumPy computes


def test_finetune_cli_sharded_same_adapter(tiny, tmp_path):
  common = ["--model", tiny["llama"], "--data", tiny["text"], "--max_steps", "3", "--seq_len", "32", "--quiet", "--val_fraction", "0.1"]
  run_cli(*common, "--out", str(tmp_path / "plain"))
  out = run_cli(*common, "--out", str(tmp_path / "sharded"), "--shard_budget_mb", str(20 * KB), "--shard_dir", str(tmp_path / "shards"))
  plain, sharded = adapter_of(tmp_path / "plain"), adapter_of(tmp_path / "sharded")
  assert "model.embed_tokens split into row pieces" in out.stdout   # so the sums run in another order:
  for k in plain: np.testing.assert_allclose(sharded[k], plain[k], rtol=1e-4, atol=1e-6, err_msg=k)   # Adam magnifies ulps
  assert os.listdir(tmp_path / "shards") == []   # the shard folder is gone
  bad = run_cli(*common, "--out", str(tmp_path / "bad"), "--shard_budget_mb", "-1", check=False)
  assert bad.returncode != 0 and "--shard_budget_mb must be a positive" in bad.stderr
  assert out.returncode == 0


def test_finetune_cli_optimizer_only_same_weights(tiny, tmp_path):
  from safetensors.numpy import load_file
  common = ["--model", tiny["gpt2"], "--data", tiny["text"], "--max_steps", "3", "--seq_len", "32", "--quiet", "--val_fraction", "0.1", "--full_ft"]
  run_cli(*common, "--out", str(tmp_path / "plain"))
  out = run_cli(*common, "--out", str(tmp_path / "paged"), "--shard_optimizer_only", "--shard_budget_mb", str(64 * KB), "--shard_dir", str(tmp_path / "shards"))
  assert "split into row pieces" not in out.stdout   # weights stay whole: the sums are the same
  plain, paged = (load_file(str(tmp_path / n / "model" / "model.safetensors")) for n in ("plain", "paged"))
  assert plain.keys() == paged.keys()
  for k in plain: np.testing.assert_array_equal(paged[k], plain[k], err_msg=k)
  assert os.listdir(tmp_path / "shards") == []
  small = run_cli(*common, "--out", str(tmp_path / "small"), "--shard_optimizer_only", "--shard_budget_mb", str(4 * KB), check=False)
  assert small.returncode != 0 and "moments are paged whole (--shard_optimizer_only); raise the budget" in small.stderr
  # stopped after 2 steps with the moments paged (the checkpoint reads them back from disk),
  # resumed in memory: it ends where the 3 straight steps ended
  fixed = [*common, "--schedule", "constant", "--save_interval", "2"]   # so --max_steps does not change the lr
  run_cli(*fixed, "--out", str(tmp_path / "straight"))
  run_cli(*fixed, "--out", str(tmp_path / "resumed"), "--max_steps", "2", "--shard_optimizer_only", "--shard_budget_mb", str(64 * KB))
  resumed = run_cli(*fixed, "--out", str(tmp_path / "resumed"), "--resume")
  assert "at step 2" in resumed.stdout
  straight, final = (load_file(str(tmp_path / n / "model" / "model.safetensors")) for n in ("straight", "resumed"))
  for k in straight: np.testing.assert_array_equal(final[k], straight[k], err_msg=k)


def test_resume_under_another_budget(tiny, tmp_path):
  """A checkpoint does not depend on the budget that split the weights: a full fine-tuning run
  stopped after 2 steps under one budget resumes under another (other row pieces) or under none,
  and ends where 4 straight steps end."""
  from safetensors.numpy import load_file
  common = ["--model", tiny["llama"], "--data", tiny["text"], "--seq_len", "32", "--quiet", "--val_fraction", "0.1",
            "--full_ft", "--save_interval", "2", "--schedule", "constant"]   # so --max_steps does not change the lr
  budget = lambda kb, name: ["--shard_budget_mb", str(kb * KB), "--shard_dir", str(tmp_path / name)]
  run_cli(*common, "--max_steps", "4", "--out", str(tmp_path / "straight"), *budget(20, "s0"))
  straight = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
  for name, later in (("other_budget", budget(50, "s2")), ("no_sharder", [])):
    run_cli(*common, "--max_steps", "2", "--out", str(tmp_path / name), *budget(20, "s1"))
    resumed = run_cli(*common, "--max_steps", "4", "--out", str(tmp_path / name), "--resume", *later)
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout
    final = load_file(str(tmp_path / name / "model" / "model.safetensors"))
    assert final.keys() == straight.keys()
    for k in straight: np.testing.assert_allclose(final[k], straight[k], rtol=1e-5, atol=1e-7, err_msg=f"{name}: {k}")


def test_gguf_table_is_read_in_pieces(tmp_path):
  """Under a sharder, a GGUF vocabulary table over the budget is dequantized and paged a row
  piece at a time while loading (the whole float32 table never exists); the pieces are exactly
  the table, and the model computes what the unsharded one does."""
  from test_models import make_hf, to_gguf, ids_batch
  path = to_gguf(make_hf("qwen2"), "qwen2", tmp_path / "q.gguf", "Q8_0")
  whole, _ = models.load(path, with_tokenizer=False)
  ids = ids_batch()
  with no_grad(): want = whole(Tensor(ids)).numpy()
  table = whole.model.embed_tokens.weight.numpy()
  with Sharder(ram_budget_mb=40 * KB, trace=True) as sh:
    model, _ = models.load(path, with_tokenizer=False)
    emb = model.model.embed_tokens
    assert not hasattr(emb, "weight") and len(emb.weight_pieces) >= 3
    assert all(sh.page_of(p.lazydata.base.buffer).name == f"model.embed_tokens.weight_pieces.{i}" for i, p in enumerate(emb.weight_pieces))
    np.testing.assert_array_equal(np.concatenate([p.numpy() for p in emb.weight_pieces]), table)
    with no_grad(): got = model(Tensor(ids)).numpy()
    assert_bounded(sh)
  np.testing.assert_allclose(got, want, atol=1e-5)

