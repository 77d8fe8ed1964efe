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
