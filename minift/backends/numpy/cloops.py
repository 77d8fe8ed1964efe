"""Fused CPU loops for the NumPy backend: elementwise kernels, reductions and matmul epilogues
rendered to C and built with the system C compiler (compiler.py), where one exists. CLanguage is
the C dialect of the C-style languages (codegen/cstyle.py); Renderer adds this backend's loop
nests (merged axes, segments, chunks, column blocks); render_fused merges several updates.

NumPy evaluates a fused kernel one pass per op, each pass through a temporary array; the C
loop computes every element once, in registers. BLAS still does the matmuls: a matmul kernel's
epilogue runs in C over the product NumPy made. Kernels that use what this file does not render
(float16, integer division, gathers, a reduction over leading and trailing axes at once) stay
with NumPy.
Attention and its gradients are not rendered: they run the fixed loops of kernels/attention.c
(attention.py), whose sums use FMA (the rounding below is that of the rendered loops).

Rounding: + - * / sqrt and comparisons round as NumPy does (no FMA contraction, no fast-math).
exp, tanh and sigmoid use the polynomials of CLanguage's prelude (exp within 1.5 ulp of float64, tanh within
2.5: test_cloops.py; vectorisable); sums accumulate in double. So a kernel differs from its
NumPy evaluation by an ulp or two. A big kernel's outermost loop is cut into parts that run on
every core at once (parallel.call_in_parts; $MINIFT_THREADS sets how many); each element is
computed the same way in any part, so the thread count never changes a result.

Every kernel the schedule runs is rendered first, and the new ones are compiled together
(one compiler run per schedule, not per kernel) into a shared library cached on disk under
$MINIFT_CACHE_DIR/c or ~/.cache/minift/c. MINIFT_CLOOPS=0 turns the whole path off.
"""
import hashlib
from typing import NamedTuple
from minift.codegen.cstyle import CStyleLanguage, Unsupported, Writer
from minift.dtype import DType, dtypes
from minift.helpers import prod, strides_for
from minift.lazy import Op
from minift.view import View
from minift.backends.numpy.compiler import Compiler

# Kernels of fewer elements than this run in NumPy: there, a compile is not worth it (for one
# run: a jitted function's kernels, replayed on every call, are compiled whatever their size).
C_FROM = 1 << 12
CHUNK = 1 << 16   # elements per partial sum of a big reduction to one value (Renderer.chunks)
COLUMNS = 64   # outputs a reduction over leading axes sums at once (their accumulators stay in registers or L1)

class CLanguage(CStyleLanguage):
  """The C of the CPU loops: float32, int32, int64 and bool (no float16), integer + - * wrapping
  around as NumPy's do (no division or power), float to integer casts left to NumPy, and exp
  and tanh as the polynomials of the prelude. Variables are const."""
  arith_types = {"bool": "int", "int32": "int32_t", "int64": "int64_t", "float32": "float"}
  storage_types = {"bool": "uint8_t", "int32": "int32_t", "int64": "int64_t", "float32": "float"}
  unsigned_types = {"int32": "uint32_t", "int64": "uint64_t"}
  math_fns = {Op.EXP: "exp_f", Op.LOG: "logf", Op.SQRT: "sqrtf", Op.TANH: "tanh_f", Op.SIN: "sinf", Op.SIGMOID: "sigmoid_f", Op.ERF: "erff"}
  pow_fn = "powf"
  fn_qualifier = "static inline "
  prelude_head = "#include <math.h>\n#include <stdint.h>\ntypedef union { float f; uint32_t i; } bits32;\n"
  prelude_math = r"""/* exp(x) = 2^n * e^r, n = round(x / ln 2), |r| <= ln2 / 2, e^r by its Taylor series to r^7
   (error < 1 ulp); 2^n is applied in two halves so that the result may be subnormal. Written
   as selects, not branches, so that gcc vectorises it: `return x < -104 ? 0 : y` alone (NaN
   would pass through anyway) left an exp-sum loop scalar and 7x slower. */
static inline float exp_f(float x) {
  float xc = x < -104.0f ? -104.0f : (x > 89.0f ? 89.0f : x);
  float n = rintf(xc * 1.44269504088896341f);
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.0f + r * (1.0f + r * (0.5f + r * (0.166666672f + r * (0.0416666679f + r * (8.33333377e-3f + r * (1.38888892e-3f + r * 1.98412701e-4f))))));
  int32_t ni = (int32_t)n, n1 = ni / 2, n2 = ni - n1;
  bits32 s1, s2; s1.i = (uint32_t)(n1 + 127) << 23; s2.i = (uint32_t)(n2 + 127) << 23;
  float y = (p * s1.f) * s2.f;
  y = x < -104.0f ? 0.0f : y;
  return x != x ? x : y;
}
/* tanh: the odd Taylor series below |x| = 0.4, (1 - e^-2|x|) / (1 + e^-2|x|) above, and
   exactly +-1 beyond 9.0109 (as float tanh rounds there) */
static inline float tanh_f(float x) {
  float a = fabsf(x), x2 = x * x;
  float small = a * (1.0f + x2 * (-0.333333343f + x2 * (0.133333340f + x2 * (-0.0539682545f + x2 * (0.0218694881f + x2 * (-8.86323582e-3f + x2 * (3.59212654e-3f + x2 * -1.45583438e-3f)))))));
  float e = exp_f(-2.0f * a);
  float big = (1.0f - e) / (1.0f + e);
  float t = a < 0.4f ? small : big;
  t = a > 9.0109f ? 1.0f : t;
  return copysignf(t, x);
}
"""

  def declare(self, name, dtype, code): return "const " + super().declare(name, dtype, code)

  def write(self, buf, index, value, dtype):
    return f"{buf}[{index}] = ({self.storage_types[dtype.name]})({value});"

  def cast(self, x, src, to):
    _check(not (src.is_float and to.is_int), "float to int cast")
    return super().cast(x, src, to)

  def bool_alu(self, op, a, b):
    _check(op is not Op.NEG, "NEG on bool")
    return super().bool_alu(op, a, b)

  def int_alu(self, op, dtype, a, b):
    _check(op in (Op.ADD, Op.SUB, Op.MUL, Op.NEG, Op.MAX), f"integer {op.name}")
    u, t = self.unsigned_types[dtype.name], self.arith_types[dtype.name]
    if op is Op.NEG: return f"(({t})(0-({u}){a}))"
    if op is Op.MAX: return f"({a}>{b} ? {a} : {b})"
    return f"(({t})(({u}){a}{self.infix[op]}({u}){b}))"


PRELUDE = CLanguage.prelude()


def _check(ok, what):
  if not ok: raise Unsupported(what)


class _Loops:
  """The loop nest of a kernel: its axes in groups that merge into one loop each (adjacent axes
  whose strides chain in every load and that no pad masks). kept: loops over output elements;
  reduced: loops a reduction runs inside them."""

  def __init__(self, shape, reduced, views):
    self.shape = shape
    kept_axes = [a for a in range(len(shape)) if a not in reduced and shape[a] != 1]
    red_axes = [a for a in sorted(reduced) if shape[a] != 1]
    # reduced axes all after the kept ones (a row's sum), or all before them (a bias gradient's sum
    # over rows: leading, summed a block of columns at a time), not mixed
    self.leading = bool(red_axes and kept_axes and max(red_axes) < min(kept_axes))
    _check(not red_axes or not kept_axes or max(kept_axes) < min(red_axes) or self.leading, "reduction over leading and trailing axes at once")
    self.kept = self._merge(kept_axes, views)
    self.reduced = self._merge(red_axes, [v for v in views if v.shape == tuple(shape)] if reduced else views)

  def _merge(self, axes, views):
    groups = []
    for a in axes:
      unmasked = lambda v, ax: v.shape[ax] == 1 or v.mask is None or v.mask[ax] == (0, v.shape[ax])
      if groups and all(v.shape[a] == 1 or (v.strides[groups[-1][-1]] == v.strides[a] * self.shape[a]
                                            and unmasked(v, a) and unmasked(v, groups[-1][-1])) for v in views):
        groups[-1].append(a)
      else: groups.append([a])
    return groups

  def size(self, group): return prod(self.shape[a] for a in group)


class Renderer(CLanguage):
  """C source for one kernel: `void NAME(out, in0, in1, ..., lo, hi)`, with one more pointer
  (the matmul's product) before lo for a matmul epilogue; lo and hi bound its outermost loop."""

  def __init__(self, kernel, in_dtypes):
    super().__init__(kernel, in_dtypes)
    self.views = {}
    self.out_shape = tuple(kernel.shape)
    reduce = kernel.reduce
    outer = kernel._nodes(stop=reduce)                                   # the epilogue (all of an elementwise kernel)
    inner = kernel._nodes(reduce.srcs[0]) if kernel.kind == "reduce" else []   # what a reduction sums
    if kernel.kind == "reduce":
      _check(reduce.dtype is dtypes.float32, "non-float reduction")
      _check(not any(n.op in (Op.SUM, Op.RMAX) for n in inner), "nested reduction")
      _check(not {id(n) for n in outer if n.op is not Op.CONST} & {id(n) for n in inner}, "node inside and after the reduction")
      shape, axes = reduce.arg.shape, reduce.arg.axes
      self.out_shape = tuple(1 if a in axes else n for a, n in enumerate(shape))
      if self.out_shape != tuple(kernel.shape):   # the result reshaped: (256, 1) summed rows written as (256,)
        self.views.update((id(n), _unsqueezed(n.arg.view, self.out_shape)) for n in outer if n.op is Op.BUFFER)
    else:
      _check(kernel.kind == "elementwise" or (kernel.kind == "matmul" and kernel.ast is not reduce), "kernel kind")
      shape, axes = kernel.shape, ()
    for node in outer + inner:
      if node is reduce: continue
      _check(node.dtype.name in self.arith_types, f"{node.dtype.name} values")
      if node.op is Op.BUFFER: _check(in_dtypes[node.arg.input].name in self.storage_types, "input dtype")
    views = [self.view(n) for n in outer + inner if n.op is Op.BUFFER]
    _check(all(len(v.shape) == len(shape) for v in views), "view rank")
    self.loops = _Loops(tuple(shape), set(axes), views)
    self.segment, self.absent = None, set()   # see render()
    self.pointers, self.subst = None, {}   # render_fused: shared input numbering, values computed in the loop

  # ---- expressions

  def index(self, strides_of, groups):
    """The flat index of element (loop variables) for axis strides strides_of(axis)."""
    terms = []
    for var, group in groups:
      st = strides_of(group[-1])
      if st: terms.append(var if st == 1 else f"{var}*{st}" if st > 0 else f"{var}*({st})")
    return terms

  def view(self, node): return self.views.get(id(node), node.arg.view)

  def load(self, node, groups):
    i, view = node.arg.input, self.view(node)
    if i in self.subst: return self.subst[i]
    dtype = self.in_dtypes[i]
    conds = []
    if view.mask is not None:
      if any(lo >= hi for lo, hi in view.mask): return self.literal(0, node.dtype)
      for var, group in groups:
        for a in group:
          lo, hi = view.mask[a]
          if (lo, hi) == (0, view.shape[a]): continue
          if self.segment is not None and var == self.segment.var:   # decided for the whole segment
            if self.segment.stop <= lo or self.segment.start >= hi: return self.literal(0, node.dtype)
            continue
          if lo > 0: conds.append(f"{var}>={lo}")
          if hi < view.shape[a]: conds.append(f"{var}<{hi}")
      for a, n in enumerate(view.shape):   # size-1 axes in no loop: their coordinate is 0
        if n == 1 and not view.mask[a][0] <= 0 < view.mask[a][1]: return self.literal(0, node.dtype)
    terms = self.index(lambda a: view.strides[a], groups) + ([str(view.offset)] if view.offset else [])
    code = self.read(f"p{i if self.pointers is None else self.pointers[i]}", " + ".join(terms) or "0", dtype)
    return f"({' && '.join(conds)} ? {code} : {self.literal(0, node.dtype)})" if conds else code

  def expr(self, node, ctx):
    op = node.op
    if op is Op.BUFFER:
      code = self.load(node, ctx)
      if self.segment is not None and code == self.literal(0, node.dtype): self.absent.add(id(node))   # masked off here
      return code
    if node is self.kernel.reduce: return self.reduced_value
    _check(op in self.math_fns or op in self.infix or op in (Op.CONST, Op.NEG, Op.RECIP, Op.CAST, Op.MAX, Op.POW, Op.WHERE), op.name)
    return super().expr(node, ctx)

  def alu(self, node, srcs):
    if node.op is Op.ADD and node.dtype.is_float and self.segment is not None:   # a load masked off in this piece adds
      absent = [id(s) in self.absent for s in node.srcs]   # nothing: x + 0.0 would turn a -0.0 of x into +0.0
      if all(absent): self.absent.add(id(node))
      if any(absent): return srcs[absent.index(False)] if not all(absent) else srcs[0]
    return super().alu(node, srcs)

  # ---- the loop nest

  def outer_size(self):
    """The range of the outermost loop, the one that lo and hi bound (1: no loop over outputs;
    a whole reduction cut into chunks: the chunks)."""
    return self.loops.size(self.loops.kept[0]) if self.loops.kept else self.chunks() or 1

  def chunks(self):
    """A big reduction to one value is summed in this many chunks of its outermost reduced loop
    (0: in one), each a partial sum that a part may compute, then added up in chunk order. The
    count depends only on the shape, so the result does not depend on the thread count."""
    if self.kernel.kind != "reduce" or self.loops.kept or not self.loops.reduced: return 0
    rows, total = self.loops.size(self.loops.reduced[0]), prod(self.loops.size(g) for g in self.loops.reduced)
    count = min(rows, total // CHUNK)
    return count if count >= 2 else 0

  def segments(self, kept):
    """Where loads are masked along the innermost loop (a cat, a pad): that loop cut at the mask
    edges, [(start, stop)], so that no load inside a piece needs a condition and the compiler
    vectorises each; None where nothing is masked there, or the pieces would be too many."""
    if self.kernel.kind == "reduce" or not kept or len(kept[-1][1]) != 1: return None
    axis, n = kept[-1][1][0], self.loops.size(kept[-1][1])
    cuts = {0, n}
    for node in self.kernel._nodes(stop=self.kernel.reduce):
      view = self.view(node) if node.op is Op.BUFFER else None
      if view is not None and view.mask is not None: cuts.update(min(max(c, 0), n) for c in view.mask[axis])
    cuts = sorted(cuts)
    return list(zip(cuts, cuts[1:])) if 2 < len(cuts) <= 9 else None

  def render(self, name):
    k, loops = self.kernel, self.loops
    kept = [(f"i{g}", group) for g, group in enumerate(loops.kept)]
    red = [(f"r{g}", group) for g, group in enumerate(loops.reduced)]
    out_strides = strides_for(self.out_shape)
    out_index = " + ".join(self.index(lambda a: out_strides[a], kept)) or "0"
    args = ["void* out_"] + [f"const void* in{i}" for i in range(len(self.in_dtypes))]
    out_t = self.storage_types[k.dtype.name]
    body = [f"{out_t}* out = ({out_t}*)out_;"] + self.pointer_lines(self.in_dtypes)
    if k.kind == "matmul":   # the product, contiguous in the kernel's shape; it may be out itself
      args.append("const float* mm")
      self.reduced_value = f"mm[{out_index}]"
    args += ["long lo", "long hi"]
    def loop(var, start, stop, outermost):   # the outermost loop keeps to [lo, hi): the part of it this call runs
      if not outermost: return f"for (long {var} = {start}; {var} < {stop}; {var}++) {{"
      if (start, stop) == (0, self.outer_size()): return f"for (long {var} = lo; {var} < hi; {var}++) {{"
      return f"for (long {var} = lo > {start} ? lo : {start}; {var} < (hi < {stop} ? hi : {stop}); {var}++) {{"
    store = lambda value: self.write("out", out_index, value, k.dtype)
    w = Writer()
    w.line(*body)
    cut = self.segments(kept)
    # an elementwise or epilogue kernel's innermost loop is vectorised: once whole, or once per
    # piece where masked loads cut it (each piece with its loads decided)
    pieces = cut or ([(0, loops.size(kept[-1][1]))] if kept and k.kind != "reduce" else None)
    if pieces:
      for g, (var, group) in enumerate(kept[:-1]): w.open(loop(var, 0, loops.size(group), g == 0))
      var = kept[-1][0]
      for start, stop in pieces:
        self.segment, self.lines, self.names, self.absent = Segment(var, start, stop) if cut else None, [], {}, set()
        value = self.value(k.ast, kept)
        w.line("#pragma omp simd")
        w.open(loop(var, start, stop, len(kept) == 1))
        w.line(*self.lines, store(value))
        w.close()
      self.segment = None
      w.close(0)
      return _function(name, args, w)
    if k.kind == "reduce" and loops.leading: return self.render_leading(name, args, w, kept, red, loop, store)
    if self.chunks(): return self.render_chunked(name, args, w, red, loop, store)
    for g, (var, group) in enumerate(kept): w.open(loop(var, 0, loops.size(group), g == 0))
    if k.kind == "reduce":
      r = k.reduce
      self.lines = []
      src = self.value(r.srcs[0], kept + red)
      inner = self.lines
      w.line(ACC_START[r.op])
      depth = w.depth
      for g, (var, group) in enumerate(red):
        if g == len(red) - 1: w.line(ACC_PRAGMA[r.op])
        w.open(loop(var, 0, loops.size(group), False))
      w.line(*inner, *_accumulate(r.op, src))
      w.close(depth)
      if r.op is Op.RMAX: w.line("if (anynan) acc = NAN;")
      self.reduced_value = "((float)acc)"
    self.lines, self.names = [], {}
    value = self.value(k.ast, kept)
    w.line(*self.lines, store(value))
    w.close(0)
    return _function(name, args, w)

  def pointer_lines(self, dtypes):
    """The typed pointers p0, p1, ... to the inputs of these dtypes; an input the loop does not read
    (a float16 or quantized weight a matmul read, next to its epilogue) is left untyped."""
    types = [self.storage_types.get(d.name, "void") for d in dtypes]
    return [f"const {t}* p{i} = (const {t}*)in{i};" for i, t in enumerate(types)]

  def render_chunked(self, name, args, w, red, loop, store):
    """A reduction to one value in chunks(): a call with lo >= 0 writes the partial results of
    chunks [lo, hi) to part (a sum; or a max and whether a NaN was seen); one with lo < 0 adds
    them up in chunk order and writes the output."""
    r, count = self.kernel.reduce, self.chunks()
    rows = self.loops.size(red[0][1])
    args.insert(-2, "double* part")
    self.lines = []
    src = self.value(r.srcs[0], red)
    inner = self.lines
    start = ACC_START[r.op]
    if r.op is Op.SUM:
      combine = [start, f"for (long c = 0; c < {count}; c++) acc += part[c];"]
      finish = "part[c] = acc;"
      self.reduced_value = "((float)acc)"
    else:
      combine = [start, f"for (long c = 0; c < {count}; c++) {{ const float x = (float)part[2 * c]; acc = acc > x ? acc : x; anynan |= part[2 * c + 1] != 0.0; }}",
                 "if (anynan) acc = NAN;"]
      finish = "part[2 * c] = acc; part[2 * c + 1] = anynan;"
      self.reduced_value = "acc"
    self.lines, self.names = [], {}
    value = self.value(self.kernel.ast, [])
    w.open("if (lo < 0) {")
    w.line(*combine, *self.lines, store(value), "return;")
    w.close()
    w.open("for (long c = lo; c < hi; c++) {")
    w.line(start)
    for g, (var, grp) in enumerate(red):
      if g == len(red) - 1: w.line(ACC_PRAGMA[r.op])
      if g == 0: w.open(f"for (long {var} = {rows}L * c / {count}; {var} < {rows}L * (c + 1) / {count}; {var}++) {{")
      else: w.open(loop(var, 0, self.loops.size(grp), False))
    w.line(*inner, *_accumulate(r.op, src))
    w.close(1)
    w.line(finish)
    w.close(0)
    return _function(name, args, w)

  def render_leading(self, name, args, w, kept, red, loop, store):
    """A reduction over leading axes: COLUMNS outputs of the innermost kept loop at a time, each
    with its own accumulator, the reduced loops outside and that block of columns inside, so the
    innermost loop reads along rows and is vectorised. Each output sums in the same order for
    any cut of the outer loop into parts."""
    r = self.kernel.reduce
    *outer, (col, group) = kept
    for g, (var, grp) in enumerate(outer): w.open(loop(var, 0, self.loops.size(grp), g == 0))
    start, stop = ("0", str(self.loops.size(group))) if outer else ("lo", "hi")
    w.open(f"for (long cb = {start}; cb < {stop}; cb += {COLUMNS}) {{")
    w.line(f"const long ce = cb + {COLUMNS} < {stop} ? cb + {COLUMNS} : {stop};")
    self.lines = []
    src = self.value(r.srcs[0], kept + red)
    inner = self.lines
    if r.op is Op.SUM:
      w.line(f"double acc[{COLUMNS}]; for (long c = 0; c < {COLUMNS}; c++) acc[c] = 0.0;")
      self.reduced_value = f"((float)acc[{col} - cb])"
    else:
      w.line(f"float acc[{COLUMNS}]; int anynan[{COLUMNS}]; for (long c = 0; c < {COLUMNS}; c++) {{ acc[c] = -INFINITY; anynan[c] = 0; }}")
      self.reduced_value = f"(anynan[{col} - cb] ? NAN : acc[{col} - cb])"
    depth = w.depth
    for var, grp in red: w.open(loop(var, 0, self.loops.size(grp), False))
    w.line("#pragma omp simd")
    w.open(f"for (long {col} = cb; {col} < ce; {col}++) {{")
    w.line(*inner, *_accumulate(r.op, src, f"[{col} - cb]"))
    w.close(depth)
    self.lines, self.names = [], {}
    value = self.value(self.kernel.ast, kept)
    w.open(f"for (long {col} = cb; {col} < ce; {col}++) {{")
    w.line(*self.lines, store(value))
    w.close(0)
    return _function(name, args, w)


def _function(name, args, w):
  """A compiled loop's C: void name(const intptr_t* a_, long lo, long hi), every loop's signature
  (parallel.py), its arguments (C declarations `type* name` before lo and hi) unpacked from a_."""
  *pointers, lo, hi = args
  assert (lo, hi) == ("long lo", "long hi")
  unpack = [f"{decl} = ({decl.rpartition('*')[0]}*)a_[{i}];" for i, decl in enumerate(pointers)]
  return f"void {name}(const intptr_t* a_, long lo, long hi) {{\n  " + "\n  ".join(unpack + w.lines) + "\n}\n"


class Segment(NamedTuple):
  """A piece [start, stop) of the innermost loop (loop variable var) in which every masked load
  is either wholly valid or wholly masked off (Renderer.segments)."""
  var: str
  start: int
  stop: int


def _accumulate(op, src, at=""):
  """The C that a reduction loop runs per element src: a sum into double acc, or a max into
  float acc that notes a NaN in anynan (NumPy's max propagates NaN). at: an index for the
  per-column accumulators of a reduction over leading axes."""
  if op is Op.SUM: return [f"acc{at} += (double)({src});"]
  return ["const float x = " + src + ";", f"acc{at} = acc{at} > x ? acc{at} : x;", f"anynan{at} |= x != x;"]


ACC_START = {Op.SUM: "double acc = 0.0;", Op.RMAX: "float acc = -INFINITY; int anynan = 0;"}
ACC_PRAGMA = {Op.SUM: "#pragma omp simd reduction(+:acc)", Op.RMAX: "#pragma omp simd reduction(max:acc) reduction(|:anynan)"}


def _unsqueezed(view, shape):
  """view, which has shape's sizes but for some size-1 axes, as a view of shape."""
  _check([n for n in view.shape if n != 1] == [n for n in shape if n != 1], "reduce shape")
  _check(view.mask is None or all(view.mask[a] == (0, 1) for a, n in enumerate(view.shape) if n == 1), "masked size-1 axis")
  real = iter([(st, None if view.mask is None else view.mask[a]) for a, (n, st) in enumerate(zip(view.shape, view.strides)) if n != 1])
  strides, mask = [], []
  for n in shape:
    st, m = next(real) if n != 1 else (0, (0, 1))
    strides.append(st); mask.append(m or (0, n))
  return View(tuple(shape), tuple(strides), view.offset, None if view.mask is None else tuple(mask))


def render(kernel, in_dtypes):
  """(function name, C source, range of its outermost loop) of a kernel; raises Unsupported."""
  renderer = Renderer(kernel, in_dtypes)
  src = renderer.render("KERNEL")
  # the name keys the disk cache: it covers everything the library is built from
  name = "k_" + hashlib.sha256((PRELUDE + src + compiler.signature).encode()).hexdigest()[:24]
  return name, src.replace("void KERNEL(", f"void {name}(", 1), renderer.outer_size(), renderer.chunks()


def render_fused(kernels, in_maps, in_dtypes):
  """(function name, C source, range of its outermost loop) of one loop nest for consecutive
  in-place elementwise updates of one shape (an optimizer's m, v and p: jit._fuse_assigns).
  in_maps[j][i]: the shared input of kernel j's input i; in_dtypes: the shared inputs' dtypes.
  Each element computes every kernel's value in order, a load of an earlier kernel's target
  being the value just computed, then stores them all: AdamW reads p, g, m, v and writes p, m,
  v once (7 passes, not 10). The values are those of the kernels' own loops, bit for bit.
  Raises Unsupported unless all are float32 over unmasked views and every target is read at
  its own element only (so no element depends on another)."""
  shape = tuple(kernels[0].shape)
  targets = [m[k.assign_target] for k, m in zip(kernels, in_maps)]
  _check(len(set(targets)) == len(targets) and all(tuple(k.shape) == shape for k in kernels), "fused shapes")
  renderers = []
  for k, m in zip(kernels, in_maps):
    _check(k.kind == "elementwise" and k.dtype is dtypes.float32 and in_dtypes[m[k.assign_target]] is dtypes.float32, "fused kernel kind")
    renderers.append(Renderer(k, [in_dtypes[c] for c in m]))
  loads = [(r, m, node) for r, k, m in zip(renderers, kernels, in_maps) for node in k._nodes() if node.op is Op.BUFFER]
  views = [r.view(node) for r, _, node in loads]
  _check(all(v.mask is None and len(v.shape) == len(shape) for v in views), "fused masked view")
  for r, m, node in loads:
    if m[node.arg.input] in targets: _check(r.view(node) == View.contiguous(shape), "fused target view")
  loops = _Loops(shape, set(), views)   # axes merged only where they merge in every kernel's views
  kept = [(f"i{g}", group) for g, group in enumerate(loops.kept)]
  _check(kept, "fused loop")
  lines = []
  for j, (r, m) in enumerate(zip(renderers, in_maps)):
    r.loops, r.pointers, r.prefix = loops, m, f"k{j}"
    r.subst = {i: f"u{targets.index(c)}" for i, c in enumerate(m) if c in targets[:j]}
    value = r.value(r.kernel.ast, kept)
    lines += r.lines + [f"const float u{j} = (float)({value});"]
  out_strides = strides_for(shape)
  index = " + ".join(renderers[0].index(lambda a: out_strides[a], kept)) or "0"
  lines += [f"t{c}[{index}] = u{j};" for j, c in enumerate(targets)]
  w = Writer()
  w.line(*renderers[0].pointer_lines(in_dtypes), *[f"float* t{c} = (float*)in{c};" for c in targets])
  for g, (var, group) in enumerate(kept):
    if g == len(kept) - 1: w.line("#pragma omp simd")
    w.open(f"for (long {var} = lo; {var} < hi; {var}++) {{" if g == 0 else f"for (long {var} = 0; {var} < {loops.size(group)}; {var}++) {{")
  w.line(*lines)
  w.close(0)
  args = ["void* out_"] + [f"const void* in{i}" for i in range(len(in_dtypes))] + ["long lo", "long hi"]
  src = _function("KERNEL", args, w)
  name = "f_" + hashlib.sha256((PRELUDE + src + compiler.signature).encode()).hexdigest()[:24]
  return name, src.replace("void KERNEL(", f"void {name}(", 1), loops.size(kept[0][1])


compiler = Compiler(PRELUDE)


def structure(kernel, in_dtypes):
  """A hashable key of everything render() reads: an eager model call schedules the same
  kernels again on every call, and looking them up costs a fraction of rendering them."""
  nodes = kernel._nodes()
  index = {id(n): i for i, n in enumerate(nodes)}
  parts = [kernel.kind, tuple(kernel.shape), kernel.dtype.name, tuple(d.name for d in in_dtypes)]
  for n in nodes:
    arg = n.arg
    if n.op is Op.BUFFER: arg = (arg.input, arg.view.shape, arg.view.strides, arg.view.offset, arg.view.mask)
    elif isinstance(arg, DType): arg = arg.name
    elif isinstance(arg, float): arg = repr(arg)   # -0.0 == 0.0 and nan != nan as dict keys
    parts.append((n.op, n.dtype.name, arg, tuple(index[id(s)] for s in n.srcs), id(n) in kernel.shared))
  return tuple(parts)


_rendered = {}   # structure -> (name, source, outer range, chunks), or None where C does not cover the kernel

C_KINDS = ("elementwise", "reduce", "matmul")   # kernel kinds the C loops may run (a matmul: its epilogue)


class CLoop(NamedTuple):
  """A kernel's compiled loop: its function's name, the range of its outermost loop (what
  parallel.call_in_parts cuts into parts), the elements the kernel reads or writes, and the
  chunks of a reduction to one value (Renderer.chunks; 0: none)."""
  name: str
  outer: int
  size: int
  chunks: int


def prepare(kernels, in_dtypes_of, min_size=None):
  """The CLoop of each kernel (None where NumPy evaluates it: a kernel of fewer than min_size
  elements, or of a kind, op or dtype the C loops do not cover), every new one built in one
  compiler run (min_size: C_FROM unless given); None altogether when there is no compiler."""
  if not compiler.available: return None
  if min_size is None: min_size = C_FROM
  loops, todo = [], {}
  for k in kernels:
    loops.append(None)
    if k.kind not in C_KINDS: continue
    size = prod(k.reduce.arg.shape) if k.kind == "reduce" else prod(k.shape)
    if size < min_size or size == 0: continue
    in_dtypes = in_dtypes_of(k)
    key = structure(k, in_dtypes), CHUNK, COLUMNS
    if key not in _rendered:
      if len(_rendered) > 20000: _rendered.clear()   # shapes that change forever (a growing sequence)
      try: _rendered[key] = render(k, in_dtypes)
      except Unsupported: _rendered[key] = None
    if _rendered[key] is None: continue
    name, src, outer, chunks = _rendered[key]
    loops[-1] = CLoop(name, outer, size, chunks)
    if compiler.get(name) is None: todo[name] = src
  if todo: compiler.build(todo)
  return loops
