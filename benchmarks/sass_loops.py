"""Hot-loop statistics of a kernel's SASS: compile a PTX file with ptxas (sm_90a), disassemble it with cuobjdump
and, for every loop (a backward branch) with 1-24 HGMMA instructions, count what the loop body issues per
iteration: spill loads (LDL), register-to-uniform moves (R2UR), vector and uniform integer instructions.

The PTX comes from the GPU machine (``dump_prefill_ptx.py`` with ``MOSAIC_GPU_DUMP_PTX=1`` and
``MOSAIC_GPU_DUMP_TO=dir``); ptxas and cuobjdump from the CUDA toolkit or the ``nvidia-cuda-nvcc`` and
``nvidia-cuda-cuobjdump`` wheels (``--bin`` or ``$CUDA_BIN``), so this runs on a CPU machine.

    python benchmarks/sass_loops.py --bin .../nvidia/cu13/bin duo.ptx full.ptx
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess


def loops(sass: str):
  """(body instructions) of each loop of the SASS text, innermost-first in address order."""
  ins = []
  for line in sass.splitlines():
    m = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
    if m:
      ins.append((int(m.group(1), 16), m.group(2).strip()))
  index = {addr: i for i, (addr, _) in enumerate(ins)}
  for i, (addr, text) in enumerate(ins):
    m = re.search(r"BRA\s+0x([0-9a-f]+)", text)
    if m and int(m.group(1), 16) < addr and int(m.group(1), 16) in index:
      yield [t for _, t in ins[index[int(m.group(1), 16)]:i + 1]]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("ptx", nargs="+")
  ap.add_argument("--bin", default=os.environ.get("CUDA_BIN", ""), help="folder holding ptxas and cuobjdump")
  args = ap.parse_args()
  tool = lambda name: os.path.join(args.bin, name) if args.bin else name
  for ptx in args.ptx:
    cubin = os.path.splitext(ptx)[0] + ".cubin"
    r = subprocess.run([tool("ptxas"), "-arch=sm_90a", "-v", ptx, "-o", cubin], capture_output=True, text=True,
                       check=True)
    spills = [l.strip() for l in r.stderr.splitlines() if "spill" in l and "stack" in l]
    sass = subprocess.run([tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    print("==", ptx, spills)
    for body in loops(sass):
      n_mma = sum("HGMMA" in t for t in body)
      if not 0 < n_mma <= 24:
        continue
      ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in body)
      count = lambda pred: sum(v for k, v in ops.items() if pred(k))
      print(f"  loop: {len(body)} instructions, HGMMA {n_mma}, FSEL {ops['FSEL']}, "
            f"LDL {count(lambda k: k.startswith('LDL'))}, R2UR {ops['R2UR']}, "
            f"vector int {ops['IADD3'] + ops['IMAD'] + ops['VIADD']}, uniform {count(lambda k: k.startswith('U'))}")


if __name__ == "__main__":
  main()
