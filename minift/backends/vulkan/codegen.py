"""Render scheduled kernels (schedule.Kernel) to GLSL 450 compute shaders: the GLSL dialect of the
C-style languages (codegen/cstyle.py) and the kernel kinds' structure, which mirrors the OpenCL
backend's (backends/opencl/codegen.py): one invocation per output; a workgroup per output for long
reductions on a GPU; kernels/matmul.comp, the tiled register-blocked matmul, with the epilogue
fused; gather and scatter-add (deterministic, no atomics but the error flag's) and random numbers
bit-identical to the NumPy backend's.

Bindings (set 0): the output (dst: `out` is a GLSL keyword), then the inputs in the schedule's order, then, for gather and
scatter-add, the error flag (an int an out-of-range index sets to its check number, push constant
`check`). A tensor larger than one binding window (vk.py: maxStorageBufferRange, 128 MiB on many
phones) takes one binding per piece and is read and written through ld_NAME/st_NAME, which pick
the piece by the element index; everything else indexes its array directly. Workgroups beyond
maxComputeWorkGroupCount in x go on in y (a 2D grid), so any tensor size launches.

Storage: float16 as float16_t (16-bit storage), bool as uint8_t (8-bit storage), int64 as int64_t
(shaderInt64). A device without one of those stores the dtype 32 bits wide instead (Storage; the
backend converts on upload and download), int64 then computed as int. Arithmetic follows the
OpenCL backend: float16 computed in float and rounded to half after every op (round_half, in
integer arithmetic: exactly NumPy's rounding on any driver), integer division without undefined
behaviour, NumPy's NaN-propagating maximum. tanh, erf, sin and pow are the prelude's own (GLSL has
no erf; the spec lets a driver's sin be 2^-11 off and its pow undefined for negative bases).
"""
from dataclasses import dataclass, field
from minift.codegen.cstyle import CStyleLanguage
from minift.codegen.tiles import matmul_tiles
from minift.codegen.gpu import (view_index, wide_index, round_up, pow2_floor,
                                matmul_shape, fastest, matmul_out_index, scatter_add_fill)
from minift.dtype import dtypes
from minift.helpers import prod, read_kernel
from minift.lazy import Op
import numpy as np


@dataclass(frozen=True)
class Storage:
  """How a device stores the dtypes in buffers: at their own width where it has the feature
  (bool8: 8-bit storage, half16: 16-bit storage, int64: shaderInt64), else 32 bits wide; and
  whether shaders declare SignedZeroInfNanPreserve (nan_preserve: without it a compiler may fold
  x*0 to 0 where x is NaN, as lavapipe does for the mean of an empty tensor)."""
  bool8: bool = True
  half16: bool = True
  int64: bool = True
  nan_preserve: bool = False

  @staticmethod
  def of(caps):
    return Storage(bool8=caps.storage8, half16=caps.storage16, int64=caps.int64, nan_preserve=caps.nan_preserve)

  def np_dtype(self, dtype):
    """The NumPy dtype of the bytes a buffer of `dtype` holds on the device."""
    if dtype is dtypes.bool: return np.dtype(np.uint8 if self.bool8 else np.uint32)
    if dtype is dtypes.float16: return np.dtype(np.float16 if self.half16 else np.float32)
    if dtype is dtypes.int64: return np.dtype(np.int64 if self.int64 else np.int32)
    return np.dtype(dtype.np)

  def head(self):
    """#version, the extensions used, and the type names the dialect writes (i64, HALF_T, BOOL_T)."""
    lines = ["#version 450", "// minift generated kernel"]
    if self.half16: lines.append("#extension GL_EXT_shader_16bit_storage : require")
    if self.bool8: lines.append("#extension GL_EXT_shader_8bit_storage : require")
    if self.int64: lines.append("#extension GL_ARB_gpu_shader_int64 : require")
    if self.nan_preserve:   # SPV_KHR_float_controls: capability SignedZeroInfNanPreserve (4466), execution mode of that name (4461) for 32-bit floats
      lines += ["#extension GL_EXT_spirv_intrinsics : require", 'spirv_execution_mode(extensions = ["SPV_KHR_float_controls"], capabilities = [4466], 4461, 32);']
    lines += [f"#define i64 {'int64_t' if self.int64 else 'int'}", f"#define HALF_T {'float16_t' if self.half16 else 'float'}",
              f"#define BOOL_T {'uint8_t' if self.bool8 else 'uint'}"]
    if self.int64:   # int to int64 as a bit pattern: lavapipe (LLVM 15) miscompiles compares of a plain int64_t(int) (came out true for 0 >= 5)
      lines.append("int64_t widen_i(int x) { return packInt2x32(ivec2(x, x >> 31)); }")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Target:
  """What rendering needs to know of the device (from vk.Caps and the memory window)."""
  storage: Storage = Storage()
  window: int = 1 << 27            # bytes per binding piece
  max_invocations: int = 256       # per workgroup
  max_size: tuple = (256, 256, 64)
  max_groups: tuple = (65535, 65535, 65535)
  shared_bytes: int = 16384
  subgroup: int = 32
  is_cpu: bool = False

  @property
  def local(self):
    """Invocations of a 1-D workgroup: 256 or what the device allows, a multiple of its subgroup."""
    n = pow2_floor(min(256, self.max_invocations, self.max_size[0]))
    return max(n, min(self.subgroup, n))


class GLSLLanguage(CStyleLanguage):
  """The GLSL 450 dialect. Types: i64, HALF_T and BOOL_T are defines of the head (Storage.head),
  so one source serves every storage choice but for the head. Buffers are arrays bound by
  binding (no pointers); `pieces` maps a buffer name to its number of pieces where that is more
  than one, and those are read and written through ld_NAME/st_NAME."""
  arith_types = {"bool": "bool", "int32": "int", "int64": "i64", "float16": "float", "float32": "float"}
  storage_types = {"bool": "BOOL_T", "int32": "int", "int64": "i64", "float16": "HALF_T", "float32": "float"}
  math_fns = {Op.EXP: "exp", Op.LOG: "log", Op.SQRT: "sqrt", Op.TANH: "tanh_f", Op.SIN: "sin_f", Op.SIGMOID: "sigmoid_f", Op.ERF: "erf_f"}
  pow_fn = "pow_f"
  inf, nan = "uintBitsToFloat(0x7f800000u)", "uintBitsToFloat(0x7fc00000u)"
  int64_suffix = "L"
  prelude_math = r"""// float16 is stored as half but computed in float: round to half after each op, to nearest even as
// NumPy does, in integer arithmetic (a driver's float-to-half conversion may round otherwise)
float round_half(float x) {
  uint u = floatBitsToUint(x), a = u & 0x7fffffffu, sign = u & 0x80000000u;
  if (a >= 0x7f800000u) return x;                                          // inf, nan
  if (a >= 0x477ff000u) return uintBitsToFloat(sign | 0x7f800000u);        // 65520 and up: inf
  if (a < 0x38800000u) {                                                   // half subnormals: multiples of 2^-24
    float q = roundEven(uintBitsToFloat(a) * 16777216.0f) * (1.0f / 16777216.0f);
    return uintBitsToFloat(floatBitsToUint(q) | sign);
  }
  a = (a + 0xfffu + ((a >> 13) & 1u)) & 0xffffe000u;                      // keep 10 mantissa bits, ties to even
  return uintBitsToFloat(a | sign);
}
float copysign_f(float m, float s) { return uintBitsToFloat((floatBitsToUint(m) & 0x7fffffffu) | (floatBitsToUint(s) & 0x80000000u)); }
// tanh: the odd Taylor series below |x| = 0.4 (no cancellation near 0, where exp-based forms lose
// digits), (1 - e^-2|x|) / (1 + e^-2|x|) above, exactly +-1 beyond 9.0109 (as float tanh rounds)
float tanh_f(float x) {
  float a = abs(x), x2 = x * x;
  float t;
  if (a < 0.4f) t = a * (1.0f + x2 * (-0.333333343f + x2 * (0.133333340f + x2 * (-0.0539682545f + x2 * (0.0218694881f + x2 * (-8.86323582e-3f + x2 * (3.59212654e-3f + x2 * -1.45583438e-3f)))))));
  else { float e = exp(-2.0f * a); t = (1.0f - e) / (1.0f + e); }
  if (a > 9.0109f) t = 1.0f;
  return copysign_f(t, x);
}
// sin: x reduced by multiples of pi/2 (pi/2 in three parts, so the reduction is exact for |x| up to
// about 1e5), then the Taylor series of sin or cos on [-pi/4, pi/4]
float sin_f(float x) {
  if (isinf(x) || isnan(x)) return x - x;
  float k = roundEven(x * 0.636619772f);
  float r = ((x - k * 1.5703125f) - k * 4.83751297e-4f) - k * 7.54978995e-8f;
  float r2 = r * r;
  float s = r * (1.0f + r2 * (-1.66666672e-1f + r2 * (8.33333377e-3f + r2 * (-1.98412701e-4f + r2 * (2.75573188e-6f + r2 * -2.50521084e-8f)))));
  float c = 1.0f + r2 * (-0.5f + r2 * (4.16666679e-2f + r2 * (-1.38888892e-3f + r2 * (2.48015876e-5f + r2 * (-2.75573188e-7f + r2 * 2.08767570e-9f)))));
  int q = int(k - 4.0f * floor(k * 0.25f));   // k mod 4
  float v = (q & 1) == 0 ? s : c;
  return (q & 2) == 0 ? v : -v;
}
// erf (GLSL has none): its Taylor series below |x| = 1 (terms to x^23), Abramowitz and Stegun's
// 7.1.26 (absolute error under 1.5e-7) from there, exactly +-1 from |x| = 4
float erf_f(float x) {
  float a = abs(x), r;
  if (isnan(x)) return x;
  if (a < 1.0f) {
    float x2 = x * x, term = a, sum = a;
    for (int n = 1; n < 12; n++) { term *= -x2 / float(n); sum += term / float(2 * n + 1); }
    r = 1.12837917f * sum;
  } else if (a < 4.0f) {
    float t = 1.0f / (1.0f + 0.3275911f * a);
    float p = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
    r = 1.0f - p * exp(-a * a);
  } else r = 1.0f;
  return copysign_f(r, x);
}
// pow as C and NumPy define it: GLSL's is undefined for a negative base or a zero base with b <= 0
float pow_f(float a, float b) {
  if (b == 0.0f || a == 1.0f) return 1.0f;
  if (isnan(a) || isnan(b)) return a + b;
  float m = abs(a);
  float r = m == 0.0f ? (b > 0.0f ? 0.0f : uintBitsToFloat(0x7f800000u)) : (isinf(m) ? (b > 0.0f ? m : 0.0f) : pow(m, b));
  if (a < 0.0f) {
    if (isinf(b)) return m == 1.0f ? 1.0f : r;
    if (floor(b) != b) return uintBitsToFloat(0x7fc00000u);
    if (abs(b) < 16777216.0f && (int(abs(b)) & 1) == 1) r = -r;   // an odd exponent keeps the sign
  }
  return r;
}
"""
  prelude_int = r"""// integer division and power without undefined behaviour
int div_i(int a, int b) { return b == 0 ? 0 : (b == -1 ? -a : a / b); }
i64 div_l(i64 a, i64 b) { return b == i64(0) ? i64(0) : (b == i64(-1) ? -a : a / b); }
i64 pow_l(i64 a, i64 b) {
  if (b < i64(0)) return a == i64(1) ? i64(1) : (a == i64(-1) ? ((b & i64(1)) != i64(0) ? i64(-1) : i64(1)) : i64(0));
  i64 r = i64(1);
  while (b != i64(0)) { if ((b & i64(1)) != i64(0)) r *= a; a *= a; b >>= 1; }
  return r;
}
"""

  def __init__(self, kernel, in_dtypes, storage, pieces=None):
    super().__init__(kernel, in_dtypes)
    self.storage, self.pieces = storage, pieces or {}
    if not storage.int64: self.int64_suffix = ""

  def literal(self, value, dtype):
    if dtype is dtypes.bool: return "true" if value else "false"
    if dtype is dtypes.int64 and not self.storage.int64: return super().literal(int(np.int64(value).astype(np.int32)), dtypes.int32)
    return super().literal(value, dtype)

  def cast(self, x, src, to):
    if to is dtypes.bool: return x if src is dtypes.bool else f"({x}!={self.literal(0, src)})"
    t = self.arith_types[to.name]
    if t == "i64" and src is dtypes.int32 and self.storage.int64: return f"widen_i({x})"
    return f"{t}({x})" if t != self.arith_types[src.name] else x

  def read(self, buf, index, dtype):
    raw = f"ld_{buf}({index})" if self.pieces.get(buf, 1) > 1 else f"{buf}[{index}]"
    if dtype is dtypes.bool: return f"(uint({raw})!=0u)"
    if dtype is dtypes.float16: return f"float({raw})"
    return raw

  def write(self, buf, index, value, dtype):
    if dtype is dtypes.bool: value = f"BOOL_T(uint({value}))"
    elif dtype is dtypes.float16: value = f"HALF_T({value})"
    return f"st_{buf}({index}, {value});" if self.pieces.get(buf, 1) > 1 else f"{buf}[{index}] = {value};"

  def alu(self, node, srcs):
    if node.op is Op.CMPLT and node.srcs[0].dtype is dtypes.bool: return f"(int({srcs[0]})<int({srcs[1]}))"   # no < on bool
    return super().alu(node, srcs)

  def int_alu(self, op, dtype, a, b):
    if op is Op.RECIP: return f"div_l(i64(1), {a})" if dtype is dtypes.int64 else f"div_i(1, {a})"
    if op is Op.POW: return f"pow_l({a}, {b})" if dtype is dtypes.int64 else f"int(pow_l(i64({a}), i64({b})))"
    return super().int_alu(op, dtype, a, b)


PRELUDE = GLSLLanguage.prelude()


class Renderer(GLSLLanguage):
  """Expressions of one kernel at the coordinates `groups` names (codegen/gpu.py view_index)."""

  def load(self, node, groups):
    i, view = node.arg
    dtype = self.in_dtypes[i]
    index, cond = view_index(view, groups)
    if cond == "0": return self.literal(0, dtype)
    code = self.read(f"data{i}", index, dtype)
    return f"({cond}?{code}:{self.literal(0, dtype)})" if cond else code


@dataclass
class Rendered:
  """A kernel ready to compile and dispatch: its source, the workgroups to dispatch (x, y, z) and
  the push constants it takes, in order (each a uint: "key", "counter", "check")."""
  name: str
  src: str
  groups: tuple
  push: tuple = ()
  notes: dict = field(default_factory=dict)


class Source:
  """Assembles a shader: head, bindings (dst, data0..., then extra), push constants, prelude,
  the piece accessors, functions and main."""

  def __init__(self, kernel, in_dtypes, pieces, target, idx):
    self.kernel, self.in_dtypes, self.pieces, self.target, self.idx = kernel, in_dtypes, pieces, target, idx
    self.names = {"dst": pieces[0], **{f"data{i}": k for i, k in enumerate(pieces[1:])}}

  def renderer(self):
    return Renderer(self.kernel, self.in_dtypes, self.target.storage, {n: k for n, k in self.names.items() if k > 1})

  def _buffer(self, binding, name, dtype, k, access):
    t = GLSLLanguage.storage_types[dtype.name]
    if k == 1: return [f"layout(std430, binding = {binding}) {access}buffer B{binding} {{ {t} {name}[]; }};"], []
    decls = [f"layout(std430, binding = {binding + p}) {access}buffer B{binding + p} {{ {t} {name}_{p}[]; }};" for p in range(k)]
    per_piece = self.target.window // self.target.storage.np_dtype(dtype).itemsize
    shift, idx = per_piece.bit_length() - 1, self.idx
    where = f"  {idx} p = i >> {shift}, q = i & {per_piece - 1};\n"
    fns = [f"{t} ld_{name}({idx} i) {{\n{where}" + "".join(f"  if (p == {p}) return {name}_{p}[q];\n" for p in range(k - 1))
           + f"  return {name}_{k - 1}[q];\n}}"]
    if not access:
      fns.append(f"void st_{name}({idx} i, {t} v) {{\n{where}" + "".join(f"  if (p == {p}) {{ {name}_{p}[q] = v; return; }}\n" for p in range(k - 1))
                 + f"  {name}_{k - 1}[q] = v;\n}}")
    return decls, fns

  def build(self, local, body, err=False, push=(), shared=(), functions=(), tail=""):
    """The whole shader. local: workgroup size (x[, y]); body: lines of main (or "" with `tail`, a
    hand kernel that brings its own main)."""
    lx, ly = (local, 1) if isinstance(local, int) else local
    decls, fns, binding = [], [], 0
    for n, (name, k) in enumerate(self.names.items()):
      dtype = self.kernel.dtype if n == 0 else self.in_dtypes[n - 1]
      d, f = self._buffer(binding, name, dtype, k, "" if n == 0 else "readonly ")
      decls += d
      fns += f
      binding += k
    if err: decls.append(f"layout(std430, binding = {binding}) buffer B{binding} {{ int err[]; }};")
    if push: decls.append("layout(push_constant) uniform Push { " + " ".join(f"uint {p};" for p in push) + " } pc;")
    src = self.target.storage.head() + f"layout(local_size_x = {lx}, local_size_y = {ly}, local_size_z = 1) in;\n"
    src += "\n".join(decls + list(shared)) + "\n" + PRELUDE + "\n".join(fns + list(functions)) + "\n"
    if tail: return src + tail
    return src + "void main() {\n  " + "\n  ".join(body) + "\n}\n"


def _grid(n, max_groups):
  """Workgroups (x, y, 1) covering n, in y too when x would pass the device's limit."""
  n = max(n, 1)
  if n <= max_groups[0]: return (n, 1, 1)
  y = -(-n // max_groups[0])
  if y > max_groups[1]: raise ValueError(f"Vulkan: {n} workgroups exceed the device's grid {max_groups[:2]}")
  return (max_groups[0], y, 1)


def _linear_id(idx, local):
  """The flat invocation index over a _grid (local invocations per group)."""
  return f"{idx}(gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x) * {local} + {idx}(gl_LocalInvocationID.x)"


def render(kernel, in_dtypes, in_sizes, pieces, target, config=None):
  """Rendered source and dispatch size for a kernel. pieces: the binding pieces of the output
  and of each input; config: the matmul tile."""
  idx = "i64" if wide_index(kernel, in_sizes) else "int"
  if idx == "i64" and not target.storage.int64:
    raise NotImplementedError(f"Vulkan: kernel {kernel.name} needs 64-bit indices, which this device (no shaderInt64) lacks")
  src = Source(kernel, in_dtypes, pieces, target, idx)
  if kernel.kind == "matmul": return render_matmul(kernel, src, config or matmul_configs(kernel, target)[0])
  if kernel.kind == "reduce": return render_reduce(kernel, src)
  if kernel.kind == "gather": return render_gather(kernel, src)
  if kernel.kind == "scatter_add": return render_scatter_add(kernel, src)
  if kernel.kind == "rand": return render_rand(kernel, src)
  return render_elementwise(kernel, src)


def render_elementwise(kernel, src):
  n, local = prod(kernel.shape), src.target.local
  r = src.renderer()
  value = r.value(kernel.ast, [("gid", tuple(range(len(kernel.shape))))])
  body = [f"{src.idx} gid = {_linear_id(src.idx, local)};", f"if (gid >= {n}) return;"] + r.lines + [r.write("dst", "gid", value, kernel.dtype)]
  return Rendered(kernel.name, src.build(local, body), _grid(-(-n // local), src.target.max_groups))


def _reduce_init(op, acc_t, storage):
  if op is Op.SUM: return {"float": "0.0f", "int": "0", "i64": "i64(0)"}[acc_t]
  if acc_t == "float": return "(-uintBitsToFloat(0x7f800000u))"
  if acc_t == "i64" and storage.int64: return "(-9223372036854775807L-1L)"
  return "(-2147483647-1)"


def _combine(op, acc_t, a, b):
  if op is Op.SUM: return f"{a} + {b}"
  return f"max_f({a}, {b})" if acc_t == "float" else f"max({a}, {b})"


def grouped_reduce(out_numel, red_numel, target):
  """Reduce each output with a workgroup in shared memory when the reduction is long; a CPU device
  (lavapipe) has few cores, so it prefers one invocation per output unless there are few outputs."""
  if red_numel < 256: return False
  return out_numel < 16 if target.is_cpu else True


def render_reduce(kernel, src):
  red = kernel.reduce
  axes, in_shape, _ = red.arg
  out_numel, red_numel = prod(kernel.shape), prod(in_shape[a] for a in axes)
  kept = tuple(a for a in range(len(in_shape)) if a not in axes)
  acc_t = "int" if red.dtype is dtypes.bool else GLSLLanguage.arith_types[red.dtype.name]
  init, idx, target = _reduce_init(red.op, acc_t, src.target.storage), src.idx, src.target
  grouped = grouped_reduce(out_numel, red_numel, target)
  local = target.local

  r = src.renderer()
  x = r.value(red.srcs[0], [("gid", kept), ("r", axes)])
  if red.dtype is dtypes.bool: x = f"int({x})"
  loop_lines, r.lines, r.names = r.lines, [], {}   # variables made in the loop stay in the loop
  red_value = "round_half(acc)" if red.dtype is dtypes.float16 else "(acc!=0)" if red.dtype is dtypes.bool else "acc"
  r.lines.append(r.declare("red", red.dtype, red_value))
  r.names[id(red)] = "red"
  value = r.value(kernel.ast, [("gid", tuple(range(len(kernel.shape))))])
  epilogue = r.lines + [r.write("dst", "gid", value, kernel.dtype)]
  loop = loop_lines + [f"acc = {_combine(red.op, acc_t, 'acc', x)};"]
  if not grouped:
    body = ([f"{idx} gid = {_linear_id(idx, local)};", f"if (gid >= {out_numel}) return;", f"{acc_t} acc = {init};",
             f"for ({idx} r = 0; r < {red_numel}; r++) {{"] + ["  " + l for l in loop] + ["}"] + epilogue)
    return Rendered(kernel.name, src.build(local, body), _grid(-(-out_numel // local), target.max_groups), notes={"grouped": False})
  combine = _combine(red.op, acc_t, "partial[lid]", "partial[lid + s]")
  body = ([f"{idx} gid = {idx}(gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x);",
           f"if (gid >= {out_numel}) return;   // a whole workgroup returns: no barrier is left waiting",
           "int lid = int(gl_LocalInvocationID.x);", f"{acc_t} acc = {init};",
           f"for ({idx} r = lid; r < {red_numel}; r += {local}) {{"] + ["  " + l for l in loop] + ["}",
           "partial[lid] = acc;", "barrier();",
           f"for (int s = {local // 2}; s > 0; s >>= 1) {{", f"  if (lid < s) partial[lid] = {combine};", "  barrier();", "}",
           "if (lid != 0) return;", "acc = partial[0];"] + epilogue)
  shared = [f"shared {acc_t} partial[{local}];"]
  return Rendered(kernel.name, src.build(local, body, shared=shared), _grid(out_numel, target.max_groups), notes={"grouped": True})


def _index_type(index, src):
  """The GLSL type an index is checked in: its own (no 64-bit arithmetic for int32 indices, which
  phone GPUs emulate)."""
  return GLSLLanguage.arith_types[src.in_dtypes[index.arg.input].name]


def render_gather(kernel, src):
  """out[n, c] = table[index[n], c]; an index out of range sets the error flag."""
  table, index = kernel.ast.srcs
  rows, cols = table.arg.view.shape
  n, idx, local = prod(kernel.shape), src.idx, src.target.local
  r = src.renderer()
  ix = r.load(index, [("row", tuple(range(len(index.arg.view.shape))))])
  it = _index_type(index, src)
  value = r.load(table, [("ix", (0,)), ("col", (1,))])
  body = [f"{idx} gid = {_linear_id(idx, local)};", f"if (gid >= {n}) return;",
          f"{idx} row = gid / {cols}, col = gid % {cols};", f"{it} ix_in = {ix};",
          f"if (ix_in < {it}(0) || ix_in >= {it}({rows})) {{ atomicMax(err[0], int(pc.check)); "
          f"{r.write('dst', 'gid', r.literal(0, kernel.dtype), kernel.dtype)} return; }}",
          f"{idx} ix = {idx}(ix_in);", r.write("dst", "gid", value, kernel.dtype)]
  return Rendered(kernel.name, src.build(local, body, err=True, push=("check",)), _grid(-(-n // local), src.target.max_groups), push=("check",))


def render_scatter_add(kernel, src):
  """out[index[n], c] += g[n, c] into a zeroed out, or into a copy of a third operand (a whole
  buffer: the backend copies it into out first). One invocation per column walks n in order:
  deterministic, the same order of additions as NumPy's add.at."""
  grad, index = kernel.ast.srcs[:2]
  fill = scatter_add_fill(kernel, "Vulkan")
  rows, cols = kernel.shape
  nidx, gnd, idx, local = prod(index.arg.view.shape), len(grad.arg.view.shape), src.idx, src.target.local
  r = src.renderer()
  ix = r.load(index, [("n", tuple(range(len(index.arg.view.shape))))])
  it = _index_type(index, src)
  g = r.load(grad, [("n", tuple(range(gnd - 1))), ("col", (gnd - 1,))])
  dt = kernel.dtype
  total = f"{r.read('dst', 'o', dt)} + {g}"
  body = [f"{idx} col = {_linear_id(idx, local)};", f"if (col >= {cols}) return;",
          f"for ({idx} n = 0; n < {nidx}; n++) {{",
          f"  {it} ix = {ix};",
          f"  if (ix < {it}(0) || ix >= {it}({rows})) {{ atomicMax(err[0], int(pc.check)); continue; }}",
          f"  {idx} o = {idx}(ix) * {cols} + col;",
          "  " + r.write("dst", "o", r.round_half(total) if dt is dtypes.float16 else total, dt),
          "}"]
  return Rendered(kernel.name, src.build(local, body, err=True, push=("check",)), _grid(-(-cols // local), src.target.max_groups),
                  push=("check",), notes=fill)


def render_rand(kernel, src):
  """backends/numpy/device.rand_uniform, bit for bit: murmur3's finalizer over the counter."""
  n, idx, local = prod(kernel.shape), src.idx, src.target.local
  r = src.renderer()
  body = [f"{idx} gid = {_linear_id(idx, local)};", f"if (gid >= {n}) return;",
          "uint x = uint(gid) + pc.counter;", "x = (x * 0x9E3779B9u) ^ pc.key;",
          "x ^= x >> 16; x *= 0x85EBCA6Bu;", "x ^= x >> 13; x *= 0xC2B2AE35u;", "x ^= x >> 16;",
          r.write("dst", "gid", "float(x >> 8) * (1.0f / 16777216.0f)", dtypes.float32)]
  return Rendered(kernel.name, src.build(local, body, push=("key", "counter")), _grid(-(-n // local), src.target.max_groups), push=("key", "counter"))


# ---- matmul: kernels/matmul.comp with the operand access and the epilogue as macros

def matmul_configs(kernel, target):
  """Tiles to try, best first (codegen/tiles.py), that fit the device's workgroup limits and shared memory."""
  _, (_, m, n, _) = matmul_shape(kernel)
  out = matmul_tiles(m, n, target.max_invocations, target.max_size[:2], target.shared_bytes)
  if not out: raise RuntimeError(f"Vulkan: no matmul tile fits {kernel.name} (workgroup {target.max_invocations}, shared memory {target.shared_bytes} bytes)")
  return out


def render_matmul(kernel, src, config):
  """kernels/matmul.comp specialised by defines: operand loads through their views (A_AT, B_AT),
  the epilogue fused into the store (MM_STORE calls mm_store)."""
  (batch, m, n, k), (nb, mm, nn, kk) = matmul_shape(kernel)
  la, lb = kernel.reduce.srcs[0].srcs
  r = src.renderer()
  r.names[id(kernel.reduce)] = "red"
  red = "round_half(acc)" if kernel.reduce.dtype is dtypes.float16 else "acc"
  value = r.value(kernel.ast, [("gid", tuple(range(len(kernel.shape))))])
  store = (f"void mm_store(float acc, {src.idx} gid) {{\n  float red = {red};\n  "
           + "\n  ".join(r.lines + [r.write("dst", "gid", value, kernel.dtype)]) + "\n}")
  ops = src.renderer()
  defines = {"MM_M": mm, "MM_N": nn, "MM_K": kk, "IDX": src.idx,
             "A_AT(b, i, k)": ops.load(la, [("(b)", batch), ("(i)", m), ("(k)", k)]),
             "B_AT(b, k, j)": ops.load(lb, [("(b)", batch), ("(k)", k), ("(j)", n)]),
             "A_K_FAST": int(fastest(la.arg.view, k) or not fastest(la.arg.view, m)),
             "B_N_FAST": int(fastest(lb.arg.view, n) or not fastest(lb.arg.view, k)),
             "MM_STORE(acc, b, i, j)": f"mm_store(acc, {matmul_out_index(kernel, batch, m, n)})",
             "BM": config.bm, "BN": config.bn, "BK": config.bk, "TM": config.tm, "TN": config.tn}
  tail = "".join(f"#define {k_} {v}\n" for k_, v in defines.items()) + read_kernel("matmul.comp")
  groups = (-(-nn // config.bn), -(-mm // config.bm), nb)
  if any(g > lim for g, lim in zip(groups, src.target.max_groups)):
    raise NotImplementedError(f"Vulkan: matmul {kernel.name} needs {groups} workgroups, over the device's grid {src.target.max_groups}")
  local = (config.bn // config.tn, config.bm // config.tm)
  return Rendered(kernel.name, src.build(local, [], functions=[store], tail=tail), groups, notes={"config": config})
