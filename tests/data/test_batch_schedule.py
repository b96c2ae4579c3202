"""Batch schedules: each class validates its own fields, yields the sample rates q_t = E[B]_t / N
(or the rates given) for N privacy units, and a DataModule builds its default afresh."""

from __future__ import annotations

import math

import pytest
from lightning.pytorch.cli import instantiate_class

from lit_dp.data import (
    BatchSchedule,
    ConstantBatchSize,
    ConstantSampleRate,
    DPDataModule,
    LinearBatchSizeRamp,
    LinearSampleRateRamp,
)
from lit_dp.data.batch_schedule import DEFAULT_EXPECTED_BATCH_SIZE
from lit_dp.models import tiny_tokenizer
from lit_dp.privacy.sampling import SampleRateSchedule


# --- each class validates its own fields ------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: ConstantBatchSize(0), "expected_batch_size"),
        (lambda: ConstantBatchSize(-3.0), "expected_batch_size"),
        (lambda: ConstantBatchSize(float("nan")), "expected_batch_size"),
        (lambda: ConstantBatchSize(math.inf), "expected_batch_size"),
        (lambda: ConstantBatchSize(True), "expected_batch_size"),
        (lambda: ConstantBatchSize("16"), "expected_batch_size"),
        (lambda: ConstantSampleRate(0.0), "sample_rate"),
        (lambda: ConstantSampleRate(1.5), "sample_rate"),
        (lambda: ConstantSampleRate(float("nan")), "sample_rate"),
        (lambda: ConstantSampleRate(True), "sample_rate"),
        (lambda: LinearBatchSizeRamp(start=0, end=8, ramp_steps=4), "start"),
        (lambda: LinearBatchSizeRamp(start=2, end=-1, ramp_steps=4), "end"),
        (lambda: LinearBatchSizeRamp(start=2, end=8, ramp_steps=0), "ramp_steps"),
        (lambda: LinearBatchSizeRamp(start=2, end=8, ramp_steps=2.5), "ramp_steps"),
        (lambda: LinearSampleRateRamp(start_rate=0.0, end_rate=0.2, ramp_steps=4), "start_rate"),
        (lambda: LinearSampleRateRamp(start_rate=0.1, end_rate=1.5, ramp_steps=4), "end_rate"),
        (lambda: LinearSampleRateRamp(start_rate=0.1, end_rate=0.2, ramp_steps=-1), "ramp_steps"),
        (lambda: LinearSampleRateRamp(start_rate=0.1, end_rate=0.2, ramp_steps=True), "ramp_steps"),
    ],
    ids=[
        "ebs-zero",
        "ebs-negative",
        "ebs-nan",
        "ebs-inf",
        "ebs-bool",
        "ebs-str",
        "rate-zero",
        "rate-gt-1",
        "rate-nan",
        "rate-bool",
        "ramp-start-zero",
        "ramp-end-negative",
        "ramp-steps-zero",
        "ramp-steps-float",
        "rate-ramp-start-zero",
        "rate-ramp-end-gt-1",
        "rate-ramp-steps-negative",
        "rate-ramp-steps-bool",
    ],
)
def test_bad_fields_name_the_field(make, field):
    with pytest.raises(ValueError, match=rf"data\.batch_schedule\.{field}=") as exc:
        make()
    assert "must be" in str(exc.value)  # and what a valid value is


@pytest.mark.parametrize(
    ("schedule", "field"),
    [
        (ConstantBatchSize(11), "expected_batch_size"),
        (LinearBatchSizeRamp(start=11, end=2, ramp_steps=3), "start"),
        (LinearBatchSizeRamp(start=2, end=11, ramp_steps=3), "end"),
    ],
    ids=["constant", "ramp-start", "ramp-end"],
)
def test_expected_batch_size_above_n_says_to_lower_it(schedule, field):
    with pytest.raises(
        ValueError, match=rf"{field}=11 exceeds the 10 privacy units; lower it"
    ) as exc:
        schedule.sample_rates(10)
    assert "q = expected batch size / N must be <= 1" in str(exc.value)
    schedule.sample_rates(11)  # E[B] = N is q = 1: allowed


@pytest.mark.parametrize("num_units", [0, -1, 2.5, True])
def test_num_units_must_be_a_positive_integer(num_units):
    with pytest.raises(ValueError, match="num_units"):
        ConstantSampleRate(0.5).sample_rates(num_units)


def test_the_base_is_abstract():
    with pytest.raises(TypeError):
        BatchSchedule()  # type: ignore[abstract]


# --- the rates for N units --------------------------------------------------------------------
def test_constant_batch_size_rate_is_expected_batch_size_over_n():
    s = ConstantBatchSize(12).sample_rates(256)
    assert s == SampleRateSchedule.constant(0.046875)  # 12 / 256
    assert s.rates(3) == [0.046875] * 3
    assert ConstantBatchSize(4).sample_rates(40).rate(0) == pytest.approx(0.1, abs=1e-15)


def test_constant_batch_size_default():
    assert ConstantBatchSize().expected_batch_size == DEFAULT_EXPECTED_BATCH_SIZE == 16.0
    assert ConstantBatchSize().sample_rates(64).rate(0) == 0.25  # 16 / 64


def test_constant_sample_rate_ignores_n():
    for n in (1, 10, 10_000):
        assert ConstantSampleRate(0.3).sample_rates(n) == SampleRateSchedule.constant(0.3)


def test_linear_batch_size_ramp_rates():
    # E[B]: 2, 4, 6, 8, 10 then 10 over N = 20: q = 0.1, 0.2, 0.3, 0.4, 0.5, 0.5.
    s = LinearBatchSizeRamp(start=2, end=10, ramp_steps=4).sample_rates(20)
    assert s == SampleRateSchedule.linear(start_rate=0.1, end_rate=0.5, ramp_steps=4)
    assert s.rates(6) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.5], abs=1e-12)


def test_linear_batch_size_ramp_down():
    s = LinearBatchSizeRamp(start=8, end=2, ramp_steps=2).sample_rates(16)
    assert s.rates(4) == pytest.approx([0.5, 0.3125, 0.125, 0.125], abs=1e-12)  # 8, 5, 2, 2 / 16


def test_linear_sample_rate_ramp_rates():
    s = LinearSampleRateRamp(start_rate=0.4, end_rate=0.2, ramp_steps=2).sample_rates(20)
    assert s == SampleRateSchedule.linear(start_rate=0.4, end_rate=0.2, ramp_steps=2)
    assert s.rates(4) == pytest.approx([0.4, 0.3, 0.2, 0.2], abs=1e-12)


@pytest.mark.parametrize(
    "schedule",
    [
        ConstantBatchSize(12),
        ConstantSampleRate(0.25),
        LinearBatchSizeRamp(start=2, end=8, ramp_steps=5),
        LinearSampleRateRamp(start_rate=0.1, end_rate=0.3, ramp_steps=7),
    ],
    ids=["constant-batch", "constant-rate", "batch-ramp", "rate-ramp"],
)
def test_describe_is_the_config_entry(schedule):
    # describe() is what a config says: building from it gives the same rates.
    desc = schedule.describe()
    assert set(desc) == {"class_path", "init_args"}
    rebuilt = instantiate_class((), desc)
    assert type(rebuilt) is type(schedule) and rebuilt.describe() == desc
    assert rebuilt.sample_rates(32) == schedule.sample_rates(32)
    assert type(schedule).__name__ in repr(schedule)


# --- the DataModule's component ---------------------------------------------------------------
class _DM(DPDataModule):
    def load_records(self):
        return {"train": [{"text": f"record {i}"} for i in range(32)], "validation": [], "test": []}


def test_default_schedules_are_distinct_objects():
    a, b = _DM(tokenizer=tiny_tokenizer()), _DM(tokenizer=tiny_tokenizer())
    assert isinstance(a.batch_schedule, ConstantBatchSize)
    assert a.batch_schedule is not b.batch_schedule
    a.batch_schedule.expected_batch_size = 4.0  # changing one leaves the other at the default
    assert b.batch_schedule.expected_batch_size == DEFAULT_EXPECTED_BATCH_SIZE
    assert a.units_and_schedule()[1].rate(0) == 0.125  # 4 / 32
    assert b.units_and_schedule()[1].rate(0) == 0.5  # 16 / 32


def test_datamodule_uses_the_given_schedule():
    schedule = LinearSampleRateRamp(start_rate=0.5, end_rate=0.25, ramp_steps=1)
    dm = _DM(tokenizer=tiny_tokenizer(), batch_schedule=schedule)
    assert dm.batch_schedule is schedule
    assert dm.units_and_schedule() == (32, schedule.sample_rates(32))
