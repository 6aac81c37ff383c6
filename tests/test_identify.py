"""Retrieval-head identification by attention mass, against a numpy computation of the same quantity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duojax.config import LlamaConfig
from duojax.identify import dropped_attention_mass
from duojax.models.params import build_model
from tests.test_model import random_params

CFG = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, rope_theta=100.0)


def test_dropped_mass_matches_numpy():
  params = random_params(CFG, seed=5, scale=0.5)
  model = build_model(CFG, params)
  tokens = np.random.default_rng(0).integers(0, 40, 20)
  sink, window = 2, 4
  got = dropped_attention_mass(model, tokens, sink=sink, window=window)
  # numpy: attention probabilities of layer 0 from its own q/k projections
  lp = params["layers"][0]
  x = params["embed"][tokens].astype(np.float64)
  h = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + CFG.rms_norm_eps) * lp["input_norm"]["scale"]
  S, D = len(tokens), CFG.head_dim
  inv = 1.0 / (CFG.rope_theta ** (np.arange(0, D, 2) / D))
  ang = np.arange(S)[:, None] * inv
  def rope(t):
    a, b = t[..., :D // 2], t[..., D // 2:]
    c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
    return np.concatenate([a * c - b * s, b * c + a * s], -1)
  q = rope((h @ lp["attn"]["q"]["kernel"]).reshape(S, 4, D))
  k = rope((h @ lp["attn"]["k"]["kernel"]).reshape(S, 2, D))
  want = np.zeros(2)
  for head in range(4):
    masses = []
    for i in range(sink + window, S):
      s = k[:i + 1, head // 2] @ q[i, head] / np.sqrt(D)
      p = np.exp(s - s.max()); p /= p.sum()
      masses.append(p[sink:i - window + 1].sum())
    want[head // 2] += np.mean(masses) / 2
  np.testing.assert_allclose(got[0], want, rtol=1e-4)


def test_calibration_text_must_exceed_sink_plus_window():
  model = build_model(CFG, random_params(CFG))
  with pytest.raises(ValueError, match=r"calibration text of 10 tokens must be longer than sink \+ window = 12"):
    dropped_attention_mass(model, np.arange(10), sink=4, window=8)
