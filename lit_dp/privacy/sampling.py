"""Poisson sampling of privacy units, with per-step sample-rate schedules.

The RDP accountant assumes Poisson subsampling: every unit is in the batch of step t
independently with probability q_t, so batch sizes vary and a batch may be empty (it is still
yielded: a noise-only step the accountant counts).

Resume contract. The draw of step t is a pure function of (seed, t) (:func:`poisson_draw`), so:

- every DDP rank computes the same global draw and keeps its shard (units i with
  ``i % world_size == rank``); the union over ranks is the world_size=1 batch;
- ``__iter__`` yields steps ``s, s+1, ..., s+steps_per_epoch-1`` where ``s = step_source()``
  when a step source is set (the DataModule passes ``lambda: trainer.global_step``: the optimizer
  steps already taken, which Lightning restores on resume), else ``s = next_step``;
- a DataLoader that prefetches batches ahead therefore never shifts the steps: the batch consumed
  at step t is always the draw of step t, whatever was prefetched before a crash;
- ``state_dict()`` is ``{"seed", "next_step"}`` with next_step = ``step_source()`` when set
  (steps consumed), else the count of batches yielded so far. A sampler loaded from it yields
  exactly the batches the uninterrupted run would have yielded from that step on.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

_PASS_TOLERANCE = 1e-9  # sum_t q_t >= 1 - tol counts as one expected pass (float rounding)


def _check_rate(name: str, value: float | None, kind: str) -> float:
    if value is None or isinstance(value, bool) or not 0.0 < float(value) <= 1.0:
        raise ValueError(
            f"{name}={value!r} must be in (0, 1] for a {kind} schedule; a sample rate is the "
            "probability that a unit is in a step's batch (expected batch size / N)"
        )
    return float(value)


@dataclass(frozen=True)
class SampleRateSchedule:
    """Global sample rate q_t per optimizer step.

    ``kind="constant"``: q_t = sample_rate. ``kind="linear"``: q_t = start_rate + (end_rate -
    start_rate) * min(t, ramp_steps) / ramp_steps, i.e. a linear ramp over ramp_steps steps, then
    end_rate. Rates are inclusion probabilities in (0, 1] (expected batch size = q_t * N).

    Args:
        kind: "constant" or "linear".
        sample_rate: q of a constant schedule.
        start_rate: q_0 of a linear schedule.
        end_rate: q from step ramp_steps on, for a linear schedule.
        ramp_steps: length of the linear ramp (>= 1).
    """

    kind: str = "constant"
    sample_rate: float | None = None
    start_rate: float | None = None
    end_rate: float | None = None
    ramp_steps: int = 0

    def __post_init__(self) -> None:
        if self.kind == "constant":
            _check_rate("sample_rate", self.sample_rate, self.kind)
            for name in ("start_rate", "end_rate"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} is only used by kind='linear'; use sample_rate")
        elif self.kind == "linear":
            _check_rate("start_rate", self.start_rate, self.kind)
            _check_rate("end_rate", self.end_rate, self.kind)
            if self.sample_rate is not None:
                raise ValueError("sample_rate is only used by kind='constant'; use start_rate")
            if (
                isinstance(self.ramp_steps, bool)
                or int(self.ramp_steps) != self.ramp_steps
                or self.ramp_steps < 1
            ):
                raise ValueError(
                    f"ramp_steps={self.ramp_steps!r} must be an integer >= 1 for kind='linear'"
                )
        else:
            raise ValueError(
                f"kind={self.kind!r} must be 'constant' or 'linear' (the schedule kind)"
            )

    @classmethod
    def constant(cls, sample_rate: float) -> SampleRateSchedule:
        return cls("constant", sample_rate=sample_rate)

    @classmethod
    def linear(cls, *, start_rate: float, end_rate: float, ramp_steps: int) -> SampleRateSchedule:
        return cls("linear", start_rate=start_rate, end_rate=end_rate, ramp_steps=ramp_steps)

    def rate(self, step: int) -> float:
        """q_t of optimizer step ``step`` (0-based)."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        if self.kind == "constant":
            return float(self.sample_rate)  # type: ignore[arg-type]
        start, end = float(self.start_rate), float(self.end_rate)  # type: ignore[arg-type]
        if step >= self.ramp_steps:
            return end
        return start + (end - start) * step / self.ramp_steps

    def rates(self, num_steps: int) -> list[float]:
        """[q_0, ..., q_{num_steps-1}] (what the accountant will compose)."""
        return [self.rate(t) for t in range(num_steps)]

    def smallest_rate(self, num_steps: int | None) -> tuple[int, float]:
        """(t, q_t) of the smallest rate of steps 0 .. num_steps - 1 (None: a run of any length).

        A linear schedule is monotone up to ramp_steps and constant after, so its smallest rate
        is at step 0 or at the last step of the ramp that the run reaches.
        """
        if num_steps is not None and num_steps < 1:
            raise ValueError(f"num_steps={num_steps} must be >= 1 or None")
        if self.kind == "constant":
            return 0, self.rate(0)
        last = self.ramp_steps if num_steps is None else min(num_steps - 1, self.ramp_steps)
        return min(((0, self.rate(0)), (last, self.rate(last))), key=lambda t_q: t_q[1])

    def steps_per_pass(self) -> int:
        """Fewest steps n with sum_{t<n} q_t >= 1: one expected pass.

        Each unit is drawn once on average. For a constant schedule this is ceil(1 / q).
        """
        one = 1.0 - _PASS_TOLERANCE
        if self.kind == "constant":
            return max(1, math.ceil(one / float(self.sample_rate)))  # type: ignore[arg-type]
        start, end, ramp = float(self.start_rate), float(self.end_rate), self.ramp_steps  # type: ignore[arg-type]

        def ramp_sum(n: int) -> float:  # sum_{t<n} q_t for n <= ramp: arithmetic series
            return n * start + (end - start) / ramp * n * (n - 1) / 2

        if ramp_sum(ramp) < one:
            return ramp + math.ceil((one - ramp_sum(ramp)) / end)
        lo, hi = 1, ramp  # smallest n in [1, ramp] with ramp_sum(n) >= one (monotone in n)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if ramp_sum(mid) >= one else (mid + 1, hi)
        return lo

    def describe(self) -> dict[str, Any]:
        if self.kind == "constant":
            return {"kind": "constant", "sample_rate": self.sample_rate}
        return {
            "kind": "linear",
            "start_rate": self.start_rate,
            "end_rate": self.end_rate,
            "ramp_steps": self.ramp_steps,
        }


class PoissonBatch(list):
    """Unit indices of one step (this rank's shard), with the step index and the global q_t."""

    def __init__(self, indices: Any = (), *, step: int = 0, sample_rate: float = 1.0) -> None:
        super().__init__(indices)
        self.step = int(step)
        self.sample_rate = float(sample_rate)

    def __reduce__(self):  # DataLoader workers receive batches pickled: keep step and q
        return (_rebuild_batch, (list(self), self.step, self.sample_rate))

    def __repr__(self) -> str:
        return f"PoissonBatch(step={self.step}, sample_rate={self.sample_rate:g}, {list(self)!r})"


def _rebuild_batch(indices: list[int], step: int, sample_rate: float) -> PoissonBatch:
    return PoissonBatch(indices, step=step, sample_rate=sample_rate)


def _step_seed(seed: int, step: int) -> int:
    """63-bit generator seed of (seed, step); a hash, so no two (seed, step) pairs share it."""
    digest = hashlib.blake2b(
        f"lit_dp.poisson:{int(seed)}:{int(step)}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "little") >> 1


_UNIFORM_BITS = 53  # uniform integers in [0, 2^53): exact in int64 and in float64 arithmetic


def inclusion_thresholds(sample_rate: float, *, bits: int = _UNIFORM_BITS) -> tuple[int, int]:
    """Integer thresholds ``(whole, tie)`` of the exact Bernoulli(q) draw of :func:`poisson_draw`.

    ``q * 2^bits = whole + tie / 2^bits + r`` with integers whole, tie in [0, 2^bits). A unit is
    in when its first uniform integer U in [0, 2^bits) is below ``whole``, or equals it
    (probability 2^-bits) and a second uniform integer is below ``tie``, so the realized
    inclusion probability is whole / 2^bits + tie / 4^bits = q - r / 2^bits. Every step is exact
    in float64 (scaling by a power of two, taking the integer part), and r = 0 for every float64
    q >= 2^-54 with bits=53: the realized probability is exactly the accounted q (a float32
    ``rand() < q`` realizes ceil(q 2^24) / 2^24 instead, 1.3 % high at q = 1e-6). Below 2^-54,
    r > 0: the realized rate is lower than q, never higher, by less than 2^-106.
    """
    scaled = float(sample_rate) * 2.0**bits
    whole = math.floor(scaled)
    return whole, math.floor((scaled - whole) * 2.0**bits)


def bernoulli_draw(
    num_units: int, sample_rate: float, *, generator: torch.Generator, bits: int = _UNIFORM_BITS
) -> torch.Tensor:
    """(num_units,) bool: independent Bernoulli(q) with realized probability exactly q.

    See :func:`inclusion_thresholds`; drawn from ``generator`` on the CPU.
    """
    whole, tie = inclusion_thresholds(sample_rate, bits=bits)
    u = torch.randint(0, 2**bits, (num_units,), generator=generator, dtype=torch.int64)
    keep = u < whole
    if tie:
        # The second draw only for units exactly at the threshold (probability 2^-bits each): its
        # length is a function of the first draw, so the whole draw stays a function of the seed.
        at = torch.nonzero(u == whole).flatten()
        if at.numel():
            v = torch.randint(0, 2**bits, (at.numel(),), generator=generator, dtype=torch.int64)
            keep[at[v < tie]] = True
    return keep


def poisson_draw(num_units: int, sample_rate: float, *, seed: int, step: int) -> torch.Tensor:
    """Sorted indices (int64) of the units in step ``step``'s batch.

    Independent Bernoulli(q) per unit, with realized probability exactly q, from a CPU generator
    seeded by (seed, step).
    """
    gen = torch.Generator().manual_seed(_step_seed(seed, step))
    return torch.nonzero(bernoulli_draw(num_units, sample_rate, generator=gen)).flatten()


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    return value


class PoissonBatchSampler:
    """Batch sampler (``DataLoader(batch_sampler=...)``) yielding one ``PoissonBatch`` per step.

    See the module docstring for the resume contract.

    Args:
        num_units: N, privacy units in the (global) training set.
        schedule: global sample rate q_t per step.
        seed: sampling seed; the same on every rank (checkpointed by ``state_dict``).
        steps_per_epoch: batches per ``__iter__``; default ``schedule.steps_per_pass()``
            (one expected pass over the data, ceil(1 / q) for a constant q).
        rank: this process's rank; it keeps sampled units with ``index % world_size == rank``.
        world_size: number of processes sharing the global draw.
        step_source: returns the index of the next step to train (e.g. the trainer's
            global_step); when set, each ``__iter__`` starts there.
    """

    def __init__(
        self,
        num_units: int,
        schedule: SampleRateSchedule,
        *,
        seed: int,
        steps_per_epoch: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        step_source: Callable[[], int] | None = None,
    ) -> None:
        _check_int("num_units", num_units, 1)
        if not isinstance(schedule, SampleRateSchedule):
            raise ValueError(
                f"schedule must be a SampleRateSchedule, got {type(schedule).__name__}"
            )
        _check_int("seed", seed, -(2**63))
        if steps_per_epoch is not None:
            _check_int("steps_per_epoch", steps_per_epoch, 1)
        _check_int("world_size", world_size, 1)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank!r} must be in [0, world_size={world_size})")
        self.num_units, self.schedule, self.seed = num_units, schedule, seed
        self.steps_per_epoch = steps_per_epoch or schedule.steps_per_pass()
        self.rank, self.world_size = rank, world_size
        self.step_source = step_source
        self.next_step = 0  # without a step source: the step of the next batch to yield

    def __len__(self) -> int:
        return self.steps_per_epoch

    def batch(self, step: int) -> PoissonBatch:
        """This rank's batch of ``step`` (a pure function of seed, step, rank, world_size)."""
        q = self.schedule.rate(step)
        drawn = poisson_draw(self.num_units, q, seed=self.seed, step=step)
        if self.world_size > 1:
            drawn = drawn[drawn % self.world_size == self.rank]
        return PoissonBatch(drawn.tolist(), step=step, sample_rate=q)

    def __iter__(self) -> Iterator[PoissonBatch]:
        start = int(self.step_source()) if self.step_source is not None else self.next_step
        for step in range(start, start + self.steps_per_epoch):
            self.next_step = step + 1
            yield self.batch(step)

    def state_dict(self) -> dict[str, int]:
        step = int(self.step_source()) if self.step_source is not None else self.next_step
        return {"seed": self.seed, "next_step": step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.next_step = int(state["seed"]), int(state["next_step"])
