"""Mesh parsing, the partition-rule table, and tensor-parallel restores on 4 and 8 fake CPU devices."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from duojax import sharding
from duojax.config import LlamaConfig

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_sharding_worker.py")


# ----------------------------------------------------------------------------------------------- mesh parsing


@pytest.mark.parametrize("spec,want", [
    ("tp=4", {"dp": 1, "tp": 4}),
    ("dp=2,tp=4", {"dp": 2, "tp": 4}),
    (" tp = 2 , dp = 3 ", {"dp": 3, "tp": 2}),
    ("", {"dp": 1, "tp": 1}),
    ({"tp": 8}, {"dp": 1, "tp": 8}),
])
def test_parse_mesh(spec, want):
  assert sharding.parse_mesh(spec) == want


@pytest.mark.parametrize("spec,match", [
    ("pp=2", r"unknown axis 'pp'.*dp, tp"),
    ("tp=0", r"axis 'tp' must be a positive int"),
    ("tp=x", r"axis 'tp' must be a positive int; got 'x'"),
    ("tp=2,tp=2", r"axis 'tp' given twice"),
    ("tp4", r"not of the form axis=size"),
])
def test_parse_mesh_errors(spec, match):
  with pytest.raises(ValueError, match=match):
    sharding.parse_mesh(spec)


def test_make_mesh_checks_device_count():
  n = jax.device_count()
  mesh = sharding.make_mesh(f"tp={n}")
  assert mesh.axis_names == ("dp", "tp") and dict(mesh.shape) == {"dp": 1, "tp": n}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  with pytest.raises(ValueError, match=rf"mesh dp=2,tp={n} has {2 * n} devices but {n} are available"):
    sharding.make_mesh(f"dp=2,tp={n}")


# ----------------------------------------------------------------------------------------------- rules


def _tiny_config(**kw):
  d = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=16,
           num_key_value_heads=8, head_dim=8)
  d.update(kw)
  return LlamaConfig(**d)


def test_every_parameter_has_one_rule():
  from duojax.loading import abstract_params
  abstract = abstract_params(_tiny_config(attention_bias=True, mlp_bias=True), "float32")
  specs = {sharding.path_str(p): s for p, s in jax.tree_util.tree_leaves_with_path(sharding.param_specs(abstract))}
  assert specs["layers/1/attn/q/kernel"] == P(None, "tp")
  assert specs["layers/1/attn/k/kernel"] == P(None, "tp")
  assert specs["layers/1/attn/v/bias"] == P("tp")
  assert specs["layers/1/attn/o/kernel"] == P("tp", None)
  assert specs["layers/1/attn/o/bias"] == P()
  assert specs["layers/0/mlp/gate/kernel"] == P(None, "tp")
  assert specs["layers/0/mlp/up/kernel"] == P(None, "tp")
  assert specs["layers/0/mlp/down/kernel"] == P("tp", None)
  assert specs["embed"] == P() and specs["final_norm/scale"] == P() and specs["lm_head/kernel"] == P()
  assert specs["layers/0/input_norm/scale"] == P()


def test_unknown_parameter_is_an_error():
  with pytest.raises(ValueError, match=r"'layers/0/attn/rotary/freq' matches no partition rule"):
    sharding.spec_for(("layers", 0, "attn", "rotary", "freq"))


def test_indivisible_dimension_is_an_error():
  mesh = sharding.make_mesh("tp=1")
  fake = type("M", (), {"shape": {"dp": 1, "tp": 3}})()
  with pytest.raises(ValueError, match=r"'layers/0/mlp/up/kernel' of shape \(64, 64\).*not divisible by mesh "
                     r"axis 'tp' of size 3"):
    sharding._check_divisible("layers/0/mlp/up/kernel", (64, 64), P(None, "tp"), fake)
  # single-device mesh: everything divides
  sharding.shard_params({"embed": np.zeros((4, 4), np.float32)}, mesh)


# ----------------------------------------------------------------------------------------------- TP restores


@pytest.fixture(scope="module")
def tp4_checkpoint(tmp_path_factory):
  """A tiny random 8-KV-head model with a random pattern, converted with tp=4, plus single-device logits."""
  from duojax.convert import convert
  from duojax.loading import load
  from tests.test_convert import random_params, write_hf

  root = tmp_path_factory.mktemp("tp")
  config = _tiny_config(num_hidden_layers=3)
  params = random_params(config, seed=3)
  write_hf(root / "hf", params, config)
  rng = np.random.default_rng(7)
  full = rng.random((3, 8)) < 0.45
  full[0] = [True, True, True, True, True, False, False, False]   # 5 retrieval heads: 2,1,1,1 over tp=4
  full[1] = [False] * 6 + [True, True]
  from duojax.patterns import BinaryPattern
  meta = convert(hf=str(root / "hf"), out=root / "ckpt", pattern=BinaryPattern(full), sink=2, window=4,
                 dtype="fp32", mesh="tp=4", progress=False)
  assert meta["tp"] == 4
  one = load(root / "ckpt")  # single device, re-balanced for tp=1
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=(2, 20)).astype(np.int32)
  logits = np.asarray(one.model(tokens, impl="reference"))
  # Single-device logits equal those of the unconverted model.
  from duojax.config import DuoSpec
  from duojax.models.params import build_model
  ref = build_model(config, params, DuoSpec(tuple(map(tuple, full.tolist())), sink=2, window=4))
  want = np.asarray(ref(tokens, impl="reference"))
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  np.savez(root / "ref.npz", tokens=tokens, logits=logits, perm=one.perm,
           **{f"k_{l}": params["layers"][l]["attn"]["k"]["kernel"] for l in range(3)})
  return root, full


def _run_worker(root, n_devices, meshes):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, str(WORKER), str(root / "ckpt"), str(root / "ref.npz"), *meshes],
                        env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _check_balanced(result, full):
  tp = result["tp"]
  for l, per_shard in result["shards"].items():
    assert len(per_shard) == tp
    counts = [s["retrieval"] for s in per_shard.values()]
    assert sum(counts) == int(full[int(l)].sum())
    assert max(counts) - min(counts) <= 1, (result["mesh"], l, counts)
    for s in per_shard.values():  # retrieval-first inside each shard
      lay = s["layout"]
      assert lay == sorted(lay, reverse=True), (result["mesh"], l, lay)


@pytest.mark.parametrize("n_devices,meshes", [(4, ["dp=2,tp=2", "tp=4"]), (8, ["tp=8", "dp=4,tp=2"])])
def test_restore_on_other_tp_meshes(tp4_checkpoint, n_devices, meshes):
  root, full = tp4_checkpoint
  results = _run_worker(root, n_devices, meshes)
  assert [r["mesh"] for r in results] == meshes
  for r in results:
    assert r["devices"] == n_devices
    assert r["k_spec"] == str(P(None, "tp"))
    assert r["rel_error"] <= 1e-5, r
    _check_balanced(r, full)


def test_tp_must_divide_kv_heads(tp4_checkpoint):
  root, _ = tp4_checkpoint
  from duojax.loading import load
  with pytest.raises(ValueError, match=r"tp=3 must divide the number of KV heads \(8\)"):
    load(root / "ckpt", mesh="tp=3")


def test_mesh_without_tp_axis_is_an_error(tp4_checkpoint):
  root, _ = tp4_checkpoint
  from duojax.loading import load
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("model",))
  with pytest.raises(ValueError, match=r"mesh axes \('model',\) lack 'tp'"):
    load(root / "ckpt", mesh=mesh)
