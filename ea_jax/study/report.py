"""The study's report: results.csv / tuning.csv -> summary.md, the figures, the README table.

Everything is a function of the CSV rows (plus, for geometry.png, the trained runs'
checkpoints), so `--collect` regenerates the same report from merged shard CSVs.

Definitions (all numbers are test-split numbers at the checkpoint selected on validation):
  solved      a run with test sequence accuracy >= SOLVED (every scored position of almost every
              test sequence right); a cell is solved when every seed is.
  converged   a run that ended by `solved` (validation sequence accuracy 1.0 at two consecutive
              evals) or `plateau` (validation loss not improved by >= plateau_rel over
              `patience` evals), not by `max_steps`.
  frontier    per level and variant, the smallest width at which the cell is solved.
  verdict     per (level, width), the paired difference EA - DPA of test sequence accuracy over
              seeds, with its exact-bootstrap 95% interval: "EA ahead" if the interval lies above
              +VERDICT_MARGIN, "DPA ahead" if below -VERDICT_MARGIN, else "tie". With 3 seeds
              the interval is [min, max] of the differences, so "ahead" means ahead on every
              seed by more than the margin.
A level shared by two ladders is one task: it counts once in every statistic. A run that
diverged counts as accuracy 0.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Sequence

import numpy as np

from ea_jax import files
from ea_jax.study import formatting, stats
from ea_jax.study import results as results_lib

SUMMARY_FILE = "summary.md"
LADDER_PNG = "ladder.png"
CAPACITY_PNG = "capacity.png"
FRONTIER_PNG = "frontier.png"
GEOMETRY_PNG = "geometry.png"
GEOMETRY_JSON = "geometry.json"
SOLVED = 0.99
VERDICT_MARGIN = (
  0.01  # a difference smaller than 1% of the test sequences is a tie (fixed a priori)
)
README_BEGIN = "<!-- study-results:begin (written by python -m ea_jax.study --publish) -->"
README_END = "<!-- study-results:end -->"


def _acc(row, field) -> float:
  return results_lib.number(row[field], 0.0)


def distinct(rows: Sequence[dict]) -> list[dict]:
  """One row per run (a task that is a level of two ladders appears once)."""
  return list({r["run_id"]: r for r in rows}.values())


def cells(rows: Sequence[dict]) -> list[dict]:
  """One cell per (distinct task, variant, width): test accuracies over seeds (mean, min, max,
  bootstrap interval), solved and max_steps counts, settings, mean steps and wall seconds."""
  groups: dict[tuple, list] = {}
  for r in distinct(rows):
    groups.setdefault(
      (r["label"], float(r["complexity"]), r["variant"], int(r["width"])), []
    ).append(r)
  out = []
  for (label, complexity, variant, width), rs in groups.items():
    rs = sorted(rs, key=lambda r: int(r["seed"]))
    seq = [_acc(r, "sequence_accuracy") for r in rs]
    tok = [_acc(r, "token_accuracy") for r in rs]
    s = stats.summarize(seq)
    t = stats.summarize(tok)
    steps100 = [float(r["steps_to_100"]) for r in rs if r["steps_to_100"] not in ("", None)]
    out.append(
      {
        "label": label,
        "complexity": complexity,
        "variant": variant,
        "width": width,
        "task": rs[0]["task"],
        "level": int(rs[0]["level"]),
        "kernel": rs[0]["kernel"],
        "learning_rate": float(rs[0]["learning_rate"]),
        "pos_encoding": rs[0]["pos_encoding"],
        "seeds": len(rs),
        "seq_by_seed": {int(r["seed"]): v for r, v in zip(rs, seq)},
        "seq_mean": s["mean"],
        "seq_min": s["min"],
        "seq_max": s["max"],
        "seq_lo": s["lo"],
        "seq_hi": s["hi"],
        "tok_mean": t["mean"],
        "tok_min": t["min"],
        "tok_max": t["max"],
        "solved": sum(v >= SOLVED for v in seq),
        "max_steps": sum(r["ended_by"] == "max_steps" for r in rs),
        "diverged": sum(r["status"] == "diverged" for r in rs),
        "steps_mean": float(np.mean([results_lib.number(r["steps"], 0.0) for r in rs])),
        "steps_to_100": float(np.mean(steps100)) if steps100 else None,
        "wall_mean": float(np.mean([float(r["wall_seconds"]) for r in rs])),
      }
    )
  return sorted(out, key=lambda c: (c["complexity"], c["label"], c["variant"], c["width"]))


def ladder_cells(rows: Sequence[dict]) -> list[dict]:
  """Cells per (ladder, level, variant, width), for the per-ladder figure."""
  out = []
  for task in dict.fromkeys(r["task"] for r in rows):
    for c in cells([r for r in rows if r["task"] == task]):
      out.append({**c, "task": task})
  return out


def frontier(cs: Sequence[dict]) -> dict[tuple[str, str], int | None]:
  """{(level label, variant): the smallest width whose cell is solved by every seed, or None}."""
  out: dict[tuple[str, str], int | None] = {}
  for c in sorted(cs, key=lambda c: c["width"]):
    k = (c["label"], c["variant"])
    out.setdefault(k, None)
    if out[k] is None and c["solved"] == c["seeds"]:
      out[k] = c["width"]
  return out


def comparisons(cs: Sequence[dict], baseline: str = "dpa") -> list[dict]:
  """Per (distinct level, width) and EA variant: the paired difference EA - baseline over seeds
  (test sequence accuracy), its interval and the verdict; and which of the two solved."""
  base = {(c["label"], c["width"]): c for c in cs if c["variant"] == baseline}
  out = []
  for c in cs:
    b = base.get((c["label"], c["width"]))
    if c["variant"] == baseline or b is None:
      continue
    diff = stats.paired_difference(c["seq_by_seed"], b["seq_by_seed"])
    out.append(
      {
        "label": c["label"],
        "complexity": c["complexity"],
        "width": c["width"],
        "variant": c["variant"],
        "diff": diff,
        "verdict": stats.verdict(diff, VERDICT_MARGIN),
        "solved": c["solved"] == c["seeds"],
        "baseline_solved": b["solved"] == b["seeds"],
      }
    )
  return out


def converged_fraction(rows: Sequence[dict]) -> tuple[int, int]:
  """(runs that ended by solved or plateau, all runs), counting each run once."""
  rs = distinct(rows)
  return sum(r["ended_by"] in ("solved", "plateau") for r in rs), len(rs)


def _interval(lo, hi, digits=2) -> str:
  return f"[{lo:+.{digits}f}, {hi:+.{digits}f}]"


def verdict_lines(config, rows) -> list[str]:
  """The verdict, written from the numbers: per EA variant, counts of EA ahead / tie / DPA ahead
  over distinct (level, width) cells, and where one solved and the other did not."""
  cs = cells(rows)
  comp = comparisons(cs)
  conv, total = converged_fraction(rows)
  lines = []
  for v in [v for v in config.variants if v != "dpa"]:
    cv = [c for c in comp if c["variant"] == v]
    if not cv:
      continue
    counts = {k: sum(c["verdict"] == k for c in cv) for k in stats.VERDICTS}
    only_ea = [c for c in cv if c["solved"] and not c["baseline_solved"]]
    only_dpa = [c for c in cv if c["baseline_solved"] and not c["solved"]]
    names = lambda cs_: ", ".join(f"{c['label']} w{c['width']}" for c in cs_) or "none"
    lines.append(
      f"- **{v} vs dpa** over {len(cv)} distinct (level, width) cells: EA ahead in "
      f"{counts['EA ahead']}, tie in {counts['tie']}, DPA ahead in {counts['DPA ahead']}. "
      f"Solved (every seed >= {SOLVED}) by {v} but not by dpa: {names(only_ea)}; by dpa but "
      f"not by {v}: {names(only_dpa)}."
    )
  claim_cells = [c for c in comp if c["solved"] and not c["baseline_solved"]]
  lines.append(
    f"- The claim under test (EA reaches 100% at levels DPA cannot, at the same width) "
    f"{'holds in ' + str(len(claim_cells)) + ' cell(s)' if claim_cells else 'is not supported'}"
    f" under these conditions: widths {tuple(config.widths)}, {len(config.seeds)} paired seeds, "
    f"at most {config.base.train.num_steps} steps per run, {conv} of {total} runs converged "
    f"(ended by solved or plateau; the rest hit max_steps, marked * in the tables)."
  )
  return lines


def summary_markdown(config, rows, tuning_rows, *, timing=(), geometry=None) -> str:
  """The text of summary.md (see the module docstring for the definitions)."""
  cs = cells(rows)
  variants = list(config.variants)
  widths = sorted({c["width"] for c in cs})
  levels = sorted({(c["complexity"], c["label"]) for c in cs})
  tc, b = config.base.train, config.base
  conv, total = converged_fraction(rows)
  lines = ["# Study summary", ""]
  lines.append(
    f"- Generated {time.strftime('%Y-%m-%d %H:%M %Z')} from {total} study runs "
    f"({len(rows)} ladder rows) and {len(tuning_rows)} tuning runs."
  )
  lines.append(
    f"- Protocol: each run trains until validation sequence accuracy is 1.0 at two consecutive "
    f"evals (solved), or validation loss has not improved by >= {tc.plateau_rel:g} (relative) "
    f"over {tc.patience} evals (plateau), or {tc.num_steps} steps (max_steps); evals every "
    f"{tc.eval_every} steps on {b.eval.num_examples} validation sequences; the checkpoint is "
    f"selected on validation and every number below is the test split there "
    f"({b.eval.num_examples} test sequences, disjoint from training and validation by "
    f"construction). Batch {tc.batch_size}, model {b.model.num_layers} layers, "
    f"{b.model.num_heads} heads, mlp {config.mlp_ratio} x width."
  )
  lines.append(
    f"- Converged: **{conv} of {total}** runs ({100 * conv / max(total, 1):.0f}%) "
    "ended by solved or plateau; cells with a run that hit max_steps are marked *."
  )
  run_s = sum(float(r["wall_seconds"]) for r in distinct(rows))
  tune_s = sum(float(r["wall_seconds"]) for r in tuning_rows)
  line = (
    f"- Run time: {run_s / 60:.1f} min in study runs + {tune_s / 60:.1f} min in tuning runs "
    "(sum over runs)"
  )
  if timing:
    line += (
      f"; wall time {sum(t['seconds'] for t in timing) / 60:.1f} min over {len(timing)} "
      "invocation(s) ("
      + ", ".join(
        f"{t['started']}: {t['seconds'] / 60:.1f} min, {t['runs_executed']} runs, "
        f"{t['workers']} workers{'' if t['finished'] else ', interrupted'}"
        for t in timing
      )
      + ")"
    )
  lines += [line + ".", ""]

  lines += ["## Verdict", ""] + verdict_lines(config, rows) + [""]

  lines += ["## Tuned settings", ""]
  if tuning_rows:
    tt = config.tune
    lines.append(
      f"Per variant the position encoding is chosen at width {tt.pos_width} over "
      f"{tuple(tt.pos_encodings)} x the lr grid; per (variant, width) the learning rate from "
      f"the grid {tuple(tt.lr_grid)}, extended x3 beyond an edge choice (at most "
      f"{tt.max_extensions} times). Objective: validation loss at the selected checkpoint. "
      f"Tuning task: {tt.ladder} level {tt.level} with rule_seed {tt.rule_seed} (hidden rules "
      f"of its own, never reported), training seed {tt.seed}, validation seed {tt.eval_seed}."
    )
    lines += [
      "",
      "| variant | width | pos | lr | val loss | val seq acc | ended by | chosen | interior |",
      "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in tuning_rows:
      lines.append(
        f"| {r['variant']} | {r['width']} | {r['pos_encoding']} | "
        f"{float(r['learning_rate']):g} | {formatting.fmt(results_lib.number(r['validation_loss']), 4)}"
        f" | {formatting.fmt(_acc(r, 'validation_sequence_accuracy'))} | {r['ended_by']} | "
        f"{'**yes**' if r['chosen'] == 'True' else ''} | {r['interior']} |"
      )
  else:
    lines.append(
      f"No tuning: lr {config.tune.lr_grid[0]:g}, positions "
      f"{config.tune.pos_encodings[0]} for every variant and width."
    )
  lines.append("")

  lines += [
    "## Capacity map (mean test sequence accuracy)",
    "",
    "Rows: distinct levels by complexity; columns: variant x width; * = a seed ended at "
    "max_steps (capacity.png).",
    "",
    "| level | " + " | ".join(f"{v} w{w}" for v in variants for w in widths) + " |",
    "|---|" + "---|" * (len(variants) * len(widths)),
  ]
  by = {(c["label"], c["variant"], c["width"]): c for c in cs}
  for _, lab in levels:
    entries = []
    for v in variants:
      for w in widths:
        c = by.get((lab, v, w))
        entries.append(
          "" if c is None else f"{formatting.fmt(c['seq_mean'], 2)}{'*' if c['max_steps'] else ''}"
        )
    lines.append(f"| {lab} | " + " | ".join(entries) + " |")
  lines.append("")

  front = frontier(cs)
  lines += [
    "## Frontier",
    "",
    f"Smallest width at which every seed reaches >= {SOLVED} test "
    "sequence accuracy (— = none of the widths) (frontier.png).",
    "",
    "| level | " + " | ".join(variants) + " |",
    "|---|" + "---|" * len(variants),
  ]
  for _, lab in levels:
    lines.append(
      f"| {lab} | " + " | ".join(str(front.get((lab, v)) or "—") for v in variants) + " |"
    )
  lines.append("")

  comp = comparisons(cs)
  if comp:
    lines += [
      "## EA − DPA, paired over seeds",
      "",
      "Test sequence accuracy difference (mean, exact-bootstrap 95% interval) per distinct "
      "level and width.",
      "",
      "| level | width | variant | mean diff | 95% interval | verdict |",
      "|---|---|---|---|---|---|",
    ]
    for c in comp:
      d = c["diff"]
      lines.append(
        f"| {c['label']} | {c['width']} | {c['variant']} | {d['mean']:+.3f} | "
        f"{_interval(d['lo'], d['hi'])} | {c['verdict']} |"
      )
    lines.append("")

  lines += [
    "## Per cell",
    "",
    "Test accuracies over seeds: mean, min, 95% interval of the mean; solved = seeds >= "
    f"{SOLVED}; ended = how many seeds hit max_steps; steps = mean steps trained.",
    "",
    "| level | variant | width | pos | lr | tok mean | seq mean | seq min | seq 95% | "
    "solved | max_steps | steps | steps to 100% | wall s/run |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for c in sorted(
    cs,
    key=lambda c: (
      c["complexity"],
      variants.index(c["variant"]) if c["variant"] in variants else 99,
      c["width"],
    ),
  ):
    to_100 = "—" if c["steps_to_100"] is None else f"{c['steps_to_100']:.0f}"
    lines.append(
      f"| {c['label']} | {c['variant']} | {c['width']} | {c['pos_encoding']} | "
      f"{c['learning_rate']:g} | {formatting.fmt(c['tok_mean'])} | {formatting.fmt(c['seq_mean'])} | {formatting.fmt(c['seq_min'])} "
      f"| [{c['seq_lo']:.2f}, {c['seq_hi']:.2f}] | {c['solved']}/{c['seeds']} | "
      f"{c['max_steps']}{'*' if c['max_steps'] else ''} | {c['steps_mean']:.0f} | "
      f"{to_100} | "
      f"{c['wall_mean']:.0f} |"
    )
  lines.append("")

  if geometry:
    lines += [
      "## Attention geometry",
      "",
      "Attention weight over cos(q, k), pooled over layers and heads (geometry.png): "
      "mean cos, weight at cos < 0, weight at |cos| >= 0.5 and at |cos| < 0.5.",
      "",
      "| run | mean cos | weight cos<0 | weight abs(cos)>=0.5 | weight abs(cos)<0.5 |",
      "|---|---|---|---|---|",
    ]
    for name, g in geometry.items():
      s = g["stats"]
      lines.append(
        f"| {name} | {formatting.fmt(s['mean_cos'])} | {formatting.fmt(s['mass_negative'])} | "
        f"{formatting.fmt(s['mass_aligned'])} | {formatting.fmt(s['mass_orthogonal'])} |"
      )
    lines.append("")
  return "\n".join(lines)


def readme_table(config, rows) -> str:
  """The README's results block: the verdict and the capacity map (between the markers)."""
  cs = cells(rows)
  variants = list(config.variants)
  widths = sorted({c["width"] for c in cs})
  levels = sorted({(c["complexity"], c["label"]) for c in cs})
  by = {(c["label"], c["variant"], c["width"]): c for c in cs}
  out = verdict_lines(config, rows) + [
    "",
    "Mean test sequence accuracy over seeds (* = a seed hit max_steps):",
    "",
    "| level | " + " | ".join(f"{v} w{w}" for v in variants for w in widths) + " |",
    "|---|" + "---|" * (len(variants) * len(widths)),
  ]
  for _, lab in levels:
    out.append(
      f"| {lab} | "
      + " | ".join(
        ""
        if (c := by.get((lab, v, w))) is None
        else f"{c['seq_mean']:.2f}{'*' if c['max_steps'] else ''}"
        for v in variants
        for w in widths
      )
      + " |"
    )
  return "\n".join(out)


def update_readme(readme_path: str, block: str) -> None:
  """Replaces the text between README_BEGIN and README_END in `readme_path` with `block`."""
  with open(readme_path) as f:
    text = f.read()
  pattern = re.compile(re.escape(README_BEGIN) + r".*?" + re.escape(README_END), re.S)
  if not pattern.search(text):
    raise ValueError(
      f"{readme_path}: no results markers; add the two lines\n{README_BEGIN}\n"
      f"{README_END}\nwhere the study's results table should go"
    )
  new = pattern.sub(lambda _: f"{README_BEGIN}\n{block}\n{README_END}", text)
  tmp = readme_path + ".tmp"
  with open(tmp, "w") as f:
    f.write(new)
  os.replace(tmp, readme_path)


def _geometry(config, workdir: str, rows) -> dict:
  """Weighted cos(q,k) histograms of the first seed's run of each variant at the widest width,
  at the configured geometry level; {} when those runs are not here (e.g. collected shards)."""
  from ea_jax.study.analysis import geometry as geometry_lib

  g = config.geometry
  want = [
    r
    for r in rows
    if r["task"] == g.ladder
    and int(r["level"]) == g.level
    and int(r["seed"]) == min(config.seeds)
    and int(r["width"]) == max(config.widths)
    and r["status"] == "ok"
  ]
  out = {}
  for r in sorted(want, key=results_lib.row_order(config.variants)):
    run_dir = os.path.join(workdir, "runs", r["run_id"])
    if not os.path.isdir(os.path.join(run_dir, "checkpoints")):
      continue
    res = geometry_lib.run_geometry(run_dir, num_examples=g.num_examples)
    out[
      f"{r['variant']} w{r['width']} {r['label']} (test seq acc "
      f"{formatting.fmt(_acc(r, 'sequence_accuracy'), 2)})"
    ] = res
  return out


def write_report(config, workdir: str) -> list[str]:
  """Writes summary.md, ladder.png, capacity.png, frontier.png (and geometry.png)."""
  from ea_jax.study import plots

  rows = results_lib.read_results(os.path.join(workdir, results_lib.RESULTS_CSV))
  tpath = os.path.join(workdir, results_lib.TUNING_CSV)
  tuning_rows = results_lib.read_tuning(tpath) if os.path.isfile(tpath) else []
  timing = results_lib.read_invocations(workdir)
  cs = cells(rows)
  variants = list(config.variants)
  paths = [
    plots.plot_ladder(ladder_cells(rows), os.path.join(workdir, LADDER_PNG), variants=variants),
    plots.plot_capacity(cs, os.path.join(workdir, CAPACITY_PNG), variants=variants),
    plots.plot_frontier(
      frontier(cs),
      sorted({(c["complexity"], c["label"]) for c in cs}),
      sorted({c["width"] for c in cs}),
      os.path.join(workdir, FRONTIER_PNG),
      variants=variants,
    ),
  ]
  geometry = _geometry(config, workdir, rows) if config.geometry.enabled and rows else {}
  if geometry:
    paths.append(
      plots.plot_cos_histograms(
        {k: (g["edges"], g["hist_YNZ"]) for k, g in geometry.items()},
        os.path.join(workdir, GEOMETRY_PNG),
      )
    )
    files.write_json(
      os.path.join(workdir, GEOMETRY_JSON),
      {
        k: {"edges": g["edges"].tolist(), "hist_YNZ": g["hist_YNZ"].tolist(), "stats": g["stats"]}
        for k, g in geometry.items()
      },
      only_process_0=False,
    )
  text = summary_markdown(config, rows, tuning_rows, timing=timing, geometry=geometry)
  path = os.path.join(workdir, SUMMARY_FILE)
  with open(path + ".tmp", "w") as f:
    f.write(text + "\n")
  os.replace(path + ".tmp", path)
  return [path] + paths


def publish(config, workdir: str, out_dir: str, readme: str | None) -> list[str]:
  """Copies the report and the CSVs to `out_dir` (e.g. docs/results) and writes the README's
  results block; returns the written paths."""
  import shutil

  os.makedirs(out_dir, exist_ok=True)
  written = []
  for name in (
    SUMMARY_FILE,
    results_lib.RESULTS_CSV,
    results_lib.TUNING_CSV,
    LADDER_PNG,
    CAPACITY_PNG,
    FRONTIER_PNG,
    GEOMETRY_PNG,
    "study_timing.json",
    "study_log.txt",
  ):
    src = os.path.join(workdir, name)
    if os.path.isfile(src):
      shutil.copyfile(src, os.path.join(out_dir, name))
      written.append(os.path.join(out_dir, name))
  files.write_json(
    os.path.join(out_dir, "study_config.json"), json.loads(config.to_json()), only_process_0=False
  )
  if readme:
    rows = results_lib.read_results(os.path.join(workdir, results_lib.RESULTS_CSV))
    update_readme(readme, readme_table(config, rows))
    written.append(readme)
  return written
