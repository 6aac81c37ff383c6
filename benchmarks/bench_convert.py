"""Conversion speed and peak host memory on a random-weight Llama-2-7B-shaped checkpoint (CPU).

Writes an HF-format checkpoint (config.json, bf16 safetensors shards of at most ``--shard-mb`` MiB, an index)
with ``--layers`` Llama-2-7B layers (hidden 4096, 32 heads x 128, MLP 11008, vocab 32000; a layer is ~386 MiB bf16)
into a temporary directory, then runs ``python -m duojax.convert`` in a subprocess (bf16, tp=4, the first
``--layers`` rows of the real Llama-2-7B-32K-Instruct DuoAttention pattern at sparsity 0.5 when ../shared has it)
and reads the child's peak RSS (``ru_maxrss``). A second subprocess that only imports the same modules gives the
baseline RSS of the interpreter + jax + orbax. Checks peak < 2x the largest shard file and writes
``benchmarks/results/convert_cpu.json``.

Run: ``python benchmarks/bench_convert.py [--layers 4] [--shard-mb 1024] [--keep DIR]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PATTERN = REPO.parent / "shared" / "patterns" / "Llama-2-7B-32K-Instruct" / \
    "lr=0.02-reg=0.05-ctx=1000_32000-multi_passkey10"

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                 num_key_value_heads=32, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=4096)

CHILD = r"""
import json, resource, sys, time
t = time.time()
mode = sys.argv[1]
import duojax.convert, duojax.checkpoint, duojax.loading, duojax.io, jax, orbax.checkpoint, safetensors, flax
if mode == "convert":
  code = duojax.convert.main(sys.argv[2:])
  if code:
    sys.exit(code)
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.time() - t}))
"""


def hf_tensor_specs(config: dict, layers: int) -> list[tuple[str, tuple[int, ...]]]:
  H, I, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
  q = config["num_attention_heads"] * config["head_dim"]
  kv = config["num_key_value_heads"] * config["head_dim"]
  specs = [("model.embed_tokens.weight", (V, H))]
  for i in range(layers):
    p = f"model.layers.{i}"
    specs += [(f"{p}.self_attn.q_proj.weight", (q, H)), (f"{p}.self_attn.k_proj.weight", (kv, H)),
              (f"{p}.self_attn.v_proj.weight", (kv, H)), (f"{p}.self_attn.o_proj.weight", (H, q)),
              (f"{p}.mlp.gate_proj.weight", (I, H)), (f"{p}.mlp.up_proj.weight", (I, H)),
              (f"{p}.mlp.down_proj.weight", (H, I)), (f"{p}.input_layernorm.weight", (H,)),
              (f"{p}.post_attention_layernorm.weight", (H,))]
  specs += [("model.norm.weight", (H,)), ("lm_head.weight", (V, H))]
  return specs


def write_checkpoint(directory: Path, layers: int, shard_mb: float, seed: int = 0) -> dict:
  """Random bf16 weights in HF layout, sharded like ``save_pretrained(max_shard_size=...)``."""
  from safetensors.numpy import save_file
  config = dict(LLAMA2_7B, num_hidden_layers=layers, model_type="llama", architectures=["LlamaForCausalLM"],
                tie_word_embeddings=False, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
                torch_dtype="bfloat16")
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(config, indent=1))
  rng = np.random.default_rng(seed)
  specs = hf_tensor_specs(config, layers)
  limit = shard_mb * 2**20
  groups, current, size = [], [], 0
  for name, shape in specs:
    nbytes = int(np.prod(shape)) * 2
    if current and size + nbytes > limit:
      groups.append(current)
      current, size = [], 0
    current.append((name, shape))
    size += nbytes
  groups.append(current)
  weight_map, files = {}, []
  for i, group in enumerate(groups):
    file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
    tensors = {}
    for name, shape in group:
      if name.endswith("norm.weight"):
        tensors[name] = np.ones(shape, ml_dtypes.bfloat16)
      else:
        tensors[name] = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
      weight_map[name] = file
    save_file(tensors, str(directory / file))
    del tensors
    files.append(file)
  (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  sizes = {f: (directory / f).stat().st_size for f in files}
  largest_tensor = max(int(np.prod(s)) * 2 for _, s in specs)
  return {"config": config, "shards": sizes, "largest_tensor_bytes": largest_tensor}


def write_pattern(directory: Path, layers: int) -> Path | None:
  if not PATTERN.is_dir():
    return None
  directory.mkdir(parents=True, exist_ok=True)
  rows = (PATTERN / "full_attention_heads.tsv").read_text().strip().splitlines()[:layers]
  (directory / "full_attention_heads.tsv").write_text("\n".join(rows) + "\n")
  shutil.copyfile(PATTERN / "config.json", directory / "config.json")
  return directory


def run_child(args: list[str]) -> dict:
  env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env, cwd=REPO)
  if proc.returncode:
    raise SystemExit(f"child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1]) | {"stderr_tail": proc.stderr.strip().splitlines()[-3:]}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--layers", type=int, default=4, help="Llama-2-7B layers to generate (default 4; 32 = full 7B)")
  ap.add_argument("--shard-mb", type=float, default=1024, help="max safetensors shard size in MiB (default 1024)")
  ap.add_argument("--mesh", default="tp=4", help="--mesh passed to the converter (default tp=4)")
  ap.add_argument("--workdir", help="where to write the checkpoints (default: a temp dir, deleted after)")
  ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "convert_cpu.json"))
  ap.add_argument("--write-only", metavar="DIR", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.write_only:  # child mode: generate the source checkpoint, print its summary
    print(json.dumps(write_checkpoint(Path(args.write_only), args.layers, args.shard_mb)))
    return

  # This parent stays small (no jax, no tensors): Linux carries a process's peak RSS over fork+exec into the
  # child's ru_maxrss, so a big parent would inflate the children's figures.
  from importlib.metadata import version
  work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="duojax-bench-convert-"))
  try:
    t = time.time()
    proc = subprocess.run([sys.executable, __file__, "--write-only", str(work / "hf"), "--layers", str(args.layers),
                           "--shard-mb", str(args.shard_mb)], capture_output=True, text=True, check=True)
    src = json.loads(proc.stdout.strip().splitlines()[-1])
    write_seconds = time.time() - t
    pattern = write_pattern(work / "pattern", args.layers)
    cmd = ["convert", "--hf", str(work / "hf"), "--out", str(work / "duo"), "--dtype", "bf16", "--mesh", args.mesh,
           "--quiet", "--force"]
    if pattern is not None:
      cmd += ["--pattern", str(pattern), "--sparsity", "0.5"]
    baseline = run_child(["imports"])
    t = time.time()
    conv = run_child(cmd)
    seconds = time.time() - t
    out_bytes = sum(f.stat().st_size for f in (work / "duo").rglob("*") if f.is_file())
    meta = json.loads((work / "duo" / "duojax.json").read_text())
  finally:
    if not args.workdir:
      shutil.rmtree(work, ignore_errors=True)

  mb = 2**20
  largest_shard = max(src["shards"].values()) / mb
  total = sum(src["shards"].values()) / mb
  result = {
      "benchmark": "convert_cpu",
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "device": {"platform": platform.platform(), "cpu": _cpu_name(), "cores": os.cpu_count(),
                 "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
      "jax_version": version("jax"),
      "python": platform.python_version(),
      "model": {"shape": "Llama-2-7B", **{k: src["config"][k] for k in (
          "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
          "head_dim", "vocab_size")}, "dtype": "bfloat16"},
      "pattern": str(PATTERN) if pattern else None,
      "sparsity": meta["sparsity"],
      "mesh": args.mesh,
      "shards": {k: round(v / mb, 1) for k, v in src["shards"].items()},
      "checkpoint_mb": round(total, 1),
      "output_mb": round(out_bytes / mb, 1),
      "largest_shard_mb": round(largest_shard, 1),
      "largest_tensor_mb": round(src["largest_tensor_bytes"] / mb, 1),
      "write_source_seconds": round(write_seconds, 1),
      "seconds": round(seconds, 2),
      "convert_seconds_in_process": round(conv["seconds"], 2),
      "throughput_mb_per_s": round(total / seconds, 1),
      "peak_rss_mb": round(conv["peak_rss_mb"], 1),
      "baseline_rss_mb": round(baseline["peak_rss_mb"], 1),
      "peak_over_baseline_mb": round(conv["peak_rss_mb"] - baseline["peak_rss_mb"], 1),
      "peak_over_largest_shard": round(conv["peak_rss_mb"] / largest_shard, 3),
      "peak_below_2x_largest_shard": bool(conv["peak_rss_mb"] < 2 * largest_shard),
      "notes": "peak_rss_mb is ru_maxrss of the converting process (python -m duojax.convert in a subprocess); "
               "baseline_rss_mb is a process that only imports the same modules.",
  }
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
  print(json.dumps(result, indent=1))
  print(f"parent ru_maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (must stay below "
        "the children's baseline)")
  status = "OK" if result["peak_below_2x_largest_shard"] else "FAIL"
  print(f"{status}: peak {result['peak_rss_mb']:.0f} MiB vs 2 x largest shard {2 * largest_shard:.0f} MiB "
        f"({args.layers} layers, {total:.0f} MiB checkpoint, {seconds:.1f} s)")
  if status != "OK":
    sys.exit(1)


def _cpu_name() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


if __name__ == "__main__":
  main()
