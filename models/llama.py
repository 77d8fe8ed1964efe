"""Llama-style decoders, read top to bottom: Llama 2/3, SmolLM2, Qwen2 / Qwen2.5.

RMSNorm before attention and MLP, rotary positions (RoPE), grouped-query attention (fewer
key/value heads than query heads), SwiGLU MLP, optionally a bias on q/k/v (Qwen2) and a head
tied to the token embedding. Parameter names equal Hugging Face's LlamaForCausalLM /
Qwen2ForCausalLM state dicts. The head, hidden -> logits and the forward are models/base.py's.
"""
from dataclasses import dataclass, field
from typing import Optional
from minift.nn import Module, Linear, Embedding, RMSNorm, activation, config_from_dict, \
  rope_parameters, rope_inv_freq, apply_rope, causal_attention
from models.base import CausalLM


@dataclass
class LlamaConfig:                      # field names are the keys of HF's config.json
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: Optional[int] = None    # None: as many as query heads
  head_dim: Optional[int] = None               # None: hidden_size // num_attention_heads
  hidden_act: str = "silu"
  max_position_embeddings: int = 2048
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  attention_bias: bool = False                 # Llama: bias on q, k, v and o
  mlp_bias: bool = False
  sliding_window: Optional[int] = None         # Qwen2, for layers whose type is "sliding_attention"
  layer_types: Optional[list] = None
  # not a config.json key: RoPE settings gathered by from_config_dict from `rope_parameters`
  # (transformers >= 5) or `rope_theta` + `rope_scaling` (older files)
  rope: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
  bos_token_id: Optional[int] = None
  eos_token_id: Optional[object] = None        # an id or a list of ids
  model_type: str = "llama"

  def __post_init__(self):
    if self.num_key_value_heads is None: self.num_key_value_heads = self.num_attention_heads
    if self.head_dim is None: self.head_dim = self.hidden_size // self.num_attention_heads


class Attention(Module):
  def __init__(self, config, layer_idx, qkv_bias):
    self.layer_idx = layer_idx
    self.n_head, self.n_kv_head, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    layer_type = config.layer_types[layer_idx] if config.layer_types else "full_attention"
    self.window = config.sliding_window if layer_type == "sliding_attention" else None
    self.q_proj = Linear(config.hidden_size, self.n_head * self.head_dim, bias=qkv_bias)
    self.k_proj = Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=qkv_bias)
    self.v_proj = Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=qkv_bias)
    self.o_proj = Linear(self.n_head * self.head_dim, config.hidden_size, bias=config.attention_bias)

  def forward(self, x, cos, sin, cache):
    B, T, _ = x.shape
    q = self.q_proj(x).reshape(B, T, self.n_head, self.head_dim).transpose(1, 2)     # (B, nh, T, hd)
    k = self.k_proj(x).reshape(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
    v = self.v_proj(x).reshape(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = cache.update_and_fetch(self.layer_idx, k, v)                              # (B, nkv, S, hd): S keys to attend over
    y = causal_attention(q, k, v, cache, window=self.window)                         # (B, nh, T, hd)
    y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)                 # (B, T, nh * hd)
    return self.o_proj(y)


class MLP(Module):
  """SwiGLU: down(act(gate(x)) * up(x))."""
  def __init__(self, config):
    self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
    self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
    self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
    self._act = activation(config.hidden_act)

  def forward(self, x): return self.down_proj(self._act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(Module):
  def __init__(self, config, layer_idx, qkv_bias):
    self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
    self.self_attn = Attention(config, layer_idx, qkv_bias)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
    self.mlp = MLP(config)

  def forward(self, x, cos, sin, cache):
    x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
    return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(Module):
  def __init__(self, config, qkv_bias):
    self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
    self.layers = [DecoderLayer(config, i, qkv_bias) for i in range(config.num_hidden_layers)]
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Llama(CausalLM):
  model_type = "llama"
  config_class = LlamaConfig

  def __init__(self, config):
    qkv_bias = config.attention_bias or config.model_type == "qwen2"   # Qwen2 always has q/k/v bias
    self.model = Decoder(config, qkv_bias)
    super().__init__(config, self.model.embed_tokens, max_context=config.max_position_embeddings)
    self._inv_freq = rope_inv_freq(config.head_dim, config.rope)

  @classmethod
  def from_config_dict(cls, d):
    config = config_from_dict(LlamaConfig, d)
    config.rope = rope_parameters(d)
    if d.get("model_type") == "qwen2":   # Qwen2 slides its window only on layers >= max_window_layers, if at all
      if not d.get("use_sliding_window", False): config.sliding_window, config.layer_types = None, None
      elif config.layer_types is None:
        config.layer_types = ["sliding_attention" if i >= d.get("max_window_layers", 0) else "full_attention"
                              for i in range(config.num_hidden_layers)]
    return cls(config)

  def body(self, input_ids, cache):
    cos, sin = cache.rope(self._inv_freq)                               # (T, hd) each: RoPE at the tokens' positions
    x = self.model.embed_tokens(input_ids)                              # (B, T, C)
    for layer in self.model.layers: x = layer(x, cos, sin, cache)
    return self.model.norm(x)

  @staticmethod
  def hf_name(key):
    if key.endswith("rotary_emb.inv_freq"): return None   # a buffer some old checkpoints carry
    return key
