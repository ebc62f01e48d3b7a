"""The shared file helpers: round trips, atomic replacement, torn JSON lines."""

import os

import pytest

from ea_jax import files


def test_json_round_trip_and_no_temporary_left(tmp_path):
  path = str(tmp_path / "a.json")
  files.write_json(path, {"b": 2, "a": [1, 2]})
  files.write_json(path, {"b": 3})
  assert files.read_json(path) == {"b": 3}
  assert os.listdir(tmp_path) == ["a.json"]
  assert files.read_json(str(tmp_path / "missing.json"), default={}) == {}


def test_failed_write_keeps_the_previous_file(tmp_path):
  path = str(tmp_path / "a.csv")
  files.write_csv(path, [{"x": 1.0}])
  with pytest.raises(ValueError):
    files.write_csv(path, [{"x": 2.0}], float_format="{:q}")  # an invalid format, mid-write
  assert files.read_csv(path) == [{"x": "1.0"}]
  assert os.listdir(tmp_path) == ["a.csv"]


def test_csv_round_trip_and_column_check(tmp_path):
  path = str(tmp_path / "r.csv")
  files.write_csv(path, [{"a": 1, "b": 0.5}, {"a": 2, "b": 1 / 3}], float_format="{:.3g}")
  assert files.read_csv(path, columns=("a", "b")) == [
    {"a": "1", "b": "0.5"},
    {"a": "2", "b": "0.333"},
  ]
  with pytest.raises(ValueError, match="columns"):
    files.read_csv(path, columns=("a", "c"))
  with pytest.raises(ValueError, match="no rows"):
    files.write_csv(path, [])


def test_jsonl_appends_and_drops_a_torn_last_line(tmp_path):
  path = str(tmp_path / "h.jsonl")
  files.append_jsonl(path, [{"step": 1}])
  files.append_jsonl(path, [{"step": 2}])
  with open(path, "a") as f:
    f.write('{"step": 3, "lo')
  assert files.read_jsonl(path) == [{"step": 1}, {"step": 2}]
  assert files.read_jsonl(str(tmp_path / "none.jsonl")) == []
