"""How many privacy units a training step draws: the DataModule's sample-rate schedule.

A ``BatchSchedule`` is the ``batch_schedule`` component of a ``DPDataModule``, chosen in a
config the way LightningCLI chooses components::

    data:
      init_args:
        batch_schedule:
          class_path: lit_dp.data.ConstantBatchSize
          init_args:
            expected_batch_size: 32

Each class validates its own fields when built. Once the number N of privacy units is known
(after the records are read), ``sample_rates(N)`` turns it into the
``lit_dp.privacy.sampling.SampleRateSchedule`` of per-step Poisson rates q_t that the sampler
draws with and the accountant composes. Expected batch sizes E[B] are in privacy units
(q = E[B] / N); sample rates are inclusion probabilities in (0, 1].
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

from lit_dp.privacy.sampling import SampleRateSchedule

DEFAULT_EXPECTED_BATCH_SIZE = 16.0
_FIELD = (
    "data.batch_schedule."  # how errors name a field (data.init_args.batch_schedule.init_args.X)
)


def _batch_size(name: str, value: Any) -> float:
    """A finite expected batch size > 0, or a ValueError naming the field."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < value < math.inf:
        raise ValueError(
            f"{_FIELD}{name}={value!r} must be a finite number > 0: the expected number of "
            "privacy units per step, e.g. 16"
        )
    return float(value)


def _rate(name: str, value: Any) -> float:
    """A sample rate in (0, 1], or a ValueError naming the field."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < value <= 1.0:
        raise ValueError(
            f"{_FIELD}{name}={value!r} must be in (0, 1]: the probability that a privacy unit is "
            "in a step's batch (use ConstantBatchSize/LinearBatchSizeRamp to give E[B] instead)"
        )
    return float(value)


def _ramp_steps(value: Any) -> int:
    """A ramp length: an integer >= 1, or a ValueError naming the field."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{_FIELD}ramp_steps={value!r} must be an integer >= 1: the optimizer steps over "
            "which the rate moves from start to end (use a constant schedule for no ramp)"
        )
    return value


def _rate_of(name: str, expected_batch_size: float, num_units: int) -> float:
    """Q = E[B] / N, refusing an expected batch size above N."""
    if expected_batch_size > num_units:
        raise ValueError(
            f"{_FIELD}{name}={expected_batch_size:g} exceeds the {num_units} privacy units; lower "
            "it (q = expected batch size / N must be <= 1)"
        )
    return expected_batch_size / num_units


def _check_num_units(num_units: Any) -> int:
    if isinstance(num_units, bool) or not isinstance(num_units, int) or num_units < 1:
        raise ValueError(f"num_units={num_units!r} must be an integer >= 1 (N, the privacy units)")
    return num_units


class BatchSchedule(ABC):
    """Per-step Poisson sample rates, given the number of privacy units N."""

    @abstractmethod
    def sample_rates(self, num_units: int) -> SampleRateSchedule:
        """The schedule of rates q_t for a training set of ``num_units`` privacy units.

        Args:
            num_units: N >= 1, the privacy units of the training set.

        Raises:
            ValueError: an expected batch size above N (q would exceed 1).
        """

    @abstractmethod
    def _parameters(self) -> dict[str, Any]:
        """The constructor arguments, as given (after validation)."""

    def describe(self) -> dict[str, Any]:
        """The schedule as a config entry: ``{"class_path": ..., "init_args": {...}}``."""
        return {"class_path": f"lit_dp.data.{type(self).__name__}", "init_args": self._parameters()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._parameters().items())
        return f"{type(self).__name__}({args})"


class ConstantBatchSize(BatchSchedule):
    """Every step draws each unit with q = expected_batch_size / N.

    Args:
        expected_batch_size: E[B] > 0, the expected privacy units per step; at most N.
    """

    def __init__(self, expected_batch_size: float = DEFAULT_EXPECTED_BATCH_SIZE) -> None:
        self.expected_batch_size = _batch_size("expected_batch_size", expected_batch_size)

    def sample_rates(self, num_units: int) -> SampleRateSchedule:
        n = _check_num_units(num_units)
        return SampleRateSchedule.constant(
            _rate_of("expected_batch_size", self.expected_batch_size, n)
        )

    def _parameters(self) -> dict[str, Any]:
        return {"expected_batch_size": self.expected_batch_size}


class ConstantSampleRate(BatchSchedule):
    """Every step draws each unit with probability sample_rate, whatever N is.

    Args:
        sample_rate: q in (0, 1].
    """

    def __init__(self, sample_rate: float) -> None:
        self.sample_rate = _rate("sample_rate", sample_rate)

    def sample_rates(self, num_units: int) -> SampleRateSchedule:
        _check_num_units(num_units)
        return SampleRateSchedule.constant(self.sample_rate)

    def _parameters(self) -> dict[str, Any]:
        return {"sample_rate": self.sample_rate}


class LinearBatchSizeRamp(BatchSchedule):
    """The expected batch size moves linearly from start to end over ramp_steps steps.

    It then stays at end: q_t = (start + (end - start) * min(t, ramp_steps) / ramp_steps) / N.

    Args:
        start: E[B] at step 0, > 0 and at most N.
        end: E[B] from step ramp_steps on, > 0 and at most N (above or below start).
        ramp_steps: length of the ramp in optimizer steps, >= 1.
    """

    def __init__(self, start: float, end: float, ramp_steps: int) -> None:
        self.start = _batch_size("start", start)
        self.end = _batch_size("end", end)
        self.ramp_steps = _ramp_steps(ramp_steps)

    def sample_rates(self, num_units: int) -> SampleRateSchedule:
        n = _check_num_units(num_units)
        return SampleRateSchedule.linear(
            start_rate=_rate_of("start", self.start, n),
            end_rate=_rate_of("end", self.end, n),
            ramp_steps=self.ramp_steps,
        )

    def _parameters(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "ramp_steps": self.ramp_steps}


class LinearSampleRateRamp(BatchSchedule):
    """The sample rate moves linearly from start_rate to end_rate over ramp_steps steps.

    It then stays at end_rate.

    Args:
        start_rate: q_0 in (0, 1].
        end_rate: q from step ramp_steps on, in (0, 1].
        ramp_steps: length of the ramp in optimizer steps, >= 1.
    """

    def __init__(self, start_rate: float, end_rate: float, ramp_steps: int) -> None:
        self.start_rate = _rate("start_rate", start_rate)
        self.end_rate = _rate("end_rate", end_rate)
        self.ramp_steps = _ramp_steps(ramp_steps)

    def sample_rates(self, num_units: int) -> SampleRateSchedule:
        _check_num_units(num_units)
        return SampleRateSchedule.linear(
            start_rate=self.start_rate, end_rate=self.end_rate, ramp_steps=self.ramp_steps
        )

    def _parameters(self) -> dict[str, Any]:
        return {
            "start_rate": self.start_rate,
            "end_rate": self.end_rate,
            "ramp_steps": self.ramp_steps,
        }
