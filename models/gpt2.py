"""GPT-2, read top to bottom: learned positions, pre-LayerNorm blocks with a fused QKV
projection, GELU (tanh) MLP, a head tied to the token embedding.

Parameter names equal Hugging Face's GPT2LMHeadModel state dict. HF stores the four Conv1D
weights as (in, out); here every Linear is (out, in), so those four are transposed on load
(TRANSPOSED names them).
"""
from dataclasses import dataclass
from typing import Optional
from minift.nn import Module, Linear, Embedding, project, LayerNorm, activation, config_from_dict, \
  StaticKVCache, causal_attention


@dataclass
class GPT2Config:                       # field names are the keys of HF's config.json
  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  n_inner: Optional[int] = None          # MLP width; None means 4 * n_embd
  activation_function: str = "gelu_new"
  layer_norm_epsilon: float = 1e-5
  scale_attn_weights: bool = True
  scale_attn_by_inverse_layer_idx: bool = False
  tie_word_embeddings: bool = True
  bos_token_id: Optional[int] = 50256
  eos_token_id: Optional[int] = 50256


class CausalSelfAttention(Module):
  def __init__(self, config, layer_idx):
    self.n_head, self.head_dim, self.layer_idx = config.n_head, config.n_embd // config.n_head, layer_idx
    self.scale = (self.head_dim ** -0.5 if config.scale_attn_weights else 1.0) / \
                 (layer_idx + 1 if config.scale_attn_by_inverse_layer_idx else 1)
    self.c_attn = Linear(config.n_embd, 3 * config.n_embd)   # q, k, v in one matmul
    self.c_proj = Linear(config.n_embd, config.n_embd)

  def forward(self, x, cache=None):
    B, T, C = x.shape
    q, k, v = self.c_attn(x).split(C, dim=2)                               # 3 x (B, T, C)
    q = q.reshape(B, T, self.n_head, self.head_dim).transpose(1, 2)        # (B, nh, T, hd)
    k = k.reshape(B, T, self.n_head, self.head_dim).transpose(1, 2)        # (B, nh, T, hd)
    v = v.reshape(B, T, self.n_head, self.head_dim).transpose(1, 2)        # (B, nh, T, hd)
    if cache is not None: k, v = cache.update(self.layer_idx, k, v)        # (B, nh, S, hd)
    y = causal_attention(q, k, v, cache, scale=self.scale)                 # (B, nh, T, hd)
    y = y.transpose(1, 2).reshape(B, T, C)                                 # (B, T, C)
    return self.c_proj(y)


class MLP(Module):
  def __init__(self, config):
    inner = config.n_inner or 4 * config.n_embd
    self.c_fc = Linear(config.n_embd, inner)
    self.c_proj = Linear(inner, config.n_embd)
    self._act = activation(config.activation_function)

  def forward(self, x): return self.c_proj(self._act(self.c_fc(x)))


class Block(Module):
  def __init__(self, config, layer_idx):
    self.ln_1 = LayerNorm(config.n_embd, config.layer_norm_epsilon)
    self.attn = CausalSelfAttention(config, layer_idx)
    self.ln_2 = LayerNorm(config.n_embd, config.layer_norm_epsilon)
    self.mlp = MLP(config)

  def forward(self, x, cache=None):
    x = x + self.attn(self.ln_1(x), cache)
    return x + self.mlp(self.ln_2(x))


class Transformer(Module):
  def __init__(self, config):
    self.wte = Embedding(config.vocab_size, config.n_embd)
    self.wpe = Embedding(config.n_positions, config.n_embd)
    self.h = [Block(config, i) for i in range(config.n_layer)]
    self.ln_f = LayerNorm(config.n_embd, config.layer_norm_epsilon)


class GPT2(Module):
  model_type = "gpt2"
  config_class = GPT2Config
  TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

  def __init__(self, config):
    self.config = config
    self.transformer = Transformer(config)
    self.lm_head = None if config.tie_word_embeddings else Linear(config.n_embd, config.vocab_size, bias=False)

  @classmethod
  def from_config_dict(cls, d): return cls(config_from_dict(GPT2Config, d))

  @property
  def max_context(self): return self.config.n_positions

  @property
  def output_weight(self):
    """(vocab, n_embd): the matrix that turns final hidden states into logits (a list of row pieces once split)."""
    return self.transformer.wte.rows() if self.lm_head is None else self.lm_head.rows()

  def hidden(self, input_ids, cache=None, positions=None):
    """Final hidden states (B, T, n_embd) for token ids (B, T). With a StaticKVCache, positions
    (T,) int64 are where the tokens go (data, so a jitted decode step replays; default: the next
    free slots)."""
    B, T = input_ids.shape
    start = cache.length if cache is not None else 0
    if start + T > self.config.n_positions:
      raise ValueError(f"GPT-2 sees at most {self.config.n_positions} positions; asked for {start + T}")
    tr = self.transformer
    if isinstance(cache, StaticKVCache):
      positions = cache.begin(T, positions, input_ids.device)
      x = tr.wte(input_ids) + tr.wpe(positions)                           # (B, T, C): the rows at the positions
    else:
      x = tr.wte(input_ids) + tr.wpe.whole()[start:start + T]             # (B, T, C)
    for block in tr.h: x = block(x, cache)
    if cache is not None: cache.advance(T)
    return tr.ln_f(x)

  def logits(self, h):
    """Logits (..., vocab) from final hidden states (..., n_embd)."""
    return project(h, self.output_weight)

  def forward(self, input_ids, cache=None, positions=None):
    """Logits (B, T, vocab)."""
    return self.logits(self.hidden(input_ids, cache, positions))

  @staticmethod
  def hf_name(key):
    """The parameter name for a key of an HF checkpoint, or None for a key to skip. Checkpoints
    saved from GPT2Model lack the 'transformer.' prefix; old ones carry attention-mask buffers."""
    if key.endswith((".attn.bias", ".attn.masked_bias")): return None
    if not key.startswith(("transformer.", "lm_head.")): key = "transformer." + key
    return key
