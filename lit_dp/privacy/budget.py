"""Accountant choice by name, epsilon of a planned schedule, and sigma calibration to a budget.

``calibrate_noise_multiplier`` answers "which noise multiplier makes these planned steps cost
exactly the budget?" under either accountant. For PLD it evaluates candidate sigmas by loading
the planned ledger into a ``PLDAccountant`` (one self-composition per rate-grid run), which
agrees with the step-by-step composition of training to ~1e-9 relative; the accepted epsilon
keeps a 1e-6 relative margin below the target, so the run never ends above it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

from lit_dp.privacy.accountant import RDPAccountant, calibrate_rdp_noise_multiplier
from lit_dp.privacy.ledger import check_calibration
from lit_dp.privacy.pld import PLDAccountant

__all__ = [
    "ACCOUNTANTS",
    "RATE_ELASTICITY",
    "AccountantName",
    "calibrate_continuation",
    "calibrate_noise_multiplier",
    "describe_accountant",
    "epsilon_for_schedule",
    "make_accountant",
]

AccountantName = Literal["pld", "rdp"]
ACCOUNTANTS: dict[str, str] = {
    "pld": "privacy loss distributions of the Poisson-subsampled Gaussian mechanism "
    "(dp-accounting, pessimistic connect-the-dots discretization, add/remove of one unit), "
    "composed per step over (sample_rate, noise_multiplier); an upper bound: the "
    "discretization adds about 1e-3 to epsilon, and a schedule whose rate changes is composed "
    "with its rates rounded up onto a grid 1 % apart, which adds up to about 1.2 % (relative) "
    "more",
    "rdp": "RDP of the Poisson-subsampled Gaussian mechanism (fractional and integer orders, "
    "Mironov et al. 2019), composed per step over (sample_rate, noise_multiplier); converted to "
    "(epsilon, delta) with Balle et al. 2020",
}
_LOWER = 0.99  # calibrated epsilon lands in [_LOWER * target, target] (promised: 0.98)
_AIM = 0.995  # ... aiming at the middle of that window
# Calibration composes the plan per run, training per step: they agree to ~1e-9 relative.
_REPLAY_MARGIN = 1e-6
# Cheap settings for the first, approximate PLD solve (its sigma only seeds the exact solve).
# Below this sigma a PLD's loss grid grows as 1/sigma^2 (minutes per evaluation): stop there.
_SIGMA_FLOOR = 0.02
_COARSE = {"value_discretization_interval": 1e-2, "sample_rate_resolution": 0.05}


# Measured largest d log(epsilon) / d log(q) of the subsampled Gaussian at sigma 0.6-3 (pld.py).
RATE_ELASTICITY = 1.17


def describe_accountant(name: str, accountant: PLDAccountant | RDPAccountant) -> str:
    """``ACCOUNTANTS[name]`` plus, for PLD, what the rate rounding of this run's ledger costs.

    The rounding bound is (1 + r)^1.17 - 1 for the largest relative rounding r of a ledger
    rate (``PLDAccountant.rate_rounding``): epsilon is non-decreasing in q, and its elasticity
    in q was at most 1.17 where it was measured (sigma 0.6-3).
    """
    text = ACCOUNTANTS[name]
    if not isinstance(accountant, PLDAccountant):
        return text
    r = accountant.rate_rounding()
    if r == 0.0:
        return f"{text}; this run: every sample rate composed exactly (no rate rounding)"
    bound = (1.0 + r) ** RATE_ELASTICITY - 1.0
    return (
        f"{text}; this run: sample rates rounded up by at most {100 * r:.3g} %, so epsilon is "
        f"at most about {100 * bound:.3g} % above that of the exact rates (plus the "
        "discretization)"
    )


def make_accountant(name: str) -> PLDAccountant | RDPAccountant:
    """A fresh accountant: ``"pld"`` (default of a run) or ``"rdp"``."""
    if name == "pld":
        return PLDAccountant()
    if name == "rdp":
        return RDPAccountant()
    raise ValueError(f"privacy.accountant={name!r} must be one of {sorted(ACCOUNTANTS)}")


def _epsilon_of_runs(
    accountant: PLDAccountant | RDPAccountant,
    *,
    noise_multiplier: float,
    runs: list[tuple[float, int]],
    delta: float,
) -> float:
    # Loading the plan as a ledger composes it run by run (PLD: one distribution per rate-grid
    # point), the same final operations as stepping through it, at a fraction of the cost.
    state = accountant.state_dict()
    state["history"] = [[noise_multiplier, q, n] for q, n in runs]
    accountant.load_state_dict(state)
    return accountant.get_epsilon(delta)


def epsilon_for_schedule(
    *,
    noise_multiplier: float,
    delta: float,
    sample_rate: float | Sequence[float],
    steps: int,
    accountant: AccountantName = "pld",
) -> float:
    """Epsilon after ``steps`` planned steps at ``noise_multiplier`` under ``accountant``.

    ``sample_rate`` is one q for every step or one q per step; the value equals what the
    accountant reports after stepping through them one by one.
    """
    _, d, runs, _ = check_calibration(
        target_epsilon=1.0, delta=delta, sample_rate=sample_rate, steps=steps,
        max_noise_multiplier=1.0,
    )  # fmt: skip
    return _epsilon_of_runs(
        make_accountant(accountant), noise_multiplier=noise_multiplier, runs=runs, delta=d
    )


def _solve(
    epsilon: Callable[[float], float],
    *,
    target: float,
    start: float,
    sigma_max: float,
    elasticity: float = 1.5,
) -> tuple[float, float]:
    """A sigma with epsilon(sigma) in [_LOWER * target, target]; epsilon decreases in sigma.

    Works on x = log sigma, y = log epsilon, where the curve is nearly straight with slope
    -elasticity: from one side of the target it extrapolates along the last secant (or
    ``elasticity``), a step of at most 4x; once bracketed it takes regula falsi (Illinois) steps,
    falling back to bisection. Only a sigma whose epsilon was evaluated <= target is returned.

    Returns:
        (sigma, the last secant's elasticity, to seed a later solve).
    """
    goal = math.log(_AIM * target)
    lo: tuple[float, float] | None = None  # (x, y - goal) with epsilon > target
    hi: tuple[float, float] | None = None  # (x, y - goal) with epsilon <= target
    last: tuple[float, float] | None = None
    x = math.log(min(start, sigma_max))
    side = 0  # Illinois: which end moved last
    for _ in range(100):
        e = epsilon(math.exp(x))
        point = (x, math.log(e) - goal if e > 0 else -math.inf)
        if last is not None and math.isfinite(point[1]) and math.isfinite(last[1]):
            secant = (last[1] - point[1]) / (point[0] - last[0]) if point[0] != last[0] else 0.0
            elasticity = secant if secant > 0.05 else elasticity
        last = point
        if e <= target:
            hi = point
            if e >= _LOWER * target or x <= math.log(_SIGMA_FLOOR):
                return math.exp(x), elasticity  # (a budget this large needs almost no noise)
            side, lo = (1, (lo[0], lo[1] / 2) if lo and side == 1 else lo)
        else:
            if x >= math.log(sigma_max):
                raise ValueError(
                    f"target_epsilon={target:g} is unreachable with noise_multiplier <= "
                    f"{sigma_max:g} (epsilon={e:.4g}); raise target_epsilon or "
                    "max_noise_multiplier, or lower sample_rate or steps"
                )
            lo = point
            side, hi = (-1, (hi[0], hi[1] / 2) if hi and side == -1 else hi)
        if lo is not None and hi is not None:
            if hi[0] - lo[0] <= 1e-12:
                break
            x = hi[0] - hi[1] * (hi[0] - lo[0]) / (hi[1] - lo[1]) if math.isfinite(lo[1]) else 0.0
            if not lo[0] < x < hi[0]:
                x = 0.5 * (lo[0] + hi[0])
        else:  # one side only: follow the slope, at most a factor 4 per step
            step = max(-math.log(4.0), min(math.log(4.0), point[1] / elasticity))
            x = min(point[0] + step, math.log(sigma_max))
    if hi is None:
        raise ValueError(f"calibration did not converge for target_epsilon={target:g}")
    return math.exp(hi[0]), elasticity


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float | Sequence[float],
    steps: int,
    accountant: AccountantName = "pld",
    max_noise_multiplier: float = 1000.0,
) -> float:
    """Noise multiplier whose ``steps`` planned steps cost epsilon in [0.98 * target, target].

    The epsilon is the one ``accountant`` reports after stepping through the plan, so training
    with the returned sigma never exceeds ``target_epsilon`` (RDP lands in [0.99 * target,
    target]). Timing (2 shared CPU cores): a constant rate takes well under a second; a
    10,000-step linear ramp of q over a 4x range takes tens of seconds with PLD (one
    distribution per 1 % rate-grid point per candidate sigma; see benchmarks/README.md).

    Args:
        target_epsilon: privacy budget (nats), > 0.
        delta: target delta in (0, 1).
        sample_rate: one q in [0, 1] for every step, or a sequence of ``steps`` rates (one per
            step).
        steps: number of planned steps, int >= 1.
        accountant: "pld" (default) or "rdp".
        max_noise_multiplier: largest sigma tried.

    Returns:
        noise_multiplier (sigma, noise std / clip bound).

    Raises:
        ValueError: bad arguments, a sample_rate sequence of the wrong length, all rates 0, an
            unknown accountant, or a target not reachable with sigma <= max_noise_multiplier.
    """
    if accountant == "rdp":
        return calibrate_rdp_noise_multiplier(
            target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps,
            max_noise_multiplier=max_noise_multiplier,
        )  # fmt: skip
    if accountant != "pld":
        raise ValueError(f"accountant={accountant!r} must be one of {sorted(ACCOUNTANTS)}")
    target, d, runs, sigma_max = check_calibration(
        target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps,
        max_noise_multiplier=max_noise_multiplier,
    )  # fmt: skip

    def coarse(sigma: float) -> float:
        return _epsilon_of_runs(
            PLDAccountant(**_COARSE), noise_multiplier=sigma, runs=runs, delta=d
        )

    def exact(sigma: float) -> float:
        return _epsilon_of_runs(PLDAccountant(), noise_multiplier=sigma, runs=runs, delta=d)

    # The coarse solve costs a few percent of the exact one and lands close to the answer, so
    # the exact solve (the one whose epsilon is guaranteed) needs two or three evaluations.
    try:
        start, elasticity = _solve(coarse, target=target, start=1.0, sigma_max=sigma_max)
    except ValueError:
        start, elasticity = sigma_max, 1.5  # coarse is more pessimistic: the exact solve decides
    sigma, _ = _solve(
        exact,
        target=target * (1.0 - _REPLAY_MARGIN),
        start=start,
        sigma_max=sigma_max,
        elasticity=elasticity,
    )
    return sigma


def calibrate_continuation(
    *,
    target_epsilon: float,
    delta: float,
    prefix: Sequence[Sequence[float]],
    sample_rate: Sequence[float],
    accountant: AccountantName = "pld",
    max_noise_multiplier: float = 1000.0,
) -> float:
    """Sigma for planned steps that follow steps already taken (a fork of a checkpoint).

    The prefix ledger ``[[sigma, q, steps], ...]`` and the planned steps (one rate each, at the
    returned sigma) together cost epsilon in [0.99 * target, target] under ``accountant``, or
    less when the prefix alone already costs more than 0.99 * target.

    Raises:
        ValueError: the prefix alone reaches the target (no step is left in the budget), or the
            target is not reachable with sigma <= max_noise_multiplier.
    """
    target, d, runs, sigma_max = check_calibration(
        target_epsilon=target_epsilon, delta=delta, sample_rate=list(sample_rate),
        steps=len(sample_rate), max_noise_multiplier=max_noise_multiplier,
    )  # fmt: skip
    taken = [[float(s), float(q), int(n)] for s, q, n in prefix]

    def epsilon(sigma: float | None) -> float:
        acct = make_accountant(accountant)
        state = acct.state_dict()
        state["history"] = taken + ([] if sigma is None else [[sigma, q, n] for q, n in runs])
        acct.load_state_dict(state)
        return acct.get_epsilon(d) if state["history"] else 0.0

    goal = target * (1.0 - _REPLAY_MARGIN)
    spent = epsilon(None)
    if spent >= goal:
        raise ValueError(
            f"the steps already taken cost epsilon={spent:.4f} of target_epsilon={target:g}: "
            "no step is left in the budget"
        )
    sigma, _ = _solve(epsilon, target=goal, start=1.0, sigma_max=sigma_max)
    return sigma
