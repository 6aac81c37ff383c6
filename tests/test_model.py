"""The Flax Llama against a float64 numpy oracle; duo invariances; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duojax.config import DuoSpec, LlamaConfig, RopeScaling
from duojax.models.llama import Llama, canonical_dtype
from duojax.models.params import build_model, model_params
from duojax.models.reorder import reorder_heads
from duojax.models.rope import rope_inv_freq
from tests.oracle import llama_oracle, rel_l2

CFG = LlamaConfig(vocab_size=61, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=3, head_dim=8, rope_theta=500.0, rms_norm_eps=1e-5)


def random_params(config, seed=0, scale=0.3):
  m = Llama(config, rngs=__import__("flax").nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (rng.standard_normal(x.shape) * scale).astype(np.float32), model_params(m))


@pytest.fixture(scope="module")
def params():
  return random_params(CFG)


@pytest.fixture(scope="module")
def tokens():
  return np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 13))


def test_all_retrieval_equals_vanilla_attention(params, tokens):
  model = build_model(CFG, params, DuoSpec.all_full(CFG, sink=2, window=3))
  got = model(jnp.asarray(tokens), impl="reference")
  want = llama_oracle(params, CFG, tokens)  # plain causal attention
  assert rel_l2(got, want) < 1e-5


def test_duo_pattern_matches_oracle(params, tokens):
  full = ((True, False, False), (False, True, False))
  model = build_model(CFG, params, DuoSpec(full, sink=2, window=3))
  got = model(jnp.asarray(tokens), impl="reference")
  want = llama_oracle(params, CFG, tokens, full=full, sink=2, window=3)
  assert rel_l2(got, want) < 1e-5
  vanilla = llama_oracle(params, CFG, tokens)
  assert rel_l2(got, vanilla) > 1e-3  # the mask really changes the result


def test_window_covering_sequence_equals_full(params, tokens):
  all_streaming = DuoSpec.from_num_full((0, 0), 3, sink=0, window=tokens.shape[1])
  got = build_model(CFG, params, all_streaming)(jnp.asarray(tokens), impl="reference")
  want = llama_oracle(params, CFG, tokens)
  assert rel_l2(got, want) < 1e-5


@pytest.mark.parametrize("tp", [1, 3])
def test_reordering_heads_leaves_logits_unchanged(params, tokens, tp):
  rng = np.random.default_rng(2)
  p = jax.tree.map(np.copy, params)
  for l in range(CFG.num_hidden_layers):  # biases too
    for name in "qkvo":
      p["layers"][l]["attn"][name]["bias"] = rng.standard_normal(p["layers"][l]["attn"][name]["kernel"].shape[1])
  cfg = CFG.__class__(**{**CFG.__dict__, "attention_bias": True})
  full = np.array([[False, True, True], [True, False, True]])
  before = build_model(cfg, p, DuoSpec(tuple(map(tuple, full.tolist())), sink=2, window=3))
  new_params, perm, spec = reorder_heads(p, cfg, full, sink=2, window=3, tp=tp)
  if tp == 1:
    assert spec.full == ((True, True, False), (True, True, False))
    assert perm.tolist() == [[1, 2, 0], [0, 2, 1]]
  assert not np.allclose(new_params["layers"][0]["attn"]["k"]["kernel"], p["layers"][0]["attn"]["k"]["kernel"])
  after = build_model(cfg, new_params, spec)
  a = before(jnp.asarray(tokens), impl="reference")
  b = after(jnp.asarray(tokens), impl="reference")
  assert rel_l2(b, a) < 1e-6


def test_svd_factors_apply_like_kernel(params, tokens):
  p = jax.tree.map(np.copy, params)
  w = p["layers"][0]["mlp"]["up"].pop("kernel")
  u, s, vt = np.linalg.svd(w, full_matrices=False)
  p["layers"][0]["mlp"]["up"] = {"u": (u * s).astype(np.float32), "v": vt.astype(np.float32)}
  got = build_model(CFG, p)(jnp.asarray(tokens), impl="reference")
  want = build_model(CFG, params)(jnp.asarray(tokens), impl="reference")
  assert rel_l2(got, want) < 1e-5


def test_llama3_rope_scaling_matches_formula():
  s = RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=8192)
  inv = rope_inv_freq(128, 500000.0, s)
  base = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
  wl = 2 * np.pi / base
  assert np.allclose(inv[wl < 8192 / 4], base[wl < 8192 / 4])  # high frequencies unchanged
  assert np.allclose(inv[wl > 8192], base[wl > 8192] / 8)  # low frequencies divided by factor
  mid = (wl >= 8192 / 4) & (wl <= 8192)
  smooth = (8192 / wl[mid] - 1) / 3
  assert np.allclose(inv[mid], (1 - smooth) * base[mid] / 8 + smooth * base[mid])
  assert np.allclose(rope_inv_freq(64, 1e4, RopeScaling("linear", factor=4.0)),
                     1.0 / 1e4 ** (np.arange(0, 64, 2) / 64) / 4)


# ---- bad input -----------------------------------------------------------------------------------------------

def test_pattern_shape_mismatch(params):
  with pytest.raises(ValueError, match=r"duo pattern has shape \(3, 3\).*model has \(2, 3\)"):
    build_model(CFG, params, DuoSpec.from_num_full((1, 1, 1), 3))
  with pytest.raises(ValueError, match=r"retrieval head counts must lie in \[0, 3\].*\(1, 4\)"):
    DuoSpec.from_num_full((1, 4), 3)


@pytest.mark.parametrize("sink, window, match", [(-1, 4, "sink must be an int >= 0.*-1"),
                                                 (4, 0, "window must be an int >= 1.*0")])
def test_sink_window_range(sink, window, match):
  with pytest.raises(ValueError, match=match):
    DuoSpec.from_num_full((1, 1), 3, sink=sink, window=window)


def test_heads_must_divide():
  with pytest.raises(ValueError, match=r"num_attention_heads \(6\) must be a multiple of num_key_value_heads \(4\)"):
    LlamaConfig(vocab_size=8, hidden_size=48, intermediate_size=8, num_hidden_layers=1, num_attention_heads=6,
                num_key_value_heads=4, head_dim=8)


def test_unsupported_dtype():
  with pytest.raises(ValueError, match=r"unsupported dtype 'int8'; allowed: float32.*bfloat16.*float16"):
    canonical_dtype("int8")
  with pytest.raises(ValueError, match="unsupported dtype"):
    Llama(CFG, dtype=jnp.float64)


def test_params_not_matching_config(params):
  bad = jax.tree.map(np.copy, params)
  bad["layers"][1]["attn"]["k"]["kernel"] = np.zeros((48, 16), np.float32)
  with pytest.raises(ValueError, match=r"layers/1/attn/k/kernel has shape \(48, 16\), the config implies \(48, 24\)"):
    build_model(CFG, bad)
