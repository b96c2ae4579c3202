"""Poisson sampling of privacy units, with per-step sample-rate schedules.

The RDP accountant assumes Poisson subsampling: every unit is in the batch of step t
independently with probability q_t, so batch sizes vary and a batch may be empty. The draw for
step t is a pure function of (seed, t): every DDP rank computes the same global draw and keeps
its own shard, and a resumed run reproduces the batches of an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SampleRateSchedule:
    """q_t per step: "constant" (sample_rate) or "linear" (start_rate -> end_rate over ramp_steps).

    Rates are global inclusion probabilities in (0, 1].
    """

    kind: str = "constant"
    sample_rate: float = 0.01
    end_rate: float | None = None
    ramp_steps: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "linear"):
            raise ValueError(f"schedule={self.kind!r} must be 'constant' or 'linear'")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate={self.sample_rate} must be in (0, 1]; lower expected_batch_size")
        if self.kind == "linear":
            if self.end_rate is None or not 0.0 < self.end_rate <= 1.0:
                raise ValueError(f"end_rate={self.end_rate} must be in (0, 1] for a linear schedule")
            if self.ramp_steps < 1:
                raise ValueError(f"ramp_steps={self.ramp_steps} must be >= 1 for a linear schedule")

    def rate(self, step: int) -> float:
        if self.kind == "constant" or step >= self.ramp_steps:
            return self.sample_rate if self.kind == "constant" else float(self.end_rate)
        frac = step / self.ramp_steps
        return self.sample_rate + frac * (float(self.end_rate) - self.sample_rate)

    def rates(self, num_steps: int) -> list[float]:
        return [self.rate(t) for t in range(num_steps)]

    def describe(self) -> dict:
        return {"kind": self.kind, "sample_rate": self.sample_rate, "end_rate": self.end_rate,
                "ramp_steps": self.ramp_steps}


class PoissonBatch(list):
    """Unit indices of one step (this rank's shard) with the step index and global q_t."""

    def __init__(self, indices: list[int], *, step: int, sample_rate: float) -> None:
        super().__init__(indices)
        self.step = step
        self.sample_rate = sample_rate


def poisson_draw(num_units: int, sample_rate: float, *, seed: int, step: int) -> torch.Tensor:
    """Indices of the units included at ``step``: independent Bernoulli(q) from (seed, step)."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63 - 1))
    return torch.nonzero(torch.rand(num_units, generator=gen) < sample_rate).flatten()


class PoissonBatchSampler:
    """Batch sampler yielding ``PoissonBatch`` objects, one per optimizer step.

    Args:
        num_units: N, privacy units in the training set.
        schedule: per-step global sample rate.
        seed: sampling seed (checkpointed).
        steps_per_epoch: batches per epoch (default ceil(1 / q_0): one expected pass).
        rank: this process's rank; it keeps units with index % world_size == rank.
        world_size: number of processes.
    """

    def __init__(self, num_units: int, schedule: SampleRateSchedule, *, seed: int,
                 steps_per_epoch: int | None = None, rank: int = 0, world_size: int = 1) -> None:
        if num_units < 1:
            raise ValueError("num_units must be >= 1: the training set is empty")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.num_units, self.schedule, self.seed = num_units, schedule, int(seed)
        self.steps_per_epoch = steps_per_epoch or max(1, math.ceil(1.0 / schedule.rate(0)))
        self.rank, self.world_size = rank, world_size
        self.next_step = 0  # step of the next batch to yield (resume point)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[PoissonBatch]:
        start = self.next_step
        for step in range(start, start + self.steps_per_epoch):
            q = self.schedule.rate(step)
            drawn = poisson_draw(self.num_units, q, seed=self.seed, step=step)
            mine = drawn[drawn % self.world_size == self.rank].tolist()
            self.next_step = step + 1
            yield PoissonBatch(mine, step=step, sample_rate=q)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "next_step": self.next_step}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.next_step = int(state["seed"]), int(state["next_step"])
