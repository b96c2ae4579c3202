"""RDPAccountant: a ledger of (noise_multiplier, sample_rate, num_steps) runs, and sigma calibration.

The math lives in ``rdp.py`` (pure functions); this file holds the state. RDP composes additively
order by order, so the ledger may mix any (q, sigma): batch-size schedules, DDP, empty
(noise-only) steps and calibrated sigmas are all composed exactly (PRIVACY_CHECKLIST.md 12).
Epsilon is reported in nats for add/remove of one privacy unit.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Sequence
from typing import Any, cast

import numpy as np

from lit_dp.privacy.rdp import (
    DEFAULT_ORDERS,
    OPACUS_ORDERS,
    check_delta,
    check_noise_multiplier,
    check_num_steps,
    check_orders,
    check_sample_rate,
    compute_rdp,
    rdp_per_step,
    rdp_to_epsilon,
)

__all__ = [
    "DEFAULT_ORDERS",
    "OPACUS_ORDERS",
    "RDPAccountant",
    "calibrate_noise_multiplier",
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
        self._history: list[tuple[float, float, int]] = []
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
        for sigma, q, steps in self._history:
            total += steps * self._rdp_step(sigma, q)
        self._total = total

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """The ledger: (noise_multiplier, sample_rate, num_steps) runs in order (a copy)."""
        return list(self._history)

    @property
    def total_steps(self) -> int:
        """Number of steps recorded in the ledger."""
        return sum(steps for _, _, steps in self._history)

    def step(self, *, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Record ``num_steps`` steps with noise std ``noise_multiplier`` (x clip bound) and
        Poisson sample rate ``sample_rate``; merged into the last run when (sigma, q) are equal.

        Raises:
            ValueError: sigma negative/non-finite, q outside [0, 1], num_steps not an int >= 0.
        """
        sigma = check_noise_multiplier(noise_multiplier)
        q = check_sample_rate(sample_rate)
        steps = check_num_steps(num_steps)
        if steps == 0:
            return
        if self._history and self._history[-1][:2] == (sigma, q):
            self._history[-1] = (sigma, q, self._history[-1][2] + steps)
        else:
            self._history.append((sigma, q, steps))
        self._total = self._total + steps * self._rdp_step(sigma, q)

    # --- epsilon -------------------------------------------------------------------------------
    def get_rdp(self) -> np.ndarray:
        """Composed RDP (nats) of the whole ledger at each of ``self.orders`` (a copy)."""
        return self._total.copy()

    def get_privacy_spent(self, *, delta: float) -> tuple[float, float]:
        """(epsilon, best order) of the ledger at ``delta``; (0.0, max order) for an empty ledger."""
        return rdp_to_epsilon(orders=self.orders, rdp=self._total, delta=delta)

    def get_epsilon(self, delta: float) -> float:
        """Epsilon (nats) of everything recorded so far, at ``delta`` in (0, 1)."""
        return self.get_privacy_spent(delta=delta)[0]

    def peek_epsilon(
        self, *, delta: float, noise_multiplier: float, sample_rate: float, num_steps: int = 1
    ) -> float:
        """Epsilon if ``num_steps`` more (sigma, q) steps were recorded; the ledger is unchanged.

        Used to stop before the step that would exceed the budget (PRIVACY_CHECKLIST.md 16).
        """
        sigma = check_noise_multiplier(noise_multiplier)
        q = check_sample_rate(sample_rate)
        steps = check_num_steps(num_steps)
        total = self._total + steps * self._rdp_step(sigma, q) if steps else self._total
        return rdp_to_epsilon(orders=self.orders, rdp=total, delta=delta)[0]

    # --- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The ledger as plain JSON-serializable types: {"orders": [...], "history": [[sigma,
        q, steps], ...]}."""
        return {
            "orders": [float(a) for a in self.orders],
            "history": [[float(s), float(q), int(n)] for s, q, n in self._history],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict()``; ValueError naming any unknown or missing key or bad entry."""
        unknown = sorted(set(state_dict) - set(_STATE_KEYS))
        if unknown:
            raise ValueError(
                f"unknown key(s) {unknown} in the RDPAccountant state_dict; expected {_STATE_KEYS}"
            )
        missing = [k for k in _STATE_KEYS if k not in state_dict]
        if missing:
            raise ValueError(
                f"missing key(s) {missing} in the RDPAccountant state_dict; expected {_STATE_KEYS}"
            )
        orders = check_orders(state_dict["orders"])
        history: list[tuple[float, float, int]] = []
        for entry in state_dict["history"]:
            if len(entry) != 3:
                raise ValueError(
                    f"history entry {entry!r} must be [noise_multiplier, sample_rate, num_steps]"
                )
            sigma, q, steps = entry
            history.append(
                (check_noise_multiplier(sigma), check_sample_rate(q), check_num_steps(steps))
            )
        if orders.shape != self.orders.shape or not np.array_equal(orders, self.orders):
            self._cache = {}
        self.orders = orders
        self._history = history
        self._recompute_total()


def calibrate_noise_multiplier(
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
        sample_rate: one q in [0, 1] for every step, or a sequence of ``steps`` rates (one per step).
        steps: number of planned steps, int >= 1.
        orders: RDP orders; ``None`` = ``DEFAULT_ORDERS``.
        max_noise_multiplier: largest sigma tried.

    Returns:
        noise_multiplier (sigma, noise std / clip bound).

    Raises:
        ValueError: bad arguments, a sample_rate sequence of the wrong length, all rates 0, or
            a target not reachable with sigma <= max_noise_multiplier.
    """
    target = float(target_epsilon)
    if not (math.isfinite(target) and target > 0):
        raise ValueError(f"target_epsilon={target_epsilon} must be a finite number > 0")
    d = check_delta(delta)
    n_steps = check_num_steps(steps, name="steps", minimum=1)
    sigma_max = float(max_noise_multiplier)
    if not (math.isfinite(sigma_max) and sigma_max > 0):
        raise ValueError(f"max_noise_multiplier={max_noise_multiplier} must be finite and > 0")
    alpha = check_orders(DEFAULT_ORDERS if orders is None else orders)
    if isinstance(sample_rate, numbers.Real):
        counts = Counter({check_sample_rate(float(sample_rate)): n_steps})
    else:
        rates = list(cast(Sequence[float], sample_rate))
        if len(rates) != n_steps:
            raise ValueError(
                f"sample_rate has {len(rates)} rates but steps={n_steps}; give one float or "
                "one rate per step"
            )
        counts = Counter(check_sample_rate(r) for r in rates)
    counts.pop(0.0, None)  # q = 0 costs nothing
    if not counts:
        raise ValueError("sample_rate is 0 for every step: no privacy cost, no noise to calibrate")

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
