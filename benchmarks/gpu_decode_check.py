"""GPU correctness of the duo decode kernel against a float64 NumPy oracle (needs a Hopper GPU).

Run: PYTHONPATH=. python benchmarks/gpu_decode_check.py
Fresh random inputs per case; before each kernel run a large NaN-filled buffer is allocated and freed so the
allocator hands its memory to the kernel's outputs (unwritten elements would show up as NaN). Pass: every output
finite and rel L2 error <= 1e-2 against the oracle. Exits 1 on any failure.
"""

from __future__ import annotations

import sys
import time

import numpy as np

import jax
import jax.numpy as jnp

from duojax.kernels import duo_decode_attention
from duojax.kernels.decode_mgpu import DecodeConfig
from tests.test_decode_kernel import make_cache, oracle  # the CPU tests' cache builder and float64 oracle


def poison():
  x = jnp.full((64 * 1024 * 1024,), jnp.nan, jnp.float32)  # 256 MiB
  x.block_until_ready()
  del x


CASES = [
    # B, L, nf, ns, G, D, sink, window, lengths, dtype, streaming_impl, config
    (2, 4096, 2, 2, 4, 128, 64, 256, [4096, 1000], jnp.bfloat16, "auto", None),      # fused launch, bk 64
    (2, 8192, 2, 2, 4, 128, 128, 256, [8192, 3000], jnp.bfloat16, "auto", None),     # fused launch, bk 128
    (2, 4096, 2, 2, 4, 128, 64, 256, [4096, 1000], jnp.bfloat16, "kernel", None),    # separate ring launch
    (2, 4096, 2, 2, 4, 128, 64, 256, [4096, 1000], jnp.bfloat16, "xla", None),
    (2, 8192, 4, 0, 1, 128, 64, 256, [8192, 77], jnp.bfloat16, "auto", None),
    (1, 8192, 0, 4, 3, 128, 128, 256, [5000], jnp.bfloat16, "auto", None),
    (2, 4096, 2, 2, 4, 64, 64, 256, [3000, 4096], jnp.bfloat16, "auto", None),
    (2, 4096, 2, 2, 4, 256, 64, 256, [3000, 130], jnp.bfloat16, "auto", None),
    (2, 4096, 2, 2, 3, 128, 64, 256, [4096, 300], jnp.float16, "auto", None),
    (1, 16384, 2, 1, 8, 128, 64, 256, [16000], jnp.bfloat16, "auto", DecodeConfig(64, 4, 8)),
    (1, 16384, 2, 1, 8, 128, 64, 256, [16000], jnp.bfloat16, "auto", DecodeConfig(64, 2, 8)),
    (1, 16384, 2, 1, 8, 128, 64, 256, [16000], jnp.bfloat16, "auto", DecodeConfig(128, 2, 8)),
    (2, 4096, 2, 2, 4, 128, 64, 256, [4096, 1000], jnp.bfloat16, "kernel", DecodeConfig(128, 2, 4,
                                                                                         p_via_smem=True)),
    (2, 4096, 2, 2, 4, 128, 64, 256, [4096, 1000], jnp.bfloat16, "auto", DecodeConfig(64, 2, 4,
                                                                                       unpadded_q=False)),
    (2, 4096, 1, 1, 16, 64, 64, 256, [4096, 2000], jnp.bfloat16, "auto", None),
    (1, 2048, 1, 1, 64, 64, 64, 256, [1500], jnp.bfloat16, "kernel", None),
    (1, 8192, 8, 0, 8, 128, 64, 256, [8000], jnp.float16, "auto", DecodeConfig(64, 2, 8)),
    # capacity not a multiple of 128 at D=128: the default 64-row blocks, 2 stages, 2 CTAs per SM, fused ring
    (1, 8256, 8, 24, 1, 128, 64, 256, [8200], jnp.bfloat16, "auto", None),  # a Llama-2 duo layer, shorter
    (2, 8256, 2, 2, 4, 128, 64, 256, [8256, 1000], jnp.bfloat16, "auto", None),
]


def main() -> int:
  print(f"jax {jax.__version__}, device {jax.devices()[0].device_kind}", flush=True)
  rng = np.random.default_rng(int(time.time()))
  failures = 0
  for (B, L, nf, ns, G, D, sink, window, lengths, dtype, simpl, cfg) in CASES:
    name = (f"B{B} L{L} nf{nf} ns{ns} G{G} D{D} {jnp.dtype(dtype).name} lengths={lengths} streaming={simpl}"
            f" cfg={cfg}")
    try:
      inputs, k, v = make_cache(rng, B=B, L=L, nf=nf, ns=ns, G=G, D=D, sink=sink, window=window, lengths=lengths,
                                dtype=dtype)
      ref, _ = oracle(inputs["q"], k, v, lengths, nf=nf, G=G, sink=sink, window=window)
      worst = 0.0
      for _ in range(2):
        poison()
        out = duo_decode_attention(**inputs, sink=sink, window=window, impl="pallas", streaming_impl=simpl,
                                   config=cfg)
        out = np.asarray(out.astype(jnp.float32), np.float64)
        if not np.isfinite(out).all():
          raise AssertionError(f"{int((~np.isfinite(out)).sum())} non-finite outputs")
        err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
        worst = max(worst, err)
      ok = worst <= 1e-2
      failures += not ok
      print(f"{'PASS' if ok else 'FAIL'} rel_l2={worst:.2e}  {name}", flush=True)
    except Exception as e:  # noqa: BLE001
      failures += 1
      msg = str(e).strip().splitlines()
      print(f"ERROR {name}: {type(e).__name__}: {' | '.join(msg[:3])[:600]}", flush=True)
  print(f"gpu_decode_check: {len(CASES) - failures}/{len(CASES)} passed", flush=True)
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
