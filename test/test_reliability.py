"""Nothing the user has is lost or damaged, and a diverged run is a failure: folder swaps killed
at every step, leftovers of killed runs, one run per --out, shard folders of killed processes,
SIGINT/SIGTERM, NaN training, a fresh run that fails in a finished run's --out."""
import json, os, shutil, signal, subprocess, sys, time
import numpy as np
import pytest
from minift import checkpoint
from minift.checkpoint import atomic_folder, recover_folder, complete_folder, clean_folder, FolderLock, FolderBusy, exchange

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINETUNE = os.path.join(ROOT, "tools", "finetune.py")


def write(folder, tag, n=3):
  for i in range(n):
    with open(os.path.join(folder, f"f{i}"), "w") as f: f.write(f"{tag}-{i}")


def content(folder):
  return {name: open(os.path.join(folder, name)).read() for name in sorted(os.listdir(folder))}


OLD, NEW = {f"f{i}": f"old-{i}" for i in range(3)}, {f"f{i}": f"new-{i}" for i in range(3)}


def swap_killed_at(path, step, can_exchange):
  """atomic_folder(path) writing NEW, in a child process that dies (os._exit: no cleanup of
  any kind, as kill -9) right after `step`; returns its exit status (9: killed there)."""
  pid = os.fork()
  if pid == 0:
    try:
      if not can_exchange: checkpoint.exchange = lambda a, b: False   # a file system that refuses RENAME_EXCHANGE
      checkpoint._reached = lambda s, p: os._exit(9) if s == step else None
      with atomic_folder(path) as tmp:
        write(tmp, "new", 2)
        if step == "writing": os._exit(9)
        write(tmp, "new")
    finally:
      os._exit(0)
  return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def leftovers(parent):
  return sorted(e for e in os.listdir(parent) if e.startswith((".tmp-", ".swap-", ".old-")))


# (existing folder?, exchange?, step killed after, what is at the path right after the kill, after recovery)
SWAPS = [(True, True, s, "old", "old") for s in ("writing", "written", "ready")] + \
        [(True, True, s, "new", "new") for s in ("exchanged", "done")] + \
        [(True, False, s, "old", "old") for s in ("writing", "written", "ready")] + \
        [(True, False, "moved aside", None, "new")] + [(True, False, s, "new", "new") for s in ("renamed in", "done")] + \
        [(False, True, s, None, None) for s in ("writing", "written")] + [(False, True, "ready", None, "new"), (False, True, "renamed in", "new", "new")]


@pytest.mark.parametrize("existing, can_exchange, step, right_after, recovered", SWAPS)
def test_folder_swap_killed_at_every_step(tmp_path, existing, can_exchange, step, right_after, recovered):
  path = str(tmp_path / "checkpoint")
  if existing:
    os.mkdir(path)
    write(path, "old")
  assert swap_killed_at(path, step, can_exchange) == 9, "the child was not killed at that step"
  want = {"old": OLD, "new": NEW, None: None}
  # right after the kill: a complete folder at the path (missing only where the file system cannot exchange, or none existed)
  assert (content(path) if os.path.exists(path) else None) == want[right_after]
  if can_exchange and existing: assert os.path.exists(path), "an exchange leaves a folder at the path at every instant"
  found = complete_folder(path)   # what a reader finds without moving anything
  assert (content(found) if os.path.exists(found) else None) == want[recovered]
  recover_folder(path)
  assert (content(path) if os.path.exists(path) else None) == want[recovered]
  assert leftovers(tmp_path) == []
  # and the next swap works from there
  with atomic_folder(path) as tmp: write(tmp, "next")
  assert content(path) == {f"f{i}": f"next-{i}" for i in range(3)} and leftovers(tmp_path) == []


def test_exchange_really_swaps_on_linux(tmp_path):
  """The exchange path is the one taken here (a Linux file system): the test above covers it."""
  if not sys.platform.startswith("linux"): pytest.skip("renameat2 is Linux's")
  a, b = tmp_path / "a", tmp_path / "b"
  a.mkdir(); b.mkdir(); (a / "x").write_text("a"); (b / "y").write_text("b")
  assert exchange(str(a), str(b)) and os.listdir(a) == ["y"] and os.listdir(b) == ["x"]
  with pytest.raises(FileNotFoundError): exchange(str(a), str(tmp_path / "missing"))


def test_clean_folder_removes_what_killed_writers_left(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "adapter").mkdir(); write(str(out / "adapter"), "old")
  (out / ".swap-adapter-abc123").mkdir(); write(str(out / ".swap-adapter-abc123"), "old")   # exchanged out, not yet deleted
  (out / ".old-checkpoint-x_1").mkdir(); write(str(out / ".old-checkpoint-x_1"), "old")    # moved aside, the new one never written
  (out / ".tmp-model-zz9").mkdir(); write(str(out / ".tmp-model-zz9"), "half", 1)          # being written
  (out / ".tmp-metrics.jsonl-q8w").write_text('{"step": 1')                                # atomic_file's temp file
  (out / ".write-test-abc").write_text("")
  (out / "my-notes.txt").write_text("mine")
  clean_folder(str(out))
  assert sorted(os.listdir(out)) == ["adapter", "checkpoint", "my-notes.txt"]
  assert content(str(out / "adapter")) == OLD and content(str(out / "checkpoint")) == OLD


def test_lock_refuses_a_second_holder_and_dies_with_its_process(tmp_path):
  out = str(tmp_path / "out")
  with FolderLock(out):
    with pytest.raises(FolderBusy, match=f"--out {out} is in use by another run \\(process {os.getpid()}\\)"): FolderLock(out)
  FolderLock(out).release()   # free again
  holder = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); from minift.checkpoint import FolderLock; "
                             f"l = FolderLock({out!r}); print('locked', flush=True); sys.stdin.read()"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(FolderBusy, match=f"process {holder.pid}"): FolderLock(out)
  finally:
    holder.kill(); holder.wait()   # SIGKILL: no cleanup runs, yet the kernel drops the lock
  FolderLock(out).release()


def test_shard_folders_of_killed_processes_are_removed(tmp_path):
  from minift.sharder import Sharder
  parent = str(tmp_path / "shards")
  def start(then):
    code = f"import sys; sys.path.insert(0, {ROOT!r}); from minift.sharder import Sharder; s = Sharder(1, directory={parent!r}); print(s.dir, flush=True); {then}"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()
  live, live_dir = start("sys.stdin.read()")
  try:
    dead, dead_dir = start("import os; os._exit(0)")   # ends without any cleanup, as a killed process
    dead.wait()
    os.makedirs(os.path.join(parent, "minift-shard-notlocked"))   # no lock file: not judged (being made, or not ours)
    assert os.path.isdir(dead_dir) and os.path.isdir(live_dir)
    sharder = Sharder(1, directory=parent)
    assert sharder.removed == [dead_dir] and not os.path.exists(dead_dir) and os.path.isdir(live_dir)
    sharder.close()
    assert not os.path.exists(sharder.dir)
  finally:
    live.kill(); live.wait()
  sharder = Sharder(1, directory=parent)   # the SIGKILLed one's folder goes now
  assert sharder.removed == [live_dir] and sorted(os.listdir(parent)) == sorted(["minift-shard-notlocked", os.path.basename(sharder.dir)])
  sharder.close()


# ---- tools/finetune.py: kills, signals, divergence

def common(tiny):
  return ["--model", tiny["llama"], "--data", tiny["text"], "--seq_len", "32", "--batch_size", "2", "--lr", "5e-3",
          "--schedule", "constant", "--lora_dropout", "0.1", "--seed", "3", "--quiet"]


def finetune(*argv, check=True):
  r = subprocess.run([sys.executable, FINETUNE, *argv], capture_output=True, text=True, timeout=600)
  if check and r.returncode != 0: raise AssertionError(f"finetune failed:\n{r.stdout}\n{r.stderr}")
  return r


def files_of(folder):
  return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory):
  """The adapter of an uninterrupted 20-step run."""
  out = str(tmp_path_factory.mktemp("straight") / "out")
  finetune(*common(tiny), "--max_steps", "20", "--out", out)
  return files_of(os.path.join(out, "adapter"))


def same_adapter(out, straight):
  from safetensors.numpy import load
  got, want = load(files_of(os.path.join(out, "adapter"))["adapter_model.safetensors"]), load(straight["adapter_model.safetensors"])
  assert sorted(got) == sorted(want)
  for k in want: np.testing.assert_allclose(got[k], want[k], atol=1e-6, err_msg=k)


KILL_IN_SWAP = """
import os, runpy, sys
sys.path.insert(0, {root!r})
from minift import checkpoint
step, nth, scheme = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if scheme == "rename": checkpoint.exchange = lambda a, b: False   # a file system that refuses RENAME_EXCHANGE
seen = []
def reached(s, path):
  if s == step and os.path.basename(path) == "checkpoint":
    seen.append(s)
    if len(seen) == nth: os._exit(9)   # as kill -9: nothing cleaned up
checkpoint._reached = reached
sys.argv = sys.argv[4:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("scheme, step, resumed_at", [("exchange", "exchanged", 10), ("rename", "moved aside", 10)])
def test_run_killed_inside_a_checkpoint_swap_resumes(tiny, tmp_path, straight, scheme, step, resumed_at):
  """Killed in the middle of swapping in its step-10 checkpoint (the second, --save_interval 5:
  the first replaced none), the run resumes from a complete checkpoint, leaves nothing
  temporary, and ends with the adapter of an uninterrupted run."""
  out = str(tmp_path / "out")
  r = subprocess.run([sys.executable, "-c", KILL_IN_SWAP.format(root=ROOT), step, "1", scheme, FINETUNE, *common(tiny),
                      "--max_steps", "20", "--save_interval", "5", "--out", out], capture_output=True, text=True, timeout=600)
  assert r.returncode == 9, r.stderr
  assert leftovers(out), "the kill left nothing mid-swap"
  assert os.path.exists(os.path.join(out, "checkpoint")) == (scheme == "exchange")
  r = finetune(*common(tiny), "--max_steps", "20", "--out", out, "--resume")
  assert f"resumed from {out}/checkpoint at step {resumed_at}" in r.stdout
  same_adapter(out, straight)
  assert leftovers(out) == [] and not os.path.exists(os.path.join(out, "metrics.partial.jsonl"))
  with open(os.path.join(out, "metrics.jsonl")) as f: assert [json.loads(l)["step"] for l in f] == list(range(1, 21))


def load_finetune():
  import importlib.util
  spec = importlib.util.spec_from_file_location("finetune_tool", FINETUNE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_a_signal_inside_a_step_waits_for_its_end():
  tool = load_finetune()
  before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  ran = []
  with tool.Signals() as signals:
    with pytest.raises(tool.Interrupted) as e:
      with signals.deferred():
        signal.raise_signal(signal.SIGTERM)
        with signals.deferred(): ran.append("inner")
        ran.append("rest of the step")
    assert ran == ["inner", "rest of the step"] and e.value.signum == signal.SIGTERM and not e.value.forced
  with tool.Signals() as signals:
    with pytest.raises(tool.Interrupted) as e:
      with signals.deferred():
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)   # a second one stops at once
        ran.append("never")
    assert e.value.forced and "never" not in ran
    with pytest.raises(tool.Interrupted):   # outside a step: at once
      signal.raise_signal(signal.SIGTERM)
  assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def rows_of(path):
  try:
    with open(path) as f: return [json.loads(l) for l in f if l.endswith("\n")]
  except FileNotFoundError:
    return []


def interrupt(argv, out, sig, after_rows):
  """Start finetune, send sig once its log has after_rows rows; returns (exit status, stderr)."""
  # (a shell's background job ignores SIGINT, and so would its children: the tool would rightly leave it ignored)
  proc = subprocess.Popen([sys.executable, FINETUNE, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  log, deadline = os.path.join(out, "metrics.partial.jsonl"), time.time() + 300
  while len(rows_of(log)) < after_rows and proc.poll() is None and time.time() < deadline: time.sleep(0.02)
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=300)
  return proc.returncode, err


def test_sigterm_and_sigint_save_a_checkpoint_and_resume_to_the_same_adapter(tiny, tmp_path, straight):
  """SIGTERM, then SIGINT in the resumed run: each stops between steps with a checkpoint of the
  last finished step, removes its shard folder, prints one line and exits 143 / 130; a last
  --resume ends with the adapter of an uninterrupted run."""
  out, shards = str(tmp_path / "out"), str(tmp_path / "shards")
  # a 50 ms sleep before each step (--pm_schedule; it changes no result) so that the run is still going when the signal comes
  argv = [*common(tiny), "--max_steps", "20", "--out", out, "--shard_budget_mb", "1", "--shard_dir", shards, "--pm_schedule", "0-:20"]
  stopped_at = 0
  for sig, code, resume in ((signal.SIGTERM, 143, []), (signal.SIGINT, 130, ["--resume"])):
    status, err = interrupt([*argv, *resume], out, sig, stopped_at + 2)
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith("energy:")]
    name = signal.Signals(sig).name
    assert status == code and len(lines) == 1 and lines[0].startswith(f"interrupted by {name} at step "), err
    step = int(lines[0].split(" at step ")[1].split()[0])
    assert lines[0] == f"interrupted by {name} at step {step} of 20; checkpoint in {out}/checkpoint: continue with --resume"
    assert stopped_at + 2 <= step < 20
    assert json.load(open(os.path.join(out, "checkpoint", "state.json")))["step"] == step
    assert [r["step"] for r in rows_of(os.path.join(out, "metrics.partial.jsonl"))] == list(range(1, step + 1))
    assert os.listdir(shards) == [], "the shard folder was left behind"
    stopped_at = step
  r = finetune(*argv, "--resume")
  assert f"at step {stopped_at}" in r.stdout
  same_adapter(out, straight)
  with open(os.path.join(out, "metrics.jsonl")) as f: assert [json.loads(l)["step"] for l in f] == list(range(1, 21))
  assert leftovers(out) == [] and os.listdir(shards) == []


def test_diverged_run_keeps_the_finished_run(tiny, tmp_path):
  """A fresh run that diverges (a huge --lr, no clipping) into an --out that holds a finished
  run: an error naming the step and the remedies, exit 1, and the finished run's adapter,
  checkpoint, metrics.jsonl and summary.json are byte for byte what they were; the same for a
  fresh run stopped by SIGTERM before its first step."""
  out = str(tmp_path / "out")
  base = [*common(tiny), "--out", out]
  finetune(*base, "--max_steps", "3")
  kept = {name: files_of(os.path.join(out, name)) for name in ("adapter", "checkpoint")}
  kept.update({name: open(os.path.join(out, name), "rb").read() for name in ("metrics.jsonl", "summary.json")})
  r = finetune(*base, "--max_steps", "6", "--lr", "1e30", "--clip_grad_norm", "0", check=False)
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
  assert r.stderr.strip().splitlines()[-1] == (
    f"error: training diverged at step 2 (loss nan, gradient norm nan); nothing from it was saved: {out} keeps the checkpoint "
    "of step 3 and any finished adapter or model. Lower --lr (now 1e+30) or turn --clip_grad_norm back on (it is 0)")
  assert {name: files_of(os.path.join(out, name)) for name in ("adapter", "checkpoint")} == {k: kept[k] for k in ("adapter", "checkpoint")}
  for name in ("metrics.jsonl", "summary.json"): assert open(os.path.join(out, name), "rb").read() == kept[name], name
  assert [row["step"] for row in rows_of(os.path.join(out, "metrics.partial.jsonl"))] == [1]   # no NaN row
  # a fresh run stopped before its first step (SIGTERM in the throttle's 10 s sleep before step 1) saves nothing either
  proc = subprocess.Popen([sys.executable, FINETUNE, *base, "--max_steps", "6", "--pm_schedule", "0-:0.1"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
  for line in proc.stdout:
    if line.startswith("validation before"): break
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 143 and err.strip().splitlines()[-1] == "interrupted by SIGTERM before the first step; nothing was saved", err
  assert {name: files_of(os.path.join(out, name)) for name in ("adapter", "checkpoint")} == {k: kept[k] for k in ("adapter", "checkpoint")}
  for name in ("metrics.jsonl", "summary.json"): assert open(os.path.join(out, name), "rb").read() == kept[name], name
  # a checkpoint saved before the divergence in the same run is the one kept
  r = finetune(*base, "--max_steps", "6", "--lr", "1e30", "--clip_grad_norm", "0", "--save_interval", "1", check=False)
  assert r.returncode == 1 and "diverged at step 2" in r.stderr and "keeps the checkpoint of step 1" in r.stderr
  assert r.stderr.strip().endswith("(it is 0), then continue from step 1 with --resume")   # this run's own checkpoint: --resume goes on
  from safetensors.numpy import load_file
  assert json.load(open(os.path.join(out, "checkpoint", "state.json")))["step"] == 1
  assert all(np.isfinite(v).all() for v in load_file(os.path.join(out, "checkpoint", "trainable.safetensors")).values())
  assert files_of(os.path.join(out, "adapter")) == kept["adapter"]


def test_a_diverged_run_resumes_with_a_lower_lr(tiny, tmp_path):
  """What the divergence error suggests works: --resume takes a changed --lr and --clip_grad_norm
  (one line says so) and continues from the last good checkpoint, which the diverged attempt
  left as it was: the result is the adapter of a run that never diverged. The new values are
  the ones used, and recorded for the next --resume."""
  out, other, straight = (str(tmp_path / name) for name in ("out", "other", "straight"))
  finetune(*common(tiny), "--out", out, "--max_steps", "3")
  r = finetune(*common(tiny), "--out", out, "--max_steps", "6", "--resume", "--lr", "1e30", "--clip_grad_norm", "0", check=False)
  assert "--resume: --lr 1e+30 (was 0.005) and --clip_grad_norm 0 (was 1) from step 3 on" in r.stdout, r.stdout
  assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].endswith(
    "keeps the checkpoint of step 3 and any finished adapter or model. Lower --lr (now 1e+30) or turn --clip_grad_norm back on (it is 0), "
    "then continue from step 3 with --resume"), r.stderr
  shutil.copytree(os.path.join(out, "checkpoint"), os.path.join(other, "checkpoint"))   # for a second resume below
  r = finetune(*common(tiny), "--out", out, "--max_steps", "6", "--resume")   # back to the checkpoint's own lr: no line
  assert "resumed from" in r.stdout and "at step 3" in r.stdout and "--resume: --lr" not in r.stdout
  finetune(*common(tiny), "--out", straight, "--max_steps", "6")
  assert files_of(os.path.join(out, "adapter")) == files_of(os.path.join(straight, "adapter"))
  # a lower lr from step 3 on: used for the steps after it, and the checkpoint records it
  r = finetune(*common(tiny), "--out", other, "--max_steps", "5", "--resume", "--lr", "1e-3")
  assert "--resume: --lr 0.001 (was 0.005) from step 3 on" in r.stdout, r.stdout
  assert [(row["step"], row["lr"]) for row in rows_of(os.path.join(other, "metrics.jsonl"))] == [(1, 5e-3), (2, 5e-3), (3, 5e-3), (4, 1e-3), (5, 1e-3)]
  assert json.load(open(os.path.join(other, "checkpoint", "state.json")))["fingerprint"]["lr"] == 1e-3
  # anything else still has to be the run's own
  r = finetune(*common(tiny), "--out", other, "--max_steps", "6", "--resume", "--lr", "1e-3", "--weight_decay", "0.1", check=False)
  assert r.returncode == 1 and "is from a different run (differs in: weight_decay)" in r.stderr, r.stderr


def test_nan_state_is_never_saved(tiny, tmp_path):
  """Checkpoints, adapters and exported models refuse NaN or infinity, naming the tensor, and
  leave what was there."""
  from types import SimpleNamespace
  import models
  from minift.lora import apply_lora, lora_modules, save_adapter
  from minift.export import save_hf
  from minift.trainer import Trainer
  model, tok = models.load(tiny["llama"])
  apply_lora(model, ["q_proj"], 4, 8.0)
  named = [(f"{p}.{n}", getattr(m, n)) for p, m in lora_modules(model) for n in ("lora_A", "lora_B")]
  trainer = Trainer(model, [t for _, t in named], SimpleNamespace(optimizer="adamw", lr=1e-3, weight_decay=0.0, momentum=0.0, clip_grad_norm=1.0), named)
  ckpt, adapter, hf = str(tmp_path / "checkpoint"), str(tmp_path / "adapter"), str(tmp_path / "model")
  full, _ = models.load(tiny["llama"])
  trainer.save_checkpoint(ckpt, {"step": 1}); save_adapter(model, adapter); save_hf(full, hf, tok)
  before = {f: files_of(f) for f in (ckpt, adapter, hf)}
  name, t = named[-1]
  bad = np.full(t.shape, 1.0, np.float32); bad[0, 0] = np.inf
  t.assign(bad)
  with pytest.raises(checkpoint.NonFinite, match=f"param.{name} holds NaN or infinity"): trainer.save_checkpoint(ckpt, {"step": 2})
  with pytest.raises(checkpoint.NonFinite, match="lora_B.weight holds NaN or infinity"): save_adapter(model, adapter)
  weight = dict(full.named_parameters())["model.layers.0.self_attn.v_proj.weight"]
  weight.assign(np.full(weight.shape, np.nan, np.float32))
  with pytest.raises(checkpoint.NonFinite, match="model.layers.0.self_attn.v_proj.weight holds NaN or infinity"): save_hf(full, hf, tok)
  assert {f: files_of(f) for f in (ckpt, adapter, hf)} == before and leftovers(tmp_path) == []


def test_a_live_run_holds_its_out(tiny, tmp_path):
  out = str(tmp_path / "out")
  with FolderLock(out):
    r = finetune(*common(tiny), "--max_steps", "1", "--out", out, check=False)
  assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
    f"error: --out {out} is in use by another run (process {os.getpid()}); wait for it to end or choose another --out")
  finetune(*common(tiny), "--max_steps", "1", "--out", out)


# ---- federated: a non-finite client update is refused, a non-finite global adapter fails the run

class LocalGrid:
  """Flower's Grid for run_server in this process: each node is a function of the round's
  message content that returns the reply's content."""
  def __init__(self, clients): self.clients = clients

  def get_node_ids(self): return list(self.clients)

  def send_and_receive(self, messages, timeout=None):
    from flwr.app import Message, Metadata
    replies = []
    for m in messages:
      node = m.metadata.dst_node_id
      meta = Metadata(run_id=1, message_id=f"reply-{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="", group_id="",
                      created_at=time.time(), ttl=60.0, message_type=m.metadata.message_type)
      replies.append(Message(self.clients[node](m.content), metadata=meta))
    return replies


def federated_setup(tiny, tmp_path, monkeypatch):
  from flwr.supercore.task_identity import TaskIdentity
  from minift.federated import RUN_CONFIG, train_round
  for key, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)): monkeypatch.setattr(TaskIdentity, key, value)   # as in a ServerApp
  cfg = {**RUN_CONFIG, "model": tiny["llama"], "val-data": tiny["text"], "out": str(tmp_path / "fed"), "num-rounds": 1, "local-steps": 2,
         "batch-size": 2, "seq-len": 16, "lr": 1e-2, "lora-rank": 4, "lora-alpha": 8.0, "lora-targets": "q_proj", "min-clients": 2, "eval-batches": 1}
  good = lambda content: train_round(content, {"model": tiny["llama"], "data": tiny["text"]})
  def broken(content):   # a client that sends back NaN (a bug, a bit flip, or on purpose)
    from flwr.app import Array, ArrayRecord, RecordDict
    reply = good(content)
    arrays = {k: reply["arrays"][k].numpy().copy() for k in reply["arrays"].keys()}
    arrays[sorted(arrays)[-1]][0, 0] = np.nan
    return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}), "metrics": reply["metrics"]})
  return cfg, good, broken


def test_federated_server_refuses_a_non_finite_update(tiny, tmp_path, monkeypatch):
  from minift.federated import run_server
  cfg, good, broken = federated_setup(tiny, tmp_path, monkeypatch)
  run_server(LocalGrid({1: good, 2: broken}), cfg)
  with open(os.path.join(cfg["out"], "rounds.jsonl")) as f: rows = [json.loads(l) for l in f]
  assert rows[1]["replied"] == 1 and [c["node"] for c in rows[1]["clients"]] == [1]
  [failure] = rows[1]["failures"]
  assert failure["node"] == 2 and failure["reason"].startswith("refused by the server: the update is not finite (NaN or infinity in base_model.")
  from safetensors.numpy import load_file
  assert all(np.isfinite(v).all() for v in load_file(os.path.join(cfg["out"], "adapter", "adapter_model.safetensors")).values())


def test_federated_run_with_a_non_finite_global_adapter_fails(tiny, tmp_path, monkeypatch, capsys):
  """Were a NaN to get through (here: the average itself is made NaN), the run stops with an
  error naming the round, and writes neither that round's adapter nor adapter/; what an earlier
  run finished in the same folder (adapter/, rounds.jsonl, summary.json) stays as it was."""
  from flwr.serverapp.strategy import FedAvg
  from minift.federated import run_server
  from minift.trainer import Diverged
  cfg, good, _ = federated_setup(tiny, tmp_path, monkeypatch)
  run_server(LocalGrid({1: good, 2: good}), {**cfg, "run-id": "first"})
  finished = {name: open(os.path.join(cfg["out"], name), "rb").read()
              for name in ("rounds.jsonl", "summary.json", os.path.join("adapter", "adapter_model.safetensors"))}
  assert json.loads(finished["summary.json"])["run_id"] == "first" and not os.path.exists(os.path.join(cfg["out"], "rounds.partial.jsonl"))
  shutil.rmtree(os.path.join(cfg["out"], "rounds", "1"))   # (the second run's round 1 must not be written)
  average = FedAvg.aggregate_train
  def nan_average(self, server_round, replies):
    from flwr.app import Array, ArrayRecord
    arrays, metrics = average(self, server_round, replies)
    return ArrayRecord({k: Array(np.full(arrays[k].numpy().shape, np.nan, np.float32)) for k in arrays.keys()}), metrics
  monkeypatch.setattr(FedAvg, "aggregate_train", nan_average)
  with pytest.raises(Diverged, match="the global adapter of round 1 is not finite"): run_server(LocalGrid({1: good, 2: good}), {**cfg, "run-id": "second"})
  assert "error: the global adapter of round 1 is not finite" in capsys.readouterr().out
  assert sorted(os.listdir(os.path.join(cfg["out"], "rounds"))) == ["0"]
  with open(os.path.join(cfg["out"], "rounds.partial.jsonl")) as f: assert [json.loads(l)["round"] for l in f] == [0]
  for name, content in finished.items(): assert open(os.path.join(cfg["out"], name), "rb").read() == content, name


def test_federated_client_refuses_when_its_training_diverges(tiny):
  import models
  from minift.data import PackedData
  from minift.federated import RoundSettings, Refused, local_train
  from minift.lora import apply_lora
  model, tok = models.load(tiny["llama"])
  apply_lora(model, ["q_proj"], 4, 8.0)
  settings = RoundSettings(3, 2, 16, 1e38, 0, 4, 8.0, "q_proj", "", "")   # B grows past float32 by step 2
  with pytest.raises(Refused, match=r"training diverged at local step 2 of round 1 \(loss nan"):
    local_train(model, PackedData(tiny["text"], tok, 16, val_fraction=0.0), settings, 1)


def test_federated_tool_reports_the_server_error(tmp_path):
  sys.path.insert(0, os.path.join(ROOT, "tools"))
  import federated as fed_tool
  log = tmp_path / "server.log"
  log.write_text("INFO :  [ROUND 1/2]\nround 1: left out node 7: refused: error: not this one\n"
                 "error: the global adapter of round 2 is not finite (NaN or infinity in x); it was not saved\nTraceback ...\n")
  assert fed_tool.server_error(str(log)) == "the global adapter of round 2 is not finite (NaN or infinity in x); it was not saved"
  log.write_text("INFO : all good\n")
  assert fed_tool.server_error(str(log)) is None and fed_tool.server_error(str(tmp_path / "missing")) is None


def test_soak_benchmark_runs_on_a_tiny_setting(tmp_path):
  """tools/bench.py --task soak, shortened: the curve comes from the rss_mb the run logged
  every `every` steps, and the growth is the most after step 2 x every over that step's."""
  sys.path.insert(0, os.path.join(ROOT, "tools"))
  import bench
  rows = []
  bench.bench_soak(rows, "numpy", 1, steps=6, every=2)
  [row] = rows
  curve = row["rss_mb"]
  assert sorted(curve) == [2, 4, 6] and all(20 < v < 4000 for v in curve.values())   # a Python process with NumPy: tens of MB
  assert row["base_step"] == 4 and row["growth"] == pytest.approx(max(curve[4], curve[6]) / curve[4] - 1)
  assert row["final_growth"] == pytest.approx(curve[6] / curve[4] - 1)


def test_metrics_rows_log_resident_memory(tiny, tmp_path):
  import resource
  tool = load_finetune()
  tool.main([*common(tiny), "--max_steps", "2", "--out", str(tmp_path / "out")])
  peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # this process's peak so far bounds what it held then
  rows = rows_of(str(tmp_path / "out" / "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 2] and all(0.3 * peak_mb < r["rss_mb"] <= peak_mb + 1 for r in rows), (rows, peak_mb)


def test_an_adapter_left_mid_swap_still_loads(tiny, tmp_path):
  """Killed between moving the old adapter aside and renaming the new one in (where the file
  system cannot exchange), the path is missing until the next run recovers it: load_adapter
  reads the new, complete one meanwhile."""
  import models
  from minift.lora import apply_lora, save_adapter, load_adapter, adapter_state
  model, _ = models.load(tiny["llama"])
  apply_lora(model, ["q_proj"], 4, 8.0)
  path = str(tmp_path / "adapter")
  save_adapter(model, path)
  os.rename(path, str(tmp_path / ".swap-adapter-k1ll3d"))
  loaded, _ = models.load(tiny["llama"])
  load_adapter(loaded, path)
  want, got = adapter_state(model), adapter_state(loaded)
  assert sorted(want) == sorted(got) and all(np.array_equal(want[k], got[k]) for k in want)
  with pytest.raises(FileNotFoundError, match="missing adapter_config.json"): load_adapter(models.load(tiny["llama"])[0], str(tmp_path / "none"))
