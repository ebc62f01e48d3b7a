"""The fault campaign (benchmarks/faults.py) on the tiny config: its in-process cases (damaged
checkpoints, provenance mismatches) and one kill -9 during a save in a real train.py."""

import os
import sys

import pytest
import train_helpers

sys.path.insert(0, os.path.join(train_helpers.REPO, "benchmarks"))
import faults  # noqa: E402  pylint: disable=g-import-not-at-top

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def campaign(tmp_path_factory):
  c = faults.Campaign(str(tmp_path_factory.mktemp("faults")), seed=0, in_process_reference=True)
  faults.default_cases(c)
  return c


def test_damaged_checkpoints_and_provenance_are_refused_or_resumed_exactly(campaign):
  names = [
    "damaged_garbage",
    "damaged_no_metadata",
    "damaged_leftover_tmp",
    "provenance_attention",
    "provenance_task",
    "provenance_eval",
  ]
  rows = {r["case"]: r for r in faults.run(campaign, names, tries=1)}
  assert all(r["lost"] == 0 for r in rows.values()), rows
  assert rows["damaged_leftover_tmp"]["exact"] == 1  # a half-written save is ignored
  for name in names:
    if name != "damaged_leftover_tmp":
      assert rows[name]["refused"] == 1, name
  table = faults.table(list(rows.values())).splitlines()
  assert table[0].startswith("| case | tries | exact resumes | clear refusals | anything lost")
  assert len(table) == 2 + len(names)


def test_the_comparison_detects_a_different_run(campaign, tmp_path):
  # The comparison itself must fail on a run that is not the reference's.
  from ea_jax import train_lib

  other = str(tmp_path / "other")
  train_lib.train_and_evaluate(faults._config({"train.seed": 3}), other)  # pylint: disable=protected-access
  assert campaign.compare(other).startswith("lost:")


def test_kill_during_a_save_then_rerun_is_exact(campaign):
  rows = faults.run(campaign, ["kill_mid_save"], tries=1)
  assert rows[0]["lost"] == 0 and rows[0]["exact"] == 1, rows
