"""Text tokenizers: a `tokenizers.Tokenizer` plus what generation and evaluation need to know
about it (BOS/EOS ids, whether it adds BOS, the chat template).

Made from a Hugging Face folder (tokenizer.json, or vocab.json + merges.txt) by io_hf, or from a
GGUF file's metadata by io_gguf.
"""
import json, os
import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, processors
from minift.errors import FileError, MissingFile, read_json


class TextTokenizer:
  def __init__(self, backend, bos_token_id=None, eos_token_ids=(), chat_template=None, bos_token=None, eos_token=None):
    self.backend = backend                         # a tokenizers.Tokenizer
    self.bos_token_id, self.eos_token_ids = bos_token_id, tuple(i for i in eos_token_ids if i is not None)
    self.chat_template, self.bos_token, self.eos_token = chat_template, bos_token, eos_token
    # set by models.load: the rows of the model's embedding table and where the model came from
    self.model_vocab, self.model_path = None, None

  @property
  def vocab_size(self): return self.backend.get_vocab_size(with_added_tokens=True)

  @property
  def adds_bos(self):
    """True when encoding with special tokens puts BOS in front (Llama 2, Gemma; not GPT-2, SmolLM2)."""
    ids = self.backend.encode("a", add_special_tokens=True).ids
    return self.bos_token_id is not None and len(ids) > 0 and ids[0] == self.bos_token_id and \
      self.backend.encode("a", add_special_tokens=False).ids[:1] != [self.bos_token_id]

  def encode(self, text, add_special_tokens=True):
    ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
    check_ids(ids, self, "the text")
    return ids

  def decode(self, ids, skip_special_tokens=True):
    return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages, add_generation_prompt=True):
    """The prompt text for a list of {'role', 'content'} messages, by the model's Jinja template."""
    if not self.chat_template: raise ValueError("this tokenizer has no chat template (tokenizer_config.json / GGUF metadata)")
    import jinja2
    def raise_exception(msg): raise jinja2.exceptions.TemplateError(msg)
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, indent=indent, ensure_ascii=False)
    return env.from_string(self.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                      bos_token=self.bos_token or "", eos_token=self.eos_token or "")


def check_ids(ids, tokenizer, where):
  """FileError unless every token id fits the embedding table of the model the tokenizer came
  with (tokenizer.model_vocab, when models.load set it): with a tokenizer that does not match
  the weights, the first forward pass would otherwise fail deep inside a gather. `where`
  names the text the ids came from."""
  limit = getattr(tokenizer, "model_vocab", None)
  if limit is None or not len(ids): return
  top = int(max(ids) if isinstance(ids, list) else np.max(ids))
  if top >= limit:
    raise FileError(f"{tokenizer.model_path}: its tokenizer turns {where} into token id {top}, but the model's embedding table has "
                    f"{limit} rows: the tokenizer and the weights do not belong together")


def _token_str(tok):
  if tok is None or isinstance(tok, str): return tok
  return tok.get("content")   # {"content": "<s>", ...} in older tokenizer_config.json files


def load_hf_tokenizer(folder, config=None):
  """The tokenizer of an HF model folder: tokenizer.json, else vocab.json + merges.txt (byte-level
  BPE, GPT-2 style). Special tokens and the chat template come from tokenizer_config.json."""
  config = config or {}
  path = lambda name: os.path.join(folder, name)
  if os.path.exists(path("tokenizer.json")): source = path("tokenizer.json")
  elif os.path.exists(path("vocab.json")) and os.path.exists(path("merges.txt")): source = f"{path('vocab.json')} and merges.txt"
  else: raise MissingFile(f"{folder}: no tokenizer (expected tokenizer.json, or vocab.json and merges.txt)")
  try:   # the tokenizers library says what is wrong (bad JSON, an unknown model) but not in which file
    if source.endswith("tokenizer.json"):
      backend = Tokenizer.from_file(source)
    else:
      backend = Tokenizer(models.BPE.from_file(path("vocab.json"), path("merges.txt")))
      backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
      backend.decoder = decoders.ByteLevel()
      backend.post_processor = processors.ByteLevel(trim_offsets=False)
  except Exception as e:
    raise FileError(f"{source}: not a tokenizer the tokenizers library can read ({e})") from None
  tcfg = read_json(path("tokenizer_config.json"), "a tokenizer config") if os.path.exists(path("tokenizer_config.json")) else {}
  if not isinstance(tcfg, dict): raise FileError(f"{path('tokenizer_config.json')}: expected a JSON object")
  template = tcfg.get("chat_template")
  if template is None and os.path.exists(path("chat_template.jinja")):
    with open(path("chat_template.jinja"), encoding="utf-8") as f: template = f.read()
  if isinstance(template, list): template = next((t["template"] for t in template if t.get("name") == "default"), None)
  bos, eos = _token_str(tcfg.get("bos_token")), _token_str(tcfg.get("eos_token"))
  bos_id = backend.token_to_id(bos) if bos else config.get("bos_token_id")
  eos_ids = _ids(config.get("eos_token_id"))
  gen = path("generation_config.json")
  if os.path.exists(gen): eos_ids += _ids(read_json(gen, "a generation config").get("eos_token_id"))
  if eos and backend.token_to_id(eos) is not None: eos_ids.append(backend.token_to_id(eos))
  bos = bos or (backend.id_to_token(bos_id) if bos_id is not None else None)
  return TextTokenizer(backend, bos_id, dict.fromkeys(eos_ids), template, bos, eos)


def _ids(x):
  if x is None: return []
  return list(x) if isinstance(x, (list, tuple)) else [x]
