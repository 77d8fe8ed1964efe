"""Render scheduled kernels (schedule.Kernel) to OpenCL C source: the OpenCL C dialect of the
C-style languages (codegen/cstyle.py) and the kernel kinds' structure (one work-item per output;
a work-group per output for long reductions; the matmul of kernels/matmul.cl).

Every kernel takes (out, data0, ..., dataN-1), the inputs in the order the schedule gave them,
plus a few extra arguments for some kinds (rand: key and counter; gather and scatter-add: an
error flag). Arithmetic is done in float for float16 and float32; float16 is stored as half and
moved with vload_half/vstore_half (no cl_khr_fp16 needed) and rounded to half after every op,
as NumPy does. bool is stored as uchar, int64 as long. Indexing through views, matmul shapes and
tiles are shared with the Vulkan backend (codegen/gpu.py).
"""
from dataclasses import dataclass, field, replace
import numpy as np
from minift.codegen.cstyle import CStyleLanguage
from minift.codegen.gpu import (view_index, wide_index, round_up as _round_up, pow2_floor as _pow2_floor, assign_in_place_ok,
                                rand_args, matmul_shape, fastest as _fastest, matmul_out_index, scatter_add_fill)
from minift.codegen.tiles import matmul_tiles
from minift.dtype import dtypes
from minift.helpers import prod, read_kernel
from minift.lazy import Op


class OpenCLLanguage(CStyleLanguage):
  """The OpenCL C dialect: half stored as half and moved with vload_half/vstore_half (no
  cl_khr_fp16 needed), bool stored as uchar; integer division and power through helpers."""
  prelude_head = "// minift generated kernel\n"
  prelude_math = r"""// float16 is stored as half but computed in float: round to half after each op, as NumPy does
float round_half(float x) { ushort h; vstore_half(x, 0, (__private half*)&h); return vload_half(0, (__private const half*)&h); }
// tanh rounds to +-1 in float beyond |x| = 13 ln 2; some drivers stop one ulp short, and
// gradients such as 1 - tanh(x)^2 then differ from NumPy's (and torch's) exact zero
float tanh_f(float x) { return fabs(x) > 9.0109f ? copysign(1.0f, x) : tanh(x); }
"""
  prelude_int = r"""// integer division and power without undefined behaviour (x86 traps on a division by zero)
int div_i(int a, int b) { return b == 0 ? 0 : (b == -1 ? -a : a / b); }
long div_l(long a, long b) { return b == 0 ? 0 : (b == -1 ? -a : a / b); }
long pow_l(long a, long b) {
  if (b < 0) return a == 1 ? 1 : (a == -1 ? ((b & 1) ? -1 : 1) : 0);
  long r = 1;
  while (b) { if (b & 1) r *= a; a *= a; b >>= 1; }
  return r;
}
"""

  # quantized weights (minift/quant.py) are their blocks' bytes, read a value at a time by kernels/dequant.h
  storage_types = {**CStyleLanguage.storage_types, **{d.name: "uchar" for d in dtypes.quantized()}}

  def read(self, buf, index, dtype):
    if dtype.is_quantized: return f"dq_{dtype.name}({buf}, {index})"
    return f"vload_half({index}, {buf})" if dtype is dtypes.float16 else super().read(buf, index, dtype)

  def write(self, buf, index, value, dtype):
    if dtype is dtypes.float16: return f"vstore_half({value}, {index}, {buf});"
    if dtype is dtypes.bool: return f"{buf}[{index}] = (uchar)({value});"
    return super().write(buf, index, value, dtype)


PRELUDE = OpenCLLanguage.prelude()
# kernels that read a quantized buffer also get kernels/dequant.h: element i of the blocks as a
# float, with gguf's arithmetic (no contraction into FMAs: bit for bit its values)
QPRELUDE = ("#define QGLOBAL __global\n#define QFN\n#define QINDEX long\n#define Q_AS_FLOAT(u) as_float(u)\n"
            "#define QNOCONTRACT _Pragma(\"OPENCL FP_CONTRACT OFF\")\n")


def with_dequant(rendered, in_dtypes):
  """rendered with kernels/dequant.h after the prelude when an input is quantized."""
  if not any(d.is_quantized for d in in_dtypes): return rendered
  return replace(rendered, src=rendered.src.replace(PRELUDE, PRELUDE + QPRELUDE + read_kernel("dequant.h"), 1))
STYPE = OpenCLLanguage.storage_types


@dataclass
class Rendered:
  """A kernel ready to build and launch."""
  name: str
  src: str
  global_size: tuple
  local_size: tuple
  extra_args: tuple = ()      # after (out, data...): "err" (int flag buffer), "key", "counter" (uint)
  notes: dict = field(default_factory=dict)


class Renderer(OpenCLLanguage):
  """Expressions of one kernel at the coordinates `groups` names (see view_index). vector: the
  expressions are float4s of four neighbouring elements along the last axis (see vector_width)."""

  def __init__(self, kernel, in_dtypes, vector=False):
    super().__init__(kernel, in_dtypes)
    self.vector = vector

  def declare(self, name, dtype, code):
    return f"float4 {name} = (float4)({code});" if self.vector else super().declare(name, dtype, code)

  def load(self, node, groups):
    i, view = node.arg
    dtype = self.in_dtypes[i]
    index, cond = view_index(view, groups)
    if cond == "0": return self.literal(0, dtype)
    if self.vector:   # four neighbours along the last axis: one vector load when they are adjacent
      stride = view.strides[-1]
      code = f"vload4(0, data{i} + {index})" if stride == 1 else f"data{i}[{index}]" if stride == 0 else \
             "(float4)(" + ", ".join(f"data{i}[{index} + {u * stride}]" for u in range(4)) + ")"
    else: code = self.read(f"data{i}", index, dtype)
    zero = "(float4)(0.0f)" if self.vector else self.literal(0, dtype)   # both arms of ?: one type
    return f"({cond}?{code}:{zero})" if cond else code


# ---- kernel kinds

def index_type(kernel, in_sizes):
  """int indices unless some buffer or loop is too big for them."""
  return "long" if wide_index(kernel, in_sizes) else "int"


def signature(name, kernel, in_dtypes, extra=(), attrs=""):
  params = [f"__global {STYPE[kernel.dtype.name]}* out"]
  params += [f"__global const {STYPE[d.name]}* data{i}" for i, d in enumerate(in_dtypes)]
  params += list(extra)
  return f"__kernel {attrs}void {name}({', '.join(params)})"


def render(kernel, in_dtypes, in_sizes, caps, max_local=256, config=None):
  """Rendered source and launch sizes for a kernel. max_local: the largest work-group allowed
  (device and, after a first build, per-kernel limit); config: matmul tile choice."""
  idx = index_type(kernel, in_sizes)
  if kernel.kind == "matmul": return with_dequant(render_matmul(kernel, in_dtypes, idx, config or matmul_configs(kernel, caps)[0]), in_dtypes)
  if kernel.kind == "reduce": return render_reduce(kernel, in_dtypes, idx, caps, max_local)
  if kernel.kind == "gather": return with_dequant(render_gather(kernel, in_dtypes, idx, max_local), in_dtypes)
  if kernel.kind == "scatter_add": return render_scatter_add(kernel, in_dtypes, idx, max_local)
  if kernel.kind == "rand": return render_rand(kernel, idx, max_local)
  return with_dequant(render_elementwise(kernel, in_dtypes, idx, max_local), in_dtypes)   # (a DEQUANT kernel among them)


def _launch_1d(n, max_local):
  local = min(max_local, 256, _pow2_floor(max(n, 1)))
  return (_round_up(n, local),), (local,)


VECTOR_OPS = {Op.BUFFER, Op.CONST, Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.NEG, Op.EXP, Op.LOG, Op.SQRT, Op.RECIP, Op.SIN, Op.ERF}


def vector_width(kernel, in_dtypes):
  """4 when an elementwise kernel can run on float4s (float32 arithmetic whose ops all have
  vector forms, a last axis of a multiple of 4 and no pad along it), else 1."""
  if kernel.dtype is not dtypes.float32 or not kernel.shape or kernel.shape[-1] % 4 or prod(kernel.shape) == 0: return 1
  for node in kernel._nodes():
    if node.op not in VECTOR_OPS or node.dtype is not dtypes.float32: return 1
    if node.op is Op.BUFFER and (in_dtypes[node.arg.input] is not dtypes.float32 or
                                 (node.arg.view.mask is not None and node.arg.view.mask[-1] != (0, kernel.shape[-1]))): return 1
  return 4


def render_elementwise(kernel, in_dtypes, idx, max_local):
  n = prod(kernel.shape)
  width = vector_width(kernel, in_dtypes)
  r = Renderer(kernel, in_dtypes, vector=width == 4)
  value = r.value(kernel.ast, [("gid", tuple(range(len(kernel.shape))))])
  name = kernel.name
  if width == 4:   # gid is the first of four neighbours
    body = [f"{idx} gid = ({idx})get_global_id(0) * 4;", f"if (gid >= {n}) return;"] + r.lines + [f"vstore4((float4)({value}), 0, out + gid);"]
  else:
    body = [f"{idx} gid = get_global_id(0);", f"if (gid >= {n}) return;"] + r.lines + [r.write("out", "gid", value, kernel.dtype)]
  src = PRELUDE + signature(name, kernel, in_dtypes) + " {\n  " + "\n  ".join(body) + "\n}\n"
  return Rendered(name, src, *_launch_1d(n // width, max_local), notes={"vector": width})


REDUCE_INIT = {Op.SUM: {"float": "0.0f", "int": "0", "long": "0L"},
               Op.RMAX: {"float": "(-INFINITY)", "int": "(-2147483647-1)", "long": "(-9223372036854775807L-1L)"}}


def _combine(op, acc_t, a, b):
  if op is Op.SUM: return f"{a} + {b}" if acc_t != "bool" else f"{a} || {b}"
  if acc_t == "float": return f"max_f({a}, {b})"
  return f"max({a}, {b})"


def grouped_reduce(out_numel, red_numel, caps):
  """Reduce each output with a work-group in local memory when the reduction is long; a CPU
  device has few cores, so it prefers one work-item per output unless there are few outputs."""
  if red_numel < 256: return False
  if caps is not None and caps.is_cpu: return out_numel < 4 * caps.compute_units
  return True


def render_reduce(kernel, in_dtypes, idx, caps, max_local):
  red = kernel.reduce
  axes, in_shape, _ = red.arg
  out_numel, red_numel = prod(kernel.shape), prod(in_shape[a] for a in axes)
  kept = tuple(a for a in range(len(in_shape)) if a not in axes)
  acc_t = "int" if red.dtype is dtypes.bool else OpenCLLanguage.arith_types[red.dtype.name]
  init = "0" if acc_t == "int" and red.dtype is dtypes.bool else REDUCE_INIT[red.op][acc_t]
  grouped = grouped_reduce(out_numel, red_numel, caps)
  local = min(_pow2_floor(max_local), 256) if grouped else None

  r = Renderer(kernel, in_dtypes)
  x = r.value(red.srcs[0], [("gid", kept), ("r", axes)])
  loop_lines, r.lines, r.names = r.lines, [], {}   # variables made in the loop stay in the loop
  red_value = {"float": "acc", "int": "acc", "long": "acc"}[acc_t]
  if red.dtype is dtypes.float16: red_value = "round_half(acc)"
  if red.dtype is dtypes.bool: red_value = "(acc!=0)"
  r.lines.append(r.declare("red", red.dtype, red_value))
  r.names[id(red)] = "red"
  value = r.value(kernel.ast, [("gid", tuple(range(len(kernel.shape))))])
  epilogue = r.lines + [r.write("out", "gid", value, kernel.dtype)]
  update = f"acc = {_combine(red.op, acc_t, 'acc', x)};"
  loop = "\n    ".join(loop_lines + [update])

  name = kernel.name
  if not grouped:
    body = (f"{idx} gid = get_global_id(0);\n  if (gid >= {out_numel}) return;\n  {acc_t} acc = {init};\n"
            f"  for ({idx} r = 0; r < {red_numel}; r++) {{\n    {loop}\n  }}\n  " + "\n  ".join(epilogue))
    src = PRELUDE + signature(name, kernel, in_dtypes) + " {\n  " + body + "\n}\n"
    return Rendered(name, src, *_launch_1d(out_numel, max_local), notes={"grouped": False})
  combine_local = _combine(red.op, acc_t, "partial[lid]", "partial[lid + s]")
  body = (f"{idx} gid = get_group_id(0);\n  int lid = get_local_id(0);\n  __local {acc_t} partial[{local}];\n"
          f"  {acc_t} acc = {init};\n"
          f"  for ({idx} r = lid; r < {red_numel}; r += {local}) {{\n    {loop}\n  }}\n"
          f"  partial[lid] = acc;\n  barrier(CLK_LOCAL_MEM_FENCE);\n"
          f"  for (int s = {local // 2}; s > 0; s >>= 1) {{\n"
          f"    if (lid < s) partial[lid] = {combine_local};\n    barrier(CLK_LOCAL_MEM_FENCE);\n  }}\n"
          f"  if (lid != 0) return;\n  acc = partial[0];\n  " + "\n  ".join(epilogue))
  attrs = f"__attribute__((reqd_work_group_size({local}, 1, 1))) "
  src = PRELUDE + signature(name, kernel, in_dtypes, attrs=attrs) + " {\n  " + body + "\n}\n"
  return Rendered(name, src, (out_numel * local,), (local,), notes={"grouped": True})


def render_gather(kernel, in_dtypes, idx, max_local):
  """out[n, c] = table[index[n], c]; an index out of range sets the error flag."""
  table, index = kernel.ast.srcs
  rows, cols = table.arg.view.shape
  n = prod(kernel.shape)
  r = Renderer(kernel, in_dtypes)
  ix = r.load(index, [("row", tuple(range(len(index.arg.view.shape))))])
  value = r.load(table, [("ix", (0,)), ("col", (1,))])
  body = [f"{idx} gid = get_global_id(0);", f"if (gid >= {n}) return;",
          f"{idx} row = gid / {cols}, col = gid % {cols};", f"long ix_in = (long){ix};",
          f"if (ix_in < 0 || ix_in >= {rows}) {{ err[0] = 1; {r.write('out', 'gid', r.literal(0, kernel.dtype), kernel.dtype)} return; }}",
          f"{idx} ix = ({idx})ix_in;", r.write("out", "gid", value, kernel.dtype)]
  src = PRELUDE + signature(kernel.name, kernel, in_dtypes, ["__global int* err"]) + " {\n  " + "\n  ".join(body) + "\n}\n"
  return Rendered(kernel.name, src, *_launch_1d(n, max_local), extra_args=("err",))


def render_scatter_add(kernel, in_dtypes, idx, max_local):
  """out[index[n], c] += g[n, c] into a zeroed out, or into a copy of a third operand (a whole
  buffer: the runtime copies it into out first). One work-item per column walks n in order:
  deterministic and the same order of additions as NumPy's add.at, with no atomics."""
  grad, index = kernel.ast.srcs[:2]
  fill = scatter_add_fill(kernel, "OpenCL")
  rows, cols = kernel.shape
  nidx = prod(index.arg.view.shape)
  gnd = len(grad.arg.view.shape)
  r = Renderer(kernel, in_dtypes)
  ix = r.load(index, [("n", tuple(range(len(index.arg.view.shape))))])
  g = r.load(grad, [("n", tuple(range(gnd - 1))), ("col", (gnd - 1,))])
  dt = kernel.dtype
  body = [f"{idx} col = get_global_id(0);", f"if (col >= {cols}) return;",
          f"for ({idx} n = 0; n < {nidx}; n++) {{",
          f"  long ix = (long){ix};",
          f"  if (ix < 0 || ix >= {rows}) {{ err[0] = 1; continue; }}",
          f"  {idx} o = ({idx})ix * {cols} + col;",
          "  " + r.write("out", "o", r.round_half(f"{r.read('out', 'o', dt)} + {g}") if dt is dtypes.float16 else f"{r.read('out', 'o', dt)} + {g}", dt),
          "}"]
  src = PRELUDE + signature(kernel.name, kernel, in_dtypes, ["__global int* err"]) + " {\n  " + "\n  ".join(body) + "\n}\n"
  return Rendered(kernel.name, src, *_launch_1d(cols, max_local), extra_args=("err",), notes=fill)


def render_rand(kernel, idx, max_local):
  """backends/numpy/device.rand_uniform, bit for bit: murmur3's finalizer over the counter."""
  n = prod(kernel.shape)
  body = [f"{idx} gid = get_global_id(0);", f"if (gid >= {n}) return;",
          "uint x = (uint)gid + counter;", "x = (x * 0x9E3779B9u) ^ key;",
          "x ^= x >> 16; x *= 0x85EBCA6Bu;", "x ^= x >> 13; x *= 0xC2B2AE35u;", "x ^= x >> 16;",
          "out[gid] = (float)(x >> 8) * (1.0f / 16777216.0f);"]
  src = PRELUDE + f"__kernel void {kernel.name}(__global float* out, uint key, uint counter) {{\n  " + "\n  ".join(body) + "\n}\n"
  return Rendered(kernel.name, src, *_launch_1d(n, max_local), extra_args=("key", "counter"))


# ---- matmul: kernels/matmul.cl with the operand access and the epilogue as macros

def matmul_configs(kernel, caps):
  """Tiles to try, best first (codegen/tiles.py), that fit the device's work-group limits and
  local memory (all of them for a 256-item limit when caps is None)."""
  _, (_, m, n, _) = matmul_shape(kernel)
  if caps is None: return matmul_tiles(m, n, 256)
  return matmul_tiles(m, n, caps.max_work_group_size, caps.max_work_item_sizes[:2], caps.local_mem_size)


def matmul_macros(kernel, in_dtypes, idx):
  """Defines shared by the buffer and image matmul kernels: sizes, the store with the fused
  epilogue, and the kernel arguments."""
  (batch, m, n, k), (nb, mm, nn, kk) = matmul_shape(kernel)
  oidx = matmul_out_index(kernel, batch, m, n)
  r = Renderer(kernel, in_dtypes)
  r.names[id(kernel.reduce)] = "red"
  red = "round_half(acc)" if kernel.reduce.dtype is dtypes.float16 else "acc"
  value = r.value(kernel.ast, [("gid", tuple(range(len(kernel.shape))))])
  data_params = "".join(f", __global const {STYPE[d.name]}* data{i}" for i, d in enumerate(in_dtypes))
  data_names = "".join(f", data{i}" for i in range(len(in_dtypes)))
  epilogue = (f"void mm_store(float acc, {idx} gid, __global {STYPE[kernel.dtype.name]}* out{data_params}) {{\n"
              f"  float red = {red};\n  " + "\n  ".join(r.lines + [r.write("out", "gid", value, kernel.dtype)]) + "\n}\n")
  defines = {"MM_M": mm, "MM_N": nn, "MM_K": kk, "MM_BATCH": nb, "IDX": idx,
             "OUT_T": STYPE[kernel.dtype.name], "MM_ARGS": data_params,
             "MM_STORE(acc, b, i, j)": f"mm_store(acc, {oidx}, out{data_names})"}
  return defines, epilogue


def render_matmul(kernel, in_dtypes, idx, config, image=False):
  """kernels/matmul.cl specialised by defines: operand loads through their views (A_AT, B_AT),
  the epilogue fused into the store (MM_STORE). image: kernels/matmul_image.cl instead, with B
  read from an image2d weight (see image_weight) passed as the last argument."""
  (batch, m, n, k), (nb, mm, nn, kk) = matmul_shape(kernel)
  la, lb = kernel.reduce.srcs[0].srcs
  defines, epilogue = matmul_macros(kernel, in_dtypes, idx)
  r = Renderer(kernel, in_dtypes)
  defines["A_AT(b, i, k)"] = r.load(la, [("(b)", batch), ("(i)", m), ("(k)", k)])
  defines["A_K_FAST"] = int(_fastest(la.arg.view, k) or not _fastest(la.arg.view, m))
  if not image:
    defines["B_AT(b, k, j)"] = r.load(lb, [("(b)", batch), ("(k)", k), ("(j)", n)])
    defines["B_N_FAST"] = int(_fastest(lb.arg.view, n) or not _fastest(lb.arg.view, k))
  name = kernel.name + ("_image" if image else "")
  defines.update({"MM_NAME": name, "BM": config.bm, "BN": config.bn, "BK": config.bk, "TM": config.tm, "TN": config.tn})
  src = PRELUDE + "".join(f"#define {k_} {v}\n" for k_, v in defines.items()) + epilogue
  src += read_kernel("matmul_image.cl" if image else "matmul.cl")
  tx, ty = config.bn // config.tn, config.bm // config.tm
  gsize = (_round_up(nn, config.bn) // config.bn * tx, _round_up(mm, config.bm) // config.bm * ty, nb)
  return Rendered(name, src, gsize, (tx, ty, 1), extra_args=("image",) if image else (), notes={"config": config})


def image_weight(kernel, in_sizes, caps):
  """(input index, N, K) when the matmul's B operand is a whole (N, K) row-major weight read as
  W.T (x @ W.T, torch's linear layout), so that it can be read from an image2d of N rows of
  K/4 RGBA pixels; None otherwise."""
  (batch, m, n, k), (nb, mm, nn, kk) = matmul_shape(kernel)
  lb = kernel.reduce.srcs[0].srcs[1]
  i, view = lb.arg
  if nb != 1 or view.mask is not None or view.offset != 0 or kk % 4 or in_sizes[i] != nn * kk: return None
  if caps is None or not caps.image_support or kk // 4 > caps.image2d_max[0] or nn > caps.image2d_max[1]: return None
  kv = [a for a in k if view.shape[a] != 1]
  nv = [a for a in n if view.shape[a] != 1]
  merged_k = view_index(view, [("k", k)])[0] in ("k", "0")
  merged_n = view_index(view, [("j", n)])[0] in (f"j*{kk}", "0")
  return (i, nn, kk) if kv and nv and merged_k and merged_n else None
