"""Runs the GPU checks and benchmarks in one call on a Hopper machine; writes logs and JSON under $OUT.

    PYTHONPATH=. python3 benchmarks/gpu_suite.py --stages model,prefill,decode,attention,efficiency

Stages (each a subprocess; a failing stage is recorded and the next one runs):
  tests       the pytest tests marked gpu (kernels through the real Mosaic-GPU path)
  model       SmolLM2 in bf16 through the Mosaic-GPU kernels vs the reference path on the same GPU, + the demo
  prefill     benchmarks/gpu_prefill_check.py (float64 oracle, poisoned outputs)
  decode      benchmarks/gpu_decode_check.py
  attention   benchmarks/bench_attention.py (cuDNN, tokamax, XLA baselines in the same run)
  decodebench benchmarks/bench_decode.py
  efficiency  benchmarks/bench_efficiency.py for Llama-2-7B (25%) and Llama-3-8B (50%) shapes
  efficiency-decode   decode rows of both efficiency runs only (32 tokens per timed call)
  efficiency-decode-quick  the two target rows: Llama-2 at 128k (GEMV kernel and XLA projections), Llama-3 at
              all-full's largest context
  gemv        benchmarks/bench_gemv.py (XLA dots vs the Mosaic-GPU GEMV, weight TB/s)
  profile-decode      benchmarks/profile_decode.py: GPU time per kernel of Llama-2-7B decode steps at 128k, duo
              (25%) and all-full
  efficiency-prefill  Llama-2-7B prefill of 128k tokens in 32k chunks, all-full and 25% retrieval (no decode)
  decode-sweep        benchmarks/sweep_decode_layer.py: 1, 2 and 3 CTAs per SM on the four efficiency layers
  host-ring   the fused duo launch's schedules on the two duo layers (sweep_decode_layer.py --host-ring), then
              point 5's decode rows with the rings hosted by retrieval CTAs (on) and in CTAs of their own (off)
Everything the stages write lands in /tmp/duojax_results, packed into $OUT/results.tar.gz (the device tool
returns at most 8 files), with a summary in $OUT/suite.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tarfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

EFFICIENCY = [
    ["--model", "llama2-7b", "--ratios", "1.0,0.25", "--contexts", "32768,65536,131072", "--decode-steps", "8",
     "--iters", "2", "--prefill-context", "131072", "--chunks", "32768", "--fit-check"],
    ["--model", "llama3-8b", "--ratios", "1.0,0.5", "--contexts", "131072,262144", "--decode-steps", "8",
     "--iters", "2", "--fit-check", "--at-full-fit"],
]


# The largest context all-full Llama-3-8B decode fits on an H200 (141 GB), verified by bench_efficiency.py
# --fit-check in session 2 (899,840), less the 32 decode steps and 64 tokens of margin it times at.
LLAMA3_FULL_FIT = 899744


def stage_commands(stage: str, out: pathlib.Path) -> list[list[str]]:
  py = sys.executable
  b = ROOT / "benchmarks"
  if stage == "tests":  # only the files that hold gpu-marked tests (others import CPU-side extras: nbformat...)
    files = sorted(str(f) for f in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in f.read_text())
    return [[py, "-m", "pytest", "-q", "-m", "gpu", *files]]
  if stage == "model":
    return [[py, str(b / "gpu_model_check.py"), "--out", str(out)], [py, "-m", "duojax.demo"]]
  if stage == "prefill":
    return [[py, str(b / "gpu_prefill_check.py")]]
  if stage == "gemv":
    sweep = ["llama2 q/o", "llama2 q,k,v", "llama2 gate,up", "llama2 down", "llama3 q,k,v", "llama3 gate,up"]
    rest = ["llama2 gate|up", "llama2 lm_head", "llama3 down", "llama3 lm_head"]
    return [[py, str(b / "bench_gemv.py"), "--sweep", "--shapes", *sweep], [py, str(b / "bench_gemv.py"),
                                                                           "--shapes", *rest]]
  if stage == "profile-decode":  # both steps of point 5's Llama-2 row: the bound in NOTES_decode.md needs the two
    return [[py, str(b / "profile_decode.py"), "--model", "llama2-7b", "--ratio", ratio, "--context", "131072",
             "--steps", "16", "--top", "45"] for ratio in ("0.25", "1.0")]
  if stage == "efficiency-decode-quick":  # the two target rows only: Llama-2 at 128k, Llama-3 at all-full's fit
    eff = [py, str(b / "bench_efficiency.py"), "--decode-steps", "32", "--iters", "2", "--out", str(out)]
    return [[*eff, "--model", "llama2-7b", "--ratios", "1.0,0.25", "--contexts", "131072", *extra]
            for extra in ([], ["--xla-projections"])] + [
            [*eff, "--model", "llama3-8b", "--ratios", "1.0,0.5", "--contexts", str(LLAMA3_FULL_FIT)]]
  if stage == "host-ring":
    eff = [py, str(b / "bench_efficiency.py"), "--decode-steps", "32", "--iters", "2", "--out", str(out)]
    return [[py, str(b / "sweep_decode_layer.py"), "--shapes", "llama2-duo25", "llama3-duo50", "--host-ring"]] + [
        [*eff, "--model", model, "--ratios", ratios, "--contexts", ctx, "--host-ring", mode]
        for model, ctx, duo in (("llama2-7b", "131072", "0.25"), ("llama3-8b", str(LLAMA3_FULL_FIT), "0.5"))
        for ratios, mode in ((f"1.0,{duo}", "on"), (duo, "off"))]
  if stage == "decode":
    return [[py, str(b / "gpu_decode_check.py")]]
  if stage == "efficiency-prefill":
    return [[py, str(b / "bench_efficiency.py"), "--model", "llama2-7b", "--ratios", "", "--prefill-context", "131072",
             "--chunks", "32768", "--iters", "2", "--out", str(out)]]
  if stage == "decode-sweep":
    return [[py, str(b / "sweep_decode_layer.py"), "--shapes", "llama2-duo25", "llama2-full", "llama3-duo50",
             "llama3-full", "--ctas-per-sm", "1", "2", "3"]]
  if stage == "attention":
    return [[py, str(b / "bench_attention.py"), "--out", str(out)]]
  if stage == "decodebench":
    return [[py, str(b / "bench_decode.py")]]
  if stage == "efficiency":
    return [[py, str(b / "bench_efficiency.py"), *args, "--out", str(out)] for args in EFFICIENCY]
  if stage == "efficiency-decode":  # decode rows only (prefill unchanged), both models, one call
    return [[py, str(b / "bench_efficiency.py"), "--model", "llama2-7b", "--ratios", "1.0,0.25", "--contexts",
             "32768,131072", "--decode-steps", "32", "--iters", "2", "--fit-check", "--out", str(out)],
            [py, str(b / "bench_efficiency.py"), "--model", "llama3-8b", "--ratios", "1.0,0.5", "--contexts",
             "131072", "--decode-steps", "32", "--iters", "2", "--fit-check", "--at-full-fit", "--out", str(out)]]
  if stage in ("efficiency-llama2", "efficiency-llama3"):
    args = EFFICIENCY[0 if stage.endswith("llama2") else 1]
    return [[py, str(b / "bench_efficiency.py"), *args, "--out", str(out)]]
  raise SystemExit(f"unknown stage {stage!r}")


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--stages", default="model,prefill,decode,attention,efficiency")
  ap.add_argument("--timeout", type=int, default=540, help="seconds for all stages together")
  args = ap.parse_args(argv)
  out_root = pathlib.Path(os.environ.get("OUT", "/tmp/duojax_out"))
  out = pathlib.Path("/tmp/duojax_results")  # many files: packed into one tarball under $OUT
  out.mkdir(parents=True, exist_ok=True)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), PYTHONUNBUFFERED="1", OUT=str(out),
             DUOJAX_REQUIRE_GPU_TESTS="1",  # a gpu-marked test that skips (no Hopper found) fails
             XLA_PYTHON_CLIENT_MEM_FRACTION=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95"))
  deadline = time.time() + args.timeout
  summary = []
  for stage in args.stages.split(","):
    for cmd in stage_commands(stage, out):
      left = deadline - time.time()
      if left < 20:
        summary.append({"stage": stage, "cmd": cmd[1:], "status": "skipped (suite time limit)"})
        continue
      log = out / f"{stage}_{len([s for s in summary if s['stage'] == stage])}.log"
      t0 = time.time()
      with open(log, "w") as f:
        try:
          rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=left).returncode
        except subprocess.TimeoutExpired:
          rc = "timeout"
      summary.append({"stage": stage, "cmd": cmd[1:], "rc": rc, "seconds": round(time.time() - t0, 1),
                      "log": log.name})
      print(f"[{stage}] rc={rc} {time.time() - t0:.0f}s  {' '.join(cmd[1:3])}", flush=True)
      print("".join(open(log).readlines()[-25:]), flush=True)
  (out_root / "suite.json").write_text(json.dumps(summary, indent=1))
  with tarfile.open(out_root / "results.tar.gz", "w:gz") as tar:
    tar.add(out, arcname="results")


if __name__ == "__main__":
  main()
