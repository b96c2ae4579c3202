"""Privacy units: how the B rows of a batch form U units, and per-unit views of per-row values.

A unit is one row, or all rows sharing a ``unit_ids`` value (user-level DP). A unit's tokens are
the concatenation of its rows' tokens, so every per-unit sum runs over (rows, tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Units:
    """How the B rows of a batch form U privacy units (units numbered by first appearance).

    A unit's tokens are the concatenation of its rows' tokens, so per-unit sums run over
    (rows, tokens): ``to_units`` lays rows out as (U, max_rows * T, ...) with zero padding.
    """

    row_unit: Tensor  # (B,) long: unit of each row
    slot: Tensor  # (B,) long: position of the row within its unit
    num_units: int
    max_rows: int

    @property
    def trivial(self) -> bool:
        """Each row is its own unit, in order."""
        return self.max_rows == 1 and self.num_units == self.row_unit.numel()

    def to_units(self, x: Tensor) -> Tensor:
        """(B, T, ...) -> (U, max_rows * T, ...), padded with zeros (which add nothing)."""
        if self.trivial:
            return x
        out = x.new_zeros(self.num_units * self.max_rows, *x.shape[1:])
        out[self.row_unit * self.max_rows + self.slot] = x
        return out.view(self.num_units, self.max_rows * x.shape[1], *x.shape[2:])

    def sum_rows(self, x: Tensor) -> Tensor:
        """(B, ...) -> (U, ...): per-unit sums of per-row values."""
        if self.trivial:
            return x
        return x.new_zeros(self.num_units, *x.shape[1:]).index_add_(0, self.row_unit, x)


def unit_layout(unit_ids: Any, rows: int, device: torch.device) -> Units:
    """Row -> unit map of a batch of ``rows`` rows, units numbered by first appearance of their id.

    ``unit_ids`` None makes every row its own unit.

    Raises:
        ValueError: ``unit_ids`` does not have one entry per row.
    """
    if unit_ids is None:
        return Units(
            torch.arange(rows, device=device),
            torch.zeros(rows, dtype=torch.long, device=device),
            rows,
            1,
        )
    ids = torch.as_tensor(unit_ids, device=device).reshape(-1)
    if ids.numel() != rows:
        raise ValueError(f"unit_ids has {ids.numel()} entries for a batch of {rows} rows")
    order_rows = torch.arange(rows, device=device)
    uniq, inverse = torch.unique(ids, return_inverse=True)
    first = torch.full((uniq.numel(),), rows, dtype=torch.long, device=device)
    first = first.scatter_reduce(0, inverse, order_rows, reduce="amin")
    rank = torch.empty_like(first)
    rank[torch.argsort(first)] = torch.arange(uniq.numel(), device=device)
    row_unit = rank[inverse]
    counts = torch.bincount(row_unit, minlength=uniq.numel())
    grouped = torch.argsort(row_unit * rows + order_rows)  # rows grouped by unit, in row order
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(row_unit)
    slot[grouped] = order_rows - starts[row_unit[grouped]]
    return Units(row_unit, slot, int(uniq.numel()), int(counts.max()))
