"""Sigma calibration to a budget, and the epsilon of a planned schedule, under either accountant.

``calibrate_noise_multiplier`` answers "which noise multiplier makes these planned steps cost
exactly the budget?". One solver (``solve_noise_multiplier``: secant steps on log sigma vs log
epsilon, then regula falsi) serves both accountants and forks; candidates are priced with the
accountant's ``epsilon_of_ledger`` (the planned ledger composed run by run, no state changes).
For PLD that agrees with the step-by-step composition of training to ~1e-9 relative, so the
accepted epsilon keeps a 1e-6 relative margin below the target (RDP: 1e-10, float summation
only) and the run never ends above it. The calibrated epsilon lands in [0.99 * goal, goal],
goal = target * (1 - margin).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from lit_dp.privacy.accountant import ACCOUNTANTS, AccountantName, make_accountant
from lit_dp.privacy.checks import check_calibration
from lit_dp.privacy.pld_accountant import PLDAccountant
from lit_dp.privacy.rdp_accountant import RDPAccountant

__all__ = [
    "calibrate_continuation",
    "calibrate_noise_multiplier",
    "calibrate_rdp_noise_multiplier",
    "epsilon_for_schedule",
    "solve_noise_multiplier",
]

_LOWER = 0.99  # calibrated epsilon lands in [_LOWER * goal, goal] (promised for PLD: 0.98)
_AIM = 0.995  # ... aiming at the middle of that window
# Calibration composes the plan per run, training per step: PLD agrees to ~1e-9 relative, RDP
# to float summation (~1e-13 relative).
_REPLAY_MARGIN = {"pld": 1e-6, "rdp": 1e-10}
# Below this sigma a PLD's loss grid grows as 1/sigma^2 (minutes per evaluation): stop there.
_SIGMA_FLOOR = 0.02
# Cheap settings for the first, approximate PLD solve (its sigma only seeds the exact solve).
_COARSE = {"value_discretization_interval": 1e-2, "sample_rate_resolution": 0.05}


def _ledger(sigma: float, runs: list[tuple[float, int]]) -> list[list[float]]:
    return [[sigma, q, n] for q, n in runs]


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
    return make_accountant(accountant).epsilon_of_ledger(_ledger(noise_multiplier, runs), delta=d)


def solve_noise_multiplier(
    epsilon: Callable[[float], float],
    *,
    target: float,
    start: float,
    sigma_max: float,
    elasticity: float = 1.5,
) -> tuple[float, float]:
    """A sigma with epsilon(sigma) in [0.99 * target, target]; epsilon decreases in sigma.

    The one calibration solver of lit_dp (both accountants, forks).

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
    goal = target * (1.0 - _REPLAY_MARGIN["pld"])
    coarse_pld, exact_pld = PLDAccountant(**_COARSE), PLDAccountant()

    def coarse(sigma: float) -> float:
        return coarse_pld.epsilon_of_ledger(_ledger(sigma, runs), delta=d)

    def exact(sigma: float) -> float:
        return exact_pld.epsilon_of_ledger(_ledger(sigma, runs), delta=d)

    # The coarse solve costs a few percent of the exact one and lands close to the answer, so
    # the exact solve (the one whose epsilon is guaranteed) needs two or three evaluations.
    try:
        start, elasticity = solve_noise_multiplier(
            coarse, target=target, start=1.0, sigma_max=sigma_max
        )
    except ValueError:
        start, elasticity = sigma_max, 1.5  # coarse is more pessimistic: the exact solve decides
    sigma, _ = solve_noise_multiplier(
        exact,
        target=goal,
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

    acct = make_accountant(accountant)

    def epsilon(sigma: float | None) -> float:
        ledger = taken + ([] if sigma is None else _ledger(sigma, runs))
        return acct.epsilon_of_ledger(ledger, delta=d) if ledger else 0.0

    goal = target * (1.0 - _REPLAY_MARGIN[accountant])
    spent = epsilon(None)
    if spent >= goal:
        raise ValueError(
            f"the steps already taken cost epsilon={spent:.4f} of target_epsilon={target:g}: "
            "no step is left in the budget"
        )
    sigma, _ = solve_noise_multiplier(epsilon, target=goal, start=1.0, sigma_max=sigma_max)
    return sigma


def calibrate_rdp_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float | Sequence[float],
    steps: int,
    orders: Sequence[float] | None = None,
    max_noise_multiplier: float = 1000.0,
) -> float:
    """``calibrate_noise_multiplier`` under RDP at chosen ``orders`` (None = DEFAULT_ORDERS).

    The same solver; the epsilon of the returned sigma lands in [0.99 * target, target].
    """
    target, d, runs, sigma_max = check_calibration(
        target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps,
        max_noise_multiplier=max_noise_multiplier,
    )  # fmt: skip
    rdp = RDPAccountant(orders=orders)  # one instance: its (sigma, q) cache serves every candidate
    sigma, _ = solve_noise_multiplier(
        lambda sigma: rdp.epsilon_of_ledger(_ledger(sigma, runs), delta=d),
        target=target * (1.0 - _REPLAY_MARGIN["rdp"]), start=1.0, sigma_max=sigma_max,
    )  # fmt: skip
    return sigma
