"""Write a model out for the tools people run it with.

  * save_hf: a Hugging Face folder that transformers loads: config.json, model.safetensors (HF
    names and layouts) and the tokenizer. Used after full fine-tuning and to save a base model
    with a LoRA adapter merged in.
  * save_gguf: one GGUF file that llama.cpp and Ollama load, with the architecture's metadata
    and the tokenizer under llama.cpp's key names (as its convert_hf_to_gguf.py writes them),
    weights as f32, f16 or q8_0. What minift's GGUF loader undoes is done again here: llama
    files store Q and K with each head's rows interleaved, Gemma 3 files store norms with 1 added.
  * save_gguf_adapter: a LoRA adapter alone as a llama.cpp LoRA GGUF (`llama-cli --lora`,
    Ollama's ADAPTER), for a base written by save_gguf.
"""
import dataclasses, json, os
import numpy as np
from minift.checkpoint import Later, atomic_folder, atomic_path, save_safetensors
from minift.lora import lora_modules, model_type
from minift.nn import joined_row_pieces

HF_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                    "gemma3_text": "Gemma3ForCausalLM"}


def hf_tensors(model):
  """{HF key: Later float32 array}: each made only when it is written, so that saving a sharded
  model pages one weight in at a time. GPT-2's Conv1D weights go back to (in, out); a weight the
  sharder split is its row pieces, in order."""
  if lora_modules(model): raise ValueError("merge the LoRA adapters first (minift.lora.merge_lora) before exporting the model")
  transposed = getattr(model, "TRANSPOSED", ())
  out = {}
  for key, (shape, ts) in joined_row_pieces(model.named_parameters()).items():
    flip = key.endswith(tuple(transposed))
    def make(ts=ts, flip=flip):   # a split weight is written piece by piece, unless it must be transposed
      if not flip: return (t.numpy().astype(np.float32) for t in ts)
      return np.ascontiguousarray(np.concatenate([t.numpy().astype(np.float32) for t in ts]).T)
    out[key] = Later(shape[::-1] if flip else shape, np.float32, make)
  return out


def hf_state_dict(model):
  """{HF key: float32 array} (hf_tensors, all made)."""
  return {k: v.array() for k, v in hf_tensors(model).items()}


def hf_config(model):
  """config.json for the model. RoPE settings live in fields that are not config.json keys
  (minift gathers both of transformers' layouts into one dict): they are written in both
  layouts, `rope_parameters` (transformers >= 5) and `rope_theta` + `rope_scaling` (older)."""
  cfg = dataclasses.asdict(model.config)
  mt = model_type(model)
  legacy = lambda rope: {k: v for k, v in rope.items() if k != "rope_theta"} if rope["rope_type"] != "default" else None
  if mt in ("llama", "qwen2"):
    rope = cfg.pop("rope")
    cfg.update(rope_parameters=rope, rope_theta=rope["rope_theta"], rope_scaling=legacy(rope))
    if mt == "qwen2": cfg["use_sliding_window"] = bool(cfg["layer_types"] and "sliding_attention" in cfg["layer_types"])
  elif mt == "gemma3_text":
    full, local = cfg.pop("rope_global"), cfg.pop("rope_local")
    cfg.update(rope_parameters={"full_attention": full, "sliding_attention": local}, rope_theta=full["rope_theta"],
               rope_local_base_freq=local["rope_theta"], rope_scaling=legacy(full))
  cfg.update(model_type=mt, architectures=[HF_ARCHITECTURES[mt]], torch_dtype="float32")
  return cfg


def save_hf(model, folder, tokenizer=None):
  """The model (and tokenizer) as an HF folder; replaces `folder` atomically."""
  state = hf_tensors(model)
  with atomic_folder(folder) as tmp:
    save_safetensors(os.path.join(tmp, "model.safetensors"), state, metadata={"format": "pt"}, finite=True)
    with open(os.path.join(tmp, "config.json"), "w") as f: json.dump(hf_config(model), f, indent=2)
    if tokenizer is not None: save_tokenizer(tokenizer, tmp)


def save_tokenizer(tokenizer, folder):
  tokenizer.backend.save(os.path.join(folder, "tokenizer.json"))
  tcfg = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token, "tokenizer_class": "PreTrainedTokenizerFast"}
  if tokenizer.chat_template: tcfg["chat_template"] = tokenizer.chat_template
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f: json.dump(tcfg, f, indent=2)


# ---- GGUF

GGUF_ARCH = {"gpt2": "gpt2", "llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}   # HF model_type -> general.architecture
GGUF_TYPES = ("f32", "f16", "q8_0")
# general.file_type (llama.cpp's LlamaFileType): ALL_F32, MOSTLY_F16, MOSTLY_Q8_0
_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6   # llama.cpp token types


def gguf_hparams(model):
  """(general.architecture, {key: value}): the architecture's metadata as llama.cpp's converter
  writes it (keys without the '<arch>.' prefix). A configuration that llama.cpp would run
  differently from minift (a RoPE kind it does not know, another layer pattern) is refused."""
  mt, c = model_type(model), model.config
  if mt not in GGUF_ARCH: raise ValueError(f"model type {mt!r} has no GGUF export (supported: {', '.join(GGUF_ARCH)})")
  arch = GGUF_ARCH[mt]
  def refuse(what): raise ValueError(f"this {arch} model cannot be written as GGUF: {what}")
  if mt == "gpt2":
    if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh"): refuse(f"activation {c.activation_function!r} (llama.cpp's GPT-2 uses tanh GELU)")
    if not c.scale_attn_weights or c.scale_attn_by_inverse_layer_idx: refuse("non-standard attention scaling")
    return arch, {"context_length": c.n_positions, "embedding_length": c.n_embd, "block_count": c.n_layer,
                  "feed_forward_length": c.n_inner or 4 * c.n_embd, "attention.head_count": c.n_head,
                  "attention.layer_norm_epsilon": float(c.layer_norm_epsilon)}
  common = {"context_length": c.max_position_embeddings, "embedding_length": c.hidden_size, "block_count": c.num_hidden_layers,
            "feed_forward_length": c.intermediate_size, "attention.head_count": c.num_attention_heads,
            "attention.head_count_kv": c.num_key_value_heads, "attention.layer_norm_rms_epsilon": float(c.rms_norm_eps)}
  def rope_keys(rope, where):
    if rope["rope_type"] == "default": return {"rope.freq_base": float(rope["rope_theta"])}
    if rope["rope_type"] == "linear":
      return {"rope.freq_base": float(rope["rope_theta"]), "rope.scaling.type": "linear", "rope.scaling.factor": float(rope["factor"])}
    refuse(f"{where}RoPE type {rope['rope_type']!r} (only default and linear are written)")
  if mt in ("llama", "qwen2"):
    if c.hidden_act != "silu": refuse(f"activation {c.hidden_act!r} (llama.cpp's {arch} uses SiLU)")
    if c.layer_types and set(c.layer_types) != {"full_attention"}: refuse(f"sliding-window attention layers (llama.cpp's {arch} attends to every token)")
    out = dict(common, **rope_keys(c.rope, ""), **{"rope.dimension_count": c.head_dim, "vocab_size": c.vocab_size})
    if c.head_dim != c.hidden_size // c.num_attention_heads: out.update({"attention.key_length": c.head_dim, "attention.value_length": c.head_dim})
    return arch, out
  # Gemma 3: llama.cpp fixes what the metadata does not say: 10k local RoPE base, every 6th layer
  # global, queries scaled by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 62-layer 27B)
  pattern = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(c.num_hidden_layers)]
  if list(c.layer_types) != pattern: refuse("a layer pattern other than five sliding-window layers to one global")
  if c.rope_local["rope_type"] != "default" or float(c.rope_local["rope_theta"]) != 10000.0: refuse("a local RoPE other than base 10000")
  scalar = c.hidden_size // c.num_attention_heads if c.num_hidden_layers == 62 else c.head_dim
  if c.query_pre_attn_scalar != scalar: refuse(f"query_pre_attn_scalar {c.query_pre_attn_scalar} (llama.cpp uses {scalar})")
  if c.final_logit_softcapping is not None: refuse("final logit soft-capping")
  if c.attention_bias: refuse("attention biases")
  if c.hidden_activation != "gelu_pytorch_tanh": refuse(f"activation {c.hidden_activation!r} (llama.cpp's Gemma 3 uses tanh GELU)")
  return arch, dict(common, **{"attention.key_length": c.head_dim, "attention.value_length": c.head_dim,
                               "attention.sliding_window": c.sliding_window}, **rope_keys(c.rope_global, "global "))


def _whole(ts):
  """A float32 array from a parameter's tensor, or its row pieces joined."""
  return ts[0].numpy().astype(np.float32) if len(ts) == 1 else np.concatenate([t.numpy().astype(np.float32) for t in ts])


def gguf_tensors(model, arch):
  """[(GGUF name, shape, make)]: make() gives the float32 array as llama.cpp stores it (numpy
  shape, i.e. GGUF dims reversed): Q/K rows permuted for llama, Gemma 3 norms + 1, GPT-2's
  head written out as 'output' even when tied (older llama.cpp needs it; the converter did so)."""
  from minift.io_gguf import gguf_tensor_name, permute_qk
  c, out = model.config, []
  for key, (shape, ts) in joined_row_pieces(model.named_parameters()).items():
    name = gguf_tensor_name(arch, key)
    if name is None: raise ValueError(f"parameter {key!r} has no GGUF name in llama.cpp's {arch}")
    def make(ts=ts, key=key):
      arr = _whole(ts)
      if arch == "llama" and key.endswith(("q_proj.weight", "q_proj.bias")): return permute_qk(arr, c.num_attention_heads)
      if arch == "llama" and key.endswith(("k_proj.weight", "k_proj.bias")): return permute_qk(arr, c.num_key_value_heads)
      if arch == "gemma3" and key.endswith("norm.weight"): return arr + np.float32(1.0)
      return arr
    out.append((name, shape, make))
  names = [n for n, _, _ in out]
  if arch == "gpt2" and "output.weight" not in names:
    out.append(("output.weight",) + next((shape, make) for n, shape, make in out if n == "token_embd.weight"))
  return out


def gguf_tensor_type(name, shape, kind):
  """The GGML type of one tensor for --type `kind`, by llama.cpp's converter's rules: vectors,
  norms, biases and position tables stay F32; q8_0 needs rows of whole 32-value blocks and
  falls back to F16 otherwise."""
  import gguf
  Q = gguf.GGMLQuantizationType
  if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith((".weight", ".lora_a", ".lora_b")) or name.startswith("position_embd."):
    return Q.F32
  want = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}[kind]
  return Q.F16 if want == Q.Q8_0 and shape[-1] % 32 else want


def _nbytes(shape, qtype):
  import gguf
  block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
  return int(np.prod(shape, dtype=np.int64)) // block * block_bytes


def _value_type(value):
  """The GGUF value type for a Python metadata value (ints as uint32, floats as float32, as the converter writes them)."""
  import gguf
  T = gguf.GGUFValueType
  if isinstance(value, bool): return T.BOOL
  if isinstance(value, int): return T.UINT32
  if isinstance(value, float): return T.FLOAT32
  if isinstance(value, str): return T.STRING
  raise TypeError(f"no GGUF type for {value!r}")


def _write(path, arch, kvs, tensors, kind):
  """A GGUF file at `path`, atomically: kvs [(key, value, type, array element type)], tensors
  [(name, shape, make)] each made, converted to its type and written one at a time."""
  import gguf
  plan = [(name, shape, gguf_tensor_type(name, shape, kind), make) for name, shape, make in tensors]
  with atomic_path(path) as tmp:
    w = gguf.GGUFWriter(tmp, arch)
    try:
      for key, value, vtype, sub in kvs: w.add_key_value(key, value, vtype, sub)
      for name, shape, qtype, _ in plan: w.add_tensor_info(name, shape, np.float32, _nbytes(shape, qtype), raw_dtype=qtype)
      w.write_header_to_file()
      w.write_kv_data_to_file()
      w.write_ti_data_to_file()
      for name, shape, qtype, make in plan:
        arr = make()
        if tuple(arr.shape) != tuple(shape): raise ValueError(f"{path}: tensor {name!r} came out {arr.shape}, not {shape}")
        w.write_tensor_data(gguf.quants.quantize(np.ascontiguousarray(arr, np.float32), qtype))
        del arr
    finally:
      w.close()


def _kv(key, value): return (key, value, _value_type(value), None)


def save_gguf(model, path, tokenizer=None, kind="f32", source=None, name=None):
  """The model as a GGUF file for llama.cpp / Ollama, replacing `path` atomically. kind: f32,
  f16 or q8_0 (the weight matrices; vectors stay f32). The tokenizer's metadata is copied from
  `source` when the model came from a GGUF file, else made from `tokenizer` (a TextTokenizer
  with a byte-level or SentencePiece-style BPE vocabulary). Merge LoRA adapters first."""
  import gguf
  if lora_modules(model): raise ValueError("merge the LoRA adapters first (minift.lora.merge_lora) before exporting the model")
  if kind not in GGUF_TYPES: raise ValueError(f"unknown GGUF type {kind!r}; expected one of {', '.join(GGUF_TYPES)}")
  arch, hparams = gguf_hparams(model)
  tensors = gguf_tensors(model, arch)
  vocab_size = next(shape[0] for n, shape, _ in tensors if n == "token_embd.weight")
  general, tok = [], []
  if source is not None and str(source).endswith(".gguf"):   # the file's own tokenizer keys, with their exact types
    from minift.io_gguf import GGUFFile
    g = GGUFFile(source)
    if g.arch != arch: raise ValueError(f"{source} is a {g.arch} file, the model is {arch}")
    keep = lambda k: k.startswith("tokenizer.") or (k.startswith("general.") and k not in _OWN_GENERAL_KEYS)
    for k, v in g.metadata.items():
      if keep(k):
        vtype, elem = g.value_types[k]
        (tok if k.startswith("tokenizer.") else general).append((k, v, gguf.GGUFValueType(vtype), None if elem is None else gguf.GGUFValueType(elem)))
    if len(g.get("tokenizer.ggml.tokens", [])) != vocab_size:
      raise ValueError(f"{source}: its tokenizer has {len(g.get('tokenizer.ggml.tokens', []))} tokens, the model {vocab_size}")
  elif tokenizer is not None:
    tok = tokenizer_kvs(tokenizer, vocab_size, arch)
  else:
    raise ValueError("a GGUF file needs the tokenizer: pass tokenizer= (or source= the GGUF the model came from)")
  if name: general = [kv for kv in general if kv[0] != "general.name"] + [_kv("general.name", name)]
  kvs = [_kv("general.type", "model"), *general]
  kvs += [_kv(f"{arch}.{k}", v) for k, v in hparams.items()]
  kvs += [_kv("general.file_type", _FILE_TYPES[kind]), _kv("general.quantization_version", gguf.GGML_QUANT_VERSION), *tok]
  _write(path, arch, kvs, tensors, kind)


_OWN_GENERAL_KEYS = ("general.architecture", "general.type", "general.file_type", "general.quantization_version", "general.alignment")


def save_gguf_adapter(model, path, kind="f32", name=None):
  """The model's LoRA adapters alone as a llama.cpp LoRA GGUF (general.type 'adapter'), for the
  base model written by save_gguf without them: tensors '<base tensor>.lora_a' (r, in) and
  '.lora_b' (out, r). llama.cpp scales every module by adapter.lora.alpha / r; a module scaled
  otherwise (rsLoRA, per-module alphas or ranks) has its factor folded into lora_b."""
  import gguf
  from minift.io_gguf import gguf_tensor_name, permute_qk
  mods = lora_modules(model)
  if not mods: raise ValueError("the model has no LoRA adapters to write")
  if kind not in GGUF_TYPES: raise ValueError(f"unknown GGUF type {kind!r}; expected one of {', '.join(GGUF_TYPES)}")
  arch, _ = gguf_hparams(model)
  c, alpha = model.config, float(model.lora_config["alpha"])
  tensors = []
  for path_, mod in mods:
    base = gguf_tensor_name(arch, f"{path_}.weight")
    if base is None: raise ValueError(f"LoRA module {path_!r} has no GGUF name in llama.cpp's {arch}")
    heads = c.num_attention_heads if path_.endswith("q_proj") else c.num_key_value_heads if path_.endswith("k_proj") else None
    def make_b(mod=mod, heads=heads):
      b = mod.lora_B.numpy().astype(np.float32) * np.float32(mod.scale * mod.r / alpha)
      return permute_qk(b, heads) if arch == "llama" and heads else b   # B makes the rows of the update: they follow the base's order
    tensors.append((f"{base}.lora_a", tuple(mod.lora_A.shape), lambda mod=mod: mod.lora_A.numpy().astype(np.float32)))
    tensors.append((f"{base}.lora_b", tuple(mod.lora_B.shape), make_b))
  kvs = [_kv("general.type", "adapter"), _kv("adapter.type", "lora"), ("adapter.lora.alpha", alpha, gguf.GGUFValueType.FLOAT32, None)]
  if name: kvs.append(_kv("general.name", name))
  _write(path, arch, kvs, tensors, kind)


# ---- tokenizer metadata (tokenizer.ggml.*) from a tokenizers.Tokenizer

def _pre_tokenizer_name(pre):
  """llama.cpp's tokenizer.ggml.pre for a byte-level pre-tokenizer (tokenizer.json's), or None."""
  from minift.io_gguf import _LLAMA3_SPLIT, _QWEN2_SPLIT
  kind = (pre or {}).get("type")
  if kind == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"): return "gpt-2"
  steps = pre.get("pretokenizers", []) if kind == "Sequence" else []
  if len(steps) == 2 and steps[1]["type"] == "ByteLevel" and not steps[1].get("add_prefix_space"):
    first, regex_after = steps[0], steps[1].get("use_regex", True)
    if first["type"] == "Split" and not regex_after and first.get("behavior") == "Isolated" and not first.get("invert"):
      return {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}.get(first["pattern"].get("Regex"))
    if first["type"] == "Digits" and first.get("individual_digits") and regex_after: return "smollm"   # StarCoder-style
  return None


def _space_prefix(spec):
  """Whether a SentencePiece-style tokenizer puts '▁' before the text, or None if its
  normalizer and pre-tokenizer are not the ones llama.cpp's SentencePiece tokenizer follows."""
  norm, pre = spec.get("normalizer"), spec.get("pre_tokenizer")
  steps = (norm.get("normalizers") if norm and norm["type"] == "Sequence" else [norm]) if norm else []
  prefix = False
  for s in steps:
    if s["type"] == "Prepend" and s["prepend"] == "\u2581": prefix = True
    elif not (s["type"] == "Replace" and s["pattern"].get("String") == " " and s["content"] == "\u2581"): return None
  if pre is not None:
    if pre["type"] != "Metaspace" or pre.get("split", True) or steps: return None
    prefix = pre.get("prepend_scheme", "always") in ("first", "always")
  elif not steps: return None
  return prefix


def tokenizer_kvs(tokenizer, vocab_size, arch):
  """tokenizer.ggml.* [(key, value, type, element type)] for a TextTokenizer, as llama.cpp's
  converter writes them: byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM2) as model 'gpt2' with
  its merges and pre-tokenizer name; SentencePiece-style BPE with byte fallback (Llama 2,
  Gemma) as model 'llama' with scores that rank tokens as the merges do. Ids the tokenizer does
  not use, up to the model's vocabulary size, are '[PAD<id>]' tokens of type UNUSED."""
  import gguf
  T = gguf.GGUFValueType
  spec = json.loads(tokenizer.backend.to_str())
  model = spec["model"]
  where = "the tokenizer"
  if model.get("type") != "BPE":
    raise ValueError(f"{where} is a {model.get('type')} model; GGUF holds BPE vocabularies (byte-level or SentencePiece-style) only")
  added = {a["id"]: a for a in spec.get("added_tokens", [])}
  ids = dict(model["vocab"])
  for i, a in added.items(): ids[a["content"]] = i
  if max(ids.values()) >= vocab_size: raise ValueError(f"{where} has token ids up to {max(ids.values())}, the model's vocabulary only {vocab_size}")
  tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], [UNUSED] * vocab_size
  for t, i in ids.items(): tokens[i], types[i] = t, NORMAL
  for i, a in added.items(): types[i] = CONTROL if a.get("special") else USER_DEFINED
  merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
  kvs = []
  if model.get("byte_fallback"):   # SentencePiece-style
    prefix = _space_prefix(spec)
    if prefix is None: raise ValueError(f"{where}: a byte-fallback BPE whose normalizer/pre-tokenizer is not SentencePiece's (spaces as '\u2581')")
    rank = {}
    for r, m in enumerate(merges): rank.setdefault(m.replace(" ", ""), r)   # SentencePiece merges the best-scored pair first
    scores = [0.0] * vocab_size
    for i, (t, ty) in enumerate(zip(tokens, types)):
      if ty == NORMAL and len(t) == 6 and t.startswith("<0x") and t.endswith(">"): types[i] = BYTE
      elif ty == NORMAL and len(t) > 1: scores[i] = -float(rank.get(t, len(merges) + i))
      elif ty in (CONTROL, USER_DEFINED): scores[i] = -1000.0
      if ty == USER_DEFINED: tokens[i] = t.replace("\u2581", " ")   # llama.cpp reads user-defined tokens as plain text
    if model.get("unk_token") in ids and types[ids[model["unk_token"]]] == NORMAL: types[ids[model["unk_token"]]] = UNKNOWN
    kvs += [("tokenizer.ggml.model", "llama", T.STRING, None), ("tokenizer.ggml.pre", "default", T.STRING, None),
            ("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING), ("tokenizer.ggml.scores", scores, T.ARRAY, T.FLOAT32),
            ("tokenizer.ggml.token_type", types, T.ARRAY, T.INT32), ("tokenizer.ggml.add_space_prefix", prefix, T.BOOL, None)]
  else:                            # byte-level
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    if pre is None: raise ValueError(f"{where}: pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:200]} has no llama.cpp name "
                                     "(known: GPT-2's, Llama 3's, Qwen2's, StarCoder/SmolLM's digit split)")
    norm = spec.get("normalizer")
    if norm is not None and norm.get("type") != "NFC": raise ValueError(f"{where}: normalizer {norm.get('type')} is not one llama.cpp applies")
    kvs += [("tokenizer.ggml.model", "gpt2", T.STRING, None), ("tokenizer.ggml.pre", pre, T.STRING, None),
            ("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING), ("tokenizer.ggml.token_type", types, T.ARRAY, T.INT32),
            ("tokenizer.ggml.merges", merges, T.ARRAY, T.STRING)]
  eos = tokenizer.backend.token_to_id(tokenizer.eos_token) if tokenizer.eos_token else None
  eos = eos if eos is not None else (tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None)
  for key, value in (("bos_token_id", tokenizer.bos_token_id), ("eos_token_id", eos), ("unknown_token_id", ids.get(model.get("unk_token")))):
    if value is not None: kvs.append((f"tokenizer.ggml.{key}", int(value), T.UINT32, None))
  kvs.append(("tokenizer.ggml.add_bos_token", bool(tokenizer.adds_bos), T.BOOL, None))
  if tokenizer.chat_template: kvs.append(("tokenizer.chat_template", tokenizer.chat_template, T.STRING, None))
  return kvs
