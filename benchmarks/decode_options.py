"""Command-line switches for the decode step's tunables, shared by the decode benchmarks (``bench_efficiency.py``,
``profile_decode.py``): the fused duo launch's ring schedule and the split combine's unrolling."""

from __future__ import annotations

import argparse

from duojax.kernels import decode as decode_module
from duojax.kernels import decode_mgpu


def add_decode_options(ap: argparse.ArgumentParser) -> None:
  ap.add_argument("--host-ring", choices=("default", "on", "off"), default="default",
                  help="the fused duo launch's schedule: streaming rings inside retrieval CTAs (on) or in CTAs of "
                       "their own (off); default: the library's (duojax.kernels.decode.HOST_RING)")
  ap.add_argument("--unroll-splits", type=int, default=-1,
                  help="the decode combine's unrolled-chain limit (decode_mgpu.UNROLL_SPLITS; 0: always an XLA "
                       "reduce; -1: the library's)")


def apply_decode_options(args: argparse.Namespace) -> str:
  """Sets the library's switches from ``args``; returns the result-file tag for the non-default ones."""
  tag = ""
  if args.host_ring != "default":
    decode_module.HOST_RING = args.host_ring == "on"
    tag += f"_hostring{args.host_ring}"
  if args.unroll_splits >= 0:
    decode_mgpu.UNROLL_SPLITS = args.unroll_splits
    tag += f"_unroll{args.unroll_splits}"
  return tag


def decode_options_record() -> dict:
  """The switches' current values, for a result file."""
  return {"host_ring": decode_module.HOST_RING, "unroll_splits": decode_mgpu.UNROLL_SPLITS}
