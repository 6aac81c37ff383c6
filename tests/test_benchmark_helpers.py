"""The benchmark helpers shared by the GPU probes and decode benchmarks: round-robin sampling order, the result
file's header, the decode switches, and the decode-bound arithmetic."""

import json

import jax
import pytest

from benchmarks.result_file import write_result
from benchmarks.timing import round_robin


def test_round_robin_alternates_order_and_keeps_each_timers_samples():
  calls = []

  def timer(i):
    def t():
      calls.append(i)
      return 10.0 * i + len(calls)
    return t

  samples = round_robin([timer(i) for i in range(3)], rounds=3)
  assert calls == [0, 1, 2, 2, 1, 0, 0, 1, 2]
  assert samples == [[1.0, 6.0, 7.0], [12.0, 15.0, 18.0], [23.0, 24.0, 29.0]]


def test_write_result_heads_the_file_with_device_version_and_date(tmp_path):
  path = write_result(tmp_path / "new", "some_probe", rows=[{"us": 1.5}], note="n")
  dev = jax.devices()[0].device_kind
  assert path == tmp_path / "new" / f"some_probe_{dev.replace(' ', '_')}.json"
  doc = json.loads(path.read_text())
  assert list(doc)[:3] == ["device", "jax_version", "date"]
  assert doc["device"] == dev and doc["jax_version"] == jax.__version__
  assert doc["rows"] == [{"us": 1.5}] and doc["note"] == "n"


def test_decode_options_set_the_library_switches_and_tag(monkeypatch):
  """``--host-ring`` / ``--unroll-splits`` reach the library's switches and name the result file; the defaults
  leave both untouched."""
  import argparse
  from benchmarks.decode_options import add_decode_options, apply_decode_options, decode_options_record
  from duojax.kernels import decode, decode_mgpu
  monkeypatch.setattr(decode, "HOST_RING", True)
  monkeypatch.setattr(decode_mgpu, "UNROLL_SPLITS", 128)
  ap = argparse.ArgumentParser()
  add_decode_options(ap)
  assert apply_decode_options(ap.parse_args([])) == ""
  assert decode_options_record() == {"host_ring": True, "unroll_splits": 128}
  tag = apply_decode_options(ap.parse_args(["--host-ring", "off", "--unroll-splits", "0"]))
  assert tag == "_hostringoff_unroll0"
  assert decode_options_record() == {"host_ring": False, "unroll_splits": 0}


def test_decode_bound_splits_the_profiles_and_solves_for_the_share():
  """Two profile_decode.py logs (made-up times) -> the three parts, the ratios after cuts and the share a target
  needs, checked against the arithmetic done by hand."""
  from benchmarks.decode_bound import parse_profiles, pick_steps, ratio_after, share_needed
  duo_log = """m ratio 0.25 context 1024: wall 9.000 ms/token, GPU kernel time 8.000 ms/token, 600 kernels/token
 ms/token calls/token  us/call  kernel
    4.000        32.0    125.0  entry_mosaic_gpu_kernel
    3.000       129.0     23.3  anonymous_mosaic_gpu_kernel
    0.100        63.0      1.6  loop_add_fusion_62
"""
  full_log = """m ratio 1.0 context 1024: wall 20.000 ms/token, GPU kernel time 19.000 ms/token, 500 kernels/token
 ms/token calls/token  us/call  kernel
   15.400        32.0    481.2  entry_mosaic_gpu_kernel
    3.000       129.0     23.3  anonymous_mosaic_gpu_kernel
"""
  duo, full = pick_steps(parse_profiles(duo_log) + parse_profiles(full_log))
  assert (duo.ratio, full.ratio, duo.kernels, full.kernels) == (0.25, 1.0, 600, 500)
  assert abs(duo.other_ms - 1.0) < 1e-9 and abs(full.other_ms - 0.6) < 1e-9
  # duo-only other (0.4) gone: 19 / 7.6; half the shared 0.6 gone too: 18.7 / 7.3
  assert abs(ratio_after(duo, full, 0.0) - 19.0 / 7.6) < 1e-9
  assert abs(ratio_after(duo, full, 0.5) - 18.7 / 7.3) < 1e-9
  # (19 - 0.6 f) / (7.6 - 0.6 f) = 2.5  ->  f = (2.5 * 7.6 - 19) / (1.5 * 0.6) = 0
  assert abs(share_needed(duo, full, 2.5)) < 1e-9
  f = share_needed(duo, full, 2.6)
  assert abs(ratio_after(duo, full, f) - 2.6) < 1e-9
  with pytest.raises(ValueError, match="one all-full"):
    pick_steps(parse_profiles(duo_log))
  with pytest.raises(ValueError, match="must be above 1.*got 1.0"):
    share_needed(duo, full, 1.0)
