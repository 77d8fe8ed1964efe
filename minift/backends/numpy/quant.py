"""Quantized weights on the NumPy backend (minift/quant.py says what they are): matmuls, embedding
lookups and DEQUANT kernels that read a weight's GGUF blocks.

A matmul with a quantized operand dequantizes the weight a panel at a time into a scratch of
about PANEL_BYTES (it stays in the cache) and hands each panel to BLAS, so a float32 copy of the
weight never exists and BLAS still does the arithmetic: x @ W.T (a layer's forward) takes panels
of W's rows, each giving a strip of the output's columns; g @ W (the gradient of the layer's
input) takes panels of W's columns where they are at least MIN_PANEL_COLS wide, else (a tall
weight: a vocabulary, an MLP's down projection) panels of rows whose products are summed, which
read g once instead of once per narrow strip. A few rows of activations (a
decode step: M <= DIRECT_ROWS) go to a direct loop instead that reads each block once and
dots it with every row (kernels/qmatmul.c, gemv): no scratch, one pass over the weight.

The blocks are decoded by the C loops of kernels/qmatmul.c (kernels/dequant.h: gguf's arithmetic,
bit for bit) built with the C loops' compiler, in parts on every core; without a compiler by
gguf.quants.dequantize, which is the reference itself.
"""
import functools, hashlib
import numpy as np
from minift.helpers import prod, read_kernel
from minift.backends.numpy import cloops, parallel

PANEL_BYTES = 4 << 20     # float32 scratch per panel: about the size of a core's share of the last-level cache
MIN_PANEL_ROWS = 64       # fewer output columns per BLAS call make it repack x too often
DIRECT_ROWS = 8           # rows of activations up to which the direct loop beats a panel and BLAS (measured to 8: README)
MIN_PANEL_COLS = 256      # g @ W: column panels at least this wide (or all columns), else row panels (measured: README)


# ---- the compiled loops

@functools.lru_cache(maxsize=None)
def _source(signature):
  """(name prefix, source) of the quantized loops for a compiler signature."""
  src = ("typedef unsigned char uchar;\ntypedef unsigned int uint;\n#define QGLOBAL\n#define QFN static inline\n#define QINDEX long\n"
         "#define QNOCONTRACT\nstatic inline float q_as_float(uint u) { bits32 b; b.i = u; return b.f; }\n#define Q_AS_FLOAT(u) q_as_float(u)\n"
         # fp16 scales by the CPU's conversion instruction (F16C on x86, ARMv8's fcvt): ~20 integer operations less a block
         "#if defined(__F16C__)\n#include <immintrin.h>\n#define Q_HALF_BITS(h) _cvtsh_ss((unsigned short)(h))\n"
         "#elif defined(__aarch64__)\nstatic inline float q_half_bits(uint h) { unsigned short u = (unsigned short)h; __fp16 f; __builtin_memcpy(&f, &u, 2); return (float)f; }\n"
         "#define Q_HALF_BITS(h) q_half_bits(h)\n#endif\n"
         "#define QCAT2(p, t, w) p##_##t##_##w\n#define QCAT(p, t, w) QCAT2(p, t, w)\n#define QNAME(t, w) QCAT(QPREFIX, t, w)\n"
         f"#define QMV_ROWS {DIRECT_ROWS}\n" + read_kernel("dequant.h") + read_kernel("qmatmul.c"))
  # the names come from a hash of all of it: a library built from other source or settings is another library
  prefix = "q_" + hashlib.sha256((cloops.PRELUDE + src + signature).encode()).hexdigest()[:20]
  return prefix, f"#define QPREFIX {prefix}\n" + src


TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")


@functools.lru_cache(maxsize=None)
def _functions(signature):
  prefix, src = _source(signature)
  names = [f"{prefix}_{t}_{w}" for t in TYPES for w in ("rect", "gemv")]
  compiler = cloops.compiler
  if any(compiler.get(n) is None for n in names):
    compiler.build({names[0]: src, **{n: "" for n in names[1:]}})   # every name listed: the cache finds each by its name
  fns = {}
  for t in TYPES:
    rect, gemv = compiler.get(f"{prefix}_{t}_rect"), compiler.get(f"{prefix}_{t}_gemv")
    if rect is None or gemv is None: return None
    rect.argtypes = gemv.argtypes = parallel.LOOP_ARGTYPES
    fns[t] = rect, gemv
  return fns


def functions():
  """{type name: (rect, gemv)} of the compiled loops, built on first use; None without a compiler."""
  if not cloops.compiler.available: return None
  return _functions(cloops.compiler.signature)


# ---- dequantizing

def _reference(blocks, dtype):
  import gguf
  return gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[dtype.name.upper()])


def dequantize_rect(raw, dtype, offset, rows, row_len, cols, out):
  """Elements [offset + r * row_len, ... + cols) of each row r < rows of a quantized buffer (a
  flat uint8 array of blocks) into out (rows, cols) float32, C-contiguous. offset, row_len and
  cols are whole blocks."""
  if rows == 0 or cols == 0: return out
  qk, nb = dtype.block, dtype.itemsize
  start, row_bytes = offset // qk * nb, row_len // qk * nb
  fns = functions()
  if fns is None:   # no compiler: gguf's own dequantizer, a row at a time when rows are strided
    view = np.lib.stride_tricks.as_strided(raw[start:], (rows, cols // qk * nb), (row_bytes, 1), writeable=False)
    out[...] = _reference(np.ascontiguousarray(view), dtype).reshape(rows, cols)
    return out
  src = raw.ctypes.data + start
  parallel.call_in_parts(fns[dtype.name][0], out, [src, row_bytes, cols // qk, cols], rows, rows * cols)
  return out


def dequantize(raw, dtype, numel):
  """A whole quantized buffer as a flat float32 array of numel elements."""
  out = np.empty(numel, np.float32)
  dequantize_rect(raw, dtype, 0, 1, numel, numel, out.reshape(1, numel))
  return out


def gather_rows(raw, dtype, row_len, idx):
  """Rows idx (int array) of a quantized (rows, row_len) buffer as float32 (len(idx), row_len):
  the rows' bytes are picked, then dequantized."""
  row_bytes = dtype.nbytes(row_len)
  picked = raw.reshape(-1, row_bytes)[idx.reshape(-1)]
  out = np.empty((picked.shape[0], row_len), np.float32)
  return dequantize_rect(picked.reshape(-1), dtype, 0, picked.shape[0], row_len, row_len, out)


_scratch = np.empty(0, np.float32)


def _panel(n):
  """A float32 scratch of n elements, kept between calls (one at a time: kernels run in order)."""
  global _scratch
  if _scratch.size < n: _scratch = np.empty(n, np.float32)
  return _scratch[:n]


# ---- matmuls

class Rect:
  """Where a matmul reads a quantized operand: a rectangle of the weight stored row-major, rows
  row_len elements apart, `cols` elements of each from `offset`; `t` when its columns are what
  the matmul sums over (x @ W.T reads W so), else its rows are (g @ W)."""
  __slots__ = ("offset", "rows", "row_len", "cols", "t")

  def __init__(self, offset, rows, row_len, cols, t):
    self.offset, self.rows, self.row_len, self.cols, self.t = offset, rows, row_len, cols, t


def _merged(view, axes):
  """(size, element stride) of the axes taken as one (in order), or None when their strides do
  not chain; size-1 axes are left out."""
  axes = [a for a in axes if view.shape[a] != 1]
  if not axes: return 1, 0
  for a, b in zip(axes, axes[1:]):
    if view.strides[a] != view.strides[b] * view.shape[b]: return None
  return prod(view.shape[a] for a in axes), view.strides[axes[-1]]


def rect(view, free, k, dtype, numel):
  """The Rect a quantized operand is read through (free: its axes that the output keeps, k: the
  summed ones), or None when the view is no rectangle of whole blocks (then the caller
  dequantizes the whole weight)."""
  f, r = _merged(view, free), _merged(view, k)
  if view.mask is not None or f is None or r is None or r[0] == 1: return None
  qk = dtype.block
  (fn, fs), (kn, ks) = f, r
  if ks == 1 and (fn == 1 or fs % qk == 0): out = Rect(view.offset, fn, fs if fn > 1 else kn, kn, True)
  elif fs == 1 and ks % qk == 0: out = Rect(view.offset, kn, ks, fn, False)
  else: return None
  if out.offset % qk or out.cols % qk or out.offset < 0 or out.offset + (out.rows - 1) * out.row_len + out.cols > numel: return None
  return out


def matmul(x, raw, dtype, rc):
  """x (M, K) float32 times the quantized rectangle rc: x @ W.T (rc.t; W is (N, K)) or x @ W
  (W is (K, N)); returns (M, N) float32."""
  M = x.shape[0]
  if rc.t: return _matmul_t(x, raw, dtype, rc, M)
  return _matmul_n(x, raw, dtype, rc, M)


def _matmul_t(x, raw, dtype, rc, M):
  N, K = rc.rows, rc.cols
  out = np.empty((M, N), np.float32)
  fns = functions()
  if M <= DIRECT_ROWS and fns is not None:   # a decode step: one pass over the weight, no scratch
    x = np.ascontiguousarray(x, np.float32)
    qk, nb = dtype.block, dtype.itemsize
    args = [x.ctypes.data, raw.ctypes.data + rc.offset // qk * nb, M, K, rc.row_len // qk * nb, N]
    parallel.call_in_parts(fns[dtype.name][1], out, args, N, N * K)
    return out
  step = max(MIN_PANEL_ROWS, PANEL_BYTES // (4 * K))
  for r0 in range(0, N, step):
    r1 = min(N, r0 + step)
    panel = dequantize_rect(raw, dtype, rc.offset + r0 * rc.row_len, r1 - r0, rc.row_len, K, _panel((r1 - r0) * K).reshape(r1 - r0, K))
    np.matmul(x, panel.T, out=out[:, r0:r1])
  return out


def _matmul_n(x, raw, dtype, rc, M):
  K, N, qk = rc.rows, rc.cols, dtype.block
  out = np.empty((M, N), np.float32)
  width = PANEL_BYTES // (4 * K) // qk * qk   # whole blocks of columns: each panel a strip of the output
  if width >= min(N, MIN_PANEL_COLS):
    for c0 in range(0, N, width):
      c1 = min(N, c0 + width)
      panel = dequantize_rect(raw, dtype, rc.offset + c0, K, rc.row_len, c1 - c0, _panel(K * (c1 - c0)).reshape(K, c1 - c0))
      np.matmul(x, panel, out=out[:, c0:c1])
    return out
  step = max(MIN_PANEL_ROWS, PANEL_BYTES // (4 * N))   # a tall W: panels of rows, products summed
  part = None
  for r0 in range(0, K, step):
    r1 = min(K, r0 + step)
    panel = dequantize_rect(raw, dtype, rc.offset + r0 * rc.row_len, r1 - r0, rc.row_len, N, _panel((r1 - r0) * N).reshape(r1 - r0, N))
    if r0 == 0: np.matmul(x[:, r0:r1], panel, out=out)
    else:
      part = np.matmul(x[:, r0:r1], panel, out=part)
      out += part
  return out


def numel(raw, dtype):
  """The values a quantized buffer's bytes hold."""
  return raw.size // dtype.itemsize * dtype.block
