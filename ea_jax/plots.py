"""matplotlib figures (written with the object API: no pyplot state, any backend).

plot_attention_maps: one example's attention weights, a panel per layer x head (the study's
figures are in ea_jax/study/plots.py).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def plot_attention_maps(
  maps_NLL: Sequence[np.ndarray], path: str, *, tokens=None, scored=None, title: str = ""
) -> str:
  """Saves a grid of attention maps (rows: layers, columns: heads) to `path` (PNG).

  Args:
    maps_NLL: one array per layer, [N heads, L queries, L keys], weights in [0, 1].
    path: output file.
    tokens: optional [L] input tokens, used as tick labels when L <= 64.
    scored: optional [L] bool, scored query positions (their labels are drawn in bold).
    title: figure title.
  Returns:
    `path`.
  """
  from matplotlib.figure import Figure

  maps = [np.asarray(m, np.float32) for m in maps_NLL]
  if not maps or any(m.ndim != 3 or m.shape[1] != m.shape[2] for m in maps):
    raise ValueError(
      f"maps_NLL must be a non-empty list of [N, L, L] arrays, got shapes "
      f"{[np.shape(m) for m in maps_NLL]}"
    )
  layers, heads, L = len(maps), maps[0].shape[0], maps[0].shape[1]
  fig = Figure(figsize=(2.6 * heads + 0.8, 2.6 * layers + 0.6), layout="constrained")
  axes = np.asarray(fig.subplots(layers, heads, squeeze=False))
  image = None
  for li, m in enumerate(maps):
    for h in range(heads):
      ax = axes[li, h]
      image = ax.imshow(m[h], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
      ax.set_title(f"layer {li} head {h}", fontsize=8)
      if tokens is not None and L <= 64:
        labels = [str(int(t)) for t in np.asarray(tokens)]
        ax.set_xticks(range(L), labels, fontsize=4)
        ax.set_yticks(range(L), labels, fontsize=4)
        if scored is not None:
          for tick, s in zip(ax.get_yticklabels(), np.asarray(scored)):
            tick.set_fontweight("bold" if s else "normal")
      else:
        ax.set_xticks([])
        ax.set_yticks([])
      if h == 0:
        ax.set_ylabel("query")
      if li == layers - 1:
        ax.set_xlabel("key")
  fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6)
  if title:
    fig.suptitle(title)
  fig.savefig(path, dpi=120)
  return path
