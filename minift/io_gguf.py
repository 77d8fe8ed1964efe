"""GGUF files (llama.cpp's format): config, weights and tokenizer from one file.

Weights are dequantized to float32 one tensor at a time with the `gguf` package, or kept as
their quantized blocks (base dtype `keep`, minift/quant.py), and renamed to Hugging Face names,
undoing what llama.cpp's converter changed:
  * llama-architecture files store Q and K with the rows of each head permuted (llama.cpp's RoPE
    rotates adjacent pairs, HF's rotates halves): the permutation is undone;
  * Gemma files store every RMSNorm weight with 1 added (HF keeps w and scales by 1 + w): 1 is
    subtracted again.
The tokenizer is rebuilt from the metadata as a `tokenizers.Tokenizer`.
"""
import mmap, os, re, struct
import numpy as np
from minift.errors import FileError, MissingFile

# dequantizable tensor types (gguf.GGMLQuantizationType names)
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# per-layer GGUF names -> HF names, per architecture
_LLAMA_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
_GEMMA3_BLOCK = dict(_LLAMA_BLOCK, ffn_norm="pre_feedforward_layernorm", post_attention_norm="post_attention_layernorm",
                     post_ffw_norm="post_feedforward_layernorm", attn_q_norm="self_attn.q_norm", attn_k_norm="self_attn.k_norm")
_GPT2_BLOCK = {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2",
               "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
_DECODER_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
NAMES = {  # architecture: (top-level names, block prefix, block names)
  "llama": (_DECODER_TOP, "model.layers", _LLAMA_BLOCK),
  "qwen2": (_DECODER_TOP, "model.layers", _LLAMA_BLOCK),
  "gemma3": (_DECODER_TOP, "model.layers", _GEMMA3_BLOCK),
  "gpt2": ({"token_embd": "transformer.wte", "position_embd": "transformer.wpe", "output_norm": "transformer.ln_f",
            "output": "lm_head"}, "transformer.h", _GPT2_BLOCK),
}


def hf_tensor_name(arch, name):
  """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None if unknown."""
  top, prefix, block = NAMES[arch]
  m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
  if m:
    return f"{prefix}.{m.group(1)}.{block[m.group(2)]}.{m.group(3)}" if m.group(2) in block else None
  base, _, kind = name.rpartition(".")
  return f"{top[base]}.{kind}" if base in top and kind in ("weight", "bias") else None


def gguf_tensor_name(arch, hf_name):
  """'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight' (hf_tensor_name backwards); None if unknown."""
  top, prefix, block = NAMES[arch]
  m = re.fullmatch(re.escape(prefix) + r"\.(\d+)\.(.+)\.(weight|bias)", hf_name)
  if m:
    names = {hf: g for g, hf in block.items()}
    return f"blk.{m.group(1)}.{names[m.group(2)]}.{m.group(3)}" if m.group(2) in names else None
  base, _, kind = hf_name.rpartition(".")
  names = {hf: g for g, hf in top.items()}
  return f"{names[base]}.{kind}" if base in names and kind in ("weight", "bias") else None


class GGUFFile:
  """A GGUF file: its metadata (parsed here, which is much faster than gguf.GGUFReader on a
  262k-token vocabulary) and its tensors, memory-mapped and dequantized on demand with the
  `gguf` package. Layout (little-endian): b"GGUF", u32 version, u64 tensor count, u64 key/value
  count, the key/values, then per tensor (name, u32 n_dims, u64 dims innermost first, u32 type,
  u64 offset), then the tensor data from the next multiple of general.alignment (default 32)."""
  SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
  STRING, ARRAY = 8, 9

  def __init__(self, path):
    import gguf
    self.path = path
    if not os.path.exists(path): raise MissingFile(f"GGUF file {path} does not exist")
    self._mmap = np.memmap(path, dtype=np.uint8, mode="r") if os.path.getsize(path) else np.zeros(0, np.uint8)
    self._buf, self._pos = memoryview(self._mmap), 0
    if bytes(self._buf[:4]) != b"GGUF": raise FileError(f"{path}: not a GGUF file (no GGUF magic at the start)")
    try:
      self._pos = 4
      version, n_tensors, n_kv = self._read("<I"), self._read("<Q"), self._read("<Q")
      if version not in (2, 3): raise ValueError(f"GGUF version {version} (only 2 and 3, little-endian, are read)")
      self.metadata, self.value_types = {}, {}
      for _ in range(n_kv):
        key = self._string()
        kind = self._read("<I")
        # (GGUF value type, element type of an array): what a copy of the key into another file needs
        self.value_types[key] = (kind, struct.unpack_from("<I", self._buf, self._pos)[0] if kind == self.ARRAY else None)
        self.metadata[key] = self._value(kind)
      infos = []
      for _ in range(n_tensors):
        name, n_dims = self._string(), self._read("<I")
        dims = [self._read("<Q") for _ in range(n_dims)]
        infos.append((name, dims, self._read("<I"), self._read("<Q")))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
      raise FileError(f"{path}: cannot read the GGUF header ({e}); truncated or corrupt?") from None
    align = int(self.metadata.get("general.alignment", 32))
    data_start = -(-self._pos // align) * align
    self.tensors = {}   # name -> (shape, quantization type, byte offset, byte count)
    for name, dims, kind, offset in infos:
      try: qtype = gguf.GGMLQuantizationType(kind)
      except ValueError: raise FileError(f"{path}: tensor {name!r} has unknown GGML type {kind}") from None
      block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
      n = int(np.prod(dims, dtype=np.int64))
      nbytes = n // block * block_bytes
      if data_start + offset + nbytes > len(self._mmap):
        raise FileError(f"{path} is truncated: tensor {name!r} ends at byte {data_start + offset + nbytes} but the file has {len(self._mmap)} bytes")
      self.tensors[name] = (tuple(int(d) for d in reversed(dims)), qtype, data_start + offset, nbytes)
    self.arch = self.get("general.architecture")
    del self._buf

  def _read(self, fmt):
    v = struct.unpack_from(fmt, self._buf, self._pos)[0]
    self._pos += struct.calcsize(fmt)
    return v

  def _string(self):
    n = self._read("<Q")
    if self._pos + n > len(self._buf): raise ValueError("unexpected end of file")
    s = str(self._buf[self._pos:self._pos + n], "utf-8")
    self._pos += n
    return s

  def _value(self, kind):
    if kind == self.STRING: return self._string()
    if kind in self.SCALARS: return self._read(self.SCALARS[kind])
    if kind != self.ARRAY: raise ValueError(f"unknown metadata value type {kind}")
    elem, count = self._read("<I"), self._read("<Q")
    if elem in self.SCALARS:   # numbers: one NumPy read for the whole array
      dt = np.dtype(self.SCALARS[elem].replace("?", "u1"))
      if self._pos + dt.itemsize * count > len(self._buf): raise ValueError("unexpected end of file")
      arr = np.frombuffer(self._buf, dt, count, self._pos)
      self._pos += dt.itemsize * count
      return arr.astype(bool).tolist() if elem == 7 else arr.tolist()
    return [self._value(elem) for _ in range(count)]

  def get(self, key, default=None): return self.metadata.get(key, default)

  def shape(self, name): return self.tensors[name][0]

  def type_name(self, name): return self.tensors[name][1].name

  def raw(self, name):
    """The tensor's bytes as stored, a read-only view of the file: (rows, bytes per row) uint8."""
    shape, _, offset, nbytes = self.tensors[name]
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return self._mmap[offset:offset + nbytes].reshape(rows, nbytes // rows)

  def dequantize(self, name, start=None, stop=None):
    """float32 NumPy array of the tensor's shape (a view of the file for F32 tensors); with
    start, stop: only those rows of its first dim (a piece of a table)."""
    import gguf
    shape, qtype, offset, nbytes = self.tensors[name]
    if qtype.name not in SUPPORTED_TYPES:
      raise FileError(f"{self.path}: tensor {name!r} has type {qtype.name}, which minift cannot dequantize (supported: {', '.join(SUPPORTED_TYPES)})")
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    row_bytes = nbytes // rows
    start, stop = (0, rows) if start is None else (start, stop)
    if len(shape) > 2 and (start, stop) != (0, rows): raise ValueError(f"{self.path}: row pieces of {len(shape)}-d tensor {name!r}")
    raw = self._mmap[offset + start * row_bytes:offset + stop * row_bytes].reshape(stop - start, row_bytes)
    piece_shape = tuple(shape) if (start, stop) == (0, rows) else (stop - start,) + tuple(shape[1:])
    if qtype.name == "F32": return raw.view(np.float32).reshape(piece_shape)
    out = np.empty((stop - start, shape[-1]), np.float32)
    step = max(1, (1 << 22) // shape[-1])   # a few million values at a time: dequantize's temporaries stay small
    for r in range(0, stop - start, step):
      out[r:r + step] = gguf.quants.dequantize(raw[r:r + step], qtype)
      self._drop_pages(offset + (start + r) * row_bytes, min(step, stop - start - r) * row_bytes)
    return out.reshape(piece_shape)

  def _drop_pages(self, offset, nbytes):
    """Unmap the file pages a dequantized tensor was read from: they would otherwise count in
    this process's resident memory next to the float32 copy until the file is closed (the OS
    keeps them in its page cache, so a second read is still fast)."""
    mm = getattr(self._mmap, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise"): return
    start = offset // mmap.PAGESIZE * mmap.PAGESIZE
    mm.madvise(mmap.MADV_DONTNEED, start, min(len(mm), offset + nbytes) - start)


def gguf_config(g):
  """A Hugging Face config.json dict from a GGUF file's metadata."""
  try:
    return _gguf_config(g)
  except (TypeError, KeyError, ZeroDivisionError) as e:   # a key missing (None) or of the wrong type
    raise FileError(f"{g.path}: its metadata does not describe a {g.arch} model ({type(e).__name__}: {e})") from None


def _gguf_config(g):
  arch = g.arch
  key = lambda k, default=None: g.get(f"{arch}.{k}", default)
  vocab = key("vocab_size") or len(g.get("tokenizer.ggml.tokens", []))
  tied = "output.weight" not in g.tensors
  common = {"vocab_size": vocab, "tie_word_embeddings": tied, "bos_token_id": g.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": g.get("tokenizer.ggml.eos_token_id")}
  if arch == "gpt2":
    return dict(common, model_type="gpt2", n_embd=key("embedding_length"), n_layer=key("block_count"),
                n_head=key("attention.head_count"), n_positions=key("context_length"),
                n_inner=key("feed_forward_length"), layer_norm_epsilon=key("attention.layer_norm_epsilon", 1e-5))
  heads = key("attention.head_count")
  cfg = dict(common, hidden_size=key("embedding_length"), intermediate_size=key("feed_forward_length"),
             num_hidden_layers=key("block_count"), num_attention_heads=heads,
             num_key_value_heads=key("attention.head_count_kv", heads), rms_norm_eps=key("attention.layer_norm_rms_epsilon"),
             max_position_embeddings=key("context_length"), rope_theta=key("rope.freq_base", 10000.0),
             head_dim=key("attention.key_length") or key("embedding_length") // heads)
  scaling = key("rope.scaling.type")
  if scaling and scaling != "none":
    if scaling != "linear": raise FileError(f"{g.path}: RoPE scaling {scaling!r} is not supported (only linear)")
    cfg["rope_scaling"] = {"rope_type": "linear", "factor": key("rope.scaling.factor")}
  if "rope_freqs.weight" in g.tensors:
    raise FileError(f"{g.path}: per-frequency RoPE factors (tensor 'rope_freqs.weight', Llama 3.1+) are not supported")
  if arch in ("llama", "qwen2"):
    return dict(cfg, model_type=arch)
  if arch == "gemma3":
    # not in the metadata: Gemma 3's fixed choices (HF's Gemma3TextConfig defaults, llama.cpp's too)
    n_layer = cfg["num_hidden_layers"]
    return dict(cfg, model_type="gemma3_text", sliding_window=key("attention.sliding_window"), sliding_window_pattern=6,
                rope_local_base_freq=10000.0, final_logit_softcapping=key("final_logit_softcapping"),
                # queries are scaled by 1/sqrt(head_dim), except the 27B model (62 layers): 1/sqrt(hidden/heads)
                query_pre_attn_scalar=cfg["hidden_size"] // heads if n_layer == 62 else cfg["head_dim"])
  raise FileError(f"{g.path}: unknown architecture {arch!r} (general.architecture)")


class _GGUFSource:
  """The GGUF tensors under HF names, for io_hf.load_weights."""
  def __init__(self, g):
    self.g, self.names = g, {}
    for name in g.tensors:
      hf = hf_tensor_name(g.arch, name) if g.arch in NAMES else None
      self.names[hf or name] = name   # an unknown name stays as is: load_weights reports it as unexpected

  def keys(self): return list(self.names)
  def shape(self, key): return self.g.shape(self.names[key])
  def stored_type(self, key): return self.g.type_name(self.names[key])
  def raw(self, key): return self.g.raw(self.names[key])
  def get(self, key): return self.g.dequantize(self.names[key])
  def get_rows(self, key, start, stop): return self.g.dequantize(self.names[key], start, stop)
  def release(self, key):   # an F32 tensor is a view of the file: the finiteness check read its pages
    _, _, offset, nbytes = self.g.tensors[self.names[key]]
    self.g._drop_pages(offset, nbytes)
  def file(self, key): return f"{self.g.path} (GGUF tensor {self.names[key]!r})"


def unpermute_qk(w, n_head):
  """Undo llama.cpp's Q/K row order: within each head, rows (0, half, 1, half + 1, ...) back to
  (0, 1, ..., half - 1, half, ...). w is (n_head * head_dim, ...) or a bias (n_head * head_dim,)."""
  rows = w.shape[0]
  return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)   # (nh, hd/2, 2, ...) -> (nh, 2, hd/2, ...)


def permute_qk(w, n_head):
  """llama.cpp's Q/K row order from HF's (unpermute_qk backwards): within each head, rows
  (0, 1, ..., half - 1, half, ...) become (0, half, 1, half + 1, ...)."""
  rows = w.shape[0]
  return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)   # (nh, 2, hd/2, ...) -> (nh, hd/2, 2, ...)


def load_gguf(path, dtype=None, with_tokenizer=True):
  """(model, tokenizer or None) from a .gguf file. dtype: how the weights are stored (the base
  dtype, minift/quant.py): None or float32 (dequantized), float16, keep (quantized blocks stay
  quantized, memory-mapped), q8_0 or q4_0."""
  from models import model_class, build, GGUF_ARCHITECTURES
  from minift.io_hf import load_weights
  g = GGUFFile(path)
  cls = model_class(g.arch, f"{path} (general.architecture)", GGUF_ARCHITECTURES)
  bad = [f"tensor {n!r} has type {g.type_name(n)}" for n in g.tensors if g.type_name(n) not in SUPPORTED_TYPES]
  if bad:   # before anything is read
    raise FileError(f"{path}: {', '.join(bad[:5])}{f' (and {len(bad) - 5} more)' if len(bad) > 5 else ''}, which minift "
                     f"cannot dequantize (supported: {', '.join(SUPPORTED_TYPES)})")
  config = gguf_config(g)
  model = build(cls, config, path)

  def convert(name, arr):   # arr: float values, or the rows of a quantized tensor's bytes (Q and K: a row permutation)
    if g.arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")): return unpermute_qk(arr, config["num_attention_heads"])
    if g.arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")): return unpermute_qk(arr, config["num_key_value_heads"])
    if g.arch == "gemma3" and name.endswith("norm.weight"): return arr - 1.0
    return arr

  tokenizer = gguf_tokenizer(g) if with_tokenizer else None   # first: its temporaries (a 262k vocabulary's merges) are gone before the weights arrive
  load_weights(model, _GGUFSource(g), path, dtype=dtype, convert=convert)
  return model, tokenizer


# ---- tokenizer

# pre-tokenizer split patterns by `tokenizer.ggml.pre` (the patterns the vocabularies were trained with)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT,
           "smaug-bpe": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
# GPT-2's pattern with every digit split off first (StarCoder-style vocabularies)
_DIGIT_SPLIT = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva")
CONTROL, USER_DEFINED = 3, 4   # llama.cpp token types


def _byte_chars():
  """GPT-2's byte -> printable character table (bytes that print stand for themselves)."""
  keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  table, extra = {}, 0
  for b in range(256):
    if b in keep: table[b] = chr(b)
    else: table[b], extra = chr(256 + extra), extra + 1
  return table


def _spm_merges(tokens, priority):
  """BPE merges implied by a SentencePiece vocabulary: every way of cutting a token into two
  tokens, best token first (by `priority`, higher first), longer left piece first within one."""
  ids = {t: i for i, t in enumerate(tokens)}
  out = []
  for t in sorted(ids, key=lambda t: -priority[ids[t]]):
    for cut in range(len(t) - 1, 0, -1):
      if t[:cut] in ids and t[cut:] in ids: out.append((t[:cut], t[cut:]))
  return out


def gguf_tokenizer(g):
  """A TextTokenizer (tokenizers.Tokenizer inside) built from the GGUF metadata."""
  from tokenizers import Tokenizer, AddedToken, Regex, models, normalizers, pre_tokenizers, decoders, processors
  from minift.tokenizer import TextTokenizer
  kind, pre = g.get("tokenizer.ggml.model"), g.get("tokenizer.ggml.pre", "default")
  if not g.get("tokenizer.ggml.tokens"): raise FileError(f"{g.path}: no tokenizer in its metadata (tokenizer.ggml.tokens)")
  tokens = list(g.get("tokenizer.ggml.tokens"))
  types = list(g.get("tokenizer.ggml.token_type") or [1] * len(tokens))
  if kind == "gpt2":      # byte-level BPE
    chars = _byte_chars()
    alphabet = set(chars.values())
    spell = lambda t: t if set(t) <= alphabet else "".join(chars[b] for b in t.encode("utf-8"))
    tokens = [t if ty == CONTROL else spell(t) for t, ty in zip(tokens, types)]
    merges = [tuple(m.split(" ")) for m in g.get("tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=pre in _SPLITS and _SPLITS[pre] is _LLAMA3_SPLIT))
    if pre in _SPLITS:
      tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in _DIGIT_SPLIT:
      tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
      tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "qwen2": tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
  elif kind == "llama":   # SentencePiece BPE with byte fallback; spaces are written as '▁'
    # llama.cpp's converter wrote '▁' as ' ' in user-defined tokens (Gemma's runs of spaces): undo it
    tokens = [t.replace(" ", "\u2581") if ty == USER_DEFINED else t for t, ty in zip(tokens, types)]
    # merge order: Gemma's follows the token order; other SentencePiece models' the token scores
    priority = [-i for i in range(len(tokens))] if g.arch.startswith("gemma") else list(g.get("tokenizer.ggml.scores"))
    unk = tokens[g.get("tokenizer.ggml.unknown_token_id", 0)]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, _spm_merges(tokens, priority), unk_token=unk,
                               fuse_unk=True, byte_fallback=True))
    prefix = g.get("tokenizer.ggml.add_space_prefix", not g.arch.startswith("gemma"))
    steps = ([normalizers.Prepend("\u2581")] if prefix else []) + [normalizers.Replace(" ", "\u2581")]
    tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(dec + ([decoders.Strip(" ", 1, 0)] if prefix else []))
  else:
    raise FileError(f"{g.path}: tokenizer model {kind!r} (tokenizer.ggml.model) is not supported; expected gpt2 or llama")
  # control tokens (<bos>, <|im_start|>) are special added tokens; user-defined ones (Gemma's runs of
  # newlines, HTML tags) are matched whole in the text, as llama.cpp does
  tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types) if ty == CONTROL])
  tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types)
                  if ty == USER_DEFINED and "\u2581" not in t])
  bos_id, eos_id = g.get("tokenizer.ggml.bos_token_id"), g.get("tokenizer.ggml.eos_token_id")
  add_bos = g.get("tokenizer.ggml.add_bos_token", kind == "llama")
  byte_level = [processors.ByteLevel(trim_offsets=False)] if kind == "gpt2" else []
  if add_bos and bos_id is not None:
    bos = tokens[bos_id]
    template = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    tok.post_processor = processors.Sequence(byte_level + [template])
  elif byte_level:
    tok.post_processor = byte_level[0]
  # generation also stops at the end-of-turn marker of chat models
  eos_ids = [eos_id, g.get("tokenizer.ggml.eot_token_id")] + \
            [i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == CONTROL and t in ("<end_of_turn>", "<|im_end|>", "<|eot_id|>")]
  return TextTokenizer(tok, bos_id, eos_ids, g.get("tokenizer.chat_template"),
                       tokens[bos_id] if bos_id is not None else None, tokens[eos_id] if eos_id is not None else None)
