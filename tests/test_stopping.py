"""The stopping rule and checkpoint selection on scripted validation histories."""

import pytest

from ea_jax import stopping


def _history(*rows):
  """Rows (loss, sequence_accuracy) at eval steps 100, 200, ..."""
  return [
    {"step": 100 * (i + 1), "loss": loss, "sequence_accuracy": acc}
    for i, (loss, acc) in enumerate(rows)
  ]


def test_solved_needs_two_consecutive_evals_at_one():
  h = _history((2.0, 0.5), (1.0, 1.0))
  assert stopping.decide(h, patience=5, plateau_rel=0.01) is None
  assert stopping.steps_to_100(h) is None
  h = _history((2.0, 0.5), (1.0, 1.0), (0.9, 1.0))
  assert stopping.decide(h, patience=5, plateau_rel=0.01) == "solved"
  assert stopping.steps_to_100(h) == 200
  assert stopping.select(h) == 200  # the confirmed one, not the lower loss at 300


def test_one_then_not_is_not_solved_and_not_selected_by_accuracy():
  h = _history((2.0, 0.5), (0.5, 1.0), (0.4, 0.99), (0.3, 0.98))
  assert stopping.decide(h, patience=5, plateau_rel=0.01) is None
  assert stopping.steps_to_100(h) is None
  assert stopping.select(h) == 400  # lowest validation loss
  # Later confirmation counts from the first *confirmed* 1.0.
  h = h + [
    {"step": 500, "loss": 0.35, "sequence_accuracy": 1.0},
    {"step": 600, "loss": 0.36, "sequence_accuracy": 1.0},
  ]
  assert stopping.steps_to_100(h) == 500
  assert stopping.select(h) == 500
  assert stopping.decide(h, patience=5, plateau_rel=0.01) == "solved"


def test_plateau_after_patience_evals_without_enough_improvement():
  # Best before the window 2.0; best in the last 2 evals 1.75: 12.5% better.
  h = _history((2.0, 0.0), (1.9, 0.0), (1.75, 0.0))
  assert stopping.decide(h, patience=2, plateau_rel=0.125) is None  # exactly 12.5%: improved
  assert stopping.decide(h, patience=2, plateau_rel=0.25) == "plateau"
  # With no more evals than `patience` there is no earlier best to compare with.
  assert stopping.decide(h, patience=3, plateau_rel=0.99) is None


def test_min_steps_holds_an_initial_plateau_but_not_a_solve():
  # The initial plateau of a recurrence run: loss stuck at log(5) for 6 evals (steps 100..600).
  flat = _history(*[(1.609, 0.0)] * 6)
  assert stopping.decide(flat, patience=5, plateau_rel=0.01) == "plateau"
  assert stopping.decide(flat, patience=5, plateau_rel=0.01, min_steps=601) is None
  assert stopping.decide(flat, patience=5, plateau_rel=0.01, min_steps=600) == "plateau"
  # A solve ends the run before min_steps.
  solved = _history((1.0, 0.5), (0.1, 1.0), (0.05, 1.0))
  assert stopping.decide(solved, patience=5, plateau_rel=0.01, min_steps=10_000) == "solved"
  with pytest.raises(ValueError, match="min_steps"):
    stopping.decide(flat, patience=5, plateau_rel=0.01, min_steps=-1)


def test_exactly_one_percent_counts_as_improvement():
  h = _history((1.0, 0.0), (1.0, 0.0), (0.99, 0.0))
  assert stopping.decide(h, patience=1, plateau_rel=0.01) is None
  h = _history((1.0, 0.0), (1.0, 0.0), (0.991, 0.0))
  assert stopping.decide(h, patience=1, plateau_rel=0.01) == "plateau"


def test_a_rise_then_recovery_compares_with_the_best_not_the_last():
  # Loss 1.0, then up to 3.0, then 1.5: the window's best (1.5) is worse than the best before.
  h = _history((1.0, 0.0), (3.0, 0.0), (1.5, 0.0))
  assert stopping.decide(h, patience=1, plateau_rel=0.01) == "plateau"
  assert stopping.select(h) == 100


def test_solved_wins_over_plateau_and_selection_ties_take_the_earliest():
  h = _history((0.5, 1.0), (0.5, 1.0))
  assert stopping.decide(h, patience=1, plateau_rel=0.5) == "solved"
  assert stopping.select(_history((0.5, 0.0), (0.5, 0.0))) == 100
  assert stopping.select([]) is None


def test_steps_to_keep_holds_the_selected_and_an_unconfirmed_one():
  h = _history((2.0, 0.0), (1.0, 0.0), (1.5, 1.0))
  assert stopping.steps_to_keep(h) == {200, 300}
  assert stopping.steps_to_keep(h[:2]) == {200}
  assert stopping.steps_to_keep([]) == set()


def test_bad_arguments_name_the_field():
  with pytest.raises(ValueError, match="config.train.patience"):
    stopping.decide(_history((1.0, 0.0)), patience=0, plateau_rel=0.01)
  with pytest.raises(ValueError, match="config.train.plateau_rel"):
    stopping.decide(_history((1.0, 0.0)), patience=1, plateau_rel=1.0)
