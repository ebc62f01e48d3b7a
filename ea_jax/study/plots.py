"""The study's figures (matplotlib object API: no pyplot state, any backend).

plot_ladder          accuracy vs complexity, one line per variant, a panel per ladder x width.
plot_capacity        per variant, a heat map of level x width -> mean test sequence accuracy.
plot_frontier        per level, the smallest width at which every seed solves it, a line per variant.
plot_cos_histograms  attention weight over cos(q, k), a panel per layer x head, a line per run.
plot_delay_profiles  attention weight per key offset, a panel per rule.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

_VARIANT_STYLE = {
  "dpa": ("tab:blue", "o"),
  "ea-rational": ("tab:red", "s"),
  "ea-square": ("tab:green", "^"),
}
_EXTRA_COLORS = (
  "tab:purple",
  "tab:orange",
  "tab:brown",
  "tab:pink",
  "tab:olive",
  "tab:cyan",
  "tab:gray",
)


def _variant_style(variant: str, index: int) -> tuple[str, str]:
  if variant in _VARIANT_STYLE:
    return _VARIANT_STYLE[variant]
  return _EXTRA_COLORS[index % len(_EXTRA_COLORS)], "D"


def plot_ladder(cells: Sequence[dict], path: str, *, variants: Sequence[str]) -> str:
  """Accuracy vs task complexity: rows = ladder x (sequence, token accuracy), columns = widths.

  Args:
    cells: ea_jax.study.report.cells output (task, level, label, complexity, variant, width,
      seq_mean/min/max, tok_mean/min/max).
    path: output PNG.
    variants: line order (and colours).
  Each line is the mean over seeds, the shaded area spans min..max over seeds, and the band at
  the top marks 100%.
  """
  from matplotlib.figure import Figure

  if not cells:
    raise ValueError("plot_ladder: no cells to plot")
  tasks = list(dict.fromkeys(c["task"] for c in cells))
  widths = sorted({c["width"] for c in cells})
  fig = Figure(figsize=(4.2 * len(widths) + 0.5, 2.9 * 2 * len(tasks) + 0.6), layout="constrained")
  axes = np.asarray(fig.subplots(2 * len(tasks), len(widths), squeeze=False))
  for ti, task in enumerate(tasks):
    for wi, width in enumerate(widths):
      for mi, (metric, name) in enumerate(
        (("seq", "sequence accuracy"), ("tok", "token accuracy"))
      ):
        ax = axes[2 * ti + mi, wi]
        ax.axhspan(0.995, 1.03, color="gold", alpha=0.35, lw=0)
        ticks = {}
        for vi, v in enumerate(variants):
          cs = sorted(
            (c for c in cells if c["task"] == task and c["width"] == width and c["variant"] == v),
            key=lambda c: c["complexity"],
          )
          if not cs:
            continue
          x = np.array([c["complexity"] for c in cs])
          color, marker = _variant_style(v, vi)
          ax.plot(x, [c[f"{metric}_mean"] for c in cs], color=color, marker=marker, ms=4, label=v)
          ax.fill_between(
            x,
            [c[f"{metric}_min"] for c in cs],
            [c[f"{metric}_max"] for c in cs],
            color=color,
            alpha=0.15,
            lw=0,
          )
          ticks.update({c["complexity"]: c["label"] for c in cs})
        ax.set_ylim(-0.03, 1.03)
        ax.set_xticks(list(ticks), list(ticks.values()), fontsize=7, rotation=30)
        ax.set_title(f"{task}, width {width}", fontsize=9)
        if wi == 0:
          ax.set_ylabel(name)
        ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=7, loc="lower left")
  fig.suptitle(
    "Climbing the ladder: mean over seeds (line), min..max (shaded), 100% (band);\n"
    "x = task complexity",
    fontsize=9,
  )
  fig.savefig(path, dpi=110)
  return path


def plot_capacity(cells: Sequence[dict], path: str, *, variants: Sequence[str]) -> str:
  """Per variant, a heat map of level (rows, by complexity) x width -> mean test sequence
  accuracy over seeds, the value written in each cell ("*" = some seed ended at max_steps).

  Args:
    cells: ea_jax.study.report.cells output for distinct tasks (label, complexity, variant,
      width, seq_mean, max_steps).
    path: output PNG.
    variants: panel order.
  """
  from matplotlib.figure import Figure

  if not cells:
    raise ValueError("plot_capacity: no cells to plot")
  levels = sorted({(c["complexity"], c["label"]) for c in cells})
  widths = sorted({c["width"] for c in cells})
  shown = [v for v in variants if any(c["variant"] == v for c in cells)]
  fig = Figure(
    figsize=(1.2 * len(widths) * len(shown) + 2.2, 0.42 * len(levels) + 1.6), layout="constrained"
  )
  axes = np.asarray(fig.subplots(1, len(shown), squeeze=False))[0]
  image = None
  for ax, v in zip(axes, shown):
    grid = np.full((len(levels), len(widths)), np.nan)
    starred = np.zeros_like(grid, bool)
    for c in cells:
      if c["variant"] == v:
        i, j = levels.index((c["complexity"], c["label"])), widths.index(c["width"])
        grid[i, j], starred[i, j] = c["seq_mean"], c["max_steps"] > 0
    image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", origin="lower")
    for i in range(len(levels)):
      for j in range(len(widths)):
        if not np.isnan(grid[i, j]):
          ax.text(
            j,
            i,
            f"{grid[i, j]:.2f}{'*' if starred[i, j] else ''}",
            ha="center",
            va="center",
            fontsize=7,
            color="black" if grid[i, j] > 0.6 else "white",
          )
    ax.set_xticks(range(len(widths)), [str(w) for w in widths])
    ax.set_yticks(range(len(levels)), [lab for _, lab in levels], fontsize=7)
    ax.set_xlabel("width (embed_dim)")
    ax.set_title(v, fontsize=9)
  fig.colorbar(image, ax=axes.tolist(), shrink=0.8, label="mean test sequence accuracy")
  fig.suptitle("Capacity map (* = a seed ended at max_steps)", fontsize=9)
  fig.savefig(path, dpi=110)
  return path


def plot_frontier(
  frontier: dict,
  levels: Sequence[tuple[float, str]],
  widths: Sequence[int],
  path: str,
  *,
  variants: Sequence[str],
) -> str:
  """Per level, the smallest width at which every seed solves it (one line per variant).

  Args:
    frontier: {(label, variant): smallest solving width or None}, ea_jax.study.report output.
    levels: (complexity, label) of the levels, x-axis order.
    widths: the widths of the study (y-axis); "none" above the widest where no width solved.
    path: output PNG.
    variants: line order.
  """
  from matplotlib.figure import Figure

  if not levels:
    raise ValueError("plot_frontier: no levels to plot")
  widths = sorted(widths)
  fig = Figure(figsize=(1.0 * len(levels) + 2.6, 3.4), layout="constrained")
  ax = fig.subplots()
  none_y = len(widths)
  for vi, v in enumerate(variants):
    color, marker = _variant_style(v, vi)
    ys = [
      widths.index(frontier[(lab, v)]) if frontier.get((lab, v)) is not None else none_y
      for _, lab in levels
    ]
    offset = (vi - (len(variants) - 1) / 2) * 0.06
    ax.plot(
      np.arange(len(levels)) + offset,
      np.asarray(ys, float) + offset,
      color=color,
      marker=marker,
      label=v,
    )
  ax.set_xticks(range(len(levels)), [lab for _, lab in levels], fontsize=7, rotation=30)
  ax.set_yticks(list(range(len(widths))) + [none_y], [str(w) for w in widths] + ["none"])
  ax.set_ylim(-0.5, none_y + 0.5)
  ax.set_xlabel("level (increasing complexity)")
  ax.set_ylabel("smallest width solving it")
  ax.set_title("Frontier: every seed >= 0.99 test sequence accuracy", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.savefig(path, dpi=110)
  return path


def plot_cos_histograms(hists: dict, path: str, *, title: str = "") -> str:
  """Attention weight distributed over cos(q, k): a panel per layer x head, a line per run.

  Args:
    hists: {run name: (edges [Z + 1], hist_YNZ [layers, heads, Z])} with every hist_YNZ of the
      same shape (ea_jax.study.analysis.geometry.attention_geometry output); each [Z] row sums to 1.
    path: output PNG.
  """
  from matplotlib.figure import Figure

  if not hists:
    raise ValueError("plot_cos_histograms: no histograms")
  shapes = {np.shape(h) for _, h in hists.values()}
  if len(shapes) != 1 or len(next(iter(shapes))) != 3:
    raise ValueError(
      f"plot_cos_histograms: every hist_YNZ must have the same [layers, heads, "
      f"bins] shape, got {sorted(shapes)}"
    )
  layers, heads, _ = next(iter(shapes))
  fig = Figure(figsize=(2.6 * heads + 0.6, 2.2 * layers + 1.0), layout="constrained")
  axes = np.asarray(fig.subplots(layers, heads, squeeze=False, sharex=True))
  for ri, (name, (edges, hist_YNZ)) in enumerate(hists.items()):
    edges = np.asarray(edges)
    color = _EXTRA_COLORS[ri % len(_EXTRA_COLORS)]
    for key, style in _VARIANT_STYLE.items():
      if name.startswith(key + " "):
        color = style[0]
    for y in range(layers):
      for n in range(heads):
        axes[y, n].stairs(
          np.asarray(hist_YNZ)[y, n], edges, color=color, label=name if (y, n) == (0, 0) else None
        )
  for y in range(layers):
    for n in range(heads):
      ax = axes[y, n]
      ax.set_title(f"layer {y} head {n}", fontsize=8)
      ax.set_xlim(-1, 1)
      if y == layers - 1:
        ax.set_xlabel("cos(q, k)")
      if n == 0:
        ax.set_ylabel("attention weight")
  fig.legend(loc="outside lower center", fontsize=7, ncols=1 if heads < 3 else 2)
  fig.suptitle(
    title or "Attention weight over cos(q, k):\nEA can use cos near +1 and -1, DPA near +1",
    fontsize=9,
  )
  fig.savefig(path, dpi=110)
  return path


# ----------------------------------------------------------------------------------------------
# Delay locking (ea_jax.study.analysis.delays)
# ----------------------------------------------------------------------------------------------


def plot_delay_profiles(
  profile_YRNO: np.ndarray,
  rules: Sequence[Sequence[int]],
  path: str,
  *,
  num_offsets: int | None = None,
  title: str = "",
) -> str:
  """Saves `delay_profiles_figure(...)` as the PNG `path`; returns `path`."""
  fig = delay_profiles_figure(profile_YRNO, rules, num_offsets=num_offsets, title=title)
  fig.savefig(path, dpi=100)
  return path


def delay_profiles_figure(
  profile_YRNO: np.ndarray,
  rules: Sequence[Sequence[int]],
  *,
  num_offsets: int | None = None,
  title: str = "",
):
  """Mean attention weight vs key offset o = t - j: a heat map per rule (rows: layer/head,
  columns: offsets), the offsets the rule needs (delay - 1) boxed.

  Args:
    profile_YRNO: [layers, rules, heads, offsets] (ea_jax.study.analysis.delays.run_delays
      "profile_YRNO").
    rules: the delay tuple of each rule, in the order of the R axis.
    num_offsets: how many offsets to show (default: all; the rest of each row's weight is off
      the map).
    title: figure title.
  Returns:
    The matplotlib Figure: one axis per rule (then the colour bar); row y * heads + n of rule
    r's image is layer y, head n.
  """
  from matplotlib.figure import Figure
  from matplotlib.patches import Rectangle

  prof = np.asarray(profile_YRNO, np.float64)
  if prof.ndim != 4 or prof.shape[1] != len(rules):
    raise ValueError(
      f"profile_YRNO {np.shape(profile_YRNO)} must be [layers, rules, heads, "
      f"offsets] with rules = len(rules) = {len(rules)}"
    )
  layers, num_rules, heads, offsets = prof.shape
  shown = offsets if num_offsets is None else int(min(num_offsets, offsets))
  if shown < 1:
    raise ValueError(f"num_offsets={num_offsets!r}: must be >= 1")
  rows_RXO = prof[:, :, :, :shown].transpose(1, 0, 2, 3).reshape(num_rules, layers * heads, shown)
  vmax = max(float(rows_RXO.max()), 1e-9)
  fig = Figure(
    figsize=(0.32 * shown * num_rules + 1.8, 0.32 * layers * heads + 1.4), layout="constrained"
  )
  axes = np.asarray(fig.subplots(1, num_rules, squeeze=False, sharey=True))[0]
  image = None
  labels = [f"L{y} H{n}" for y in range(layers) for n in range(heads)]
  for r, ax in enumerate(axes):
    image = ax.imshow(
      rows_RXO[r], cmap="magma", vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest"
    )
    for d in rules[r]:
      if d - 1 < shown:
        ax.add_patch(
          Rectangle(
            (d - 1.5, -0.5), 1.0, layers * heads, fill=False, edgecolor="tab:cyan", linewidth=1.5
          )
        )
    for y in range(1, layers):
      ax.axhline(y * heads - 0.5, color="white", linewidth=0.8)
    ax.set_title(
      f"rule {tuple(rules[r])}: needs offsets {tuple(int(d) - 1 for d in sorted(rules[r]))}",
      fontsize=8,
    )
    ax.set_xticks(range(shown), [str(o) for o in range(shown)], fontsize=6)
    ax.set_xlabel("offset t - j (query t, key j)", fontsize=8)
    ax.set_yticks(range(layers * heads), labels, fontsize=6)
  fig.colorbar(image, ax=axes.tolist(), shrink=0.8, label="mean attention weight")
  if title:
    fig.suptitle(title, fontsize=9)
  return fig
