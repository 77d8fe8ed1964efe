"""Token-by-token generation with a KV cache: greedy, or sampling with temperature, top-k, top-p."""
import numpy as np
from minift import Tensor, no_grad
from minift.nn import KVCache


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


def generate(model, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=None, eos_token_ids=()):
  """Yield up to max_new_tokens new token ids for a prompt (a list of ids), stopping after an EOS.
  The prompt runs once; each later step feeds one token and reuses the cached keys and values."""
  if not prompt_ids: raise ValueError("generate: the prompt has no tokens")
  rng = np.random.default_rng(seed)
  cache = KVCache()
  x = Tensor(np.asarray([prompt_ids], dtype=np.int64))                     # (1, T)
  with no_grad():
    for _ in range(max_new_tokens):
      if cache.length + x.shape[1] > model.max_context: break
      logits = model.logits(model.hidden(x, cache)[:, -1])                 # (1, vocab): the last position only
      Tensor.realize_all(logits, *cache.tensors())
      tok = pick_token(logits.numpy()[0], temperature, top_k, top_p, rng)
      yield tok
      if tok in eos_token_ids: return
      x = Tensor(np.asarray([[tok]], dtype=np.int64))                      # (1, 1)
