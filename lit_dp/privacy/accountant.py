"""RDPAccountant: a ledger of (noise_multiplier, sample_rate, num_steps) runs; sigma calibration.

The math lives in ``rdp.py`` (pure functions); this file holds the state. RDP composes additively
order by order, so the ledger may mix any (q, sigma): batch-size schedules, DDP, empty
(noise-only) steps and calibrated sigmas are all composed exactly.
Epsilon is reported in nats for add/remove of one privacy unit.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from lit_dp.privacy.ledger import StepLedger, check_calibration, check_state_keys, check_step
from lit_dp.privacy.rdp import (
    DEFAULT_ORDERS,
    OPACUS_ORDERS,
    check_orders,
    compute_rdp,
    rdp_per_step,
    rdp_to_epsilon,
)

__all__ = [
    "DEFAULT_ORDERS",
    "OPACUS_ORDERS",
    "RDPAccountant",
    "calibrate_rdp_noise_multiplier",
    "compute_rdp",
    "rdp_to_epsilon",
]

_STATE_KEYS = ("orders", "history")


class RDPAccountant:
    """Renyi-DP accountant for Poisson-subsampled Gaussian steps with per-step (q, sigma).

    The total RDP is sum over ledger runs of num_steps * rdp_step(sigma, q) at each order; epsilon
    comes from the Balle et al. 2020 conversion at the best order (``rdp_to_epsilon``). Per-step RDP
    vectors are cached per (sigma, q), and the running total is kept, so ``step`` and
    ``peek_epsilon`` cost O(len(orders)) however long the ledger is.

    Args:
        orders: RDP orders alpha > 1; ``None`` = ``DEFAULT_ORDERS`` (1.1..10.9 step 0.1,
            12..63, 128, 256, 512).
    """

    def __init__(self, orders: Sequence[float] | None = None) -> None:
        self.orders = check_orders(DEFAULT_ORDERS if orders is None else orders)
        self._ledger = StepLedger()
        self._cache: dict[tuple[float, float], np.ndarray] = {}
        self._total = np.zeros_like(self.orders)  # (len(orders),) composed RDP, nats

    # --- RDP bookkeeping ---------------------------------------------------------------------
    def _rdp_step(self, sigma: float, q: float) -> np.ndarray:
        key = (sigma, q)
        vec = self._cache.get(key)
        if vec is None:
            vec = rdp_per_step(sigma, q, self.orders)
            self._cache[key] = vec
        return vec

    def _recompute_total(self) -> None:
        total = np.zeros_like(self.orders)
        for sigma, q, steps in self._ledger.runs:
            total += steps * self._rdp_step(sigma, q)
        self._total = total

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """The ledger: (noise_multiplier, sample_rate, num_steps) runs in order (a copy)."""
        return list(self._ledger.runs)

    @property
    def total_steps(self) -> int:
        """Number of steps recorded in the ledger."""
        return self._ledger.total_steps

    def step(self, *, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Record ``num_steps`` steps with noise std ``noise_multiplier`` (x clip bound).

        The Poisson sample rate is ``sample_rate``; merged into the last run when (sigma, q) are
        equal.

        Raises:
            ValueError: sigma negative/non-finite, q outside [0, 1], num_steps not an int >= 0.
        """
        sigma, q, steps = check_step(
            noise_multiplier=noise_multiplier, sample_rate=sample_rate, num_steps=num_steps
        )
        if steps == 0:
            return
        self._ledger.add(sigma, q, steps)
        self._total = self._total + steps * self._rdp_step(sigma, q)

    # --- epsilon -------------------------------------------------------------------------------
    def get_rdp(self) -> np.ndarray:
        """Composed RDP (nats) of the whole ledger at each of ``self.orders`` (a copy)."""
        return self._total.copy()

    def get_privacy_spent(self, *, delta: float) -> tuple[float, float]:
        """(epsilon, best order) of the ledger at ``delta``; (0.0, max order) for no steps."""
        return rdp_to_epsilon(orders=self.orders, rdp=self._total, delta=delta)

    def get_epsilon(self, delta: float) -> float:
        """Epsilon (nats) of everything recorded so far, at ``delta`` in (0, 1)."""
        return self.get_privacy_spent(delta=delta)[0]

    def peek_epsilon(
        self, *, delta: float, noise_multiplier: float, sample_rate: float, num_steps: int = 1
    ) -> float:
        """Epsilon if ``num_steps`` more (sigma, q) steps were recorded; the ledger is unchanged.

        Used to stop before the step that would exceed the budget, not after it.
        """
        sigma, q, steps = check_step(
            noise_multiplier=noise_multiplier, sample_rate=sample_rate, num_steps=num_steps
        )
        total = self._total + steps * self._rdp_step(sigma, q) if steps else self._total
        return rdp_to_epsilon(orders=self.orders, rdp=total, delta=delta)[0]

    # --- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The ledger as plain JSON-serializable types.

        {"orders": [...], "history": [[sigma, q, steps], ...]}.
        """
        return {"orders": [float(a) for a in self.orders], "history": self._ledger.to_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict()``; ValueError naming any unknown or missing key or bad entry."""
        check_state_keys(state_dict, _STATE_KEYS, "RDPAccountant")
        orders = check_orders(state_dict["orders"])
        ledger = StepLedger.from_state(state_dict["history"])
        if orders.shape != self.orders.shape or not np.array_equal(orders, self.orders):
            self._cache = {}
        self.orders = orders
        self._ledger = ledger
        self._recompute_total()


def calibrate_rdp_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float | Sequence[float],
    steps: int,
    orders: Sequence[float] | None = None,
    max_noise_multiplier: float = 1000.0,
) -> float:
    """Smallest-found sigma whose ``steps`` steps cost epsilon in [0.99 * target, target].

    Bisection on log(sigma) of epsilon(sigma), which decreases in sigma; the returned sigma always
    satisfies epsilon <= target_epsilon.

    Args:
        target_epsilon: privacy budget (nats), > 0.
        delta: target delta in (0, 1).
        sample_rate: one q in [0, 1] for every step, or a sequence of ``steps`` rates (one a step).
        steps: number of planned steps, int >= 1.
        orders: RDP orders; ``None`` = ``DEFAULT_ORDERS``.
        max_noise_multiplier: largest sigma tried.

    Returns:
        noise_multiplier (sigma, noise std / clip bound).

    Raises:
        ValueError: bad arguments, a sample_rate sequence of the wrong length, all rates 0, or
            a target not reachable with sigma <= max_noise_multiplier.
    """
    target, d, runs, sigma_max = check_calibration(
        target_epsilon=target_epsilon,
        delta=delta,
        sample_rate=sample_rate,
        steps=steps,
        max_noise_multiplier=max_noise_multiplier,
    )
    alpha = check_orders(DEFAULT_ORDERS if orders is None else orders)
    counts: Counter[float] = Counter()
    for q, n in runs:
        counts[q] += n
    counts.pop(0.0, None)  # q = 0 costs nothing

    full_grid: dict[float, tuple[float, float]] = {}

    def epsilon(sigma: float, subset: np.ndarray | None = None) -> tuple[float, float]:
        if subset is None and sigma in full_grid:
            return full_grid[sigma]
        orders_ = alpha if subset is None else subset
        total = np.zeros_like(orders_)
        for q, n in counts.items():
            total += n * rdp_per_step(sigma, q, orders_)
        result = rdp_to_epsilon(orders=orders_, rdp=total, delta=d)
        if subset is None:
            full_grid[sigma] = result
        return result

    # Bracket: eps(lo) > target >= eps(hi).
    hi = min(1.0, sigma_max)
    while epsilon(hi)[0] > target:
        if hi == sigma_max:
            raise ValueError(
                f"target_epsilon={target} is unreachable with noise_multiplier <= {sigma_max} "
                f"(epsilon={epsilon(hi)[0]:.4g} at delta={d:g}); raise target_epsilon or "
                "max_noise_multiplier, or lower sample_rate or steps"
            )
        hi = min(2.0 * hi, sigma_max)
    lo = hi / 2.0
    while epsilon(lo)[0] <= target:
        hi, lo = lo, lo / 2.0
        if lo < 1e-12:  # eps -> inf as sigma -> 0 when some q > 0; a guard, not expected
            return hi
    # Bisection on log(sigma). Each midpoint is evaluated on a window of 9 orders around the best
    # order of the previous evaluation (the full grid when the best order lands on the window's
    # edge): the cost of the per-(sigma, q) RDP is then small for schedules with many distinct q.
    # A window can only overestimate epsilon, so "eps(hi) <= target" always holds; the full grid
    # checks ">= 0.99 target" at the end and redoes the bisection on it if a window misled it.
    sorted_alpha = np.sort(alpha)

    def windowed(sigma: float, center: float) -> tuple[float, float]:
        i = int(np.searchsorted(sorted_alpha, center))
        win = sorted_alpha[max(0, i - 4) : i + 5]
        eps, order = epsilon(sigma, win)
        if order in (win[0], win[-1]) and order not in (sorted_alpha[0], sorted_alpha[-1]):
            eps, order = epsilon(sigma)
        return eps, order

    lo_full = lo
    eps_hi, center = epsilon(hi)
    for evaluate in (windowed, lambda sigma, _: epsilon(sigma)):
        while eps_hi < 0.99 * target and hi / lo > 1.0 + 1e-12:
            mid = math.sqrt(lo * hi)
            eps_mid, center = evaluate(mid, center)
            if eps_mid > target:
                lo = mid
            else:
                hi, eps_hi = mid, eps_mid
        eps_hi, lo = epsilon(hi)[0], lo_full
    return hi
