"""The benchmark helpers shared by the GPU probes and decode benchmarks: round-robin sampling order, the result
file's header, and the decode switches."""

import json

import jax

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
