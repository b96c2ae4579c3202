"""What the clip-bound estimator implies before training, in ``lit-dp plan`` and at fit's setup:
HistoryPercentile is announced as not covered by epsilon, and a private quantile whose batch
ramp later falls too low for its count noise is refused up front, not at the step it fails."""

from __future__ import annotations

import re

import pytest
from module_helpers import make_module, make_trainer
from shipped_configs import TINY

from lit_dp.commands import main
from lit_dp.data import LinearBatchSizeRamp, SyntheticDataModule
from lit_dp.models import tiny_tokenizer
from lit_dp.privacy.clipping import PrivateQuantile, check_smallest_batch
from lit_dp.privacy.sampling import SampleRateSchedule

RAMP_DOWN = [
    "--model.clipping", "lit_dp.privacy.clipping.PrivateQuantile",
    "--model.noise_multiplier", "1.0",
    "--data.init_args.batch_schedule", "lit_dp.data.LinearBatchSizeRamp",
    "--data.init_args.batch_schedule.init_args.start", "64",
    "--data.init_args.batch_schedule.init_args.end", "4",
    "--data.init_args.batch_schedule.init_args.ramp_steps", "10",
]  # fmt: skip


def test_plan_announces_history_percentile_first(capsys):
    main(
        ["plan", "--config", TINY, "--model.clipping", "lit_dp.privacy.clipping.HistoryPercentile"]
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:2] == ["NOT", "COVERED"]  # the first row, before any epsilon
    assert "HistoryPercentile" in lines[1] and "does NOT cover the weights" in lines[1]
    main(["plan", "--config", TINY])  # FixedClip: nothing to announce
    assert "NOT COVERED" not in capsys.readouterr().out


def test_plan_refuses_a_ramp_whose_later_batches_are_too_small(capsys):
    # E[B] 64 -> 4 over 10 steps at sigma = 1: the count noise std E[B] / 20 must exceed 0.5,
    # i.e. E[B] > 10; step 0 passes, steps 9 on do not.
    with pytest.raises(SystemExit):  # the CLI's one-line error (test_cli_messages.py)
        main(["plan", "--config", TINY, *RAMP_DOWN, "--trainer.max_steps", "30"])
    assert re.search(r"falls to 4 at step 10 .*raise its end batch size", capsys.readouterr().err)
    # A run that ends while the batch is still large enough is planned as before.
    main(["plan", "--config", TINY, *RAMP_DOWN, "--trainer.max_steps", "5"])
    assert "quantile count noise std" in capsys.readouterr().out


def test_fit_refuses_a_decreasing_ramp_at_setup(tmp_path):
    dm = SyntheticDataModule(
        tokenizer=tiny_tokenizer(),
        num_train=64,
        num_val=0,
        num_test=0,
        max_length=512,
        batch_schedule=LinearBatchSizeRamp(start=40, end=4, ramp_steps=6),
        sampling_seed=0,
    )
    module = make_module(clipping="private_quantile", noise_multiplier=1.0)
    trainer = make_trainer(tmp_path, max_steps=8)
    with pytest.raises(ValueError, match=r"falls to 4 at step 6 .*count_noise_divisor"):
        trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 0  # refused before the first step, not at step 5


@pytest.mark.parametrize(
    ("steps", "smallest"),
    [(None, (6, 0.1)), (100, (6, 0.1)), (4, (3, 0.55)), (1, (0, 1.0))],
    ids=["unbounded", "past-the-ramp", "mid-ramp", "one-step"],
)
def test_smallest_rate_of_a_decreasing_ramp(steps, smallest):
    """Reference: the minimum of the rates of every planned step (a long run for None)."""
    schedule = SampleRateSchedule.linear(start_rate=1.0, end_rate=0.1, ramp_steps=6)
    step, rate = schedule.smallest_rate(steps)
    rates = schedule.rates(steps or 1000)
    assert rate == pytest.approx(min(rates), rel=1e-12) and rates[step] == rate
    assert (step, rate) == (smallest[0], pytest.approx(smallest[1]))
    rising = SampleRateSchedule.linear(start_rate=0.1, end_rate=1.0, ramp_steps=6)
    assert rising.smallest_rate(steps) == (0, 0.1)


def test_check_smallest_batch_of_a_constant_schedule_is_the_step_0_check():
    clip = PrivateQuantile()
    check_smallest_batch(
        clip,
        noise_multiplier=1.0,
        schedule=SampleRateSchedule.constant(0.5),
        num_units=40,
        num_steps=None,
    )  # E[B] = 20 > 10
    with pytest.raises(ValueError, match="too small for private quantile"):
        check_smallest_batch(
            clip,
            noise_multiplier=1.0,
            schedule=SampleRateSchedule.constant(0.2),
            num_units=40,
            num_steps=None,
        )  # E[B] = 8 < 10
