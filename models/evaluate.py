"""Scoring text with a model: summed negative log-likelihood of target tokens, and the window
layout of a perplexity evaluation.

Logits are made a chunk of rows at a time, so a 262k-token vocabulary (Gemma 3) never needs
the full (tokens, vocab) matrix at once.
"""
import numpy as np
from minift import Tensor, no_grad, jit

IGNORE = -100


def _hidden(model, ids):
  """model.hidden(ids), jitted per model: a perplexity run scores many windows of one shape, and
  replaying the captured kernels skips building and scheduling the graph each time."""
  if getattr(model, "_jit_hidden", None) is None: model._jit_hidden = jit(lambda x: model.hidden(x))
  return model._jit_hidden(ids)


def token_nll(model, input_ids, targets, chunk_rows=256):
  """(sum of -log p(target), number of targets) for input_ids (B, T) and targets (B, T), where a
  target of IGNORE (-100) is not scored. Returns also the per-row log-probabilities of the
  targets as an array (B, T) (0 where ignored). Per chunk of rows: the logits, their logsumexp,
  and the target's logit picked by a gather (no full log-softmax is made)."""
  input_ids, targets = np.asarray(input_ids, dtype=np.int64), np.asarray(targets, dtype=np.int64)
  with no_grad():
    h = _hidden(model, Tensor(input_ids))                                # (B, T, C)
    flat_h = h.reshape(-1, h.shape[-1])                                  # (B * T, C)
    flat_t = targets.reshape(-1)
    logp = np.zeros(flat_t.shape, np.float64)
    rows = np.nonzero(flat_t != IGNORE)[0]
    for start in range(0, len(rows), chunk_rows):
      pick = rows[start:start + chunk_rows]
      logits = model.logits(flat_h[Tensor(pick)]).float().realize()     # (rows, vocab)
      vocab = logits.shape[-1]
      picked = logits.reshape(-1, 1).embedding(Tensor(np.arange(len(pick)) * vocab + flat_t[pick])).reshape(len(pick))
      logp[pick] = (picked - logits.logsumexp(-1)).numpy()
  return -logp.sum(), len(rows), logp.reshape(targets.shape)


def perplexity_windows(ids, ctx, bos_id=None, stride=None):
  """[(input ids, targets)] for a perplexity evaluation of the token list `ids` (targets hold
  IGNORE where nothing is scored). Every input is at most ctx tokens long.

  Without stride: non-overlapping windows. With a BOS id, each input is [BOS] + ctx - 1 text
  tokens and every text token is scored; without, it is ctx text tokens and the first one has no
  context, so tokens 2..n are scored (the protocol of the reference figures in DESIGN.md
  section 4).
  With stride: windows that start stride text tokens apart; each scores only the tokens that no
  earlier window scored, so most tokens see at least ctx - stride tokens of context."""
  if not ids: raise ValueError("no tokens to evaluate: the text is empty")
  off = 1 if bos_id is not None else 0
  span = ctx - off                                   # text tokens per window
  if span < 1 + (1 - off): raise ValueError(f"ctx {ctx} is too short for a window")
  stride = span if stride is None else stride
  if not 0 < stride <= span: raise ValueError(f"stride must be in 1..{span} (the text tokens of a window), got {stride}")
  out, s, scored_until = [], 0, 0
  while True:
    window = ids[s:s + span]
    x = [bos_id] * off + window
    targets = [IGNORE] * len(x)
    for p in range(len(x) - 1):                      # x[p] predicts x[p + 1], the token ids[s + p + 1 - off]
      if s + p + 1 - off >= scored_until: targets[p] = x[p + 1]
    if any(t != IGNORE for t in targets): out.append((x, targets))
    scored_until = s + len(window)
    if s + span >= len(ids): break
    s += stride
  return out


def windows_nll(model, windows, batch_size=1, progress=None):
  """(summed NLL, scored tokens) over perplexity_windows' output; windows of one length run
  together, up to batch_size at a time. progress(n_windows_done, nll, count) is called per batch."""
  nll, count, i = 0.0, 0, 0
  while i < len(windows):
    n = len(windows[i][0])
    batch = [windows[i]]
    while len(batch) < batch_size and i + len(batch) < len(windows) and len(windows[i + len(batch)][0]) == n:
      batch.append(windows[i + len(batch)])
    s, c, _ = token_nll(model, [x for x, _ in batch], [t for _, t in batch])
    nll, count, i = nll + s, count + c, i + len(batch)
    if progress is not None: progress(len(batch), nll, count)
  return nll, count
