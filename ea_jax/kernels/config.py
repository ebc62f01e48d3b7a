"""Static settings shared by the Pallas EA kernels (one frozen, hashable record per call)."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Everything a kernel needs besides its arrays; used as a custom_vjp nondiff argument.

  Attributes:
    scale: multiplies q . k before the score kernel.
    eps: added to the row sum Z before dividing.
    kernel: "rational" (s^2 / (1 + s^2)) or "square" (s^2).
    causal: causal attention aligned to the end.
    seq_offset: S_true - T_true (unpadded lengths), column j visible to row i iff j <= i + offset.
    block_q, block_k: forward tile sizes (rows, columns).
    block_q_bwd, block_k_bwd: tile sizes of the dQ and dK/dV kernels.
    interpret: run in Pallas interpret mode (any backend, e.g. CPU); True or a hashable
      interpreter parameter object such as pltpu.InterpretParams.
    num_warps, num_stages: Triton launch settings (GPU only; None = heuristic).
  """

  scale: float
  eps: float
  kernel: str
  causal: bool
  seq_offset: int
  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int
  interpret: Any
  num_warps: int | None = None
  num_stages: int = 2
