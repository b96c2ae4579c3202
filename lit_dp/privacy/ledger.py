"""The step ledger both accountants keep: (noise_multiplier, sample_rate, num_steps) runs in order.

``RDPAccountant`` (rdp_accountant.py) and ``PLDAccountant`` (pld_accountant.py) differ only in
how they compose the ledger into an epsilon; recording steps, merging equal runs, and validating a
checkpointed ledger are the same and live here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lit_dp.privacy.checks import Run, check_step

__all__ = ["Run", "StepLedger"]


class StepLedger:
    """Runs of equal (sigma, q) steps in the order they were taken (exact values, no rounding)."""

    def __init__(self, runs: Iterable[Run] = ()) -> None:
        self.runs: list[Run] = []
        for sigma, q, steps in runs:
            self.add(sigma, q, steps)

    def add(self, sigma: float, q: float, steps: int) -> None:
        """Append ``steps`` validated steps; merged into the last run when (sigma, q) are equal."""
        if steps == 0:
            return
        if self.runs and self.runs[-1][:2] == (sigma, q):
            self.runs[-1] = (sigma, q, self.runs[-1][2] + steps)
        else:
            self.runs.append((sigma, q, steps))

    @property
    def total_steps(self) -> int:
        return sum(steps for _, _, steps in self.runs)

    def to_state(self) -> list[list[float | int]]:
        """[[sigma, q, steps], ...] as plain JSON types."""
        return [[float(s), float(q), int(n)] for s, q, n in self.runs]

    @classmethod
    def from_state(cls, entries: Iterable[Any]) -> StepLedger:
        """Inverse of ``to_state``; ValueError naming a malformed or out-of-range entry."""
        ledger = cls()
        ledger.runs = check_runs(entries)  # kept as stored: a checkpoint restores run for run
        return ledger


def check_runs(entries: Iterable[Any]) -> list[Run]:
    """Validated ``[[sigma, q, steps], ...]`` entries as runs (not merged)."""
    runs: list[Run] = []
    for entry in entries:
        if len(entry) != 3:
            raise ValueError(
                f"history entry {entry!r} must be [noise_multiplier, sample_rate, num_steps]"
            )
        sigma, q, steps = entry
        runs.append(check_step(noise_multiplier=sigma, sample_rate=q, num_steps=steps))
    return runs
