"""Compile (without running) one duo prefill kernel at 16k tokens, 32 heads, head_dim 128, sink 128 + window 256,
for Mosaic GPU's dumps. Run on the GPU machine with ``MOSAIC_GPU_DUMP_TO=dir MOSAIC_GPU_DUMP_PTX=1
MOSAIC_GPU_DUMP_PTXAS=1``; then ``sass_loops.py`` reads the PTX anywhere.

    python benchmarks/dump_prefill_ptx.py duojax/kernels/prefill_mgpu.py 8 '{"stream_fold": 1}'
"""

import dataclasses
import importlib.util
import json
import sys

import jax
import jax.numpy as jnp

from duojax.kernels.prefill_mgpu import layer_kind  # the shipped rule, applied to the loaded file's default_config


def main() -> None:
  path, nf = sys.argv[1], int(sys.argv[2])
  overrides = json.loads(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] else None
  spec = importlib.util.spec_from_file_location("kernel_under_test", path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod
  spec.loader.exec_module(mod)
  cfg = None if overrides is None else dataclasses.replace(mod.default_config(128, layer_kind(nf, 32)), **overrides)
  x = jax.ShapeDtypeStruct((1, 16384, 32, 128), jnp.bfloat16)
  fn = lambda q, k, v: mod.duo_prefill_mgpu(q, k, v, num_full_kv_heads=nf, sink=128, window=256, config=cfg)
  jax.jit(fn).lower(x, x, x).compile()


if __name__ == "__main__":
  main()
