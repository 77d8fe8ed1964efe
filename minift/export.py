"""Write a model as a Hugging Face folder that transformers loads: config.json,
model.safetensors (HF names and layouts) and the tokenizer. Used after full fine-tuning and
to save a base model with a LoRA adapter merged in."""
import dataclasses, json, os
import numpy as np
from minift.checkpoint import atomic_folder, save_safetensors
from minift.lora import lora_modules, model_type

HF_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                    "gemma3_text": "Gemma3ForCausalLM"}


def hf_state_dict(model):
  """{HF key: float32 array}; GPT-2's Conv1D weights go back to (in, out)."""
  if lora_modules(model): raise ValueError("merge the LoRA adapters first (minift.lora.merge_lora) before exporting the model")
  transposed = getattr(model, "TRANSPOSED", ())
  out = {}
  for name, t in model.named_parameters():
    arr = t.numpy().astype(np.float32)
    layer, _, index = name.rpartition(".weight_pieces.")
    if layer:   # a split weight (sharder): its row pieces, in order, are the HF weight
      name = f"{layer}.weight"
      arr = np.concatenate([out[name], arr]) if index != "0" else arr
    out[name] = arr
  return {k: np.ascontiguousarray(v.T) if k.endswith(transposed) else v for k, v in out.items()}


def hf_config(model):
  cfg = {k: v for k, v in dataclasses.asdict(model.config).items()}
  mt = model_type(model)
  cfg.update(model_type=mt, architectures=[HF_ARCHITECTURES[mt]], torch_dtype="float32")
  return cfg


def save_hf(model, folder, tokenizer=None):
  """The model (and tokenizer) as an HF folder; replaces `folder` atomically."""
  state = hf_state_dict(model)
  with atomic_folder(folder) as tmp:
    save_safetensors(os.path.join(tmp, "model.safetensors"), state, metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f: json.dump(hf_config(model), f, indent=2)
    if tokenizer is not None: save_tokenizer(tokenizer, tmp)


def save_tokenizer(tokenizer, folder):
  tokenizer.backend.save(os.path.join(folder, "tokenizer.json"))
  tcfg = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token, "tokenizer_class": "PreTrainedTokenizerFast"}
  if tokenizer.chat_template: tcfg["chat_template"] = tokenizer.chat_template
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f: json.dump(tcfg, f, indent=2)
