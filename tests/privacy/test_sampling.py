"""Poisson sampling: inclusion frequency, empty batches, schedules, rank shards, resume, args."""

from __future__ import annotations

import itertools
import math
import pickle
from fractions import Fraction

import pytest
import torch

from lit_dp.privacy.sampling import (
    PoissonBatch,
    PoissonBatchSampler,
    SampleRateSchedule,
    bernoulli_draw,
    inclusion_thresholds,
    poisson_draw,
)


def const(q):
    return SampleRateSchedule.constant(q)


@pytest.mark.parametrize("q", [0.05, 0.3], ids=["q0.05", "q0.3"])
def test_inclusion_frequency_matches_q(q):
    n, steps = 200, 400
    counts = torch.zeros(n)
    for t in range(steps):
        counts[poisson_draw(n, q, seed=7, step=t)] += 1
    # Overall: n * steps Bernoulli(q) trials; 5 sigma tolerance.
    total = n * steps
    assert abs(counts.sum().item() - total * q) < 5 * math.sqrt(total * q * (1 - q))
    # Per unit: Binomial(steps, q); every one of the 200 units within 6 sigma.
    assert (counts - steps * q).abs().max().item() < 6 * math.sqrt(steps * q * (1 - q))


@pytest.mark.parametrize(
    "q",
    [1e-6, 0.3, 0.123456789, 2.0**-54, 1.0],
    ids=["q1e-6", "q0.3", "q-irregular", "q2^-54", "q1"],
)
def test_realized_inclusion_probability_equals_the_accounted_rate(q):
    """The draw includes a unit when U < whole, or U == whole and V < tie (U, V uniform integers
    in [0, 2^53)): its probability, in exact rational arithmetic, is the float64 q itself."""
    whole, tie = inclusion_thresholds(q)
    realized = Fraction(whole, 2**53) + Fraction(1, 2**53) * Fraction(tie, 2**53)
    assert realized == Fraction(q)


def test_float32_threshold_would_overstate_the_rate_at_1e_6():
    """What the exact draw fixes: a float32 rand() < q realizes ceil(q 2^24) / 2^24."""
    q = 1e-6
    assert Fraction(math.ceil(Fraction(q) * 2**24), 2**24) / Fraction(q) > 1.01


def test_two_stage_draw_realizes_the_exact_rate():
    """With 4-bit uniforms, q = 77/256 needs the tie draw: P = 4/16 + (1/16)(13/16) = 77/256.
    A one-stage rule would give 4/16 or 5/16; 400k draws tell them apart by > 15 sigma."""
    q, n = 77 / 256, 400_000
    assert inclusion_thresholds(q, bits=4) == (4, 13)
    gen = torch.Generator().manual_seed(0)
    rate = bernoulli_draw(n, q, generator=gen, bits=4).double().mean().item()
    assert abs(rate - q) < 5 * math.sqrt(q * (1 - q) / n)


def test_batch_sizes_are_binomial_not_fixed():
    n, q, steps = 100, 0.2, 300
    sizes = torch.tensor(
        [len(b) for b in PoissonBatchSampler(n, const(q), seed=1, steps_per_epoch=steps)],
        dtype=torch.float64,
    )
    # Binomial(100, 0.2): mean 20, variance 16. A shuffled fixed-size sampler has variance 0.
    assert abs(sizes.mean().item() - n * q) < 5 * math.sqrt(n * q * (1 - q) / steps)
    assert 16 * 0.6 < sizes.var().item() < 16 * 1.6


def test_draw_is_pure_function_of_seed_and_step():
    a = poisson_draw(100, 0.2, seed=3, step=5)
    assert torch.equal(a, poisson_draw(100, 0.2, seed=3, step=5))
    assert not torch.equal(a, poisson_draw(100, 0.2, seed=3, step=6))
    assert not torch.equal(a, poisson_draw(100, 0.2, seed=4, step=5))
    assert a.dtype == torch.long and torch.equal(a, a.sort().values)


def test_tiny_rate_yields_empty_batches():
    sampler = PoissonBatchSampler(10, const(1e-4), seed=0, steps_per_epoch=50)
    batches = list(sampler)
    assert len(batches) == 50  # empty batches are yielded, never skipped
    assert all(isinstance(b, PoissonBatch) for b in batches)
    assert sum(len(b) == 0 for b in batches) >= 45  # P(non-empty) ~ 1e-3 per step
    assert [b.step for b in batches] == list(range(50))
    assert all(b.sample_rate == pytest.approx(1e-4) for b in batches)


def test_full_rate_includes_everyone():
    sampler = PoissonBatchSampler(17, const(1.0), seed=1)
    assert len(sampler) == 1
    (batch,) = list(sampler)
    assert list(batch) == list(range(17))


def test_linear_schedule_rates():
    s = SampleRateSchedule.linear(start_rate=0.1, end_rate=0.5, ramp_steps=4)
    assert s.rates(7) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.5], abs=1e-12)
    assert s.describe() == {"kind": "linear", "start_rate": 0.1, "end_rate": 0.5, "ramp_steps": 4}
    down = SampleRateSchedule("linear", start_rate=0.4, end_rate=0.2, ramp_steps=2)
    assert down.rates(4) == pytest.approx([0.4, 0.3, 0.2, 0.2], abs=1e-12)
    c = const(0.25)
    assert c.rates(3) == [0.25, 0.25, 0.25]
    assert c.describe() == {"kind": "constant", "sample_rate": 0.25}
    sampler = PoissonBatchSampler(50, s, seed=0, steps_per_epoch=6)
    assert [b.sample_rate for b in sampler] == pytest.approx(s.rates(6), abs=1e-12)
    with pytest.raises(ValueError, match="step"):
        s.rate(-1)


def _one_pass_reference(schedule):
    # Independent reference: walk the per-step rates until their sum reaches 1.
    total = 0.0
    for t in itertools.count():
        total += schedule.rate(t)
        if total >= 1 - 1e-9:
            return t + 1
    raise AssertionError("unreachable: itertools.count() never ends")


@pytest.mark.parametrize(
    "schedule",
    [
        const(0.03),
        const(0.1),
        const(1 / 3),
        const(1.0),
        SampleRateSchedule.linear(start_rate=0.1, end_rate=0.5, ramp_steps=4),
        SampleRateSchedule.linear(start_rate=0.01, end_rate=0.02, ramp_steps=10),
        SampleRateSchedule.linear(start_rate=0.3, end_rate=0.01, ramp_steps=1000),
        SampleRateSchedule.linear(start_rate=0.001, end_rate=0.9, ramp_steps=500),
    ],
    ids=["c0.03", "c0.1", "c1/3", "c1", "lin-short", "lin-past-ramp", "lin-down", "lin-long"],
)
def test_default_steps_per_epoch_is_one_expected_pass(schedule):
    expected = _one_pass_reference(schedule)
    assert schedule.steps_per_pass() == expected
    assert len(PoissonBatchSampler(100, schedule, seed=0)) == expected


def test_constant_steps_per_pass_is_ceil_inverse_rate():
    assert const(0.03).steps_per_pass() == 34
    assert const(0.1).steps_per_pass() == 10  # not 11: float sums of 0.1 fall just short of 1


@pytest.mark.parametrize("world", [2, 3], ids=["world2", "world3"])
@pytest.mark.parametrize("step", [0, 3, 11], ids=["step0", "step3", "step11"])
def test_rank_shards_disjoint_and_cover_global_draw(step, world):
    sched = const(0.3)

    def batch(rank, world_size):
        s = PoissonBatchSampler(
            101, sched, seed=5, rank=rank, world_size=world_size, steps_per_epoch=1
        )
        s.next_step = step
        (b,) = list(s)
        assert b.step == step and b.sample_rate == 0.3  # the GLOBAL q on every rank
        return list(b)

    full = batch(0, 1)
    shards = [batch(r, world) for r in range(world)]
    assert full  # q=0.3 of 101 units: empty has negligible probability
    for a, b in itertools.combinations(shards, 2):
        assert set(a).isdisjoint(b)
    assert sorted(itertools.chain(*shards)) == full
    for r, shard in enumerate(shards):
        assert all(i % world == r for i in shard)


def _triples(batches):
    return [(b.step, b.sample_rate, list(b)) for b in batches]


def test_state_dict_resume_reproduces_remaining_batches():
    sched = SampleRateSchedule.linear(start_rate=0.05, end_rate=0.4, ramp_steps=10)
    ref = _triples(PoissonBatchSampler(64, sched, seed=9, steps_per_epoch=20))
    run = PoissonBatchSampler(64, sched, seed=9, steps_per_epoch=20)
    it = iter(run)
    consumed = [next(it) for _ in range(7)]
    state = run.state_dict()
    assert state == {"seed": 9, "next_step": 7}
    resumed = PoissonBatchSampler(64, sched, seed=0, steps_per_epoch=13)
    resumed.load_state_dict(state)
    assert _triples(consumed) + _triples(resumed) == ref
    # Epochs continue the global step: the next __iter__ starts where the last one ended.
    assert [b.step for b in resumed] == list(range(20, 33))


def test_prefetching_consumer_resumes_exactly_with_a_step_source():
    """A loader that prefetches batches ahead must not shift a resumed run: the training side
    owns the step counter (here ``done``, in Lightning the trainer's global_step)."""
    sched = const(0.2)
    ref = _triples(PoissonBatchSampler(50, sched, seed=3, steps_per_epoch=12))
    done = {"steps": 0}
    run = PoissonBatchSampler(
        50, sched, seed=3, steps_per_epoch=12, step_source=lambda: done["steps"]
    )
    it = iter(run)
    prefetched = [next(it) for _ in range(4)]  # the loader is 3 batches ahead of training
    got = []
    for b in prefetched[:1]:
        got.append(b)
        done["steps"] += 1
    assert run.next_step == 4  # the sampler yielded 4 ...
    state = run.state_dict()
    assert state == {"seed": 3, "next_step": 1}  # ... but the checkpoint says 1 step was taken
    # Crash; a fresh sampler in a fresh process, its step source restored with the checkpoint.
    resumed = PoissonBatchSampler(
        50, sched, seed=99, steps_per_epoch=11, step_source=lambda: state["next_step"]
    )
    resumed.load_state_dict(state)
    assert _triples(got) + _triples(resumed) == ref


def test_poisson_batch_pickles_with_step_and_rate():
    b = PoissonBatch([3, 1, 4], step=12, sample_rate=0.25)
    c = pickle.loads(pickle.dumps(b))
    assert isinstance(c, PoissonBatch) and list(c) == [3, 1, 4]
    assert (c.step, c.sample_rate) == (12, 0.25)
    assert "step=12" in repr(b)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": -0.1}, "sample_rate"),
        ({"sample_rate": float("nan")}, "sample_rate"),
        ({}, "sample_rate"),
        ({"kind": "cosine", "sample_rate": 0.1}, "kind"),
        ({"sample_rate": 0.1, "end_rate": 0.2}, "end_rate"),
        ({"kind": "linear", "end_rate": 0.5, "ramp_steps": 5}, "start_rate"),
        ({"kind": "linear", "start_rate": 0.1, "ramp_steps": 5}, "end_rate"),
        ({"kind": "linear", "start_rate": 0.1, "end_rate": 1.5, "ramp_steps": 5}, "end_rate"),
        ({"kind": "linear", "start_rate": 0.1, "end_rate": 0.5, "ramp_steps": 0}, "ramp_steps"),
        ({"kind": "linear", "start_rate": 0.1, "end_rate": 0.5, "ramp_steps": 2.5}, "ramp_steps"),
        (
            {
                "kind": "linear",
                "sample_rate": 0.1,
                "start_rate": 0.1,
                "end_rate": 0.5,
                "ramp_steps": 2,
            },
            "sample_rate",
        ),
    ],
    ids=[
        "rate-gt-1",
        "rate-zero",
        "rate-negative",
        "rate-nan",
        "rate-missing",
        "bad-kind",
        "constant-with-end",
        "linear-no-start",
        "linear-no-end",
        "linear-end-gt-1",
        "linear-no-ramp",
        "linear-fractional-ramp",
        "linear-with-sample-rate",
    ],
)
def test_schedule_bad_args(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SampleRateSchedule(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_units": 0}, "num_units"),
        ({"num_units": 2.5}, "num_units"),
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"rank": -1, "world_size": 2}, "rank"),
        ({"world_size": 0}, "world_size"),
        ({"steps_per_epoch": 0}, "steps_per_epoch"),
        ({"seed": 1.5}, "seed"),
        ({"schedule": 0.1}, "schedule"),
    ],
    ids=[
        "no-units",
        "fractional-units",
        "rank-eq-world",
        "rank-negative",
        "world-zero",
        "steps-zero",
        "float-seed",
        "rate-not-schedule",
    ],
)
def test_sampler_bad_args(kwargs, field):
    args = {"num_units": 10, "schedule": const(0.1), "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=field):
        PoissonBatchSampler(**args)
