"""Model architectures, one file each, and the registry that picks one for a checkpoint.

    from models import load
    model, tokenizer = load("path/to/hf_folder")      # or "model.gguf"

The registry maps Hugging Face's config.json `model_type` and GGUF's `general.architecture`
to the class that implements it.
"""
import os
from minift.errors import FileError, MissingFile
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
    raise FileError(f"unknown architecture {model_type!r} in {where}{extra}; supported: {', '.join(sorted(registry))}")
  return registry[model_type]


def load(path, dtype=None, with_tokenizer=True):
  """(model, tokenizer) from an HF model folder or a .gguf file. dtype='float16' keeps weight
  matrices in float16 (frozen-weight storage); computation stays float32. Files that are
  missing, corrupt, of an unknown architecture or hold non-finite weights are errors
  (minift.errors.MissingFile, FileError) that name the file and tensor."""
  if not os.path.exists(path): raise MissingFile(f"model path {path} does not exist (expected an HF model folder or a .gguf file)")
  if os.path.isdir(path):
    from minift.io_hf import load_hf
    model, tok = load_hf(path, dtype=dtype, with_tokenizer=with_tokenizer)
  else:
    from minift.io_gguf import load_gguf
    model, tok = load_gguf(path, dtype=dtype, with_tokenizer=with_tokenizer)
  if tok is not None:   # token ids past the embedding table are refused where text is encoded (tokenizer.check_ids)
    tok.model_vocab, tok.model_path = model.config.vocab_size, path
  return model, tok


def build(cls, config, where):
  """cls made from a config dict; FileError naming `where` when a value has the wrong type or size."""
  try:
    return cls.from_config_dict(config)
  except (TypeError, ValueError, KeyError, ZeroDivisionError) as e:
    raise FileError(f"{where}: cannot make a {cls.__name__} of this config ({type(e).__name__}: {e})") from None


def skeleton(path):
  """The model of an HF folder or .gguf file built from its config alone, its weights not read
  (zeros that are never made): what an architecture and its parameter shapes are."""
  if not os.path.exists(path): raise MissingFile(f"model path {path} does not exist")
  if os.path.isdir(path):
    from minift.io_hf import read_config
    config, where = read_config(path), os.path.join(path, "config.json")
    return build(model_class(config.get("model_type"), f"{where} (model_type)"), config, where)
  from minift.io_gguf import GGUFFile, gguf_config
  g = GGUFFile(path)
  return build(model_class(g.arch, f"{path} (general.architecture)", GGUF_ARCHITECTURES), gguf_config(g), path)


def inspect(path):
  """(skeleton(path), its tokenizer) with the weight files' headers checked (a missing or
  truncated file is an error) but no weight read: what a tool checks before it hands the path
  to processes of its own (federated clients), where an error would be harder to see."""
  model = skeleton(path)
  if os.path.isdir(path):
    from minift.io_hf import SafetensorsFolder, read_config
    from minift.tokenizer import load_hf_tokenizer
    SafetensorsFolder(path)
    tok = load_hf_tokenizer(path, read_config(path))
  else:
    from minift.io_gguf import GGUFFile, gguf_tokenizer
    tok = gguf_tokenizer(GGUFFile(path))
  tok.model_vocab, tok.model_path = model.config.vocab_size, path
  return model, tok


__all__ = ["GPT2", "GPT2Config", "Llama", "LlamaConfig", "Gemma3", "Gemma3Config", "HF_MODEL_TYPES",
           "GGUF_ARCHITECTURES", "model_class", "build", "load", "skeleton", "inspect"]
