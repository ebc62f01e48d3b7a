"""The sweep's report: aggregates results.csv / tuning.csv into summary.md and the figures.

Everything here is a function of the CSV rows (plus, for geometry.png, the trained runs'
checkpoints), so `python -m ea_jax.sweep --collect` regenerates the same report from merged
shard CSVs.

Definitions used in summary.md:
  solved        a run whose final validation sequence accuracy is 1.0 (every scored position
                of every validation sequence right).
  frontier      per (ladder, variant, width): the highest level at which *every* seed solved.
  steps to 100% the first evaluation step with sequence accuracy 1.0 (eval granularity
                `base.train.eval_every`), averaged over the seeds that got there.
A run that diverged (non-finite loss) counts as accuracy 0.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from typing import Sequence

import numpy as np

from ea_jax import sweep as sweep_lib

SUMMARY_FILE = "summary.md"
LADDER_PNG = "ladder.png"
FRONTIER_PNG = "frontier.png"
GEOMETRY_PNG = "geometry.png"
GEOMETRY_JSON = "geometry.json"
WORSE_BY = 0.05   # "EA worse than DPA" = mean sequence accuracy lower by more than this


def _acc(row, field) -> float:
  v = row[field]
  return 0.0 if v in ("", None) else float(v)


def aggregate(rows: Sequence[dict]) -> list[dict]:
  """One cell per (task, level, variant, width): accuracy mean/min/max over seeds, solved
  count, mean steps to 100%, mean wall seconds. Cells keep the rows' order."""
  groups: dict[tuple, list] = {}
  for r in rows:
    groups.setdefault((r["task"], int(r["level"]), r["variant"], int(r["width"])), []).append(r)
  cells = []
  for (task, level, variant, width), rs in groups.items():
    seq = np.array([_acc(r, "sequence_accuracy") for r in rs])
    tok = np.array([_acc(r, "token_accuracy") for r in rs])
    steps = [float(r["steps_to_100"]) for r in rs if r["steps_to_100"] not in ("", None)]
    cells.append({
        "task": task, "level": level, "variant": variant, "width": width,
        "label": rs[0]["label"], "complexity": float(rs[0]["complexity"]),
        "kernel": rs[0]["kernel"], "learning_rate": float(rs[0]["learning_rate"]),
        "seeds": len(rs), "solved": int(np.sum(seq >= 1.0)),
        "diverged": sum(r["status"] == "diverged" for r in rs),
        "seq_mean": float(seq.mean()), "seq_min": float(seq.min()), "seq_max": float(seq.max()),
        "tok_mean": float(tok.mean()), "tok_min": float(tok.min()), "tok_max": float(tok.max()),
        "steps_to_100": float(np.mean(steps)) if steps else None,
        "wall_mean": float(np.mean([float(r["wall_seconds"]) for r in rs])),
    })
  return cells


def frontiers(cells: Sequence[dict]) -> dict[tuple[str, str, int], dict | None]:
  """{(task, variant, width): the highest-level cell where every seed solved, or None}."""
  out: dict[tuple[str, str, int], dict | None] = {}
  for c in cells:
    k = (c["task"], c["variant"], c["width"])
    out.setdefault(k, None)
    if c["solved"] == c["seeds"] and (out[k] is None or c["level"] > out[k]["level"]):
      out[k] = c
  return out


def comparisons(cells: Sequence[dict], baseline: str = "dpa") -> list[dict]:
  """Per (task, level, width) and non-baseline variant: mean sequence accuracy minus the
  baseline's, and whether the variant solved (all seeds) where the baseline did not or v.v."""
  base = {(c["task"], c["level"], c["width"]): c for c in cells if c["variant"] == baseline}
  out = []
  for c in cells:
    b = base.get((c["task"], c["level"], c["width"]))
    if c["variant"] == baseline or b is None:
      continue
    out.append({"task": c["task"], "level": c["level"], "label": c["label"],
                "width": c["width"], "variant": c["variant"],
                "delta_seq": c["seq_mean"] - b["seq_mean"],
                "solved": c["solved"] == c["seeds"], "baseline_solved": b["solved"] == b["seeds"]})
  return out


def _f(x, digits=3) -> str:
  return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _steps(x) -> str:
  return "—" if x is None else f"{x:.0f}"


def summary_markdown(config, rows, tuning_rows, *, timing=(), geometry=None) -> str:
  """The text of summary.md (see the module docstring for the definitions); `timing` is the
  sweep's invocation log (ea_jax.sweep.read_invocations)."""
  cells = aggregate(rows)
  front = frontiers(cells)
  variants = list(config.variants)
  widths = sorted({c["width"] for c in cells})
  lines = ["# Sweep summary", ""]
  total_run = sum(float(r["wall_seconds"]) for r in {r["run_id"]: r for r in rows}.values())
  total_tune = sum(float(r["wall_seconds"]) for r in tuning_rows)
  lines.append(f"- Generated {time.strftime('%Y-%m-%d %H:%M %Z')} from {len(rows)} result rows "
               f"({len({r['run_id'] for r in rows})} runs) and {len(tuning_rows)} tuning runs.")
  lines.append(f"- Budget per run: {config.base.train.num_steps} steps, batch "
               f"{config.base.train.batch_size}, early stop at validation sequence accuracy 1.0; "
               f"model {config.base.model.num_layers} layers, {config.base.model.num_heads} heads, "
               f"mlp {config.mlp_ratio} x width, {config.base.model.pos_encoding} positions; "
               f"metrics on {config.base.eval.num_examples} validation sequences.")
  line = (f"- Run time: {total_run / 60:.1f} min in study runs + {total_tune / 60:.1f} min in "
          "tuning runs (sum over runs)")
  if timing:
    line += (f"; sweep wall time {sum(t['seconds'] for t in timing) / 60:.1f} min over "
             f"{len(timing)} invocation(s) (" + ", ".join(
                 f"{t['started']}: {t['seconds'] / 60:.1f} min, {t['runs_executed']} runs, "
                 f"{t['workers']} workers{'' if t['finished'] else ', interrupted'}"
                 for t in timing) + ")")
  lines.append(line + ".")
  lines.append("")

  lines += ["## Learning rate per variant and width", ""]
  if tuning_rows:
    chosen = sweep_lib.choose_learning_rates(tuning_rows)
    t = tuning_rows[0]
    lines.append(f"Chosen on the tuning level {t['task']} level {t['level']} ({t['label']}) with "
                 f"training seed {config.tune.seed} and validation seed {config.tune.eval_seed} "
                 "(not used by the study runs): highest validation sequence accuracy, then "
                 "token accuracy, then fewer steps to 100%, then lower loss, then the smaller lr.")
    lines += ["", "| variant | width | lr | seq acc | tok acc | steps to 100% | chosen |",
              "|---|---|---|---|---|---|---|"]
    for r in sorted(tuning_rows, key=lambda r: (variants.index(r["variant"])
                                                if r["variant"] in variants else 99,
                                                int(r["width"]), float(r["learning_rate"]))):
      pick = chosen[(r["variant"], int(r["width"]))] == float(r["learning_rate"])
      lines.append(f"| {r['variant']} | {r['width']} | {float(r['learning_rate']):g} | "
                   f"{_f(_acc(r, 'sequence_accuracy'))} | {_f(_acc(r, 'token_accuracy'))} | "
                   f"{r['steps_to_100'] or '—'} | {'**yes**' if pick else ''} |")
  else:
    lines.append(f"A single learning rate ({config.lr_grid[0]:g}) for every variant and width "
                 "(no tuning stage).")
  lines.append("")

  lines += ["## 100% frontier", "",
            "Highest level at which every seed reached 100% validation sequence accuracy "
            "(— = no level).", ""]
  for task in dict.fromkeys(c["task"] for c in cells):
    lines += [f"**{task}**", "", "| variant | " + " | ".join(f"width {w}" for w in widths) + " |",
              "|---|" + "---|" * len(widths)]
    for v in variants:
      entries = []
      for w in widths:
        c = front.get((task, v, w))
        entries.append("—" if c is None else f"{c['level']} ({c['label']})")
      lines.append(f"| {v} | " + " | ".join(entries) + " |")
    lines.append("")

  comp = comparisons(cells)
  if comp:
    lines += ["## EA vs DPA, cell by cell", ""]
    for v in variants[1:] if variants and variants[0] == "dpa" else variants:
      cv = [c for c in comp if c["variant"] == v]
      if not cv:
        continue
      worse = [c for c in cv if c["delta_seq"] < -WORSE_BY]
      better = [c for c in cv if c["delta_seq"] > WORSE_BY]
      only_v = [c for c in cv if c["solved"] and not c["baseline_solved"]]
      only_b = [c for c in cv if c["baseline_solved"] and not c["solved"]]
      def names(cs):
        return ", ".join(f"{c['task']}/{c['label']}/w{c['width']}" for c in cs) or "none"
      lines.append(f"- **{v}** vs dpa over {len(cv)} (level, width) cells: mean sequence "
                   f"accuracy higher by > {WORSE_BY} in {len(better)}, lower by > {WORSE_BY} in "
                   f"{len(worse)} ({names(worse)}); solved where dpa did not: {names(only_v)}; "
                   f"dpa solved where it did not: {names(only_b)}.")
    lines.append("")

  lines += ["## Per level", "",
            "Mean and min over seeds of the final validation token / sequence accuracy; solved = "
            "seeds at 100% sequence accuracy; steps = mean first step at 100% over those seeds.",
            ""]
  for task in dict.fromkeys(c["task"] for c in cells):
    lines += [f"**{task}**", "",
              "| level | task | variant | width | lr | tok mean | tok min | seq mean | seq min | "
              "solved | steps to 100% | wall s/run |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    tc = sorted((c for c in cells if c["task"] == task),
                key=lambda c: (c["level"], variants.index(c["variant"])
                               if c["variant"] in variants else 99, c["width"]))
    for c in tc:
      solved = f"{c['solved']}/{c['seeds']}" + (f" ({c['diverged']} diverged)"
                                                if c["diverged"] else "")
      lines.append(f"| {c['level']} | {c['label']} | {c['variant']} | {c['width']} | "
                   f"{c['learning_rate']:g} | {_f(c['tok_mean'])} | {_f(c['tok_min'])} | "
                   f"{_f(c['seq_mean'])} | {_f(c['seq_min'])} | {solved} | "
                   f"{_steps(c['steps_to_100'])} | {c['wall_mean']:.0f} |")
    lines.append("")

  if geometry:
    lines += ["## Attention geometry", "",
              "Attention weight over cos(q, k), pooled over layers and heads (geometry.png): "
              "mean cos, weight at cos < 0, weight at |cos| >= 0.5 and at |cos| < 0.5.", "",
              "| run | mean cos | weight cos<0 | weight abs(cos)>=0.5 | weight abs(cos)<0.5 |",
              "|---|---|---|---|---|"]
    for name, g in geometry.items():
      s = g["stats"]
      lines.append(f"| {name} | {_f(s['mean_cos'])} | {_f(s['mass_negative'])} | "
                   f"{_f(s['mass_aligned'])} | {_f(s['mass_orthogonal'])} |")
    lines.append("")
  return "\n".join(lines)


def _geometry(config, workdir: str, rows) -> dict:
  """Weighted cos(q,k) histograms of the first seed's run of each variant at the widest width,
  at the configured geometry level; {} when those runs are not here (e.g. collected shards)."""
  from ea_jax import analysis
  g = config.geometry
  want = [r for r in rows if r["task"] == g.ladder and int(r["level"]) == g.level
          and int(r["seed"]) == min(config.seeds) and int(r["width"]) == max(config.widths)
          and r["status"] == "ok"]
  out = {}
  for r in sorted(want, key=sweep_lib.row_order(config.variants)):
    run_dir = os.path.join(workdir, sweep_lib.RUNS_DIR, r["run_id"])
    if not os.path.isdir(os.path.join(run_dir, "checkpoints")):
      continue
    res = analysis.run_geometry(run_dir, num_examples=g.num_examples)
    out[f"{r['variant']} w{r['width']} {r['label']} (seq acc {_f(_acc(r, 'sequence_accuracy'), 2)})"] = res
  return out


def write_report(config, workdir: str) -> list[str]:
  """Writes summary.md, ladder.png, frontier.png (and geometry.png); returns their paths."""
  from ea_jax.study import plots
  rows = sweep_lib.read_csv(os.path.join(workdir, sweep_lib.RESULTS_CSV))
  tpath = os.path.join(workdir, sweep_lib.TUNING_CSV)
  tuning_rows = sweep_lib.read_csv(tpath) if os.path.isfile(tpath) else []
  timing = sweep_lib.read_invocations(workdir)
  cells = aggregate(rows)
  paths = [plots.plot_ladder(cells, os.path.join(workdir, LADDER_PNG),
                             variants=list(config.variants)),
           plots.plot_frontier(cells, frontiers(cells), os.path.join(workdir, FRONTIER_PNG),
                               variants=list(config.variants))]
  geometry = _geometry(config, workdir, rows) if config.geometry.enabled and rows else {}
  if geometry:
    paths.append(plots.plot_cos_histograms(
        {k: (g["edges"], g["hist_YNZ"]) for k, g in geometry.items()},
        os.path.join(workdir, GEOMETRY_PNG)))
    with open(os.path.join(workdir, GEOMETRY_JSON), "w") as f:
      json.dump({k: {"edges": g["edges"].tolist(), "hist_YNZ": g["hist_YNZ"].tolist(),
                     "stats": g["stats"]} for k, g in geometry.items()}, f)
  text = summary_markdown(config, rows, tuning_rows, timing=timing, geometry=geometry)
  path = os.path.join(workdir, SUMMARY_FILE)
  with open(path, "w") as f:
    f.write(text + "\n")
  return [path] + paths
