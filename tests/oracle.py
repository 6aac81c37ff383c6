"""Float64 numpy brute-force oracles, independent of duojax's JAX code: masks built element by element."""

from __future__ import annotations

import numpy as np


def duo_mask(q_pos: int, k_pos: int, streaming: bool, sink: int, window: int) -> bool:
  if k_pos < 0 or k_pos > q_pos:
    return False
  return (not streaming) or k_pos < sink or k_pos > q_pos - window


def attention_oracle(q, k, v, *, num_full_kv_heads, sink, window, q_offset=0, k_positions=None, sm_scale=None):
  """out [B, Sq, Hq, D] float64 and lse [B, Hq, Sq] (natural log) by explicit loops over (b, h, i)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, Sq, Hq, D = q.shape
  Sk, Hkv = k.shape[1], k.shape[2]
  G = Hq // Hkv
  scale = 1.0 / np.sqrt(D) if sm_scale is None else sm_scale
  offsets = np.broadcast_to(np.asarray(q_offset), (B,))
  out = np.zeros((B, Sq, Hq, D))
  lse = np.full((B, Hq, Sq), -np.inf)
  for b in range(B):
    kp = np.arange(Sk) if k_positions is None else np.asarray(k_positions[b])
    for h in range(Hq):
      kh = h // G
      streaming = kh >= num_full_kv_heads
      for i in range(Sq):
        p = int(offsets[b]) + i
        vis = np.array([duo_mask(p, int(t), streaming, sink, window) for t in kp])
        if not vis.any():
          continue
        s = (k[b, vis, kh] @ q[b, i, h]) * scale
        m = s.max()
        w = np.exp(s - m)
        out[b, i, h] = (w / w.sum()) @ v[b, vis, kh]
        lse[b, h, i] = m + np.log(w.sum())
  return out, lse


def rel_l2(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _np(x):
  return np.asarray(x, np.float64)


def llama_oracle(params, config, tokens, full=None, sink=0, window=1):
  """Float64 numpy Llama forward (rotate-half RoPE, default scaling only) with the duo mask by loops.

  ``full[l][h]`` True = retrieval KV head (default: all retrieval, i.e. vanilla causal attention).
  Returns logits ``[B, S, V]``.
  """
  c = config
  tokens = np.asarray(tokens)
  B, S = tokens.shape
  D, Hq, Hkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
  G = Hq // Hkv
  inv = 1.0 / (c.rope_theta ** (np.arange(0, D, 2) / D))
  ang = np.arange(S)[:, None] * inv[None, :]
  cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

  def rope(x):  # [B, S, H, D]
    x1, x2 = x[..., :D // 2], x[..., D // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

  def norm(x, w):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + c.rms_norm_eps) * _np(w)

  def lin(p, x):
    y = x @ _np(p["kernel"]) if "kernel" in p else (x @ _np(p["u"])) @ _np(p["v"])
    return y + _np(p["bias"]) if p.get("bias") is not None else y

  x = _np(params["embed"])[tokens]
  for l in range(c.num_hidden_layers):
    lp = params["layers"][l]
    h = norm(x, lp["input_norm"]["scale"])
    q = rope(lin(lp["attn"]["q"], h).reshape(B, S, Hq, D))
    k = rope(lin(lp["attn"]["k"], h).reshape(B, S, Hkv, D))
    v = lin(lp["attn"]["v"], h).reshape(B, S, Hkv, D)
    out = np.zeros((B, S, Hq, D))
    for head in range(Hq):
      kh = head // G
      streaming = full is not None and not full[l][kh]
      for i in range(S):
        vis = np.array([duo_mask(i, j, streaming, sink, window) for j in range(S)])
        s = np.einsum("bd,bjd->bj", q[:, i, head], k[:, vis, kh]) / np.sqrt(D)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        out[:, i, head] = np.einsum("bj,bjd->bd", w, v[:, vis, kh])
    x = x + lin(lp["attn"]["o"], out.reshape(B, S, Hq * D))
    h = norm(x, lp["post_attn_norm"]["scale"])
    g = lin(lp["mlp"]["gate"], h)
    x = x + lin(lp["mlp"]["down"], g / (1 + np.exp(-g)) * lin(lp["mlp"]["up"], h))
  x = norm(x, params["final_norm"]["scale"])
  head = _np(params["embed"]).T if c.tie_word_embeddings else _np(params["lm_head"]["kernel"])
  return x @ head
