"""Poisson sampling: inclusion frequency, empty batches, schedules, rank shards, resume, args."""

from __future__ import annotations

import math

import pytest
import torch

from lit_dp.privacy.sampling import (
    PoissonBatch,
    PoissonBatchSampler,
    SampleRateSchedule,
    poisson_draw,
)


@pytest.mark.parametrize("q", [0.05, 0.3], ids=["q0.05", "q0.3"])
def test_inclusion_frequency_matches_q(q):
    n, steps = 200, 400
    counts = torch.zeros(n)
    for t in range(steps):
        counts[poisson_draw(n, q, seed=7, step=t)] += 1
    # Overall frequency: n * steps Bernoulli(q) trials; 5 sigma tolerance.
    total = n * steps
    sigma = math.sqrt(total * q * (1 - q))
    assert abs(counts.sum().item() - total * q) < 5 * sigma
    # Per unit: Binomial(steps, q); every unit within 6 sigma (n=200 units).
    unit_sigma = math.sqrt(steps * q * (1 - q))
    assert (counts - steps * q).abs().max().item() < 6 * unit_sigma


def test_draw_is_pure_function_of_seed_and_step():
    a = poisson_draw(100, 0.2, seed=3, step=5)
    assert torch.equal(a, poisson_draw(100, 0.2, seed=3, step=5))
    assert not torch.equal(a, poisson_draw(100, 0.2, seed=3, step=6))
    assert not torch.equal(a, poisson_draw(100, 0.2, seed=4, step=5))


def test_tiny_rate_yields_empty_batches():
    sched = SampleRateSchedule("constant", 1e-4)
    sampler = PoissonBatchSampler(10, sched, seed=0, steps_per_epoch=50)
    batches = list(sampler)
    assert len(batches) == 50
    assert all(isinstance(b, PoissonBatch) for b in batches)
    assert sum(len(b) == 0 for b in batches) >= 45  # P(nonempty) ~ 1e-3 per step
    assert [b.step for b in batches] == list(range(50))
    assert all(b.sample_rate == pytest.approx(1e-4) for b in batches)


def test_full_rate_includes_everyone():
    sampler = PoissonBatchSampler(17, SampleRateSchedule("constant", 1.0), seed=1)
    assert len(sampler) == 1
    (batch,) = list(sampler)
    assert list(batch) == list(range(17))


def test_linear_schedule_rates():
    s = SampleRateSchedule("linear", 0.1, end_rate=0.5, ramp_steps=4)
    assert s.rates(7) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.5], abs=1e-12)
    assert s.describe() == {"kind": "linear", "sample_rate": 0.1, "end_rate": 0.5, "ramp_steps": 4}
    c = SampleRateSchedule("constant", 0.25)
    assert c.rates(3) == [0.25, 0.25, 0.25]
    sampler = PoissonBatchSampler(50, s, seed=0, steps_per_epoch=6)
    assert [b.sample_rate for b in sampler] == pytest.approx(s.rates(6), abs=1e-12)


def test_default_steps_per_epoch_is_one_expected_pass():
    assert len(PoissonBatchSampler(100, SampleRateSchedule("constant", 0.03), seed=0)) == 34


@pytest.mark.parametrize("step", [0, 3, 11], ids=["step0", "step3", "step11"])
def test_rank_shards_disjoint_and_cover_global_draw(step):
    sched = SampleRateSchedule("constant", 0.3)
    def batch(rank, world):
        s = PoissonBatchSampler(101, sched, seed=5, rank=rank, world_size=world, steps_per_epoch=1)
        s.next_step = step
        (b,) = list(s)
        assert b.step == step
        return list(b)
    full = batch(0, 1)
    r0, r1 = batch(0, 2), batch(1, 2)
    assert full  # q=0.3 of 101 units: empty has negligible probability
    assert set(r0).isdisjoint(r1)
    assert sorted(r0 + r1) == sorted(full)
    assert all(i % 2 == 0 for i in r0) and all(i % 2 == 1 for i in r1)


def test_resume_from_next_step_reproduces_uninterrupted_run():
    sched = SampleRateSchedule("linear", 0.05, end_rate=0.4, ramp_steps=10)
    full = PoissonBatchSampler(64, sched, seed=9, steps_per_epoch=20)
    ref = [(b.step, b.sample_rate, list(b)) for b in full]
    assert full.state_dict() == {"seed": 9, "next_step": 20}
    k = 7
    resumed = PoissonBatchSampler(64, sched, seed=0, steps_per_epoch=13)
    resumed.load_state_dict({"seed": 9, "next_step": k})
    got = [(b.step, b.sample_rate, list(b)) for b in resumed]
    assert got == ref[k:]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": -0.1}, "sample_rate"),
        ({"kind": "cosine"}, "schedule"),
        ({"kind": "linear", "ramp_steps": 5}, "end_rate"),
        ({"kind": "linear", "end_rate": 1.5, "ramp_steps": 5}, "end_rate"),
        ({"kind": "linear", "end_rate": 0.5, "ramp_steps": 0}, "ramp_steps"),
    ],
    ids=["rate-gt-1", "rate-zero", "rate-negative", "bad-kind", "linear-no-end",
         "linear-end-gt-1", "linear-no-ramp"],
)
def test_schedule_bad_args(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SampleRateSchedule(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_units": 0}, "num_units"),
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"rank": -1, "world_size": 2}, "rank"),
    ],
    ids=["no-units", "rank-eq-world", "rank-negative"],
)
def test_sampler_bad_args(kwargs, field):
    args = {"num_units": 10, "schedule": SampleRateSchedule(), "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=field):
        PoissonBatchSampler(**args)
