"""Token-by-token generation with a KV cache: greedy, or sampling with temperature, top-k, top-p."""
import numpy as np
from minift import Tensor, no_grad, jit
from minift.nn import StaticKVCache


def pick_token(logits, temperature=0.0, top_k=None, top_p=None, rng=None):
  """The next token id from one row of logits (vocab,): argmax when temperature is 0, else a
  sample from softmax(logits / temperature) restricted to the top_k tokens and to the smallest
  set whose probability reaches top_p."""
  if not temperature: return int(np.argmax(logits))
  z = logits.astype(np.float64) / temperature
  if top_k: z[z < np.sort(z)[-min(top_k, z.size)]] = -np.inf
  p = np.exp(z - z.max())
  p /= p.sum()
  if top_p is not None and top_p < 1.0:
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]          # probability of the tokens ranked above each one
    p[order[before >= top_p]] = 0.0                  # the best token always stays
    p /= p.sum()
  rng = rng if rng is not None else np.random.default_rng()
  return int(rng.choice(p.size, p=p))


class StaticDecoder:
  """Next-token logits for growing sequences (a batch of B rows), with a StaticKVCache of
  `capacity` slots: prefill() runs the prompt the normal way, then each step() feeds one token per
  row through a one-token forward whose shapes never change (the position is data), so minift.jit
  records the first step and replays its kernels from the second on, without building or
  scheduling a graph."""

  def __init__(self, model, capacity):
    if capacity > model.max_context:
      raise ValueError(f"StaticDecoder: capacity {capacity} is above the model's context of {model.max_context} tokens")
    self.model, self.cache = model, StaticKVCache(capacity)
    self._step = jit(self._last_logits, warmup=0)   # prefill made the cache's buffers: record the first step

  def _last_logits(self, ids, positions):
    return self.model.logits(self.model.hidden(ids, self.cache, positions)[:, -1])   # (B, vocab): the last position only

  def prefill(self, ids):
    """Logits (B, vocab) as a NumPy array after the prompts `ids` (B, T)."""
    with no_grad():
      logits = self._last_logits(Tensor(np.asarray(ids, dtype=np.int64)), None)       # positions: the next T slots
      Tensor.realize_all(logits, *self.cache.tensors())
    return logits.numpy()

  def step(self, tokens):
    """Logits (B, vocab) as a NumPy array after one more token per row (B,)."""
    pos = self.cache.length
    if pos >= self.cache.capacity: raise ValueError(f"StaticDecoder: all {self.cache.capacity} slots of the cache are used")
    ids = Tensor(np.asarray(tokens, dtype=np.int64).reshape(-1, 1))                   # (B, 1)
    with no_grad(): logits = self._step(ids, Tensor(np.array([pos], dtype=np.int64)))   # positions (1,): data, never a shape
    self.cache.length = pos + 1          # a replayed step runs no model code, so no advance(): count the token here
    return logits.numpy()


def generate(model, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=None, eos_token_ids=()):
  """Yield up to max_new_tokens new token ids for a prompt (a list of ids), stopping after an EOS
  or when the model's context is full. The prompt runs once; each later step feeds one token to a
  StaticDecoder (a preallocated cache, a jit-replayed step)."""
  if not prompt_ids: raise ValueError("generate: the prompt has no tokens")
  if len(prompt_ids) > model.max_context:
    raise ValueError(f"generate: the prompt has {len(prompt_ids)} tokens, more than the model's context of {model.max_context}")
  if max_new_tokens <= 0: return
  rng = np.random.default_rng(seed)
  # the prompt, then every new token but the last (it is never fed back)
  decoder = StaticDecoder(model, min(len(prompt_ids) + max_new_tokens - 1, model.max_context))
  logits = decoder.prefill([prompt_ids])
  for n in range(max_new_tokens):
    tok = pick_token(logits[0], temperature, top_k, top_p, rng)
    yield tok
    if tok in eos_token_ids or n + 1 == max_new_tokens or decoder.cache.length == decoder.cache.capacity: return
    logits = decoder.step([tok])
