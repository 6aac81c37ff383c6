"""How far fusing the decode step's small kernels could take the duo speedup: a bound from two kernel profiles.

Reads two logs of ``benchmarks/profile_decode.py`` taken on one machine for one model and context, a duo step and
an all-full step, and splits each step's GPU kernel time per token into three parts:

  attention    the Mosaic-GPU decode attention kernel (``entry_mosaic_gpu_kernel``, one launch per layer)
  projections  the Mosaic-GPU GEMV (``anonymous_mosaic_gpu_kernel``, four launches per layer and the LM head)
  other        every other kernel: norms, RoPE, cache writes, split combines, residual adds (XLA fusions)

Both steps run the same projections and about the same "other" kernels; the duo step has a few more of those
(the streaming ring's writes and combine). The table gives the all-full / duo ratio of kernel time:

  measured          the two profiles as they are
  no duo-only       the duo step's extra "other" time removed (duo "other" = all-full "other")
  + f of shared     and a share f of the "other" time both steps share removed from both, at no cost

and the share f that a target ratio needs. It assumes the fused kernels would cost nothing extra and leaves out
the gaps between launches (wall time minus kernel time), which lower the ratio: so it bounds from above what
folding the small kernels into the attention and projection launches can give.

    python benchmarks/decode_bound.py benchmarks/results/profile_decode_llama2-7b_session17_unrolled_NVIDIA_H200.log
    python benchmarks/decode_bound.py DUO.log FULL.log --target 2.5
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import re

ATTENTION = "entry_mosaic_gpu_kernel"
PROJECTIONS = "anonymous_mosaic_gpu_kernel"
_HEADER = re.compile(r"^(?P<model>\S+) ratio (?P<ratio>[\d.]+) context (?P<context>\d+): wall (?P<wall>[\d.]+) "
                     r"ms/token, GPU kernel time (?P<kernel>[\d.]+) ms/token, (?P<count>\d+) kernels/token")
_ROW = re.compile(r"^\s*(?P<ms>[\d.]+)\s+(?P<calls>[\d.]+)\s+(?P<us>[\d.]+)\s+(?P<name>\S.*)$")


@dataclasses.dataclass(frozen=True)
class StepProfile:
  """One decode step's GPU kernel time per token (ms), split into attention, projections and the rest."""
  model: str
  ratio: float
  context: int
  kernel_ms: float
  kernels: int
  attention_ms: float
  projections_ms: float

  @property
  def other_ms(self) -> float:
    return self.kernel_ms - self.attention_ms - self.projections_ms


def parse_profiles(text: str) -> list[StepProfile]:
  """Every step profile in the text of a ``profile_decode.py`` log (a header line, then the kernel rows)."""
  out, head, rows = [], None, {}

  def close():
    if head is None:
      return
    missing = [n for n in (ATTENTION, PROJECTIONS) if n not in rows]
    if missing:
      raise ValueError(f"profile of {head['model']} ratio {head['ratio']} has no row for {missing}")
    out.append(StepProfile(head["model"], float(head["ratio"]), int(head["context"]), float(head["kernel"]),
                           int(head["count"]), rows[ATTENTION], rows[PROJECTIONS]))

  for line in text.splitlines():
    m = _HEADER.match(line)
    if m:
      close()
      head, rows = m.groupdict(), {}
      continue
    m = _ROW.match(line)
    if m and head is not None:
      rows[m["name"].strip()] = float(m["ms"])
  close()
  return out


def pick_steps(profiles: list[StepProfile]) -> tuple[StepProfile, StepProfile]:
  """(duo, all-full) from the parsed profiles: one with ratio 1.0 and one below it, same model and context."""
  full = [p for p in profiles if p.ratio == 1.0]
  duo = [p for p in profiles if p.ratio < 1.0]
  if len(full) != 1 or len(duo) != 1:
    raise ValueError(f"need one all-full (ratio 1.0) and one duo profile; got ratios {[p.ratio for p in profiles]}")
  d, f = duo[0], full[0]
  if (d.model, d.context) != (f.model, f.context):
    raise ValueError(f"the profiles differ in model or context: {d.model} {d.context} vs {f.model} {f.context}")
  return d, f


def _without_duo_only(duo: StepProfile, full: StepProfile) -> tuple[float, float, float]:
  """(shared "other" ms, duo ms, all-full ms) once the duo step's extra "other" time is gone."""
  shared = min(duo.other_ms, full.other_ms)
  return shared, duo.kernel_ms - (duo.other_ms - shared), full.kernel_ms - (full.other_ms - shared)


def ratio_after(duo: StepProfile, full: StepProfile, shared_share: float) -> float:
  """all-full / duo kernel time without the duo-only "other" time and ``shared_share`` of the shared "other"
  time."""
  shared, d, f = _without_duo_only(duo, full)
  cut = shared_share * shared
  return (f - cut) / (d - cut)


def share_needed(duo: StepProfile, full: StepProfile, target: float) -> float:
  """The share of the shared "other" time that must go, with the duo-only time gone, for ``target``; may
  exceed 1 (the target is out of reach by fusion alone) or be below 0 (already met)."""
  if not target > 1.0:
    raise ValueError(f"the target ratio must be above 1 (all-full / duo); got {target}")
  shared, d, f = _without_duo_only(duo, full)
  if shared <= 0:
    raise ValueError(f"the profiles share no small-kernel time to remove (duo {duo.other_ms:.3f} ms, all-full "
                     f"{full.other_ms:.3f} ms)")
  return (target * d - f) / ((target - 1.0) * shared)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("logs", nargs="+", help="profile_decode.py logs holding one duo and one all-full step")
  ap.add_argument("--target", type=float, default=2.5)
  args = ap.parse_args(argv)
  duo, full = pick_steps([p for log in args.logs for p in parse_profiles(pathlib.Path(log).read_text())])
  print(f"{duo.model}, context {duo.context}, GPU kernel time per token (ms)")
  print(f"{'step':>12} {'total':>8} {'attention':>10} {'projections':>12} {'other':>8} {'kernels':>8}")
  for name, p in (("all-full", full), (f"duo {duo.ratio:g}", duo)):
    print(f"{name:>12} {p.kernel_ms:8.3f} {p.attention_ms:10.3f} {p.projections_ms:12.3f} {p.other_ms:8.3f} "
          f"{p.kernels:8d}")
  print(f"{'case':>48} {'ratio':>6}")
  print(f"{'measured':>48} {full.kernel_ms / duo.kernel_ms:6.3f}")
  for share in (0.0, 0.25, 0.5, 0.75, 1.0):
    print(f"{f'no duo-only other, {share:.0%} of shared other gone':>48} {ratio_after(duo, full, share):6.3f}")
  need = share_needed(duo, full, args.target)
  print(f"{args.target}x needs the duo-only other time and {need:.0%} of the shared other time "
        f"({need * _without_duo_only(duo, full)[0]:.3f} ms per token) gone at no cost")


if __name__ == "__main__":
  main()
