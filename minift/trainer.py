"""The fine-tuning loop: schedules, gradient accumulation, clipping, activation checkpointing,
evaluation, metrics, and checkpoints that resume exactly.

A checkpoint (<out>/checkpoint/) holds the trainable tensors, the optimizer moments and step,
the schedule position, the data position (epoch, batch) and the random-number counters, and a
fingerprint of the run's settings: resuming a different run is refused. It is written as a
whole folder swapped in atomically, so a run killed at any moment resumes from the last one.
A checkpoint is never written from a state that holds NaN or infinity (NonFinite is raised
and the previous checkpoint stays).
"""
import json, math, os, shutil
from minift.tensor import Tensor, no_grad, _toposort
from minift.jit import jit
from minift.sharder import active as active_sharder
from minift.function import Function, graph_node
from minift.optim import AdamW, SGD, grad_norm, clip_scale, state_like
from minift.checkpoint import Later, atomic_folder, atomic_file, save_safetensors
from minift.data import IGNORE
from minift.nn import joined_row_pieces
from minift.memplan import checkpointed_blocks
from minift.errors import FileError, UserError, read_json, writing

SCHEDULES = ("linear", "cosine", "constant")


def lr_at(step, base_lr, warmup, total, schedule):
  """The learning rate of optimizer step `step` (0-based), as transformers' get_*_schedule_with_warmup:
  linear warmup from 0, then linear decay to 0, half a cosine to 0, or constant."""
  if schedule not in SCHEDULES: raise ValueError(f"--schedule must be one of {SCHEDULES}, not {schedule!r}")
  if step < warmup: return base_lr * step / max(1, warmup)
  if schedule == "constant": return base_lr
  progress = (step - warmup) / max(1, total - warmup)
  if schedule == "linear": return base_lr * max(0.0, 1.0 - progress)
  return base_lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


# ---- activation checkpointing

class _Recompute(Function):
  """Autograd node of a checkpointed block: keeps only the block's input; backward runs the
  block again (same random numbers) and backpropagates through the recomputed graph."""

  def __init__(self, fn, x, rng_counter):
    self.fn, self.x, self.rng_counter = fn, x.lazydata, rng_counter
    self.parents, self.in_shapes = (graph_node(x),), (x.shape,)

  def backward(self, grad):
    x = Tensor(self.x, requires_grad=True)
    saved_counter, saved_no_grad = Tensor._rng_counter, Tensor.no_grad
    Tensor._rng_counter, Tensor.no_grad = self.rng_counter, False
    try:
      out = self.fn(x)
      leaves = [n for n in _toposort(out._ctx) if isinstance(n, Tensor)] if out._ctx is not None else []
      out.backward(Tensor(grad))
      # realized now: left lazy, the parameter gradients would keep this block's recomputed
      # activations alive until the end of the whole backward pass
      Tensor.realize_all(*[t.grad for t in leaves if t.grad is not None])
    finally:
      Tensor._rng_counter, Tensor.no_grad = saved_counter, saved_no_grad
    return (x.grad.lazydata if x.grad is not None else None,)


def checkpointed(fn, x):
  """fn(x), keeping none of fn's activations for the backward pass (they are recomputed)."""
  if Tensor.no_grad: return fn(x)
  counter = Tensor._rng_counter
  with no_grad(): out = fn(x.detach()).realize()
  y = Tensor(out.lazydata, requires_grad=True)
  y._ctx = _Recompute(fn, x, counter)
  return y


def enable_activation_checkpointing(model, fraction=1.0):
  """Checkpoint the transformer blocks of model (its `h` or `layers` list): all of them, or a
  fraction spread evenly (checkpointed_blocks). Returns (blocks checkpointed, blocks)."""
  blocks = [b for name, mod in model.named_modules() for attr in ("h", "layers")
            if isinstance(getattr(mod, attr, None), list) for b in getattr(mod, attr)]
  if not blocks: raise ValueError(f"{type(model).__name__}: no block list (h or layers) to checkpoint")
  chosen = checkpointed_blocks(len(blocks), fraction)
  for i in chosen:
    forward = blocks[i].forward
    blocks[i].forward = lambda x, *args, _f=forward, **kw: checkpointed(lambda z: _f(z, *args, **kw), x)
  return len(chosen), len(blocks)


# ---- the loop

class Trainer:
  def __init__(self, model, params, args, named_params):
    """params: the tensors to train; named_params: [(name, tensor)] for checkpoints."""
    self.model, self.params, self.args, self.named_params = model, params, args, named_params
    if args.optimizer == "adamw": self.opt = AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    else: self.opt = SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    # under the sharder, gradients get buffers of their own that it pages like the weights
    # (not when it pages only the optimizer: the backward then keeps no second copy of them)
    sharder = active_sharder()
    paged = sharder is not None and not sharder.optimizer_only
    self.grad_buffers = [state_like(p, "gradient") for p in self.opt.params] if paged else None
    self.step_fn = jit(self._step)
    self.use_linear_ce = getattr(getattr(model, "config", None), "final_logit_softcapping", None) is None

  def loss(self, x, y, denominator):
    """Summed cross-entropy of next-token targets y (B, T) divided by denominator."""
    h = self.model.hidden(x)
    if self.use_linear_ce:
      return h.linear_cross_entropy(self.model.output_weight, y, ignore_index=IGNORE, denominator=denominator)
    return self.model.logits(h).cross_entropy(y, ignore_index=IGNORE, reduction="sum") / denominator

  def _step(self, *batch):
    """One optimizer step over micro-batches (x1, y1, x2, y2, ...): the same update as one
    batch of all of them (the loss is divided by the token count of the whole batch)."""
    pairs = list(zip(batch[0::2], batch[1::2]))
    denominator = sum(((y != IGNORE).sum() for _, y in pairs[1:]), (pairs[0][1] != IGNORE).sum()).maximum(1).float()
    self.opt.zero_grad()
    total = None
    for x, y in pairs:
      loss = self.loss(x, y, denominator)
      loss.backward()
      # realized last parameter first: the scheduler then computes each gradient as soon as the
      # backward pass reaches its layer, and frees that layer's activations right after
      params = self.opt.params
      with_grad = [(p, g) for p, g in zip(params, self.grad_buffers or [None] * len(params)) if p.grad is not None][::-1]
      if self.grad_buffers is None: Tensor.realize_all(loss, *[p.grad for p, _ in with_grad])   # frees this micro-batch
      else:   # each gradient goes into its paged buffer as it is made, so they need not all be in RAM at once
        writes = [g.assign(p.grad) for p, g in with_grad]
        for p, g in with_grad: p.grad = g      # (before realizing: nothing else may hold the unpaged gradient) the next micro-batch adds to it
        Tensor.realize_all(loss, *writes)
      total = loss if total is None else total + loss
    norm = grad_norm(self.params)   # logged either way
    self.opt.step(clip_scale(norm, self.args.clip_grad_norm) if self.args.clip_grad_norm else None)
    total, norm = total.realize(), norm.realize()
    self.opt.zero_grad()   # gradients kept past the step would be state the jit replay keeps alive between steps
    return total, norm

  def train_step(self, micro_batches, lr):
    self.opt.set_lr(lr)
    Tensor.training = True
    try:
      args = [Tensor(a) for xy in micro_batches for a in xy]
      loss, norm = self.step_fn(*args)
    finally:
      Tensor.training = False
    return loss.item(), norm.item()

  def evaluate(self, xs, ys, batch_size, max_batches=None):
    """Mean loss per target token over validation blocks, and its perplexity."""
    total, count = 0.0, 0
    n = len(xs) if max_batches is None else min(len(xs), max_batches * batch_size)
    with no_grad():
      for i in range(0, n, batch_size):
        x, y = xs[i:i + batch_size], ys[i:i + batch_size]
        valid = int((y != IGNORE).sum())
        if not valid: continue
        total += self.loss(Tensor(x), Tensor(y), 1.0).item()
        count += valid
    if not count: return float("nan"), float("nan")
    return total / count, math.exp(total / count)

  # ---- checkpoints

  def _state_tensors(self):
    """(checkpoint key prefix, parameter name, tensor) of every trained value: parameters and
    the optimizer's per-parameter state."""
    yield from (("param", n, t) for n, t in self.named_params)
    for prefix, attr in (("adam_m", "m"), ("adam_v", "v"), ("momentum", "buf")):
      yield from ((prefix, n, t) for (n, _), t in zip(self.named_params, getattr(self.opt, attr, [])))

  def save_checkpoint(self, folder, state, files=None):
    """Parameters, optimizer state, RNG and `state`, written atomically. A weight the sharder
    split into row pieces is saved whole, under its own name, so that a run resumed under
    another budget (other pieces, or none) reads it back. files: {name in the checkpoint: path
    copied there} (a path that does not exist gives an empty file). A non-finite tensor raises
    checkpoint.NonFinite and leaves the folder as it was."""
    tensors, by_prefix = {}, {}
    for prefix, n, t in self._state_tensors(): by_prefix.setdefault(prefix, []).append((n, t))
    for prefix, named in by_prefix.items():
      for name, (shape, parts) in joined_row_pieces(named).items():   # each made (paged in) only when written, piece by piece
        tensors[f"{prefix}.{name}"] = Later(shape, parts[0].dtype.np, lambda parts=parts: (t.numpy() for t in parts))
    if hasattr(self.opt, "t"): tensors["adam_t"] = self.opt.t.numpy()
    state = dict(state, rng_seed=Tensor._seed, rng_counter=Tensor._rng_counter)
    with atomic_folder(folder) as tmp:
      save_safetensors(os.path.join(tmp, "trainable.safetensors"), tensors, finite=True)
      with open(os.path.join(tmp, "state.json"), "w") as f: json.dump(state, f, indent=2, sort_keys=True)
      for name, source in (files or {}).items():
        if os.path.exists(source): shutil.copyfile(source, os.path.join(tmp, name))
        else: open(os.path.join(tmp, name), "w").close()

  def load_checkpoint(self, folder):
    """Restore what save_checkpoint wrote (a weight saved whole is cut into this run's row
    pieces, if it has any); returns the saved state."""
    from minift.io_hf import SafetensorsFile
    state = read_json(os.path.join(folder, "state.json"), "a checkpoint's state")
    if not isinstance(state, dict) or not all(isinstance(state.get(k), int) for k in ("rng_seed", "rng_counter")):
      raise FileError(f"{os.path.join(folder, 'state.json')}: not a checkpoint state (no rng_seed and rng_counter); the checkpoint is damaged")
    weights = os.path.join(folder, "trainable.safetensors")
    if not os.path.exists(weights): raise FileError(f"checkpoint {folder}: trainable.safetensors is missing; the checkpoint is damaged")
    saved = SafetensorsFile(weights)
    tensors = {k: saved.get(k) for k in saved.keys()}
    next_row = {}   # a whole saved weight -> its first row not yet given to a piece of this run
    def put(key, t):
      layer, _, _ = key.rpartition(".weight_pieces.")
      if key in tensors: value = tensors[key]
      elif layer and f"{layer}.weight" in tensors:   # saved whole, split in this run: this piece's rows
        whole, start = tensors[f"{layer}.weight"], next_row.get(layer, 0)
        value = whole[start:start + t.shape[0]]
        next_row[layer] = start + t.shape[0]
      else: raise FileError(f"checkpoint {folder}: it has no {key}; it was saved by a run that trains other parameters")
      if tuple(value.shape) != t.shape: raise FileError(f"checkpoint {folder}: {key} has shape {value.shape}, the run needs {t.shape}")
      t.assign(value)
    for prefix, n, t in self._state_tensors(): put(f"{prefix}.{n}", t)
    for layer, rows in next_row.items():
      if rows != tensors[f"{layer}.weight"].shape[0]:
        raise FileError(f"checkpoint {folder}: {layer}.weight has {tensors[f'{layer}.weight'].shape[0]} rows, the run's pieces {rows}")
    if hasattr(self.opt, "t"): put("adam_t", self.opt.t)
    Tensor._seed, Tensor._rng_counter = state["rng_seed"], state["rng_counter"]
    return state


class Diverged(UserError, RuntimeError):
  """Training gave NaN or infinity (a loss, a gradient norm, a trained tensor)."""


def check_step_finite(step, loss, norm):
  """Raise Diverged when the loss or gradient norm of optimizer step `step` (1-based) is NaN or infinite."""
  if not (math.isfinite(loss) and math.isfinite(norm)): raise Diverged(f"training diverged at step {step} (loss {loss}, gradient norm {norm})")


def append_metrics(path, row):
  with writing(path), open(path, "a") as f:
    f.write(json.dumps(row) + "\n")
    f.flush(); os.fsync(f.fileno())


def truncate_metrics(path, last_step):
  """Drop rows after last_step (steps a killed run logged past its last checkpoint)."""
  if not os.path.exists(path): return
  with open(path) as f: rows = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= last_step]
  with atomic_file(path, "w") as f: f.writelines(rows)
