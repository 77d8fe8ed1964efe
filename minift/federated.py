"""Federated LoRA fine-tuning on Flower: many devices train one adapter without pooling their text.

Flower (`pip install "minift[federated]"`, flwr 1.41) carries the messages: one SuperLink on a
host every device can reach, one SuperNode per device. Each round the server sends the global
LoRA adapter (PEFT key names) and the round's settings to every connected client. A client
loads its base model and its own text (paths in its SuperNode's node config), checks that the
model and the adapter are the server's, trains `local-steps` steps with minift's Trainer and
replies with its adapter, its number of training blocks (the FedAvg weight) and its metrics.
The server averages the replies with Flower's FedAvg, scores the global adapter's validation
perplexity and appends a row to <out>/rounds.jsonl. A client that refuses, fails or misses the
round timeout is left out of that round's average; the run goes on. So is a reply holding NaN
or infinity (a client whose training diverged refuses the round itself). A global adapter
that is not finite stops the run with an error (Diverged); nothing of it is saved.

A Flower app names these components (tools/federated.py writes one):
  clientapp = "minift.federated:client_app"   node config: model, data [, cache-dir]
  serverapp = "minift.federated:server_app"   run config: the keys of RUN_CONFIG
"""
import json, math, os, resource, time
from dataclasses import dataclass, asdict
from types import SimpleNamespace
import numpy as np

try:
  from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
  from flwr.clientapp import ClientApp
  from flwr.serverapp import ServerApp
  from flwr.serverapp.strategy import FedAvg
except ImportError as e:
  raise ImportError("minift.federated needs Flower: pip install 'minift[federated]' (flwr==1.41.0)") from e

import models
from minift.tensor import Tensor
from minift.data import PackedData
from minift.errors import UserError
from minift.lora import apply_lora, adapter_state, lora_modules, save_adapter, model_type, DEFAULT_TARGETS, PEFT_PREFIX
from minift.lora import base_fingerprint as model_fingerprint   # (hash, summary): architecture and parameter shapes
from minift.trainer import Trainer, Diverged, append_metrics
from minift.checkpoint import write_json, all_finite
from minift import energy
from minift.sharder import Sharder

# The server's run config: every key with its default (a Flower app's [tool.flwr.app.config]).
RUN_CONFIG = {
  "model": "",              # base model on the server host (HF folder or .gguf): initial adapter, evaluation
  "val-data": "",           # held-out text the server scores after every round
  "out": "",                # folder for rounds.jsonl, rounds/<r>/ (each round's global adapter), adapter/, summary.json
  "num-rounds": 3,
  "local-steps": 10,        # optimizer steps each client runs per round
  "batch-size": 4,
  "seq-len": 128,
  "lr": 2e-4,               # constant; every round starts a fresh AdamW on the client
  "lora-rank": 8,
  "lora-alpha": 16.0,
  "lora-targets": "",       # comma-separated module names; empty: the architecture's default
  "seed": 0,                # initial adapter and each client's data order
  "round-timeout": 600.0,   # seconds the server waits for replies; late or missing clients are left out
  "min-clients": 2,         # the first round waits until this many SuperNodes are connected
  "eval-batches": 8,        # validation batches scored per round
  "run-id": "",             # copied into summary.json: tells this run's summary from one an earlier run in "out" left
}
REFUSED = 100               # Error code of a client's refusal (Flower's own codes are below 10)


class Refused(Exception):
  """This client cannot train the server's adapter; the message goes back to the server."""


@dataclass
class RoundSettings:
  """What a client needs besides the adapter, sent by the server with every round."""
  local_steps: int
  batch_size: int
  seq_len: int
  lr: float
  seed: int
  lora_rank: int
  lora_alpha: float
  lora_targets: str         # comma-separated, resolved by the server
  model_fingerprint: str
  model_summary: str

  def to_config(self):
    return ConfigRecord({k.replace("_", "-"): v for k, v in asdict(self).items()})

  @staticmethod
  def from_config(config):
    return RoundSettings(**{k: config[k.replace("_", "-")] for k in RoundSettings.__dataclass_fields__})


def layout_difference(expected, arrays):
  """Why arrays ({PEFT key: array with .shape}) do not fit the adapter layout expected
  ({key: shape}), or None if they do."""
  missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
  if missing or extra:
    return (f"the adapters have different tensors ({len(arrays)} received, {len(expected)} expected; "
            f"first missing: {missing[:1]}, first unexpected: {extra[:1]})")
  for key, shape in expected.items():
    if tuple(arrays[key].shape) != tuple(shape):
      return f"{key} has shape {tuple(arrays[key].shape)}, expected {tuple(shape)}"
  return None


def non_finite(arrays):
  """The first key of arrays (an ArrayRecord, or {key: NumPy array}) that holds NaN or
  infinity, or None."""
  for key in arrays.keys():
    value = arrays[key]
    if not all_finite(np.asarray(value.numpy() if hasattr(value, "numpy") else value)): return key
  return None


def set_adapter(model, arrays):
  """Load adapter tensors (PEFT keys -> Flower Arrays) into model's LoRA modules."""
  for path, mod in lora_modules(model):
    for name in ("lora_A", "lora_B"):
      getattr(mod, name).assign(arrays[f"{PEFT_PREFIX}{path}.{name}.weight"].numpy().astype(np.float32))


def adapter_tensors(model):
  """[(name, tensor)] of model's LoRA tensors, for a Trainer."""
  return [(f"{path}.{n}", getattr(mod, n)) for path, mod in lora_modules(model) for n in ("lora_A", "lora_B")]


def to_arrays(model):
  return ArrayRecord({k: Array(v) for k, v in adapter_state(model).items()})


class ThrottleHook:
  """minift.energy's Throttle as local_train's hook: sleeps and pauses before each step, and
  the round's throttled and paused seconds and battery use for the reply."""
  def __init__(self, throttle):
    self.throttle, self.step, self.first_pct, self.last_pct = throttle, 0, None, None

  def before_step(self):
    row = self.throttle.before_step(self.step)
    self.step += 1
    if row["battery_pct"] is not None:
      self.first_pct = row["battery_pct"] if self.first_pct is None else self.first_pct
      self.last_pct = row["battery_pct"]

  def after_step(self, seconds): pass

  def metrics(self):
    total = self.throttle.summary()
    used = self.first_pct - self.last_pct if self.first_pct is not None else math.nan
    return {"throttled-s": float(total["throttled_s"]), "paused-s": float(total["paused_s"]), "battery-used": float(used)}


def local_train(model, data, settings, server_round, hook=None, sharder=None):
  """Train model's LoRA tensors for settings.local_steps optimizer steps in a fresh AdamW at a
  constant learning rate, on data's training blocks in their seeded order, from where the
  previous rounds stopped. Returns this round's training metrics.

  hook (optional) is where on-device resource control plugs in: an object whose
  before_step() runs before every step (the energy throttle sleeps or pauses there),
  after_step(seconds) after it, and metrics() returns {"throttled-s", "paused-s",
  "battery-used"} for the round. Without one those are 0, 0 and NaN (unknown)."""
  bs = settings.batch_size
  per_epoch = data.batches_per_epoch(bs)
  if per_epoch == 0:
    raise Refused(f"the local data has {len(data.train_x)} blocks of {settings.seq_len} tokens, fewer than a batch of {bs}")
  Tensor.manual_seed(settings.seed + server_round)   # LoRA dropout: the same masks when a round is rerun
  named = adapter_tensors(model)
  args = SimpleNamespace(optimizer="adamw", lr=settings.lr, weight_decay=0.0, momentum=0.0, clip_grad_norm=1.0)
  trainer = Trainer(model, [t for _, t in named], args, named)
  if sharder is not None: sharder.manage_model(model, trainer.opt, trainer.grad_buffers)
  losses, seconds = [], []
  first = (server_round - 1) * settings.local_steps
  for step in range(first, first + settings.local_steps):
    epoch, index = divmod(step, per_epoch)
    _, x, y = next(data.batches(bs, epoch, index))
    if hook: hook.before_step()
    t0 = time.time()
    loss, norm = trainer.train_step([(x, y)], settings.lr)
    seconds.append(time.time() - t0)
    if not (math.isfinite(loss) and math.isfinite(norm)):
      raise Refused(f"training diverged at local step {step - first + 1} of round {server_round} (loss {loss}, gradient norm {norm}); "
                    f"the server's lr ({settings.lr:g}) is too high for this client's data")
    if hook: hook.after_step(seconds[-1])
    losses.append(loss)
  resources = hook.metrics() if hook else {"throttled-s": 0.0, "paused-s": 0.0, "battery-used": math.nan}
  return {"train-loss": float(np.mean(losses)), "step-s": float(np.mean(seconds)), **resources}


def validation_score(model, val, batch_size, batches):
  """(loss, perplexity) of model on the first batches x batch_size blocks of val (a PackedData
  made with val_fraction=0, so all its blocks are in train_x)."""
  named = adapter_tensors(model)
  no_training = SimpleNamespace(optimizer="sgd", lr=0.0, weight_decay=0.0, momentum=0.0)
  return Trainer(model, [t for _, t in named], no_training, named).evaluate(val.train_x, val.train_y, batch_size, batches)


# ---- client

client_app = ClientApp()


@client_app.train()
def client_train(msg, context):
  try:
    content = train_round(msg.content, context.node_config)
  except Refused as e:
    return Message(Error(code=REFUSED, reason=f"refused: {e}"), reply_to=msg)
  return Message(content, reply_to=msg)


def train_round(content, node_config):
  """One round on this client: the reply's RecordDict, or Refused."""
  for key in ("model", "data"):
    if key not in node_config:
      raise Refused(f"this SuperNode has no '{key}' in its node config; start it with --node-config 'model=\"...\" data=\"...\"'")
  settings = RoundSettings.from_config(content["config"])
  # node config 'shard-budget-mb': page the model under that RAM budget (minift.sharder);
  # 'pm-source' (auto, sysfs, termux, sim:FILE): the energy throttle's pauses on this device
  sharder = Sharder(float(node_config["shard-budget-mb"])) if "shard-budget-mb" in node_config else None
  try:
    return _train_round(content, node_config, settings, sharder)
  finally:
    if sharder is not None: sharder.close(restore=False)


def _train_round(content, node_config, settings, sharder):
  try:
    model, tokenizer = models.load(node_config["model"])
  except (OSError, ValueError, UserError) as e:   # missing, corrupt or non-finite weights (a Hub id: not cached here)
    raise Refused(f"cannot load this client's model: {e}") from None
  fingerprint, summary = model_fingerprint(model)
  if fingerprint != settings.model_fingerprint:
    raise Refused(f"base model mismatch: this client's model {node_config['model']} ({summary}; fingerprint {fingerprint}) "
                  f"is not the server's ({settings.model_summary}; fingerprint {settings.model_fingerprint})")
  if sharder is not None: sharder.split_large(model)   # after the fingerprint: it names the whole table
  try:
    apply_lora(model, settings.lora_targets.split(","), settings.lora_rank, settings.lora_alpha)
  except ValueError as e:
    raise Refused(f"adapter config mismatch: {e}") from None
  difference = layout_difference({k: v.shape for k, v in adapter_state(model).items()}, content["arrays"])
  if difference: raise Refused(f"adapter config mismatch: {difference}")
  set_adapter(model, content["arrays"])
  try:
    data = PackedData(node_config["data"], tokenizer, settings.seq_len, val_fraction=0.0,
                      cache_dir=node_config.get("cache-dir"), seed=settings.seed)
  except UserError as e:   # the text is missing or bad, or its tokens do not fit the model
    raise Refused(f"cannot use this client's data: {e}") from None
  hook = None
  if node_config.get("pm-source", "off") != "off":
    source = energy.open_source(str(node_config["pm-source"]))
    hook = ThrottleHook(energy.Throttle(source, energy.Policy())) if source is not None else None
  stats = local_train(model, data, settings, content["config"]["server-round"], hook=hook, sharder=sharder)
  arrays = to_arrays(model)
  metrics = MetricRecord({"num-examples": len(data.train_x), **stats, "bytes-down": content["arrays"].count_bytes(),
                          "bytes-up": arrays.count_bytes(), "peak-rss-mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
  return RecordDict({"arrays": arrays, "metrics": metrics})


# ---- server

def aggregate_client_metrics(records, weight_key):
  """One MetricRecord for a round's replies: loss weighted by examples, the slowest client's
  step time, bytes and resource time summed, the largest peak RSS."""
  rows = [next(iter(r.metric_records.values())) for r in records]
  weights = np.array([row[weight_key] for row in rows], dtype=np.float64)
  battery = [row["battery-used"] for row in rows if not math.isnan(row["battery-used"])]
  return MetricRecord({
    "train-loss": float(np.dot(weights, [row["train-loss"] for row in rows]) / weights.sum()),
    "step-s": max(row["step-s"] for row in rows),
    "bytes-down": sum(row["bytes-down"] for row in rows), "bytes-up": sum(row["bytes-up"] for row in rows),
    "peak-rss-mb": max(row["peak-rss-mb"] for row in rows),
    "throttled-s": sum(row["throttled-s"] for row in rows), "paused-s": sum(row["paused-s"] for row in rows),
    "battery-used": sum(battery) if battery else math.nan})


class AdapterFedAvg(FedAvg):
  """Flower's FedAvg over LoRA adapters that also drops replies whose tensors do not fit the
  global adapter (instead of failing the round) and keeps each round's numbers for the table."""

  def __init__(self, layout, **kwargs):
    super().__init__(fraction_evaluate=0.0, train_metrics_aggr_fn=aggregate_client_metrics, **kwargs)
    self.layout, self.rounds = layout, {}

  def configure_train(self, server_round, arrays, config, grid):
    messages = list(super().configure_train(server_round, arrays, config, grid))
    self.rounds[server_round] = {"sampled": len(messages), "bytes_down": arrays.count_bytes() * len(messages), "started": time.time()}
    return messages

  def aggregate_train(self, server_round, replies):
    stats = self.rounds[server_round]
    stats["train_s"] = time.time() - stats.pop("started")
    replies, accepted, failures = list(replies), [], []
    for m in replies:
      node = m.metadata.src_node_id
      if m.has_error():
        failures.append({"node": node, "reason": m.error.reason})
      elif "arrays" not in m.content or (difference := layout_difference(self.layout, m.content["arrays"])):
        failures.append({"node": node, "reason": f"refused by the server: {difference or 'no adapter in the reply'}"})
      elif bad := non_finite(m.content["arrays"]):
        failures.append({"node": node, "reason": f"refused by the server: the update is not finite (NaN or infinity in {bad})"})
      else:
        accepted.append(m)
    for f in failures: print(f"round {server_round}: left out node {f['node']}: {f['reason']}", flush=True)
    stats.update(replied=len(accepted), failures=failures, missing=stats["sampled"] - len(replies),
                 bytes_up=sum(m.content["arrays"].count_bytes() for m in accepted),
                 clients=[{"node": m.metadata.src_node_id, **_unknown_as_none(m.content["metrics"])} for m in accepted])
    arrays, metrics = super().aggregate_train(server_round, accepted)
    stats["metrics"] = _unknown_as_none(metrics or {})
    return arrays, metrics


def _unknown_as_none(metrics):
  """A MetricRecord as a dict for JSON, NaN (unknown, e.g. battery without a meter) as None."""
  return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in dict(metrics).items()}


server_app = ServerApp()


@server_app.main()
def server_main(grid, context):
  run_server(grid, {**RUN_CONFIG, **context.run_config})


def run_server(grid, cfg):
  """Serve cfg["num-rounds"] rounds of FedAvg over a LoRA adapter of cfg["model"]; write
  <out>/rounds.jsonl (round 0: the initial adapter; rounds.partial.jsonl until the run finishes),
  rounds/<r>/, adapter/ and summary.json (with cfg["run-id"])."""
  t_start, out = time.time(), cfg["out"]
  for key in ("model", "val-data", "out"):
    if not cfg[key]: raise ValueError(f"the run config needs '{key}'")
  os.makedirs(out, exist_ok=True)
  Tensor.manual_seed(cfg["seed"])
  model, tokenizer = models.load(cfg["model"])
  fingerprint, summary = model_fingerprint(model)
  targets = [t.strip() for t in cfg["lora-targets"].split(",") if t.strip()] or DEFAULT_TARGETS[model_type(model)]
  apply_lora(model, targets, cfg["lora-rank"], cfg["lora-alpha"])
  settings = RoundSettings(cfg["local-steps"], cfg["batch-size"], cfg["seq-len"], cfg["lr"], cfg["seed"], cfg["lora-rank"],
                           cfg["lora-alpha"], ",".join(targets), fingerprint, summary)
  val = PackedData(cfg["val-data"], tokenizer, cfg["seq-len"], val_fraction=0.0, cache_dir=os.path.join(out, "cache"))
  strategy = AdapterFedAvg({k: v.shape for k, v in adapter_state(model).items()},
                           min_train_nodes=cfg["min-clients"], min_available_nodes=cfg["min-clients"])
  # rounds.jsonl, adapter/ and summary.json are the last finished run's: this run logs to
  # rounds.partial.jsonl, which becomes rounds.jsonl only once its final adapter is written
  rounds_path = os.path.join(out, "rounds.partial.jsonl")
  if os.path.exists(rounds_path): os.remove(rounds_path)   # what a failed or killed run left
  print(f"server: {summary} (fingerprint {fingerprint}); LoRA r={cfg['lora-rank']} on {','.join(targets)}; "
        f"{len(val.train_x)} validation blocks", flush=True)

  def evaluate(server_round, arrays):
    bad = non_finite(arrays)
    if bad:   # (every reply was finite: the average overflowed, or a strategy let one through)
      last = f"{os.path.join(out, 'rounds', str(server_round - 1))} is the last good one" if server_round else "nothing was trained"
      error = Diverged(f"the global adapter of round {server_round} is not finite (NaN or infinity in {bad}); it was not saved, "
                       f"{last}. Lower lr (now {cfg['lr']:g})")
      print(f"error: {error}", flush=True)   # tools/federated.py reports this line of the server's log
      raise error
    set_adapter(model, arrays)
    loss, ppl = validation_score(model, val, cfg["batch-size"], cfg["eval-batches"])
    save_adapter(model, os.path.join(out, "rounds", str(server_round)), base_model_path=cfg["model"])
    row = {"round": server_round, "val_loss": loss, "val_ppl": ppl, **strategy.rounds.get(server_round, {}),
           "elapsed_s": time.time() - t_start}
    append_metrics(rounds_path, row)
    who = f"{row['replied']} of {row['sampled']} clients replied" if server_round else "the initial adapter"
    print(f"round {server_round}: validation ppl {ppl:.2f} ({who})", flush=True)
    return MetricRecord({"val-loss": loss, "val-ppl": ppl})

  strategy.start(grid=grid, initial_arrays=to_arrays(model), num_rounds=cfg["num-rounds"], timeout=cfg["round-timeout"],
                 train_config=settings.to_config(), evaluate_fn=evaluate)
  # evaluate() loaded the last round's global adapter into the model
  save_adapter(model, os.path.join(out, "adapter"), base_model_path=cfg["model"])
  with open(rounds_path) as f: last = json.loads(f.readlines()[-1])
  os.replace(rounds_path, os.path.join(out, "rounds.jsonl"))   # (append_metrics synced every row)
  write_json(os.path.join(out, "summary.json"), {"rounds": cfg["num-rounds"], "val_ppl": last["val_ppl"], "run_id": cfg["run-id"],
                                                 "seconds": round(time.time() - t_start, 1), "adapter": os.path.join(out, "adapter")})
