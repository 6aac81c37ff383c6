"""The jitted generate loop on SmolLM2: golden greedy tokens, duo cache, no recompiles, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duojax.config import DuoSpec
from duojax.generate import Generator, SamplingConfig, bucket_length, sample_logits
from duojax.models.params import build_model


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
  config, params, tokenizer = smollm2_gguf
  return config, params, tokenizer, build_model(config, params)


def test_all_retrieval_generates_golden_tokens(smollm2, smollm2_golden):
  config, params, tokenizer, model = smollm2
  golden, _ = smollm2_golden
  gen = Generator(model, tokenizer, max_len=128, chunk_size=8, impl="reference")
  result = gen.generate(golden["input_ids"], max_new_tokens=24)  # one batch, three prompt lengths
  assert result.tokens == golden["greedy"]
  assert result.texts == golden["greedy_text"]
  assert result.stop_reasons == ["max_new_tokens", "max_new_tokens", "stop_token"]
  assert result.attention_impl == "reference"


def test_batch_equals_single_prompts(smollm2, smollm2_golden):
  config, params, tokenizer, model = smollm2
  golden, _ = smollm2_golden
  gen = Generator(model, tokenizer, max_len=128, impl="reference")
  solo = [gen.generate([p], max_new_tokens=6).tokens[0] for p in golden["input_ids"][:2]]
  batch = gen.generate(golden["input_ids"][:2], max_new_tokens=6).tokens
  assert batch == solo == [g[:6] for g in golden["greedy"][:2]]


def test_duo_pattern_runs_with_constant_streaming_cache(smollm2):
  """A ~50%-streaming pattern: the Generator's own cache has a ring of sink + window slots whatever max_len is
  (only the retrieval part grows), and its greedy tokens are those of one forward pass with the duo mask."""
  config, params, tokenizer, _ = smollm2
  rng = np.random.default_rng(0)
  num_full = rng.integers(0, config.num_key_value_heads + 1, config.num_hidden_layers)  # ~50% streaming
  sink, window = 4, 16
  duo = DuoSpec.from_num_full(num_full, config.num_key_value_heads, sink=sink, window=window)
  model = build_model(config, params, duo)
  prompt = tokenizer.encode("The grass is green. " * 12)  # longer than sink + window: the ring wraps
  assert len(prompt) > 2 * (sink + window)
  num_streaming = int((config.num_key_value_heads - num_full).sum())
  ring_bytes = num_streaming * (sink + window) * config.head_dim * 2 * 4 + config.num_hidden_layers * (sink + window) * 4
  sizes = []
  for max_len in (128, 512):
    gen = Generator(model, tokenizer, max_len=max_len, chunk_size=32, impl="reference")
    result = gen.generate(prompt, max_new_tokens=8)
    assert result.stop_reasons == ["max_new_tokens"] and len(result.tokens[0]) == 8
    sizes.append(result.cache_bytes)
    seq = prompt + result.tokens[0]
    logits = np.asarray(model(jnp.asarray([seq]), impl="reference"))[0]  # one pass, duo mask, no cache
    assert logits[len(prompt) - 1:-1].argmax(-1).tolist() == result.tokens[0]
  assert sizes[0]["streaming"] == sizes[1]["streaming"] == ring_bytes  # float32 k and v, int32 positions
  retrieval_per_slot = int(num_full.sum()) * config.head_dim * 2 * 4
  assert [s["retrieval"] for s in sizes] == [128 * retrieval_per_slot, 512 * retrieval_per_slot]


def test_no_recompilation_within_a_bucket(smollm2):
  config, params, tokenizer, model = smollm2
  gen = Generator(model, tokenizer, max_len=128, impl="reference")
  prompts = ["Hello there", "A different prompt of another length"]
  lengths = [len(tokenizer.encode(p)) for p in prompts] + [6, 3]  # the batches' longest prompts below
  assert len(set(lengths)) == 3 and {bucket_length(n, 128) for n in lengths} == {16}  # one bucket
  with jax.log_compiles(False):
    gen.generate(prompts[0], max_new_tokens=5)
    n_prefill, n_decode = gen._prefill._cache_size(), gen._decode._cache_size()
    gen.generate(prompts[1], max_new_tokens=5)
    gen.generate([[1, 2, 3], [4, 5, 6, 7, 8, 9]], max_new_tokens=5)  # batch of 2: new shapes, compiles once
    gen.generate([[1, 2], [4, 5, 6]], max_new_tokens=5)
  assert gen._prefill._cache_size() == n_prefill + 1  # only the batch-of-2 shape was new
  assert gen._decode._cache_size() == n_decode + 1


def test_sampling_filters():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 400)
  draw = lambda cfg: np.asarray(jax.vmap(lambda k: sample_logits(logits, k, cfg))(keys))[:, 0]
  assert set(draw(SamplingConfig(temperature=1.0, top_k=2))) == {0, 1}
  assert set(draw(SamplingConfig(temperature=1.0, top_p=0.7))) == {0, 1}
  assert set(draw(SamplingConfig(temperature=1.0))) == {0, 1, 2, 3}
  assert int(sample_logits(logits, keys[0], SamplingConfig())[0]) == 0


def test_stream_callback_receives_the_text(smollm2, smollm2_golden):
  config, params, tokenizer, model = smollm2
  golden, _ = smollm2_golden
  pieces = []
  gen = Generator(model, tokenizer, max_len=64, impl="reference")
  result = gen.generate([golden["input_ids"][2]], max_new_tokens=12, callback=pieces.append)
  assert "".join(pieces) == result.texts[0] == golden["greedy_text"][2]


# ---- bad input -----------------------------------------------------------------------------------------------

def test_prompt_longer_than_cache(smollm2):
  gen = Generator(smollm2[3], smollm2[2], max_len=64, impl="reference")
  with pytest.raises(ValueError, match=r"prompt of 70 tokens is longer than the cache \(max_len=64\)"):
    gen.generate([list(range(70))], max_new_tokens=1)


def test_max_new_tokens_past_cache(smollm2):
  gen = Generator(smollm2[3], smollm2[2], max_len=64, impl="reference")
  with pytest.raises(ValueError, match=r"prompt \(60 tokens\) \+ max_new_tokens \(10\) = 70 exceeds the cache"):
    gen.generate([list(range(60))], max_new_tokens=10)


def test_empty_prompt(smollm2):
  gen = Generator(smollm2[3], smollm2[2], max_len=64, impl="reference")
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    gen.generate([[1, 2], []], max_new_tokens=2)
  with pytest.raises(ValueError, match="prompt 0 is empty"):
    gen.generate("", max_new_tokens=2)


def test_bad_sampling():
  with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]; got 1.5"):
    SamplingConfig(top_p=1.5)
  with pytest.raises(ValueError, match="temperature must be >= 0; got -1"):
    SamplingConfig(temperature=-1)


def test_generate_gpu_path_lowers_for_cuda_without_a_gpu(monkeypatch):
  """The jitted prefill and decode loop of a bf16 duo model, as a Hopper GPU would run them (prefill kernel,
  decode kernels, GEMVs), lower for CUDA on a CPU-only machine (``jax.export`` for another platform)."""
  from duojax.cache import init_cache  # noqa: PLC0415
  from duojax.config import LlamaConfig  # noqa: PLC0415
  from duojax.kernels import hardware  # noqa: PLC0415
  from tests.lowering import mosaic_gpu_launches  # noqa: PLC0415
  from tests.test_model import random_params  # noqa: PLC0415
  monkeypatch.setattr(hardware, "hopper_device_kind", lambda: "NVIDIA H200 (lowering only)")
  cfg = LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=64, rope_theta=10000.0, rms_norm_eps=1e-5)
  duo = DuoSpec.from_num_full((1, 2), 2, sink=64, window=128)  # a duo layer and an all-full layer
  gen = Generator(build_model(cfg, random_params(cfg), duo, dtype="bfloat16"), max_len=512, chunk_size=128,
                  impl="pallas")
  cache = init_cache(cfg, duo, 2, gen.max_len, gen.cache_dtype)
  tokens, lengths = jnp.zeros((2, 256), jnp.int32), jnp.asarray([256, 100], jnp.int32)
  # two chunks x two layers of prefill attention at least
  assert mosaic_gpu_launches(gen._prefill, gen.graphdef, gen.state, tokens, lengths, cache, chunk_size=128,
                             impl="pallas") >= 4
  decode_launches = mosaic_gpu_launches(
      gen._decode, gen.graphdef, gen.state, cache, jnp.zeros((2, cfg.vocab_size), jnp.float32), jax.random.key(0),
      jnp.asarray([1], jnp.int32), max_new_tokens=4, sampling=SamplingConfig(), impl="pallas", stream=None)
  assert decode_launches >= 2  # decode attention of both layers at least
