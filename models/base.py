"""What every causal LM in models/ shares, so that a model file holds only its architecture.

A model subclasses CausalLM. Its __init__ builds the modules under their Hugging Face names, then
calls CausalLM.__init__ with its token embedding and context length, which adds the output head
(tied to that embedding, or a Linear of its own). Its body(input_ids, cache) runs the
architecture: embeddings, blocks, final norm. Its attention layers go through the cache:

    k, v = cache.update_and_fetch(self.layer_idx, k, v)    # the keys and values to attend over
    y = causal_attention(q, k, v, cache, window=...)        # the mask the cache needs

and it asks the cache for what depends on the tokens' positions (cache.rope(inv_freq),
cache.position_rows(table)). The same code then runs without a cache (training, scoring: a
NoCache, the tokens are positions 0..T-1), with a growing KVCache, and with a StaticKVCache
whose positions are data so a jitted decode step replays (minift/nn.py describes the caches).
"""
from minift.nn import Module, Linear, project, config_from_dict, NoCache


class CausalLM(Module):
  """Token ids (B, T) -> final hidden states (B, T, C) -> logits (B, T, vocab).

  Subclasses set model_type (HF config.json's), config_class (a dataclass whose fields are the
  config.json keys), TRANSPOSED (weights HF stores as (in, out)) and define body()."""
  model_type = None
  config_class = None
  TRANSPOSED = ()

  def __init__(self, config, embed_tokens, max_context):
    self.config, self.max_context = config, max_context
    self._embed_tokens = embed_tokens   # private: the tied head reads it, its weight keeps its one name
    vocab, width = embed_tokens.weight.shape
    self.lm_head = None if config.tie_word_embeddings else Linear(width, vocab, bias=False)

  @classmethod
  def from_config_dict(cls, d):
    """The model (weights still zero) for an HF config.json dict."""
    return cls(config_from_dict(cls.config_class, d))

  @staticmethod
  def hf_name(key):
    """The parameter name for a key of an HF checkpoint, or None for a key to skip."""
    return key

  @property
  def output_weight(self):
    """(vocab, C): the matrix that turns final hidden states into logits (a list of row pieces once split)."""
    return self._embed_tokens.rows() if self.lm_head is None else self.lm_head.rows()

  def body(self, input_ids, cache):
    """Final hidden states (B, T, C) for token ids (B, T), the tokens placed by `cache`."""
    raise NotImplementedError

  def hidden(self, input_ids, cache=None, positions=None):
    """Final hidden states (B, T, C) for token ids (B, T). cache: None (the tokens are positions
    0..T-1), a KVCache or a StaticKVCache; with a StaticKVCache, positions (T,) int64 are where
    the tokens go (data, so a jitted decode step replays; default: the next free slots)."""
    T = input_ids.shape[1]
    cache = NoCache() if cache is None else cache
    cache.begin(T, positions, input_ids.device)
    h = self.body(input_ids, cache)
    cache.advance(T)
    return h

  def logits(self, h):
    """Logits (..., vocab) from final hidden states (..., C)."""
    return project(h, self.output_weight)

  def forward(self, input_ids, cache=None, positions=None):
    """Logits (B, T, vocab)."""
    return self.logits(self.hidden(input_ids, cache, positions))
