"""Tests for duojax.patterns: loading DuoAttention's pattern files, binarization (with the tie rule), I/O, errors.

The real patterns are read from ``../shared/patterns`` beside the repository (never copied into it).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from duojax import patterns as P
from duojax.patterns import BinaryPattern, DuoPattern
from tests.shared_data import SHARED
from tests.shared_data import needs_shared as needs_shared_path

SHARED_PATTERNS = SHARED / "patterns"

EXPECTED_SHAPES = {
    "Llama-2-7B-32K-Instruct": (32, 32),
    "Llama-3-8B-Instruct-Gradient-1048k": (32, 8),
    "Llama-3-8B-Instruct-Gradient-4194k": (32, 8),
    "Meta-Llama-3.1-8B-Instruct": (32, 8),
    "Mistral-7B-Instruct-v0.2": (32, 8),
    "Mistral-7B-Instruct-v0.3": (32, 8),
}
SPARSITIES = (0.0, 0.25, 0.5, 0.75, 1.0)

needs_shared = needs_shared_path(SHARED_PATTERNS)


def _model_dir(model: str) -> Path:
  runs = sorted(p for p in (SHARED_PATTERNS / model).iterdir() if (p / P.GATES_FILE).is_file())
  assert len(runs) == 1, f"expected one run directory under {model}, found {runs}"
  return runs[0]


_CACHE: dict[str, DuoPattern] = {}


def _real(model: str) -> DuoPattern:
  if model not in _CACHE:
    _CACHE[model] = P.load_pattern(_model_dir(model))
  return _CACHE[model]


def _write_tsv(path: Path, text: str) -> Path:
  path.mkdir(parents=True, exist_ok=True)
  (path / P.GATES_FILE).write_text(text)
  return path


# ------------------------------------------------------------------------------------------- real patterns


@needs_shared
def test_all_six_shared_patterns_found():
  found = {p.parent.name for p in P.find_patterns(SHARED_PATTERNS)}
  assert found == set(EXPECTED_SHAPES)


@needs_shared
@pytest.mark.parametrize("model", sorted(EXPECTED_SHAPES))
def test_load_real_pattern(model, record_property):
  d = _model_dir(model)
  pattern = P.load_pattern(d)
  assert pattern.shape == EXPECTED_SHAPES[model]
  assert pattern.gates.dtype == np.float64
  assert pattern.gates.min() >= 0.0 and pattern.gates.max() <= 1.0
  config = json.loads((d / P.CONFIG_FILE).read_text())
  assert pattern.sink_size == config["sink_size"] == 128
  assert pattern.recent_size == config["recent_size"] == 256
  assert pattern.config == config
  assert pattern.source == d / P.GATES_FILE
  assert pattern.name.startswith(model + "/")
  # The gates are the raw file clipped to [0, 1]; loading the tsv path itself gives the same pattern.
  raw = np.loadtxt(d / P.GATES_FILE, delimiter="\t")
  np.testing.assert_array_equal(pattern.gates, np.clip(raw, 0, 1))
  assert P.load_pattern(d / P.GATES_FILE) == pattern
  summary = P.pattern_summary(pattern, sparsity=0.5)
  assert summary["shape"] == list(EXPECTED_SHAPES[model])
  assert summary["realised_sparsity"] == 0.5
  record_property("sparsity_at_threshold_0.5", summary["sparsity_at_threshold_0.5"])
  print(f"{model}: shape {pattern.shape}, sparsity@0.5 {summary['sparsity_at_threshold_0.5']:.4f}")


@needs_shared
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("model", sorted(EXPECTED_SHAPES))
def test_sparsify_real_pattern(model, sparsity):
  pattern = _real(model)
  L, H = pattern.shape
  b = pattern.binarize(sparsity=sparsity)
  assert b.shape == (L, H)
  assert b.sparsity == sparsity  # L * H = 256 or 1024 heads: these targets are whole numbers of heads
  assert b.num_full_total == round((1 - sparsity) * L * H)
  assert sum(b.num_full_per_layer) == b.num_full_total
  g = pattern.gates
  if 0 < b.num_full_total < g.size:
    assert g[b.full].min() >= g[~b.full].max()  # a global cut: no streaming head outranks a retrieval head
  # Where no gate ties DuoAttention's quantile threshold, the result is exactly its `alpha >= quantile` rule.
  if 0 < sparsity < 1:
    threshold = np.quantile(g, sparsity)
    if not np.any(g == threshold):
      np.testing.assert_array_equal(b.full, g >= threshold)
  assert pattern.binarize(sparsity=sparsity) == b  # deterministic


@needs_shared
def test_tie_heavy_llama3_1048k_at_075():
  pattern = _real("Llama-3-8B-Instruct-Gradient-1048k")
  g = pattern.gates
  assert np.quantile(g, 0.75) == 1.0
  ones = np.argwhere(g == 1.0)  # row-major: ascending (layer, head)
  assert len(ones) == 82  # 82 heads tied at the threshold; DuoAttention's `>=` would keep all of them (0.68)
  b = pattern.binarize(sparsity=0.75)
  assert b.sparsity == 0.75 and b.num_full_total == 64
  expected = np.zeros_like(b.full)
  expected[tuple(ones[:64].T)] = True  # tie rule: the first 64 tied heads in (layer, head) order
  np.testing.assert_array_equal(b.full, expected)
  assert pattern.binarize(sparsity=0.75) == b


@needs_shared
def test_threshold_binarization_real_matches_numpy():
  for model in EXPECTED_SHAPES:
    pattern = _real(model)
    for t in (0.0, 0.25, 0.5, 0.9, 1.0, 1.5):
      np.testing.assert_array_equal(pattern.binarize(threshold=t).full, pattern.gates >= t)


@needs_shared
def test_cli_on_shared_patterns(capsys):
  assert P.main([str(SHARED_PATTERNS), "--sparsity", "0.5"]) == 0
  out = capsys.readouterr().out.strip().splitlines()
  assert len(out) == 6
  assert any("Llama-2-7B-32K-Instruct" in line and "(32, 32)" in line for line in out)
  assert all("sparsity 0.5000" in line for line in out)
  assert P.main([str(_model_dir("Mistral-7B-Instruct-v0.2")), "--json"]) == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary["shape"] == [32, 8] and summary["sink_size"] == 128


# ------------------------------------------------------------------------------------------- tie rule, rounding


def test_tie_rule_small_exact():
  gates = np.array([[0.5, 1.0, 0.5],
                    [1.0, 0.5, 0.2]])
  # Stable order (descending gate, ascending layer, ascending head):
  # (0,1)=1.0, (1,0)=1.0, (0,0)=0.5, (0,2)=0.5, (1,1)=0.5, (1,2)=0.2
  expected = {
      5 / 6: [[0, 1, 0], [0, 0, 0]],
      4 / 6: [[0, 1, 0], [1, 0, 0]],
      0.5: [[1, 1, 0], [1, 0, 0]],
      2 / 6: [[1, 1, 1], [1, 0, 0]],
      1 / 6: [[1, 1, 1], [1, 1, 0]],
      0.0: [[1, 1, 1], [1, 1, 1]],
      1.0: [[0, 0, 0], [0, 0, 0]],
  }
  for sparsity, full in expected.items():
    b = P.binarize(gates, sparsity=sparsity)
    np.testing.assert_array_equal(b.full, np.array(full, dtype=bool), err_msg=f"sparsity {sparsity}")
    assert b == P.binarize(gates, sparsity=sparsity)


def test_tie_rule_all_equal_prefers_earlier_layers_then_lower_heads():
  b = DuoPattern(np.full((3, 4), 0.7)).binarize(sparsity=0.5)
  np.testing.assert_array_equal(b.full, [[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
  assert b.num_full_per_layer == (4, 2, 0)


def test_clipping_makes_ties():
  # -0.01 and 0.0 both clip to 0.0 and then tie; 1.2 and 1.0 both clip to 1.0.
  p = DuoPattern(np.array([[-0.01, 1.2], [0.0, 1.0]]))
  np.testing.assert_array_equal(p.gates, [[0.0, 1.0], [0.0, 1.0]])
  np.testing.assert_array_equal(p.binarize(sparsity=0.75).full, [[False, True], [False, False]])
  np.testing.assert_array_equal(p.binarize(sparsity=0.25).full, [[True, True], [False, True]])


@pytest.mark.parametrize("n, sparsity, expected", [
    (6, 0.25, 5),      # 4.5 retrieval heads -> halves round up
    (10, 0.35, 7),     # 6.5 -> 7
    (5, 0.9, 1),       # (1 - 0.9) * 5 = 0.4999999999999999 in floating point, meant 0.5 -> 1
    (10, 0.3, 7),
    (256, 0.75, 64),
    (1024, 0.75, 256),
    (7, 1.0, 0), (7, 2.0, 0),
    (7, 0.0, 7), (7, -1.0, 7),
    (3, 0.999, 0), (3, 0.001, 3),
])
def test_retrieval_count(n, sparsity, expected):
  assert P.retrieval_count(n, sparsity) == expected


def test_sparsity_out_of_range_clamps():
  gates = np.random.default_rng(0).random((4, 4))
  assert P.binarize(gates, sparsity=1.5).sparsity == 1.0
  assert P.binarize(gates, sparsity=-0.5).sparsity == 0.0


# ------------------------------------------------------------------------------------------- properties


def _gate_matrices():
  shapes = st.tuples(st.integers(1, 8), st.integers(1, 8))
  tie_heavy = st.sampled_from([0.0, 0.25, 0.5, 1.0])
  floats = st.floats(-0.1, 1.1, allow_nan=False, allow_infinity=False)
  return shapes.flatmap(lambda s: hnp.arrays(np.float64, s, elements=st.one_of(tie_heavy, floats)))


@settings(max_examples=150, deadline=None)
@given(gates=_gate_matrices(), sparsity=st.floats(-0.2, 1.2, allow_nan=False))
def test_property_realised_sparsity_is_requested_rounded_to_heads(gates, sparsity):
  pattern = DuoPattern(gates)
  b = pattern.binarize(sparsity=sparsity)
  n = gates.size
  clamped = min(1.0, max(0.0, sparsity))
  expected_full = P.retrieval_count(n, sparsity)
  assert b.num_full_total == expected_full
  assert abs(expected_full - (1 - clamped) * n) <= 0.5 + 1e-9  # nearest whole number of heads
  assert abs(b.sparsity - clamped) <= 0.5 / n + 1e-9
  g = pattern.gates
  if 0 < expected_full < n:
    assert g[b.full].min() >= g[~b.full].max()
  # Brute-force tie rule: walk (layer, head) in (descending gate, layer, head) order.
  order = sorted(np.ndindex(*g.shape), key=lambda lh: (-g[lh], lh[0], lh[1]))
  brute = np.zeros(g.shape, dtype=bool)
  for lh in order[:expected_full]:
    brute[lh] = True
  np.testing.assert_array_equal(b.full, brute)


@settings(max_examples=100, deadline=None)
@given(gates=_gate_matrices(), threshold=st.floats(-0.2, 1.2, allow_nan=False))
def test_property_threshold_matches_brute_force(gates, threshold):
  clipped = np.clip(gates, 0, 1)
  b = DuoPattern(gates).binarize(threshold=threshold)
  brute = np.array([[float(v) >= threshold for v in row] for row in clipped], dtype=bool)
  np.testing.assert_array_equal(b.full, brute)


# ------------------------------------------------------------------------------------------- save / load


def test_save_load_round_trip_exact(tmp_path):
  rng = np.random.default_rng(1)
  gates = rng.random((5, 3))
  gates[0, 0] = 1.0
  gates[1, 1] = 0.0
  gates[2, 2] = 1e-300
  gates[3, 0] = np.nextafter(1.0, 0.0)
  config = {"lr": 0.02, "threshold": 0.5, "sparsity": None, "exp_name": "x/y"}
  p = DuoPattern(gates, sink_size=64, recent_size=256, config=config)
  out = P.save_pattern(p, tmp_path / "model" / "run")
  assert sorted(f.name for f in out.iterdir()) == sorted([P.GATES_FILE, P.CONFIG_FILE])
  assert [f.name for f in (tmp_path / "model").iterdir()] == ["run"]  # no temp dir left behind
  q = P.load_pattern(out)
  np.testing.assert_array_equal(q.gates, p.gates)
  assert q.sink_size == 64 and q.recent_size == 256
  assert q.config == {**config, "sink_size": 64, "recent_size": 256}
  # DuoAttention's own reader: np.loadtxt(..., delimiter="\t").
  np.testing.assert_array_equal(np.loadtxt(out / P.GATES_FILE, delimiter="\t"), gates)


@needs_shared
def test_save_load_round_trip_real(tmp_path):
  p = _real("Meta-Llama-3.1-8B-Instruct")
  q = P.load_pattern(P.save_pattern(p, tmp_path / "p"))
  assert q == p
  assert q.binarize(sparsity=0.5) == p.binarize(sparsity=0.5)


def test_save_refuses_existing_unless_overwrite(tmp_path):
  d = P.save_pattern(DuoPattern(np.zeros((2, 2))), tmp_path / "p")
  with pytest.raises(FileExistsError, match="overwrite=True"):
    P.save_pattern(DuoPattern(np.ones((2, 2))), d)
  (d / "notes.txt").write_text("kept")
  P.save_pattern(DuoPattern(np.ones((2, 2)), sink_size=4, recent_size=8), d, overwrite=True)
  q = P.load_pattern(d)
  np.testing.assert_array_equal(q.gates, np.ones((2, 2)))
  assert (q.sink_size, q.recent_size) == (4, 8)
  assert sorted(f.name for f in d.iterdir()) == sorted([P.GATES_FILE, P.CONFIG_FILE, "notes.txt"])


def test_load_without_config(tmp_path):
  d = _write_tsv(tmp_path / "p", "0.1\t0.9\n-0.5\t1.5\n")
  p = P.load_pattern(d)
  assert p.shape == (2, 2) and p.sink_size is None and p.recent_size is None and p.config == {}
  np.testing.assert_array_equal(p.gates, [[0.1, 0.9], [0.0, 1.0]])


def test_load_single_layer_and_single_head(tmp_path):
  assert P.load_pattern(_write_tsv(tmp_path / "a", "0.5\t0.5\t0.5\n")).shape == (1, 3)
  assert P.load_pattern(_write_tsv(tmp_path / "b", "0.5\n0.5\n")).shape == (2, 1)


# ------------------------------------------------------------------------------------------- errors


def test_validate_pattern_shape_mismatch():
  p = DuoPattern(np.zeros((32, 8)))
  assert P.validate_pattern(p, 32, 8) is p
  with pytest.raises(ValueError) as e:
    P.validate_pattern(p, 32, 32)
  assert "(32, 8)" in str(e.value) and "(32, 32)" in str(e.value)
  b = BinaryPattern.all_full(32, 32)
  with pytest.raises(ValueError, match=r"\(32, 32\).*\(28, 4\)"):
    P.validate_pattern(b, 28, 4)
  cfg = SimpleNamespace(num_hidden_layers=32, num_key_value_heads=8)
  assert P.validate_for_config(p, cfg) is p
  with pytest.raises(ValueError, match=r"\(32, 32\).*\(32, 8\)"):
    P.validate_for_config(b, cfg)
  with pytest.raises(TypeError, match="num_hidden_layers"):
    P.validate_for_config(p, SimpleNamespace(num_layers=32))


@needs_shared
def test_validate_real_pattern_against_wrong_model():
  p = _real("Llama-2-7B-32K-Instruct")
  with pytest.raises(ValueError) as e:
    P.validate_for_config(p, SimpleNamespace(num_hidden_layers=32, num_key_value_heads=8))
  msg = str(e.value)
  assert "(32, 32)" in msg and "(32, 8)" in msg and "Llama-2-7B-32K-Instruct" in msg


def test_missing_paths(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    P.load_pattern(tmp_path / "nope")
  (tmp_path / "empty_dir").mkdir()
  with pytest.raises(FileNotFoundError, match=f"no {P.GATES_FILE} in directory .*empty_dir"):
    P.load_pattern(tmp_path / "empty_dir")
  _write_tsv(tmp_path / "model" / "run", "0.5\n")
  with pytest.raises(FileNotFoundError, match="found below it"):
    P.load_pattern(tmp_path / "model")


@pytest.mark.parametrize("text, match", [
    ("", "is empty"),
    ("\n  \n", "is empty"),
    ("0.1\t0.2\n0.3\tabc\n", r"line 2, column 2: 'abc' is not a number"),
    ("0.1\t0.2\n0.3\n", r"ragged rows: line 2 has 1 values but line 1 has 2"),
    ("0.1\t0.2\n0.3\t0.4\t0.5\n", r"ragged rows: line 2 has 3 values"),
    ("0.1\tnan\n", "not finite"),
])
def test_corrupt_tsv(tmp_path, text, match):
  d = _write_tsv(tmp_path / "p", text)
  with pytest.raises(ValueError, match=match) as e:
    P.load_pattern(d)
  assert str(d / P.GATES_FILE) in str(e.value)


def test_binary_tsv(tmp_path):
  d = tmp_path / "p"
  d.mkdir()
  (d / P.GATES_FILE).write_bytes(b"\xff\xfe\x00\x81")
  with pytest.raises(ValueError, match="not a text file"):
    P.load_pattern(d)


@pytest.mark.parametrize("config_text, match", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"sink_size": -1}', r"sink_size must be an int >= 0 or None in .*config\.json; got -1"),
    ('{"recent_size": "256"}', r"recent_size must be an int >= 0 or None in .*config\.json; got '256'"),
])
def test_bad_config(tmp_path, config_text, match):
  d = _write_tsv(tmp_path / "p", "0.5\n")
  (d / P.CONFIG_FILE).write_text(config_text)
  with pytest.raises(ValueError, match=match):
    P.load_pattern(d)


def test_binarize_argument_errors():
  p = DuoPattern(np.full((2, 2), 0.5))
  with pytest.raises(ValueError, match="exactly one of threshold"):
    p.binarize()
  with pytest.raises(ValueError, match="exactly one of threshold"):
    p.binarize(threshold=0.5, sparsity=0.5)
  with pytest.raises(TypeError, match="sparsity must be a real number"):
    p.binarize(sparsity="0.5")
  with pytest.raises(TypeError, match="sparsity must be a real number"):
    p.binarize(sparsity=True)
  with pytest.raises(ValueError, match="sparsity must be finite"):
    p.binarize(sparsity=float("nan"))
  with pytest.raises(TypeError, match="threshold must be a real number"):
    p.binarize(threshold=[0.5])
  with pytest.raises(ValueError, match="threshold must be finite"):
    p.binarize(threshold=math.inf)
  assert p.binarize(sparsity=np.float32(0.5)).sparsity == 0.5  # numpy scalars are fine


def test_duo_pattern_construction_errors():
  with pytest.raises(ValueError, match="2-D"):
    DuoPattern(np.zeros(4))
  with pytest.raises(ValueError, match="2-D"):
    DuoPattern(np.zeros((0, 4)))
  with pytest.raises(ValueError, match="finite"):
    DuoPattern(np.array([[np.nan]]))
  with pytest.raises(ValueError, match="sink_size"):
    DuoPattern(np.zeros((1, 1)), sink_size=-3)


# ------------------------------------------------------------------------------------------- BinaryPattern


def test_binary_pattern_basics():
  b = BinaryPattern(np.array([[True, False, True, False], [False, False, False, False], [True] * 4]))
  assert b.shape == (3, 4) and b.num_layers == 3 and b.num_kv_heads == 4
  assert b.num_full_per_layer == (2, 0, 4)
  assert b.sparsity == 1 - 6 / 12
  np.testing.assert_array_equal(b.retrieval_first_permutations(), [[0, 2, 1, 3], [0, 1, 2, 3], [0, 1, 2, 3]])
  assert b.reordered() == BinaryPattern.from_num_full((2, 0, 4), 4)
  assert BinaryPattern.all_full(2, 3).sparsity == 0.0
  assert BinaryPattern.all_streaming(2, 3).sparsity == 1.0
  np.testing.assert_array_equal(BinaryPattern.from_num_full([1, 3], 3).full, [[1, 0, 0], [1, 1, 1]])
  with pytest.raises(dataclasses.FrozenInstanceError):
    b.full = b.full  # type: ignore[misc]
  with pytest.raises(ValueError):
    b.full[0, 0] = False  # read-only array
  with pytest.raises(ValueError, match="bool"):
    BinaryPattern(np.zeros((2, 2)))
  with pytest.raises(ValueError, match=r"num_full_per_layer\[1\]"):
    BinaryPattern.from_num_full([1, 5], 4)
  with pytest.raises(ValueError, match="num_kv_heads"):
    BinaryPattern.all_full(2, 0)


def test_retrieval_first_permutation():
  row = np.array([False, True, False, True, True, False])
  perm = P.retrieval_first_permutation(row)
  np.testing.assert_array_equal(perm, [1, 3, 4, 0, 2, 5])
  assert perm.dtype == np.int64
  assert P.num_full(row) == 3
  np.testing.assert_array_equal(row[perm], [True, True, True, False, False, False])
  with pytest.raises(ValueError, match="bool"):
    P.retrieval_first_permutation([0, 1])


def test_binary_pattern_dict_round_trip():
  b = DuoPattern(np.random.default_rng(2).random((4, 8))).binarize(sparsity=0.5)
  d = json.loads(json.dumps(b.to_dict()))
  assert d["shape"] == [4, 8] and d["sparsity"] == 0.5
  assert BinaryPattern.from_dict(d) == b
  with pytest.raises(ValueError, match="format"):
    BinaryPattern.from_dict({**d, "format": "other"})
  with pytest.raises(ValueError, match="shape"):
    BinaryPattern.from_dict({**d, "shape": [8, 4]})
  with pytest.raises(ValueError, match="0/1"):
    BinaryPattern.from_dict({**d, "full": [[0, 2]]})
  with pytest.raises(ValueError, match="equal-length"):
    BinaryPattern.from_dict({**d, "full": [[0, 1], [1]]})
  with pytest.raises(ValueError, match="num_full_per_layer"):
    BinaryPattern.from_dict({**d, "num_full_per_layer": [0] * 4})


def test_duo_pattern_is_frozen_and_read_only():
  src = np.array([[0.2, 0.8]])
  p = DuoPattern(src)
  src[0, 0] = 0.9  # the pattern holds a copy
  assert p.gates[0, 0] == 0.2
  with pytest.raises(ValueError):
    p.gates[0, 0] = 0.5
  with pytest.raises(dataclasses.FrozenInstanceError):
    p.sink_size = 4  # type: ignore[misc]
  assert "shape=(1, 2)" in repr(p)
