"""Chunked prefill + decode over the duo cache equals one forward pass with the duo mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duojax.cache import cache_bytes, decode, init_cache, prefill_chunk, ring_slot
from duojax.config import DuoSpec, LlamaConfig
from duojax.models.params import build_model
from tests.oracle import rel_l2
from tests.test_model import random_params

CFG = LlamaConfig(vocab_size=53, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=3, head_dim=8)
# layer 0: one retrieval head first; layer 1: a TP-style layout (retrieval heads not first) to exercise the gather
DUO = DuoSpec(((True, False, False), (False, True, True)), sink=3, window=4)
S, PROMPT = 72, 45  # window 4: the ring wraps ~17 times


@pytest.fixture(scope="module")
def setup():
  params = random_params(CFG, seed=3, scale=0.4)
  model = build_model(CFG, params, DUO)
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, CFG.vocab_size, (2, S)))
  return model, tokens, model(tokens, impl="reference")


def run_chunked(model, tokens, chunk, prompt):
  """Prefills ``prompt`` tokens in chunks of ``chunk`` (0: none, decode from the start), decodes the rest."""
  B = tokens.shape[0]
  cache = init_cache(CFG, DUO, B, 128, jnp.float32)
  valid = jnp.full((B,), prompt, jnp.int32)
  outs = []
  step = jax.jit(lambda c, t: decode(model, t, c, impl="reference"))
  if chunk:
    for start in range(0, prompt, chunk):
      C = min(chunk, prompt - start)
      logits, cache = prefill_chunk(model, tokens[:, start:start + C], cache, start=start, valid_len=valid,
                                    impl="reference")
      outs.append(logits)
  for t in range(prompt if chunk else 0, tokens.shape[1]):
    logits, cache = step(cache, tokens[:, t])
    outs.append(logits[:, None])
  return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("chunk", [0, 1, 7, 64, PROMPT])
def test_chunked_prefill_then_decode_matches_one_pass(setup, chunk):
  model, tokens, want = setup
  got, cache = run_chunked(model, tokens, chunk, PROMPT)
  assert got.shape == want.shape
  assert rel_l2(got, want) <= 1e-5
  np.testing.assert_array_equal(np.asarray(cache.lengths), [S, S])
  # the ring holds exactly the sinks and the last `window` positions
  want_pos = sorted(list(range(DUO.sink)) + list(range(S - DUO.window, S)))
  assert sorted(np.asarray(cache.layers[0].ring_pos[0]).tolist()) == want_pos


@pytest.mark.parametrize("chunk", [0, 7])
def test_single_sequence_matches_one_pass(setup, chunk):
  """Batch 1 writes the caches with dynamic slices instead of scatters (``cache._write_row``)."""
  model, tokens, want = setup
  got, cache = run_chunked(model, tokens[:1], chunk, PROMPT)
  assert rel_l2(got, want[:1]) <= 1e-5
  want_pos = sorted(list(range(DUO.sink)) + list(range(S - DUO.window, S)))
  for lc in cache.layers:
    assert sorted(np.asarray(lc.ring_pos[0]).tolist()) == want_pos


def test_padding_never_enters_the_ring(setup):
  """Sequence 1 has a shorter prompt; its padded tail must not evict real tokens from the ring."""
  model, tokens, _ = setup
  cache = init_cache(CFG, DUO, 2, 128, jnp.float32)
  valid = jnp.asarray([40, 23], jnp.int32)
  _, cache = prefill_chunk(model, tokens[:, :40], cache, start=0, valid_len=valid, impl="reference")
  pos1 = np.asarray(cache.layers[0].ring_pos[1])
  assert sorted(pos1.tolist()) == [0, 1, 2, 19, 20, 21, 22]
  assert np.asarray(cache.lengths).tolist() == [40, 23]


def test_ring_slots():
  assert [int(ring_slot(t, 3, 4)) for t in range(12)] == [0, 1, 2, 3, 4, 5, 6, 3, 4, 5, 6, 3]


def test_streaming_memory_is_constant_in_context():
  small = cache_bytes(init_cache(CFG, DUO, 1, 256, jnp.bfloat16))
  large = cache_bytes(init_cache(CFG, DUO, 1, 4096, jnp.bfloat16))
  assert small["streaming"] == large["streaming"]
  assert large["retrieval"] == 16 * small["retrieval"]


@pytest.mark.parametrize("B", [1, 2])  # batch 1 writes with a dynamic_update_slice, batch 2 with a scatter
def test_decode_into_a_full_cache_stores_nothing(setup, B):
  """A sequence whose retrieval cache is full (``lengths == max_len``) still gets logits, but its token is dropped:
  the cache's last position is not overwritten."""
  model, tokens, _ = setup
  L = 64
  tokens = tokens[:B]
  cache = init_cache(CFG, DUO, B, L, jnp.float32)
  valid = jnp.full((B,), L, jnp.int32)
  _, full = prefill_chunk(model, tokens[:, :L], cache, start=0, valid_len=valid, impl="reference")
  np.testing.assert_array_equal(np.asarray(full.lengths), [L] * B)
  logits, after = decode(model, tokens[:, L], full, impl="reference")
  assert np.isfinite(np.asarray(logits)).all()
  for lc0, lc1 in zip(full.layers, after.layers):
    np.testing.assert_array_equal(np.asarray(lc1.k_full), np.asarray(lc0.k_full))
    np.testing.assert_array_equal(np.asarray(lc1.v_full), np.asarray(lc0.v_full))
