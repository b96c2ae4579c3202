"""Clip-bound estimators: how C_t, the per-unit L2 clip bound, evolves between steps.

Three estimators share the ``ClipBoundEstimator`` interface:

- ``FixedClip`` (default): C_t = C. Spends no budget. A C below the unit norms clips every
  unit, i.e. normalizes each unit's gradient (Bu et al. 2023, automatic clipping). With
  DP-AdamW it had a lower loss than the adaptive bounds in lit_dp's utility study
  (``benchmarks/README.md`` section 5; by a margin within the seed spread against the best of
  them), so it is what ``default_clip_estimator`` builds.
- ``PrivateQuantile`` (Andrew et al. 2021): geometric tracking of the quantile
  1 - rho* of the unit norms from a *noisy* unclipped count. The count noise is paid for by
  raising the gradient noise multiplier (Theorem 1), so the accounted sigma covers both.
- ``HistoryPercentile`` (the DP-Adam-AC paper): C_t = clamp(P_{100(1-rho*)}(last H raw norms)).
  It reads raw per-unit norms, so epsilon does NOT cover the weights (``covered_by_dp=False``).

The DP step calls ``grad_noise_multiplier`` before noising the clipped sum and ``update`` once
after the optimizer step, with the global per-unit norms (fp32, shape (B,), B may be 0).
Non-finite norms count as clipped units.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from lit_dp.privacy.noise import NoiseGenerator, gaussian_noise_like

if TYPE_CHECKING:
    from lit_dp.privacy.sampling import SampleRateSchedule

# The defaults every estimator shares (one place; the clip-driven lr follows the same target).
DEFAULT_CLIP = 1.0  # C (FixedClip) or C_0 (adaptive estimators), per privacy unit
# rho*, the fraction of units an adaptive bound aims to clip. 0.5: in the utility study the
# private quantile did better at 0.5 than at 0.2 (the paper's example) on all 3 seeds, and than
# 0.9 (benchmarks/README.md section 5); the default FixedClip needs none.
DEFAULT_TARGET_CLIP_RATE = 0.5
DEFAULT_MIN_CLIP, DEFAULT_MAX_CLIP = 0.01, 100.0  # clamps of an adaptive C_t


# --- functional core ---------------------------------------------------------------------------


def raised_noise_multiplier(*, noise_multiplier: float, count_noise_std: float) -> float:
    """Gradient noise multiplier z_grad that keeps the whole step accounted at ``noise_multiplier``.

    Andrew et al. 2021, Theorem 1: releasing the clipped sum with multiplier z_grad and the
    centered unclipped count sum_i (b_i - 1/2) (sensitivity 1/2) with noise std sigma_b is one
    Gaussian mechanism with multiplier z = (z_grad^-2 + (2 sigma_b)^-2)^(-1/2). Solving for z_grad:
    z_grad = (z^-2 - (2 sigma_b)^-2)^(-1/2) = z / sqrt(1 - (z / (2 sigma_b))^2).

    Args:
        noise_multiplier: z >= 0, the accounted multiplier. 0 (non-private testing) returns 0.
        count_noise_std: sigma_b > 0, std of the count noise (in units).

    Raises:
        ValueError: z >= 2 sigma_b, where no gradient noise can reach z.
    """
    z, sigma_b = noise_multiplier, count_noise_std
    if z == 0.0:
        return 0.0
    if z >= 2.0 * sigma_b:
        raise ValueError(f"noise_multiplier={z} >= 2 * count_noise_std={2.0 * sigma_b}")
    return z / math.sqrt(1.0 - (z / (2.0 * sigma_b)) ** 2)


def percentile_linear(values: list[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100) with linear interpolation (numpy's default method)."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _count(norms: torch.Tensor, clip: float) -> tuple[int, int]:
    """(unclipped, total) units: unclipped = #(finite norm <= C); non-finite norms are clipped."""
    # fp64: comparing fp32 norms with a Python float would round C to fp32 first.
    norms = norms.detach().reshape(-1).double()
    unclipped = (torch.isfinite(norms) & (norms <= clip)).sum()
    return int(unclipped.item()), int(norms.numel())


def _require(ok: bool, name: str, value: Any, fix: str) -> None:
    # Chained comparisons such as 0 < x < inf are False for nan and inf: no separate check.
    if not ok:
        raise ValueError(f"{name}={value!r} is out of range: {fix}")


def check_smallest_batch(
    clip: ClipBoundEstimator,
    *,
    noise_multiplier: float,
    schedule: SampleRateSchedule,
    num_units: int,
    num_steps: int | None,
) -> None:
    """Refuse a plan whose smallest expected batch cannot pay for the estimator's own release.

    A private quantile's count noise scales with the expected batch size E[B_t] = q_t N, so a
    decreasing batch ramp can pass at step 0 and fail later: every step of the plan
    (``num_steps``; None = a run of any length) is checked at its smallest E[B_t].

    Raises:
        ValueError: naming the step, its expected batch size and the fixes.
    """
    step, rate = schedule.smallest_rate(num_steps)
    expected = rate * num_units
    try:
        clip.grad_noise_multiplier(noise_multiplier=noise_multiplier, expected_batch_size=expected)
    except ValueError as err:
        if step == 0:
            raise
        raise ValueError(
            f"data.batch_schedule: the expected batch size falls to {expected:g} at step {step} "
            f"(the smallest of the run's {num_steps or 'unbounded'} steps; it is "
            f"{schedule.rate(0) * num_units:g} at step 0). {err}. With a decreasing ramp, "
            "raise its end batch size (end / end_rate) or end the run before that step "
            "(trainer.max_steps)"
        ) from err


# --- stateful estimators -----------------------------------------------------------------------
class ClipBoundEstimator(ABC):
    """Interface of a clip-bound estimator (see the module docstring).

    Attributes:
        name: the ``kind`` of ``make_clip_estimator``.
        covered_by_dp: True when C_t depends on the data only through privatized statistics.
    """

    name: ClassVar[str]
    covered_by_dp: ClassVar[bool]
    _note: ClassVar[str]

    def __init__(self, initial_clip: float) -> None:
        self._clip = float(initial_clip)
        self.num_updates = 0

    @property
    def max_grad_norm(self) -> float:
        """C_t, the current per-unit L2 clip bound (gradient-norm units)."""
        return self._clip

    def grad_noise_multiplier(
        self, *, noise_multiplier: float, expected_batch_size: float
    ) -> float:
        """Multiplier of the gradient-sum noise (std = it * C_t) for an accounted noise multiplier.

        The default returns ``noise_multiplier`` unchanged (no other noisy release to pay for).
        """
        z, e = float(noise_multiplier), float(expected_batch_size)
        _require(0.0 <= z < math.inf, "noise_multiplier", z, "need a finite sigma >= 0")
        _require(0.0 < e < math.inf, "expected_batch_size", e, "need a finite q * N > 0")
        return float(noise_multiplier)

    @abstractmethod
    def update(
        self, *, norms: torch.Tensor, expected_batch_size: float, generator: NoiseGenerator
    ) -> float | None:
        """Update C_t from this step's per-unit norms; return a clip rate safe to use downstream.

        Args:
            norms: global per-unit gradient norms before clipping, shape (B,), fp32; B may be 0.
            expected_batch_size: q_t * N, the public divisor (never the realized B).
            generator: the noise generator (identical on every DDP rank).
        """

    def _parameters(self) -> dict[str, Any]:
        return {}

    def describe(self) -> dict[str, Any]:
        """Name, constructor parameters, current C_t, whether epsilon covers it, and a note."""
        return {
            "name": self.name,
            "parameters": self._parameters(),
            "max_grad_norm": self._clip,
            "covered_by_dp": self.covered_by_dp,
            "note": self._note,
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain Python types only (loadable with ``torch.load(weights_only=True)``)."""
        return {"name": self.name, "max_grad_norm": self._clip, "num_updates": self.num_updates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("name", self.name) != self.name:
            raise ValueError(
                f"checkpoint holds a {state_dict['name']!r} clip estimator, not {self.name!r}; "
                "resume with the clipping mode the run was started with"
            )
        self._clip = float(state_dict["max_grad_norm"])
        self.num_updates = int(state_dict["num_updates"])


class FixedClip(ClipBoundEstimator):
    """C_t = max_grad_norm for every step.

    Args:
        max_grad_norm: C > 0, the per-unit L2 clip bound.
    """

    name = "fixed"
    covered_by_dp = True
    _note = "constant clip bound; spends no privacy budget"

    def __init__(self, max_grad_norm: float = DEFAULT_CLIP) -> None:
        c = float(max_grad_norm)
        _require(0.0 < c < math.inf, "max_grad_norm", c, "use a finite C > 0, e.g. 1.0")
        super().__init__(c)

    def update(
        self, *, norms: torch.Tensor, expected_batch_size: float, generator: NoiseGenerator
    ) -> float | None:
        """No change and no clip rate (releasing one would need its own noise)."""
        self.num_updates += 1
        return None

    def _parameters(self) -> dict[str, Any]:
        return {"max_grad_norm": self._clip}


def _check_adaptive(
    initial_clip: float, target_clip_rate: float, min_clip: float, max_clip: float
) -> None:
    _require(0.0 < min_clip < math.inf, "min_clip", min_clip, "use a finite C_min > 0, e.g. 0.01")
    _require(
        min_clip <= max_clip < math.inf,
        "max_clip",
        max_clip,
        f"use a finite C_max >= min_clip={min_clip}",
    )
    _require(
        min_clip <= initial_clip <= max_clip,
        "initial_clip",
        initial_clip,
        f"use C_0 in [min_clip={min_clip}, max_clip={max_clip}]",
    )
    _require(
        0.0 < target_clip_rate < 1.0,
        "target_clip_rate",
        target_clip_rate,
        "rho* is the fraction of units to clip, in (0, 1), e.g. 0.5",
    )


class PrivateQuantile(ClipBoundEstimator):
    """Private quantile tracking (Andrew et al. 2021), covered by epsilon.

    Per step, with E = expected batch size, sigma_b = E / count_noise_divisor, b_i = 1 when unit
    i's norm is finite and <= C_t (units of the realized batch B):
        b~ = sum_i (b_i - 1/2) + N(0, sigma_b^2)        (centered: sensitivity 1/2)
        b_bar = clamp(b~ / E + 1/2, 0, 1)                 (privatized unclipped fraction)
        C_{t+1} = clamp(C_t * exp(-eta * (b_bar - (1 - rho*))), C_min, C_max)
    Centering is what makes the count's sensitivity 1/2, which Theorem 1's (2 sigma_b) assumes;
    with |B| = E it equals (#unclipped + noise) / E.

    Args:
        initial_clip: C_0 in [min_clip, max_clip].
        target_clip_rate: rho* in (0, 1); C_t tracks the (1 - rho*) quantile of the unit norms.
        learning_rate: eta > 0 of the geometric update.
        count_noise_divisor: sigma_b = expected batch size / divisor (Andrew et al.: 20).
        min_clip: C_min > 0.
        max_clip: C_max >= C_min.
    """

    name = "private_quantile"
    covered_by_dp = True
    _note = (
        "geometric quantile tracking on a noisy unclipped count; the count noise is folded "
        "into the accounted noise multiplier (Andrew et al. 2021, Theorem 1)"
    )

    def __init__(
        self,
        initial_clip: float = DEFAULT_CLIP,
        target_clip_rate: float = DEFAULT_TARGET_CLIP_RATE,
        learning_rate: float = 0.2,
        count_noise_divisor: float = 20.0,
        min_clip: float = DEFAULT_MIN_CLIP,
        max_clip: float = DEFAULT_MAX_CLIP,
    ) -> None:
        _check_adaptive(initial_clip, target_clip_rate, min_clip, max_clip)
        _require(
            0.0 < learning_rate < math.inf,
            "learning_rate",
            learning_rate,
            "use a finite eta > 0, e.g. 0.2",
        )
        _require(
            0.0 < count_noise_divisor < math.inf,
            "count_noise_divisor",
            count_noise_divisor,
            "use a finite divisor > 0, e.g. 20 (count noise std = expected batch / divisor)",
        )
        super().__init__(initial_clip)
        self.initial_clip = float(initial_clip)
        self.target_clip_rate, self.learning_rate = float(target_clip_rate), float(learning_rate)
        self.count_noise_divisor = float(count_noise_divisor)
        self.min_clip, self.max_clip = float(min_clip), float(max_clip)

    def count_noise_std(self, expected_batch_size: float) -> float:
        """sigma_b = expected_batch_size / count_noise_divisor (in units)."""
        return float(expected_batch_size) / self.count_noise_divisor

    def grad_noise_multiplier(
        self, *, noise_multiplier: float, expected_batch_size: float
    ) -> float:
        """z_grad = (z^-2 - (2 sigma_b)^-2)^(-1/2) (Theorem 1); 0 for z = 0.

        Raises:
            ValueError: the expected batch size is too small: needs z < 2 sigma_b.
        """
        z = super().grad_noise_multiplier(
            noise_multiplier=noise_multiplier, expected_batch_size=expected_batch_size
        )
        sigma_b = self.count_noise_std(expected_batch_size)
        if z >= 2.0 * sigma_b:
            need = self.count_noise_divisor * z / 2.0
            raise ValueError(
                f"expected batch size {expected_batch_size:g} is too small for private quantile "
                f"clipping at noise_multiplier={z:g}: the count noise std {sigma_b:g} "
                f"(= expected batch / count_noise_divisor={self.count_noise_divisor:g}) must "
                "exceed noise_multiplier / 2. Use an expected batch size (q * N) well above "
                f"{need:g}, or lower count_noise_divisor below "
                f"{2.0 * expected_batch_size / z:g}, or use model.clipping FixedClip "
                "(Andrew et al. 2021, Theorem 1)"
            )
        return raised_noise_multiplier(noise_multiplier=z, count_noise_std=sigma_b)

    def update(
        self, *, norms: torch.Tensor, expected_batch_size: float, generator: NoiseGenerator
    ) -> float | None:
        """Noisy count -> new C_t; returns the privatized clip rate 1 - b_bar in [0, 1]."""
        expected = float(expected_batch_size)
        _require(
            0.0 < expected < math.inf, "expected_batch_size", expected, "need a finite q * N > 0"
        )
        unclipped, total = _count(norms, self._clip)
        noise = gaussian_noise_like(
            torch.empty(()), std=self.count_noise_std(expected), generator=generator
        )
        noisy = (unclipped - 0.5 * total) + float(noise.item())
        b_bar = min(1.0, max(0.0, noisy / expected + 0.5))
        step = -self.learning_rate * (b_bar - (1.0 - self.target_clip_rate))
        self._clip = min(self.max_clip, max(self.min_clip, self._clip * math.exp(step)))
        self.num_updates += 1
        return 1.0 - b_bar

    def _parameters(self) -> dict[str, Any]:
        return {
            "initial_clip": self.initial_clip,
            "target_clip_rate": self.target_clip_rate,
            "learning_rate": self.learning_rate,
            "count_noise_divisor": self.count_noise_divisor,
            "min_clip": self.min_clip,
            "max_clip": self.max_clip,
        }


class HistoryPercentile(ClipBoundEstimator):
    """The paper's rule: C_t = clamp(P_{100(1-rho*)}(U), C_min, C_max), U = last H finite norms.

    NOT covered by epsilon: C_t is a percentile of raw per-unit norms, and the returned clip
    rate (fraction of this batch's norms > C_t before the update) is raw too.

    Args:
        initial_clip: C_0 in [min_clip, max_clip], used until the first norms arrive.
        target_clip_rate: rho* in (0, 1).
        history_size: H >= 1, the number of most recent finite unit norms kept.
        min_clip: C_min > 0.
        max_clip: C_max >= C_min.
    """

    name = "history_percentile"
    covered_by_dp = False
    _note = (
        "percentile of the last H raw per-unit norms (DP-Adam-AC paper); NOT private: "
        "epsilon does not cover the weights in this mode"
    )

    def __init__(
        self,
        initial_clip: float = DEFAULT_CLIP,
        target_clip_rate: float = DEFAULT_TARGET_CLIP_RATE,
        history_size: int = 1000,
        min_clip: float = DEFAULT_MIN_CLIP,
        max_clip: float = DEFAULT_MAX_CLIP,
    ) -> None:
        _check_adaptive(initial_clip, target_clip_rate, min_clip, max_clip)
        if isinstance(history_size, bool) or not isinstance(history_size, int) or history_size < 1:
            raise ValueError(
                f"history_size={history_size!r} is out of range: use an integer H >= 1, e.g. 1000"
            )
        super().__init__(initial_clip)
        self.initial_clip = float(initial_clip)
        self.target_clip_rate, self.history_size = float(target_clip_rate), history_size
        self.min_clip, self.max_clip = float(min_clip), float(max_clip)
        self.buffer: deque[float] = deque(maxlen=history_size)

    def update(
        self, *, norms: torch.Tensor, expected_batch_size: float, generator: NoiseGenerator
    ) -> float | None:
        """Append finite norms, recompute C_t; return the raw clip rate (None: empty batch)."""
        unclipped, total = _count(norms, self._clip)
        flat = norms.detach().reshape(-1).double()
        self.buffer.extend(flat[torch.isfinite(flat)].cpu().tolist())
        if self.buffer:
            p = percentile_linear(list(self.buffer), 100.0 * (1.0 - self.target_clip_rate))
            self._clip = min(self.max_clip, max(self.min_clip, p))
        self.num_updates += 1
        return (total - unclipped) / total if total else None

    def _parameters(self) -> dict[str, Any]:
        return {
            "initial_clip": self.initial_clip,
            "target_clip_rate": self.target_clip_rate,
            "history_size": self.history_size,
            "min_clip": self.min_clip,
            "max_clip": self.max_clip,
        }

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "buffer": list(self.buffer)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.buffer = deque((float(x) for x in state_dict["buffer"]), maxlen=self.history_size)


ESTIMATORS: dict[str, type[ClipBoundEstimator]] = {
    cls.name: cls for cls in (FixedClip, PrivateQuantile, HistoryPercentile)
}


def default_clip_estimator() -> ClipBoundEstimator:
    """The estimator a module (and ``lit-dp plan``) uses when ``clipping`` is not given.

    ``FixedClip(1.0)``: in the utility study (``benchmarks/README.md`` section 5), DP-AdamW with
    a fixed C below the unit norms and EMA weights reached a lower validation loss than the
    private-quantile bound at every target clip rate tried.
    """
    return FixedClip()


def make_clip_estimator(kind: str, **kwargs: Any) -> ClipBoundEstimator:
    """Build an estimator by ``kind`` ("fixed", "private_quantile", "history_percentile").

    Configs build estimators by ``class_path``; this string-keyed form rebuilds the estimator a
    privacy report records: ``make_clip_estimator(d["name"], **d["parameters"])`` for its
    ``describe()`` entry ``d`` gives an estimator with the same description.
    """
    if kind not in ESTIMATORS:
        raise ValueError(f"clipping={kind!r} is unknown; use one of {sorted(ESTIMATORS)}")
    return ESTIMATORS[kind](**kwargs)
