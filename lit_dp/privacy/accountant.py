"""What every accountant offers (the ``Accountant`` protocol), and the accountants by name.

An accountant keeps a ledger of Poisson-subsampled Gaussian steps, (noise_multiplier,
sample_rate, num_steps) runs, and turns it into an epsilon (nats, add/remove of one privacy
unit). Two implement it: ``PLDAccountant`` (pld_accountant.py; privacy loss distributions, the
default of a run) and ``RDPAccountant`` (rdp_accountant.py; Renyi DP, reported beside it).
Training composes the steps it takes (``step``), the budget stop looks one step ahead
(``peek_epsilon``), planning and calibration price a whole ledger without touching any state
(``epsilon_of_ledger``), and checkpoints hold ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

from lit_dp.privacy.pld_accountant import PLDAccountant
from lit_dp.privacy.rdp_accountant import RDPAccountant

__all__ = [
    "ACCOUNTANTS",
    "RATE_ELASTICITY",
    "Accountant",
    "AccountantName",
    "describe_accountant",
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
# Measured largest d log(epsilon) / d log(q) of the subsampled Gaussian at sigma 0.6-3
# (pld_accountant.py).
RATE_ELASTICITY = 1.17


@runtime_checkable
class Accountant(Protocol):
    """A ledger of (sigma, q, steps) runs and its epsilon; ``PLDAccountant``, ``RDPAccountant``."""

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """The ledger, (noise_multiplier, sample_rate, num_steps) runs in order (a copy)."""
        ...

    @property
    def total_steps(self) -> int:
        """Number of steps in the ledger."""
        ...

    def step(self, *, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Compose ``num_steps`` more steps into the ledger."""
        ...

    def peek_epsilon(
        self, *, delta: float, noise_multiplier: float, sample_rate: float, num_steps: int = 1
    ) -> float:
        """Epsilon if those steps were composed; the ledger is unchanged."""
        ...

    def get_epsilon(self, delta: float) -> float:
        """Epsilon of the ledger at ``delta``."""
        ...

    def epsilon_of_ledger(self, runs: Iterable[Sequence[float]], *, delta: float) -> float:
        """Epsilon of another ledger with this accountant's settings; no state changes."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The ledger and settings as plain JSON types."""
        ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict()``."""
        ...


def make_accountant(name: str) -> PLDAccountant | RDPAccountant:
    """A fresh accountant: ``"pld"`` (default of a run) or ``"rdp"``."""
    if name == "pld":
        return PLDAccountant()
    if name == "rdp":
        return RDPAccountant()
    raise ValueError(f"privacy.accountant={name!r} must be one of {sorted(ACCOUNTANTS)}")


def describe_accountant(name: str, accountant: Accountant) -> str:
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
