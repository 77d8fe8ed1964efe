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
