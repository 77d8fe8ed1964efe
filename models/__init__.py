"""Model architectures, one file each, and the registry that picks one for a checkpoint.

    from models import load
    model, tokenizer = load("path/to/hf_folder")      # or "model.gguf"

Each model file (gpt2.py, llama.py, gemma3.py) holds one architecture read top to bottom; what
they share (the output head, hidden -> logits, the forward with or without a KV cache) is
base.py's CausalLM. The registry maps Hugging Face's config.json `model_type` and GGUF's
`general.architecture` to the class that implements it. generation.py decodes token by token,
evaluate.py scores text.
"""
import os
from models.base import CausalLM
from models.gpt2 import GPT2, GPT2Config
from models.llama import Llama, LlamaConfig
from models.gemma3 import Gemma3, Gemma3Config

# HF model_type -> class
HF_MODEL_TYPES = {"gpt2": GPT2, "llama": Llama, "qwen2": Llama, "gemma3_text": Gemma3}
# GGUF general.architecture -> class
GGUF_ARCHITECTURES = {"gpt2": GPT2, "llama": Llama, "qwen2": Llama, "gemma3": Gemma3}


def model_class(model_type, where="config", registry=HF_MODEL_TYPES):
  """The class for an architecture name, or an error naming where the name came from."""
  if model_type not in registry:
    extra = " (a multimodal Gemma 3 checkpoint: use its text-only model, model_type gemma3_text)" if model_type == "gemma3" and registry is HF_MODEL_TYPES else ""
    raise ValueError(f"unknown architecture {model_type!r} in {where}{extra}; supported: {', '.join(sorted(registry))}")
  return registry[model_type]


def load(path, dtype=None, with_tokenizer=True):
  """(model, tokenizer) from an HF model folder or a .gguf file. dtype='float16' keeps weight
  matrices in float16 (frozen-weight storage); computation stays float32."""
  if not os.path.exists(path): raise FileNotFoundError(f"model path {path} does not exist")
  if os.path.isdir(path):
    from minift.io_hf import load_hf
    return load_hf(path, dtype=dtype, with_tokenizer=with_tokenizer)
  from minift.io_gguf import load_gguf
  return load_gguf(path, dtype=dtype, with_tokenizer=with_tokenizer)


__all__ = ["CausalLM", "GPT2", "GPT2Config", "Llama", "LlamaConfig", "Gemma3", "Gemma3Config", "HF_MODEL_TYPES",
           "GGUF_ARCHITECTURES", "model_class", "load"]
