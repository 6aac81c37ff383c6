"""Duo prefill attention: the Mosaic-GPU kernel in CPU interpret mode vs the reference (out and lse), the public
``duo_attention`` entry point's argument checks and impl handling. GPU-only tests are marked ``gpu``."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from duojax.kernels import duo_attention
from duojax.kernels.hardware import hopper_device_kind
from duojax.kernels.prefill_mgpu import BlockConfig, duo_prefill_mgpu
from duojax.kernels.reference import duo_attention_reference
from tests.lowering import mosaic_gpu_launches
from tests.oracle import attention_oracle

needs_hopper = pytest.mark.skipif(hopper_device_kind() is None, reason="needs a Hopper GPU")


def _inputs(seed, B, Sq, Hq, Hkv, D, q_offset, dtype):
  ks = jax.random.split(jax.random.key(seed), 3)
  Sk = q_offset + Sq
  q = jax.random.normal(ks[0], (B, Sq, Hq, D), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (B, Sk, Hkv, D), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (B, Sk, Hkv, D), jnp.float32).astype(dtype)
  return q, k, v


def _check(out, lse, q, k, v, **kw):
  f32 = lambda x: x.astype(jnp.float32)
  ref_out, ref_lse = duo_attention_reference(f32(q), f32(k), f32(v), **kw)
  out = np.asarray(out, np.float32)
  ref_out = np.asarray(ref_out)
  assert not np.isnan(out).any()
  assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
  rel = np.linalg.norm(out - ref_out) / np.linalg.norm(ref_out)
  assert rel < 1e-2, rel
  np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), atol=2e-3, rtol=1e-4)


# (B, Sq, Hq, Hkv, D, nf, sink, window, q_offset, dtype, block config); block configs are small so that the
# short CPU cases still exercise several KV steps, sink/window skipping, skip steps and the persistent loop.
CASES = [
    # length not a multiple of the tiles, MHA, some retrieval heads, sink + small window
    (1, 200, 2, 2, 64, 1, 4, 16, 0, jnp.bfloat16, BlockConfig(64, 64, 2)),
    # GQA 3, all streaming, window 1, sink 0, fp16, batch 2
    (2, 77, 6, 2, 64, 0, 0, 1, 0, jnp.float16, BlockConfig(64, 64, 2)),
    # q_offset > 0 (chunked prefill), sink 4, window 1, persistent, 3 stages
    (1, 130, 3, 1, 64, 0, 4, 1, 70, jnp.bfloat16, BlockConfig(64, 64, 3, persistent=True)),
    # all retrieval heads with q_offset, GQA 2
    (1, 260, 4, 2, 64, 2, 4, 20, 64, jnp.bfloat16, BlockConfig(64, 64, 2)),
    # sink spanning a partial block and overlapping the window; block_kv 128; all streaming, persistent
    (1, 300, 4, 2, 64, 0, 100, 40, 129, jnp.bfloat16, BlockConfig(64, 128, 2, persistent=True)),
    # duo layer: full heads over 128-key steps, streaming heads over 64-key steps in the first rows of the
    # same slots, two streaming query heads per CTA (looped tiles)
    (1, 300, 4, 2, 64, 1, 100, 40, 129, jnp.bfloat16, BlockConfig(64, 64, 2, full_block_kv=128, stream_fold=2)),
    # duo layer at head_dim 128 with the D=128 duo blocks: 192-key full steps, 128-key streaming steps, three
    # streaming query heads per CTA (two CTAs per query tile), GQA 2
    (1, 270, 8, 4, 128, 1, 4, 100, 50, jnp.bfloat16,
     BlockConfig(64, 128, 2, full_block_kv=192, stream_fold=3, reduction_scratch_bytes=0,
                 no_auto_barriers=True)),
    # duo layer, streaming tiles first in 3 looped CTAs (num_ctas) taking them round robin across query tiles
    # and heads, then the full heads' CTAs: the D=128 duo default with a partial first query tile
    (1, 270, 8, 4, 128, 1, 4, 100, 50, jnp.bfloat16,
     BlockConfig(64, 128, 2, full_block_kv=192, stream_first=True, reduction_scratch_bytes=0,
                 no_auto_barriers=True)),
    # streaming tiles first across two sequences (batch 2), GQA 2, 4 streaming CTAs (stream_ctas)
    (2, 200, 6, 3, 64, 1, 4, 16, 30, jnp.float16,
     BlockConfig(64, 64, 2, full_block_kv=128, stream_first=True, stream_ctas=4)),
    # head_dim 128 and 256
    (1, 150, 2, 1, 128, 0, 4, 40, 33, jnp.bfloat16, BlockConfig(64, 128, 2)),
    (1, 129, 2, 2, 256, 1, 4, 20, 0, jnp.float16, BlockConfig(64, 64, 2)),
    # all retrieval heads with the all-full layers' 192-key steps (head_dim 128), odd length, q_offset
    (1, 333, 4, 2, 128, 2, 4, 16, 70, jnp.bfloat16,
     BlockConfig(64, 192, 2, reduction_scratch_bytes=0, no_auto_barriers=True)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}S{c[1]}Hq{c[2]}Hkv{c[3]}D{c[4]}nf{c[5]}"
                         f"s{c[6]}w{c[7]}o{c[8]}{jnp.dtype(c[9]).name}{'p' if c[10].persistent else ''}"
                         f"{f'f{c[10].full_block_kv}' if c[10].full_block_kv else ''}"
                         f"{f'x{c[10].stream_fold}' if c[10].stream_fold > 1 else ''}"
                         f"{'sf' if c[10].stream_first else ''}")
def test_interpret_kernel_vs_reference(case):
  B, Sq, Hq, Hkv, D, nf, sink, window, q_offset, dtype, cfg = case
  q, k, v = _inputs(CASES.index(case), B, Sq, Hq, Hkv, D, q_offset, dtype)  # a fixed seed per case
  kw = dict(num_full_kv_heads=nf, sink=sink, window=window, q_offset=q_offset)
  out, lse = duo_prefill_mgpu(q, k, v, config=cfg, interpret=True, num_ctas=3, **kw)
  assert out.dtype == dtype and lse.dtype == jnp.float32
  _check(out, lse, q, k, v, **kw)


def test_public_interpret_pads_head_dim_and_keeps_scale():
  # head_dim 40 is padded to 64 inside; the default scale stays 1/sqrt(40); sm_scale passes through.
  q, k, v = _inputs(7, 1, 100, 2, 1, 40, 0, jnp.bfloat16)
  kw = dict(num_full_kv_heads=0, sink=4, window=30)
  out, lse = duo_attention(q, k, v, impl="interpret", **kw)
  assert out.shape == q.shape
  _check(out, lse, q, k, v, **kw)
  out2, lse2 = duo_attention(q, k, v, impl="interpret", sm_scale=0.3, **kw)
  _check(out2, lse2, q, k, v, sm_scale=0.3, **kw)


def test_reference_impl_and_auto_fallback():
  """impl="reference" (and "auto" off Hopper, which warns once) against the float64 loop oracle, out and lse."""
  from duojax.kernels import hardware  # noqa: PLC0415
  q, k, v = _inputs(3, 1, 40, 4, 2, 64, 8, jnp.float32)
  kw = dict(num_full_kv_heads=1, sink=2, window=5, q_offset=8)
  want_out, want_lse = attention_oracle(q, k, v, **kw)
  impls = ["reference"] + (["auto"] if hopper_device_kind() is None else [])
  for impl in impls:
    hardware._warn_fallback_once.cache_clear()
    if impl == "auto":
      with pytest.warns(RuntimeWarning, match=r"no Hopper GPU found .*runs the pure-JAX reference path"):
        out, lse = duo_attention(q, k, v, impl=impl, **kw)
    else:
      with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, lse = duo_attention(q, k, v, impl=impl, **kw)
    np.testing.assert_allclose(np.asarray(out), want_out, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), want_lse, rtol=1e-5, atol=1e-5)
  if hopper_device_kind() is None:
    with pytest.raises(RuntimeError, match="impl='pallas' needs a Hopper GPU"):
      duo_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), impl="pallas", **kw)


@pytest.mark.parametrize("bad, match", [
    (dict(window=0), "window"),
    (dict(sink=-1), "sink"),
    (dict(num_full_kv_heads=3), "num_full_kv_heads"),
    (dict(q_offset=-1), "q_offset"),
    (dict(q_offset=5), "q_offset"),
    (dict(impl="triton"), "impl"),
])
def test_bad_arguments(bad, match):
  q, k, v = _inputs(0, 1, 16, 4, 2, 64, 0, jnp.bfloat16)
  kw = dict(num_full_kv_heads=1, sink=2, window=4, impl="interpret")
  kw.update(bad)
  with pytest.raises(ValueError, match=match):
    duo_attention(q, k, v, **kw)


def test_default_config_by_layer_kind():
  """All-full layers at head_dim 128 step over 192 keys (SMEM fits only without the reduction scratch), duo
  layers over 192 on full heads and 128 on streaming heads, whose tiles run first; all-streaming layers run
  the persistent grid; other head dims keep their blocks."""
  from duojax.kernels.prefill_mgpu import default_config, layer_kind  # noqa: PLC0415
  assert [layer_kind(nf, 4) for nf in (0, 1, 3, 4)] == ["streaming", "duo", "duo", "full"]
  full, duo, stream = (default_config(128, h) for h in ("full", "duo", "streaming"))
  assert (full.block_kv, full.reduction_scratch_bytes, full.no_auto_barriers, full.persistent) == (192, 0, True, False)
  assert (duo.block_kv, duo.full_block_kv, duo.stream_first, duo.persistent) == (128, 192, True, False)
  assert (stream.block_kv, stream.persistent, stream.named_consumed) == (128, True, False)
  assert default_config(64, "full").block_kv == default_config(64, "duo").block_kv == 128
  assert default_config(256, "full").block_kv == 64
  with pytest.raises(ValueError, match="heads"):
    default_config(128, "mixed")


def test_interpret_mode_warnings(monkeypatch):
  from duojax.kernels import interpret  # noqa: PLC0415
  monkeypatch.setenv("PJRT_NPROC", "1")
  interpret._warn_small_pool.cache_clear()
  with pytest.warns(RuntimeWarning, match=r"has 1 thread\(s\) here.*Set PJRT_NPROC=4"):
    interpret.interpret_params(3)
  monkeypatch.setenv("PJRT_NPROC", "4")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    interpret.interpret_params(3)
    interpret.interpret_params(1)
  monkeypatch.delenv("PJRT_NPROC")
  monkeypatch.setenv("NPROC", "2")
  assert interpret.cpu_pool_size() == 2
  assert jax.config.values["jax_cpu_enable_async_dispatch"] is False  # conftest
  try:
    jax.config.update("jax_cpu_enable_async_dispatch", True)  # the value only: the backend is already made
    with pytest.warns(RuntimeWarning, match=r"jax_cpu_enable_async_dispatch', False"):
      interpret.interpret_params(1)
  finally:
    jax.config.update("jax_cpu_enable_async_dispatch", False)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_interpret_kernel_on_one_cpu_with_sized_pool():
  """Pinned to one CPU, XLA's CPU pool has one thread and the 3-warpgroup interpreted kernel deadlocks (a CI run
  hung this way); with PJRT_NPROC=4, what the warning asks for and conftest sets, it finishes and is right."""
  code = textwrap.dedent("""
      import os
      os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
      import jax.numpy as jnp, numpy as np
      from duojax.kernels.interpret import use_synchronous_cpu_dispatch
      use_synchronous_cpu_dispatch()  # as conftest does
      from tests.test_prefill_kernel import _check, _inputs
      from duojax.kernels.prefill_mgpu import BlockConfig, duo_prefill_mgpu
      q, k, v = _inputs(1, 1, 200, 2, 2, 64, 0, jnp.bfloat16)
      kw = dict(num_full_kv_heads=1, sink=4, window=16, q_offset=0)
      out, lse = duo_prefill_mgpu(q, k, v, config=BlockConfig(64, 64, 2), interpret=True, num_ctas=2, **kw)
      _check(out, lse, q, k, v, **kw)
      print("ok", len(os.sched_getaffinity(0)))
  """)
  env = {**os.environ, "PJRT_NPROC": "4", "JAX_PLATFORMS": "cpu"}
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=repo, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == ["ok", "1"]


@pytest.mark.parametrize("D, Hq, Hkv, nf", [(128, 8, 4, 4), (128, 8, 4, 1), (128, 8, 4, 0), (64, 6, 2, 1),
                                          (256, 4, 2, 1)], ids=["d128_full", "d128_duo", "d128_streaming",
                                                                "d64_duo", "d256_duo"])
def test_gpu_kernel_lowers_for_cuda_without_a_gpu(D, Hq, Hkv, nf):
  """The GPU path (not the interpreter) lowers to a Mosaic-GPU custom call for CUDA on a CPU-only machine
  (``jax.export`` for another platform), with each layer kind's default blocks: lowering errors that the
  interpreter cannot see (e.g. a static index inside ``run_state``) fail here in CI instead of on the GPU."""
  q = jax.ShapeDtypeStruct((1, 200, Hq, D), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, 200 + 24, Hkv, D), jnp.bfloat16)
  fn = lambda q, k, v: duo_prefill_mgpu(q, k, v, num_full_kv_heads=nf, sink=4, window=64, q_offset=24)
  assert mosaic_gpu_launches(fn, q, k, k) == 1


def test_block_config_checks():
  with pytest.raises(ValueError, match="full_block_kv must be >= block_kv"):
    BlockConfig(64, 128, 2, full_block_kv=64)
  with pytest.raises(ValueError, match="stream_fold must be >= 1"):
    BlockConfig(64, 128, 2, stream_fold=0)
  with pytest.raises(ValueError, match="stream_ctas must be >= 1 or None"):
    BlockConfig(64, 128, 2, stream_first=True, stream_ctas=0)
  with pytest.raises(ValueError, match="multiples of 64"):
    BlockConfig(64, 128, 2, full_block_kv=160)
  q, k, v = _inputs(0, 1, 64, 4, 2, 64, 0, jnp.bfloat16)
  with pytest.raises(ValueError, match=r"persistent grid serves layers of one head kind .* 1 of 2 full KV heads"):
    duo_prefill_mgpu(q, k, v, num_full_kv_heads=1, sink=2, window=4, interpret=True,
                     config=BlockConfig(64, 64, 2, persistent=True))


def test_bad_shapes_and_dtypes():
  q, k, v = _inputs(0, 1, 16, 4, 2, 64, 0, jnp.bfloat16)
  kw = dict(num_full_kv_heads=1, sink=2, window=4, impl="interpret")
  with pytest.raises(ValueError, match="dtype"):
    duo_attention(q, k.astype(jnp.float16), v, **kw)
  with pytest.raises(ValueError, match="multiple"):
    duo_attention(q[:, :, :3], k, v, **kw)
  with pytest.raises(ValueError, match="head_dim"):
    duo_attention(q[..., :32], k, v, **kw)
  with pytest.raises(ValueError, match="bfloat16"):  # the kernel takes bf16/fp16 only
    duo_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), **kw)
  big = jnp.zeros((1, 16, 2, 320), jnp.bfloat16)
  with pytest.raises(ValueError, match="head_dim"):
    duo_attention(big, big[:, :, :1], big[:, :, :1], **kw)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("nf", [0, 2, 4])
def test_gpu_kernel_vs_reference(D, nf):
  q, k, v = _inputs(D + nf, 1, 1000, 8, 4, D, 24, jnp.bfloat16)
  kw = dict(num_full_kv_heads=nf, sink=4, window=64, q_offset=24)
  out, lse = duo_attention(q, k, v, impl="pallas", **kw)
  _check(out, lse, q, k, v, **kw)
  assert math.isfinite(float(jnp.max(lse)))
