"""duojax.convert: streaming HF/GGUF conversion with head reordering, duojax.load, and bad inputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import duojax
from duojax import checkpoint
from duojax.config import DuoSpec, LlamaConfig
from duojax.convert import METADATA_FILE, ConvertError, convert, main
from duojax.io.hf_names import params_to_hf_tensors
from duojax.models.params import build_model
from duojax.models.reorder import reorder_heads
from duojax.patterns import BinaryPattern, DuoPattern, save_pattern
from tests.oracle import llama_oracle, rel_l2
from tests.shared_data import SHARED, optional_shared, require_shared

REPO = Path(__file__).resolve().parents[1]
LLAMA2_PATTERN = SHARED / "patterns" / "Llama-2-7B-32K-Instruct" / "lr=0.02-reg=0.05-ctx=1000_32000-multi_passkey10"

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=16,
            num_key_value_heads=8, head_dim=8)


# ----------------------------------------------------------------------------------------------- helpers


def random_params(config: LlamaConfig, seed: int = 0, dtype=np.float32) -> dict:
  """Random numpy parameters in the duojax layout (norm scales around 1)."""
  from duojax.loading import abstract_params
  rng = np.random.default_rng(seed)

  def make(path, s):
    if path[-1].key == "scale":
      x = 1.0 + 0.1 * rng.standard_normal(s.shape)
    else:
      x = 0.2 * rng.standard_normal(s.shape)
    return x.astype(np.float32).astype(dtype)
  return jax.tree_util.tree_map_with_path(make, abstract_params(config, "float32"))


def write_hf(directory, params, config: LlamaConfig, shards: int = 1, dtype=None) -> Path:
  """Writes an HF-format checkpoint (config.json + safetensors, sharded with an index when ``shards > 1``)."""
  d = Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  tensors = params_to_hf_tensors(params)
  if dtype is not None:
    tensors = {k: np.ascontiguousarray(v.astype(dtype)) for k, v in tensors.items()}
  (d / "config.json").write_text(json.dumps(config.to_hf()))
  if shards == 1:
    save_file(tensors, str(d / "model.safetensors"))
    return d
  names = list(tensors)
  weight_map = {}
  for i, chunk in enumerate(np.array_split(np.arange(len(names)), shards)):
    file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
    save_file({names[j]: tensors[names[j]] for j in chunk}, str(d / file))
    weight_map.update({names[j]: file for j in chunk})
  (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  return d


def stored_params(path, config, dtype):
  """The raw parameter tree of a converted checkpoint (saved layout, no re-balancing), as numpy."""
  from duojax.loading import abstract_params
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one),
                        abstract_params(config, dtype))
  return jax.tree.map(np.asarray, checkpoint.restore_params(Path(path) / checkpoint.PARAMS_DIR, target))


def assert_trees_equal(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (p, x), (_, y) in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape, p
    np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8), err_msg=str(p))


@pytest.fixture
def tiny(tmp_path):
  config = LlamaConfig(**TINY)
  params = random_params(config, seed=1)
  return config, params, write_hf(tmp_path / "hf", params, config)


# ----------------------------------------------------------------------------------------------- conversion


def test_streaming_bf16_sharded_matches_reorder_heads(tmp_path):
  config = LlamaConfig(**TINY)
  params = random_params(config, seed=2, dtype=ml_dtypes.bfloat16)
  src = write_hf(tmp_path / "hf", params, config, shards=3)
  full = np.random.default_rng(0).random((2, 8)) < 0.5
  meta = convert(hf=str(src), out=tmp_path / "out", pattern=BinaryPattern(full), sink=4, window=16, dtype="bf16",
                 mesh="dp=2,tp=2", progress=False)
  want, perm, spec = reorder_heads(params, config, full, sink=4, window=16, tp=2)
  assert_trees_equal(stored_params(tmp_path / "out", config, "bfloat16"), want)  # bitwise, bf16 end to end
  assert all(dt == "bfloat16" for _, dt in meta["params"].values())
  saved = json.loads((tmp_path / "out" / METADATA_FILE).read_text())
  assert saved["perm"] == perm.tolist()
  assert saved["layout_full"] == [list(map(int, r)) for r in spec.full]
  assert saved["pattern"]["full"] == full.astype(int).tolist()
  assert saved["sparsity"] == pytest.approx(1 - full.mean())
  assert (saved["sink"], saved["window"], saved["tp"], saved["mesh"]) == (4, 16, 2, {"dp": 2, "tp": 2})
  assert saved["dtype"] == "bfloat16" and saved["source"]["kind"] == "hf" and saved["duojax_version"]
  assert LlamaConfig.from_hf(saved["config"]) == config
  # Independent of reorder_heads: the loaded model's logits against the float64 oracle on the original head order.
  loaded = duojax.load(tmp_path / "out", dtype="fp32")
  tokens = np.random.default_rng(1).integers(0, config.vocab_size, (1, 40))
  got = loaded.model(jnp.asarray(tokens, jnp.int32), impl="reference")
  want = llama_oracle(jax.tree.map(lambda x: np.asarray(x, np.float64), params), config, tokens,
                      full=full.tolist(), sink=4, window=16)
  assert rel_l2(got, want) < 1e-4
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_fp32_convert_and_load_reproduce_logits(tiny, tmp_path):
  config, params, src = tiny
  full = np.array([[True, False] * 4, [False] * 7 + [True]])
  convert(hf=str(src), out=tmp_path / "out", pattern=BinaryPattern(full), sink=2, window=4, dtype="fp32",
          mesh="tp=4", progress=False, verify=True)
  loaded = duojax.load(tmp_path / "out")
  assert loaded.duo.full[1] == (True,) + (False,) * 7      # re-balanced for tp=1: retrieval first
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 16)), jnp.int32)
  ref = build_model(config, params, DuoSpec(tuple(map(tuple, full.tolist())), sink=2, window=4))
  want = np.asarray(ref(tokens, impl="reference"))
  got = np.asarray(loaded.model(tokens, impl="reference"))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  half = duojax.load(tmp_path / "out", dtype="bf16")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(half.params))
  assert half.metadata["dtype"] == "float32" and half.tokenizer is None


def test_cli_with_pattern_dir_and_force(tiny, tmp_path, capsys):
  config, _, src = tiny
  gates = np.linspace(0, 1, 16).reshape(2, 8)
  save_pattern(DuoPattern(gates, sink_size=8, recent_size=32), tmp_path / "pattern")
  out = tmp_path / "out"
  args = ["--hf", str(src), "--pattern", str(tmp_path / "pattern"), "--sparsity", "0.75", "--mesh", "tp=2",
          "--dtype", "fp32", "--out", str(out), "--quiet"]
  assert main(args) == 0
  meta = json.loads((out / METADATA_FILE).read_text())
  assert (meta["sink"], meta["window"]) == (8, 32)  # from the pattern's config.json
  assert meta["sparsity"] == 0.75 and meta["pattern"]["sparsity_requested"] == 0.75
  assert "sparsity 0.7500" in capsys.readouterr().out
  # Exists: refused, untouched.
  (out / "marker").write_text("keep")
  assert main(args) == 2
  assert "already exists; pass --force" in capsys.readouterr().err
  assert (out / "marker").read_text() == "keep"
  # --force swaps in a fresh checkpoint.
  assert main(args + ["--force"]) == 0
  assert not (out / "marker").exists() and (out / METADATA_FILE).is_file()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_help():
  proc = subprocess.run([sys.executable, "-m", "duojax.convert", "--help"], capture_output=True, text=True,
                        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
  assert proc.returncode == 0
  for flag in ("--hf", "--gguf", "--pattern", "--sparsity", "--threshold", "--sink", "--window", "--dtype", "--mesh",
               "--out", "--force", "--verify"):
    assert flag in proc.stdout


def test_no_pattern_means_all_retrieval(tiny, tmp_path):
  _, _, src = tiny
  meta = convert(hf=str(src), out=tmp_path / "out", dtype="fp32", progress=False)
  assert meta["sparsity"] == 0.0 and all(all(r) for r in meta["layout_full"])
  assert (meta["sink"], meta["window"], meta["tp"]) == (128, 256, 1)
  assert meta["perm"] == [list(range(8))] * 2


def test_real_llama2_pattern_on_32_layers(tmp_path):
  require_shared(LLAMA2_PATTERN)
  config = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=64, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, head_dim=8)
  params = random_params(config, seed=4)
  src = write_hf(tmp_path / "hf", params, config, shards=2)
  meta = convert(hf=str(src), out=tmp_path / "out", pattern=str(LLAMA2_PATTERN), sparsity=0.5, dtype="fp32",
                 mesh="tp=4", progress=False)
  assert meta["sparsity"] == 0.5 and meta["pattern"]["sparsity_requested"] == 0.5
  assert (meta["sink"], meta["window"]) == (128, 256)  # Llama-2 run config: sink_size 128, recent_size 256
  full = np.asarray(meta["pattern"]["full"], bool)
  assert full.shape == (32, 32) and full.sum() == 512
  layout = np.asarray(meta["layout_full"], bool).reshape(32, 4, 8)
  counts = layout.sum(-1)
  assert (counts.max(1) - counts.min(1) <= 1).all()
  want, _, _ = reorder_heads(params, config, full, sink=128, window=256, tp=4)
  assert_trees_equal(stored_params(tmp_path / "out", config, "float32"), want)


# ----------------------------------------------------------------------------------------------- SmolLM2


def _greedy(loaded, ids, new_tokens, length):
  from flax import nnx
  graphdef, state = nnx.split(loaded.model)

  @jax.jit
  def forward(state, tokens):
    return nnx.merge(graphdef, state)(tokens, impl="reference")

  ids, out = list(ids), []
  for _ in range(new_tokens):
    buf = np.zeros((1, length), np.int32)
    buf[0, :len(ids)] = ids
    nxt = int(np.argmax(np.asarray(forward(state, jnp.asarray(buf)))[0, len(ids) - 1]))
    out.append(nxt)
    ids.append(nxt)
    if nxt in loaded.config.eos_token_ids:
      break
  return out


def test_smollm2_gguf_and_hf_identical_and_golden(tmp_path, smollm2_gguf, smollm2_golden):
  from duojax.io import default_model_path
  config, params, tok = smollm2_gguf
  golden, _ = smollm2_golden
  convert(gguf=default_model_path(), out=tmp_path / "from_gguf", dtype="fp32", progress=False)
  src = write_hf(tmp_path / "hf", params, config)
  hf_tokenizer = optional_shared(SHARED / "golden" / "smollm2" / "tokenizer")
  for f in hf_tokenizer.glob("*") if hf_tokenizer else ():
    (src / f.name).write_bytes(f.read_bytes())
  convert(hf=str(src), out=tmp_path / "from_hf", dtype="fp32", progress=False)
  a = stored_params(tmp_path / "from_gguf", config, "float32")
  b = stored_params(tmp_path / "from_hf", config, "float32")
  # Both sources land on the same tensors, and the checkpoint round trip (write, restore) is lossless. The
  # importers are duojax's own on both sides; the independent check is HF's golden tokens below.
  assert_trees_equal(a, b)
  assert_trees_equal(a, params)
  meta = json.loads((tmp_path / "from_gguf" / METADATA_FILE).read_text())
  assert meta["source"]["kind"] == "gguf" and meta["source"]["revision"].startswith("sha256:")
  assert LlamaConfig.from_hf(meta["config"]) == config

  loaded = duojax.load(tmp_path / "from_gguf")
  assert loaded.tokenizer is not None
  length = max(len(i) for i in golden["input_ids"]) + 24
  for i, text in enumerate(golden["texts"]):
    assert loaded.tokenizer.encode(text) == golden["input_ids"][i]
    out = _greedy(loaded, golden["input_ids"][i], 24, length)
    assert out == golden["greedy"][i], i
    assert loaded.tokenizer.decode(out) == golden["greedy_text"][i]
  if hf_tokenizer:  # HF tokenizer files are copied along
    hf_tok = duojax.load(tmp_path / "from_hf").tokenizer
    assert [hf_tok.encode(t) for t in golden["texts"]] == golden["input_ids"]


# ----------------------------------------------------------------------------------------------- bad inputs


def test_missing_shard(tmp_path):
  config = LlamaConfig(**TINY)
  src = write_hf(tmp_path / "hf", random_params(config), config, shards=2)
  (src / "model-00002-of-00002.safetensors").unlink()
  with pytest.raises(ConvertError, match=r"shard 'model-00002-of-00002.safetensors' listed in "
                     r"model.safetensors.index.json is missing"):
    convert(hf=str(src), out=tmp_path / "out", progress=False)
  assert not (tmp_path / "out").exists()


def test_truncated_safetensors(tiny, tmp_path):
  _, _, src = tiny
  f = src / "model.safetensors"
  data = f.read_bytes()
  f.write_bytes(data[:len(data) - 1000])
  with pytest.raises(ConvertError, match=r"model.safetensors: truncated or corrupt"):
    convert(hf=str(src), out=tmp_path / "out", progress=False)
  assert not (tmp_path / "out").exists()


def test_config_does_not_match_weights(tiny, tmp_path):
  _, _, src = tiny
  cfg = json.loads((src / "config.json").read_text())
  cfg["intermediate_size"] = 96
  (src / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ConvertError, match=r"tensor 'model.layers.0.mlp.(gate|up|down)_proj.weight' in model.safetensors "
                     r"has shape \(64, 64\) but config.json .* implies \((96, 64|64, 96)\): the config does not match"):
    convert(hf=str(src), out=tmp_path / "out", progress=False)
  cfg["intermediate_size"], cfg["num_hidden_layers"] = 64, 1
  (src / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ConvertError, match=r"unexpected tensor 'model.layers.1.*config.json does not have it"):
    convert(hf=str(src), out=tmp_path / "out", progress=False)
  assert not (tmp_path / "out").exists()


def test_pattern_of_wrong_shape(tiny, tmp_path):
  _, _, src = tiny
  save_pattern(DuoPattern(np.full((3, 8), 0.5)), tmp_path / "pattern")
  with pytest.raises(ConvertError, match=r"pattern shape \(3, 8\) .* does not match the model's \(2, 8\)"):
    convert(hf=str(src), out=tmp_path / "out", pattern=str(tmp_path / "pattern"), sparsity=0.5, progress=False)
  with pytest.raises(ConvertError, match=r"exactly one of --sparsity .* and --threshold"):
    convert(hf=str(src), out=tmp_path / "out", pattern=str(tmp_path / "pattern"), progress=False)
  assert not (tmp_path / "out").exists()


def test_tp_must_divide_kv_heads(tiny, tmp_path):
  _, _, src = tiny
  with pytest.raises(ConvertError, match=r"tp=3 must divide the number of KV heads \(8\)"):
    convert(hf=str(src), out=tmp_path / "out", mesh="tp=3", progress=False)
  with pytest.raises(ConvertError, match=r"unknown axis 'pp'"):
    convert(hf=str(src), out=tmp_path / "out", mesh="pp=2", progress=False)


def test_existing_out_is_refused(tiny, tmp_path):
  _, _, src = tiny
  out = tmp_path / "out"
  out.mkdir()
  (out / "precious").write_text("x")
  with pytest.raises(ConvertError, match=rf"--out '{out}' already exists; pass --force"):
    convert(hf=str(src), out=out, progress=False)
  assert [p.name for p in out.iterdir()] == ["precious"]


# After the simulated crash, orbax's background thread sometimes posts to its already-closed asyncio loop; Python
# reports that as an unraisable exception. It is orbax's clean-up after the crash this test causes on purpose.
@pytest.mark.filterwarnings("ignore:Exception ignored in:pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_write_leaves_nothing(tiny, tmp_path, monkeypatch, existing):
  from orbax.checkpoint._src.serialization import type_handlers
  _, _, src = tiny
  out = tmp_path / "out"
  if existing:
    out.mkdir()
    (out / "precious").write_text("x")
  original = type_handlers.NumpyHandler._background_serialize
  calls = []

  async def flaky(self, values, infos, args=None):
    calls.append(infos[0].name)
    if len(calls) == 5:
      raise RuntimeError("simulated crash while writing")
    return await original(self, values, infos, args)

  monkeypatch.setattr(type_handlers.NumpyHandler, "_background_serialize", flaky)
  with pytest.raises(RuntimeError, match="simulated crash"):
    convert(hf=str(src), out=out, force=existing, progress=False)
  assert len(calls) >= 5
  if existing:
    assert [p.name for p in out.iterdir()] == ["precious"]
  else:
    assert not out.exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == (["hf", "out"] if existing else ["hf"])


def test_hub_offline_message(tmp_path):
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": str(REPO)}
  out = tmp_path / "out"
  proc = subprocess.run([sys.executable, "-m", "duojax.convert", "--hf", "duojax-test/no-such-model", "--out",
                         str(out)], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  assert proc.returncode == 2, proc.stderr
  assert "error: Hub repo 'duojax-test/no-such-model' is not in the local Hugging Face cache" in proc.stderr
  assert "HF_HUB_OFFLINE=1" in proc.stderr and "Traceback" not in proc.stderr
  assert not out.exists()


def test_not_a_source(tmp_path):
  with pytest.raises(ConvertError, match=r"--hf '/nonexistent/dir' is neither an existing directory nor a Hub"):
    convert(hf="/nonexistent/dir", out=tmp_path / "out", progress=False)
  with pytest.raises(ConvertError, match=r"--gguf '.*missing.gguf' does not exist"):
    convert(gguf=str(tmp_path / "missing.gguf"), out=tmp_path / "out", progress=False)


def test_save_params_roundtrip(tmp_path):
  config = LlamaConfig(**TINY)
  params = random_params(config, seed=5, dtype=ml_dtypes.bfloat16)
  checkpoint.save_params(tmp_path / "ck", params)
  meta = checkpoint.param_metadata(tmp_path / "ck")
  assert meta["layers/1/attn/o/kernel"] == ((128, 64), np.dtype(ml_dtypes.bfloat16))
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), params)
  assert_trees_equal(jax.tree.map(np.asarray, checkpoint.restore_params(tmp_path / "ck", target)), params)


def test_verify_catches_a_wrong_head_order(tiny, tmp_path, monkeypatch):
  import duojax.convert as convert_module
  _, _, src = tiny
  full = np.array([[True, False] * 4, [False] * 7 + [True]])
  monkeypatch.setattr(convert_module, "permute_tensor", lambda path, array, perm, config: array)  # forget to permute
  with pytest.raises(ConvertError, match=r"--verify failed: the converted model's logits differ"):
    convert(hf=str(src), out=tmp_path / "out", pattern=BinaryPattern(full), sink=2, window=4, dtype="bf16",
            progress=False, verify=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_biases_tied_head_and_extra_tensors(tmp_path):
  config = LlamaConfig(**{**TINY, "attention_bias": True, "tie_word_embeddings": True})
  params = random_params(config, seed=6)
  src = write_hf(tmp_path / "hf", params, config)
  from safetensors.numpy import load_file
  tensors = load_file(str(src / "model.safetensors"))
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]            # tied head stored anyway
  tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)  # old HF buffers
  save_file(tensors, str(src / "model.safetensors"))
  full = np.array([[False, True] * 4, [True] + [False] * 7])
  convert(hf=str(src), out=tmp_path / "out", pattern=BinaryPattern(full), dtype="fp32", mesh="tp=2",
          progress=False)
  want, _, _ = reorder_heads(params, config, full, sink=128, window=256, tp=2)
  got = stored_params(tmp_path / "out", config, "float32")
  assert "lm_head" not in got and "bias" in got["layers"][0]["attn"]["q"]
  assert_trees_equal(got, want)
