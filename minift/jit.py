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
from minift.tensor import Tensor
from minift.lazy import LazyBuffer, LazyOp, Op
from minift.runtime.buffer import active_pager
from minift.runtime.device import FusedAssigns, get_device
from minift.runtime.executor import capturing, run_kernel
from minift.view import View


class _Capture:
  """Records kernels as they run. Buffers made during the capture are held weakly (so the
  capture does not raise peak memory); buffers from outside are held strongly."""

  def __init__(self):
    self.items, self.slots = [], []   # slots: weakrefs to buffers produced during capture
    self.slot_of = {}

  def ref(self, buf):
    s = self.slot_of.get(id(buf))
    if s is not None and self.slots[s]() is buf: return ("slot", s)
    return ("buf", buf)

  def record(self, kernel, out, ins, rand_key):
    in_refs = [self.ref(b) for b in ins]
    if kernel.assign_target is not None: out_ref = in_refs[kernel.assign_target]
    else:
      self.slot_of[id(out)] = len(self.slots)
      out_ref = ("slot", len(self.slots))
      self.slots.append(weakref.ref(out))
    self.items.append((kernel, out_ref, in_refs, rand_key))


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
    self.fn, self.warmup, self.calls, self.key, self.plan = fn, warmup, 0, None, None
    functools.update_wrapper(self, fn)

  def __get__(self, obj, objtype=None):
    return functools.partial(self.__call__, obj) if obj is not None else self

  def reset(self):
    self.calls, self.key, self.plan = 0, None, None

  def __call__(self, *args, **kwargs):
    inputs = _tensors_in(list(args) + list(kwargs.values()))
    for t in inputs: t._make_buffer()
    key = (tuple((t.shape, t.dtype, t.device) for t in inputs),
           tuple(repr(a) for a in args if not _tensors_in(a)), tuple(sorted((k, repr(v)) for k, v in kwargs.items() if not _tensors_in(v))))
    if key != self.key: self.calls, self.key, self.plan = 0, key, None
    self.calls += 1
    if self.calls <= self.warmup: return self._realized(self.fn(*args, **kwargs))
    if self.calls == self.warmup + 1: return self._capture(inputs, args, kwargs)
    return self._replay(inputs)

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
      if r[0] == "slot": out_slots.add(r[1])
      returns.append((r, t.lazydata.base.shape, t.lazydata.view, t.lazydata.moves))
    # slots still alive after the call and not returned are state: replay writes into them
    persistent = {s: w() for s, w in enumerate(cap.slots) if w() is not None and s not in out_slots}

    def resolve(r):
      if r[0] == "buf" and id(r[1]) in input_ids: return ("input", input_ids[id(r[1])])
      if r[0] == "slot" and r[1] in persistent: return ("buf", persistent[r[1]])
      return r
    items = _fuse_assigns([(k, resolve(o), [resolve(i) for i in ins], rk) for k, o, ins, rk in cap.items])
    last_use = {}
    for n, (_, o, ins, _) in enumerate(items):
      for r in ins + [o]:
        if r[0] == "slot": last_use[r[1]] = n
    self.plan = dict(items=items, last_use=last_use, out_slots=out_slots, nslots=len(cap.slots), donated=_donated(items, last_use, out_slots),
                     returns=[(resolve(r), shape, view, moves) for r, shape, view, moves in returns],
                     rng_used=Tensor._rng_counter - rng0, rng0=rng0, structure=ret)
    return ret

  def _replay(self, inputs):
    plan = self.plan
    slots = [None] * plan["nslots"]
    in_bufs = [t.lazydata.base.buffer for t in inputs]
    rng_start = Tensor._rng_counter
    frees = {}
    for s, n in plan["last_use"].items():
      if s not in plan["out_slots"]: frees.setdefault(n, []).append(s)

    def get(r):
      kind, v = r
      return in_bufs[v] if kind == "input" else v if kind == "buf" else slots[v]
    items = plan["items"]

    def upcoming(n):   # state buffers ("buf") of the kernels after n: what the sharder may prefetch
      return lambda: ([r[1] for r in items[m][2] if r[0] == "buf"] for m in range(n + 1, len(items)))
    for n, (kernel, out_ref, in_refs, rand_key) in enumerate(items):
      if rand_key is not None: rand_key = (Tensor._seed, rand_key[1] - plan["rng0"] + rng_start)
      ins = [get(r) for r in in_refs]
      target = get(out_ref) if out_ref[0] != "slot" or kernel.assign_target is not None else None   # an assign writes in place, as when captured
      if n in plan["donated"]: target = ins[plan["donated"][n]]
      out = run_kernel(kernel, ins, target, rand_key, upcoming(n))
      if out_ref[0] == "slot": slots[out_ref[1]] = out
      for s in frees.get(n, ()): slots[s] = None
    Tensor._rng_counter = rng_start + plan["rng_used"]
    made = iter([self._wrap(get(r), shape, view, moves) for r, shape, view, moves in plan["returns"]])
    return _rebuild(plan["structure"], made)

  @staticmethod
  def _wrap(buf, shape, view, moves):
    base = LazyOp(Op.BUFFER, (), None, shape, buf.dtype, buf.device.name, buf)
    return Tensor(LazyBuffer(base, view, moves))


FUSE_MAX = 3   # kernels fused into one loop at most: an AdamW update's m, v and p


def _fuse_assigns(items):
  """items with runs of consecutive in-place updates of state (assign kernels onto buffers
  that outlive the step, all of one shape) replaced by one item each where the device fuses
  them into one loop (NumpyDevice.fuse_assigns): an optimizer's m, v and p updates then read
  the gradient and the moments once. Not under a sharder that pages what they read or write
  (one kernel would then need all their pages at once), except one paging only optimizer state."""
  pager = active_pager()
  if pager is not None and not pager.optimizer_only: return items
  state = lambda item: item[0].kind == "elementwise" and item[0].assign_target is not None and item[1][0] == "buf"
  out, n = [], 0
  while n < len(items):
    first, end = items[n], n + 1
    device = get_device(first[0].device)
    fuse = device.fuse_assigns if state(first) and device.fuses_assigns else None
    while fuse and end < len(items) and end - n < FUSE_MAX and state(items[end]) and \
        tuple(items[end][0].shape) == tuple(first[0].shape) and items[end][0].device == first[0].device: end += 1
    fused, shared = None, []   # shared: the group's inputs, each once (buffers by identity)
    if end - n > 1:
      def index(r):
        for i, s in enumerate(shared):
          if s[0] == r[0] and (s[1] is r[1] if r[0] == "buf" else s[1] == r[1]): return i
        shared.append(r)
        return len(shared) - 1
      run = items[n:end]
      maps = [[index(r) for r in item[2]] for item in run]
      dtypes = [None] * len(shared)
      for (k, *_), m in zip(run, maps):
        for node in k._nodes():
          if node.op is Op.BUFFER: dtypes[m[node.arg[0]]] = node.dtype
      if None not in dtypes: fused = fuse([item[0] for item in run], maps, dtypes, [item[1][1] for item in run])
    if fused is None:
      out.append(first)
      n += 1
    else:
      out.append((fused, first[1], shared, None))
      n = end
  return out


def _donated(items, last_use, out_slots):
  """{kernel number: input} for the scatter-adds onto a third operand that may write into that
  operand's buffer instead of a copy of it: a buffer made during the step (a slot) that no later
  kernel reads and the step does not return. A tied table's gradient (GPT-2's wte) is then the
  LM head's gradient with the lookup's rows added in place, not a fresh (vocab, C) copy."""
  donated = {}
  for n, (kernel, _, in_refs, _) in enumerate(items):
    if isinstance(kernel, FusedAssigns): continue
    ast = kernel.ast
    if ast.op is not Op.SCATTER_ADD or len(ast.srcs) != 3 or ast.srcs[2].op is not Op.BUFFER or ast.srcs[2].arg[1] != View.contiguous(kernel.shape): continue
    i = ast.srcs[2].arg[0]
    r = in_refs[i]
    if r[0] == "slot" and last_use.get(r[1]) == n and r[1] not in out_slots and in_refs.count(r) == 1: donated[n] = i
  return donated


def _rebuild(obj, made):
  if isinstance(obj, Tensor): return next(made)
  if isinstance(obj, (list, tuple)): return type(obj)(_rebuild(o, made) for o in obj)
  if isinstance(obj, dict): return {k: _rebuild(v, made) for k, v in obj.items()}
  return obj
