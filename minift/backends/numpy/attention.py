"""Attention for the NumPy backend's ATTENTION and ATTENTION_BACKWARD kernels: the hand-written
C loops of kernels/attention.c, built with the C loops' compiler, and without a compiler the same
computed in NumPy, a block of queries at a time (the (T, S) scores of a long sequence would not
fit in memory at once).
"""
import functools, hashlib
import numpy as np
from minift.helpers import read_kernel
from minift.backends.numpy import cloops, parallel

ATTENTION_ROWS = 32   # query rows per unit of work of the compiled loops (ATT_BLOCK in attention.c)


@functools.lru_cache(maxsize=None)
def _attention_source(signature):
  """(name, source) of the compiled loops for a compiler signature (hashed once: every attention
  kernel asks)."""
  src = read_kernel("attention.c")
  name = "attention_" + hashlib.sha256((cloops.PRELUDE + src + signature + str(ATTENTION_ROWS)).encode()).hexdigest()[:24]
  defines = f"#define ATT_BLOCK {ATTENTION_ROWS}\n#define ATTENTION_NAME {name}\n#define ATTENTION_BACKWARD_NAME {name}_backward\n"
  return name, defines + src


def attention_functions():
  """(forward, backward): the compiled attention loops, built on first use; None without a compiler."""
  compiler = cloops.compiler
  if not compiler.available: return None
  name, src = _attention_source(compiler.signature)
  fns = compiler.get(name), compiler.get(name + "_backward")
  if None in fns:
    compiler.build({name: src, name + "_backward": ""})   # both names listed: the cache finds each function by its name
    fns = compiler.get(name), compiler.get(name + "_backward")
    if None in fns: return None
  for fn in fns:
    fn.argtypes = parallel.LOOP_ARGTYPES
  return fns


def _attention_blocks(q, k, scale, causal, window, rows):
  """(queries i0:i1, q * scale grouped (B, Hkv, G, rows, D), softmax (B, Hkv, G, rows, S)) of
  each block of `rows` queries, for q (B, Hq, T, D) and k (B, Hkv, S, D)."""
  B, Hq, T, D = q.shape
  Hkv, S = k.shape[1], k.shape[2]
  qg = q.reshape(B, Hkv, Hq // Hkv, T, D) * np.float32(scale)
  kt, keys = k.reshape(B, Hkv, 1, S, D).swapaxes(-1, -2), np.arange(S)
  for i0 in range(0, T, rows):
    i1 = min(T, i0 + rows)
    aligned = np.arange(i0, i1)[:, None] + (S - T)   # query i sees keys up to i + S - T
    allowed = keys <= aligned if causal else np.ones((i1 - i0, S), bool)
    if window: allowed &= keys > aligned - window
    scores = np.where(allowed, qg[:, :, :, i0:i1] @ kt, np.float32(-np.inf))
    e = np.exp(scores - scores.max(-1, keepdims=True))
    yield i0, i1, qg[:, :, :, i0:i1], e / e.sum(-1, keepdims=True)


def attention_numpy(q, k, v, scale, causal, window, rows=128):
  """What the compiled attention loop computes, in NumPy: softmax(q k^T * scale, masked) v for q
  (B, Hq, T, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), `rows` queries at a time (the (T, S) scores
  of a long sequence would not fit in memory at once)."""
  B, Hq, T, _ = q.shape
  Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[3]
  vg, out = v.reshape(B, Hkv, 1, S, Dv), np.empty((B, Hkv, Hq // Hkv, T, Dv), np.float32)
  for i0, i1, _, p in _attention_blocks(q, k, scale, causal, window, rows): out[:, :, :, i0:i1] = p @ vg
  return out.reshape(B, Hq, T, Dv)


def attention_backward_numpy(q, k, v, dout, scale, causal, window, rows=128):
  """The gradients (dq, dk, dv) of attention_numpy's output for dout (B, Hq, T, Dv)."""
  B, Hq, T, D = q.shape
  Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[3]
  G = Hq // Hkv
  kg, vg, dog = k.reshape(B, Hkv, 1, S, D), v.reshape(B, Hkv, 1, S, Dv), dout.reshape(B, Hkv, G, T, Dv)
  dq, dk, dv = np.empty((B, Hkv, G, T, D), np.float32), np.zeros((B, Hkv, S, D), np.float32), np.zeros((B, Hkv, S, Dv), np.float32)
  for i0, i1, qs, p in _attention_blocks(q, k, scale, causal, window, rows):
    do = dog[:, :, :, i0:i1]
    dp = do @ vg.swapaxes(-1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdims=True))
    dq[:, :, :, i0:i1] = (ds @ kg) * np.float32(scale)
    dk += (ds.swapaxes(-1, -2) @ qs).sum(2)
    dv += (p.swapaxes(-1, -2) @ do).sum(2)
  return dq.reshape(B, Hq, T, D), dk, dv
