"""Training data: read text, tokenize it once (cached on disk), pack it into fixed-length blocks.

Sources (`load_splits`):
  * a text file (any extension but .jsonl), or a folder of .txt/.md/.raw/.text/.jsonl files;
  * the WikiText-2 raw layout: a folder with wiki.train.raw and wiki.valid.raw;
  * JSONL, one example per line: {"text"} (loss on every token), {"prompt", "completion"}
    (loss on the completion only), or {"messages": [{"role", "content"}, ...]} (rendered with the
    tokenizer's chat template; loss on assistant turns only).

Every example becomes token ids plus a loss mask; examples are joined (EOS between documents
when the tokenizer has one) and cut into blocks of seq_len + 1 tokens: inputs are the first
seq_len, targets the last seq_len, and targets whose mask is 0 are IGNORE (-100).
"""
import hashlib, json, os
import numpy as np
from minift.checkpoint import atomic_file
from minift.errors import FileError
from minift.tokenizer import check_ids

IGNORE = -100
TEXT_EXTENSIONS = (".txt", ".md", ".raw", ".text")


class DataError(FileError):
  """Bad training data: the message names the file (and line) and what was expected."""


def read_text(path, errors="strict", hint="pass --data_errors replace to substitute U+FFFD"):
  """The UTF-8 text of a file; DataError naming the file and the first bad byte (with `hint`,
  how to get past it) when it is not UTF-8."""
  try:
    with open(path, "rb") as f: raw = f.read()
  except FileNotFoundError:
    raise DataError(f"{path}: no such file") from None
  except IsADirectoryError:
    raise DataError(f"{path}: a folder, expected a text file") from None
  try:
    return raw.decode("utf-8", errors=errors)
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not UTF-8 text (bad byte 0x{raw[e.start]:02x} at offset {e.start}); "
                    f"convert it to UTF-8{f', or {hint}' if hint else ''}") from None


def check_example(obj, where):
  """DataError naming `where` (file:line) unless obj is one of the JSONL example shapes with
  fields of the right types."""
  if not isinstance(obj, dict) or not ({"text"} <= obj.keys() or {"prompt", "completion"} <= obj.keys() or "messages" in obj):
    raise DataError(f'{where}: expected an object with "text", "prompt" and "completion", or "messages"')
  for key in ("text",) if "text" in obj else ("prompt", "completion") if "prompt" in obj else ():
    if not isinstance(obj[key], str): raise DataError(f'{where}: "{key}" must be a string, got {type(obj[key]).__name__}')
  if "text" in obj or "prompt" in obj: return
  messages = obj["messages"]
  if not isinstance(messages, list): raise DataError(f'{where}: "messages" must be a list of {{"role", "content"}} objects, got {type(messages).__name__}')
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
      raise DataError(f'{where}: message {i} must be an object with a string "role" and a string "content", got {json.dumps(m)[:80]}')


def _read_jsonl(path, errors):
  examples = []
  for n, line in enumerate(read_text(path, errors).splitlines(), 1):
    if not line.strip(): continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    check_example(obj, f"{path}:{n}")
    examples.append(obj)
  return examples


def _examples_of(path, errors):
  if path.endswith(".jsonl"): return _read_jsonl(path, errors)
  return [{"text": read_text(path, errors)}]


def data_files(folder, exclude=()):
  """The text and JSONL files under folder, sorted. Symbolic links are followed, but every real
  folder is walked once and every real file listed once (a link loop, or two links to one
  file, cannot repeat it); folders in `exclude` (a run's --out) and hidden ones are left out."""
  skip = {os.path.realpath(e) for e in exclude}
  seen_dirs, seen_files, found = set(), set(), []
  def walk(d):
    real = os.path.realpath(d)
    if real in seen_dirs or real in skip: return
    seen_dirs.add(real)
    with os.scandir(d) as entries:
      for e in sorted(entries, key=lambda e: e.name):
        if e.name.startswith("."): continue
        if e.is_dir(): walk(e.path)
        elif e.is_file() and e.name.endswith(TEXT_EXTENSIONS + (".jsonl",)) and os.path.realpath(e.path) not in seen_files:
          seen_files.add(os.path.realpath(e.path))
          found.append(e.path)
  walk(folder)
  return sorted(found)


def load_splits(path, errors="strict", exclude=(), flag="--data"):
  """{'train': [examples], 'valid': [examples] or None} from a file or folder (see module doc);
  exclude: folders under path never read (the run's own --out); flag: what errors call path."""
  if not os.path.exists(path): raise DataError(f"{flag} {path}: no such file or folder")
  if os.path.isdir(path):
    wiki = {s: os.path.join(path, f"wiki.{s}.raw") for s in ("train", "valid")}
    if os.path.exists(wiki["train"]):
      return {"train": _examples_of(wiki["train"], errors),
              "valid": _examples_of(wiki["valid"], errors) if os.path.exists(wiki["valid"]) else None}
    files = data_files(path, exclude)
    if not files: raise DataError(f"{flag} {path}: no {', '.join(TEXT_EXTENSIONS)} or .jsonl files in this folder")
    examples = [e for f in files for e in _examples_of(f, errors)]
  else:
    examples = _examples_of(path, errors)
  if not any(_has_text(e) for e in examples): raise DataError(f"{flag} {path}: contains no text")
  return {"train": examples, "valid": None}


def _has_text(e):
  if "text" in e: return bool(str(e["text"]).strip())
  if "messages" in e: return any(str(m.get("content", "")).strip() for m in e["messages"])
  return bool(str(e.get("completion", "")).strip())


def tokenize_example(example, tokenizer):
  """(ids, mask) for one example; mask is 1 where the loss counts."""
  if "text" in example:
    ids = tokenizer.encode(str(example["text"]), add_special_tokens=False)
    return ids, [1] * len(ids)
  if "prompt" in example:
    p = tokenizer.encode(str(example["prompt"]), add_special_tokens=False)
    c = tokenizer.encode(str(example["completion"]), add_special_tokens=False)
    return p + c, [0] * len(p) + [1] * len(c)
  # chat: render growing prefixes of the conversation; each new piece is one message's text
  messages, ids, mask, done = example["messages"], [], [], ""
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise DataError(f'chat message {i} needs "role" and "content", got {m!r}')
    text = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
    if not text.startswith(done): raise DataError("the chat template does not render conversations incrementally")
    if m["role"] == "assistant":
      prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
      head = prompt[len(done):] if prompt.startswith(done) else ""
      h = tokenizer.encode(head, add_special_tokens=False) if head else []
      body = tokenizer.encode(text[len(done) + len(head):], add_special_tokens=False)
      ids += h + body; mask += [0] * len(h) + [1] * len(body)
    else:
      piece = tokenizer.encode(text[len(done):], add_special_tokens=False)
      ids += piece; mask += [0] * len(piece)
    done = text
  return ids, mask


def tokenize(examples, tokenizer):
  """All examples as one stream: (ids int32, mask uint8), EOS after each document."""
  eos = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None
  ids, mask = [], []
  for e in examples:
    i, m = tokenize_example(e, tokenizer)
    if not i: continue
    ids += i; mask += m
    if eos is not None: ids.append(eos); mask.append(m[-1])
  return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8)


def _cache_key(examples, tokenizer):
  h = hashlib.sha256()
  h.update(tokenizer.backend.to_str().encode())
  h.update(json.dumps(tokenizer.chat_template or "").encode())
  h.update(json.dumps(examples, sort_keys=True, ensure_ascii=False).encode())
  return h.hexdigest()[:24]


def tokenize_cached(examples, tokenizer, cache_dir=None, key=None):
  """tokenize(), stored in cache_dir keyed by the text and the tokenizer (key: _cache_key's,
  if the caller has it), so a second run (or a resumed one) reads the ids instead of
  tokenizing again."""
  if cache_dir is None: return tokenize(examples, tokenizer)
  os.makedirs(cache_dir, exist_ok=True)
  path = os.path.join(cache_dir, f"tokens-{key or _cache_key(examples, tokenizer)}.npz")
  if os.path.exists(path):
    with np.load(path) as z: return z["ids"], z["mask"]
  ids, mask = tokenize(examples, tokenizer)
  with atomic_file(path) as f: np.savez(f, ids=ids, mask=mask)
  return ids, mask


def pack(ids, mask, seq_len):
  """(inputs, targets) int64 arrays of shape (n_blocks, seq_len); masked targets are IGNORE."""
  block = seq_len + 1
  n = len(ids) // block
  if n == 0: return np.zeros((0, seq_len), np.int64), np.zeros((0, seq_len), np.int64)
  ids, mask = ids[:n * block].reshape(n, block), mask[:n * block].reshape(n, block)
  targets = np.where(mask[:, 1:] > 0, ids[:, 1:], IGNORE)
  return ids[:, :-1].astype(np.int64), targets.astype(np.int64)


class PackedData:
  """Blocks for training and validation, and a seeded, resumable order over training blocks."""

  def __init__(self, path, tokenizer, seq_len, val_fraction=0.05, cache_dir=None, errors="strict", seed=0, exclude=(), flag="--data"):
    if seq_len < 1: raise DataError(f"--seq_len must be at least 1, got {seq_len}")
    splits = load_splits(path, errors, exclude, flag)
    keys = {s: _cache_key(splits[s], tokenizer) for s in ("train", "valid") if splits[s] is not None}
    self.data_hash = "-".join(keys.values())   # of the text and the tokenizer: a resumed run compares it to notice changed data
    ids, mask = tokenize_cached(splits["train"], tokenizer, cache_dir, keys["train"])
    check_ids(ids, tokenizer, path)
    x, y = pack(ids, mask, seq_len)
    if splits["valid"] is not None:
      vids, vmask = tokenize_cached(splits["valid"], tokenizer, cache_dir, keys["valid"])
      check_ids(vids, tokenizer, path)
      vx, vy = pack(vids, vmask, seq_len)
    else:   # hold out the last blocks (before any shuffling, so the split never moves)
      n_val = int(round(len(x) * val_fraction)) if len(x) > 1 else 0
      n_val = max(n_val, 1) if val_fraction > 0 and len(x) > 1 else n_val
      x, y, vx, vy = x[:len(x) - n_val], y[:len(y) - n_val], x[len(x) - n_val:], y[len(y) - n_val:]
    if len(x) == 0:
      raise DataError(f"{flag} {path}: {len(ids)} tokens make no training block of --seq_len {seq_len} + 1; use more text or a shorter --seq_len")
    if not (y != IGNORE).any(): raise DataError(f"{flag} {path}: no target token carries loss (all masked)")
    self.train_x, self.train_y, self.val_x, self.val_y = x, y, vx, vy
    self.seed, self.n_tokens = seed, len(ids)

  def epoch_order(self, epoch):
    """The permutation of training blocks used in `epoch` (the same for the same seed)."""
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.train_x))

  def batches(self, batch_size, epoch=0, start=0):
    """Yield (position, inputs, targets) for one epoch from batch index `start`; position is
    what a checkpoint stores to resume exactly here. The last partial batch is dropped."""
    order = self.epoch_order(epoch)
    for b in range(start, len(order) // batch_size):
      sel = order[b * batch_size:(b + 1) * batch_size]
      yield (epoch, b + 1), self.train_x[sel], self.train_y[sel]

  def batches_per_epoch(self, batch_size):
    return len(self.train_x) // batch_size
