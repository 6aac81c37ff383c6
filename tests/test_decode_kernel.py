"""Duo decode attention: reference vs a float64 oracle, vs the prefill reference, and the Mosaic-GPU kernel in
CPU interpret mode vs the reference; argument checks. GPU-only tests are marked ``gpu``."""

from __future__ import annotations

import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from duojax.kernels import duo_decode_attention
from duojax.kernels.decode_reference import duo_decode_reference
from duojax.kernels.hardware import hopper_device_kind
from duojax.kernels.reference import duo_attention_reference


def _slot(t, sink, window):
  return t if t < sink else sink + (t - sink) % window


def make_cache(rng, *, B, L, nf, ns, G, D, sink, window, lengths, dtype=jnp.bfloat16):
  """Random q and a full K/V history [B, L, nf+ns, D]; the duo cache built from it by appending tokens in order.

  Returns (inputs dict for duo_decode_attention, full history k, v as float32 numpy arrays)."""
  H = nf + ns
  q = rng.standard_normal((B, H * G, D)).astype(np.float32)
  k = rng.standard_normal((B, L, H, D)).astype(np.float32)
  v = rng.standard_normal((B, L, H, D)).astype(np.float32)
  # Round to the kernel dtype once, so every path sees the same values.
  q, k, v = (np.asarray(jnp.asarray(x, dtype).astype(jnp.float32)) for x in (q, k, v))
  R = sink + window
  k_ring = np.zeros((B, R, ns, D), np.float32)
  v_ring = np.zeros((B, R, ns, D), np.float32)
  ring_pos = -np.ones((B, R), np.int32)
  # Garbage beyond each sequence's length in the full cache must never be read.
  k_full = k[:, :, :nf].copy()
  v_full = v[:, :, :nf].copy()
  for b in range(B):
    k_full[b, lengths[b]:] = 1e4
    v_full[b, lengths[b]:] = -300.0  # finite garbage (0 * nan would be nan on any path)
    for t in range(lengths[b]):
      s = _slot(t, sink, window)
      k_ring[b, s] = k[b, t, nf:]
      v_ring[b, s] = v[b, t, nf:]
      ring_pos[b, s] = t
  inputs = dict(
      q=jnp.asarray(q, dtype), k_full=jnp.asarray(k_full, dtype), v_full=jnp.asarray(v_full, dtype),
      lengths=jnp.asarray(lengths, jnp.int32), k_ring=jnp.asarray(k_ring, dtype),
      v_ring=jnp.asarray(v_ring, dtype), ring_pos=jnp.asarray(ring_pos))
  return inputs, k, v


def oracle(q, k, v, lengths, *, nf, G, sink, window, scale=None):
  """float64 brute force from the full history: out [B, Hq, D], lse [B, Hq]."""
  q = np.asarray(q, np.float64)
  B, Hq, D = q.shape
  scale = 1.0 / math.sqrt(D) if scale is None else scale
  out = np.zeros((B, Hq, D))
  lse = np.full((B, Hq), -np.inf)
  for b in range(B):
    p = lengths[b] - 1
    for h in range(Hq):
      kv = h // G
      t = np.arange(k.shape[1])
      vis = (t <= p)
      if kv >= nf:
        vis &= (t < sink) | (t > p - window)
      if not vis.any():
        continue
      s = (k[b, vis, kv].astype(np.float64) @ q[b, h]) * scale
      m = s.max()
      w = np.exp(s - m)
      out[b, h] = w @ v[b, vis, kv].astype(np.float64) / w.sum()
      lse[b, h] = m + np.log(w.sum())
  return out, lse


def rel_l2(x, ref):
  x = np.asarray(x, np.float64)
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


CASES = [
    # B, L, nf, ns, G, D, sink, window, lengths
    dict(B=2, L=256, nf=2, ns=2, G=3, D=64, sink=4, window=60, lengths=[200, 37]),    # wrapped / partly filled
    dict(B=2, L=256, nf=3, ns=0, G=1, D=64, sink=4, window=60, lengths=[256, 1]),     # all retrieval
    dict(B=2, L=128, nf=0, ns=3, G=1, D=64, sink=8, window=56, lengths=[128, 20]),    # all streaming
    dict(B=1, L=320, nf=1, ns=1, G=3, D=128, sink=16, window=48, lengths=[257]),
    dict(B=2, L=640, nf=1, ns=1, G=2, D=64, sink=4, window=60, lengths=[300, 130]),   # fill << capacity
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"nf{c['nf']}ns{c['ns']}G{c['G']}D{c['D']}")
def test_reference_vs_float64_oracle(case):
  rng = np.random.default_rng(0)
  inputs, k, v = make_cache(rng, **case)
  out, lse = duo_decode_reference(**inputs, sink=case["sink"], window=case["window"])
  ref, ref_lse = oracle(inputs["q"], k, v, case["lengths"], nf=case["nf"], G=case["G"], sink=case["sink"],
                        window=case["window"])
  assert rel_l2(out, ref) < 1e-2
  np.testing.assert_allclose(np.asarray(lse), ref_lse, rtol=1e-4, atol=1e-4)


def test_reference_matches_prefill_reference():
  rng = np.random.default_rng(1)
  case = CASES[0]
  inputs, k, v = make_cache(rng, **case)
  out, lse = duo_decode_reference(**inputs, sink=case["sink"], window=case["window"])
  lengths = np.asarray(case["lengths"])
  k_hist = jnp.asarray(k, jnp.bfloat16)
  v_hist = jnp.asarray(v, jnp.bfloat16)
  o2, lse2 = duo_attention_reference(inputs["q"][:, None], k_hist, v_hist, num_full_kv_heads=case["nf"],
                                     sink=case["sink"], window=case["window"], q_offset=jnp.asarray(lengths - 1))
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(o2[:, 0], np.float32), atol=2e-2)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(lse2[:, :, 0]), rtol=1e-5, atol=1e-5)


def test_reference_scale_and_empty_row():
  rng = np.random.default_rng(2)
  case = dict(B=2, L=64, nf=1, ns=1, G=2, D=64, sink=2, window=6, lengths=[10, 0])
  inputs, k, v = make_cache(rng, **case)
  out, lse = duo_decode_reference(**inputs, sink=2, window=6, sm_scale=0.3)
  ref, ref_lse = oracle(inputs["q"], k, v, case["lengths"], nf=1, G=2, sink=2, window=6, scale=0.3)
  assert rel_l2(out, ref) < 1e-2
  assert np.all(np.asarray(out[1], np.float32) == 0) and np.all(np.isneginf(np.asarray(lse[1])))
  np.testing.assert_allclose(np.asarray(lse[0]), ref_lse[0], rtol=1e-4)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"nf{c['nf']}ns{c['ns']}G{c['G']}D{c['D']}")
def test_interpret_kernel_vs_reference(case):
  rng = np.random.default_rng(3)
  inputs, k, v = make_cache(rng, **case)
  ref, ref_lse = duo_decode_reference(**inputs, sink=case["sink"], window=case["window"])
  from duojax.kernels.decode_mgpu import DecodeConfig
  cfg = DecodeConfig(block_kv=64, num_stages=2, blocks_per_split=2)  # several splits, refills of the ring
  out, lse = duo_decode_attention(**inputs, sink=case["sink"], window=case["window"], interpret=True,
                                  return_lse=True, config=cfg)
  assert out.shape == ref.shape and out.dtype == ref.dtype
  assert np.isfinite(np.asarray(out, np.float32)).all()
  assert rel_l2(out, np.asarray(ref, np.float64)) < 1e-2
  np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), rtol=1e-3, atol=1e-3)


HOSTED_CASES = [
    CASES[0],  # 2 retrieval heads hosting one ring each; the 37-token sequence's hosting splits read no block
    dict(B=2, L=512, nf=1, ns=3, G=2, D=64, sink=4, window=60, lengths=[500, 65]),  # 3 rings in one head's splits
    dict(B=1, L=384, nf=2, ns=1, G=2, D=128, sink=16, window=112, lengths=[383]),  # ring of 2 blocks, one host
]


@pytest.mark.parametrize("case", HOSTED_CASES, ids=lambda c: f"nf{c['nf']}ns{c['ns']}D{c['D']}")
def test_interpret_kernel_rings_hosted_by_retrieval_splits(case):
  """``host_ring``: the streaming rings run inside retrieval CTAs whose splits are shortened; same results."""
  rng = np.random.default_rng(8)
  inputs, k, v = make_cache(rng, **case)
  ref, ref_lse = oracle(inputs["q"], k, v, case["lengths"], nf=case["nf"], G=case["G"], sink=case["sink"],
                        window=case["window"])
  from duojax.kernels.decode_mgpu import DecodeConfig
  cfg = DecodeConfig(block_kv=64, num_stages=2, blocks_per_split=2, host_ring=True)
  out, lse = duo_decode_attention(**inputs, sink=case["sink"], window=case["window"], interpret=True,
                                  return_lse=True, config=cfg, streaming_impl="fused")
  assert rel_l2(out, ref) < 1e-2
  np.testing.assert_allclose(np.asarray(lse), ref_lse, rtol=1e-3, atol=1e-3)


def test_hosted_split_ranges_tile_the_filled_blocks():
  """Brute force over lengths and shapes: the retrieval ranges of a head's splits are disjoint, in order and
  cover exactly its filled blocks; a hosting split reads ``ring_blocks`` fewer than the others' share."""
  from duojax.kernels.decode_mgpu import _hosted_split_range, hosted_rings
  for nf, ns, splits, rb in [(1, 3, 4, 1), (2, 2, 2, 1), (8, 24, 33, 5), (4, 4, 66, 5), (3, 7, 5, 2)]:
    for length in [0, 1, 63, 64, 65, 200, 64 * 37 + 5, 64 * 300]:
      nblk = -(-length // 64)
      for h in range(nf):
        k = int(hosted_rings(jnp.int32(h), nf=nf, ns=ns))
        assert k == sum(1 for i in range(ns) if i % nf == h)
        covered = []
        per = max(-(-(nblk + k * rb) // splits), 1)
        for sp in range(splits):
          start, n, hosts = (int(x) for x in _hosted_split_range(
              jnp.int32(length), jnp.int32(h), jnp.int32(sp), splits=splits, block_kv=64, nf=nf, ns=ns,
              ring_blocks=rb))
          assert bool(hosts) == (sp < k)
          assert n <= (max(per - rb, 0) if hosts else per)
          covered += list(range(start, start + n))
        assert covered == list(range(nblk)), (nf, ns, splits, rb, length, h)


def test_hosted_rings_need_a_split_each():
  rng = np.random.default_rng(9)
  case = dict(B=1, L=128, nf=1, ns=3, G=1, D=64, sink=4, window=60, lengths=[100])
  inputs, _, _ = make_cache(rng, **case)
  from duojax.kernels.decode_mgpu import DecodeConfig
  with pytest.raises(ValueError, match="ns=3 > nf \\* splits = 1 \\* 2"):
    duo_decode_attention(**inputs, sink=4, window=60, interpret=True, streaming_impl="fused",
                         config=DecodeConfig(block_kv=64, num_stages=2, blocks_per_split=1, host_ring=True))


@pytest.mark.parametrize("streaming_impl", ["kernel", "xla"])
def test_interpret_separate_streaming_paths(streaming_impl):
  # CASES[0] runs the fused single launch under "auto"; here the separate ring launch and the XLA ring path.
  rng = np.random.default_rng(7)
  case = CASES[0]
  inputs, k, v = make_cache(rng, **case)
  ref, _ = duo_decode_reference(**inputs, sink=case["sink"], window=case["window"])
  from duojax.kernels.decode_mgpu import DecodeConfig
  out = duo_decode_attention(**inputs, sink=case["sink"], window=case["window"], interpret=True,
                             streaming_impl=streaming_impl, config=DecodeConfig(64, 2, 2))
  assert rel_l2(out, np.asarray(ref, np.float64)) < 1e-2


def test_interpret_streaming_xla_path_and_fp16():
  rng = np.random.default_rng(4)
  case = dict(B=2, L=128, nf=1, ns=1, G=3, D=64, sink=3, window=20, lengths=[100, 5])  # R=23: no kernel
  inputs, k, v = make_cache(rng, dtype=jnp.float16, **case)
  out = duo_decode_attention(**inputs, sink=3, window=20, interpret=True)
  ref, _ = oracle(inputs["q"], k, v, case["lengths"], nf=1, G=3, sink=3, window=20)
  assert out.dtype == jnp.float16
  assert rel_l2(out, ref) < 1e-2


def test_bad_inputs():
  rng = np.random.default_rng(5)
  case = dict(B=1, L=64, nf=1, ns=1, G=2, D=64, sink=2, window=6, lengths=[10])
  inputs, _, _ = make_cache(rng, **case)
  kw = dict(sink=2, window=6, impl="reference")
  with pytest.raises(ValueError, match="q must be 3-D"):
    duo_decode_attention(**{**inputs, "q": inputs["q"][:, None]}, **kw)
  with pytest.raises(ValueError, match="multiple of the number of KV heads"):
    duo_decode_attention(**{**inputs, "q": inputs["q"][:, :3]}, **kw)
  with pytest.raises(ValueError, match="sink \\+ window"):
    duo_decode_attention(**inputs, sink=2, window=7, impl="reference")
  with pytest.raises(ValueError, match="ring_pos must have shape"):
    duo_decode_attention(**{**inputs, "ring_pos": inputs["ring_pos"][:, :4]}, **kw)
  with pytest.raises(ValueError, match="lengths must have shape"):
    duo_decode_attention(**{**inputs, "lengths": jnp.zeros((2,), jnp.int32)}, **kw)
  with pytest.raises(ValueError, match="share one dtype"):
    duo_decode_attention(**{**inputs, "k_full": inputs["k_full"].astype(jnp.float16)}, **kw)
  with pytest.raises(ValueError, match="same shape"):
    duo_decode_attention(**{**inputs, "v_ring": inputs["v_ring"][:, :4]}, **kw)
  with pytest.raises(ValueError, match="head_dim"):
    duo_decode_attention(**{**inputs, "k_full": inputs["k_full"][..., :32]}, **kw)
  with pytest.raises(ValueError, match="integer"):
    duo_decode_attention(**{**inputs, "lengths": inputs["lengths"].astype(jnp.float32)}, **kw)
  with pytest.raises(ValueError, match="window must be"):
    duo_decode_attention(**inputs, sink=2, window=0, impl="reference")
  with pytest.raises(ValueError, match="streaming_impl must be"):
    duo_decode_attention(**inputs, sink=2, window=6, impl="reference", streaming_impl="triton")
  with pytest.raises(ValueError, match="impl must be"):
    duo_decode_attention(**inputs, sink=2, window=6, impl="cuda")
  with pytest.raises(ValueError, match="unsupported dtype"):
    f32 = {n: (x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x) for n, x in inputs.items()}
    duo_decode_attention(**f32, sink=2, window=6, interpret=True)
  with pytest.raises(ValueError, match="multiple of 64"):
    short = {**inputs, "k_full": inputs["k_full"][:, :40], "v_full": inputs["v_full"][:, :40]}
    duo_decode_attention(**short, sink=2, window=6, interpret=True)
  if hopper_device_kind() is None:
    with pytest.raises(RuntimeError, match="Hopper"):
      duo_decode_attention(**inputs, sink=2, window=6, impl="pallas")


needs_hopper = pytest.mark.skipif(hopper_device_kind() is None, reason="needs a Hopper GPU")


@pytest.mark.parametrize("D, G, sink, window", [(128, 4, 128, 256), (128, 1, 64, 256), (64, 8, 4, 61),
                                                (256, 2, 128, 256)],
                         ids=["d128_fused", "d128_two_launches", "d64_xla_ring", "d256_fused"])
def test_gpu_kernels_lower_for_cuda_without_a_gpu(monkeypatch, D, G, sink, window):
  """The Hopper path of duo_decode_attention (not the interpreter) lowers to Mosaic-GPU custom calls for CUDA on
  a CPU-only machine (``jax.export`` for another platform); the ring size picks the fused launch, a second
  kernel launch for the ring, or plain JAX over the ring."""
  from duojax.kernels import decode  # noqa: PLC0415
  from tests.lowering import mosaic_gpu_launches  # noqa: PLC0415
  monkeypatch.setattr(decode, "resolve_impl", lambda impl, name: "pallas")  # as on a Hopper GPU
  B, L, nf, ns, R = 2, 1024, 2, 2, sink + window
  sds = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)
  args = (sds((B, (nf + ns) * G, D)), sds((B, L, nf, D)), sds((B, L, nf, D)), sds((B,), jnp.int32),
          sds((B, R, ns, D)), sds((B, R, ns, D)), sds((B, R), jnp.int32))
  launches = mosaic_gpu_launches(lambda *a: duo_decode_attention(*a, sink=sink, window=window, impl="pallas"),
                                 *args)
  assert launches == (1 if R % 128 == 0 else 2 if R % 64 == 0 else 1), launches


def test_hosted_rings_lower_for_cuda_without_a_gpu(monkeypatch):
  """With ``HOST_RING`` the default config of a fused duo layer hosts the rings: still one Mosaic-GPU launch."""
  from duojax.kernels import decode, decode_mgpu  # noqa: PLC0415
  from tests.lowering import mosaic_gpu_launches  # noqa: PLC0415
  monkeypatch.setattr(decode, "resolve_impl", lambda impl, name: "pallas")
  monkeypatch.setattr(decode, "HOST_RING", True)
  seen = []
  real = decode_mgpu.decode_partials_duo
  monkeypatch.setattr(decode_mgpu, "decode_partials_duo", lambda *a, **kw: seen.append(kw["config"]) or real(*a, **kw))
  B, L, nf, ns, G, D, sink, window = 1, 4160, 2, 6, 4, 128, 64, 256  # 64-row blocks, as at capacity 131,136
  sds = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)
  args = (sds((B, (nf + ns) * G, D)), sds((B, L, nf, D)), sds((B, L, nf, D)), sds((B,), jnp.int32),
          sds((B, sink + window, ns, D)), sds((B, sink + window, ns, D)), sds((B, sink + window), jnp.int32))
  launches = mosaic_gpu_launches(lambda *a: duo_decode_attention(*a, sink=sink, window=window, impl="pallas"),
                                 *args)
  assert launches == 1 and seen and seen[0].host_ring, (launches, seen)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("lengths", [[8192, 3000], [8192, 400]])
def test_gpu_kernel_rings_hosted_vs_oracle(lengths):
  """The hosted-ring schedule on the GPU (register-operand path), with a sequence so short that its hosting
  splits read no retrieval block."""
  from duojax.kernels.decode_mgpu import pick_config
  rng = np.random.default_rng(10)
  case = dict(B=2, L=8192, nf=2, ns=6, G=4, D=128, sink=64, window=256, lengths=lengths)
  inputs, k, v = make_cache(rng, **case)
  cfg = pick_config(8192, 128, 2 * 2, block_kv=64, other_ctas=0, host_ring=True)
  out = duo_decode_attention(**inputs, sink=64, window=256, impl="pallas", streaming_impl="fused", config=cfg)
  ref, _ = oracle(inputs["q"], k, v, lengths, nf=2, G=4, sink=64, window=256)
  assert rel_l2(out, ref) < 1e-2


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("G", [1, 4])
def test_gpu_kernel_vs_oracle(D, G):
  rng = np.random.default_rng(6)
  case = dict(B=2, L=2048, nf=2, ns=2, G=G, D=D, sink=64, window=256, lengths=[2048, 700])
  inputs, k, v = make_cache(rng, **case)
  out = duo_decode_attention(**inputs, sink=64, window=256, impl="pallas")
  ref, _ = oracle(inputs["q"], k, v, case["lengths"], nf=2, G=G, sink=64, window=256)
  assert rel_l2(out, ref) < 1e-2


@pytest.mark.parametrize("S", [1, 5, 33, 131])
def test_combine_partials_vs_float64(S):
  """The split combine (an unrolled chain up to ``UNROLL_SPLITS`` splits, an XLA reduce above; weights fused or
  computed apart) against float64 numpy, with empty splits (lse -inf) and one head that saw nothing at all."""
  from duojax.kernels.decode_mgpu import MATERIALIZE_SPLITS, UNROLL_SPLITS, combine_partials
  assert 5 < MATERIALIZE_SPLITS <= 33 <= UNROLL_SPLITS < 131  # the cases cover every path
  rng = np.random.default_rng(11)
  B, H, G, D = 2, 3, 4, 16
  o = rng.standard_normal((B, H, S, 64, D)).astype(np.float32)
  lse2 = (rng.standard_normal((B, H, S, 64)) * 3).astype(np.float32)
  lse2[:, :, ::2] = -np.inf  # every other split saw nothing
  lse2[1, 2] = -np.inf
  out, lse = combine_partials(jnp.asarray(o), jnp.asarray(lse2), G)
  l64 = lse2[:, :, :, :G].astype(np.float64)
  with np.errstate(invalid="ignore"):
    w = np.exp2(l64 - np.max(l64, axis=2, keepdims=True))
  w = np.nan_to_num(w)
  tot = w.sum(axis=2)
  ref = np.einsum("bhsg,bhsgd->bhgd", w, o[:, :, :, :G].astype(np.float64)) / np.where(tot > 0, tot, 1)[..., None]
  with np.errstate(divide="ignore"):
    ref_lse = np.where(tot > 0, (np.max(l64, axis=2) + np.log2(np.where(tot > 0, tot, 1))) * np.log(2), -np.inf)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(lse), ref_lse, rtol=1e-6, atol=1e-6)
  if S > 1:
    assert np.all(np.asarray(out)[1, 2] == 0) and np.all(np.isneginf(np.asarray(lse)[1, 2]))
