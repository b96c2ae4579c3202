"""RDPAccountant: a ledger of (noise_multiplier, sample_rate, num_steps) runs, composed with RDP.

The math lives in ``rdp.py`` (pure functions); this file holds the state. Calibration is in
``calibration.py``, the interface every accountant shares in ``accountant.py``. RDP composes
additively order by order, so the ledger may mix any (q, sigma): batch-size schedules, DDP,
empty (noise-only) steps and calibrated sigmas are all composed exactly.
Epsilon is reported in nats for add/remove of one privacy unit.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from lit_dp.privacy.checks import Run, check_orders, check_state_keys, check_step
from lit_dp.privacy.ledger import StepLedger, check_runs
from lit_dp.privacy.rdp import DEFAULT_ORDERS, rdp_per_step, rdp_to_epsilon

__all__ = ["RDPAccountant"]

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

    def _compose_runs(self, runs: Iterable[Run]) -> np.ndarray:
        """Composed RDP (nats) of ``runs`` at each order, run by run in ledger order."""
        total = np.zeros_like(self.orders)
        for sigma, q, steps in runs:
            total += steps * self._rdp_step(sigma, q)
        return total

    def _recompute_total(self) -> None:
        self._total = self._compose_runs(self._ledger.runs)

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

    def epsilon_of_ledger(self, runs: Iterable[Sequence[float]], *, delta: float) -> float:
        """Epsilon (nats) of another ledger ``[[sigma, q, steps], ...]`` at these orders.

        This accountant's own ledger is unchanged. The value is the one a fresh accountant
        reports after ``load_state_dict`` of that ledger (run by run, in order): planning and
        calibration use it.
        """
        total = self._compose_runs(check_runs(runs))
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
