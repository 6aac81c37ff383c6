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
