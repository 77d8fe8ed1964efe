"""A tiny GPT-2-style model written twice, in minift and in torch, with the same weights.
Used by the training-parity, kernel-count, jit and benchmark code."""
import numpy as np


def init_weights(vocab=97, ctx=32, d=64, heads=4, layers=2, seed=0):
  rng = np.random.default_rng(seed)
  w = lambda *s: (rng.standard_normal(s) * 0.05).astype(np.float32)
  p = {"wte": w(vocab, d), "wpe": w(ctx, d), "ln_f.w": 1 + w(d), "ln_f.b": w(d)}
  for i in range(layers):
    p.update({f"{i}.ln1.w": 1 + w(d), f"{i}.ln1.b": w(d), f"{i}.attn.w": w(d, 3 * d), f"{i}.attn.b": w(3 * d),
              f"{i}.proj.w": w(d, d), f"{i}.proj.b": w(d), f"{i}.ln2.w": 1 + w(d), f"{i}.ln2.b": w(d),
              f"{i}.fc.w": w(d, 4 * d), f"{i}.fc.b": w(4 * d), f"{i}.mlp_proj.w": w(4 * d, d), f"{i}.mlp_proj.b": w(d)})
  return p, dict(heads=heads, layers=layers)


def block_minift(p, i, x, heads):
  b, t, d = x.shape
  h = x.layernorm(p[f"{i}.ln1.w"], p[f"{i}.ln1.b"])
  qkv = h @ p[f"{i}.attn.w"] + p[f"{i}.attn.b"]                                   # (B, T, 3D)
  q, k, v = [z.reshape(b, t, heads, d // heads).transpose(1, 2) for z in qkv.split(d, 2)]  # (B, H, T, Dh)
  a = q.scaled_dot_product_attention(k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
  x = x + (a @ p[f"{i}.proj.w"] + p[f"{i}.proj.b"])
  h = x.layernorm(p[f"{i}.ln2.w"], p[f"{i}.ln2.b"])
  return x + ((h @ p[f"{i}.fc.w"] + p[f"{i}.fc.b"]).gelu("tanh") @ p[f"{i}.mlp_proj.w"] + p[f"{i}.mlp_proj.b"])


def loss_minift(p, cfg, idx, targets):
  b, t = idx.shape
  x = p["wte"].embedding(idx) + p["wpe"][:t]
  for i in range(cfg["layers"]): x = block_minift(p, i, x, cfg["heads"])
  x = x.layernorm(p["ln_f.w"], p["ln_f.b"])
  return (x @ p["wte"].T).cross_entropy(targets)


def block_torch(p, i, x, heads):
  import torch.nn.functional as F
  b, t, d = x.shape
  h = F.layer_norm(x, (d,), p[f"{i}.ln1.w"], p[f"{i}.ln1.b"])
  q, k, v = [z.reshape(b, t, heads, d // heads).transpose(1, 2) for z in (h @ p[f"{i}.attn.w"] + p[f"{i}.attn.b"]).split(d, 2)]
  a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
  x = x + (a @ p[f"{i}.proj.w"] + p[f"{i}.proj.b"])
  h = F.layer_norm(x, (d,), p[f"{i}.ln2.w"], p[f"{i}.ln2.b"])
  return x + (F.gelu(h @ p[f"{i}.fc.w"] + p[f"{i}.fc.b"], approximate="tanh") @ p[f"{i}.mlp_proj.w"] + p[f"{i}.mlp_proj.b"])


def loss_torch(p, cfg, idx, targets):
  import torch.nn.functional as F
  b, t = idx.shape
  x = F.embedding(idx, p["wte"]) + p["wpe"][:t]
  for i in range(cfg["layers"]): x = block_torch(p, i, x, cfg["heads"])
  x = F.layer_norm(x, (x.shape[-1],), p["ln_f.w"], p["ln_f.b"])
  return F.cross_entropy((x @ p["wte"].T).reshape(-1, p["wte"].shape[0]), targets.reshape(-1))
