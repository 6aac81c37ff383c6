"""The Mosaic-GPU decode GEMV (``duojax.kernels.gemv_mgpu``): CPU interpret mode against a float64 numpy product,
the split chooser, argument checks, and the model's projection dispatch. GPU-only tests are marked ``gpu``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from duojax.kernels import gemv_mgpu
from duojax.kernels.hardware import hopper_device_kind
from duojax.models.dense import dense, dense_group


def _inputs(rng, M, K, Ns, dtype=jnp.bfloat16):
  x = jnp.asarray(rng.standard_normal((M, K)), dtype)
  ws = [jnp.asarray(rng.standard_normal((K, n)) / np.sqrt(K), dtype) for n in Ns]
  return x, ws


def _check_close(ys, x, ws):
  xf = np.asarray(x.astype(jnp.float32), np.float64)
  for y, w in zip(ys, ws):
    ref = xf @ np.asarray(w.astype(jnp.float32), np.float64)
    assert y.shape == ref.shape and y.dtype == x.dtype
    # one rounding of a float32-accumulated product: within a half ulp of the output dtype, plus accumulation
    err = np.abs(np.asarray(y.astype(jnp.float32), np.float64) - ref)
    ulp = 2.0 ** -8 if x.dtype == jnp.bfloat16 else 2.0 ** -11
    assert np.all(err <= ulp * np.abs(ref) + 1e-3 * np.abs(ref).max()), float(err.max())


@pytest.mark.parametrize("M,K,Ns,config", [
    (1, 256, [128], gemv_mgpu.GemvConfig(128, 2, 1)),
    (3, 512, [192], gemv_mgpu.GemvConfig(128, 2, 2)),       # split-K, rows padded to 8
    (9, 384, [64], gemv_mgpu.GemvConfig(64, 3, 4)),         # 16 rows, K in 64-wide tiles, uneven splits
    (2, 256, [128, 64, 192], gemv_mgpu.GemvConfig(128, 2, 2)),  # one launch for three matrices
    (1, 256, [256, 128], gemv_mgpu.GemvConfig(64, 2, 2, block_n=128)),  # 128-column tiles (wgmma M = 128)
])
def test_interpret_vs_float64(M, K, Ns, config):
  x, ws = _inputs(np.random.default_rng(M * 7 + K), M, K, Ns)
  ys = gemv_mgpu.gemv_multi(x, ws, config=config, fast=False, interpret=True)
  _check_close(ys, x, ws)


def test_interpret_fp16_default_config():
  x, ws = _inputs(np.random.default_rng(5), 1, 192, [320], jnp.float16)
  _check_close([gemv_mgpu.gemv(x, ws[0], fast=False, interpret=True)], x, ws)


def test_pick_config_covers_every_k_tile():
  for K, N in [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 22016), (576, 1536), (14336, 4096)]:
    cfg = gemv_mgpu.pick_gemv_config(K, N, block_n=256)
    assert N % cfg.block_n == 0
    k_tiles = K // cfg.block_k
    per = -(-k_tiles // cfg.splits)
    assert K % cfg.block_k == 0 and 1 <= cfg.splits <= k_tiles
    assert per * cfg.splits >= k_tiles and per * (cfg.splits - 1) < k_tiles  # no empty split


def test_bad_inputs():
  x = jnp.zeros((1, 128), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"K=128"):
    gemv_mgpu.gemv(x, jnp.zeros((64, 64), jnp.bfloat16))
  with pytest.raises(ValueError, match="share one dtype"):
    gemv_mgpu.gemv(x, jnp.zeros((128, 64), jnp.float16))
  with pytest.raises(ValueError, match="N=96"):
    gemv_mgpu.gemv(x, jnp.zeros((128, 96), jnp.bfloat16))
  with pytest.raises(ValueError, match="M=65"):
    gemv_mgpu.gemv(jnp.zeros((65, 128), jnp.bfloat16), jnp.zeros((128, 64), jnp.bfloat16))
  with pytest.raises(ValueError, match="float32"):
    gemv_mgpu.gemv(jnp.zeros((1, 128), jnp.float32), jnp.zeros((128, 64), jnp.float32))


def test_dense_group_off_hopper_is_dense():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((1, 1, 64)), jnp.float32)
  ps = [{"kernel": jnp.asarray(rng.standard_normal((64, n)), jnp.float32)} for n in (32, 16)]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # the once-per-process "no Hopper GPU" fallback warning
    ys = dense_group(ps, x, impl="auto")
  x64 = np.asarray(x, np.float64)
  for y, p in zip(ys, ps):
    np.testing.assert_allclose(np.asarray(y), x64 @ np.asarray(p["kernel"], np.float64), rtol=1e-4, atol=1e-4)


needs_hopper = pytest.mark.skipif(hopper_device_kind() is None, reason="needs a Hopper GPU")


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("M,K,Ns", [(1, 4096, [4096, 1024, 1024]), (1, 4096, [11008, 11008]), (1, 11008, [4096]),
                                    (4, 576, [1536]), (1, 4096, [32000])])
def test_gpu_kernel_vs_float64(M, K, Ns):
  x, ws = _inputs(np.random.default_rng(K + M), M, K, Ns)
  _check_close(gemv_mgpu.gemv_multi(x, ws), x, ws)


@pytest.mark.gpu
@needs_hopper
def test_gpu_dense_group_takes_the_kernel_and_matches_dense():
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.standard_normal((1, 1, 1024)), jnp.bfloat16)
  ps = [{"kernel": jnp.asarray(rng.standard_normal((1024, n)) / 32, jnp.bfloat16)} for n in (512, 256)]
  hlo = jax.jit(lambda x: dense_group(ps, x, impl="auto")).lower(x).as_text()
  assert "mosaic" in hlo.lower()  # the kernel path was taken
  for y, p in zip(dense_group(ps, x, impl="auto"), ps):
    ref = dense(p, x)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("M,K,Ns", [(1, 4096, [4096, 1024, 1024]), (4, 576, [1536]), (1, 11008, [4096])])
def test_gpu_kernel_lowers_for_cuda_without_a_gpu(M, K, Ns):
  """The GPU path (fast math, not the interpreter) lowers to one Mosaic-GPU custom call for CUDA on a CPU-only
  machine (``jax.export`` for another platform), with the default config."""
  from tests.lowering import mosaic_gpu_launches  # noqa: PLC0415
  x = jax.ShapeDtypeStruct((M, K), jnp.bfloat16)
  ws = [jax.ShapeDtypeStruct((K, n), jnp.bfloat16) for n in Ns]
  assert mosaic_gpu_launches(lambda x, ws: gemv_mgpu.gemv_multi(x, ws), x, ws) == 1
