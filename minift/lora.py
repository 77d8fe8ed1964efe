"""LoRA: a wrapper around a frozen Linear that adds a trainable low-rank update,
y = base(x) + (dropout(x) @ A.T @ B.T) * alpha / r, and the PEFT adapter format both ways.

A is initialised as PEFT does (kaiming-uniform with a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in))),
B as zeros, so a fresh adapter leaves the model unchanged. In PEFT's files a wrapped module at
path P stores base_model.model.P.lora_A.weight (r, in) and ...lora_B.weight (out, r).
"""
import hashlib, json, math, os
import numpy as np
from minift.nn import Module, Linear, joined_row_pieces
from minift.tensor import Tensor
from minift.checkpoint import atomic_folder, complete_folder, save_safetensors
from minift.errors import FileError, MissingFile, UserError, read_json

DEFAULT_TARGETS = {"gpt2": ["c_attn", "attn.c_proj"],   # attention only; add c_fc, mlp.c_proj for the MLP
                   "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
DEFAULT_TARGETS["qwen2"] = DEFAULT_TARGETS["gemma3_text"] = DEFAULT_TARGETS["gemma3"] = DEFAULT_TARGETS["llama"]
PEFT_PREFIX = "base_model.model."


class LoRALinear(Module):
  def __init__(self, base, r, alpha, dropout=0.0, rslora=False):
    if r < 1: raise ValueError(f"LoRA rank must be at least 1, got {r}")
    if not 0 <= dropout < 1: raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    self.base, self.r, self.alpha, self.dropout = base, r, alpha, dropout
    self.scale = alpha / math.sqrt(r) if rslora else alpha / r   # rank-stabilised LoRA scales by sqrt(r)
    bound = 1.0 / math.sqrt(base.in_features)
    self.lora_A = Tensor.uniform(r, base.in_features, low=-bound, high=bound, device=base.device).contiguous().realize()
    self.lora_B = Tensor.zeros(base.out_features, r, device=base.device).contiguous().realize()
    self.lora_A.requires_grad = self.lora_B.requires_grad = True

  @staticmethod
  def from_base(base, r=8, alpha=16, dropout=0.0, rslora=False):
    return LoRALinear(base, r, alpha, dropout, rslora)

  in_features = property(lambda self: self.base.in_features)
  out_features = property(lambda self: self.base.out_features)

  def forward(self, x):
    # scale the rank-r intermediate, not the full-width update: the same product, and its
    # gradient is an r-wide multiply instead of a full-width one
    low_rank = (x.dropout(self.dropout) @ self.lora_A.T) * self.scale    # (..., r)
    return self.base(x) + low_rank @ self.lora_B.T

  def merge(self):
    """A plain Linear with the update folded in: W + scale * B @ A. A quantized base
    (minift/quant.py) merges into float32: the update is finer than its blocks can hold."""
    out = Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
    delta = (self.lora_B.detach() @ self.lora_A.detach()) * self.scale
    weight = self.base.whole()
    out.weight = (weight.float() + delta).cast("float32" if weight.dtype.is_quantized else weight.dtype).realize()
    out.bias = self.base.bias
    return out


def base_fingerprint(model):
  """(hash, summary) of what an adapter depends on: the base model's architecture and every
  base parameter's name and shape (seen through LoRA wrappers and row pieces), not the weight
  values (hashing them would cost a pass over the model). An untied LM head is left out: the
  same model may come tied in one format and untied in another."""
  named = [(n.replace(".base.", "."), t) for n, t in model.named_parameters() if not n.endswith((".lora_A", ".lora_B"))]
  shapes = {name: list(shape) for name, (shape, _) in joined_row_pieces(named).items() if name != "lm_head.weight"}
  digest = hashlib.sha256(json.dumps([model_type(model), shapes], sort_keys=True).encode()).hexdigest()[:16]
  return digest, f"{model_type(model)}, {len(shapes)} tensors, {sum(math.prod(s) for s in shapes.values()):,} parameters"


def model_type(model):
  """The HF model_type: Llama-family configs carry it (llama or qwen2), other classes name it."""
  return getattr(model.config, "model_type", None) or model.model_type


def _matches(path, target):
  """PEFT's rule: a target names a module by its full path or by a dotted suffix of it."""
  return path == target or path.endswith("." + target)


def _targets(model, targets):
  """Paths of the Linear modules that targets name ('c_attn' matches every layer's c_attn)."""
  found = [name for name, mod in model.named_modules() if isinstance(mod, (Linear, LoRALinear)) and any(_matches(name, t) for t in targets)]
  missing = [t for t in targets if not any(_matches(p, t) for p in found)]
  if missing:
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, Linear)})
    raise ValueError(f"LoRA target module(s) {missing} not found in {type(model).__name__}; linear modules are: {names}")
  return found


def _replace(model, path, new):
  parent_path, _, attr = path.rpartition(".")
  parent = model.get_submodule(parent_path)
  if isinstance(parent, list): parent[int(attr)] = new
  else: setattr(parent, attr, new)


def apply_lora(model, targets=None, r=8, alpha=16, dropout=0.0):
  """Freeze every parameter of model, wrap the target Linears in LoRALinear; returns the
  list of trainable tensors (the adapters). targets default to the architecture's usual set."""
  targets = list(targets) if targets else DEFAULT_TARGETS[model_type(model)]
  for p in model.parameters(): p.requires_grad = False
  for path in _targets(model, targets):
    mod = model.get_submodule(path)
    if isinstance(mod, LoRALinear): raise ValueError(f"{path} already has a LoRA adapter")
    _replace(model, path, LoRALinear(mod, r, alpha, dropout))
  model.lora_config = dict(r=r, alpha=alpha, dropout=dropout, targets=targets)
  return lora_parameters(model)


def lora_modules(model):
  return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, LoRALinear)]


def lora_parameters(model):
  return [t for _, mod in lora_modules(model) for t in (mod.lora_A, mod.lora_B)]


def merge_lora(model):
  """Fold every adapter into its base Linear, in place."""
  for path, mod in lora_modules(model): _replace(model, path, mod.merge())
  return model


def adapter_state(model):
  """{PEFT key: numpy array} for every adapter of model."""
  out = {}
  for path, mod in lora_modules(model):
    out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = mod.lora_A.numpy().astype(np.float32)
    out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = mod.lora_B.numpy().astype(np.float32)
  return out


def save_adapter(model, folder, base_model_path=""):
  """Write adapter_model.safetensors + adapter_config.json that peft.PeftModel.from_pretrained
  loads. The folder is replaced atomically. The safetensors metadata also records the base
  model's fingerprint (base_fingerprint), which load_adapter checks."""
  cfg = model.lora_config
  digest, summary = base_fingerprint(model)
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg["r"], "lora_alpha": cfg["alpha"],
            "lora_dropout": cfg["dropout"], "target_modules": sorted(cfg["targets"]), "bias": "none",
            "fan_in_fan_out": model_type(model) == "gpt2",   # GPT-2 uses Conv1D layers in transformers
            "base_model_name_or_path": base_model_path, "inference_mode": True, "init_lora_weights": True,
            "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
            "use_rslora": False, "use_dora": False, "revision": None}
  with atomic_folder(folder) as tmp:
    save_safetensors(os.path.join(tmp, "adapter_model.safetensors"), adapter_state(model),
                     metadata={"format": "pt", "minift_base_fingerprint": digest, "minift_base_model": summary}, finite=True)
    with open(os.path.join(tmp, "adapter_config.json"), "w") as f: json.dump(config, f, indent=2)


def load_adapter(model, folder):
  """Wrap model's targets as the adapter in folder (saved by minift or by peft) says and load
  its weights. Ranks come from the tensors (so peft's rank_pattern works), alphas from
  lora_alpha / alpha_pattern. Every tensor must match a module and a shape: errors name the key.
  A folder a killed save left mid-swap (checkpoint.atomic_folder) is read from its complete copy.

  An adapter made for another base model is refused (FileError): always when its tensors do not
  fit the model's modules; when minift saved it, also when the base model fingerprint it
  recorded (architecture, every parameter's name and shape: also the vocabulary and depth,
  which the adapter's own tensors do not show) differs; and when base_model_name_or_path names
  a model that is on this machine and has another fingerprint. A hub id or a path that is not
  here is not judged by its name: folders are moved and renamed, and a file's name says little."""
  folder = complete_folder(folder)
  cfg_path, w_path = os.path.join(folder, "adapter_config.json"), os.path.join(folder, "adapter_model.safetensors")
  for p in (cfg_path, w_path):
    if not os.path.exists(p): raise MissingFile(f"--lora {folder}: missing {os.path.basename(p)} (expected a PEFT LoRA adapter folder)")
  cfg = read_json(cfg_path, "a PEFT adapter config")
  targets = cfg.get("target_modules") if isinstance(cfg, dict) else None
  if not targets or not isinstance(targets, (str, list)) or not all(isinstance(t, str) for t in ([targets] if isinstance(targets, str) else targets)):
    raise FileError(f"{cfg_path}: expected a PEFT LoRA config with \"target_modules\" (a list of module names)")
  if cfg.get("peft_type", "LORA") != "LORA": raise FileError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not LORA")
  if cfg.get("use_dora"): raise FileError(f"{cfg_path}: DoRA adapters are not supported")
  if cfg.get("bias", "none") != "none" or cfg.get("modules_to_save"):
    raise FileError(f"{cfg_path}: adapters that train biases or whole modules (bias, modules_to_save) are not supported")
  from minift.io_hf import SafetensorsFile, check_weights_finite
  weights_file = SafetensorsFile(w_path)
  weights = {k.replace(".default.weight", ".weight"): weights_file.get(k) for k in weights_file.keys()}
  if lora_modules(model): raise ValueError(f"--lora {folder}: the model already has LoRA adapters")
  _check_base(model, folder, cfg, weights_file.metadata)
  targets = [targets] if isinstance(targets, str) else list(targets)
  try:
    paths = _targets(model, targets)
  except ValueError as e:
    raise FileError(f"--lora {folder}: {e}: the adapter was made for another model") from None
  for path in paths:
    a = weights.get(f"{PEFT_PREFIX}{path}.lora_A.weight")
    if a is None: raise FileError(f"{w_path}: missing tensor {PEFT_PREFIX}{path}.lora_A.weight")
    alpha = next((v for k, v in (cfg.get("alpha_pattern") or {}).items() if _matches(path, k)), cfg.get("lora_alpha", a.shape[0]))
    _replace(model, path, LoRALinear(model.get_submodule(path), a.shape[0], alpha, cfg.get("lora_dropout", 0.0), cfg.get("use_rslora", False)))
  for p in model.parameters(): p.requires_grad = False
  for t in lora_parameters(model): t.requires_grad = True
  model.lora_config = dict(r=cfg.get("r", a.shape[0]), alpha=cfg.get("lora_alpha", cfg.get("r", a.shape[0])), dropout=cfg.get("lora_dropout", 0.0), targets=targets)
  expected = set()
  for path, mod in lora_modules(model):
    for name, t in (("lora_A", mod.lora_A), ("lora_B", mod.lora_B)):
      key = f"{PEFT_PREFIX}{path}.{name}.weight"
      expected.add(key)
      arr = weights.get(key)
      if arr is None: raise FileError(f"{w_path}: missing tensor {key}")
      if tuple(arr.shape) != t.shape:
        raise FileError(f"{w_path}: {key} has shape {tuple(arr.shape)}, the model needs {t.shape}: the adapter was made for another base model")
      check_weights_finite(arr, key, w_path)
      t.assign(arr.astype(np.float32))
  extra = sorted(set(weights) - expected)
  if extra: raise FileError(f"{w_path}: unexpected tensors {extra[:3]}{' ...' if len(extra) > 3 else ''} (no such LoRA module in the model)")
  return model


def _check_base(model, folder, cfg, metadata):
  """FileError if the adapter in folder records, or names, a base model that is not model."""
  digest, summary = base_fingerprint(model)
  if metadata.get("minift_base_fingerprint", digest) != digest:
    raise FileError(f"--lora {folder}: the adapter was made for another base model ({metadata.get('minift_base_model', '?')}; "
                    f"fingerprint {metadata['minift_base_fingerprint']}), not this one ({summary}; fingerprint {digest})")
  named = cfg.get("base_model_name_or_path")
  if "minift_base_fingerprint" in metadata or not isinstance(named, str) or not named or not os.path.exists(named): return
  import models
  try:
    other = base_fingerprint(models.skeleton(named))
  except UserError:
    return   # not a model minift reads: nothing to compare
  if other[0] != digest:
    raise FileError(f"--lora {folder}: the adapter was made for {named} ({other[1]}), another base model than this one ({summary})")
