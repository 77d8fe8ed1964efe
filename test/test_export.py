"""tools/export.py and minift/export.py: a base model with a LoRA adapter merged in, written as a
Hugging Face folder and as a GGUF file, then read back by transformers (`gguf_file=`), by minift
and by llama.cpp itself (the xllamacpp wheel: a prebuilt llama.cpp run in-process), for every
architecture minift has. References are independent of minift: peft's model with the adapter
(transformers + peft on the base folder), and the merged weights rounded to the export type by
the gguf package. The adapters have random non-zero B, so the merge changes every output."""
import importlib.util, json, os, subprocess, sys
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tiny_lm import save_tiny, save_tiny_bpe

KINDS = ["gpt2", "llama", "qwen2", "gemma3"]
# digits, punctuation, a newline, two spaces, an added token and characters outside the vocabularies (byte fallback / bytes)
TEXT = "To be, or not to be: that is 42 questions.\nWhether 'tis  nobler<think>in the mind -- caf\u00e9 \u2603"
EXPORT = os.path.join(ROOT, "tools", "export.py")


def export(*argv):
  """tools/export.py, in this process (faster than a subprocess; a user error is raised, as
  minift.errors.UserError, for run() to print)."""
  spec = importlib.util.spec_from_file_location("export_tool", EXPORT)
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  return tool.main([str(a) for a in argv])


def exit_message(*argv):
  """The line an export that must fail prints (as minift.errors.run prints it), or the exit
  status of a command line argparse refuses."""
  from minift.errors import UserError, message_of
  with pytest.raises((UserError, SystemExit)) as e: export(*argv)
  return str(e.value.code) if isinstance(e.value, SystemExit) else f"error: {message_of(e.value)}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """{kind: (base HF folder, PEFT adapter folder)}, the adapters made by minift with random B."""
  import models
  from minift.lora import apply_lora, lora_modules, save_adapter
  out = {}
  for i, kind in enumerate(KINDS):
    base = save_tiny_bpe(kind, tmp_path_factory.mktemp(kind))
    model, _ = models.load(base)
    apply_lora(model, ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"] if kind == "gpt2" else None, r=4, alpha=16)
    rng = np.random.default_rng(i)
    for _, mod in lora_modules(model): mod.lora_B.assign(rng.normal(0, 0.05, mod.lora_B.shape).astype(np.float32))
    adapter = str(tmp_path_factory.mktemp(f"{kind}-adapter"))
    save_adapter(model, adapter, base_model_path=base)
    out[kind] = (base, adapter)
  return out


def hf_tokenizer_ids(folder, text=TEXT):
  import transformers
  return transformers.AutoTokenizer.from_pretrained(folder)(text)["input_ids"]


def peft_logits(base, adapter, ids):
  """Logits from transformers + peft: the base folder with the adapter applied (not merged)."""
  import torch, transformers, peft
  model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
  if adapter: model = peft.PeftModel.from_pretrained(model, adapter)
  with torch.no_grad(): return model(torch.tensor([ids])).logits[0].numpy()


def transformers_logits(path, ids):
  """Logits from transformers loading an HF folder or (gguf_file=) a GGUF file."""
  import torch, transformers
  kw = dict(gguf_file=os.path.basename(path)) if path.endswith(".gguf") else {}
  model = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path) if kw else path, dtype=torch.float32, **kw)
  with torch.no_grad(): return model(torch.tensor([ids])).logits[0].numpy()


def minift_logits(model, ids):
  from minift import Tensor
  return model(Tensor(np.array([ids]))).numpy()[0]


def rounded(arr, kind):
  """arr as a GGUF of `kind` stores it: weight matrices rounded to f16 or Q8_0 (blocks of 32
  values sharing one f16 scale), by the gguf package; f32 unchanged."""
  import gguf
  if kind == "f32": return arr
  q = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]
  return gguf.quants.dequantize(gguf.quants.quantize(arr, q), q).reshape(arr.shape)


def merged_reference(base, adapter, kind):
  """minift's model with the adapter merged and every weight matrix rounded as a `kind` file
  holds it (vectors and GPT-2's position table stay f32, by llama.cpp's converter's rules)."""
  import models
  from minift import Tensor
  from minift.lora import load_adapter, merge_lora
  model, tok = models.load(base)
  if adapter: merge_lora(load_adapter(model, adapter))
  for name, t in list(model.named_parameters()):
    if t.ndim >= 2 and name != "transformer.wpe.weight":
      model.set_parameter(name, Tensor(rounded(t.numpy().astype(np.float32), kind)))
  return model, tok


@pytest.fixture(scope="module")
def gguf_exports(tiny, tmp_path_factory):
  """(kind, type) -> the GGUF tools/export.py writes for base + adapter, made once."""
  folder, made = tmp_path_factory.mktemp("gguf"), {}
  def get(kind, qtype):
    if (kind, qtype) not in made:
      base, adapter = tiny[kind]
      made[kind, qtype] = str(folder / f"{kind}-{qtype}.gguf")
      export("--model", base, "--lora", adapter, "--out", made[kind, qtype], "--type", qtype)
    return made[kind, qtype]
  return get


# Against the unrounded model the logits move by the rounding of the weights. Measured here, as a
# share of the largest logit (about 0.6-0.9): f32 under 1e-6 (float32 sums in another order); f16
# 0.04-0.23% (each weight within 2^-11 of itself); q8_0 1-5.5% (one step of max|w|/127 per block of
# 32 weights, most for Gemma 3 with six layers and its embedding scaled by sqrt(hidden)). The bounds
# leave 4-5 times that. Against the same weights rounded the same way, every type agrees to float32.
UNROUNDED_TOL = {"f32": 1e-5, "f16": 1e-2, "q8_0": 0.25}   # times max |logit|


@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("kind", KINDS)
def test_gguf_loads_in_transformers_and_minift(tiny, gguf_exports, kind, qtype):
  import gguf, models
  base, adapter = tiny[kind]
  path = gguf_exports(kind, qtype)
  ids = hf_tokenizer_ids(base)
  want = peft_logits(base, adapter, ids)
  assert np.abs(want - peft_logits(base, None, ids)).max() > 0.05   # the adapter matters
  ref_model, _ = merged_reference(base, adapter, qtype)
  ref = minift_logits(ref_model, ids)
  got = transformers_logits(path, ids)
  np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
  np.testing.assert_allclose(got, want, atol=UNROUNDED_TOL[qtype] * np.abs(want).max(), rtol=0)
  back, tok = models.load(path)
  np.testing.assert_allclose(minift_logits(back, ids), ref, atol=1e-4, rtol=0)
  assert tok.encode(TEXT) == ids   # the tokenizer made from the GGUF's metadata encodes as the HF one
  # every weight matrix holds the type asked for (q8_0: all rows here are whole blocks of 32), the rest f32
  want_type = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[qtype]
  for t in gguf.GGUFReader(path).tensors:
    matrix = len(t.shape) >= 2 and t.name != "position_embd.weight"
    assert t.tensor_type.name == (want_type if matrix else "F32"), t.name


@pytest.mark.parametrize("kind", KINDS)
def test_gguf_tokenizer_in_transformers(tiny, gguf_exports, kind):
  """transformers builds its tokenizer from the GGUF metadata alone: it encodes as the original."""
  import transformers
  base, _ = tiny[kind]
  path = gguf_exports(kind, "f32")
  tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
  for text in (TEXT, "  leading spaces", "x"):
    assert tok(text)["input_ids"] == hf_tokenizer_ids(base, text), text


@pytest.mark.parametrize("kind", KINDS)
def test_hf_folder_export_of_lora(tiny, tmp_path, kind):
  """The merged model as a Hugging Face folder: transformers loads it with the logits of peft's
  model with the adapter (so the config keeps every setting, RoPE bases included), minift too."""
  import models
  from minift.lora import load_adapter
  base, adapter = tiny[kind]
  out = str(tmp_path / "merged")
  export("--model", base, "--lora", adapter, "--out", out)
  ids = hf_tokenizer_ids(base)
  want = peft_logits(base, adapter, ids)
  np.testing.assert_allclose(transformers_logits(out, ids), want, atol=1e-4, rtol=0)
  assert hf_tokenizer_ids(out) == ids
  model, _ = models.load(base)
  load_adapter(model, adapter)   # minift's own model with the adapter, unmerged
  np.testing.assert_allclose(minift_logits(models.load(out)[0], ids), minift_logits(model, ids), atol=1e-4, rtol=0)


def test_gguf_from_a_gguf_keeps_its_tokenizer(tiny, gguf_exports, tmp_path):
  """A model that came from a GGUF (as the demo's SmolLM2 does) is exported with the tokenizer
  keys of that file, values and value types alike; the weights still follow the adapter."""
  import gguf
  base, adapter = tiny["llama"]
  source = str(tmp_path / "base.gguf")
  export("--model", base, "--out", source, "--type", "f32")
  out = str(tmp_path / "merged.gguf")
  export("--model", source, "--lora", adapter, "--out", out, "--type", "f32")
  fields = lambda p: {k: (f.types, f.contents()) for k, f in gguf.GGUFReader(p).fields.items() if k.startswith("tokenizer.")}
  assert fields(out) == fields(source) and "tokenizer.ggml.merges" in fields(out)
  ids = hf_tokenizer_ids(base)
  np.testing.assert_allclose(transformers_logits(out, ids), peft_logits(base, adapter, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_adapter_gguf(tiny, tmp_path, kind):
  """--adapter_only: a llama.cpp LoRA GGUF. Read back with gguf's reader: its keys, and tensors
  '<base tensor>.lora_a' = A (r, in), '.lora_b' = B (out, r) from the PEFT file, B's rows in
  llama.cpp's Q/K order for llama. And what llama.cpp computes with it, base + alpha / r * B @ A
  for each tensor, is the merged model's GGUF tensor."""
  import gguf
  from safetensors.numpy import load_file
  base, adapter = tiny[kind]
  base_gguf, merged_gguf, lora_gguf = (str(tmp_path / f) for f in ("base.gguf", "merged.gguf", "lora.gguf"))
  export("--model", base, "--out", base_gguf, "--type", "f32")
  export("--model", base, "--lora", adapter, "--out", merged_gguf, "--type", "f32")
  export("--model", base, "--lora", adapter, "--out", lora_gguf, "--adapter_only", "--type", "f32")
  r = gguf.GGUFReader(lora_gguf)
  value = lambda k: r.fields[k].contents()
  assert (value("general.architecture"), value("general.type"), value("adapter.type"), value("adapter.lora.alpha")) == \
         ({"llama": "llama", "gemma3": "gemma3"}[kind], "adapter", "lora", 16.0)
  lora = {t.name: np.array(t.data) for t in r.tensors}
  with open(os.path.join(base, "config.json")) as f: cfg = json.load(f)
  peft_w = load_file(os.path.join(adapter, "adapter_model.safetensors"))
  layer_names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
  def llama_cpp_rows(w, heads):   # llama.cpp's converter: each head's rows as (half, 2) -> (2, half) interleaved
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
  expected = set()
  for layer in range(cfg["num_hidden_layers"]):
    for hf, g in layer_names.items():
      a = peft_w[f"base_model.model.model.layers.{layer}.{hf}.lora_A.weight"]
      b = peft_w[f"base_model.model.model.layers.{layer}.{hf}.lora_B.weight"]
      if kind == "llama" and g in ("attn_q", "attn_k"):
        b = llama_cpp_rows(b, cfg["num_attention_heads"] if g == "attn_q" else cfg["num_key_value_heads"])
      name = f"blk.{layer}.{g}.weight"
      np.testing.assert_array_equal(lora[name + ".lora_a"], a)
      np.testing.assert_array_equal(lora[name + ".lora_b"], b)
      expected |= {name + ".lora_a", name + ".lora_b"}
  assert set(lora) == expected
  base_t = {t.name: np.array(t.data) for t in gguf.GGUFReader(base_gguf).tensors}
  merged_t = {t.name: np.array(t.data) for t in gguf.GGUFReader(merged_gguf).tensors}
  for name in (n[:-len(".lora_a")] for n in lora if n.endswith(".lora_a")):
    a, b = lora[name + ".lora_a"], lora[name + ".lora_b"]
    np.testing.assert_allclose(base_t[name] + 16.0 / a.shape[0] * (b @ a), merged_t[name], atol=1e-6, rtol=0)


def test_adapter_gguf_folds_other_scales(tiny, tmp_path):
  """llama.cpp scales every module by alpha / r: an rsLoRA adapter (alpha / sqrt(r)) still gives
  the merged weights, its factor folded into lora_b."""
  import gguf, shutil
  base, adapter = tiny["qwen2"]
  rs = str(tmp_path / "rslora")
  shutil.copytree(adapter, rs)
  with open(os.path.join(rs, "adapter_config.json")) as f: cfg = json.load(f)
  with open(os.path.join(rs, "adapter_config.json"), "w") as f: json.dump(dict(cfg, use_rslora=True), f)
  for args in (("--out", tmp_path / "base.gguf"), ("--lora", rs, "--out", tmp_path / "merged.gguf"),
               ("--lora", rs, "--out", tmp_path / "lora.gguf", "--adapter_only")):
    export("--model", base, "--type", "f32", *args)
  tensors = lambda f: {t.name: np.array(t.data) for t in gguf.GGUFReader(str(tmp_path / f)).tensors}
  base_t, merged_t, lora = tensors("base.gguf"), tensors("merged.gguf"), tensors("lora.gguf")
  name = "blk.1.attn_v.weight"
  a, b = lora[name + ".lora_a"], lora[name + ".lora_b"]
  assert not np.allclose(base_t[name] + 16.0 / 4 * (b / 2) @ a, merged_t[name], atol=1e-6)   # B as saved would be off by sqrt(4)
  np.testing.assert_allclose(base_t[name] + 16.0 / 4 * (b @ a), merged_t[name], atol=1e-6, rtol=0)
  # and the merged weights are what peft makes of the rsLoRA adapter
  ids = hf_tokenizer_ids(base)
  np.testing.assert_allclose(transformers_logits(str(tmp_path / "merged.gguf"), ids), peft_logits(base, rs, ids), atol=1e-4, rtol=0)


# ---- llama.cpp itself

def need_llama_cpp():
  """Skips where xllamacpp (a prebuilt llama.cpp, in the test extra) is not installed; fails in CI."""
  if importlib.util.find_spec("xllamacpp") is None:
    if os.environ.get("CI"): pytest.fail("xllamacpp is missing in CI: pip install -e '.[test]'")
    pytest.skip("pip install xllamacpp (a prebuilt llama.cpp) to check exports against llama.cpp itself")


def llama_cpp_next_token(path, prompt, pick, lora=None, k=10):
  """{token id: log-probability} of llama.cpp's k most likely tokens after `prompt` (token ids, or
  text that llama.cpp tokenizes itself, adding BOS as the file says), on llama.cpp's CPU backend.
  The log-probabilities are the model's; llama.cpp is made to sample `pick`, a token of whole
  characters (its server leaves the log-probabilities out when it samples a partial UTF-8 byte)."""
  import xllamacpp as xlc
  params = xlc.CommonParams()
  params.model.path = path
  params.n_ctx, params.n_parallel, params.warmup, params.verbosity = 128, 1, False, -1   # (-1: no log lines on stdout)
  params.cpuparams.n_threads = params.cpuparams_batch.n_threads = 1
  params.cache_type_k = params.cache_type_v = xlc.ggml_type.GGML_TYPE_F32   # (the default f16 cache rounds keys and values)
  if lora:
    info = xlc.CommonAdapterLoraInfo()
    info.path, info.scale = lora, 1.0
    params.lora_adapters = [info]
  server = xlc.Server(params)
  try:
    reply = server.handle_completions({"prompt": prompt, "max_tokens": 1, "logprobs": k, "temperature": 0, "post_sampling_probs": False,
                                       "logit_bias": [[int(pick), 100]]})
  finally:
    del server
  assert "error" not in reply, reply
  return {t["id"]: t["logprob"] for t in reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]}


def vocab_id(folder, token):
  import transformers
  return transformers.AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids(token)


def log_softmax(x):
  x = x.astype(np.float64)
  return x - x.max() - np.log(np.exp(x - x.max()).sum())


def assert_top_logprobs(got, want_logits, atol):
  """got (llama.cpp's k best {id: log-prob}) are the k best of want_logits, each within atol (near
  ties may come in another order)."""
  want = log_softmax(want_logits)
  for i, lp in got.items(): assert abs(lp - want[i]) < atol, (i, lp, want[i])
  rest = np.delete(want, list(got))
  assert rest.max() < min(got.values()) + atol, "a token llama.cpp ranks below its top k is more likely here"


@pytest.mark.parametrize("qtype", ["f32", "q8_0"])
@pytest.mark.parametrize("kind", KINDS)
def test_gguf_runs_in_llama_cpp(tiny, gguf_exports, kind, qtype):
  """llama.cpp loads the exported file (architecture metadata, tensor names and layouts, the
  vocabulary) and predicts the next token as the merged model does; given the text instead of
  the ids, its own tokenizer built from the metadata gives the same prediction."""
  need_llama_cpp()
  base, adapter = tiny[kind]
  path = gguf_exports(kind, qtype)
  ids = hf_tokenizer_ids(base)
  ref_model, _ = merged_reference(base, adapter, qtype)
  # llama.cpp computes with its own kernels (q8_0: activations quantized to 8 bits for the dot products)
  e = vocab_id(base, "e")
  got = llama_cpp_next_token(path, ids, e)
  assert_top_logprobs(got, minift_logits(ref_model, ids)[-1], atol=1e-3 if qtype == "f32" else 2e-2)
  assert llama_cpp_next_token(path, TEXT, e) == got


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_adapter_gguf_runs_in_llama_cpp(tiny, tmp_path, kind):
  """llama.cpp applies the --adapter_only GGUF to the base GGUF: the merged model's prediction."""
  need_llama_cpp()
  base, adapter = tiny[kind]
  base_gguf, lora_gguf = str(tmp_path / "base.gguf"), str(tmp_path / "lora.gguf")
  export("--model", base, "--out", base_gguf, "--type", "f32")
  export("--model", base, "--lora", adapter, "--out", lora_gguf, "--adapter_only", "--type", "f32")
  ids = hf_tokenizer_ids(base)
  want = peft_logits(base, adapter, ids)[-1]
  e = vocab_id(base, "e")
  assert_top_logprobs(llama_cpp_next_token(base_gguf, ids, e, lora=lora_gguf), want, atol=1e-3)
  assert llama_cpp_next_token(base_gguf, ids, e) != llama_cpp_next_token(base_gguf, ids, e, lora=lora_gguf)


# ---- bad input, and files that must survive it

def test_errors_name_the_flag(tiny, tmp_path):
  base, adapter = tiny["llama"]
  other_width = save_tiny("llama", tmp_path / "narrow")   # hidden 32, not 64
  msg = exit_message("--model", other_width, "--lora", adapter, "--out", tmp_path / "x.gguf")
  assert msg.startswith(f"error: --lora {adapter}: the adapter was made for another base model") and "\n" not in msg
  msg = exit_message("--model", base, "--lora", tiny["gpt2"][1], "--out", tmp_path / "x.gguf")
  assert msg.startswith(f"error: --lora {tiny['gpt2'][1]}: the adapter was made for another base model (gpt2, ") and "\n" not in msg
  msg = exit_message("--model", base, "--lora", tmp_path / "nothing", "--out", tmp_path / "x.gguf")
  assert msg.startswith("error: --lora") and "not a folder" in msg
  msg = exit_message("--model", base, "--lora", tmp_path, "--out", tmp_path / "x.gguf")
  assert msg == f"error: --lora {tmp_path}: missing adapter_config.json (expected a PEFT LoRA adapter folder)"
  msg = exit_message("--model", tmp_path / "missing", "--out", tmp_path / "x.gguf")
  assert msg.startswith(f"error: model path {tmp_path / 'missing'} does not exist")
  msg = exit_message("--model", save_tiny("gpt2", tmp_path / "chars"), "--out", tmp_path / "x.gguf")   # a character-level WordLevel tokenizer
  assert msg.startswith("error: cannot write --model") and "WordLevel" in msg
  assert not os.path.exists(tmp_path / "x.gguf")
  assert exit_message("--model", base, "--out", base) .startswith(f"error: --out {base} is the --model")


def test_usage_errors(tiny, tmp_path, capsys):
  base, adapter = tiny["llama"]
  for argv, text in [(["--type", "q4_0", "--out", tmp_path / "x.gguf"], "--type 'q4_0' is not one of f32, f16, q8_0"),
                     (["--type", "f16", "--out", tmp_path / "folder"], "--type is for GGUF files"),
                     (["--adapter_only", "--out", tmp_path / "x.gguf"], "--adapter_only needs --lora"),
                     (["--adapter_only", "--lora", adapter, "--out", tmp_path / "folder"], "must end in .gguf")]:
    assert exit_message("--model", base, *argv) == "2"
    assert text in capsys.readouterr().err


def test_out_that_is_not_an_export_is_kept(tiny, tmp_path):
  """An --out that holds something else is refused and left as it was."""
  base, adapter = tiny["llama"]
  notes = tmp_path / "notes.gguf"
  notes.write_text("my notes")
  assert "is not a GGUF file; refusing" in exit_message("--model", base, "--out", notes)
  assert notes.read_text() == "my notes"
  folder = tmp_path / "thesis"
  folder.mkdir()
  (folder / "chapter1.txt").write_text("text")
  assert "folder of other files" in exit_message("--model", base, "--lora", adapter, "--out", folder)
  assert os.listdir(folder) == ["chapter1.txt"]
  (tmp_path / "old.gguf").mkdir()
  assert "is a folder, not a .gguf file" in exit_message("--model", base, "--out", tmp_path / "old.gguf")
  assert "exists and is a file" in exit_message("--model", base, "--out", tmp_path / "thesis" / "chapter1.txt")
  assert (folder / "chapter1.txt").read_text() == "text"


def test_unsupported_config_is_refused(tmp_path):
  """A configuration llama.cpp would run differently is refused before anything is written."""
  import models
  from minift.export import save_gguf
  base = save_tiny_bpe("gemma3", tmp_path / "g")
  model, tok = models.load(base)
  model.config.final_logit_softcapping = 30.0
  with pytest.raises(ValueError, match="final logit soft-capping"): save_gguf(model, str(tmp_path / "g.gguf"), tok)
  model.config.final_logit_softcapping = None
  model.config.layer_types = ["full_attention"] * 6
  with pytest.raises(ValueError, match="layer pattern"): save_gguf(model, str(tmp_path / "g.gguf"), tok)
  assert not os.path.exists(tmp_path / "g.gguf")


def test_failed_export_keeps_the_old_file(tiny, tmp_path, monkeypatch):
  """A GGUF export that fails midway leaves the previous file whole, and no temporary file."""
  import gguf
  base, adapter = tiny["llama"]
  out = tmp_path / "model.gguf"
  export("--model", base, "--out", out, "--type", "f32")
  before = out.read_bytes()
  real, calls = gguf.quants.quantize, []
  def failing(arr, qtype):
    calls.append(1)
    if len(calls) == 5: raise OSError(28, "No space left on device")
    return real(arr, qtype)
  monkeypatch.setattr(gguf.quants, "quantize", failing)
  with pytest.raises(OSError, match="No space left"): export("--model", base, "--lora", adapter, "--out", out, "--type", "f32")
  assert out.read_bytes() == before and os.listdir(tmp_path) == ["model.gguf"]


def test_cli_prints_one_error_line(tiny, tmp_path):
  base, _ = tiny["llama"]
  r = subprocess.run([sys.executable, EXPORT, "--model", base, "--lora", tiny["gpt2"][1], "--out", str(tmp_path / "x.gguf")],
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 1 and r.stderr.startswith("error: --lora") and r.stderr.count("\n") == 1, r.stderr
