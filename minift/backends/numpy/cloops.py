"""Fused CPU loops for the NumPy backend: elementwise kernels, reductions and matmul epilogues
rendered to C and built with the system C compiler (cc, or $CC), where one exists.

NumPy evaluates a fused kernel one pass per op, each pass through a temporary array; the C
loop computes every element once, in registers. BLAS still does the matmuls: a matmul kernel's
epilogue runs in C over the product NumPy made. Kernels that use what this file does not render
(float16, integer division, gathers, a reduction over leading and trailing axes at once) stay
with NumPy.
Attention and its gradients are not rendered: they run the fixed loops of kernels/attention.c
(attention.py), whose sums use FMA (the rounding below is that of the rendered loops).

Rounding: + - * / sqrt and comparisons round as NumPy does (no FMA contraction, no fast-math).
exp, tanh and sigmoid use the polynomials below (exp within 1.5 ulp of float64, tanh within
2.5: test_cloops.py; vectorisable); sums accumulate in double. So a kernel differs from its
NumPy evaluation by an ulp or two. A big kernel's outermost loop is cut into parts that run on
every core at once (parallel.call_in_parts; $MINIFT_THREADS sets how many); each element is
computed the same way in any part, so the thread count never changes a result.

Every kernel the schedule runs is rendered first, and the new ones are compiled together
(one compiler run per schedule, not per kernel) into a shared library cached on disk under
$MINIFT_CACHE_DIR/c or ~/.cache/minift/c. MINIFT_CLOOPS=0 turns the whole path off.
"""
import hashlib
from minift.codegen.cstyle import literal
from minift.dtype import DType, dtypes
from minift.helpers import prod, strides_for
from minift.lazy import Op
from minift.view import View
from minift.backends.numpy.compiler import Compiler

# Kernels of fewer elements than this run in NumPy: there, a compile is not worth it.
C_FROM = 1 << 12
CHUNK = 1 << 16   # elements per partial sum of a big reduction to one value (Renderer.chunks)
COLUMNS = 64   # outputs a reduction over leading axes sums at once (their accumulators stay in registers or L1)

PRELUDE = r"""#include <math.h>
#include <stdint.h>
typedef union { float f; uint32_t i; } bits32;
/* exp(x) = 2^n * e^r, n = round(x / ln 2), |r| <= ln2 / 2, e^r by its Taylor series to r^7
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
static inline float sigmoid_f(float x) { return 1.0f / (1.0f + exp_f(-x)); }
/* NumPy's maximum propagates NaN */
static inline float max_f(float a, float b) { return (a > b || a != a) ? a : b; }
"""

CTYPE = {"bool": "int", "int32": "int32_t", "int64": "int64_t", "float32": "float"}     # arithmetic
PTYPE = {"bool": "uint8_t", "int32": "int32_t", "int64": "int64_t", "float32": "float"}  # storage
UTYPE = {"int32": "uint32_t", "int64": "uint64_t"}   # integer + - * wrap around, as NumPy's do
MATH = {Op.EXP: "exp_f", Op.LOG: "logf", Op.SQRT: "sqrtf", Op.TANH: "tanh_f", Op.SIN: "sinf", Op.SIGMOID: "sigmoid_f", Op.ERF: "erff"}
INFIX = {Op.ADD: "+", Op.SUB: "-", Op.MUL: "*", Op.DIV: "/", Op.CMPLT: "<", Op.CMPEQ: "=="}


class Unsupported(Exception):
  """The kernel uses something this renderer does not cover: NumPy evaluates it."""


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


class Renderer:
  """C source for one kernel: `void NAME(out, in0, in1, ..., lo, hi)`, with one more pointer
  (the matmul's product) before lo for a matmul epilogue; lo and hi bound its outermost loop."""

  def __init__(self, kernel, in_dtypes):
    self.kernel, self.in_dtypes, self.views = kernel, in_dtypes, {}
    self.out_shape = tuple(kernel.shape)
    reduce = kernel.reduce
    outer = kernel._nodes(stop=reduce)                                   # the epilogue (all of an elementwise kernel)
    inner = kernel._nodes(reduce.srcs[0]) if kernel.kind == "reduce" else []   # what a reduction sums
    if kernel.kind == "reduce":
      _check(reduce.dtype is dtypes.float32, "non-float reduction")
      _check(not any(n.op in (Op.SUM, Op.RMAX) for n in inner), "nested reduction")
      _check(not {id(n) for n in outer if n.op is not Op.CONST} & {id(n) for n in inner}, "node inside and after the reduction")
      shape, axes = reduce.arg[1], reduce.arg[0]
      self.out_shape = tuple(1 if a in axes else n for a, n in enumerate(shape))
      if self.out_shape != tuple(kernel.shape):   # the result reshaped: (256, 1) summed rows written as (256,)
        self.views.update((id(n), _unsqueezed(n.arg[1], self.out_shape)) for n in outer if n.op is Op.BUFFER)
    else:
      _check(kernel.kind == "elementwise" or (kernel.kind == "matmul" and kernel.ast is not reduce), "kernel kind")
      shape, axes = kernel.shape, ()
    for node in outer + inner:
      if node is reduce: continue
      _check(node.dtype.name in CTYPE, f"{node.dtype.name} values")
      if node.op is Op.BUFFER: _check(in_dtypes[node.arg[0]].name in PTYPE, "input dtype")
    views = [self.view(n) for n in outer + inner if n.op is Op.BUFFER]
    _check(all(len(v.shape) == len(shape) for v in views), "view rank")
    self.loops = _Loops(tuple(shape), set(axes), views)
    self.names, self.lines, self.count, self.segment, self.absent = {}, [], 0, None, set()   # segment, absent: see render()
    self.pointers, self.subst, self.prefix = None, {}, ""   # render_fused: shared input numbering, values computed in the loop

  # ---- expressions

  def index(self, strides_of, groups):
    """The flat index of element (loop variables) for axis strides strides_of(axis)."""
    terms = []
    for var, group in groups:
      st = strides_of(group[-1])
      if st: terms.append(var if st == 1 else f"{var}*{st}" if st > 0 else f"{var}*({st})")
    return terms

  def view(self, node): return self.views.get(id(node), node.arg[1])

  def load(self, node, groups):
    i, view = node.arg[0], self.view(node)
    if i in self.subst: return self.subst[i]
    dtype = self.in_dtypes[i]
    conds = []
    if view.mask is not None:
      if any(lo >= hi for lo, hi in view.mask): return literal(0, node.dtype)
      for var, group in groups:
        for a in group:
          lo, hi = view.mask[a]
          if (lo, hi) == (0, view.shape[a]): continue
          if self.segment is not None and var == self.segment[0]:   # decided for the whole segment
            if self.segment[2] <= lo or self.segment[1] >= hi: return literal(0, node.dtype)
            continue
          if lo > 0: conds.append(f"{var}>={lo}")
          if hi < view.shape[a]: conds.append(f"{var}<{hi}")
      for a, n in enumerate(view.shape):   # size-1 axes in no loop: their coordinate is 0
        if n == 1 and not view.mask[a][0] <= 0 < view.mask[a][1]: return literal(0, node.dtype)
    terms = self.index(lambda a: view.strides[a], groups) + ([str(view.offset)] if view.offset else [])
    code = f"p{i if self.pointers is None else self.pointers[i]}[{' + '.join(terms) or '0'}]"
    if dtype is dtypes.bool: code = f"({code}!=0)"
    return f"({' && '.join(conds)} ? {code} : {literal(0, node.dtype)})" if conds else code

  def value(self, node, groups):
    name = self.names.get(id(node))
    if name is not None: return name
    code = self._value(node, groups)
    if id(node) not in self.kernel.shared or node.op is Op.CONST: return code
    name = f"{self.prefix}v{self.count}"
    self.count += 1
    self.lines.append(f"const {CTYPE[node.dtype.name]} {name} = {code};")
    self.names[id(node)] = name
    return name

  def _value(self, node, groups):
    op, out = node.op, node.dtype
    if op is Op.BUFFER:
      code = self.load(node, groups)
      if self.segment is not None and code == literal(0, out): self.absent.add(id(node))   # masked off here
      return code
    if op is Op.CONST: return literal(node.arg, out)
    if node is self.kernel.reduce: return self.reduced_value
    _check(op in MATH or op in INFIX or op in (Op.NEG, Op.RECIP, Op.CAST, Op.MAX, Op.POW, Op.WHERE), op.name)
    srcs = [self.value(s, groups) for s in node.srcs]
    a = srcs[0]
    src = node.srcs[0].dtype
    if op is Op.CAST:
      to = node.arg
      if to is dtypes.bool: return f"({a}!=0)"
      _check(not (src.is_float and to.is_int), "float to int cast")
      return f"(({CTYPE[to.name]}){a})"
    if op is Op.WHERE: return f"({a} ? {srcs[1]} : {srcs[2]})"
    if op in (Op.CMPLT, Op.CMPEQ): return f"({a}{INFIX[op]}{srcs[1]})"
    if out is dtypes.bool:   # NumPy: * is and, + and maximum are or
      _check(op in (Op.MUL, Op.ADD, Op.MAX), f"{op.name} on bool")
      return f"({a}&&{srcs[1]})" if op is Op.MUL else f"({a}||{srcs[1]})"
    if out.is_int:   # wrapping arithmetic; no division or power
      _check(op in (Op.ADD, Op.SUB, Op.MUL, Op.NEG, Op.MAX), f"integer {op.name}")
      u, t = UTYPE[out.name], CTYPE[out.name]
      if op is Op.NEG: return f"(({t})(0-({u}){a}))"
      if op is Op.MAX: return f"({a}>{srcs[1]} ? {a} : {srcs[1]})"
      return f"(({t})(({u}){a}{INFIX[op]}({u}){srcs[1]}))"
    if op is Op.ADD and self.segment is not None:   # a load masked off in this piece adds nothing:
      absent = [id(s) in self.absent for s in node.srcs]   # x + 0.0 would turn a -0.0 of x into +0.0
      if all(absent): self.absent.add(id(node))
      if any(absent): return srcs[absent.index(False)] if not all(absent) else a
    if op in MATH: return f"{MATH[op]}({a})"
    if op is Op.NEG: return f"(-{a})"
    if op is Op.RECIP: return f"(1.0f/{a})"
    if op is Op.MAX: return f"max_f({a}, {srcs[1]})"
    if op is Op.POW: return f"powf({a}, {srcs[1]})"
    return f"({a}{INFIX[op]}{srcs[1]})"

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
    body = [f"{PTYPE[k.dtype.name]}* out = ({PTYPE[k.dtype.name]}*)out_;"]
    body += [f"const {PTYPE[d.name]}* p{i} = (const {PTYPE[d.name]}*)in{i};" for i, d in enumerate(self.in_dtypes)]
    if k.kind == "matmul":   # the product, contiguous in the kernel's shape; it may be out itself
      args.append("const float* mm")
      self.reduced_value = f"mm[{out_index}]"
    args += ["long lo", "long hi"]
    lines, indent = [], ""
    def loop(var, start, stop, outermost):   # the outermost loop keeps to [lo, hi): the part of it this call runs
      if not outermost: return f"for (long {var} = {start}; {var} < {stop}; {var}++) {{"
      if (start, stop) == (0, self.outer_size()): return f"for (long {var} = lo; {var} < hi; {var}++) {{"
      return f"for (long {var} = lo > {start} ? lo : {start}; {var} < (hi < {stop} ? hi : {stop}); {var}++) {{"
    store = lambda value: f"out[{out_index}] = ({PTYPE[k.dtype.name]})({value});"
    cut = self.segments(kept)
    # an elementwise or epilogue kernel's innermost loop is vectorised: once whole, or once per
    # piece where masked loads cut it (each piece with its loads decided)
    pieces = cut or ([(0, loops.size(kept[-1][1]))] if kept and k.kind != "reduce" else None)
    for g, (var, group) in enumerate(kept[:-1] if pieces else kept):
      lines.append(indent + loop(var, 0, loops.size(group), g == 0))
      indent += "  "
    if pieces:
      var = kept[-1][0]
      for start, stop in pieces:
        self.segment, self.lines, self.names, self.absent = (var, start, stop) if cut else None, [], {}, set()
        value = self.value(k.ast, kept)
        lines += [indent + "#pragma omp simd", indent + loop(var, start, stop, len(kept) == 1)]
        lines += [indent + "  " + s for s in self.lines + [store(value)]]
        lines.append(indent + "}")
      self.segment = None
      lines += ["  " * (len(kept) - g - 2) + "}" for g in range(len(kept) - 1)]
      return f"void {name}({', '.join(args)}) {{\n  " + "\n  ".join(body + lines) + "\n}\n"
    if k.kind == "reduce" and loops.leading: return self.render_leading(name, args, body, kept, red, loop, store)
    if self.chunks(): return self.render_chunked(name, args, body, red, loop, store)
    if k.kind == "reduce":
      r = k.reduce
      self.lines = []
      src = self.value(r.srcs[0], kept + red)
      inner = self.lines
      lines.append(indent + ACC_START[r.op])
      update, pragma = _accumulate(r.op, src), ACC_PRAGMA[r.op]
      rindent = indent
      for g, (var, group) in enumerate(red):
        if g == len(red) - 1: lines.append(rindent + pragma)
        lines.append(rindent + loop(var, 0, loops.size(group), False))
        rindent += "  "
      lines += [rindent + s for s in inner + update]
      lines += [indent + "  " * (len(red) - g - 1) + "}" for g in range(len(red))]
      if r.op is Op.RMAX: lines.append(indent + "if (anynan) acc = NAN;")
      self.reduced_value = "((float)acc)"
    self.lines, self.names = [], {}
    value = self.value(k.ast, kept)
    lines += [indent + s for s in self.lines + [store(value)]]
    lines += ["  " * (len(kept) - g - 1) + "}" for g in range(len(kept))]
    return f"void {name}({', '.join(args)}) {{\n  " + "\n  ".join(body + lines) + "\n}\n"

  def render_chunked(self, name, args, body, red, loop, store):
    """A reduction to one value in chunks(): a call with lo >= 0 writes the partial results of
    chunks [lo, hi) to part (a sum; or a max and whether a NaN was seen); one with lo < 0 adds
    them up in chunk order and writes the output."""
    r, count = self.kernel.reduce, self.chunks()
    rows = self.loops.size(red[0][1])
    args.insert(-2, "double* part")
    self.lines = []
    src = self.value(r.srcs[0], red)
    inner = self.lines
    start, update, pragma = ACC_START[r.op], _accumulate(r.op, src), ACC_PRAGMA[r.op]
    if r.op is Op.SUM:
      combine = [start, f"for (long c = 0; c < {count}; c++) acc += part[c];"]
      finish = "part[c] = acc;"
      self.reduced_value = "((float)acc)"
    else:
      combine = [start, f"for (long c = 0; c < {count}; c++) {{ const float x = (float)part[2 * c]; acc = acc > x ? acc : x; anynan |= part[2 * c + 1] != 0.0; }}",
                 "if (anynan) acc = NAN;"]
      finish = "part[2 * c] = acc; part[2 * c + 1] = anynan;"
      self.reduced_value = "acc"
    lines = [f"for (long c = lo; c < hi; c++) {{", "  " + start]
    indent = "  "
    for g, (var, grp) in enumerate(red):
      if g == len(red) - 1: lines.append(indent + pragma)
      if g == 0: lines.append(indent + f"for (long {var} = {rows}L * c / {count}; {var} < {rows}L * (c + 1) / {count}; {var}++) {{")
      else: lines.append(indent + loop(var, 0, self.loops.size(grp), False))
      indent += "  "
    lines += [indent + s for s in inner + update] + ["  " * (len(red) - g) + "}" for g in range(len(red))]
    lines += ["  " + finish, "}"]
    self.lines, self.names = [], {}
    value = self.value(self.kernel.ast, [])
    lines = ["if (lo < 0) {"] + ["  " + s for s in combine + self.lines + [store(value)]] + ["  return;", "}"] + lines
    return f"void {name}({', '.join(args)}) {{\n  " + "\n  ".join(body + lines) + "\n}\n"

  def render_leading(self, name, args, body, kept, red, loop, store):
    """A reduction over leading axes: COLUMNS outputs of the innermost kept loop at a time, each
    with its own accumulator, the reduced loops outside and that block of columns inside, so the
    innermost loop reads along rows and is vectorised. Each output sums in the same order for
    any cut of the outer loop into parts."""
    r, lines, indent = self.kernel.reduce, [], ""
    *outer, (col, group) = kept
    for g, (var, grp) in enumerate(outer):
      lines.append(indent + loop(var, 0, self.loops.size(grp), g == 0))
      indent += "  "
    start, stop = ("0", str(self.loops.size(group))) if outer else ("lo", "hi")
    lines += [indent + f"for (long cb = {start}; cb < {stop}; cb += {COLUMNS}) {{",
              indent + f"  const long ce = cb + {COLUMNS} < {stop} ? cb + {COLUMNS} : {stop};"]
    indent += "  "
    self.lines = []
    src = self.value(r.srcs[0], kept + red)
    inner = self.lines
    update = _accumulate(r.op, src, f"[{col} - cb]")
    if r.op is Op.SUM:
      lines.append(indent + f"double acc[{COLUMNS}]; for (long c = 0; c < {COLUMNS}; c++) acc[c] = 0.0;")
      self.reduced_value = f"((float)acc[{col} - cb])"
    else:
      lines.append(indent + f"float acc[{COLUMNS}]; int anynan[{COLUMNS}]; for (long c = 0; c < {COLUMNS}; c++) {{ acc[c] = -INFINITY; anynan[c] = 0; }}")
      self.reduced_value = f"(anynan[{col} - cb] ? NAN : acc[{col} - cb])"
    rindent = indent
    for var, grp in red:
      lines.append(rindent + loop(var, 0, self.loops.size(grp), False))
      rindent += "  "
    lines += [rindent + "#pragma omp simd", rindent + f"for (long {col} = cb; {col} < ce; {col}++) {{"]
    lines += [rindent + "  " + s for s in inner + update] + [rindent + "}"]
    lines += [indent + "  " * (len(red) - g - 1) + "}" for g in range(len(red))]
    self.lines, self.names = [], {}
    value = self.value(self.kernel.ast, kept)
    lines += [indent + f"for (long {col} = cb; {col} < ce; {col}++) {{"] + [indent + "  " + s for s in self.lines + [store(value)]] + [indent + "}"]
    lines += ["  " * (len(kept) - g - 1) + "}" for g in range(len(kept))]
    return f"void {name}({', '.join(args)}) {{\n  " + "\n  ".join(body + lines) + "\n}\n"


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
    if m[node.arg[0]] in targets: _check(r.view(node) == View.contiguous(shape), "fused target view")
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
  body = [f"const {PTYPE[d.name]}* p{i} = (const {PTYPE[d.name]}*)in{i};" for i, d in enumerate(in_dtypes)]
  body += [f"float* t{c} = (float*)in{c};" for c in targets]
  indent = ""
  for g, (var, group) in enumerate(kept):
    if g == len(kept) - 1: body.append(indent + "#pragma omp simd")
    body.append(indent + (f"for (long {var} = lo; {var} < hi; {var}++) {{" if g == 0 else f"for (long {var} = 0; {var} < {loops.size(group)}; {var}++) {{"))
    indent += "  "
  body += [indent + s for s in lines] + ["  " * (len(kept) - g - 1) + "}" for g in range(len(kept))]
  args = ["void* out_"] + [f"const void* in{i}" for i in range(len(in_dtypes))] + ["long lo", "long hi"]
  src = f"void KERNEL({', '.join(args)}) {{\n  " + "\n  ".join(body) + "\n}\n"
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
    if n.op is Op.BUFFER: arg = (arg[0], arg[1].shape, arg[1].strides, arg[1].offset, arg[1].mask)
    elif isinstance(arg, DType): arg = arg.name
    elif isinstance(arg, float): arg = repr(arg)   # -0.0 == 0.0 and nan != nan as dict keys
    parts.append((n.op, n.dtype.name, arg, tuple(index[id(s)] for s in n.srcs), id(n) in kernel.shared))
  return tuple(parts)


_rendered = {}   # structure -> (name, source, outer range), or None where C does not cover the kernel


def prepare(kernels, in_dtypes_of):
  """Render every kernel C can run and build the new ones in one compiler run. Sets
  kernel._c_name (None: NumPy evaluates it) and kernel._c_split: (range of the outermost loop,
  elements the kernel reads or writes), what the backend needs to run it in parts."""
  if not compiler.available: return
  todo = {}
  for k in kernels:
    if "_c_name" in k.__dict__: continue
    k._c_name = None
    if k.kind not in ("elementwise", "reduce", "matmul"): continue
    size = prod(k.reduce.arg[1]) if k.kind == "reduce" else prod(k.shape)
    if size < C_FROM or size == 0: continue
    in_dtypes = in_dtypes_of(k)
    key = structure(k, in_dtypes), CHUNK, COLUMNS
    if key not in _rendered:
      if len(_rendered) > 20000: _rendered.clear()   # shapes that change forever (a growing sequence)
      try: _rendered[key] = render(k, in_dtypes)
      except Unsupported: _rendered[key] = None
    if _rendered[key] is None: continue
    name, src, outer, chunks = _rendered[key]
    k._c_name, k._c_split, k._c_chunks = name, (outer, size), chunks
    if compiler.get(name) is None: todo[name] = src
  if todo: compiler.build(todo)
