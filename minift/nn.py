"""Layers that models are built from, and the small pieces they share (RoPE, KV caches).

A Module finds its parameters by attribute name, so a parameter's name is its attribute path:
`transformer.h.0.attn.c_attn.weight`. The models in models/ pick their attribute names so that
these paths equal the Hugging Face state-dict names, which is what loading, saving and LoRA
(targets chosen by module name) rely on.
"""
import math
from dataclasses import fields
import numpy as np
from minift.tensor import Tensor
from minift.runtime.buffer import paged_in


def _join(prefix, name): return f"{prefix}.{name}" if prefix else name


class Module:
  """Base class: parameters are Tensor attributes, children are Module attributes or lists of
  Modules. Attributes whose name starts with '_' are private and never visited."""

  def __call__(self, *args, **kwargs): return self.forward(*args, **kwargs)

  def named_children(self):
    for name, value in vars(self).items():
      if name.startswith("_"): continue
      if isinstance(value, Module): yield name, value
      elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
          if isinstance(item, Module): yield f"{name}.{i}", item

  def named_modules(self, prefix=""):
    yield prefix, self
    for name, child in self.named_children():
      yield from child.named_modules(_join(prefix, name))

  def named_parameters(self, prefix=""):
    """(name, Tensor) for every parameter, each Tensor once (a tied weight under its first name)."""
    seen = set()
    for mod_name, mod in self.named_modules(prefix):
      for name, value in vars(mod).items():
        if name.startswith("_"): continue
        items = [(name, value)] if isinstance(value, Tensor) else \
                [(f"{name}.{i}", v) for i, v in enumerate(value) if isinstance(v, Tensor)] if isinstance(value, (list, tuple)) else []
        for item_name, t in items:
          if id(t) not in seen:
            seen.add(id(t))
            yield _join(mod_name, item_name), t

  def parameters(self): return [p for _, p in self.named_parameters()]

  def get_submodule(self, path):
    mod = self
    for part in path.split(".") if path else []:
      mod = mod[int(part)] if isinstance(mod, (list, tuple)) else getattr(mod, part)
    return mod

  def set_parameter(self, name, value):
    """Replace the parameter `name` (a dotted path) by the Tensor `value`."""
    mod_path, _, attr = name.rpartition(".")
    mod = self.get_submodule(mod_path)
    if not isinstance(getattr(mod, attr, None), Tensor): raise KeyError(f"{type(self).__name__} has no parameter {name!r}")
    setattr(mod, attr, value)


def joined_row_pieces(named):
  """(name, tensor) pairs -> {name: (shape, [tensors])}: a split weight's row pieces
  ("x.weight_pieces.3") in order under the weight's own name ("x.weight") and whole shape, any
  other tensor alone under its name. How checkpoints and exports see a split weight."""
  groups = {}
  for name, t in named:
    layer, _, index = name.rpartition(".weight_pieces.")
    groups.setdefault(f"{layer}.weight" if layer else name, []).append((int(index) if layer else 0, t))
  out = {}
  for name, parts in groups.items():
    ts = [t for _, t in sorted(parts, key=lambda p: p[0])]
    out[name] = ((sum(t.shape[0] for t in ts), *ts[0].shape[1:]) if len(ts) > 1 else tuple(ts[0].shape), ts)
  return out


class RowSplit:
  """For a layer whose weight's rows can live in separate buffers (Embedding, Linear):
  split() keeps the weight as row pieces instead, each its own buffer, so the sharder pages a
  weight larger than its budget piece by piece (and phone GPUs, which cap one allocation near
  1 GB, never see the whole: Gemma 3 1B's table is 1.2 GB in float32)."""

  def rows(self):
    """The weight, or its list of row pieces once split."""
    return self.weight_pieces if hasattr(self, "weight_pieces") else self.weight

  @property
  def device(self): return (self.weight_pieces[0] if hasattr(self, "weight_pieces") else self.weight).device

  def whole(self):
    """The weight as one tensor (the pieces concatenated, lazily, once split)."""
    return Tensor.cat(self.weight_pieces, 0) if hasattr(self, "weight_pieces") else self.weight

  def split(self, max_rows):
    """Replace weight by pieces of at most max_rows rows (parameters weight_pieces.0, .1, ...).
    A weight memory-mapped from a weight file becomes views of that file, nothing is read."""
    w = self.weight
    if w.shape[0] <= max_rows: return
    lb = w.lazydata
    if w.dtype.is_quantized and not (lb.base.realized and lb.is_unviewed()): raise ValueError(f"split: a view of a quantized weight {w.shape}")
    arr = lb.base.buffer.data if lb.base.realized and lb.is_unviewed() and lb.device == "numpy" else None
    pieces = []
    for start in range(0, w.shape[0], max_rows):
      if w.dtype.is_quantized:   # whole rows of blocks: the pieces are views of the bytes (of the file, if it is one)
        row_bytes = w.dtype.nbytes(w.shape[1])
        rows = min(max_rows, w.shape[0] - start)
        raw = w.lazydata.base.buffer.device.to_numpy(paged_in(w.lazydata.base.buffer))   # NumPy: the array itself
        piece = Tensor.from_quantized(raw[start * row_bytes:(start + rows) * row_bytes], (rows, w.shape[1]), w.dtype, w.device)
      elif arr is not None and not arr.flags.writeable:   # a file view stays a (read-only, zero-copy) file view
        piece = Tensor(arr.reshape(w.shape)[start:start + max_rows])
      else:
        piece = w[start:start + max_rows].detach().contiguous().realize()
      piece.requires_grad = w.requires_grad
      pieces.append(piece)
    del self.weight
    self.weight_pieces = pieces


class Linear(Module, RowSplit):
  """y = x @ weight.T + bias, weight stored (out_features, in_features) as in torch. Split into
  row pieces, each piece makes its own slice of the output features."""
  def __init__(self, in_features, out_features, bias=True):
    self.in_features, self.out_features = in_features, out_features
    self.weight = Tensor.zeros(out_features, in_features)
    self.bias = Tensor.zeros(out_features) if bias else None

  def forward(self, x):
    if not hasattr(self, "weight_pieces"): return x.linear(self.weight, self.bias)
    out = project(x, self.weight_pieces)
    return out + self.bias if self.bias is not None else out


class Embedding(Module, RowSplit):
  """A (num_embeddings, embedding_dim) table; split into row pieces, a lookup sums the pieces'
  masked lookups."""
  def __init__(self, num_embeddings, embedding_dim):
    self.weight = Tensor.zeros(num_embeddings, embedding_dim)

  def forward(self, idx):
    if not hasattr(self, "weight_pieces"): return self.weight.embedding(idx)
    out, start = None, 0
    for piece in self.weight_pieces:   # each row is in exactly one piece: sum the masked lookups
      rows = piece.shape[0]
      inside = (idx >= start).where(idx < start + rows, False)
      rows_k = piece.embedding(inside.where(idx - start, 0))   # float32 from a quantized piece
      part = rows_k * inside.unsqueeze(-1).cast(rows_k.dtype)
      out, start = part if out is None else out + part, start + rows
    return out


def project(h, weight):
  """h @ weight.T, for a weight given whole or as a list of row pieces (a split weight)."""
  if isinstance(weight, (list, tuple)): return Tensor.cat([h @ piece.T for piece in weight], -1)
  return h @ weight.T


class LayerNorm(Module):
  def __init__(self, dim, eps=1e-5, bias=True):
    self.eps = eps
    self.weight = Tensor.ones(dim)
    self.bias = Tensor.zeros(dim) if bias else None

  def forward(self, x): return x.layernorm(self.weight, self.bias, self.eps)


class RMSNorm(Module):
  """x / rms(x) * weight. With unit_offset the scale is (1 + weight), as Gemma stores it."""
  def __init__(self, dim, eps=1e-6, unit_offset=False):
    self.eps, self.unit_offset = eps, unit_offset
    self.weight = Tensor.zeros(dim) if unit_offset else Tensor.ones(dim)

  def forward(self, x):
    if self.unit_offset: return x.rmsnorm(None, self.eps) * (1.0 + self.weight)
    return x.rmsnorm(self.weight, self.eps)


def activation(name):
  """The activation function of an HF config's `hidden_act` / `activation_function` name."""
  table = {"gelu_new": lambda x: x.gelu("tanh"), "gelu_pytorch_tanh": lambda x: x.gelu("tanh"),
           "gelu_fast": lambda x: x.gelu("tanh"), "gelu": lambda x: x.gelu("none"),
           "silu": lambda x: x.silu(), "swish": lambda x: x.silu(), "relu": lambda x: x.relu()}
  if name not in table: raise NotImplementedError(f"activation {name!r} is not supported; expected one of {sorted(table)}")
  return table[name]


def config_from_dict(cls, d):
  """A config dataclass from an HF config.json dict: known keys are taken, others ignored."""
  names = {f.name for f in fields(cls)}
  return cls(**{k: v for k, v in d.items() if k in names})


# ---- rotary position embeddings

def rope_parameters(d, layer_type=None):
  """{'rope_type', 'rope_theta', ...} from a config dict in either layout: the newer
  `rope_parameters` (one dict, or one per layer type) or the older `rope_theta` + `rope_scaling`."""
  params = d.get("rope_parameters")
  if params:
    if layer_type is not None and layer_type in params: params = params[layer_type]
    params = dict(params)
  else:
    params = dict(d.get("rope_scaling") or {})
    params["rope_theta"] = d.get("rope_theta", 10000.0)
  params["rope_type"] = params.get("rope_type", params.get("type", "default")) or "default"
  return params


def rope_inv_freq(head_dim, params):
  """Inverse frequencies (head_dim // 2,) float32 for a RoPE config (see rope_parameters)."""
  base, kind = float(params["rope_theta"]), params["rope_type"]
  inv_freq = (1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))).astype(np.float32)
  if kind == "default": return inv_freq
  if kind == "linear": return (inv_freq / np.float32(params["factor"])).astype(np.float32)
  if kind == "llama3":
    # low frequencies slowed down by `factor`, high ones kept, a smooth blend in between
    factor, lo, hi = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = np.where(wavelen > old_len / lo, inv_freq / factor, np.where(wavelen < old_len / hi, inv_freq, blended))
    return out.astype(np.float32)
  raise NotImplementedError(f"RoPE type {kind!r} is not supported (supported: default, linear, llama3)")


def rope_tables(inv_freq, start, length, device=None):
  """cos and sin (length, head_dim) for positions start .. start + length - 1; each frequency
  appears twice (at i and i + head_dim/2), matching apply_rope's pairing."""
  pos = np.arange(start, start + length, dtype=np.float32)
  freqs = pos[:, None] * inv_freq[None, :]
  freqs = np.concatenate([freqs, freqs], axis=1)
  return Tensor(np.cos(freqs), device=device), Tensor(np.sin(freqs), device=device)


def apply_rope(x, cos, sin):
  """Rotate (B, H, T, D) by position, pairing element i with i + D/2 (Hugging Face's layout):
  x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1). Seen as (..., 2, D/2),
  (x2, x1) is x with the pair axis flipped: a view, so the rotation is one fused kernel that
  reads x twice and pads nothing."""
  half = x.shape[-1] // 2
  pairs = x.shape[:-1] + (2, half)
  sign = Tensor(np.array([[-1.0], [1.0]], np.float32), device=x.device)               # (2, 1)
  cos2, sin2 = cos.reshape(cos.shape[:-1] + (2, half)), sin.reshape(sin.shape[:-1] + (2, half))
  x2 = x.reshape(pairs)                                                               # (B, H, T, 2, D/2)
  return (x2 * cos2 + x2.flip(-2) * (sin2 * sign)).reshape(x.shape)


# ---- KV caches
#
# A model's forward (models/base.py) sees a cache only through this API, so one attention code runs
# without a cache (NoCache), with a growing KVCache and with a StaticKVCache:
#   begin(T, positions, device)    start a forward over T new tokens
#   rope(inv_freq)                 cos and sin (T, head_dim) at the new tokens' positions
#   position_rows(table)           the rows (T, C) of a learned position table (an Embedding) at them
#   update_and_fetch(layer, k, v)  store a layer's new keys and values; returns the ones to attend over
#   mask(window)                   the additive mask for causal_attention, or None: causal, aligned at the end
#   advance(T)                     end the forward; `length` counts the tokens seen, tensors() lists the buffers

class KVCache:
  """Keys and values of every token seen so far, one (k, v) pair per layer, for generation. The
  new tokens are positions length .. length + T - 1 and see all the keys so far (the causal mask
  aligned at the end). The tensors stay lazy until the caller realizes them together with the
  logits (see tensors()). The keys grow by concatenation, so every step has new shapes:
  StaticKVCache is the one a jitted decode step can replay."""

  def __init__(self):
    self.layers, self.length = {}, 0
    self._T, self._device = 0, None

  def begin(self, T, positions=None, device=None):
    """Start a forward over T new tokens; they follow the ones seen (positions are for a StaticKVCache)."""
    if positions is not None:
      raise ValueError(f"{type(self).__name__}: new tokens follow the ones seen; only a StaticKVCache takes positions")
    self._T, self._device = T, device

  def rope(self, inv_freq):
    """cos and sin (T, head_dim) for positions length .. length + T - 1."""
    return rope_tables(inv_freq, self.length, self._T, self._device)

  def position_rows(self, table):
    """The rows (T, C) of an Embedding for positions length .. length + T - 1: a slice."""
    return table.whole()[self.length:self.length + self._T]

  def update_and_fetch(self, layer, k, v):
    """Append k, v (B, Hkv, T, D) for `layer`; returns all keys and values so far."""
    if layer in self.layers:
      old_k, old_v = self.layers[layer]
      k, v = Tensor.cat([old_k, k], dim=2), Tensor.cat([old_v, v], dim=2)   # (B, Hkv, S + T, D)
    self.layers[layer] = (k, v)
    return k, v

  def mask(self, window=None):
    """None: the keys end with the new tokens' own, so the causal (and window) mask aligned at the end is right."""
    return None

  def advance(self, n): self.length += n

  def tensors(self): return [t for kv in self.layers.values() for t in kv]


class NoCache(KVCache):
  """The cache API for a forward with no cache (training, scoring): the tokens are positions
  0 .. T-1 and attend to each other. Nothing is kept, so a block may run again (activation
  checkpointing reruns blocks in the backward)."""

  def update_and_fetch(self, layer, k, v): return k, v

  def advance(self, n): pass


class StaticKVCache:
  """Keys and values in buffers of fixed capacity, one (B, Hkv, capacity, D) pair per layer, made
  once and written in place (assign): slot j holds position j. A forward over T new tokens has the
  same shapes at every position, so a one-token decode step can be captured and replayed by
  minift.jit.

  Where the new tokens go is data, not shape: a model's forward calls begin() with their
  positions, (T,) int64 (a jitted step passes them as an argument; without them, the next T
  slots), then each attention layer writes its keys and values with update_and_fetch() and
  attends over all the slots with mask(window), which hides the slots after each query's
  position (not written yet) and, with a sliding window, those that fell out of it; rope() and
  position_rows() give the rows of position tables at the positions. `length` counts the tokens
  written; advance() adds to it."""

  def __init__(self, capacity):
    if capacity < 1: raise ValueError(f"StaticKVCache: capacity must be at least 1, got {capacity}")
    self.capacity, self.length = capacity, 0
    self.layers, self.positions = {}, None
    self._slots, self._tables, self._step = None, {}, {}

  def begin(self, T, positions=None, device=None):
    """Start a forward over T new tokens at `positions` (T,) int64, by default the next T slots."""
    if self.length + T > self.capacity:
      raise ValueError(f"StaticKVCache: {T} new tokens after {self.length} do not fit its capacity of {self.capacity}")
    if positions is None: positions = Tensor(np.arange(self.length, self.length + T, dtype=np.int64), device=device)
    if positions.shape != (T,): raise ValueError(f"StaticKVCache: positions must have shape ({T},), got {positions.shape}")
    S = self.capacity
    if self._slots is None: self._slots = Tensor.arange(S, device=positions.device)     # (S,): slot j is position j
    # the forward's masks, made once and shared by all layers
    hit = self._slots.reshape(S, 1) == positions.reshape(1, T)                           # (S, T): slot j takes new token i
    written = hit if T == 1 else hit.float().sum(1, keepdim=True) > 0                     # (S, 1)
    self.positions, self._step = positions, {"hit": hit.float(), "written": written.reshape(1, 1, S, 1)}

  def update_and_fetch(self, layer, k, v):
    """Write k, v (B, Hkv, T, D) for `layer` into the slots at the positions, in place; returns
    the whole buffers (B, Hkv, capacity, D)."""
    B, H, T, _ = k.shape
    if layer not in self.layers:
      self.layers[layer] = tuple(Tensor(np.zeros((B, H, self.capacity, t.shape[3]), t.dtype.np), device=t.device) for t in (k, v))
    out = []
    for buf, new in zip(self.layers[layer], (k, v)):
      # one token broadcasts over the slots; several are placed by a one-hot matmul (exact: x * 1 + 0)
      placed = new if T == 1 else self._step["hit"] @ new                                 # (B, H, 1 or S, D)
      out.append(buf.assign(self._step["written"].where(placed, buf)))
    return tuple(out)

  def mask(self, window=None):
    """Additive (T, capacity) attention mask: 0 where new token i may see slot j (j <= its
    position, and j > position - window with a sliding window), else -inf."""
    if ("mask", window) not in self._step:
      slots, pos = self._slots.reshape(1, self.capacity), self.positions.reshape(-1, 1)  # (1, S), (T, 1)
      allowed = slots <= pos
      if window is not None: allowed = allowed * (slots > pos - window)
      self._step["mask", window] = allowed.where(0.0, -math.inf).contiguous()
    return self._step["mask", window]

  def rope(self, inv_freq):
    """cos and sin (T, head_dim) at the positions: rows of tables over the whole capacity, made
    once per set of frequencies (the same numbers rope_tables gives for those positions)."""
    key = inv_freq.tobytes()
    if key not in self._tables: self._tables[key] = rope_tables(inv_freq, 0, self.capacity, self.positions.device)
    cos, sin = self._tables[key]
    return cos.embedding(self.positions), sin.embedding(self.positions)

  def position_rows(self, table):
    """The rows (T, C) of an Embedding at the positions: a lookup."""
    return table(self.positions)

  def advance(self, n):
    self.length += n
    self.positions, self._step = None, {}   # nothing of one forward outlives it

  def tensors(self): return [t for kv in self.layers.values() for t in kv]


def causal_attention(q, k, v, cache, window=None, scale=None):
  """Attention of new queries q (B, Hq, T, D) over the keys and values (B, Hkv, S, D) that
  cache.update_and_fetch returned, with the cache's mask: for NoCache and KVCache none, the
  queries being the last T keys (causal and window masks align so); for a StaticKVCache, one
  that limits its whole buffers to the slots each query may see."""
  mask = cache.mask(window)
  if mask is None: return q.scaled_dot_product_attention(k, v, is_causal=True, window=window, scale=scale)
  return q.scaled_dot_product_attention(k, v, attn_mask=mask, scale=scale)
