"""Run one duo prefill kernel (32 heads, head_dim 128, sink 128 + window 256) three times, for Nsight Compute:

    ncu --kernel-name regex:mosaic --launch-skip 2 --launch-count 1 --section WarpStateStats \
        --section SourceCounters -o report python3 benchmarks/ncu_prefill.py 0 16384
    ncu --import report.ncu-rep --page source --print-source sass --csv > source.csv   # stalls per instruction
"""

import sys

import jax
import jax.numpy as jnp

from duojax.kernels.prefill_mgpu import duo_prefill_mgpu


def main() -> None:
  nf = int(sys.argv[1])
  seqlen = int(sys.argv[2]) if len(sys.argv) > 2 else 16384
  q, k, v = (jax.random.normal(key, (1, seqlen, 32, 128), jnp.bfloat16)
             for key in jax.random.split(jax.random.key(0), 3))
  fn = jax.jit(lambda q, k, v: duo_prefill_mgpu(q, k, v, num_full_kv_heads=nf, sink=128, window=256)[0])
  for _ in range(3):
    fn(q, k, v).block_until_ready()


if __name__ == "__main__":
  main()
