"""Argument checks of the privacy core, shared by the accountants, calibration and the plan.

Each returns the validated value as a plain Python type, or raises ValueError naming the argument
and the fix. They hold no policy that depends on the run (the delta default and the delta < 1/N
rule live with the privacy plan, ``lit_dp.privacy.plan``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np

Run = tuple[float, float, int]  # (noise_multiplier, sample_rate, num_steps)


def check_noise_multiplier(noise_multiplier: float) -> float:
    """Return sigma as float; ValueError unless finite and >= 0."""
    sigma = float(noise_multiplier)
    if not (math.isfinite(sigma) and sigma >= 0.0):
        raise ValueError(
            f"noise_multiplier={noise_multiplier} must be a finite number >= 0 "
            "(noise std in units of the clip bound; 0 = no noise)"
        )
    return sigma


def check_sample_rate(sample_rate: float) -> float:
    """Return q as float; ValueError unless 0 <= q <= 1."""
    q = float(sample_rate)
    if not 0.0 <= q <= 1.0:  # also rejects NaN
        raise ValueError(
            f"sample_rate={sample_rate} must be a probability in [0, 1] "
            "(expected batch size / number of privacy units)"
        )
    return q


def check_num_steps(num_steps: int, name: str = "num_steps", minimum: int = 0) -> int:
    """Return the step count as int; ValueError unless an integer >= minimum."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral):
        raise ValueError(f"{name}={num_steps!r} must be an int >= {minimum} (a count of steps)")
    if num_steps < minimum:
        raise ValueError(f"{name}={num_steps} must be an int >= {minimum} (a count of steps)")
    return int(num_steps)


def check_delta(delta: float) -> float:
    """Return delta as float; ValueError unless 0 < delta < 1."""
    d = float(delta)
    if not 0.0 < d < 1.0:
        raise ValueError(f"delta={delta} must be in (0, 1); use delta < 1/N for N privacy units")
    return d


def check_orders(orders: Sequence[float] | np.ndarray) -> np.ndarray:
    """Return the RDP orders as a 1-D float array; ValueError unless all finite and > 1."""
    arr = np.asarray(orders, dtype=float).reshape(-1)
    if arr.size == 0 or not np.all(np.isfinite(arr)) or not np.all(arr > 1.0):
        raise ValueError(f"orders={list(orders)} must be a non-empty list of finite numbers > 1")
    return arr


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


def rate_runs(rates: Sequence[float]) -> list[tuple[float, int]]:
    """Consecutive equal rates as (q, num_steps) runs, in step order."""
    runs: list[tuple[float, int]] = []
    for q in rates:
        if runs and runs[-1][0] == q:
            runs[-1] = (q, runs[-1][1] + 1)
        else:
            runs.append((q, 1))
    return runs


def check_sample_rates(sample_rate: float | Sequence[float], steps: int) -> list[float]:
    """One validated rate per step: ``sample_rate`` repeated, or the sequence of ``steps`` rates.

    Raises:
        ValueError: a rate outside [0, 1], or a sequence whose length is not ``steps``.
    """
    if isinstance(sample_rate, numbers.Real):
        return [check_sample_rate(float(sample_rate))] * steps
    rates = [check_sample_rate(r) for r in cast(Sequence[float], sample_rate)]
    if len(rates) != steps:
        raise ValueError(
            f"sample_rate has {len(rates)} rates but steps={steps}; give one float or "
            "one rate per step"
        )
    return rates


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
    rates = check_sample_rates(sample_rate, n_steps)
    if not any(rates):
        raise ValueError("sample_rate is 0 for every step: no privacy cost, no noise to calibrate")
    return target, d, rate_runs(rates), sigma_max
