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


def save_tiny(kind, folder, seed=0, layers=2):
  import torch, transformers
  torch.manual_seed(seed)
  common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
  if kind == "gpt2":
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=64,
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


def save_tiny_gguf(path, seed=0):
  """save_tiny's Llama (tied head) as a GGUF file the way llama.cpp's converter writes one: Q and K
  rows permuted for its RoPE, and the character vocabulary as a SentencePiece-style tokenizer
  (a space is written '\u2581'; <pad>, <s>, </s> are control tokens)."""
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
    w.add_tensor(gname, a)
  w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
  return str(path), model
