"""Write a model as a Hugging Face folder that transformers loads: config.json,
model.safetensors (HF names and layouts) and the tokenizer. Used after full fine-tuning and
to save a base model with a LoRA adapter merged in."""
import dataclasses, json, os
import numpy as np
from minift.checkpoint import Later, atomic_folder, save_safetensors
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
  cfg = {k: v for k, v in dataclasses.asdict(model.config).items()}
  mt = model_type(model)
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
