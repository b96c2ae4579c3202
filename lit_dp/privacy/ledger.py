"""The step ledger both accountants keep: (noise_multiplier, sample_rate, num_steps) runs in order.

``RDPAccountant`` (accountant.py) and ``PLDAccountant`` (pld.py) differ only in how they compose
the ledger into an epsilon; recording steps, merging equal runs, and validating a checkpointed
ledger are the same and live here.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

from lit_dp.privacy.rdp import (
    check_delta,
    check_noise_multiplier,
    check_num_steps,
    check_sample_rate,
)

Run = tuple[float, float, int]  # (noise_multiplier, sample_rate, num_steps)


def check_step(*, noise_multiplier: float, sample_rate: float, num_steps: int) -> Run:
    """Validated (sigma, q, steps); ValueError naming the argument that is out of range."""
    return (
        check_noise_multiplier(noise_multiplier),
        check_sample_rate(sample_rate),
        check_num_steps(num_steps),
    )


def check_state_keys(state_dict: Mapping[str, Any], keys: tuple[str, ...], owner: str) -> None:
    """ValueError naming any unknown or missing key of ``owner``'s state_dict."""
    unknown = sorted(set(state_dict) - set(keys))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in the {owner} state_dict; expected {keys}")
    missing = [k for k in keys if k not in state_dict]
    if missing:
        raise ValueError(f"missing key(s) {missing} in the {owner} state_dict; expected {keys}")


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
        runs: list[Run] = []
        for entry in entries:
            if len(entry) != 3:
                raise ValueError(
                    f"history entry {entry!r} must be [noise_multiplier, sample_rate, num_steps]"
                )
            sigma, q, steps = entry
            runs.append(check_step(noise_multiplier=sigma, sample_rate=q, num_steps=steps))
        ledger = cls()
        ledger.runs = runs  # kept as stored: a checkpoint restores the ledger run for run
        return ledger


def check_calibration(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float | Sequence[float],
    steps: int,
    max_noise_multiplier: float,
) -> tuple[float, float, list[tuple[float, int]], float]:
    """Validate the arguments of a sigma calibration (both accountants share them).

    Returns:
        (target epsilon, delta, planned rates as (q, num_steps) runs of consecutive equal rates
        in step order, max sigma).

    Raises:
        ValueError: naming the argument: target/delta/steps/max sigma out of range, a
            sample_rate sequence of the wrong length, or q = 0 for every step.
    """
    target = float(target_epsilon)
    if not (math.isfinite(target) and target > 0):
        raise ValueError(f"target_epsilon={target_epsilon} must be a finite number > 0")
    d = check_delta(delta)
    n_steps = check_num_steps(steps, name="steps", minimum=1)
    sigma_max = float(max_noise_multiplier)
    if not (math.isfinite(sigma_max) and sigma_max > 0):
        raise ValueError(f"max_noise_multiplier={max_noise_multiplier} must be finite and > 0")
    if isinstance(sample_rate, numbers.Real):
        rates = [check_sample_rate(float(sample_rate))] * n_steps
    else:
        rates = [check_sample_rate(r) for r in cast(Sequence[float], sample_rate)]
        if len(rates) != n_steps:
            raise ValueError(
                f"sample_rate has {len(rates)} rates but steps={n_steps}; give one float or "
                "one rate per step"
            )
    if not any(rates):
        raise ValueError("sample_rate is 0 for every step: no privacy cost, no noise to calibrate")
    ledger = StepLedger((0.0, q, 1) for q in rates)  # sigma is unknown yet: runs of equal q
    return target, d, [(q, n) for _, q, n in ledger.runs], sigma_max
