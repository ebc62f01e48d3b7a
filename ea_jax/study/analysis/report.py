"""The analysis of a finished sweep: delay locking and length generalisation, tables and README.

  python -m ea_jax.study.analysis --sweep_dir=/tmp/exp/final_sweep --out=docs/analysis

For each selected study run of the sweep (`<sweep_dir>/runs/*/result.json`, stage "main"; by
default the tasks "N=5 R=1" and "N=5 R=2" at width 64, every variant and seed):
  - delay locking (delays.delay_analysis, on the test split) at the training length and at every
    other length of `length_factors`: per-head CSV `delay_heads.csv`, per-layer summary
    `delay_models.csv`, a heat map per run at the training length
    `delays_<task>_<variant>_w<width>_s<seed>.png`;
  - length generalisation (lengthgen, on the test split) at training length x each factor:
    `lengthgen.csv`; and, as a check, the validation split at the training length, which must
    reproduce the runs' final validation numbers;
  - `README.md`: command, date, machine, wall time, the tables, the figures and the findings
    (sentences computed from the numbers, so a rerun restates them as found).
Evaluation writes into copies of the runs under `scratch`; the sweep folder is only read.
`run(Options(...), command=...)` does all of it; `python -m ea_jax.study.analysis` is its CLI.
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
import json
import math
import os
import platform
import re
import subprocess
import time
from typing import Sequence

import jax
import numpy as np

from ea_jax import files, train_lib
from ea_jax.study import plots
from ea_jax.study.analysis import delays, lengthgen, loading
from ea_jax.study.formatting import fmt, spread

DEFAULT_TASKS = ("N=5 R=1", "N=5 R=2")
LOCK_MASS = 0.5  # "locks onto delays": a head puts at least this much weight on needed offsets
SWITCH_GAP = 0.3  # "switches with the rule": own minus other mass at least this much
WEAK_RATIO = 2.0  # "weak preference": below LOCK_MASS but at least this many times chance
CSV_FLOAT = "{:.6g}"


@dataclasses.dataclass(frozen=True)
class Options:
  """What to analyse and where to write it (the CLI's flags, checked and converted).

  Attributes:
    sweep_dir: sweep workdir (holds runs/*/result.json); only read.
    out: output folder (README.md, CSVs, PNGs).
    scratch: folder for the copies of the runs that evaluation writes into.
    tasks: task labels to analyse (the order of the tables).
    widths: model widths to analyse.
    length_factors: evaluate at training length x each factor; the first must be 1.
    (tasks, widths and length_factors: sequences or comma-separated strings.)
    delay_examples: sequences per delay analysis (run and length).
    num_offsets: key offsets shown in the delay figures.
  """

  sweep_dir: str
  out: str = "docs/analysis"
  scratch: str = "/tmp/analysis/runs"
  tasks: Sequence[str] = DEFAULT_TASKS
  widths: Sequence[int] = (64,)
  length_factors: Sequence[int] = (1, 2)
  delay_examples: int = 512
  num_offsets: int = 12

  def __post_init__(self):
    def show(values):  # as typed on the command line
      return ",".join(map(str, values)) if isinstance(values, (list, tuple)) else repr(values)

    def items(values):  # a comma-separated string or a sequence
      return values.split(",") if isinstance(values, str) else values

    def ints(name):
      values = items(getattr(self, name))
      try:
        return tuple(int(v) for v in values)
      except (TypeError, ValueError):
        raise ValueError(f"{name}={show(values)}: must be comma-separated integers") from None

    tasks = tuple(t.strip() for t in items(self.tasks) if t.strip())
    widths, factors = ints("widths"), ints("length_factors")
    if not self.sweep_dir:
      raise ValueError("sweep_dir is required: a sweep workdir holding runs/*/result.json")
    if not tasks:
      raise ValueError(f"tasks={show(self.tasks)}: give at least one task label")
    if not widths or min(widths) < 1:
      raise ValueError(f"widths={show(self.widths)}: positive integers, at least one")
    if not factors or factors[0] != 1 or min(factors) < 1:
      raise ValueError(
        f"length_factors={show(self.length_factors)}: positive integers starting with 1"
      )
    for name in ("delay_examples", "num_offsets"):
      if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
        raise ValueError(f"{name}={getattr(self, name)!r}: must be an integer >= 1")
    object.__setattr__(self, "tasks", tasks)
    object.__setattr__(self, "widths", widths)
    object.__setattr__(self, "length_factors", factors)


# ------------------------------------------------------------------------------------------------
# Selecting runs
# ------------------------------------------------------------------------------------------------


def find_runs(
  sweep_dir: str, *, tasks: list[str], widths: list[int], stage: str = "main"
) -> list[dict]:
  """The finished runs of `sweep_dir` with the given task labels and widths, sorted by (task,
  variant, width, seed); each {run, dir, task, variant, width, seed, seq_len, result}."""
  paths = sorted(glob.glob(os.path.join(sweep_dir, "runs", "*", "result.json")))
  if not paths:
    raise FileNotFoundError(f"no {sweep_dir}/runs/*/result.json: is --sweep_dir a sweep workdir?")
  runs = []
  for path in paths:
    with open(path) as f:
      res = json.load(f)
    if (
      res.get("stage") != stage
      or res.get("status") != "ok"
      or res.get("label") not in tasks
      or int(res.get("width", -1)) not in widths
    ):
      continue
    runs.append(
      {
        "run": res["run_id"],
        "dir": os.path.dirname(path),
        "task": res["label"],
        "variant": res["variant"],
        "width": int(res["width"]),
        "seed": int(res["seed"]),
        "seq_len": int(res["task"]["seq_len"]),
        "result": res,
      }
    )
  if not runs:
    raise ValueError(
      f"no finished '{stage}' run in {sweep_dir} with task in {tasks} and width in {widths}"
    )
  order = {t: i for i, t in enumerate(tasks)}
  return sorted(runs, key=lambda r: (order[r["task"]], r["variant"], r["width"], r["seed"]))


def _slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9]+", "", text)


# ------------------------------------------------------------------------------------------------
# Delay locking
# ------------------------------------------------------------------------------------------------


def layer_summary(out: dict) -> list[dict]:
  """Per layer of a run_delays result: the heads' masses averaged over rules.

  best_union: the largest weight a head puts on the offsets some rule needs (rule-agnostic
  locking); best_own / best_own_other: the head with the largest mass on the current rule's
  offsets and its mass on the other rules' offsets; best_switch: the largest own - other over
  heads (None for one rule); peak / entropy: head means (delays.focus_RN); chance_*: uniform
  causal attention.
  """
  own_YRN, other_YRN = out["own_YRN"], out["other_YRN"]
  num_rules = own_YRN.shape[1]
  rows = []
  for y in range(own_YRN.shape[0]):
    own_N, other_N = own_YRN[y].mean(axis=0), other_YRN[y].mean(axis=0)
    best = int(np.argmax(own_N))
    rows.append(
      {
        "layer": y,
        "best_head": best,
        "best_own": float(own_N[best]),
        "best_own_other": float(other_N[best]) if num_rules > 1 else None,
        "best_union": float(np.max(own_N + other_N)),
        "best_switch": float(np.max(own_N - other_N)) if num_rules > 1 else None,
        "peak": float(out["peak_YRN"][y].mean()),
        "entropy": float(out["entropy_YRN"][y].mean()),
        "chance_own": float(out["chance_own_R"].mean()),
        "chance_union": float((out["chance_own_R"] + out["chance_other_R"]).mean()),
      }
    )
  return rows


def head_rows(out: dict) -> list[dict]:
  """One row per (layer, rule, head) of a run_delays result."""
  rows = []
  Y, R, N = out["own_YRN"].shape
  for y in range(Y):
    for r in range(R):
      for n in range(N):
        rows.append(
          {
            "layer": y,
            "rule": "-".join(map(str, out["rules"][r])),
            "head": n,
            "own": out["own_YRN"][y, r, n],
            "other": out["other_YRN"][y, r, n],
            "peak": out["peak_YRN"][y, r, n],
            "entropy": out["entropy_YRN"][y, r, n],
            "chance_own": out["chance_own_R"][r],
            "queries": int(out["queries_R"][r]),
          }
        )
  return rows


# ------------------------------------------------------------------------------------------------
# Output helpers
# ------------------------------------------------------------------------------------------------


def machine() -> str:
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    model = names[0] if names else model
  except OSError:
    pass
  devices = ", ".join(sorted({d.platform for d in jax.devices()}))
  return f"{model}, {os.cpu_count()} cores, JAX devices: {devices}"


def code_version() -> str:
  """`commit <short hash>` of the checkout holding this file, and which tracked ea_jax/ files
  differ from it (the analysis ran with those edits)."""
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    head = subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"], cwd=here, check=True, capture_output=True, text=True
    ).stdout.strip()
    # ":/ea_jax" = ea_jax/ at the top of the checkout; porcelain paths are relative to the top.
    dirty = subprocess.run(
      ["git", "status", "--porcelain", "--untracked-files=no", "--", ":/ea_jax"],
      cwd=here,
      check=True,
      capture_output=True,
      text=True,
    ).stdout.split("\n")
  except (OSError, subprocess.CalledProcessError):
    return "not a git checkout"
  changed = sorted(line[3:] for line in dirty if line.strip())
  return f"commit `{head}`" + (
    f", with uncommitted changes in {', '.join(changed)}" if changed else ""
  )


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------


def _delay_table(summaries: list[dict], tasks: list[str], factors: list[int]) -> list[str]:
  lines = [
    "| task | variant | width | layer | best head: own | its other | best own − other | "
    "best any-rule | "
    + " | ".join(f"any-rule at {k}L" for k in factors[1:])
    + (" | " if factors[1:] else "")
    + "peak | entropy | chance own / any |",
    "|---" * (11 + len(factors[1:])) + "|",
  ]
  keys = []
  for s in summaries:
    key = (s["task"], s["variant"], s["width"], s["layer"])
    if key not in keys:
      keys.append(key)
  keys.sort(key=lambda k: (tasks.index(k[0]), k[1], k[2], k[3]))
  for key in keys:
    at = {
      k: [
        s
        for s in summaries
        if (s["task"], s["variant"], s["width"], s["layer"]) == key and s["length_factor"] == k
      ]
      for k in factors
    }
    base = at[factors[0]]
    cells = [
      key[0],
      key[1],
      str(key[2]),
      str(key[3]),
      spread([s["best_own"] for s in base]),
      spread([s["best_own_other"] for s in base]),
      spread([s["best_switch"] for s in base]),
      spread([s["best_union"] for s in base]),
    ]
    cells += [spread([s["best_union"] for s in at[k]]) for k in factors[1:]]
    cells += [
      spread([s["peak"] for s in base]),
      spread([s["entropy"] for s in base]),
      f"{base[0]['chance_own']:.2f} / {base[0]['chance_union']:.2f}",
    ]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def _length_table(summary: list[dict]) -> list[str]:
  lines = [
    "| task | variant | width | L | tok mean | tok min | seq mean | seq min | rollout tok "
    "mean | rollout tok min | rollout seq mean | rollout seq min | tok, positions < "
    "L_train | tok, positions ≥ L_train |",
    "|---" * 14 + "|",
  ]
  for s in summary:
    lines.append(
      "| "
      + " | ".join(
        [
          s["task"],
          s["variant"],
          str(s["width"]),
          str(s["seq_len"]),
          *[
            fmt(s[f"{m}_{a}"])
            for m in (
              "token_accuracy",
              "sequence_accuracy",
              "rollout_token_accuracy",
              "rollout_sequence_accuracy",
            )
            for a in ("mean", "min")
          ],
          fmt(s["token_accuracy_seen_mean"]),
          fmt(s["token_accuracy_beyond_mean"]),
        ]
      )
      + " |"
    )
  return lines


def _findings(runs, summaries, length_summary, tasks, factors) -> list[str]:
  """Sentences computed from the numbers (thresholds LOCK_MASS, SWITCH_GAP)."""
  out = []
  base = [s for s in summaries if s["length_factor"] == factors[0]]
  for task in tasks:
    for variant in sorted({s["variant"] for s in base if s["task"] == task}):
      rows = [s for s in base if s["task"] == task and s["variant"] == variant]
      seeds = sorted({s["seed"] for s in rows})
      union = {sd: max(s["best_union"] for s in rows if s["seed"] == sd) for sd in seeds}
      locked = [sd for sd in seeds if union[sd] >= LOCK_MASS]
      chance = rows[0]["chance_union"]
      if len(locked) == len(seeds):
        verdict = "locks onto delay offsets"
      elif locked:
        verdict = "locks onto delay offsets in some seeds"
      elif min(union.values()) >= WEAK_RATIO * chance:
        verdict = f"no locking, a weak preference for delay offsets (≥ {WEAK_RATIO:g}× chance)"
      else:
        verdict = "no delay locking"
      accs = [
        r["result"]["summary"]["sequence_accuracy"]
        for r in runs
        if r["task"] == task and r["variant"] == variant
      ]
      text = (
        f"**{task}, {variant}: {verdict}.** The head with the most weight on offsets that "
        f"some rule needs puts {min(union.values()):.2f}–{max(union.values()):.2f} of its "
        f"weight there (chance {chance:.2f}); {len(locked)}/{len(seeds)} seeds have such a head "
        f"at ≥ {LOCK_MASS}. Test sequence accuracy of these runs "
        f"{min(accs):.3f}–{max(accs):.3f}."
      )
      switches = {
        sd: max(s["best_switch"] for s in rows if s["seed"] == sd)
        for sd in seeds
        if all(s["best_switch"] is not None for s in rows if s["seed"] == sd)
      }
      if switches:
        following = [sd for sd, g in switches.items() if g >= SWITCH_GAP]
        text += (
          f" Largest own − other gap of any head: {max(switches.values()):.2f}; "
          f"{len(following)}/{len(switches)} seeds have a head whose attention follows the "
          f"rule in use by ≥ {SWITCH_GAP}"
          + (
            " — the locked heads weigh the current and the other rule's offsets about "
            "alike, so where attention goes does not select the rule."
            if locked and not following
            else "."
          )
        )
      ent = [s["entropy"] for s in rows]
      text += (
        f" Mean normalised attention entropy per layer {min(ent):.2f}–{max(ent):.2f} "
        f"(1 = uniform over the visible keys)."
      )
      out.append(text)
  by = {(s["task"], s["variant"], s["seq_len"]): s for s in length_summary}
  for task in tasks:
    variants = sorted({s["variant"] for s in length_summary if s["task"] == task})
    # Only lengths every variant could be evaluated at (a learned position table ends at its
    # size: lengthgen gives NaN rows there, which the table shows and the findings leave out).
    lens = sorted(
      n
      for n in {s["seq_len"] for s in length_summary if s["task"] == task}
      if all(
        (task, v, n) in by and math.isfinite(by[(task, v, n)]["token_accuracy_mean"])
        for v in variants
      )
    )
    if len(lens) < 2:
      continue
    parts = []
    for variant in variants:
      a, b = by[(task, variant, lens[0])], by[(task, variant, lens[-1])]
      parts.append(
        f"{variant} token {a['token_accuracy_mean']:.3f} → "
        f"{b['token_accuracy_mean']:.3f} ({b['token_accuracy_beyond_mean']:.3f} on the "
        f"positions from {lens[0]} on), sequence {a['sequence_accuracy_mean']:.3f} → "
        f"{b['sequence_accuracy_mean']:.3f}"
      )
    text = f"**{task}, L={lens[0]} → {lens[-1]}** (mean over seeds): " + "; ".join(parts) + "."
    if "dpa" in variants:
      beyond = {v: by[(task, v, lens[-1])]["token_accuracy_beyond_mean"] for v in variants}
      worse = [v for v in variants if v != "dpa" and beyond[v] < beyond["dpa"] - 0.02]
      better = [v for v in variants if v != "dpa" and beyond[v] > beyond["dpa"] + 0.02]
      text += (
        f" Beyond the training length, {', '.join(worse) or 'no EA variant'} "
        f"generalise{'s' if len(worse) <= 1 else ''} worse than dpa"
        + (f" and {', '.join(better)} better" if better else "")
        + " (token accuracy on those positions, by more than 0.02)."
      )
    out.append(text)
  return out


def write_readme(
  path,
  *,
  command,
  started,
  wall_s,
  runs,
  summaries,
  length_rows,
  length_summary,
  repro,
  figures,
  tasks,
  widths,
  factors,
  delay_examples,
  not_evaluable=(),
) -> None:
  lines = [
    "# Analysis: delay locking and length generalisation",
    "",
    "Generated by `ea_jax/study/analysis/report.py`; every number, table and sentence below was "
    "written by the command, none edited by hand.",
    "",
    "## How it was run",
    "",
    "```",
    command,
    "```",
    "",
    f"- Date: {started} UTC.",
    f"- Machine: {machine()}.",
    f"- Code: {code_version()}.",
    f"- Wall time: {wall_s / 60:.1f} min.",
    f"- Runs: {len(runs)} study runs of the sweep (tasks {', '.join(tasks)}; width(s) "
    f"{', '.join(map(str, widths))}; variants {', '.join(sorted({r['variant'] for r in runs}))};"
    f" seeds {', '.join(map(str, sorted({r['seed'] for r in runs})))}), each at the checkpoint "
    "it selected on validation.",
    "",
    "## Delay locking",
    "",
    "Task: `x_s = sum_d x_{s-d} mod N` under a hidden rule (d1, d2); `inputs[t] = x_t`, "
    "`targets[t] = x_{t+1}`, so the prediction at query position t needs the keys at offsets "
    "o = t − j = d − 1. For each sequence the rule is re-derived from the sequence (the rules "
    "that reproduce x_D..x_L; sequences that more than one rule reproduces are skipped). Per "
    "layer and head: the mean attention weight at each offset over the scored query positions, "
    f"separately per rule ({delay_examples} sequences of the test split per run and length).",
    "",
    "- *own*: weight on the current rule's needed offsets; *other*: on offsets only the other "
    "rule(s) need. A head that follows the rule in use has own ≈ 1, other ≈ 0 under every rule; "
    "a head fixed on both rules' offsets has own ≈ other.",
    "- Columns (per layer; averaged over rules; mean [min, max] over seeds): *best head: own* = "
    "the head with the largest own mass, *its other* = that head's other mass, *best own − "
    "other* = the largest gap of any head (rule following), *best any-rule* = the largest "
    "own + other of any head (weight on the delays of some rule, rule-agnostic), the same at "
    "longer lengths, *peak* = mean largest weight per query, *entropy* = mean row entropy / "
    "log(t + 1) (1 = uniform over the visible keys), *chance* = uniform causal attention.",
    "- In layer 1 a key at offset o carries whatever layer 0 gathered there, so layer-1 "
    "offsets are positions, not necessarily raw tokens.",
    "",
  ]
  lines += _delay_table(summaries, tasks, factors)
  skipped = sum(s["skipped"] for s in summaries if s["layer"] == 0)
  seen = sum(s["sequences"] for s in summaries if s["layer"] == 0)
  lines += [
    "",
    f"Findings use thresholds: locked = a head with ≥ {LOCK_MASS} of its weight on "
    f"offsets some rule needs; follows the rule = own − other ≥ {SWITCH_GAP}; weak "
    f"preference = best head ≥ {WEAK_RATIO:g}× chance.",
  ]
  lines += [
    "",
    f"Sequences skipped as ambiguous (all runs and lengths): {skipped} of {seen}.",
    "",
    "Per-head, per-rule numbers: `delay_heads.csv`; per-layer summary: `delay_models.csv`.",
    "",
    "### Figures (training length; cyan boxes = the rule's "
    "needed offsets; each figure has its own colour scale)",
    "",
  ]
  for run, fig in figures:
    lines.append(
      f"- `{fig}`: {run['task']} {run['variant']} width {run['width']} seed "
      f"{run['seed']} (test seq acc "
      f"{run['result']['summary']['sequence_accuracy']:.3f})"
    )
  shown = {}
  for run, fig in figures:
    shown.setdefault((run["task"], run["variant"]), fig)
  lines.append("")
  for (task, variant), fig in shown.items():
    lines += [f"![{task} {variant}]({fig})", ""]
  lines += [
    "## Length generalisation",
    "",
    "Each run evaluated (`ea_jax.evaluate.evaluate`, the function behind `eval.py`) with its "
    "own training config and `task.seq_len` overridden, on copies of the run folders: the "
    "test split, with the eval seed and number of examples of the validation during training. "
    "Token / sequence accuracy are teacher-forced; rollout feeds the model's own predictions "
    "back at scored positions. Mean and min over seeds.",
    "",
  ]
  lines += _length_table(length_summary)
  lines += [
    "",
    "The last two columns: mean over positions of the per-position token accuracy "
    "(each position weighted equally) before and from the training length on (at the "
    "training length itself every position is before it).",
    "",
    f"Check: at the training length, the same evaluation on the validation split "
    f"reproduces the runs' validation numbers at their selected checkpoint (result.json): largest difference "
    f"over {len(repro) // 2} runs "
    f"{max(abs(d) for d in repro):.2g} (token and sequence accuracy).",
    "",
    "Per-run numbers: `lengthgen.csv`.",
    "",
    f"Not evaluable, so left out of both analyses (rows with NaN in `lengthgen.csv`): "
    f"{len(not_evaluable)} run-lengths"
    + (": " + "; ".join(not_evaluable) + "." if not_evaluable else "."),
    "",
    "## Findings",
    "",
  ]
  lines += ["- " + s for s in _findings(runs, summaries, length_summary, tasks, factors)]
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write("\n".join(lines) + "\n")
  os.replace(tmp, path)  # a reader never sees half a README


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def run(options: Options, *, command: str) -> str:
  """Analyses the runs `options` selects and writes `options.out`; returns the README's path.

  Args:
    options: what to analyse and where to write it.
    command: the command line to quote in the README.
  """
  t0 = time.time()
  started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
  runs = find_runs(options.sweep_dir, tasks=list(options.tasks), widths=list(options.widths))
  os.makedirs(options.out, exist_ok=True)
  factors = list(options.length_factors)
  summaries, heads, figures, length_rows, repro = [], [], [], [], []
  not_evaluable = []  # run-lengths beyond a learned position table (delays and lengthgen skip)
  for i, run_ in enumerate(runs):
    ident = {
      "run": run_["run"],
      "task": run_["task"],
      "variant": run_["variant"],
      "width": run_["width"],
      "seed": run_["seed"],
    }
    trained = loading.load_run(run_["dir"])
    run_config = train_lib.read_train_config(run_["dir"])["config"]
    for k in factors:
      why = lengthgen.beyond_position_table(run_config, run_["seq_len"] * k)
      if why:
        not_evaluable.append(f"{run_['run']} at L={run_['seq_len'] * k} ({why})")
        continue
      out = delays.delay_analysis(
        *trained, num_examples=options.delay_examples, seq_len=run_["seq_len"] * k
      )
      extra = {
        "length_factor": k,
        "seq_len": out["seq_len"],
        "skipped": out["skipped"],
        "sequences": out["sequences"],
      }
      summaries += [{**ident, **extra, **s} for s in layer_summary(out)]
      heads += [{**ident, **extra, **h} for h in head_rows(out)]
      if k == 1:
        name = (
          f"delays_{_slug(run_['task'])}_{run_['variant']}_w{run_['width']}_s{run_['seed']}.png"
        )
        plots.plot_delay_profiles(
          out["profile_YRNO"],
          out["rules"],
          os.path.join(options.out, name),
          num_offsets=options.num_offsets,
          title=f"{run_['task']} {run_['variant']} width {run_['width']} seed {run_['seed']} "
          f"(test seq acc {run_['result']['summary']['sequence_accuracy']:.2f})",
        )
        figures.append((run_, name))
    rows = lengthgen.eval_at_lengths(
      run_["dir"], [run_["seq_len"] * k for k in factors], scratch=options.scratch, split="test"
    )
    length_rows += [{**ident, **row} for row in rows]
    (check,) = lengthgen.eval_at_lengths(
      run_["dir"], [run_["seq_len"]], scratch=options.scratch, split="validation"
    )
    summ = run_["result"]["summary"]
    # The training loop's validation numbers at the selected checkpoint (the step evaluated).
    repro += [
      check["token_accuracy"] - summ.get("validation_token_accuracy", summ["token_accuracy"]),
      check["sequence_accuracy"]
      - summ.get("validation_sequence_accuracy", summ["sequence_accuracy"]),
    ]
    print(f"[{i + 1}/{len(runs)}] {run_['run']}: {time.time() - t0:.0f} s", flush=True)
  length_summary = lengthgen.summarize(
    length_rows,
    ("task", "variant", "width", "seq_len"),
    lengthgen.METRICS + ("token_accuracy_seen", "token_accuracy_beyond"),
  )
  files.write_csv(os.path.join(options.out, "delay_heads.csv"), heads, float_format=CSV_FLOAT)
  files.write_csv(os.path.join(options.out, "delay_models.csv"), summaries, float_format=CSV_FLOAT)
  files.write_csv(os.path.join(options.out, "lengthgen.csv"), length_rows, float_format=CSV_FLOAT)
  readme = os.path.join(options.out, "README.md")
  write_readme(
    readme,
    command=command,
    started=started,
    wall_s=time.time() - t0,
    runs=runs,
    summaries=summaries,
    length_rows=length_rows,
    length_summary=length_summary,
    repro=repro,
    figures=figures,
    tasks=list(options.tasks),
    widths=list(options.widths),
    factors=factors,
    not_evaluable=not_evaluable,
    delay_examples=options.delay_examples,
  )
  print(f"wrote {readme} in {time.time() - t0:.0f} s", flush=True)
  return readme
