"""The privacy plan: everything a run's budget depends on, worked out once, frozen.

``PrivacyPlan.create`` is the one constructor: it applies the delta default (min(1e-5, 1/N^1.1))
and the delta < 1/N rule, calibrates ``noise_multiplier: auto`` to the target over the planned
steps (or checks that a fixed sigma can take one step within it), and returns a frozen plan
with a float sigma. Training, ``lit-dp plan`` and the privacy report read the same object, so
they agree by construction. It answers:

- ``grad_noise_multiplier(t)`` / ``noise_std(t)``: the gradient's noise at step t, raised by a
  private quantile's count noise (Andrew et al. 2021, Theorem 1:
  ``clipping.raised_noise_multiplier``);
- ``epsilon_after(k)``: epsilon after the first k steps (the run's accountant or another);
- ``epsilon_curve(k)``: epsilon after every step 1..k, composed step by step as training does;
- ``budget_stop_step()``: how many steps the budget stop lets the run take;
- ``describe()``: the plan as plain data (the report's and ``lit-dp plan``'s fields).

The noise mechanism is a slot: ``None`` is independent Gaussian noise (one ledger step at q_t
per step); a mechanism with its own accounting event (banded MF: one (sigma, b q) round per b
steps) supplies the ledger's rates through ``NoiseEvent.round_sample_rates``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol, runtime_checkable

from lit_dp.privacy.accountant import ACCOUNTANTS, AccountantName, make_accountant
from lit_dp.privacy.calibration import calibrate_continuation, calibrate_noise_multiplier
from lit_dp.privacy.checks import Run, check_noise_multiplier, rate_runs
from lit_dp.privacy.clipping import (
    ClipBoundEstimator,
    PrivateQuantile,
    check_smallest_batch,
    raised_noise_multiplier,
)
from lit_dp.privacy.sampling import SampleRateSchedule

__all__ = [
    "BUDGET_TOLERANCE",
    "MAX_DEFAULT_DELTA",
    "NoiseEvent",
    "PrivacyPlan",
    "check_delta_for_units",
    "check_privacy_settings",
    "default_delta",
    "exceeds_budget",
]

# A delta above this lets a mechanism release some unit's data in the clear with a probability
# that is no longer negligible (delta is roughly that probability, per unit).
MAX_DEFAULT_DELTA = 1e-5
# The budget stop's slack: an epsilon within float rounding of the target is within it.
BUDGET_TOLERANCE = 1e-9


def default_delta(num_units: int) -> float:
    """The default delta: min(1e-5, 1 / N^1.1).

    1/N^1.1 alone is strictly below 1/N but large for small N (0.0022 at N = 256, 0.065 for 12
    users: a real chance of a full leak).
    """
    return min(MAX_DEFAULT_DELTA, 1.0 / num_units**1.1)


def check_delta_for_units(
    delta: float, num_units: int, *, warn: Callable[[str], Any] = warnings.warn
) -> None:
    """Delta must lie in (0, 1/N): a larger delta allows releasing one unit in the clear.

    An explicit delta above 1e-5 is allowed (a user may need it for a comparison) with a warning
    through ``warn`` (Lightning's ``rank_zero_warn`` in a run).
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"privacy.delta={delta} must be in (0, 1)")
    if delta >= 1.0 / num_units:
        raise ValueError(
            f"privacy.delta={delta:g} must be below 1/N = {1.0 / num_units:g} for N={num_units} "
            f"privacy units; leave it unset for the default min(1e-5, 1/N^1.1) = "
            f"{default_delta(num_units):.3g}"
        )
    if delta > MAX_DEFAULT_DELTA:
        warn(
            f"privacy.delta={delta:g} is above 1e-5: with probability up to about delta the "
            f"guarantee fails for a unit (N={num_units}); leave privacy.delta unset for the "
            f"default min(1e-5, 1/N^1.1) = {default_delta(num_units):.3g} unless you need this "
            "value"
        )


def check_privacy_settings(*, target_epsilon: float | None, delta: float | None) -> None:
    """The privacy section's own checks (before N is known); ValueError naming the field."""
    if target_epsilon is not None and not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(
            f"privacy.target_epsilon={target_epsilon} must be a positive number or null"
        )
    if delta is not None and not 0.0 < delta < 1.0:
        raise ValueError(f"privacy.delta={delta} must be in (0, 1) or null for min(1e-5, 1/N^1.1)")


def exceeds_budget(epsilon: float, target_epsilon: float | None) -> bool:
    """Whether ``epsilon`` is past the budget (the stop's one rule, for fit and the plan)."""
    return target_epsilon is not None and epsilon > target_epsilon * (1 + BUDGET_TOLERANCE)


@runtime_checkable
class NoiseEvent(Protocol):
    """What the plan needs of a noise mechanism with its own accounting event."""

    @property
    def bands(self) -> int:
        """b: the ledger holds one entry per round of b steps."""
        ...

    @property
    def sensitivity(self) -> float:
        """The factor by which the noise std exceeds sigma * C (||c||_2 of banded MF)."""
        ...

    def round_sample_rates(self, rate_of: Callable[[int], float], steps: int) -> list[float]:
        """The rates the ledger holds after ``steps`` planned steps, one per ledger step."""
        ...

    def describe(self) -> dict[str, Any]:
        """The mechanism as the report names it."""
        ...


@dataclass(frozen=True)
class PrivacyPlan:
    """A private run's budget: built by ``create``; every field is public configuration.

    Attributes:
        num_units: N, the number of privacy units (public: q = E[B] / N states it).
        schedule: the sample rate q_t of every optimizer step.
        steps: planned optimizer steps (trainer.max_steps); None = until the budget stops.
        delta: the run's delta, < 1/N.
        delta_is_default: whether delta is the default min(1e-5, 1/N^1.1).
        accountant: "pld" or "rdp": calibration, the budget stop and the report's epsilon.
        noise_multiplier: sigma, the accounted noise std in units of the clip bound.
        calibrated: whether sigma was calibrated to ``target_epsilon`` (``auto``).
        target_epsilon: the budget; None = no budget stop.
        max_grad_norm: the clip bound C_0 of the first step.
        count_noise_divisor: a private quantile's divisor (count noise std E[B_t] / divisor),
            None for a clip bound that releases nothing (fixed or not covered).
        mechanism: the noise mechanism's accounting event; None = independent Gaussian.
        taken: ledger runs already taken before ``first_step`` (a fork of a checkpoint).
        first_step: the step this plan starts at (0, or a forked checkpoint's global step).
    """

    num_units: int
    schedule: SampleRateSchedule
    steps: int | None
    delta: float
    delta_is_default: bool
    accountant: AccountantName
    noise_multiplier: float
    calibrated: bool
    target_epsilon: float | None
    max_grad_norm: float = 1.0
    count_noise_divisor: float | None = None
    mechanism: NoiseEvent | None = None
    taken: tuple[Run, ...] = ()
    first_step: int = 0

    # --- the one constructor --------------------------------------------------------------
    @classmethod
    def create(
        cls,
        *,
        num_units: int,
        schedule: SampleRateSchedule,
        steps: int | None,
        noise_multiplier: float | Literal["auto"],
        target_epsilon: float | None,
        delta: float | None = None,
        accountant: AccountantName = "pld",
        max_grad_norm: float = 1.0,
        count_noise_divisor: float | None = None,
        mechanism: NoiseEvent | None = None,
        clip: ClipBoundEstimator | None = None,
        taken: Sequence[Sequence[float]] = (),
        first_step: int = 0,
        warn: Callable[[str], Any] = warnings.warn,
        fork_error: Callable[[ValueError], ValueError] | None = None,
    ) -> PrivacyPlan:
        """Apply the delta default and check, calibrate ``auto``, and freeze the plan.

        ``clip`` (the run's clip-bound estimator), when given, sets ``max_grad_norm`` (its C_0)
        and ``count_noise_divisor`` (a private quantile's). ``fork_error`` rewrites a fork's
        calibration error (``taken``) to name the checkpoint.

        Raises:
            ValueError: naming the config field: delta not below 1/N, ``auto`` without a
                target or planned steps, a target no sigma reaches in the planned steps, or a
                fixed sigma whose first step already exceeds the target. A fork's calibration
                error (``taken``) goes through ``fork_error`` when one is given.
        """
        if accountant not in ACCOUNTANTS:
            raise ValueError(
                f"privacy.accountant={accountant!r} must be one of {sorted(ACCOUNTANTS)}"
            )
        check_privacy_settings(target_epsilon=target_epsilon, delta=delta)
        if clip is not None:
            max_grad_norm = clip.max_grad_norm
            count_noise_divisor = (
                clip.count_noise_divisor if isinstance(clip, PrivateQuantile) else None
            )
        if num_units < 1:
            raise ValueError("data: the training set is empty; add records or fix the path")
        resolved = default_delta(num_units) if delta is None else float(delta)
        check_delta_for_units(resolved, num_units, warn=warn)
        plan = cls(
            num_units=int(num_units), schedule=schedule, steps=steps, delta=resolved,
            delta_is_default=delta is None, accountant=accountant, noise_multiplier=0.0,
            calibrated=noise_multiplier == "auto", target_epsilon=target_epsilon,
            max_grad_norm=float(max_grad_norm), count_noise_divisor=count_noise_divisor,
            mechanism=mechanism, first_step=int(first_step),
            taken=tuple((float(s), float(q), int(n)) for s, q, n in taken),
        )  # fmt: skip
        if noise_multiplier == "auto":
            if target_epsilon is None or steps is None:
                raise ValueError(
                    "model.noise_multiplier=auto needs privacy.target_epsilon and "
                    "trainer.max_steps (the planned number of steps); set both or give a number"
                )
            try:
                return replace(plan, noise_multiplier=plan._calibrate())
            except ValueError as err:
                if fork_error is None or not plan._continues():
                    raise
                raise fork_error(err) from err
        plan = replace(plan, noise_multiplier=check_noise_multiplier(noise_multiplier))
        if target_epsilon is not None:  # one step from scratch, a fork's included
            q0 = (
                schedule.rate(0)
                if mechanism is None
                else mechanism.round_sample_rates(schedule.rate, 1)[0]
            )
            first = make_accountant(accountant).epsilon_of_ledger(
                [[plan.noise_multiplier, q0, 1]], delta=resolved
            )
            if first > target_epsilon:
                raise ValueError(
                    f"privacy.target_epsilon={target_epsilon} is unreachable: one step at "
                    f"noise_multiplier={noise_multiplier} already costs epsilon={first:.3g}; raise "
                    "model.noise_multiplier or use noise_multiplier: auto"
                )
        return plan

    def _calibrate(self) -> float:
        assert self.target_epsilon is not None and self.steps is not None  # create checked
        if self._continues():
            return calibrate_continuation(
                target_epsilon=self.target_epsilon,
                delta=self.delta,
                prefix=self.taken,
                sample_rate=self._planned_rates(self.steps),
                accountant=self.accountant,
            )
        rates = self._planned_rates(self.steps)
        try:
            return calibrate_noise_multiplier(
                target_epsilon=self.target_epsilon,
                delta=self.delta,
                sample_rate=rates,
                steps=len(rates),
                accountant=self.accountant,
            )
        except ValueError as err:
            raise ValueError(
                f"privacy.target_epsilon is unreachable in {self.steps} steps: {err}"
            ) from err

    def _continues(self) -> bool:
        """A fork's plan: steps already taken before this plan's first."""
        return bool(self.taken) or self.first_step > 0

    # --- the ledger the plan implies ---------------------------------------------------------
    def _planned_rates(self, until: int) -> list[float]:
        """Ledger rates of steps first_step..until-1 (this plan's own steps)."""
        if self.mechanism is not None:
            return self.mechanism.round_sample_rates(self.schedule.rate, until)[
                len(self.mechanism.round_sample_rates(self.schedule.rate, self.first_step)) :
            ]
        return [self.schedule.rate(t) for t in range(self.first_step, until)]

    def ledger(self, until: int) -> list[list[float]]:
        """The ledger after steps 0..until-1: ``taken`` then this plan's runs at sigma."""
        runs = rate_runs(self._planned_rates(max(until, self.first_step)))
        planned = [[self.noise_multiplier, q, n] for q, n in runs]
        return [list(run) for run in self.taken] + planned

    # --- what the plan answers ---------------------------------------------------------------
    def expected_batch_size(self, step: int) -> float:
        """E[B_t] = q_t * N."""
        return self.schedule.rate(step) * self.num_units

    def count_noise_std(self, step: int = 0) -> float | None:
        """Private quantile: std of the count noise at ``step``, E[B_t] / divisor (in units)."""
        if self.count_noise_divisor is None:
            return None
        return self.expected_batch_size(step) / self.count_noise_divisor

    def count_noise_share(self, step: int = 0) -> float | None:
        """Share of the accounted precision 1 / sigma^2 the count pays: (sigma / (2 sigma_b))^2."""
        std = self.count_noise_std(step)
        return None if std is None else (self.noise_multiplier / (2.0 * std)) ** 2

    def grad_noise_multiplier(self, step: int = 0) -> float:
        """The gradient's noise multiplier at ``step``: sigma, raised to pay for a count.

        Raises:
            ValueError: the count noise is too small for sigma at this step (Theorem 1).
        """
        std = self.count_noise_std(step)
        if std is None:
            return self.noise_multiplier
        return raised_noise_multiplier(noise_multiplier=self.noise_multiplier, count_noise_std=std)

    def noise_std(self, step: int = 0) -> float:
        """Noise std per coordinate of the averaged gradient at C_0: z_grad * C_0 * s / E[B_t].

        s is the mechanism's sensitivity (1 for independent noise): the std of its fresh draw.
        """
        scale = 1.0 if self.mechanism is None else self.mechanism.sensitivity
        z = self.grad_noise_multiplier(step)
        return z * self.max_grad_norm * scale / self.expected_batch_size(step)

    def epsilon_after(self, steps: int, accountant: AccountantName | None = None) -> float:
        """Epsilon after optimizer steps 0..steps-1 (run by run, ~1e-9 relative to stepping)."""
        acct = make_accountant(accountant or self.accountant)
        return acct.epsilon_of_ledger(self.ledger(steps), delta=self.delta)

    def epsilon_curve(self, steps: int, accountant: AccountantName | None = None) -> list[float]:
        """Epsilon after each ledger step 1..len(ledger(steps)), composed one step at a time.

        Stepping a fresh accountant the way training does: for independent noise, entry t is
        the epsilon training logs after step t (bit for bit on the same platform).
        """
        acct = make_accountant(accountant or self.accountant)
        curve = []
        for sigma, q, n in self.ledger(steps):
            for _ in range(int(n)):
                acct.step(noise_multiplier=sigma, sample_rate=q)
                curve.append(acct.get_epsilon(self.delta))
        return curve

    def check_batches(self, clip: ClipBoundEstimator) -> None:
        """Refuse a plan whose smallest expected batch cannot pay for ``clip``'s own release.

        Raises:
            ValueError: a private quantile's count noise is too small at some planned step
                (``lit_dp.privacy.clipping.check_smallest_batch``); a fixed bound never raises.
        """
        check_smallest_batch(
            clip,
            noise_multiplier=self.noise_multiplier,
            schedule=self.schedule,
            num_units=self.num_units,
            num_steps=self.steps,
        )

    def budget_stop_step(self) -> int | None:
        """Steps the budget stop lets the run take, or None when it never stops the plan.

        None without a target, without planned steps, or when all planned steps fit.
        """
        if self.target_epsilon is None or self.steps is None:
            return None
        if not exceeds_budget(self.epsilon_after(self.steps), self.target_epsilon):
            return None
        lo, hi = self.first_step, self.steps  # within(lo), not within(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            within = not exceeds_budget(self.epsilon_after(mid), self.target_epsilon)
            lo, hi = (mid, hi) if within else (lo, mid)
        return lo

    def describe(self) -> dict[str, Any]:
        """The plan as plain data: what fit reports and ``lit-dp plan`` prints."""
        return {
            "num_units": self.num_units,
            "sample_rate": self.schedule.describe(),
            "steps": self.steps,
            "delta": self.delta,
            "delta_is_default": self.delta_is_default,
            "accountant": self.accountant,
            "noise_multiplier": self.noise_multiplier,
            "calibrated": self.calibrated,
            "target_epsilon": self.target_epsilon,
            "max_grad_norm": self.max_grad_norm,
            "count_noise_divisor": self.count_noise_divisor,
            "noise_mechanism": None if self.mechanism is None else self.mechanism.describe(),
            "first_step": self.first_step,
        }
