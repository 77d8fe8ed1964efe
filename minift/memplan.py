"""Plan a fine-tuning run to stay under a memory limit: `tools/finetune.py --memory_mb N`.

Before any weight is read, plan() estimates the peak resident memory (RSS) of the whole
fine-tuning process from the model's config and tensor shapes and the run's settings
(estimate()), and turns levers on, one after another, until the estimate fits N:

  1. activation checkpointing   each block keeps only its input and runs again in backward:
                                one more forward pass of compute, the same gradients
  2. a smaller frozen base      (LoRA; --base_dtype) the frozen base stored in the first of
                                BASE_LEVERS: float16, half its memory, no disk, no extra pass;
                                the base is rounded to float16 (relative error <= 2^-11, far
                                below a 4-bit GGUF's own rounding); the adapter, its gradients
                                and the optimizer stay float32
  3. the sharder                weights, adapter and optimizer state paged to disk under a RAM
                                budget, the largest that fits (the least paging); full
                                fine-tuning first pages only the optimizer moments
                                (--shard_optimizer_only), which only the update reads. The same
                                results, paid for in disk traffic
  4. micro-batches              the batch split into --grad_accum_steps pieces: the same update,
                                smaller activations; last, because with checkpointing on they
                                save little, and under the sharder every micro-batch pages the
                                weights again (the sharder is dropped if it is no longer needed)

A lever the user set (--grad_checkpoint, --base_dtype, --shard_budget_mb,
--shard_optimizer_only, --shard_enable, --grad_accum_steps) is kept as given and the plan says
so; the others are planned around it. When nothing fits, PlanError names the smallest N that
would.

The memory model: the peak is the largest of the run's phases (building the tokenizer, loading
the weights, tokenizing the data, an evaluation, a training step), each a sum of the terms of
estimate(), each commented with why it is there. Activations were measured with minift's
buffer counters on models of real widths (BLOCKS); the rest against the peak RSS of real runs
of tools/finetune.py (a random GPT-2 small, SmolLM2-135M and Gemma 3 270M GGUFs; README). The
constants are this machine's (Linux, x86-64, NumPy backend, OpenBLAS); elsewhere the fixed terms
(Python, BLAS) differ by some MB.
"""
import math, os
from dataclasses import dataclass, replace

MB = 2 ** 20
CHUNK_ROWS = 256          # rows of logits linear_cross_entropy makes at a time (Tensor.linear_cross_entropy)
MIN_BUDGET_MB = 32        # the smallest sharder budget planned: below it every kernel pages
HALF_BLOCK_BYTES = 8 * MB  # float16 weights are converted to float32 for BLAS this much at a time (backends/numpy/device.py HALF_BLOCK)
# bytes per value of a frozen weight matrix stored as each --base_dtype (vectors, norms and biases
# stay float32). A quantized base (minift/quant.py) is bytes per block over values per block
# (q8_0 34/32, q4_0 18/32, q4_1 20/32, q4_K 144/256, q6_K 210/256), and, if the plan may choose
# it, one more entry of BASE_LEVERS. `keep` (as the file stores them: a GGUF's blocks) is the
# model's own figure (ModelInfo.keep_bytes)
BASE_BYTES = {"float32": 4, "float16": 2, "q8_0": 34 / 32, "q4_0": 18 / 32}
BASE_LEVERS = ("float16", "q8_0", "q4_0")   # the base dtypes plan() tries, in order, after checkpointing

# measured constants (see the module docstring)
PROCESS_MB = 48           # Python, NumPy and OpenBLAS's threads, tokenizers, tqdm, minift and its compiled C loops
GRAPH_MB_PER_LINEAR = 0.3 # Python objects of a training step's graph, kept by its capture (jit): per trained Linear
# a loaded tokenizer (the tokenizers library's tables) and its peak while being built: per entry
# (vocabulary + merges) of a GGUF byte-level BPE, per vocabulary entry of a GGUF SentencePiece
# vocabulary (its merges are worked out from the scores), per byte of an HF tokenizer.json
TOKENIZER_BYTES = {"bpe": (220, 440), "spm": (460, 1200), "json": (20, 26)}
DATA_KEPT_BYTES = 250     # per token kept: ids, mask, the packed int64 inputs and targets, and what tokenizing
                          # leaves in Python's and the tokenizer's allocators (measured: Hamlet in character tokens)
DATA_PEAK_BYTES = 400     # per token while tokenizing: the tokenizer's encoding, Python lists of ids
DEQUANT_MB = 32           # the gguf package's temporaries while it dequantizes a tensor (4M values at a time)
SLACK = 0.05              # memory a step or an evaluation frees that malloc keeps in its arenas rather than
                          # giving back: a share of what it makes
FILE_PAGE_SLACK = 0.6     # the same for frozen pages the sharder re-reads from a weight file, as a share of its budget
# the plan keeps this far below the limit, for what the model misses: the estimates of the runs
# measured were 5% low at worst (README)
MARGIN, MARGIN_MB = 0.05, 8


class PlanError(ValueError):
  """--memory_mb cannot be met; smallest_mb is the smallest limit that could be."""
  def __init__(self, message, smallest_mb=None):
    super().__init__(message)
    self.smallest_mb = smallest_mb


# ---- what a block keeps for its backward pass

# Per architecture, in floats per token per layer; measured with minift's buffer counters on one-
# and two-layer models of real widths, for LoRA on one, some and all Linears:
#   always:   kept whatever trains: the inputs of norms, activations and attention (q, k, v)
#   inputs:   the tensor each Linear reads (by its path in a block): a trained Linear keeps it for
#             its weight's (or LoRA A's) gradient, once per tensor however many Linears read it
#   kept_out: Linears whose output feeds a norm, an activation or a product: trained, their output
#             is kept as well (as the two parts, base and adapter, the sum is made of)
# The rule matches every measured case or overestimates it by at most one hidden-size vector per
# token, which activation_floats() adds to all of them, so that it underestimates none.

def _gpt2_block(cfg, linears):
  C, I = cfg.n_embd, cfg.n_inner or 4 * cfg.n_embd
  return dict(always=5 * C + I,   # ln_1 and ln_2 inputs, q k v, the GELU's input
              inputs={"attn.c_attn": "ln_1", "attn.c_proj": "attention", "mlp.c_fc": "ln_2", "mlp.c_proj": "gelu"},
              kept_out={"mlp.c_fc"}, hidden=C)


def _llama_block(cfg, linears):
  C, I = cfg.hidden_size, cfg.intermediate_size
  q, kv = linears["self_attn.q_proj"][1], linears["self_attn.k_proj"][1]
  return dict(always=2 * C + q + 2 * kv + 2 * I,   # the two norms' inputs, q k v after RoPE, gate and up
              inputs={"self_attn.q_proj": "norm1", "self_attn.k_proj": "norm1", "self_attn.v_proj": "norm1",
                      "self_attn.o_proj": "attention", "mlp.gate_proj": "norm2", "mlp.up_proj": "norm2", "mlp.down_proj": "product"},
              kept_out={"mlp.gate_proj", "mlp.up_proj"}, hidden=C)


def _gemma3_block(cfg, linears):
  C, I = cfg.hidden_size, cfg.intermediate_size
  q, kv = linears["self_attn.q_proj"][1], linears["self_attn.k_proj"][1]
  # four block norms and per-head q and k norms: their inputs too (q and k before and after them)
  return dict(_llama_block(cfg, linears), always=3 * C + 2 * q + 3 * kv + 2 * I,
              kept_out={"self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"})


BLOCKS = {"gpt2": _gpt2_block, "llama": _llama_block, "qwen2": _llama_block, "gemma3_text": _gemma3_block}


# ---- the model, from its config and headers

@dataclass
class ModelInfo:
  """What the plan knows of a model before reading its weights."""
  path: str
  arch: str              # HF model_type (a key of BLOCKS)
  config: object         # the model's config dataclass
  params: dict           # parameter name -> shape, as the model names them (a tied head once)
  linears: dict          # Linear path -> (in_features, out_features)
  block_prefix: str      # the path of the first block ("model.layers.0")
  layers: int
  vocab: int
  hidden: int
  file_backed: bool      # all float32 safetensors: weights are pages of the weight file, used in place
  load_order: list       # (values, dims, is a vocabulary table) of each tensor of the weight file(s), in the order the loader reads them
  tokenizer: tuple       # (kind, size): a key of TOKENIZER_BYTES and what its bytes are per
  softcap: bool          # final logit soft-capping: whole logits instead of linear_cross_entropy's chunks
  skeleton: object       # the model built from its config: its parameters are lazy constants, nothing allocated
  keep_bytes: float = 4  # bytes per value of its weight matrices as the file stores them (--base_dtype keep)


def base_bytes(m, base_dtype):
  """Bytes per value of model m's frozen weight matrices stored as base_dtype."""
  return m.keep_bytes if base_dtype == "keep" else BASE_BYTES[base_dtype]


def read_model(path):
  """ModelInfo of an HF folder or a GGUF file, reading only config.json and the file headers."""
  import models
  from minift.nn import Linear
  if not os.path.exists(path): raise FileNotFoundError(f"model path {path} does not exist")
  if os.path.isdir(path):
    from minift.io_hf import read_config, SafetensorsFolder
    config = read_config(path)
    cls = models.model_class(config.get("model_type"), f"{os.path.join(path, 'config.json')} (model_type)")
    files = SafetensorsFolder(path)
    file_backed = all(files.files[files.where[k]].header[k]["dtype"] == "F32" for k in files.keys())
    shapes = [files.shape(k) for k in files.keys()]
    stored = [(math.prod(files.shape(k)), 2 * math.prod(files.shape(k)) if files.stored_type(k) == "F16" else 4 * math.prod(files.shape(k)))
              for k in files.keys() if len(files.shape(k)) >= 2]   # (keep: float16 stays, the rest is float32)
    tokenizer = ("json", sum(os.path.getsize(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.json", "merges.txt")
                             if os.path.exists(os.path.join(path, f))))
  else:
    from minift.io_gguf import GGUFFile, gguf_config
    g = GGUFFile(path)
    config = gguf_config(g)
    cls = models.model_class(g.arch, f"{path} (general.architecture)", models.GGUF_ARCHITECTURES)
    file_backed = False   # dequantized copies (a float32 GGUF's would be views: this overestimates it)
    shapes = [g.shape(n) for n in g.tensors]
    stored = [(math.prod(g.shape(n)), g.tensors[n][3]) for n in g.tensors if len(g.shape(n)) >= 2]   # (values, bytes in the file)
    vocab, merges = len(g.get("tokenizer.ggml.tokens") or []), len(g.get("tokenizer.ggml.merges") or [])
    tokenizer = ("spm", vocab) if g.get("tokenizer.ggml.model") == "llama" else ("bpe", vocab + merges)
    del g
  model = cls.from_config_dict(config)
  arch = getattr(model.config, "model_type", None) or model.model_type
  if arch not in BLOCKS: raise PlanError(f"--memory_mb: no memory model for architecture {arch!r}")
  blocks = [f"{name}.{attr}".lstrip(".") for name, mod in model.named_modules() for attr in ("h", "layers")
            if isinstance(getattr(mod, attr, None), list)]
  head = model.output_weight
  load_order = [(math.prod(sh), len(sh), len(sh) == 2 and sh[0] == head.shape[0]) for sh in shapes]   # (a table has vocabulary rows)
  return ModelInfo(path, arch, model.config, {n: tuple(t.shape) for n, t in model.named_parameters()},
                   {n: (mod.in_features, mod.out_features) for n, mod in model.named_modules() if isinstance(mod, Linear)},
                   f"{blocks[0]}.0", len(model.get_submodule(blocks[0])), head.shape[0], head.shape[1], file_backed, load_order,
                   tokenizer, getattr(model.config, "final_logit_softcapping", None) is not None, model,
                   sum(b for _, b in stored) / max(1, sum(v for v, _ in stored)))


# ---- the run's settings

@dataclass(frozen=True)
class Settings:
  """The settings of a run that its memory depends on (tools/finetune.py's flags)."""
  batch_size: int = 4
  seq_len: int = 128
  grad_accum_steps: int = 1
  full_ft: bool = False
  lora_rank: int = 8
  lora_targets: tuple = None        # None: the architecture's default
  optimizer: str = "adamw"
  momentum: float = 0.0
  grad_checkpoint: float = 0.0       # the fraction of blocks checkpointed (checkpointed_blocks)
  base_dtype: str = "float32"      # storage of the frozen weight matrices (a key of BASE_BYTES)
  shard_budget_mb: float = None     # None: no sharder
  shard_optimizer_only: bool = False
  data_bytes: int = 0               # size of the training text on disk

  def levers(self):
    """The settings in words, for the plan's line."""
    out = ["activation checkpointing" if self.grad_checkpoint >= 1 else f"activation checkpointing of {self.grad_checkpoint:g} of the blocks"
           if self.grad_checkpoint else "no checkpointing"]
    if not self.full_ft: out.append("frozen weights as the file stores them" if self.base_dtype == "keep" else f"{self.base_dtype} frozen weights")
    if self.shard_budget_mb is None: out.append("no sharder")
    else: out.append(f"sharder budget {self.shard_budget_mb:g} MB" + (" (optimizer moments only)" if self.shard_optimizer_only else ""))
    micro = self.batch_size // self.grad_accum_steps
    out.append(f"{self.grad_accum_steps} micro-batch{'es' if self.grad_accum_steps > 1 else ''} of {micro}")
    return out


def checkpointed_blocks(n, fraction):
  """Which of n blocks to checkpoint for a fraction of them: about n * fraction, spread evenly
  (0.5: every other block from the first; 1: all)."""
  return [i for i in range(n) if math.floor((i + 1) * fraction + 0.5) > math.floor(i * fraction + 0.5)]


def trained_linears(m, s):
  """Paths of the Linears that train: LoRA's targets, or every one."""
  if s.full_ft: return list(m.linears)
  from minift.lora import DEFAULT_TARGETS, _targets
  return _targets(m.skeleton, list(s.lora_targets) if s.lora_targets else DEFAULT_TARGETS[m.arch])


def param_bytes(m, s):
  """Bytes of (frozen weights, trainable tensors, optimizer moments, gradients) for settings s."""
  if s.full_ft:
    n_train, frozen = sum(math.prod(sh) for sh in m.params.values()), 0
  else:
    trained = set(trained_linears(m, s))
    n_train = sum(s.lora_rank * (i + o) for p, (i, o) in m.linears.items() if p in trained)   # A (r, in), B (out, r)
    frozen = sum(math.prod(sh) * (base_bytes(m, s.base_dtype) if len(sh) >= 2 else 4) for sh in m.params.values())   # (vectors stay float32)
  moments = n_train * 4 * (2 if s.optimizer == "adamw" else 1 if s.momentum else 0)
  return frozen, n_train * 4, moments, n_train * 4


def activation_floats(m, s):
  """Floats per token that one block keeps for its backward pass (see BLOCKS)."""
  prefix = m.block_prefix + "."
  linears = {p[len(prefix):]: io for p, io in m.linears.items() if p.startswith(prefix)}   # {path in a block: (in, out)}
  block = BLOCKS[m.arch](m.config, linears)
  trained = [p[len(prefix):] for p in trained_linears(m, s) if p.startswith(prefix)]
  floats = block["always"] + block["hidden"]                                  # + the margin of one hidden-size vector
  floats += sum(linears[p][0] for p in {block["inputs"][p]: p for p in trained}.values())   # each input tensor once
  floats += sum(linears[p][1] for p in trained if p in block["kept_out"])
  return floats + (0 if s.full_ft else s.lora_rank * len(trained))            # LoRA's rank-r intermediates


# ---- the estimate

@dataclass
class Estimate:
  peak_mb: float
  phase: str         # the phase with the highest peak
  terms: dict        # name -> MB in that phase
  phases: dict       # phase -> MB


def estimate(m, s, eval_batch=None):
  """Estimated peak RSS (MB) of tools/finetune.py training model m (a ModelInfo) with settings s.
  eval_batch: sequences per evaluation batch (finetune.py evaluates in micro-batches: the default)."""
  f32, L, V, C = 4, m.layers, m.vocab, m.hidden
  tokens = s.batch_size // s.grad_accum_steps * s.seq_len     # of a micro-batch: what activations scale with
  eval_tokens = (eval_batch or s.batch_size // s.grad_accum_steps) * s.seq_len

  # -- parameters: what stays in RAM of them
  frozen, trainable, moments, grads = param_bytes(m, s)
  sharded = s.shard_budget_mb is not None
  budget = (s.shard_budget_mb or 0) * MB
  if not sharded: weights = frozen + trainable + moments
  elif s.shard_optimizer_only: weights = frozen + trainable + min(budget, moments)   # only the moments are paged
  else:                                                        # weights, adapter, moments and gradient buffers: all paged
    weights, grads = min(budget, frozen + trainable + moments + grads), 0
    if m.file_backed and s.base_dtype == "float32":
      # frozen pages re-read from the weight file come from malloc, which keeps much of
      # what an evicted page frees in its arenas instead of giving it back
      weights += FILE_PAGE_SLACK * budget

  # -- activations a micro-batch keeps for backward
  layer = tokens * activation_floats(m, s) * f32
  # a checkpointed block keeps its input and runs again in backward (one at a time); the others keep all
  ck = len(checkpointed_blocks(L, s.grad_checkpoint))
  kept, recompute = ck * tokens * C * f32 + (L - ck) * layer, layer if ck else 0

  # -- the head: linear_cross_entropy makes CHUNK_ROWS rows of logits at a time (their softmax and
  # gradient written over them) next to the whole hidden states and their gradient; soft-capped
  # logits are made whole, with their gradient
  head = 3 * tokens * V * f32 if m.softcap else min(CHUNK_ROWS, tokens) * V * f32 + 2 * tokens * C * f32
  eval_head = 3 * eval_tokens * V * f32 if m.softcap else min(CHUNK_ROWS, eval_tokens) * V * f32 + eval_tokens * C * f32
  converted = s.base_dtype != "float32"
  half = HALF_BLOCK_BYTES if converted else 0                 # a slice of a stored weight, in float32 for BLAS

  if s.full_ft:   # gradients arrive as backward frees activations, last layer first: the larger of the two
    step = max(kept + recompute, grads) + head + half
  else:           # the head's chunks are gone when backward recomputes a block
    step = kept + max(head, recompute) + grads + half
  evaluation = eval_tokens * activation_floats(m, s) * f32 + eval_head + half   # no gradients: one block at a time

  # -- tokenizer and data
  kind, size = m.tokenizer
  tokenizer, tokenizer_peak = (size * b for b in TOKENIZER_BYTES[kind])
  entries = size / 16 if kind == "json" else size                # (a tokenizer.json holds about 16 bytes per entry)
  # tokens in the data: a character vocabulary makes one per byte; a subword one fewer (English
  # about one per 4 bytes; 2 leaves room for code and other scripts)
  data_tokens = s.data_bytes / (1 if entries < 1000 else 2)
  data, tokenizing = data_tokens * DATA_KEPT_BYTES, data_tokens * DATA_PEAK_BYTES

  # -- loading: tensors are read in file order, each next to what was loaded before it (paged,
  # under the sharder). Float32 safetensors are used in place; any other tensor (to the base dtype,
  # from another dtype, from a GGUF) is first whole in float32 (its file pages, or the dequantized
  # array), next to its stored copy; under the sharder a vocabulary table comes a piece at a time
  gguf = kind != "json"
  piecewise = sharded and not s.shard_optimizer_only
  loaded = loading = 0
  for values, dims, table in m.load_order:
    size = values * (base_bytes(m, s.base_dtype) if dims >= 2 else f32)
    reading = values * f32 if converted or gguf or not m.file_backed else 0
    copy = size if converted else 0
    if piecewise and table: reading, copy = min(reading, budget / 4), min(copy, budget / 4)
    loading = max(loading, (min(loaded, budget) if piecewise else loaded) + reading + copy)
    loaded += size
  converting = max(loading - weights, 0) + (DEQUANT_MB * MB if gguf else 0)   # beyond the weights once loaded

  process = PROCESS_MB * MB
  graph = GRAPH_MB_PER_LINEAR * MB * len(trained_linears(m, s))
  base = {"process": process, "tokenizer": tokenizer}
  phases = {
    # a GGUF's tokenizer is built before the weights are read, an HF one after them
    "tokenizer": {"process": process, "tokenizer": tokenizer_peak} if gguf else dict(base, weights=weights, tokenizer=tokenizer_peak),
    "load": dict(base, weights=weights, converting=converting),
    "data": dict(base, weights=weights, tokenizing=tokenizing),
    "eval": dict(base, data=data, weights=weights, evaluation=evaluation, slack=SLACK * evaluation),
    "step": dict(base, data=data, weights=weights, step=step, slack=SLACK * step, graph=graph),
  }
  totals = {k: sum(v.values()) / MB for k, v in phases.items()}
  phase = max(totals, key=totals.get)
  return Estimate(totals[phase], phase, {k: v / MB for k, v in phases[phase].items()}, totals)


# ---- the plan

@dataclass
class Plan:
  settings: Settings
  estimate: Estimate
  limit_mb: float
  explicit: tuple = ()   # the flags the user set, kept as given

  def line(self):
    given = f"; kept as given: {', '.join(self.explicit)}" if self.explicit else ""
    return (f"memory plan for --memory_mb {self.limit_mb:g}: {', '.join(self.settings.levers())}; estimated peak "
            f"{self.estimate.peak_mb:.0f} MB ({self.estimate.phase}){given}")


FLAGS = {"grad_checkpoint": "--grad_checkpoint", "base_dtype": "--base_dtype", "shard_budget_mb": "--shard_budget_mb",
         "shard_optimizer_only": "--shard_optimizer_only", "shard_enable": "--shard_enable", "grad_accum_steps": "--grad_accum_steps"}


def _stages(m, s, explicit):
  """(settings, free) in the order plan() tries them: each stage keeps the levers of the one
  before and adds the next (the module docstring's order); levers in `explicit` stay as they are
  in s. free: the sharder's budget is plan()'s to choose (the largest that fits)."""
  user_sharder = s.shard_budget_mb is not None or "shard_optimizer_only" in explicit or "shard_enable" in explicit
  free = user_sharder and s.shard_budget_mb is None
  cur = s
  yield cur, free
  if cur.grad_checkpoint < 1:
    cur = replace(cur, grad_checkpoint=1.0)
    yield cur, free
  if not (s.full_ft or "base_dtype" in explicit or (cur.base_dtype == "keep" and m.keep_bytes < 2)):   # (blocks are not quantized again)
    for dtype in BASE_LEVERS:   # each smaller than the one before
      if BASE_BYTES[dtype] < base_bytes(m, cur.base_dtype):
        cur = replace(cur, base_dtype=dtype)
        yield cur, free
  # the sharder: full fine-tuning pages the optimizer moments alone first (only the update reads them)
  modes = [cur.shard_optimizer_only] if user_sharder else [True, False] if s.full_ft else [False]
  if not user_sharder:
    for only in modes: yield replace(cur, shard_optimizer_only=only), True
    free = True
  micro_batches = [] if "grad_accum_steps" in explicit else [k for k in range(cur.grad_accum_steps + 1, s.batch_size + 1) if s.batch_size % k == 0]
  for k in micro_batches:
    for only in modes: yield replace(cur, grad_accum_steps=k, shard_optimizer_only=only), free


def budget_range(m, s):
  """(smallest, largest) sharder budget worth planning for settings s, in whole MB: below the
  smallest every kernel pages, or an optimizer update cannot hold the moments it reads together;
  at the largest everything the sharder manages fits and nothing is paged."""
  frozen, trainable, moments, grads = param_bytes(m, s)
  if not s.shard_optimizer_only: return MIN_BUDGET_MB, math.floor((frozen + trainable + moments + grads) / MB)
  per = 2 if s.optimizer == "adamw" else 1 if s.momentum else 0   # a weight's moments are paged in together
  together = max(math.prod(sh) for sh in m.params.values()) * 4 * per / MB
  return max(MIN_BUDGET_MB, math.ceil(together)), math.floor(moments / MB)


def room(limit_mb):
  """What a plan may estimate under a limit: the limit less the margin."""
  return limit_mb - max(MARGIN_MB, MARGIN * limit_mb)


def limit_for(estimate_mb):
  """The smallest limit whose room() holds an estimate."""
  return max(estimate_mb + MARGIN_MB, estimate_mb / (1 - MARGIN))


def plan(m, s, limit_mb, explicit=(), eval_batch=None):
  """The first settings, in the order of the module docstring, whose estimated peak RSS fits
  limit_mb less a margin (room()), for model m (read_model) and the run's settings s. explicit:
  the levers the user set (keys of FLAGS), kept as they are in s. Raises PlanError with the
  smallest limit that fits."""
  given = tuple(FLAGS[k] for k in explicit)
  fits = lambda e: e.peak_mb <= room(limit_mb)
  smallest = None   # (settings, estimate) of the least memory any stage can need
  for cand, free in _stages(m, s, explicit):
    at = lambda budget: estimate(m, replace(cand, shard_budget_mb=budget), eval_batch)
    if not free:
      e = at(cand.shard_budget_mb)
      if smallest is None or e.peak_mb < smallest[1].peak_mb: smallest = (cand, e)
      if fits(e): return Plan(cand, e, limit_mb, given)
      continue
    lo, hi = budget_range(m, cand)
    if hi <= lo: continue                                       # too little to page
    e = at(lo)
    if smallest is None or e.peak_mb < smallest[1].peak_mb: smallest = (replace(cand, shard_budget_mb=lo), e)
    if not fits(e): continue
    if fits(at(None)) and not ({"shard_enable", "shard_optimizer_only"} & set(explicit)):
      cand = replace(cand, shard_optimizer_only=False)          # fewer micro-batches made room: no sharder needed
      return Plan(cand, at(None), limit_mb, given)
    while hi - lo > 1:                                          # the largest budget that fits: the least paging
      mid = (lo + hi) // 2
      lo, hi = (mid, hi) if fits(at(mid)) else (lo, mid)
    return Plan(replace(cand, shard_budget_mb=lo), at(lo), limit_mb, given)
  cand, e = smallest
  also = f" and {', '.join(given)} as given" if given else ""
  need = math.ceil(limit_for(e.peak_mb))
  raise PlanError(f"--memory_mb {limit_mb:g} is too small for this run: it needs at least {need} MB "
                  f"(an estimated {e.peak_mb:.0f} MB and a margin, with {', '.join(cand.levers())}{also})", need)


def data_bytes(path):
  """Bytes of text the data loader reads from --data (minift.data.load_splits): its size on disk."""
  from minift.data import TEXT_EXTENSIONS
  if not os.path.isdir(path): return os.path.getsize(path) if os.path.exists(path) else 0
  wiki = [os.path.join(path, f"wiki.{s}.raw") for s in ("train", "valid")]
  if os.path.exists(wiki[0]): return sum(os.path.getsize(p) for p in wiki if os.path.exists(p))
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs if f.endswith(TEXT_EXTENSIONS + (".jsonl",)))


def peak_rss_mb():
  """This process's peak resident memory so far, in MB (VmHWM on Linux and Android; getrusage
  elsewhere), or None where neither is available."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"): return int(line.split()[1]) / 1024
  except OSError:
    pass
  try:
    import resource, sys
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak / 1024   # bytes on macOS, KiB elsewhere
  except (ImportError, OSError):
    return None
