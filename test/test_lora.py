"""LoRA: exact trainable-parameter counts, and the PEFT adapter format in both directions,
checked against peft + transformers logits."""
import numpy as np
import pytest
import torch
import peft
from minift import Tensor, no_grad
from minift.lora import apply_lora, save_adapter, load_adapter, lora_parameters, merge_lora
import models
from test_models import make_hf, ids_batch

TARGETS = {"gpt2": ["c_attn", "attn.c_proj"], "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  out = {}
  for kind in ("gpt2", "llama", "qwen2"):
    folder = tmp_path_factory.mktemp(kind)
    make_hf(kind).save_pretrained(folder)
    out[kind] = str(folder)
  return out


def hf_model(kind, folder):
  import transformers
  return transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()


def logits_minift(model, ids):
  with no_grad(): return model(Tensor(ids)).numpy()


def randomize_b(model, seed=0):
  """A fresh adapter has B = 0 (no effect); give it random B so the comparisons mean something."""
  rng = np.random.default_rng(seed)
  from minift.lora import lora_modules
  for _, mod in lora_modules(model): mod.lora_B.assign(rng.standard_normal(mod.lora_B.shape).astype(np.float32) * 0.2)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_trainable_parameter_count_equals_peft(tiny, kind):
  model, _ = models.load(tiny[kind], with_tokenizer=False)
  targets = TARGETS["gpt2" if kind == "gpt2" else "llama"]
  params = apply_lora(model, targets, r=4, alpha=8)
  ours = sum(p.numel() for p in params)
  ref = peft.get_peft_model(hf_model(kind, tiny[kind]), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
  assert ours == sum(p.numel() for p in ref.parameters() if p.requires_grad)
  assert all(p.requires_grad for p in params)
  assert sum(p.requires_grad for p in model.parameters()) == len(params)   # the base is frozen


def test_gpt2_default_targets_are_attention_only(tiny):
  model, _ = models.load(tiny["gpt2"], with_tokenizer=False)
  apply_lora(model, r=2)
  from minift.lora import lora_modules
  assert sorted({p.split(".", 3)[-1] for p, _ in lora_modules(model)}) == ["attn.c_attn", "attn.c_proj"]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_minift_adapter_loads_in_peft(tiny, kind, tmp_path):
  model, _ = models.load(tiny[kind], with_tokenizer=False)
  apply_lora(model, TARGETS[kind], r=4, alpha=8)
  randomize_b(model)
  save_adapter(model, str(tmp_path / "adapter"), base_model_path=tiny[kind])
  ref = peft.PeftModel.from_pretrained(hf_model(kind, tiny[kind]), str(tmp_path / "adapter")).eval()
  ids = ids_batch()
  with torch.no_grad(): want = ref(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(logits_minift(model, ids), want, atol=1e-4, rtol=1e-4)
  base = hf_model(kind, tiny[kind])
  with torch.no_grad(): assert np.abs(base(torch.tensor(ids)).logits.numpy() - want).max() > 1e-2   # the adapter matters


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_peft_adapter_loads_in_minift(tiny, kind, tmp_path):
  ref = peft.get_peft_model(hf_model(kind, tiny[kind]), peft.LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS[kind], init_lora_weights=False))
  ref.save_pretrained(str(tmp_path / "adapter"))
  model, _ = models.load(tiny[kind], with_tokenizer=False)
  load_adapter(model, str(tmp_path / "adapter"))
  ids = ids_batch(1)
  with torch.no_grad(): want = ref.eval()(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(logits_minift(model, ids), want, atol=1e-4, rtol=1e-4)
  # merged into the base, the adapter gives the same logits
  merge_lora(model)
  assert not lora_parameters(model)
  np.testing.assert_allclose(logits_minift(model, ids), want, atol=1e-4, rtol=1e-4)


def test_peft_rank_and_alpha_patterns_and_rslora(tiny, tmp_path):
  cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                        rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3}, use_rslora=True)
  ref = peft.get_peft_model(hf_model("llama", tiny["llama"]), cfg).eval()
  ref.save_pretrained(str(tmp_path / "a"))
  model, _ = models.load(tiny["llama"], with_tokenizer=False)
  merge_lora(load_adapter(model, str(tmp_path / "a")))
  ids = ids_batch(2)
  with torch.no_grad(): want = ref(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(logits_minift(model, ids), want, atol=1e-4, rtol=1e-4)


def test_adapter_errors(tiny, tmp_path):
  model, _ = models.load(tiny["llama"], with_tokenizer=False)
  with pytest.raises(ValueError, match=r"target module\(s\) \['c_attn'\] not found"):
    apply_lora(model, ["c_attn"])
  with pytest.raises(FileNotFoundError, match="missing adapter_config.json"):
    load_adapter(model, str(tmp_path))
  apply_lora(model, ["q_proj"], r=4)
  save_adapter(model, str(tmp_path / "a"))
  from safetensors.numpy import load_file, save_file
  path = str(tmp_path / "a" / "adapter_model.safetensors")
  w = load_file(path)
  key = next(k for k in w if k.endswith("layers.0.self_attn.q_proj.lora_B.weight"))
  w[key] = np.zeros((3, 4), np.float32)   # an adapter made for another model
  save_file(w, path)
  other, _ = models.load(tiny["llama"], with_tokenizer=False)
  with pytest.raises(ValueError, match=r"q_proj.lora_B.weight has shape \(3, 4\), the model needs \(64, 4\)"):
    load_adapter(other, str(tmp_path / "a"))


def test_adapter_for_another_base_model_is_refused(tiny, tmp_path):
  """An adapter whose tensors fit this model but that was made for another one (here: another
  vocabulary, same layers) is refused: by the base fingerprint minift records in the adapter,
  and for an adapter without one (peft's) by base_model_name_or_path where that names a model
  on this machine. A hub id or a path that is not here is not judged."""
  import json, os, shutil
  from safetensors.numpy import load_file, save_file
  from minift.errors import FileError
  other = str(tmp_path / "other-vocab")   # the llama of `tiny` with 120 tokens instead of 96
  shutil.copytree(tiny["llama"], other)
  w = load_file(os.path.join(other, "model.safetensors"))
  for k in ("model.embed_tokens.weight", "lm_head.weight"): w[k] = np.concatenate([w[k], w[k][:24]])
  save_file(w, os.path.join(other, "model.safetensors"), metadata={"format": "pt"})
  cfg = json.load(open(os.path.join(other, "config.json")))
  json.dump(dict(cfg, vocab_size=120), open(os.path.join(other, "config.json"), "w"))
  model, _ = models.load(tiny["llama"], with_tokenizer=False)
  apply_lora(model, TARGETS["llama"], r=4)
  adapter = str(tmp_path / "adapter")
  save_adapter(model, adapter, base_model_path=tiny["llama"])
  load_adapter(models.load(tiny["llama"], with_tokenizer=False)[0], adapter)   # its own base: fine
  with pytest.raises(FileError, match=r"the adapter was made for another base model \(llama, .* parameters; fingerprint \w+\), not this one"):
    load_adapter(models.load(other, with_tokenizer=False)[0], adapter)
  # as peft writes it: no fingerprint, the base named in adapter_config.json
  path = os.path.join(adapter, "adapter_model.safetensors")
  save_file(load_file(path), path, metadata={"format": "pt"})
  with pytest.raises(FileError, match=f"the adapter was made for {tiny['llama']} .*another base model than this one"):
    load_adapter(models.load(other, with_tokenizer=False)[0], adapter)
  config_path = os.path.join(adapter, "adapter_config.json")
  for named in ("HuggingFaceTB/SmolLM2-135M", "/on/another/machine/llama", other):
    json.dump(dict(json.load(open(config_path)), base_model_name_or_path=named), open(config_path, "w"))
    load_adapter(models.load(other, with_tokenizer=False)[0], adapter)   # not judged by a name that is not here, or names this model
