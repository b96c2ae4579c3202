"""One engine call: its inputs (:class:`Job`) and its output (:class:`ClippedBatch`).

Also the clip factor min(1, C / ||g_u||) every engine applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lit_dp.privacy.engine.units import Units


@dataclass
class ClippedBatch:
    """Result of :func:`lit_dp.privacy.per_sample.per_example_clip` for one batch of U units.

    Attributes:
        grads: parameter name -> sum_u g_u * min(1, C/||g_u||), fp32, shape of the parameter.
        norms: (U,) fp32 unclipped per-unit gradient norms (non-finite where g_u was).
        losses: (U,) fp32 detached per-unit losses (nan for a unit without label tokens).
        num_nonfinite: units whose gradient was non-finite; they contribute zero to ``grads``.
    """

    grads: dict[str, Tensor]
    norms: Tensor
    losses: Tensor
    num_nonfinite: int


@dataclass(frozen=True)
class Job:
    """One engine call: the batch tensors (B, T), its unit layout and (U,) label-token counts.

    ``max_grad_norm`` is the clip bound C (inf: no clipping).
    """

    model: nn.Module
    params: dict[str, nn.Parameter]
    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    units: Units
    counts: Tensor
    max_grad_norm: float


def clip_factor(norm: Tensor, max_grad_norm: float) -> Tensor:
    """min(1, C / norm) elementwise (1 for norm 0 or C = inf)."""
    if not math.isfinite(max_grad_norm):
        return torch.ones_like(norm)
    return (max_grad_norm / norm).clamp(max=1.0)


def clip_factors(sq: Tensor, empty: Tensor, max_grad_norm: float) -> tuple[Tensor, Tensor, int]:
    """Norms, clip factors and the non-finite count from (U,) squared norms.

    From (U,) squared norms and the (U,) units without labels: (U,) norms (0 for units without
    labels), (U,) factors min(1, C/norm) with 0 for units that add nothing (non-finite or no
    labels), and the number of non-finite units with labels.
    """
    norms = torch.where(empty, torch.zeros_like(sq), sq.sqrt())
    finite = torch.isfinite(norms)
    factor = torch.where(finite & ~empty, clip_factor(norms, max_grad_norm), torch.zeros_like(sq))
    return norms, factor, int((~finite).sum())
