"""The reference duo attention against a float64 brute-force oracle (randomized with hypothesis)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from duojax.kernels.reference import duo_attention_reference
from tests.oracle import attention_oracle, rel_l2


@st.composite
def attention_cases(draw):
  group = draw(st.sampled_from([1, 3, 8]))
  hkv = draw(st.integers(1, 3))
  sq = draw(st.integers(1, 23))
  q_offset = draw(st.sampled_from([0, 0, 1, 5, 17]))
  sk = q_offset + sq
  sink = draw(st.sampled_from([0, 1, 3, sk, sk + 5]))
  window = draw(st.sampled_from([1, 1, 2, 4, 9, sk + 1]))
  nf = draw(st.integers(0, hkv))
  batch = draw(st.integers(1, 2))
  d = draw(st.sampled_from([4, 8, 16]))
  block_q = draw(st.sampled_from([1, 4, 7, 64]))
  seed = draw(st.integers(0, 2**31 - 1))
  return dict(group=group, hkv=hkv, sq=sq, sk=sk, q_offset=q_offset, sink=sink, window=window, nf=nf, batch=batch,
              d=d, block_q=block_q, seed=seed)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(attention_cases())
def test_reference_matches_float64_oracle(case):
  rng = np.random.default_rng(case["seed"])
  B, Hkv, G, D = case["batch"], case["hkv"], case["group"], case["d"]
  q = rng.standard_normal((B, case["sq"], Hkv * G, D)).astype(np.float32)
  k = rng.standard_normal((B, case["sk"], Hkv, D)).astype(np.float32)
  v = rng.standard_normal((B, case["sk"], Hkv, D)).astype(np.float32)
  kw = dict(num_full_kv_heads=case["nf"], sink=case["sink"], window=case["window"], q_offset=case["q_offset"])
  out, lse = duo_attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), block_q=case["block_q"], **kw)
  want_out, want_lse = attention_oracle(q, k, v, **kw)
  assert rel_l2(out, want_out) < 1e-5
  np.testing.assert_allclose(np.asarray(lse), want_lse, rtol=1e-5, atol=1e-5)


def test_window_one_sees_only_sinks_and_self():
  """window=1 on a streaming head: each query sees its own key and the sinks; values make that visible."""
  B, S, D = 1, 9, 4
  q = jnp.zeros((B, S, 1, D))  # uniform scores: output = mean of visible values
  k = jnp.zeros((B, S, 1, D))
  v = jnp.broadcast_to(jnp.arange(S, dtype=jnp.float32)[None, :, None, None], (B, S, 1, D))
  out, _ = duo_attention_reference(q, k, v, num_full_kv_heads=0, sink=2, window=1)
  want = [0.0, 0.5] + [(1 + i) / 3 for i in range(2, S)]  # mean({0, 1, i}) for i >= 2
  np.testing.assert_allclose(np.asarray(out[0, :, 0, 0]), want, rtol=1e-6)


def test_ring_positions_match_contiguous():
  """Keys given with explicit (shuffled) positions give the same result as contiguous keys."""
  rng = np.random.default_rng(0)
  q = rng.standard_normal((2, 5, 4, 8)).astype(np.float32)
  k = rng.standard_normal((2, 12, 2, 8)).astype(np.float32)
  v = rng.standard_normal((2, 12, 2, 8)).astype(np.float32)
  perm = rng.permutation(12)
  kw = dict(num_full_kv_heads=1, sink=2, window=3, q_offset=7)
  a, la = duo_attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), **kw)
  pos = jnp.broadcast_to(jnp.asarray(perm, jnp.int32), (2, 12))
  b, lb = duo_attention_reference(jnp.asarray(q), jnp.asarray(k[:, perm]), jnp.asarray(v[:, perm]),
                                  k_positions=pos, **kw)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(la), np.asarray(lb), rtol=1e-5, atol=1e-6)


def test_long_input_is_blocked():
  """8k tokens on CPU: the blocked reference never materializes [S, S] scores per head (~256 MB each)."""
  S, H, D = 8192, 2, 16
  key = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(key[0], (1, S, H, D))
  k = jax.random.normal(key[1], (1, S, H, D))
  v = jax.random.normal(key[2], (1, S, H, D))
  f = jax.jit(lambda q, k, v: duo_attention_reference(q, k, v, num_full_kv_heads=1, sink=4, window=64))
  mem = f.lower(q, k, v).compile().memory_analysis()
  assert mem.temp_size_in_bytes < S * S * 4, mem.temp_size_in_bytes
  out, lse = f(q, k, v)
  # spot-check the last row of each head against the oracle
  qs, ks, vs = (np.asarray(x) for x in (q[:, -1:], k, v))
  want, want_lse = attention_oracle(qs, ks, vs, num_full_kv_heads=1, sink=4, window=64, q_offset=S - 1)
  assert rel_l2(out[:, -1:], want) < 1e-5
  np.testing.assert_allclose(np.asarray(lse[:, :, -1:]), want_lse, rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_full_kv_heads=3), r"num_full_kv_heads must be an int in \[0, 2\].*3"),
    (dict(sink=-1), r"sink must be an int >= 0.*-1"),
    (dict(window=0), r"window must be an int >= 1.*0"),
])
def test_bad_arguments(kwargs, match):
  q = jnp.zeros((1, 4, 4, 8))
  k = jnp.zeros((1, 4, 2, 8))
  args = dict(num_full_kv_heads=1, sink=0, window=2) | kwargs
  with pytest.raises(ValueError, match=match):
    duo_attention_reference(q, k, k, **args)


def test_heads_must_divide():
  with pytest.raises(ValueError, match=r"query heads \(5\) must be a multiple of the number of KV heads \(2\)"):
    duo_attention_reference(jnp.zeros((1, 4, 5, 8)), jnp.zeros((1, 4, 2, 8)), jnp.zeros((1, 4, 2, 8)),
                            num_full_kv_heads=1, sink=0, window=2)
