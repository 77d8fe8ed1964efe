"""Model architectures, one file each, and the registry that picks one for a checkpoint.

    from models import load
    model, tokenizer = load("path/to/hf_folder")      # or "model.gguf"
    model, tokenizer = load("HuggingFaceTB/SmolLM2-135M-Instruct")   # a Hugging Face Hub repo id

Each model file (gpt2.py, llama.py, gemma3.py) holds one architecture read top to bottom; what
they share (the output head, hidden -> logits, the forward with or without a KV cache) is
base.py's CausalLM. The registry maps Hugging Face's config.json `model_type` and GGUF's
`general.architecture` to the class that implements it. resolve() turns what a user names (a
local path, or a Hub repo id and optionally a GGUF file in it) into a local path: every tool's
--model goes through it. generation.py decodes token by token, evaluate.py scores text.
"""
import glob, os, re
from minift.errors import FileError, MissingFile
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
    raise FileError(f"unknown architecture {model_type!r} in {where}{extra}; supported: {', '.join(sorted(registry))}")
  return registry[model_type]


# ---- what --model names: a local path, or a Hugging Face Hub repo id

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")   # org/name, as the Hub spells them
# the files of a Hub repo an HF model folder needs (not its ONNX exports, GGUFs or other weights)
HUB_FILES = ["*.json", "*.safetensors", "merges.txt", "*.jinja"]


class ModelNotFound(MissingFile):
  """--model names no local file or folder and no Hub repo (or GGUF in one) that can be had."""


def is_hub_id(name):
  """True for an org/name string that is not a local path: a path that exists here always wins."""
  return not os.path.exists(name) and bool(HUB_ID.fullmatch(name)) and "--" not in name and ".." not in name


def resolve(name, gguf_file=None):
  """The local path of the model `name` names. A path that exists here is used as it is (with
  gguf_file: that file inside the folder). Otherwise name is a Hugging Face Hub repo id (org/name),
  taken from the local Hugging Face cache when it is there (and only from there with
  HF_HUB_OFFLINE=1), else downloaded: the repo's HF model folder files, or with gguf_file that
  GGUF file of the repo. huggingface_hub is imported only for a Hub id."""
  if os.path.exists(name):
    path = name
    if gguf_file:
      if not os.path.isdir(name): raise ModelNotFound(f"--gguf_file picks a file inside a folder or Hub repo, but --model {name} is a file")
      path = os.path.join(name, gguf_file)
      if not os.path.isfile(path): raise ModelNotFound(f"--gguf_file {gguf_file}: no such file in {name}{_gguf_list(name)}")
  elif is_hub_id(name):
    path = _from_hub(name, gguf_file)
  else:
    raise ModelNotFound(f"model path {name} does not exist (a Hugging Face Hub id is written org/name, e.g. HuggingFaceTB/SmolLM2-135M-Instruct)")
  if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")) and _gguf_list(path):
    raise ModelNotFound(f"--model {name} has no config.json (not an HF model folder){_gguf_list(path)}: pick one with --gguf_file NAME")
  return path


def _gguf_list(folder):
  found = sorted(os.path.relpath(p, folder) for p in glob.glob(os.path.join(folder, "**", "*.gguf"), recursive=True))
  return f"; its GGUF files: {', '.join(found)}" if found else ""


def _from_hub(repo_id, gguf_file):
  """The local path of a Hub repo's HF model files (a snapshot folder) or of one GGUF in it."""
  what = f"--model {repo_id}" + (f" --gguf_file {gguf_file}" if gguf_file else "")
  try:
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
  except ImportError:
    raise ModelNotFound(f"{what}: not a local path; a Hugging Face Hub repo id needs huggingface_hub: pip install 'minift[hub]'") from None

  def fetch(local_only):
    if gguf_file: return huggingface_hub.hf_hub_download(repo_id, gguf_file, local_files_only=local_only)
    return huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=local_only)

  try:   # the cache first: a model fetched before needs no network (a phone offline)
    cached = fetch(local_only=True)
  except LocalEntryNotFoundError:
    cached = None
  # a snapshot that holds only a GGUF fetched earlier lacks the folder's files: download them
  if cached and (gguf_file or os.path.exists(os.path.join(cached, "config.json"))): return cached
  if huggingface_hub.constants.HF_HUB_OFFLINE:
    if cached: return cached
    raise ModelNotFound(f"{what}: not a local path, and not in the Hugging Face cache ({huggingface_hub.constants.HF_HUB_CACHE}) "
                        "while HF_HUB_OFFLINE=1 forbids downloading it")
  try:
    return fetch(local_only=False)
  except RepositoryNotFoundError:   # gated repos too
    why = "the Hugging Face Hub has no such repo (or it is private or gated: log in with `hf auth login` or set HF_TOKEN)"
  except LocalEntryNotFoundError as e:   # the Hub did not answer, or not as expected
    why = f"the Hugging Face Hub cannot be reached ({str(e).splitlines()[0]})"
  except EntryNotFoundError:
    why = f"the repo has no file {gguf_file}"
  except HfHubHTTPError as e:
    why = f"the Hugging Face Hub answered: {str(e).splitlines()[0]}"
  raise ModelNotFound(f"{what}: not a local path, and {why}")


def load(path, dtype=None, with_tokenizer=True, gguf_file=None):
  """(model, tokenizer) from an HF model folder, a .gguf file or a Hub repo id (see resolve;
  gguf_file picks a GGUF inside a folder or repo). dtype is how the frozen weights are stored
  (minift/quant.py): None or 'float32'; 'float16' keeps weight matrices in float16; 'keep' keeps
  a GGUF's quantized blocks (and F16) as the file stores them; 'q8_0' or 'q4_0' quantizes the
  matmul weights on load. Computation stays float32. Files that are missing, corrupt, of an
  unknown architecture or hold non-finite weights are errors (minift.errors.MissingFile,
  FileError) that name the file and tensor."""
  path = resolve(path, gguf_file)
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


__all__ = ["CausalLM", "GPT2", "GPT2Config", "Llama", "LlamaConfig", "Gemma3", "Gemma3Config", "HF_MODEL_TYPES",
           "GGUF_ARCHITECTURES", "model_class", "build", "load", "skeleton", "inspect", "resolve", "is_hub_id", "ModelNotFound"]
