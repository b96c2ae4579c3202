"""Compute allocation: how to spend a fixed number of example-gradients at a fixed epsilon.

A private run's compute is about G = sum_t E[B_t] example-gradients (E[B] x steps for a
constant batch size). At fixed G and epsilon, a larger expected batch size E[B] means fewer
steps and a larger sample rate q = E[B] / N, so a larger noise multiplier sigma, but a smaller
noise per step on the averaged gradient, sigma / E[B] (sigma grows more slowly than E[B]). DP
training's loss depends on the steps and on this noise-batch ratio (McKenna et al. 2025,
"Scaling laws for differentially private language models"), and at fixed compute the best
private allocation uses larger batches and fewer steps than a non-private run would.

``allocations`` works out each candidate E[B] x steps at the same G through
``PrivacyPlan.create``, the constructor fit uses, so every sigma printed is the one fit would
calibrate for that choice. ``recommend`` applies lit_dp's rule: the largest E[B] that still
leaves ``min_steps`` optimizer steps. The rule's direction (grow the batch, cut the steps) is
McKenna et al.'s; its one number, ``DEFAULT_MIN_STEPS``, comes from lit_dp's utility study 2
(benchmarks/README.md, section 7), which compares allocations on one model and one dataset:
treat it as a starting point, and check the neighbours the plan prints on your own validation
split.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lit_dp.privacy.accountant import AccountantName
from lit_dp.privacy.clipping import ClipBoundEstimator
from lit_dp.privacy.plan import NoiseEvent, PrivacyPlan
from lit_dp.privacy.sampling import SampleRateSchedule

__all__ = ["DEFAULT_MIN_STEPS", "Allocation", "allocations", "candidate_batch_sizes", "recommend"]

# The fewest optimizer steps the rule keeps. Study 2 (benchmarks/README.md, section 7) spent
# 38,400 example-gradients at epsilon 8 as 64 x 600, 128 x 300 and 256 x 150: the loss fell with
# each doubling of E[B], and 150 steps is the fewest it tried, so the rule goes no further.
DEFAULT_MIN_STEPS = 150
# The smallest expected batch size the plan considers: below it sigma / E[B] is far larger
# than at any allocation worth running.
SMALLEST_BATCH = 8


@dataclass(frozen=True)
class Allocation:
    """One way to spend the compute: E[B] x steps, and the privacy plan fit would build for it.

    ``error`` is set (and ``plan`` None) when fit would refuse this choice, e.g. a batch too
    small for a private quantile's count noise, or a target no sigma reaches.
    """

    expected_batch_size: float
    steps: int
    num_units: int
    plan: PrivacyPlan | None
    error: str | None = None

    @property
    def sample_rate(self) -> float:
        return self.expected_batch_size / self.num_units

    @property
    def epochs(self) -> float:
        return self.expected_batch_size * self.steps / self.num_units

    @property
    def noise_multiplier(self) -> float | None:
        """The gradient's noise multiplier: sigma for a fixed clip bound.

        A private quantile's count takes a share of the accounted noise, which raises it.
        """
        return None if self.plan is None else self.plan.grad_noise_multiplier(0)

    @property
    def noise_batch_ratio(self) -> float | None:
        """The noise per step on the averaged gradient in units of C: sigma / E[B].

        Times the sensitivity ||c|| of banded MF's fresh draw (1 for independent noise).
        """
        return None if self.plan is None else self.plan.noise_std(0) / self.plan.max_grad_norm


def candidate_batch_sizes(
    num_units: int, compute: float, extra: Iterable[float] = ()
) -> list[float]:
    """The E[B] to try, sorted: powers of two from ``SMALLEST_BATCH``, plus ``extra``.

    Only sizes up to N that leave at least one step; ``extra`` is the config's own E[B].
    """
    if num_units < 1 or not compute > 0:
        raise ValueError(f"need N >= 1 and compute > 0 (got N={num_units}, compute={compute})")
    out = {float(b) for b in extra if 0 < b <= num_units}
    b = SMALLEST_BATCH
    while b <= num_units and b <= compute:
        out.add(float(b))
        b *= 2
    return sorted(out)


def allocations(
    *,
    num_units: int,
    compute: float,
    target_epsilon: float,
    delta: float | None,
    accountant: AccountantName = "pld",
    clip: ClipBoundEstimator | None = None,
    mechanism: NoiseEvent | None = None,
    batch_sizes: Iterable[float] | None = None,
) -> list[Allocation]:
    """Every candidate E[B] x steps that spends ``compute`` example-gradients, calibrated.

    Steps are round(compute / E[B]) (at least 1); sigma is calibrated to ``target_epsilon``
    over them with a constant rate q = E[B] / N and the run's noise mechanism, exactly as
    ``PrivacyPlan.create`` does for fit.

    Args:
        num_units: N, the privacy units.
        compute: G, the example-gradients to spend (E[B] x steps of the run being planned).
        target_epsilon: the budget every candidate is calibrated to.
        delta: the run's delta (None: the default for N).
        accountant: "pld" or "rdp", as the run's.
        clip: the run's clip-bound estimator (a private quantile raises the gradient's noise
            and needs a batch large enough for its count noise).
        mechanism: the run's noise mechanism's accounting event (None: independent noise;
            banded MF with b bands refuses an E[B] above N / b).
        batch_sizes: the E[B] to try; default ``candidate_batch_sizes(num_units, compute)``.
    """
    sizes = (
        candidate_batch_sizes(num_units, compute)
        if batch_sizes is None
        else sorted(set(batch_sizes))
    )
    out = []
    for b in sizes:
        steps = max(1, round(compute / b))
        schedule = SampleRateSchedule.constant(b / num_units)
        try:
            plan = PrivacyPlan.create(
                num_units=num_units,
                schedule=schedule,
                steps=steps,
                noise_multiplier="auto",
                target_epsilon=target_epsilon,
                delta=delta,
                accountant=accountant,
                clip=clip,
                mechanism=mechanism,
                warn=lambda msg: None,  # the run's own plan already warned about its delta
            )
            if clip is not None:
                plan.check_batches(clip)
            out.append(Allocation(b, steps, num_units, plan))
        except ValueError as err:
            reason = str(err).split("\n")[0].split(": ")[0]  # the first clause: what fails
            out.append(Allocation(b, steps, num_units, None, error=reason))
    return out


def recommend(options: list[Allocation], min_steps: int = DEFAULT_MIN_STEPS) -> Allocation | None:
    """lit_dp's rule: the largest feasible E[B] that leaves at least ``min_steps`` steps.

    None when no feasible candidate leaves that many steps (a compute budget below
    ``min_steps x SMALLEST_BATCH`` example-gradients, or every batch refused): the rule was
    measured on runs of at least that many steps and says nothing about shorter ones.

    Raises:
        ValueError: ``min_steps`` < 1.
    """
    if min_steps < 1:
        raise ValueError(f"min_steps={min_steps} must be >= 1")
    enough = [a for a in options if a.plan is not None and a.steps >= min_steps]
    return max(enough, key=lambda a: a.expected_batch_size) if enough else None
