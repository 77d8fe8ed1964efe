"""GPT-2, read top to bottom: learned positions, pre-LayerNorm blocks with a fused QKV
projection, GELU (tanh) MLP, a head tied to the token embedding.

Parameter names equal Hugging Face's GPT2LMHeadModel state dict. HF stores the four Conv1D
weights as (in, out); here every Linear is (out, in), so those four are transposed on load
(TRANSPOSED names them). The head, hidden -> logits and the forward are models/base.py's.
"""
from dataclasses import dataclass
from typing import Optional
from minift.nn import Module, Linear, Embedding, LayerNorm, activation, causal_attention
from models.base import CausalLM


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

  def forward(self, x, cache):
    B, T, C = x.shape
    q, k, v = self.c_attn(x).split(C, dim=2)                               # 3 x (B, T, C)
    q = q.reshape(B, T, self.n_head, self.head_dim).transpose(1, 2)        # (B, nh, T, hd)
    k = k.reshape(B, T, self.n_head, self.head_dim).transpose(1, 2)        # (B, nh, T, hd)
    v = v.reshape(B, T, self.n_head, self.head_dim).transpose(1, 2)        # (B, nh, T, hd)
    k, v = cache.update_and_fetch(self.layer_idx, k, v)                    # (B, nh, S, hd): S keys to attend over
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

  def forward(self, x, cache):
    x = x + self.attn(self.ln_1(x), cache)
    return x + self.mlp(self.ln_2(x))


class Transformer(Module):
  def __init__(self, config):
    self.wte = Embedding(config.vocab_size, config.n_embd)
    self.wpe = Embedding(config.n_positions, config.n_embd)
    self.h = [Block(config, i) for i in range(config.n_layer)]
    self.ln_f = LayerNorm(config.n_embd, config.layer_norm_epsilon)


class GPT2(CausalLM):
  model_type = "gpt2"
  config_class = GPT2Config
  TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

  def __init__(self, config):
    self.transformer = Transformer(config)
    super().__init__(config, self.transformer.wte, max_context=config.n_positions)

  def body(self, input_ids, cache):
    B, T = input_ids.shape
    if cache.length + T > self.config.n_positions:
      raise ValueError(f"GPT-2 sees at most {self.config.n_positions} positions; asked for {cache.length + T}")
    tr = self.transformer
    x = tr.wte(input_ids) + cache.position_rows(tr.wpe)                    # (B, T, C): learned positions
    for block in tr.h: x = block(x, cache)
    return tr.ln_f(x)

  @staticmethod
  def hf_name(key):
    """The parameter name for a key of an HF checkpoint, or None for a key to skip. Checkpoints
    saved from GPT2Model lack the 'transformer.' prefix; old ones carry attention-mask buffers."""
    if key.endswith((".attn.bias", ".attn.masked_bias")): return None
    if not key.startswith(("transformer.", "lm_head.")): key = "transformer." + key
    return key
