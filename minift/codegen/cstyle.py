"""The C-style kernel languages, written once: how the values of a kernel AST are written as
expressions. The op table, the types, literals, the helper functions kernels call (the prelude)
and shared subexpressions as variables are here; a dialect is a subclass that overrides only
what differs. OpenCL C (backends/opencl/codegen.py: half storage, vector loads, integer division)
and the CPU's C loops (backends/numpy/cloops.py: fewer types and ops, wrapping integers, its own
exp and tanh) are the two there are.

Loop structures are not here: they really differ (one GPU work-item per output, reductions in a
work-group; nested CPU loops with segments and column blocks), so each backend keeps its own and
passes its loop variables (`ctx`) through value() to its load(), which turns a LOAD into an index.

A GLSL 450 compute dialect (Vulkan) fits as a third subclass, overriding:
  types        arith/storage tables: int64_t (GL_ARB_gpu_shader_int64), float16_t storage
               (GL_EXT_shader_16bit_storage); bool stored as uint
  literals     inf and nan (GLSL has no INFINITY/NAN: uintBitsToFloat(0x7f800000u) ...),
               int64_suffix "l"
  cast()       constructor syntax, float(x), instead of (float)x
  math_fns     erf has no builtin: the prelude defines erf_f
  prelude      fn_qualifier "" (no inline, no static); its own head (#version 450, #extension
               lines) and int helpers in its types
  read/write   buffers are SSBO arrays bound by binding index, so data0[i] reads as here, with no
               pointer to declare; half: float(data0[i]) and data0[i] = float16_t(v)
  round_half   float(float16_t(x))
and its loop structure (ids from gl_GlobalInvocationID) in its backend package.
"""
import numpy as np
from minift.dtype import dtypes
from minift.lazy import Op


class Unsupported(NotImplementedError):
  """The kernel uses something this dialect does not render."""


# ops whose float16 result is rounded to half after the op (the others are exact on half inputs)
ROUNDED = {Op.EXP, Op.LOG, Op.SQRT, Op.RECIP, Op.TANH, Op.SIN, Op.SIGMOID, Op.ERF, Op.CAST, Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.POW}


class CStyleLanguage:
  """Expressions for the KNodes of one kernel. value() inlines a node's expression, or for a node
  the AST uses more than once (kernel.shared) declares a variable once into self.lines and names
  it. A backend sets self.lines / self.names where a loop body begins (variables made inside a
  loop stay in it) and implements load(node, ctx)."""

  # dtype name -> the type values are computed in, and the type buffers hold. A dialect leaves
  # out the dtypes it does not render.
  arith_types = {"bool": "bool", "int32": "int", "int64": "long", "float16": "float", "float32": "float"}
  storage_types = {"bool": "uchar", "int32": "int", "int64": "long", "float16": "half", "float32": "float"}
  infix = {Op.ADD: "+", Op.SUB: "-", Op.MUL: "*", Op.DIV: "/", Op.CMPLT: "<", Op.CMPEQ: "=="}
  math_fns = {Op.EXP: "exp", Op.LOG: "log", Op.SQRT: "sqrt", Op.TANH: "tanh_f", Op.SIN: "sin", Op.SIGMOID: "sigmoid_f", Op.ERF: "erf"}
  pow_fn = "pow"
  inf, nan = "INFINITY", "NAN"
  int64_suffix = "L"
  fn_qualifier = ""   # before each helper function of the prelude

  def __init__(self, kernel, in_dtypes):
    self.kernel, self.in_dtypes, self.shared = kernel, in_dtypes, kernel.shared
    self.names, self.lines, self.count, self.prefix = {}, [], 0, ""   # prefix: of variable names

  # ---- literals and types

  def literal(self, value, dtype):
    """`value` as a literal of `dtype`'s arithmetic type (negative values parenthesised)."""
    if dtype is dtypes.bool: return "1" if value else "0"
    if dtype is dtypes.int32:
      value = int(np.int32(value))
      return "(-2147483647-1)" if value == -2**31 else (f"({value})" if value < 0 else str(value))
    if dtype is dtypes.int64:
      value, l = int(value), self.int64_suffix
      return f"(-9223372036854775807{l}-1{l})" if value == -2**63 else (f"({value}{l})" if value < 0 else f"{value}{l}")
    v = float(np.float16(value)) if dtype is dtypes.float16 else float(np.float32(value))
    if v != v: return self.nan
    if v in (float("inf"), float("-inf")): return self.inf if v > 0 else f"(-{self.inf})"
    return f"({v!r}f)" if v < 0 or (v == 0 and np.signbit(v)) else f"{v!r}f"

  def cast(self, x, src, to):
    if to is dtypes.bool: return f"({x}!=0)"
    return f"(({self.arith_types[to.name]}){x})" if self.arith_types[to.name] != self.arith_types[src.name] else x

  # ---- buffers

  def read(self, buf, index, dtype):
    """The value of element `index` of a buffer of `dtype`."""
    return f"({buf}[{index}]!=0)" if dtype is dtypes.bool else f"{buf}[{index}]"

  def write(self, buf, index, value, dtype):
    return f"{buf}[{index}] = {value};"

  def round_half(self, x):
    """x (a float) rounded to the nearest half: float16 is computed in float, rounded after every op as NumPy does."""
    return f"round_half({x})"

  # ---- the prelude

  prelude_head = ""   # before the helpers (includes, a comment)
  prelude_math = ""   # helpers the shared ones build on (exp, tanh, rounding to half)
  prelude_int = ""    # integer division and power, where the dialect renders them

  @classmethod
  def prelude(cls):
    """The helper functions every kernel of the dialect may call."""
    q = cls.fn_qualifier
    shared = ("/* exp(-x) overflows to inf for x << 0, and 1/inf is the exact 0 NumPy gives too */\n"
              f"{q}float sigmoid_f(float x) {{ return 1.0f / (1.0f + {cls.math_fns[Op.EXP]}(-x)); }}\n"
              "/* NumPy's maximum propagates NaN (OpenCL's fmax does not) */\n"
              f"{q}float max_f(float a, float b) {{ return (a > b || a != a) ? a : b; }}\n")
    return cls.prelude_head + cls.prelude_math + shared + cls.prelude_int

  # ---- expressions

  def value(self, node, ctx):
    """The expression of node's values at the backend's loop variables ctx."""
    name = self.names.get(id(node))
    if name is not None: return name
    code = self.expr(node, ctx)
    if id(node) not in self.shared or node.op is Op.CONST: return code
    name = f"{self.prefix}v{self.count}"
    self.count += 1
    self.lines.append(self.declare(name, node.dtype, code))
    self.names[id(node)] = name
    return name

  def declare(self, name, dtype, code):
    return f"{self.arith_types[dtype.name]} {name} = {code};"

  def load(self, node, ctx):
    """A LOAD node's value at the loop variables ctx: the backend's indexing."""
    raise NotImplementedError

  def expr(self, node, ctx):
    op = node.op
    if op is Op.BUFFER: return self.load(node, ctx)
    if op is Op.CONST: return self.literal(node.arg, node.dtype)
    if op in (Op.COPY, Op.DEQUANT): return self.value(node.srcs[0], ctx)   # DEQUANT: the load reads values (Language.read)
    if op in (Op.SUM, Op.RMAX, Op.GATHER, Op.SCATTER_ADD, Op.RAND, Op.ATTENTION, Op.ATTENTION_BACKWARD):
      raise Unsupported(f"{op.name} cannot be inlined in an expression")
    code = self.alu(node, [self.value(s, ctx) for s in node.srcs])
    if node.dtype is dtypes.float16 and op in ROUNDED and not (op is Op.CAST and node.srcs[0].dtype is dtypes.float16):
      code = self.round_half(code)
    return code

  def alu(self, node, srcs):
    op, out = node.op, node.dtype
    a, b = srcs[0], srcs[1] if len(srcs) > 1 else None
    if op is Op.CAST: return self.cast(a, node.srcs[0].dtype, node.arg)
    if op is Op.WHERE: return f"({a}?{b}:{srcs[2]})"
    if op in (Op.CMPLT, Op.CMPEQ): return f"({a}{self.infix[op]}{b})"
    if out is dtypes.bool: return self.bool_alu(op, a, b)
    if out.is_int: return self.int_alu(op, out, a, b)
    return self.float_alu(op, a, b)

  def bool_alu(self, op, a, b):   # as NumPy: * is and, + and maximum are or
    if op is Op.NEG: return f"(!{a})"
    if op is Op.MUL: return f"({a}&&{b})"
    if op in (Op.ADD, Op.MAX): return f"({a}||{b})"
    raise Unsupported(f"{op.name} on bool")

  def int_alu(self, op, dtype, a, b):
    """Integer ops; division and power through the prelude's div_i/div_l/pow_l (no undefined
    behaviour: a division by zero gives 0, as NumPy's does with a warning)."""
    wide = dtype is dtypes.int64
    if op is Op.NEG: return f"(-{a})"
    if op is Op.MAX: return f"max({a}, {b})"
    if op is Op.RECIP: return f"div_l(1L, {a})" if wide else f"div_i(1, {a})"
    if op is Op.DIV: return f"div_l({a}, {b})" if wide else f"div_i({a}, {b})"
    if op is Op.POW: return f"pow_l({a}, {b})" if wide else f"((int)pow_l({a}, {b}))"
    if op in self.infix: return f"({a}{self.infix[op]}{b})"
    raise Unsupported(f"integer {op.name}")

  def float_alu(self, op, a, b):
    if op in self.math_fns: return f"{self.math_fns[op]}({a})"
    if op is Op.NEG: return f"(-{a})"
    if op is Op.RECIP: return f"(1.0f/{a})"
    if op is Op.MAX: return f"max_f({a}, {b})"
    if op is Op.POW: return f"{self.pow_fn}({a}, {b})"
    if op in self.infix: return f"({a}{self.infix[op]}{b})"
    raise Unsupported(op.name)


class Writer:
  """Lines of C-like code and their indentation: open() starts a block after its header line
  (which ends with "{"), close() ends blocks down to a depth, with the brace where the header was."""

  def __init__(self, depth=0):
    self.lines, self.depth = [], depth

  def line(self, *texts):
    self.lines += ["  " * self.depth + t for t in texts]

  def open(self, header):
    self.line(header)
    self.depth += 1

  def close(self, to=None):
    """End the innermost block, or every block opened deeper than `to`."""
    for _ in range(self.depth - (self.depth - 1 if to is None else to)):
      self.depth -= 1
      self.line("}")
