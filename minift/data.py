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
import glob, hashlib, json, os
import numpy as np
from minift.checkpoint import atomic_file

IGNORE = -100
TEXT_EXTENSIONS = (".txt", ".md", ".raw", ".text")


class DataError(ValueError):
  """Bad training data: the message names the file and what was expected."""


def _read_text(path, errors):
  with open(path, "rb") as f: raw = f.read()
  try:
    return raw.decode("utf-8", errors=errors)
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not UTF-8 text (bad byte 0x{raw[e.start]:02x} at offset {e.start}); "
                    f"convert it to UTF-8, or pass --data_errors replace to substitute U+FFFD") from None


def _read_jsonl(path, errors):
  examples = []
  for n, line in enumerate(_read_text(path, errors).splitlines(), 1):
    if not line.strip(): continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict) or not ({"text"} <= obj.keys() or {"prompt", "completion"} <= obj.keys() or "messages" in obj):
      raise DataError(f'{path}:{n}: expected an object with "text", "prompt" and "completion", or "messages"')
    examples.append(obj)
  return examples


def _examples_of(path, errors):
  if path.endswith(".jsonl"): return _read_jsonl(path, errors)
  return [{"text": _read_text(path, errors)}]


def load_splits(path, errors="strict"):
  """{'train': [examples], 'valid': [examples] or None} from a file or folder (see module doc)."""
  if not os.path.exists(path): raise DataError(f"--data {path}: no such file or folder")
  if os.path.isdir(path):
    wiki = {s: os.path.join(path, f"wiki.{s}.raw") for s in ("train", "valid")}
    if os.path.exists(wiki["train"]):
      return {"train": _examples_of(wiki["train"], errors),
              "valid": _examples_of(wiki["valid"], errors) if os.path.exists(wiki["valid"]) else None}
    files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                   if os.path.isfile(f) and f.endswith(TEXT_EXTENSIONS + (".jsonl",)))
    if not files: raise DataError(f"--data {path}: no {', '.join(TEXT_EXTENSIONS)} or .jsonl files in this folder")
    examples = [e for f in files for e in _examples_of(f, errors)]
  else:
    examples = _examples_of(path, errors)
  if not any(_has_text(e) for e in examples): raise DataError(f"--data {path}: contains no text")
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


def tokenize_cached(examples, tokenizer, cache_dir=None):
  """tokenize(), stored in cache_dir keyed by the text and the tokenizer, so a second run (or
  a resumed one) reads the ids instead of tokenizing again."""
  if cache_dir is None: return tokenize(examples, tokenizer)
  os.makedirs(cache_dir, exist_ok=True)
  path = os.path.join(cache_dir, f"tokens-{_cache_key(examples, tokenizer)}.npz")
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

  def __init__(self, path, tokenizer, seq_len, val_fraction=0.05, cache_dir=None, errors="strict", seed=0):
    if seq_len < 1: raise DataError(f"--seq_len must be at least 1, got {seq_len}")
    splits = load_splits(path, errors)
    ids, mask = tokenize_cached(splits["train"], tokenizer, cache_dir)
    x, y = pack(ids, mask, seq_len)
    if splits["valid"] is not None:
      vx, vy = pack(*tokenize_cached(splits["valid"], tokenizer, cache_dir), seq_len)
    else:   # hold out the last blocks (before any shuffling, so the split never moves)
      n_val = int(round(len(x) * val_fraction)) if len(x) > 1 else 0
      n_val = max(n_val, 1) if val_fraction > 0 and len(x) > 1 else n_val
      x, y, vx, vy = x[:len(x) - n_val], y[:len(y) - n_val], x[len(x) - n_val:], y[len(y) - n_val:]
    if len(x) == 0:
      raise DataError(f"--data {path}: {len(ids)} tokens make no training block of --seq_len {seq_len} + 1; use more text or a shorter --seq_len")
    if not (y != IGNORE).any(): raise DataError(f"--data {path}: no target token carries loss (all masked)")
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
