"""Tiny Hugging Face model folders (random weights from transformers) with a character-level
tokenizer, for end-to-end fine-tuning tests that run in seconds."""
import json, os
import string
from tokenizers import Tokenizer, models, pre_tokenizers, decoders

CHARS = string.ascii_letters + string.digits + " .,;:!?'\"-\n"
VOCAB = 3 + len(CHARS)          # <pad>, <s>, </s>, then one token per character


def char_tokenizer():
  vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
  tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
  tok.decoder = decoders.Fuse()
  return tok


def save_tiny(kind, folder, seed=0, layers=2, hidden=32, intermediate=None, vocab=VOCAB, context=64):
  """A random GPT-2 or Llama (tied head) saved as an HF folder with the character tokenizer;
  widths and vocabulary can be made larger than the tokenizer's (for memory tests). intermediate:
  the MLP width (default: 2 x hidden for Llama, GPT-2's 4 x hidden)."""
  import torch, transformers
  torch.manual_seed(seed)
  common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                max_position_embeddings=context, bos_token_id=1, eos_token_id=2, pad_token_id=0)
  if kind == "gpt2":
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=context,
                                                                 n_inner=intermediate,
                                                                 bos_token_id=1, eos_token_id=2))
  else:
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=True))
  model.save_pretrained(folder)
  char_tokenizer().save(os.path.join(folder, "tokenizer.json"))
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)
  return str(folder)


TEXT = ("To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer "
        "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. ") * 12


# llama.cpp's names for a Llama block's tensors
GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def save_tiny_gguf(path, seed=0, qtype=None):
  """save_tiny's Llama (tied head) as a GGUF file the way llama.cpp's converter writes one: Q and K
  rows permuted for its RoPE, and the character vocabulary as a SentencePiece-style tokenizer
  (a space is written '\u2581'; <pad>, <s>, </s> are control tokens). qtype (a
  gguf.GGMLQuantizationType gguf can write, Q8_0, Q4_0, ...): the weight matrices stored in it."""
  import gguf, torch, transformers
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                 tie_word_embeddings=True)
  model = transformers.LlamaForCausalLM(cfg)
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(cfg.num_hidden_layers); w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size); w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads); w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps); w.add_rope_freq_base(cfg.rope_parameters["rope_theta"]); w.add_vocab_size(VOCAB)
  w.add_tokenizer_model("llama")
  w.add_token_list(["<pad>", "<s>", "</s>"] + [c.replace(" ", "\u2581") for c in CHARS])
  w.add_token_scores([0.0] * VOCAB); w.add_token_types([3, 3, 3] + [1] * len(CHARS))   # 3: control, 1: normal
  w.add_unk_token_id(0); w.add_bos_token_id(1); w.add_eos_token_id(2); w.add_add_bos_token(True); w.add_add_space_prefix(False)
  for name, p in model.state_dict().items():
    if name == "lm_head.weight": continue   # tied to the embedding
    a = p.detach().numpy().astype("float32")
    parts = name.split(".")
    if name.startswith("model.layers."):
      gname = f"blk.{parts[2]}.{GGUF_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"
      heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(gname.split(".")[2])
      if heads:   # the converter's row order for RoPE (minift's loader undoes it)
        a = a.reshape(heads, 2, a.shape[0] // heads // 2, a.shape[1]).swapaxes(1, 2).reshape(a.shape)
    else:
      gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}[name]
    if qtype is not None and a.ndim == 2: w.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    else: w.add_tensor(gname, a)
  w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
  return str(path), model


# ---- tiny models with the tokenizers real checkpoints have (for GGUF export, whose tokenizer
# formats are byte-level BPE and SentencePiece-style BPE; the character tokenizer above is neither)

def bytelevel_bpe(vocab_size=300):
  """A byte-level BPE (GPT-2 / Llama 3 / Qwen2 style) trained on TEXT: 256 byte symbols, merges, 3 special tokens and a plain added one."""
  from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers, processors
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  tok.add_tokens(["<think>"])   # an added token that is not special (llama.cpp: USER_DEFINED, matched whole)
  return tok


def sentencepiece_bpe(merges_vocab=80):
  """A SentencePiece-style BPE (Gemma / Llama 2 style) trained on TEXT: spaces written as '▁', 256
  byte-fallback tokens <0x00>..<0xFF>, special tokens <pad> <eos> <bos> <unk>, a plain added token, BOS added; the
  merged tokens come in merge order, as in Gemma's vocabulary."""
  from tokenizers import Tokenizer, AddedToken, models, normalizers, pre_tokenizers, decoders, trainers, processors
  trainer_tok = Tokenizer(models.BPE())
  trainer_tok.normalizer = normalizers.Replace(" ", "\u2581")
  trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
  trainer_tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=merges_vocab, show_progress=False))
  trained = json.loads(trainer_tok.to_str())["model"]
  vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{f"<0x{b:02X}>": 4 + b for b in range(256)}}
  for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]): vocab.setdefault(t, len(vocab))
  merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
  tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
  tok.normalizer = normalizers.Replace(" ", "\u2581")
  tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
  tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<pad>", "<eos>", "<bos>", "<unk>")])
  tok.add_tokens([AddedToken("<think>", normalized=False, special=False)])
  tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)])
  return tok


def save_tiny_bpe(kind, folder, seed=0):
  """A tiny HF folder of `kind` (gpt2, llama, qwen2, gemma3) with a BPE tokenizer, random weights,
  and every choice a converter could get wrong set away from its default: norms and biases not at
  their init, RoPE bases other than the defaults, an untied head (llama), grouped KV heads, Gemma 3's
  sliding window shorter than the test texts and a global layer among them."""
  import torch, transformers
  torch.manual_seed(seed)
  tok = sentencepiece_bpe() if kind == "gemma3" else bytelevel_bpe()
  V = tok.get_vocab_size()
  shared = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
  if kind == "gpt2":   # 1024 positions: transformers' GGUF loader reads n_ctx, not the context length, for GPT-2's table
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=1024,
                                                                 bos_token_id=0, eos_token_id=0))
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
  elif kind == "llama":
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shared, rope_theta=50000.0, tie_word_embeddings=False,
                                                                   bos_token_id=1, eos_token_id=2))
    special = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
  elif kind == "qwen2":
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shared, rope_theta=20000.0, tie_word_embeddings=True,
                                                                   bos_token_id=0, eos_token_id=2))
    special = {"eos_token": "<|im_end|>"}
  elif kind == "gemma3":   # head_dim 256 = query_pre_attn_scalar (llama.cpp and transformers' GGUF loader assume both); layer 5 is global
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**dict(shared, num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1),
                                                                         head_dim=256, query_pre_attn_scalar=256, sliding_window=4,
                                                                         bos_token_id=2, eos_token_id=1, pad_token_id=0))
    special = {"bos_token": "<bos>", "eos_token": "<eos>"}
  else:
    raise ValueError(kind)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or ".ln_" in name: p.add_(torch.randn_like(p) * 0.1)
      elif name.endswith("bias"): p.add_(torch.randn_like(p) * 0.02)
  model.save_pretrained(folder)
  tok.save(os.path.join(folder, "tokenizer.json"))
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump(dict(special, tokenizer_class="PreTrainedTokenizerFast"), f)
  return str(folder)
