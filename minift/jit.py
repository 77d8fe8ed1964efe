"""Capture and replay of a step function.

The first call runs normally (jit's `warmup` sets how many do); the next runs while recording
every kernel it launches with the buffers it used; later calls with the same input shapes replay
that list of kernels on the new inputs, skipping graph building and scheduling.

Rules for a jitted function (as in tinygrad's TinyJit): tensors that change from call to call
must be passed as arguments; state kept across calls (parameters, optimizer moments, step
counters) must be updated in place with Tensor.assign; return tensors, not Python numbers.
Random numbers (dropout) advance from call to call as they would without jit.
"""
import functools, weakref
from dataclasses import dataclass
from typing import NamedTuple
from minift.tensor import Tensor
from minift.lazy import LazyBuffer, LazyOp, Op
from minift.runtime.buffer import active_pager
from minift.runtime.device import FusedAssigns, get_device
from minift.runtime.executor import capturing, repeating, run_kernel
from minift.view import View


# Where a recorded kernel finds a buffer on replay:
@dataclass(frozen=True)
class Slot:
  """A buffer the captured call made: each replay makes it anew (slot `index` of the replay)."""
  index: int


@dataclass(frozen=True)
class Held:
  """A buffer that outlives the call (a weight, optimizer state): the recording holds it and
  every replay reads and writes it."""
  buffer: object


@dataclass(frozen=True)
class Input:
  """The buffer of the call's input tensor number `index`."""
  index: int


class Step(NamedTuple):
  """One recorded kernel run: the kernel (or a device's FusedAssigns), where its output goes,
  where its inputs come from, and its (seed, counter) if it draws random numbers."""
  kernel: object
  out: object
  ins: list
  rand_key: tuple


@dataclass
class Recording:
  """What a replay runs: the steps, and what it needs to run them on new inputs."""
  steps: list       # Step
  last_use: dict    # slot index -> the last step that reads or writes it (freed after it)
  out_slots: set    # slots the call returns (kept)
  nslots: int
  donated: dict     # step number -> the input its scatter-add writes into (_donated)
  returns: list     # (where, base shape, view, moves) of each returned tensor
  rng_used: int     # random numbers the call drew
  rng0: int         # Tensor._rng_counter when the capture began
  structure: object # the call's return value, its tensors replaced on replay
  devices: set      # the backends its kernels run on


class _Capture:
  """Records kernels as they run. Buffers made during the capture are held weakly (so the
  capture does not raise peak memory); buffers from outside are held strongly."""

  def __init__(self):
    self.steps, self.slots = [], []   # slots: weakrefs to buffers produced during capture
    self.slot_of = {}

  def ref(self, buf):
    s = self.slot_of.get(id(buf))
    if s is not None and self.slots[s]() is buf: return Slot(s)
    return Held(buf)

  def record(self, kernel, out, ins, rand_key):
    in_refs = [self.ref(b) for b in ins]
    if kernel.assign_target is not None: out_ref = in_refs[kernel.assign_target]
    else:
      self.slot_of[id(out)] = len(self.slots)
      out_ref = Slot(len(self.slots))
      self.slots.append(weakref.ref(out))
    self.steps.append(Step(kernel, out_ref, in_refs, rand_key))


def _tensors_in(obj):
  if isinstance(obj, Tensor): return [obj]
  if isinstance(obj, (list, tuple)): return [t for o in obj for t in _tensors_in(o)]
  if isinstance(obj, dict): return [t for o in obj.values() for t in _tensors_in(o)]
  return []


class jit:
  """warmup: plain calls before the one that records. 1 by default: a first call may make state
  (optimizer moments, a cache's buffers) that must exist before a recording can refer to it. A
  caller whose state already exists passes 0 and saves one unrecorded call (a decode step)."""
  def __init__(self, fn, warmup=1):
    if warmup < 0: raise ValueError(f"jit: warmup must be >= 0, got {warmup}")
    self.fn, self.warmup, self.calls, self.key, self.recording = fn, warmup, 0, None, None
    functools.update_wrapper(self, fn)

  def __get__(self, obj, objtype=None):
    return functools.partial(self.__call__, obj) if obj is not None else self

  def reset(self):
    self.calls, self.key, self.recording = 0, None, None

  def __call__(self, *args, **kwargs):
    inputs = _tensors_in(list(args) + list(kwargs.values()))
    for t in inputs: t._make_buffer()
    key = (tuple((t.shape, t.dtype, t.device) for t in inputs),
           tuple(repr(a) for a in args if not _tensors_in(a)), tuple(sorted((k, repr(v)) for k, v in kwargs.items() if not _tensors_in(v))))
    if key != self.key: self.calls, self.key, self.recording = 0, key, None
    self.calls += 1
    if self.calls > self.warmup + 1: return self._replay(inputs)
    with repeating():   # the warmup too: replays should compute as it did (the NumPy backend compiles small kernels then)
      if self.calls <= self.warmup: return self._realized(self.fn(*args, **kwargs))
      return self._capture(inputs, args, kwargs)

  @staticmethod
  def _realized(ret):
    outs = _tensors_in(ret)
    if outs: Tensor.realize_all(*outs)
    return ret

  def _capture(self, inputs, args, kwargs):
    cap, rng0 = _Capture(), Tensor._rng_counter
    with capturing(cap): ret = self._realized(self.fn(*args, **kwargs))
    input_ids = {id(t.lazydata.base.buffer): i for i, t in enumerate(inputs)}
    out_slots = set()
    returns = []
    for t in _tensors_in(ret):
      r = cap.ref(t.lazydata.base.buffer)
      if isinstance(r, Slot): out_slots.add(r.index)
      returns.append((r, t.lazydata.base.shape, t.lazydata.view, t.lazydata.moves))
    # slots still alive after the call and not returned are state: replay writes into them
    persistent = {s: w() for s, w in enumerate(cap.slots) if w() is not None and s not in out_slots}

    def resolve(r):
      if isinstance(r, Held) and id(r.buffer) in input_ids: return Input(input_ids[id(r.buffer)])
      if isinstance(r, Slot) and r.index in persistent: return Held(persistent[r.index])
      return r
    steps = _fuse_assigns([Step(st.kernel, resolve(st.out), [resolve(i) for i in st.ins], st.rand_key) for st in cap.steps])
    last_use = {}
    for n, st in enumerate(steps):
      for r in st.ins + [st.out]:
        if isinstance(r, Slot): last_use[r.index] = n
    self.recording = Recording(steps, last_use, out_slots, len(cap.slots), _donated(steps, last_use, out_slots),
                               [(resolve(r), shape, view, moves) for r, shape, view, moves in returns],
                               Tensor._rng_counter - rng0, rng0, ret, {st.kernel.device for st in steps})
    return ret

  def _replay(self, inputs):
    rec = self.recording
    slots = [None] * rec.nslots
    in_bufs = [t.lazydata.base.buffer for t in inputs]
    rng_start = Tensor._rng_counter
    frees = {}
    for s, n in rec.last_use.items():
      if s not in rec.out_slots: frees.setdefault(n, []).append(s)

    def get(r):
      if isinstance(r, Slot): return slots[r.index]
      return in_bufs[r.index] if isinstance(r, Input) else r.buffer
    steps = rec.steps

    def upcoming(n):   # held buffers (state) of the kernels after n: what the sharder may prefetch
      return lambda: ([r.buffer for r in steps[m].ins if isinstance(r, Held)] for m in range(n + 1, len(steps)))
    for n, (kernel, out_ref, in_refs, rand_key) in enumerate(steps):
      if rand_key is not None: rand_key = (Tensor._seed, rand_key[1] - rec.rng0 + rng_start)
      ins = [get(r) for r in in_refs]
      target = get(out_ref) if not isinstance(out_ref, Slot) or kernel.assign_target is not None else None   # an assign writes in place, as when captured
      if n in rec.donated: target = ins[rec.donated[n]]
      out = run_kernel(kernel, ins, target, rand_key, upcoming(n))
      if isinstance(out_ref, Slot): slots[out_ref.index] = out
      for s in frees.get(n, ()): slots[s] = None
    for name in rec.devices: get_device(name).submit()   # one submit per replay where a backend records kernels
    Tensor._rng_counter = rng_start + rec.rng_used
    made = iter([self._wrap(get(r), shape, view, moves) for r, shape, view, moves in rec.returns])
    return _rebuild(rec.structure, made)

  @staticmethod
  def _wrap(buf, shape, view, moves):
    base = LazyOp(Op.BUFFER, (), None, shape, buf.dtype, buf.device.name, buf)
    return Tensor(LazyBuffer(base, view, moves))


FUSE_MAX = 3   # kernels fused into one loop at most: an AdamW update's m, v and p


def _fuse_assigns(steps):
  """steps with runs of consecutive in-place updates of state (assign kernels onto buffers that
  outlive the step, all of one shape) replaced by one step each where the device fuses them into
  one program (Device.fuse_assigns): an optimizer's m, v and p updates then read the gradient
  and the moments once. Not under a sharder that pages what they read or write (one kernel
  would then need all their pages at once), except one paging only optimizer state."""
  pager = active_pager()
  if pager is not None and not pager.optimizer_only: return steps
  state = lambda st: st.kernel.kind == "elementwise" and st.kernel.assign_target is not None and isinstance(st.out, Held)
  out, n = [], 0
  while n < len(steps):
    first, end = steps[n], n + 1
    device = get_device(first.kernel.device)
    fuse = device.fuse_assigns if state(first) and device.fuses_assigns else None
    while fuse and end < len(steps) and end - n < FUSE_MAX and state(steps[end]) and \
        tuple(steps[end].kernel.shape) == tuple(first.kernel.shape) and steps[end].kernel.device == first.kernel.device: end += 1
    fused, shared = None, []   # shared: the run's inputs, each once
    if end - n > 1:
      def index(r):
        if r not in shared: shared.append(r)
        return shared.index(r)
      run = steps[n:end]
      maps = [[index(r) for r in st.ins] for st in run]
      dtypes = [None] * len(shared)
      for st, m in zip(run, maps):
        for node in st.kernel._nodes():
          if node.op is Op.BUFFER: dtypes[m[node.arg.input]] = node.dtype
      if None not in dtypes: fused = fuse([st.kernel for st in run], maps, dtypes, [st.out.buffer for st in run])
    if fused is None:
      out.append(first)
      n += 1
    else:
      out.append(Step(fused, first.out, shared, None))
      n = end
  return out


def _donated(steps, last_use, out_slots):
  """{step number: input} for the scatter-adds onto a third operand that may write into that
  operand's buffer instead of a copy of it: a buffer made during the step (a slot) that no later
  kernel reads and the step does not return. A tied table's gradient (GPT-2's wte) is then the
  LM head's gradient with the lookup's rows added in place, not a fresh (vocab, C) copy."""
  donated = {}
  for n, (kernel, _, in_refs, _) in enumerate(steps):
    if isinstance(kernel, FusedAssigns): continue
    ast = kernel.ast
    if ast.op is not Op.SCATTER_ADD or len(ast.srcs) != 3 or ast.srcs[2].op is not Op.BUFFER or ast.srcs[2].arg.view != View.contiguous(kernel.shape): continue
    i = ast.srcs[2].arg.input
    r = in_refs[i]
    if isinstance(r, Slot) and last_use.get(r.index) == n and r.index not in out_slots and in_refs.count(r) == 1: donated[n] = i
  return donated


def _rebuild(obj, made):
  if isinstance(obj, Tensor): return next(made)
  if isinstance(obj, (list, tuple)): return type(obj)(_rebuild(o, made) for o in obj)
  if isinstance(obj, dict): return {k: _rebuild(v, made) for k, v in obj.items()}
  return obj
