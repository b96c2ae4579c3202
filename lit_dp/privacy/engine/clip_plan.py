"""The clipping arithmetic of the fast engine on one recorded pass, as an explicit two-step plan.

:class:`ClipPlan` holds what the recorder kept: per weight, the (a, g) of each layer call that
used it; per norm or bias parameter, its (B, *shape) per-row gradients. Its steps run once each,
in this order (anything else raises RuntimeError):

    1. squared_norms()        (U,) fp32 squared per-unit gradient norms over all parameters.
                              Picks each Linear weight's route (linear.py) and, where the route
                              keeps per-unit gradients, frees that weight's (a, g).
    2. clipped_sums(factor)   sum_u factor_u * g_u per parameter, fp32, from what step 1 left;
                              units with factor 0 are dropped (their values may be non-finite).
                              Frees everything: the plan is then spent.

A weight's per-unit norm covers all its uses: calls of one kind are concatenated along tokens,
and a weight tied between an Embedding and a Linear adds the cross term (embedding.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lit_dp.privacy.engine.embedding import embedding_clipped, embedding_sq, tied_cross
from lit_dp.privacy.engine.linear import kept_clipped, linear_clipped, linear_sq, zero_dropped
from lit_dp.privacy.engine.units import Units

FREED = torch.empty(0)  # replaces stored tensors once they are no longer needed


@dataclass
class LayerCall:
    """One call of a hooked layer: what its parameters' gradients are built from."""

    kind: str  # "linear" (also for "bitlinear" layers), "embedding", or a norm kind
    a: Tensor  # linear: activation (B, T, d_in); embedding: ids (B, T); norms: input x
    g: Tensor | None = None  # output gradient (B, T, d_out), set by the tensor hook
    padding_idx: int | None = None  # embedding: row that receives no gradient
    vocab: int = 0  # embedding: number of rows
    version: int = 0  # a._version when recorded: in-place changes are caught
    per_unit: Tensor | None = None  # linear: kept (U, d_out, d_in) fp32 per-unit gradients

    @property
    def grad(self) -> Tensor:
        assert self.g is not None, "the layer output received no gradient"
        return self.g


class ClipPlan:
    """Per-unit squared norms, then clipped sums, of one recorded pass over U units.

    Args:
        params: the trainable parameters by name (the order of ``clipped_sums``' result).
        weight_calls: weight name -> the calls of the (a, g) layers using it, in call order.
        per_row: parameter name -> (B, *shape) fp32 per-row gradients (norm layers, biases).
        units: the layout of the B rows into U units.
    """

    def __init__(
        self,
        params: dict[str, nn.Parameter],
        weight_calls: dict[str, list[LayerCall]],
        per_row: dict[str, Tensor],
        units: Units,
    ) -> None:
        self._params = params
        self._weights = {name: _merge_calls(name, calls) for name, calls in weight_calls.items()}
        self._per_row = per_row
        self._units = units
        self._stage = "recorded"

    def squared_norms(self) -> Tensor:
        """(U,) fp32 squared per-unit gradient norms over all trainable parameters."""
        self._require("recorded", "squared_norms()")
        self._stage = "normed"
        units = self._units
        sq = torch.zeros(units.num_units, dtype=torch.float32, device=units.row_unit.device)
        grams: dict = {}  # see linear_sq
        for calls in self._weights.values():
            sq += _weight_sq(calls, units, grams)
        for value in self._per_row.values():
            sq += units.sum_rows(value).flatten(1).pow(2).sum(1)
        return sq

    def clipped_sums(self, factor: Tensor) -> dict[str, Tensor]:
        """fp32 sum over units of factor (U,) times each unit's gradient, by parameter name.

        Units with factor 0 are dropped (their values may be non-finite).
        """
        self._require("normed", "clipped_sums(factor)")
        if factor.shape != (self._units.num_units,):
            raise ValueError(
                f"factor has shape {tuple(factor.shape)}; clipped_sums needs one factor per "
                f"unit, ({self._units.num_units},)"
            )
        self._stage = "spent"
        c_row = factor[self._units.row_unit]  # (B,): every row takes its unit's factor
        zero_rows = None if bool(factor.ne(0).all()) else c_row == 0
        grads: dict[str, Tensor] = {}
        for name, p in self._params.items():
            parts = [
                _clipped(c, factor, c_row, zero_rows, p.shape) for c in self._weights.pop(name, [])
            ]
            value = self._per_row.pop(name, None)  # (B, *shape)
            if value is not None:
                value = zero_dropped(value, zero_rows)
                parts.append((c_row @ value.flatten(1)).view(p.shape))
            if not parts:  # trainable but not used in the forward pass
                parts = [torch.zeros(p.shape, dtype=torch.float32, device=p.device)]
            grads[name] = sum(parts[1:], parts[0])
        self._weights.clear()
        self._per_row.clear()
        return grads

    def _require(self, expected: str, step: str) -> None:
        """Raise unless the plan is at stage ``expected`` (recorded -> normed -> spent)."""
        if self._stage == expected:
            return
        if self._stage == "recorded":
            raise RuntimeError(
                f"ClipPlan.{step} needs squared_norms() first: the norm step picks each "
                "weight's route and may replace its stored (a, g) by per-unit gradients"
            )
        if self._stage == "normed":
            raise RuntimeError(
                f"ClipPlan.{step}: squared_norms() ran already (it may have freed stored "
                "activations); call clipped_sums(factor) next"
            )
        raise RuntimeError(
            f"ClipPlan.{step}: this plan is spent (clipped_sums freed its stored tensors); "
            "record a new pass"
        )


def _merge_calls(name: str, calls: list[LayerCall]) -> list[LayerCall]:
    """At most one call per kind: several calls of one kind become one.

    The merged call is over their concatenated tokens (a per-unit gradient is the sum over all of a
    unit's tokens).
    """
    merged = []
    for kind in ("linear", "embedding"):
        same = [c for c in calls if c.kind == kind]
        if len({c.padding_idx for c in same}) > 1:
            raise ValueError(f"engine='fast': embeddings using {name!r} differ in padding_idx")
        if len(same) > 1:
            a, g = torch.cat([c.a for c in same], 1), torch.cat([c.grad for c in same], 1)
            same = [LayerCall(kind, a, g, padding_idx=same[0].padding_idx, vocab=same[0].vocab)]
        merged += same
    return merged


def _weight_sq(calls: list[LayerCall], units: Units, grams: dict) -> Tensor:
    """(U,) squared norm of one weight's per-unit gradient, summed over its uses (merged)."""
    lin = next((c for c in calls if c.kind == "linear"), None)
    emb = next((c for c in calls if c.kind == "embedding"), None)
    sq = torch.zeros(units.num_units, dtype=torch.float32, device=units.row_unit.device)
    if lin is not None:
        lin_sq, lin.per_unit = linear_sq(lin.a, lin.grad, units, grams)
        sq += lin_sq
    if emb is not None:
        sq += embedding_sq(emb.a, emb.grad, units, emb.vocab, emb.padding_idx)
    if lin is not None and emb is not None:  # tied: ||G_lin + G_emb||^2 has a cross term
        sq += 2.0 * tied_cross(emb.a, emb.grad, emb.padding_idx, lin.a, lin.grad, units)
    if lin is not None and lin.per_unit is not None:  # (a, g) are no longer needed
        lin.a = lin.g = FREED
    return sq


def _clipped(
    call: LayerCall, factor: Tensor, c_row: Tensor, zero_rows: Tensor | None, shape: torch.Size
) -> Tensor:
    """sum_rows c_row * (this call's per-row weight gradient), fp32, of the weight's shape.

    c_row = factor[row_unit], and ``zero_rows`` marks the rows of units with factor 0.
    """
    if call.per_unit is not None:  # kept (U, d_out, d_in): sum_u factor_u G_u
        return kept_clipped(call.per_unit, factor, zero_rows).view(shape)
    if call.kind == "embedding":
        return embedding_clipped(call.a, call.grad, call.padding_idx, c_row, zero_rows, shape)
    return linear_clipped(call.a, call.grad, c_row, zero_rows)
