"""Gemma 3 (text), read top to bottom.

Like Llama with these differences: the token embedding is scaled by sqrt(hidden_size); every
RMSNorm scales by (1 + weight); each block norms the input and the output of both attention
and MLP (four norms); queries and keys get their own RMSNorm per head; most layers attend to a
sliding window of recent tokens ("sliding_attention", RoPE base 10k) and every few layers one
attends to everything ("full_attention", RoPE base 1M, possibly scaled); the MLP is GeGLU;
attention scores are scaled by query_pre_attn_scalar ** -0.5; the logits may be soft-capped.
Parameter names equal Hugging Face's Gemma3ForCausalLM state dict. The head, hidden -> logits and
the forward are models/base.py's.
"""
import math
from dataclasses import dataclass, field
from typing import Optional
from minift.nn import Module, Linear, Embedding, RMSNorm, activation, config_from_dict, \
  rope_parameters, rope_inv_freq, apply_rope, causal_attention
from models.base import CausalLM


@dataclass
class Gemma3Config:                     # field names are the keys of HF's config.json
  vocab_size: int = 262144
  hidden_size: int = 640
  intermediate_size: int = 2048
  num_hidden_layers: int = 18
  num_attention_heads: int = 4
  num_key_value_heads: int = 1
  head_dim: int = 256
  hidden_activation: str = "gelu_pytorch_tanh"
  max_position_embeddings: int = 32768
  rms_norm_eps: float = 1e-6
  query_pre_attn_scalar: float = 256
  sliding_window: int = 512
  sliding_window_pattern: int = 6        # older configs: every 6th layer is global
  layer_types: Optional[list] = None
  attention_bias: bool = False
  final_logit_softcapping: Optional[float] = None
  attn_logit_softcapping: Optional[float] = None
  tie_word_embeddings: bool = True
  # not config.json keys: RoPE settings per layer type, gathered by from_config_dict from
  # `rope_parameters` (transformers >= 5) or rope_theta / rope_scaling / rope_local_base_freq
  rope_global: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 1000000.0})
  rope_local: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
  bos_token_id: Optional[int] = 2
  eos_token_id: Optional[object] = 1

  def __post_init__(self):
    if self.layer_types is None:
      self.layer_types = ["full_attention" if (i + 1) % self.sliding_window_pattern == 0 else "sliding_attention"
                          for i in range(self.num_hidden_layers)]
    if self.attn_logit_softcapping is not None:
      raise NotImplementedError("Gemma 3 attention logit soft-capping is not supported (Gemma 3 checkpoints set it to null)")


class Attention(Module):
  def __init__(self, config, layer_idx):
    self.layer_idx = layer_idx
    self.n_head, self.n_kv_head, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    self.is_sliding = config.layer_types[layer_idx] == "sliding_attention"
    self.window = config.sliding_window if self.is_sliding else None
    self.scale = config.query_pre_attn_scalar ** -0.5
    bias = config.attention_bias
    self.q_proj = Linear(config.hidden_size, self.n_head * self.head_dim, bias=bias)
    self.k_proj = Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=bias)
    self.v_proj = Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=bias)
    self.o_proj = Linear(self.n_head * self.head_dim, config.hidden_size, bias=bias)
    self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, unit_offset=True)
    self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, unit_offset=True)

  def forward(self, x, rope, cache):
    B, T, _ = x.shape
    cos, sin = rope["sliding" if self.is_sliding else "full"]
    q = self.q_proj(x).reshape(B, T, self.n_head, self.head_dim).transpose(1, 2)     # (B, nh, T, hd)
    k = self.k_proj(x).reshape(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
    v = self.v_proj(x).reshape(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
    q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
    k, v = cache.update_and_fetch(self.layer_idx, k, v)                              # (B, nkv, S, hd): S keys to attend over
    y = causal_attention(q, k, v, cache, window=self.window, scale=self.scale)       # (B, nh, T, hd)
    y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)                 # (B, T, nh * hd)
    return self.o_proj(y)


class MLP(Module):
  """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""
  def __init__(self, config):
    self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
    self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
    self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)
    self._act = activation(config.hidden_activation)

  def forward(self, x): return self.down_proj(self._act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(Module):
  def __init__(self, config, layer_idx):
    norm = lambda: RMSNorm(config.hidden_size, config.rms_norm_eps, unit_offset=True)
    self.input_layernorm, self.post_attention_layernorm = norm(), norm()
    self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()
    self.self_attn = Attention(config, layer_idx)
    self.mlp = MLP(config)

  def forward(self, x, rope, cache):
    x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, cache))
    return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Decoder(Module):
  def __init__(self, config):
    self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
    self.layers = [DecoderLayer(config, i) for i in range(config.num_hidden_layers)]
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, unit_offset=True)


class Gemma3(CausalLM):
  model_type = "gemma3_text"
  config_class = Gemma3Config

  def __init__(self, config):
    self.model = Decoder(config)
    super().__init__(config, self.model.embed_tokens, max_context=config.max_position_embeddings)
    self._inv_freq = {"full": rope_inv_freq(config.head_dim, config.rope_global),
                      "sliding": rope_inv_freq(config.head_dim, config.rope_local)}
    self._embed_scale = math.sqrt(config.hidden_size)

  @classmethod
  def from_config_dict(cls, d):
    config = config_from_dict(Gemma3Config, d)
    if d.get("rope_parameters"):   # newer layout: one RoPE dict per layer type
      config.rope_global = rope_parameters(d, "full_attention")
      config.rope_local = rope_parameters(d, "sliding_attention")
    else:                          # older layout: rope_theta (+ rope_scaling) global, rope_local_base_freq local
      config.rope_global = rope_parameters(d)
      config.rope_local = {"rope_type": "default", "rope_theta": d.get("rope_local_base_freq", 10000.0)}
    return cls(config)

  def body(self, input_ids, cache):
    rope = {kind: cache.rope(f) for kind, f in self._inv_freq.items()}             # (T, hd) each: RoPE at the tokens' positions
    x = self.model.embed_tokens(input_ids) * self._embed_scale                       # (B, T, C)
    for layer in self.model.layers: x = layer(x, rope, cache)
    return self.model.norm(x)

  def logits(self, h):
    """Logits (..., vocab) from final hidden states (..., hidden), soft-capped if the config says so."""
    logits = super().logits(h)
    cap = self.config.final_logit_softcapping
    return logits if cap is None else (logits / cap).tanh() * cap
