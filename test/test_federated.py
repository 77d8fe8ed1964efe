"""Federated fine-tuning through a real Flower SuperLink and SuperNodes on loopback: FedAvg of
the client adapters, a client killed mid-round, a client with another base model refused.

One federation serves the three end-to-end tests (starting one costs seconds): four SuperNodes,
two rounds of training. Nodes 0 and 1 train a tiny Llama on shards of different sizes; node 2
has a GPT-2 as its base model and must refuse; node 3 is killed (SIGKILL, its whole process
group) as soon as its first ClientApp starts, so round 1 ends at the round timeout with the
replies of nodes 0 and 1, and the run goes on."""
import json, math, os, re, signal, subprocess, sys, threading, time
import numpy as np
import pytest
from safetensors.numpy import load_file
import models
from minift.data import PackedData
from minift.lora import apply_lora, adapter_state, load_adapter
from flwr.app import ConfigRecord, RecordDict
from minift.federated import RUN_CONFIG, RoundSettings, local_train, layout_difference, model_fingerprint, Refused, train_round, to_arrays
from tiny_lm import save_tiny, TEXT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import federated as fed_tool   # tools/federated.py

ROUNDS, STEPS, BATCH, SEQ, LR, RANK, ALPHA = 2, 3, 2, 32, 1e-2, 4, 8.0
TIMEOUT = 15.0   # seconds a round waits: the killed node never replies, so its rounds last this long
TARGETS = "q_proj,v_proj"


def kill_when_training(node, done, killed):
  """SIGKILL node's process group once it has started a ClientApp: it holds a round's message."""
  while not done.is_set():
    for pid in fed_tool.descendants(node.pid):
      try:
        with open(f"/proc/{pid}/cmdline", "rb") as f: training = b"flwr-clientapp" in f.read()
      except OSError:
        continue
      if training:
        os.killpg(node.pid, signal.SIGKILL)
        killed.set()
        return
    time.sleep(0.02)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("federated")
  llama, gpt2 = save_tiny("llama", root / "llama"), save_tiny("gpt2", root / "gpt2")
  text = root / "text.txt"
  text.write_text(TEXT * 2)
  shards, val = fed_tool.make_shards([str(text)], 2, str(root / "shards"), val_fraction=0.1)
  # unequal shards, so that the example weights of FedAvg matter
  with open(shards[0], "a") as f: f.write(TEXT)
  out = str(root / "out")
  config = {**RUN_CONFIG, "model": llama, "val-data": val, "out": out, "num-rounds": ROUNDS, "local-steps": STEPS,
            "batch-size": BATCH, "seq-len": SEQ, "lr": LR, "lora-rank": RANK, "lora-alpha": ALPHA, "lora-targets": TARGETS,
            "round-timeout": TIMEOUT, "min-clients": 4, "eval-batches": 2}
  app = fed_tool.write_app(str(root / "app"), config)
  cache = str(root / "cache")
  done, killed = threading.Event(), threading.Event()
  t0 = time.time()
  with fed_tool.Federation(str(root / "fed")) as fed:
    fed.start_superlink()
    for model, shard in ((llama, shards[0]), (llama, shards[1]), (gpt2, shards[0]), (llama, shards[1])):
      fed.add_supernode({"model": model, "data": shard, "cache-dir": cache})
    killer = threading.Thread(target=kill_when_training, args=(fed.nodes[3], done, killed))
    killer.start()
    try:
      fed.run(app, echo=False)
    finally:
      done.set()
      killer.join()
  with open(os.path.join(str(root / "fed"), "logs", "server.log")) as f: log = f.read()
  assert os.path.exists(os.path.join(out, "summary.json")), f"the run did not finish:\n{log[-3000:]}"
  with open(os.path.join(out, "rounds.jsonl")) as f: rows = [json.loads(line) for line in f]
  return dict(out=out, rows=rows, log=log, killed=killed.is_set(), shards=shards, llama=llama, gpt2=gpt2, seconds=time.time() - t0)


def test_aggregate_is_the_example_weighted_mean_of_the_client_adapters(run):
  """Each round, redo here the local training of the clients that replied, from the round's
  start adapter, and average by their numbers of training blocks: the server's global adapter.
  (A good client that missed a round's deadline on a loaded machine is simply not in that
  round's replies; both must have been averaged together in at least one round.)"""
  settings = RoundSettings(STEPS, BATCH, SEQ, LR, 0, RANK, ALPHA, TARGETS, "", "")
  tokenizer = models.load(run["llama"])[1]
  shard_of = {len(PackedData(s, tokenizer, SEQ, val_fraction=0.0).train_x): s for s in run["shards"]}
  assert len(shard_of) == 2, "the shards must differ in size for the weights to matter"
  for r in range(1, ROUNDS + 1):
    row = run["rows"][r]
    assert row["replied"] >= 1, row
    expected, total = {}, 0
    for client in row["clients"]:
      model, tokenizer = models.load(run["llama"])
      load_adapter(model, os.path.join(run["out"], "rounds", str(r - 1)))
      data = PackedData(shard_of[client["num-examples"]], tokenizer, SEQ, val_fraction=0.0, seed=0)
      local_train(model, data, settings, r)
      n = len(data.train_x)
      for k, v in adapter_state(model).items(): expected[k] = expected.get(k, 0) + n * v.astype(np.float64)
      total += n
    got = load_file(os.path.join(run["out"], "rounds", str(r), "adapter_model.safetensors"))
    start = load_file(os.path.join(run["out"], "rounds", str(r - 1), "adapter_model.safetensors"))
    assert sorted(got) == sorted(expected)
    for k in got:
      np.testing.assert_allclose(got[k], expected[k] / total, rtol=1e-5, atol=1e-6, err_msg=k)
    assert max(np.abs(got[k] - start[k]).max() for k in got) > 1e-3, "the round changed nothing"
  assert any(row["replied"] == 2 for row in run["rows"][1:]), "no round averaged both good clients"


def test_killed_client_leaves_the_run_going(run):
  assert run["killed"], "node 3 was never seen training"
  rows = run["rows"]
  assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
  first = rows[1]
  assert first["sampled"] == 4 and first["missing"] == 1 and first["train_s"] >= TIMEOUT - 1, first
  assert all(r["replied"] >= 1 and math.isfinite(r["val_ppl"]) for r in rows[1:])
  assert rows[-1]["val_ppl"] < rows[0]["val_ppl"]
  summary = json.load(open(os.path.join(run["out"], "summary.json")))
  assert os.path.exists(os.path.join(summary["adapter"], "adapter_model.safetensors"))
  assert "did not reply in time" in fed_tool.round_table(rows)


def test_client_with_another_base_model_is_refused(run):
  for row in run["rows"][1:]:
    reasons = [f["reason"] for f in row["failures"]]
    assert len(reasons) == 1 and reasons[0].startswith("refused: base model mismatch: this client's model " + run["gpt2"]), reasons
    assert "(gpt2, " in reasons[0] and "is not the server's (llama, " in reasons[0]
  assert "refused: base model mismatch" in run["log"]   # the server logged it


def test_model_fingerprint_and_adapter_layout(tmp_path):
  llama, gpt2 = save_tiny("llama", tmp_path / "llama"), save_tiny("gpt2", tmp_path / "gpt2")
  a, b, c = models.load(llama)[0], models.load(llama)[0], models.load(gpt2)[0]
  assert model_fingerprint(a) == model_fingerprint(b) and model_fingerprint(a)[0] != model_fingerprint(c)[0]
  apply_lora(a, ["q_proj"], 4, 8); apply_lora(b, ["q_proj"], 2, 8)
  layout = {k: v.shape for k, v in adapter_state(a).items()}
  assert layout_difference(layout, adapter_state(a)) is None
  assert "has shape (2, 32), expected (4, 32)" in layout_difference(layout, adapter_state(b))
  assert "different tensors" in layout_difference(layout, dict(list(adapter_state(a).items())[1:]))


class CountingHook:
  """Stands in for the energy throttle: counts the calls around each step."""
  def __init__(self): self.before, self.after = 0, []
  def before_step(self): self.before += 1
  def after_step(self, seconds): self.after.append(seconds)
  def metrics(self): return {"throttled-s": 1.5, "paused-s": 2.0, "battery-used": 0.25}


def test_local_training_hook_and_resource_metrics(tmp_path):
  folder = save_tiny("llama", tmp_path / "llama")
  text = tmp_path / "t.txt"
  text.write_text(TEXT)
  settings = RoundSettings(2, 2, 16, 1e-2, 0, 4, 8.0, "q_proj", "", "")
  model, tokenizer = models.load(folder)
  apply_lora(model, ["q_proj"], 4, 8.0)
  data = PackedData(str(text), tokenizer, 16, val_fraction=0.0)
  plain = local_train(model, data, settings, 1)
  assert (plain["throttled-s"], plain["paused-s"]) == (0.0, 0.0) and math.isnan(plain["battery-used"])
  hook = CountingHook()
  stats = local_train(model, data, settings, 2, hook=hook)
  assert hook.before == 2 and len(hook.after) == 2 and stats["battery-used"] == 0.25 and stats["paused-s"] == 2.0
  tiny = PackedData(str(text), tokenizer, 16, val_fraction=0.0)
  tiny.train_x, tiny.train_y = tiny.train_x[:1], tiny.train_y[:1]
  with pytest.raises(Refused, match="fewer than a batch of 2"): local_train(model, tiny, settings, 1)


def test_shards_and_held_out_text_cover_the_data(tmp_path):
  text = tmp_path / "t.txt"
  text.write_text(TEXT.replace(". ", ".\n"))
  shards, val = fed_tool.make_shards([str(text)], 3, str(tmp_path / "shards"), val_fraction=0.1)
  parts = [open(p).read() for p in shards]
  assert "".join(parts) + open(val).read() == text.read_text() and all(parts)
  assert all(p.endswith("\n") or p == parts[-1] for p in parts[:-1])


def test_client_refusals_and_reply(tmp_path):
  """train_round in this process: what a client answers to the server's round message."""
  folder = save_tiny("llama", tmp_path / "llama")
  text = tmp_path / "t.txt"
  text.write_text(TEXT)
  server = models.load(folder)[0]
  fingerprint, summary = model_fingerprint(server)
  apply_lora(server, ["q_proj"], 4, 8.0)
  def message(rank=4, targets="q_proj"):
    settings = RoundSettings(2, 2, 16, 1e-2, 0, rank, 8.0, targets, fingerprint, summary)
    return RecordDict({"arrays": to_arrays(server), "config": ConfigRecord({**settings.to_config(), "server-round": 1})})
  node = {"model": folder, "data": str(text)}
  reply = train_round(message(), node)
  metrics = dict(reply["metrics"])
  assert set(metrics) == {"num-examples", "train-loss", "step-s", "bytes-down", "bytes-up", "peak-rss-mb", "throttled-s", "paused-s", "battery-used"}
  assert metrics["bytes-up"] == metrics["bytes-down"] == reply["arrays"].count_bytes() and metrics["num-examples"] > 0
  for msg, node_config, reason in [
      (message(targets="c_attn"), node, "adapter config mismatch: LoRA target module(s) ['c_attn'] not found"),
      (message(rank=2), node, "adapter config mismatch: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight has shape (4, 32), expected (2, 32)"),
      (message(), {"model": folder}, "this SuperNode has no 'data' in its node config"),
      (message(), {**node, "data": str(tmp_path / "missing")}, "cannot use this client's data: --data"),
      (message(), {**node, "model": str(tmp_path / "missing")}, "cannot load this client's model")]:
    with pytest.raises(Refused, match=re.escape(reason)):
      train_round(msg, node_config)


def test_client_round_with_sharder_and_throttle_gives_the_same_adapter(tmp_path):
  """Node config shard-budget-mb and pm-source: the round pages the model under the budget and
  runs the energy throttle (a simulated battery draining 3% a reading), same adapter."""
  folder = save_tiny("llama", tmp_path / "llama")
  text = tmp_path / "t.txt"
  text.write_text(TEXT)
  sim = tmp_path / "battery.jsonl"
  sim.write_text("".join(json.dumps({"battery_pct": 80 - 3 * i, "charging": False, "temp_c": 30}) + "\n" for i in range(10)))
  server = models.load(folder)[0]
  fingerprint, summary = model_fingerprint(server)
  apply_lora(server, ["q_proj"], 4, 8.0)
  settings = RoundSettings(2, 3, 16, 1e-2, 0, 4, 8.0, "q_proj", fingerprint, summary)
  message = RecordDict({"arrays": to_arrays(server), "config": ConfigRecord({**settings.to_config(), "server-round": 1})})
  node = {"model": folder, "data": str(text)}
  plain = train_round(message, node)
  managed = train_round(message, {**node, "shard-budget-mb": 48 / 1024, "pm-source": f"sim:{sim}"})
  a, b = plain["arrays"], managed["arrays"]
  assert list(a.keys()) == list(b.keys())
  for k in a.keys(): np.testing.assert_array_equal(a[k].numpy(), b[k].numpy(), err_msg=k)
  metrics = dict(managed["metrics"])
  assert metrics["battery-used"] == 0.0 and metrics["paused-s"] == 0.0   # one reading per 10 steps: 3 steps read once
  assert math.isnan(dict(plain["metrics"])["battery-used"])


def test_minift_core_does_not_import_flower():
  code = "import sys, minift, models, minift.trainer, minift.lora, minift.data; assert 'flwr' not in sys.modules"
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
