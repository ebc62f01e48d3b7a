"""Small, atomic file helpers shared by training, evaluation and the study.

Every writer goes through a temporary file and `os.replace`, so a reader never sees half a file
and a killed process leaves the previous version (or nothing) behind. Writers are no-ops on
processes other than 0 when `only_process_0` is set, so multi-process runs write each file once.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Iterable, Sequence


def _process_index() -> int:
  import jax  # lazy: the study's report reads and writes files without starting JAX

  return jax.process_index()


def _replace_atomically(path: str, write) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "w", newline="") as f:
      write(f)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path: str, payload: Any, *, only_process_0: bool = True) -> None:
  """Writes `payload` as indented, key-sorted JSON to `path`, atomically."""
  if only_process_0 and _process_index() != 0:
    return
  _replace_atomically(path, lambda f: json.dump(payload, f, indent=2, sort_keys=True, default=str))


def read_json(path: str, default: Any = None) -> Any:
  """The JSON in `path`, or `default` when the file does not exist."""
  if not os.path.isfile(path):
    return default
  with open(path) as f:
    return json.load(f)


def write_csv(
  path: str,
  rows: Sequence[dict],
  columns: Sequence[str] | None = None,
  *,
  float_format: str | None = None,
) -> None:
  """Writes dict rows as CSV (columns: `columns`, else the first row's keys), atomically.

  `float_format` (e.g. "{:.6g}") formats float cells; other cells are written with `str`.
  """
  if columns is None:
    if not rows:
      raise ValueError(f"write_csv({path!r}): no rows and no columns")
    columns = list(rows[0])

  def cell(v):
    if float_format is not None and isinstance(v, float):
      return float_format.format(v)
    return v

  def write(f):
    w = csv.DictWriter(f, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    w.writerows({k: cell(row.get(k)) for k in columns} for row in rows)

  _replace_atomically(path, write)


def read_csv(path: str, columns: Sequence[str] | None = None) -> list[dict]:
  """Rows of a CSV file as dicts of strings; with `columns`, its header must be exactly those."""
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    if columns is not None and tuple(reader.fieldnames or ()) != tuple(columns):
      raise ValueError(f"{path}: columns {reader.fieldnames} are not the expected {list(columns)}")
    return list(reader)


def append_jsonl(path: str, rows: Iterable[dict], *, only_process_0: bool = True) -> None:
  """Appends one JSON line per row to `path` (flushed and fsynced)."""
  if only_process_0 and _process_index() != 0:
    return
  with open(path, "a") as f:
    for row in rows:
      f.write(json.dumps(row, sort_keys=True) + "\n")
    f.flush()
    os.fsync(f.fileno())


def read_jsonl(path: str) -> list[dict]:
  """The rows of a JSON-lines file ([] when it does not exist); a torn last line is dropped."""
  if not os.path.isfile(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue  # a line cut short by a kill mid-write
  return rows
