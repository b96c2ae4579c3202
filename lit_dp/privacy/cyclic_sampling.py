"""Cyclic Poisson sampling: the participation rule that amplified banded MF needs.

The N privacy units are split into b fixed groups; step t Poisson-samples only from group
t mod b, each of its units independently with the group rate b q_t, so the expected batch is
still q_t N and a unit takes part at most once in every b consecutive steps (its steps are
congruent mod b). ``b = 1`` is ``PoissonBatchSampler``'s draw, bit for bit.

Groups. Each unit's group is drawn i.i.d. uniform in [0, b) from the sampling seed, once for
the run: adding or removing one unit leaves every other unit's group distribution unchanged,
so the add/remove neighbouring relation of the accountant holds (an assignment by position,
index mod b, would move every later unit to another group when one unit is removed). Like the
sampling seed, the assignment is operator-side: it is a function of the seed, which the
checkpoint holds, so a resumed run has the same groups.

Resume contract: that of ``lit_dp.privacy.sampling``: the batch of step t is a pure function of
(seed, t) and each epoch starts at the trainer's global step.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from lit_dp.privacy.bandmf import group_sample_rate
from lit_dp.privacy.sampling import (
    PoissonBatch,
    PoissonBatchSampler,
    _step_seed,
    bernoulli_draw,
    poisson_draw,
)

__all__ = ["CyclicPoissonBatchSampler", "cyclic_draw", "unit_groups"]


def _groups_seed(seed: int, bands: int) -> int:
    digest = hashlib.blake2b(f"lit_dp.groups:{int(seed)}:{int(bands)}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


def unit_groups(num_units: int, *, bands: int, seed: int) -> torch.Tensor:
    """(num_units,) int64: each unit's group, i.i.d. uniform in [0, bands), from ``seed``."""
    gen = torch.Generator().manual_seed(_groups_seed(seed, bands))
    return torch.randint(0, bands, (num_units,), generator=gen, dtype=torch.int64)


def cyclic_draw(
    sample_rate: float, *, groups: torch.Tensor, bands: int, seed: int, step: int
) -> torch.Tensor:
    """Sorted indices (int64) of step ``step``'s batch: group step mod b at rate b q.

    Args:
        sample_rate: q_t, the marginal rate (E[B_t] = q_t N); b q_t must be <= 1.
        groups: ``unit_groups(N, bands=b, seed=seed)``.
        bands: b >= 1.
        seed: the sampling seed.
        step: the optimizer step.
    """
    rate = group_sample_rate(sample_rate, bands)
    if bands == 1:
        return poisson_draw(groups.numel(), rate, seed=seed, step=step)
    gen = torch.Generator().manual_seed(_step_seed(seed, step))
    keep = bernoulli_draw(groups.numel(), rate, generator=gen) & (groups == step % bands)
    return torch.nonzero(keep).flatten()


class CyclicPoissonBatchSampler(PoissonBatchSampler):
    """``PoissonBatchSampler`` under cyclic participation with ``bands`` groups.

    Batches carry the marginal rate q_t as ``sample_rate`` (the divisor q_t N of the step is
    unchanged); the accountant charges the group rate through the noise mechanism.

    Args:
        num_units, schedule, seed, steps_per_epoch, rank, world_size, step_source: as
            ``PoissonBatchSampler``.
        bands: b >= 1, the number of groups (the noise mechanism's bands).
    """

    def __init__(self, *args: Any, bands: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(bands, bool) or not isinstance(bands, int) or bands < 1:
            raise ValueError(f"bands={bands!r} must be an integer >= 1")
        self.bands = bands
        self._groups: torch.Tensor | None = None
        self._groups_key: tuple[int, int] | None = None

    def groups(self) -> torch.Tensor:
        """Every unit's group (recomputed when the seed changes, e.g. on load_state_dict)."""
        key = (self.seed, self.bands)
        if self._groups is None or self._groups_key != key:
            self._groups = unit_groups(self.num_units, bands=self.bands, seed=self.seed)
            self._groups_key = key
        return self._groups

    def batch(self, step: int) -> PoissonBatch:
        q = self.schedule.rate(step)
        drawn = cyclic_draw(q, groups=self.groups(), bands=self.bands, seed=self.seed, step=step)
        if self.world_size > 1:
            drawn = drawn[drawn % self.world_size == self.rank]
        return PoissonBatch(drawn.tolist(), step=step, sample_rate=q)
