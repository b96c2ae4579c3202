"""``lit-dp plan``: it runs on every shipped config without loading a model or tokenizer, reports
the budget stop and the errors fit would raise, and builds the batch schedule given on the
command line (that the plan equals what fit reports: test_cli.py's end-to-end test)."""

from __future__ import annotations

import pytest
from shipped_configs import CONFIGS, TINY

from lit_dp.commands import main
from lit_dp.plan import format_plan, make_plan, read_config
from lit_dp.privacy.pld_accountant import PLDAccountant


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_plan_works_on_every_config_without_the_model(config, capsys, monkeypatch):
    # The qwen2.5 and bitnet configs name models that are not on this machine: plan never loads
    # the model or its tokenizer (N comes from the records).
    import lit_dp.models

    def no_model(*args, **kwargs):
        raise AssertionError("lit-dp plan loaded a model or tokenizer")

    monkeypatch.setattr(lit_dp.models, "load_model", no_model)
    monkeypatch.setattr(lit_dp.models, "load_tokenizer", no_model)
    main(["plan", "--config", str(config)])
    out = capsys.readouterr().out
    assert out.startswith(f"lit-dp plan: {config}")
    assert "privacy units N" in out and "sample rate q = E[B] / N" in out
    if "private: false" in config.read_text():
        assert "NONE (model.private: false)" in out
    else:
        assert "PLD (this run)" in out and "RDP" in out and "noise std, averaged gradient" in out
        sigma = [float(x) for x in out.split("noise_multiplier sigma")[1].split()[:2]]
        assert sigma[0] < sigma[1]  # PLD needs less noise than RDP for the same budget


def test_plan_reports_the_budget_stop_and_fit_errors(capsys):
    main(
        ["plan", "--config", TINY, "--model.noise_multiplier", "0.8", "--trainer.max_steps", "100"]
    )
    # Independent reference: step a PLD ledger at tiny.yaml's q = 32/256 until epsilon passes 8.
    ledger, steps = PLDAccountant(), 0
    while ledger.peek_epsilon(delta=1e-5, noise_multiplier=0.8, sample_rate=32 / 256) <= 8.0:
        ledger.step(noise_multiplier=0.8, sample_rate=32 / 256)
        steps += 1
    assert 0 < steps < 100
    assert f"budget stop                   after {steps} of 100 steps" in capsys.readouterr().out
    # fit's errors, as the one line `lit-dp plan` ends with (test_cli_messages.py).
    with pytest.raises(SystemExit):
        main(["plan", "--config", TINY, "--privacy.delta", "0.01"])
    assert "lit-dp plan: error: privacy.delta=0.01" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(
            [
                "plan",
                "--config",
                TINY,
                "--model.clipping",
                "lit_dp.privacy.clipping.PrivateQuantile",
                "--data.init_args.batch_schedule.init_args.expected_batch_size",
                "2",
            ]
        )
    assert "too small for private quantile" in capsys.readouterr().err


def test_plan_builds_the_batch_schedule_given_on_the_command_line():
    # A component of the data module (class_path + init_args), as fit builds it: q_t = E[B]_t / N.
    plan = make_plan(read_config([
        "--config", TINY, "--model.clipping", "FixedClip",
        "--data.init_args.batch_schedule", "lit_dp.data.LinearBatchSizeRamp",
        "--data.init_args.batch_schedule.init_args.start", "16",
        "--data.init_args.batch_schedule.init_args.end", "64",
        "--data.init_args.batch_schedule.init_args.ramp_steps", "4",
    ]))  # fmt: skip
    assert plan.num_units == 256
    assert plan.schedule.rates(6) == pytest.approx(
        [0.0625, 0.109375, 0.15625, 0.203125, 0.25, 0.25]
    )
    assert "16 -> 64" in format_plan(plan, "tiny.yaml")
