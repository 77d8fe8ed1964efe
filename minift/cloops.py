"""Fused CPU loops for the NumPy backend: elementwise kernels, reductions and matmul epilogues
rendered to C and built with the system C compiler (cc, or $CC), where one exists.

NumPy evaluates a fused kernel one pass per op, each pass through a temporary array; the C
loop computes every element once, in registers. BLAS still does the matmuls: a matmul kernel's
epilogue runs in C over the product NumPy made. Kernels that use what this file does not render
(float16, integer division, gathers, a reduction over leading and trailing axes at once) stay
with NumPy.
Attention and its gradients are not rendered: they run the fixed loops of ATTENTION_SOURCE,
whose sums use FMA (the rounding below is that of the rendered loops).

Rounding: + - * / sqrt and comparisons round as NumPy does (no FMA contraction, no fast-math).
exp, tanh and sigmoid use the polynomials below (exp within 1.5 ulp of float64, tanh within
2.5: test_cloops.py; vectorisable); sums accumulate in double. So a kernel differs from its
NumPy evaluation by an ulp or two. A big kernel's outermost loop is cut into parts that run on
every core at once (backend_numpy.call_in_parts; $MINIFT_THREADS sets how many); each element is
computed the same way in any part, so the thread count never changes a result.

Every kernel the schedule runs is rendered first, and the new ones are compiled together
(one compiler run per schedule, not per kernel) into a shared library cached on disk under
$MINIFT_CACHE_DIR/c or ~/.cache/minift/c. MINIFT_CLOOPS=0 turns the whole path off.
"""
import ctypes, functools, hashlib, os, platform, shutil, subprocess, tempfile
from pathlib import Path
from minift.codegen_opencl import literal
from minift.device import log
from minift.dtype import DType, dtypes
from minift.helpers import prod, prune_cache, strides_for, touch_cache
from minift.lazy import Op
from minift.view import View

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
    # (an input the loop does not read, such as a float16 weight BLAS multiplied, is left untyped)
    body += [f"const {PTYPE.get(d.name, 'void')}* p{i} = (const {PTYPE.get(d.name, 'void')}*)in{i};" for i, d in enumerate(self.in_dtypes)]
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
  body = [f"const {PTYPE.get(d.name, 'void')}* p{i} = (const {PTYPE.get(d.name, 'void')}*)in{i};" for i, d in enumerate(in_dtypes)]
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


# ---- attention

# softmax(q k^T * scale, masked) v for the NumPy backend's ATTENTION kernels, and its gradients
# for ATTENTION_BACKWARD, ATTENTION_ROWS queries at a time. The block's scores over the keys any of
# its rows sees stay in a scratch array, so the (T, S) scores are never written out, and the
# masked-off keys of a causal block are skipped; the backward makes them again. The products are
# computed in register tiles of 4 rows; the block's 8 tiles take turns on each tile of keys (and
# of values) while it is in the L1 cache. Unlike the rendered loops, products are contracted into
# FMAs (they are sums over D and over the keys, as BLAS computes them); row sums accumulate in
# double.
ATTENTION_ROWS = 32
ATTENTION_SOURCE = r"""
#define ATT_BLOCK 32               /* query rows per unit of work (ATTENTION_ROWS) */
#define ATT_ROWS 4                 /* query rows per register tile */
#ifdef __AVX512F__
#define ATT_W 4                    /* 16-float vectors per register tile: 16 of 32 registers hold the sums */
#else
#define ATT_W 1
#endif
#define ATT_TILE (16 * ATT_W)
typedef float att_v16 __attribute__((vector_size(64), aligned(4)));
#if defined(__GNUC__) && !defined(__clang__)
#define ATT_CONTRACT __attribute__((optimize("fp-contract=fast")))   /* gcc inlines only into functions that have it too */
#else
#define ATT_CONTRACT
#endif
#define ATT_FN static inline ATT_CONTRACT

/* The one register tile every product here is made of: 4 rows x 16 w columns of
   dst[r][..] (+)= sum_{i < n} a[i * a_i + r * a_r] * b[i * b_i ..] (a sum of n outer products).
   The scores are (q tiles) x (keys transposed), the outputs and dq (probabilities) x (rows of
   values or keys), dk and dv (probabilities, transposed) x (rows of queries or output grads). */
ATT_FN void att_tile(const float* a, long a_i, long a_r, const float* b, long b_i, long n, float* dst, long ds, int accumulate, const int w) {
#ifdef __clang__
  _Pragma("clang fp contract(fast)")
#endif
  att_v16 acc[ATT_ROWS][ATT_W];
  for (int r = 0; r < ATT_ROWS; r++) for (int c = 0; c < w; c++) acc[r][c] = accumulate ? *(att_v16*)(dst + r * ds + 16 * c) : (att_v16){0};
  for (long i = 0; i < n; i++) {
    att_v16 bv[ATT_W];
    for (int c = 0; c < w; c++) bv[c] = *(const att_v16*)(b + i * b_i + 16 * c);
    for (int r = 0; r < ATT_ROWS; r++) {
      float x = a[i * a_i + r * a_r];
      for (int c = 0; c < w; c++) acc[r][c] += x * bv[c];
    }
  }
  for (int r = 0; r < ATT_ROWS; r++) for (int c = 0; c < w; c++) *(att_v16*)(dst + r * ds + 16 * c) = acc[r][c];
}

/* src (S, n) rows to dst (n, sp), zeros in columns S .. sp; 16 rows at a time: whole cache lines */
static void att_transpose(const float* src, long S, long n, long sp, float* dst) {
  for (long j0 = 0; j0 < S; j0 += 16)
    for (long d = 0; d < n; d++) for (long j = j0; j < j0 + 16 && j < S; j++) dst[d * sp + j] = src[j * n + d];
  for (long d = 0; d < n; d++) for (long j = S; j < sp; j++) dst[d * sp + j] = 0.0f;
}

/* rows [0, rows) of src (n wide, times scale) into dst as 4-row tiles (n, 4) ("tiles") and as
   rows padded to np wide ("padded", where not NULL); zeros for the rows after them */
static void att_load_rows(const float* src, long rows, long n, float scale, float* tiles, float* padded, long np) {
  long ntiles = (rows + ATT_ROWS - 1) / ATT_ROWS;
  for (long t = 0; t < ntiles; t++)
    for (long d = 0; d < n; d++) for (int r = 0; r < ATT_ROWS; r++) {
      long row = t * ATT_ROWS + r;
      tiles[(t * n + d) * ATT_ROWS + r] = row < rows ? src[row * n + d] * scale : 0.0f;
    }
  if (padded) for (long r = 0; r < rows; r++) for (long c = 0; c < np; c++) padded[r * np + c] = c < n ? src[r * n + c] * scale : 0.0f;
}

/* sc[r][j] for the block's tiles and keys [j0, j1): sum over d of tiles[d][r] * kt[d][j] */
static inline void att_block_scores(const float* tiles, long ntiles, const float* kt, long sp, long n, long j0, long j1, float* sc) {
  for (long j = j0; j < j1; ) {
    int w = j + ATT_TILE <= j1 ? ATT_W : 1;
    for (long t = 0; t < ntiles; t++) {
      const float* a = tiles + t * n * ATT_ROWS;
      if (w == ATT_W) att_tile(a, ATT_ROWS, 1, kt + j, sp, n, sc + t * ATT_ROWS * sp + j, sp, 0, ATT_W);
      else att_tile(a, ATT_ROWS, 1, kt + j, sp, n, sc + t * ATT_ROWS * sp + j, sp, 0, 1);
    }
    j += 16 * w;
  }
}

/* o[r][0 .. np) = sum_{j in [j0, j1)} p[r][j] * rows[j][..] for the block's tiles (rows np wide) */
static inline void att_block_products(const float* p, long ntiles, long sp, const float* rows, long np, long j0, long j1, float* o) {
  for (long c = 0; c < np; ) {
    int w = c + ATT_TILE <= np ? ATT_W : 1;
    for (long jc = j0; jc < j1 || jc == j0; jc += 64) {   /* 64 keys' rows at a time, shared by the block's tiles */
      long jend = jc + 64 < j1 ? jc + 64 : j1;
      for (long t = 0; t < ntiles; t++) {
        const float* a = p + t * ATT_ROWS * sp + jc;
        float* dst = o + t * ATT_ROWS * np + c;
        if (w == ATT_W) att_tile(a, 1, sp, rows + jc * np + c, np, jend - jc, dst, np, jc != j0, ATT_W);
        else att_tile(a, 1, sp, rows + jc * np + c, np, jend - jc, dst, np, jc != j0, 1);
      }
    }
    c += 16 * w;
  }
}

/* the keys [r0, r1) query row a (aligned with key a) sees, within the block's [j0, j1) */
static inline void att_row_keys(long a, long causal, long window, long S, long j0, long j1, long* r0, long* r1) {
  long lo = window > 0 ? a - window + 1 : 0, hi = causal ? a + 1 : S;
  if (lo < j0) lo = j0;
  if (hi > j1) hi = j1;
  if (hi < lo) hi = lo;
  *r0 = lo; *r1 = hi;
}

/* the keys [j0, j1) some query of the block [i0, i0 + rows) sees: from its first row's first key
   to its last row's last */
static inline void att_block_keys(long i0, long rows, long off, long causal, long window, long S, long* j0, long* j1) {
  long unused;
  att_row_keys(i0 + off, causal, window, S, 0, S, j0, &unused);
  att_row_keys(i0 + rows - 1 + off, causal, window, S, 0, S, &unused, j1);
  if (*j1 < *j0) *j1 = *j0;
}

/* s[r0 .. r1) = exp(s - max), zeros elsewhere in [j0, j1 + 4); returns their sum */
ATT_CONTRACT static double att_exp_row(float* s, long j0, long r0, long r1, long j1) {
  float m = -INFINITY;   /* (a NaN score need not reach m: exp(NaN - m) makes the row's sum NaN) */
#pragma omp simd reduction(max:m)
  for (long x = r0; x < r1; x++) m = m > s[x] ? m : s[x];
  double l = 0.0;
#pragma omp simd reduction(+:l)
  for (long x = r0; x < r1; x++) { float e = exp_f(s[x] - m); s[x] = e; l += (double)e; }
  for (long x = j0; x < r0; x++) s[x] = 0.0f;
  for (long x = r1; x < j1 + 4; x++) s[x] = 0.0f;
  return l;
}

/* out (B, Hq, T, Dv) from q (B, Hq, T, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), all contiguous.
   Query i (aligned with key i + S - T) sees keys j <= i + S - T when causal, and, with a window
   (> 0), only j > i + S - T - window. Units [lo, hi) of the B * Hq * ceil(T / ATT_BLOCK) query
   blocks: one part of the work. failed[0] is set where the scratch memory could not be had. */
ATT_CONTRACT void ATTENTION_NAME(float* out, const float* q, const float* k, const float* v, int32_t* failed,
                                 long B, long Hq, long Hkv, long T, long S, long D, long Dv, float scale,
                                 long causal, long window, long lo, long hi) {
  long G = Hq / Hkv, off = S - T, blocks = (T + ATT_BLOCK - 1) / ATT_BLOCK;
  long sp = (S + ATT_TILE - 1) / ATT_TILE * ATT_TILE + ATT_TILE;   /* a tile may start anywhere below S */
  long dvp = (Dv + 15) / 16 * 16, vp_size = dvp == Dv ? 0 : S * dvp;
  float* kt = malloc(sizeof(float) * (D * sp + vp_size + ATT_BLOCK * (sp + D + dvp)));
  if (!kt) { failed[0] = 1; return; }
  float *vp = kt + D * sp, *sc = vp + vp_size, *qs = sc + ATT_BLOCK * sp, *o = qs + ATT_BLOCK * D;
  long packed = -1;
  for (long u = lo; u < hi; u++) {
    long bh = u / blocks, i0 = (u % blocks) * ATT_BLOCK, b = bh / Hq, h = bh % Hq, kvh = b * Hkv + h / G;
    long rows = T - i0 < ATT_BLOCK ? T - i0 : ATT_BLOCK, tiles = (rows + ATT_ROWS - 1) / ATT_ROWS;
    if (kvh != packed) {   /* this (batch, kv head)'s keys as (D, sp), its values as rows dvp wide */
      const float* V = v + kvh * S * Dv;
      att_transpose(k + kvh * S * D, S, D, sp, kt);
      if (dvp == Dv) vp = (float*)V;
      else for (long j = 0; j < S; j++) for (long c = 0; c < dvp; c++) vp[j * dvp + c] = c < Dv ? V[j * Dv + c] : 0.0f;
      packed = kvh;
    }
    att_load_rows(q + (bh * T + i0) * D, rows, D, scale, qs, 0, 0);
    long j0, j1;
    att_block_keys(i0, rows, off, causal, window, S, &j0, &j1);
    att_block_scores(qs, tiles, kt, sp, D, j0, j1, sc);
    double sums[ATT_BLOCK];
    for (long r = 0; r < rows; r++) {
      long r0, r1;
      att_row_keys(i0 + r + off, causal, window, S, j0, j1, &r0, &r1);
      sums[r] = att_exp_row(sc + r * sp, j0, r0, r1, j1);
    }
    att_block_products(sc, tiles, sp, vp, dvp, j0, j1, o);
    for (long r = 0; r < rows; r++) {
      float l = (float)sums[r];
      for (long x = 0; x < Dv; x++) out[(bh * T + i0 + r) * Dv + x] = o[r * dvp + x] / l;
    }
  }
  free(kt);
}

/* The gradients of ATTENTION_NAME's out (dout, (B, Hq, T, Dv)) with respect to q, k and v, written
   one after the other into out. The softmax is made again from the scores (nothing of the forward
   is kept); with P = softmax and dP = dout v^T, dS = P (dP - rowsum(P dP)), and
   dq = scale dS k, dk = scale dS^T q, dv = P^T dout. Units [lo, hi) of the B * Hkv (batch, kv
   head) pairs: a part owns the keys' and values' gradients of its pairs. */
ATT_CONTRACT void ATTENTION_BACKWARD_NAME(float* out, const float* q, const float* k, const float* v, const float* dout, int32_t* failed,
                                          long B, long Hq, long Hkv, long T, long S, long D, long Dv, float scale,
                                          long causal, long window, long lo, long hi) {
  long G = Hq / Hkv, off = S - T;
  long sp = (S + ATT_TILE - 1) / ATT_TILE * ATT_TILE + ATT_TILE;
  long dp = (D + 15) / 16 * 16, dvp = (Dv + 15) / 16 * 16;
  float *dq = out, *dk = out + B * Hq * T * D, *dv = dk + B * Hkv * S * D;
  float* kt = malloc(sizeof(float) * (D * sp + Dv * sp + 2 * sp * dp + sp * dvp + ATT_BLOCK * (2 * sp + D + Dv + 2 * dp + dvp)));
  if (!kt) { failed[0] = 1; return; }
  float *vt = kt + D * sp, *kp = vt + Dv * sp, *dka = kp + sp * dp, *dva = dka + sp * dp;
  float *sc = dva + sp * dvp, *ds = sc + ATT_BLOCK * sp, *qs = ds + ATT_BLOCK * sp, *dos = qs + ATT_BLOCK * D;
  float *qr = dos + ATT_BLOCK * Dv, *dor = qr + ATT_BLOCK * dp, *o = dor + ATT_BLOCK * dvp;
  for (long u = lo; u < hi; u++) {
    const float *K = k + u * S * D, *V = v + u * S * Dv;
    long b = u / Hkv, kvh = u % Hkv;
    att_transpose(K, S, D, sp, kt);
    att_transpose(V, S, Dv, sp, vt);
    for (long j = 0; j < sp; j++) for (long c = 0; c < dp; c++) kp[j * dp + c] = j < S && c < D ? K[j * D + c] : 0.0f;
    for (long x = 0; x < sp * dp; x++) dka[x] = 0.0f;
    for (long x = 0; x < sp * dvp; x++) dva[x] = 0.0f;
    for (long h = kvh * G; h < (kvh + 1) * G; h++) {
      long bh = b * Hq + h;
      for (long i0 = 0; i0 < T; i0 += ATT_BLOCK) {
        long rows = T - i0 < ATT_BLOCK ? T - i0 : ATT_BLOCK, tiles = (rows + ATT_ROWS - 1) / ATT_ROWS;
        att_load_rows(q + (bh * T + i0) * D, rows, D, scale, qs, qr, dp);
        att_load_rows(dout + (bh * T + i0) * Dv, rows, Dv, 1.0f, dos, dor, dvp);
        long j0, j1;
        att_block_keys(i0, rows, off, causal, window, S, &j0, &j1);
        att_block_scores(qs, tiles, kt, sp, D, j0, j1, sc);     /* scores */
        att_block_scores(dos, tiles, vt, sp, Dv, j0, j1, ds);   /* dP */
        for (long r = 0; r < rows; r++) {
          float *p = sc + r * sp, *g = ds + r * sp;
          long r0, r1;
          att_row_keys(i0 + r + off, causal, window, S, j0, j1, &r0, &r1);
          float inv = (float)(1.0 / att_exp_row(p, j0, r0, r1, j1));
          double dot = 0.0;
#pragma omp simd reduction(+:dot)
          for (long x = r0; x < r1; x++) { p[x] *= inv; dot += (double)(p[x] * g[x]); }
          float rowsum = (float)dot;
          for (long x = j0; x < r0; x++) g[x] = 0.0f;
#pragma omp simd
          for (long x = r0; x < r1; x++) g[x] = p[x] * (g[x] - rowsum);
          for (long x = r1; x < j1 + 4; x++) g[x] = 0.0f;
        }
        att_block_products(ds, tiles, sp, kp, dp, j0, j1, o);   /* dS k */
        for (long r = 0; r < rows; r++) for (long x = 0; x < D; x++) dq[(bh * T + i0 + r) * D + x] = o[r * dp + x] * scale;
        for (long j = j0; j < j1; j += ATT_ROWS) {   /* 4 keys at a time; the scores past j1 are zeros */
          long c = 0;
          for (; c + ATT_TILE <= dp; c += ATT_TILE) att_tile(ds + j, sp, 1, qr + c, dp, rows, dka + j * dp + c, dp, 1, ATT_W);
          for (; c < dp; c += 16) att_tile(ds + j, sp, 1, qr + c, dp, rows, dka + j * dp + c, dp, 1, 1);
          for (c = 0; c + ATT_TILE <= dvp; c += ATT_TILE) att_tile(sc + j, sp, 1, dor + c, dvp, rows, dva + j * dvp + c, dvp, 1, ATT_W);
          for (; c < dvp; c += 16) att_tile(sc + j, sp, 1, dor + c, dvp, rows, dva + j * dvp + c, dvp, 1, 1);
        }
      }
    }
    for (long j = 0; j < S; j++) {
      for (long x = 0; x < D; x++) dk[(u * S + j) * D + x] = dka[j * dp + x];
      for (long x = 0; x < Dv; x++) dv[(u * S + j) * Dv + x] = dva[j * dvp + x];
    }
  }
  free(kt);
}
"""


@functools.lru_cache(maxsize=None)
def _attention_name(signature):
  return "attention_" + hashlib.sha256((PRELUDE + ATTENTION_SOURCE + signature).encode()).hexdigest()[:24]


def attention_functions():
  """(forward, backward): the compiled attention loops (ATTENTION_SOURCE), built on first use;
  None without a compiler."""
  if not compiler.available: return None
  name = _attention_name(compiler.signature)   # (hashed once: every attention kernel asks)
  fns = compiler.get(name), compiler.get(name + "_backward")
  if None in fns:
    src = "#include <stdlib.h>\n" + ATTENTION_SOURCE.replace("ATTENTION_BACKWARD_NAME", name + "_backward").replace("ATTENTION_NAME", name)
    compiler.build({name: src, name + "_backward": ""})   # both names listed: the cache finds each function by its name
    fns = compiler.get(name), compiler.get(name + "_backward")
    if None in fns: return None
  for fn, tensors in zip(fns, (3, 4)):
    if fn.argtypes is None: fn.argtypes = [ctypes.c_void_p] * (tensors + 2) + [ctypes.c_long] * 7 + [ctypes.c_float] + [ctypes.c_long] * 4
  return fns


# ---- building

def _cpu_id():
  try:
    with open("/proc/cpuinfo") as f:
      return next((line for line in f if line.split(":")[0].strip() in ("flags", "Features")), "")
  except OSError: return platform.machine() + platform.processor()


def cache_dir():
  env = os.environ.get("MINIFT_CACHE_DIR")
  return Path(env) / "c" if env else Path.home() / ".cache" / "minift" / "c"


class Compiler:
  """Builds rendered kernels into shared libraries, one per batch, cached on disk; finds a
  function again by its name (a hash of its source and of the compiler) in this process or in
  the cache."""

  FLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared"]
  OPTIONAL = ["-march=native", "-fopenmp-simd"]   # each dropped where the compiler refuses it

  def __init__(self):
    self.functions, self.index, self._flags, self._signature, self.failed = {}, None, None, None, None
    self.cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")

  @property
  def available(self):
    return self.cc is not None and self.failed is None and os.environ.get("MINIFT_CLOOPS", "1") != "0" and self.flags is not None

  @property
  def flags(self):
    """The compiler's flags, found once by building a small loop with each optional flag."""
    if self._flags is None and self.failed is None:
      test = PRELUDE + "void probe(float* x) {\n#pragma omp simd\n for (long i = 0; i < 64; i++) x[i] = exp_f(x[i]);\n}\n"
      flags = list(self.FLAGS)
      with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "p.c").write_text(test)
        for extra in ([*self.OPTIONAL], [self.OPTIONAL[1]], [self.OPTIONAL[0]], []):
          res = self._cc(flags + extra, Path(tmp) / "p.c", Path(tmp) / "p.so")
          if res.returncode == 0:
            self._flags = flags + extra
            break
        else: self._fail(res.stderr)
    return self._flags

  def _cc(self, flags, c_file, so_file):
    try: return subprocess.run([self.cc, *flags, "-o", str(so_file), str(c_file), "-lm"], capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e: return subprocess.CompletedProcess([], 1, "", str(e))

  def _fail(self, stderr):
    self.failed = stderr[-2000:]
    log.warning(f"the C compiler {self.cc} failed; the NumPy backend evaluates every kernel with NumPy:\n{self.failed}")

  @property
  def signature(self):
    """What a cached library depends on besides its source: the compiler, its flags, and the
    CPU (-march=native code from one machine may not run on another sharing the home folder)."""
    if self._signature is None: self._signature = f"{self.cc} {' '.join(self.flags or [])} {_cpu_id()}"
    return self._signature

  def _load_index(self):
    """{function name: library path} of every library in the cache."""
    self.index = {}
    for listing in cache_dir().glob("*.txt"):
      lib = listing.with_suffix(".so")
      if lib.exists(): self.index.update((n, lib) for n in listing.read_text().split())

  def get(self, name):
    fn = self.functions.get(name)
    if fn is None:
      if self.index is None: self._load_index()
      lib = self.index.get(name)
      if lib is None: return None
      try: fn = getattr(ctypes.CDLL(str(lib)), name)
      except OSError:   # pruned by another process since the index was read: NumPy runs it
        self.index = {n: p for n, p in self.index.items() if p != lib}
        return None
      fn.restype = None
      self.functions[name] = fn
      touch_cache(lib)
    return fn

  def build(self, sources):
    """Compile {name: source} (names not yet built) into one library."""
    src = PRELUDE + "\n".join(sources[n] for n in sorted(sources))
    key = hashlib.sha256((src + self.signature).encode()).hexdigest()[:32]
    folder = cache_dir()
    lib, listing = folder / f"{key}.so", folder / f"{key}.txt"
    try:
      folder.mkdir(parents=True, exist_ok=True)
      if not lib.exists():
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
          (Path(tmp) / "k.c").write_text(src)
          res = self._cc(self.flags, Path(tmp) / "k.c", Path(tmp) / "k.so")
          if res.returncode != 0: return self._fail(res.stderr)
          os.replace(Path(tmp) / "k.so", lib)   # atomic: another process may be building the same library
      if not listing.exists():
        tmp = listing.with_suffix(f".txt.{os.getpid()}")
        tmp.write_text("\n".join(sorted(sources)))
        os.replace(tmp, listing)
    except OSError as e:   # an unwritable cache folder, a full disk
      return self._fail(f"{folder}: {e}")
    if self.index is None: self._load_index()
    self.index.update((n, lib) for n in sources)
    if prune_cache(folder, "*.so", companions=(".txt",)):   # libraries this process loaded stay mapped
      kept = {p for p in set(self.index.values()) if p.exists()}
      self.index = {n: p for n, p in self.index.items() if p in kept}


compiler = Compiler()


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
