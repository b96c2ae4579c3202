"""The console during fit: epsilon in the progress bar, no "Epoch 0/-2", ``v_num``, model
summary table or "Seed set to 0"; with the output redirected, one line per validation (step,
epsilon, validation loss), so a long batch job is not silent."""

from __future__ import annotations

import pytest
from shipped_configs import TINY

from lit_dp.callbacks.console import DPRichProgressBar, ValidationLines
from lit_dp.cli import LitDPCLI

ARGS = ["fit", "--config", TINY, "--trainer.max_steps", "4", "--trainer.val_check_interval", "2"]


def test_redirected_output_prints_a_line_per_validation(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    cli = LitDPCLI(args=ARGS)  # pytest's captured stdout is not a terminal
    out, err = capfd.readouterr()
    history = cli.model.val_history  # before (step 0), validations at 2 and 4, after (step 4)
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 2/4", "step 4/4"]
    for line, val in zip(lines, history[1:3], strict=True):
        assert f"val/loss = {val['loss_ema']:.4f} (EMA), {val['loss_raw']:.4f} (raw)" in line
    eps = [float(line.split("epsilon = ")[1].split(",")[0]) for line in lines]
    assert 0 < eps[0] < eps[1] <= 8.0
    assert "privacy/epsilon" in cli.trainer.progress_bar_metrics  # what a bar would show
    for noise in ("Epoch 0/-2", "v_num", "Total params", "┏", "Seed set to"):
        assert noise not in out + err, noise


def test_terminal_bar_shows_epsilon_and_counts_steps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("lit_dp.cli.is_terminal", lambda: True)
    cli = LitDPCLI(args=ARGS)
    trainer = cli.trainer
    bar = trainer.progress_bar_callback
    assert isinstance(bar, DPRichProgressBar)
    assert not any(isinstance(cb, ValidationLines) for cb in trainer.callbacks)
    metrics = bar.get_metrics(trainer, cli.model)
    assert "v_num" not in metrics and next(iter(metrics)) == "epsilon"
    assert metrics["epsilon"] == pytest.approx(float(trainer.callback_metrics["privacy/epsilon"]))
    assert bar._get_train_description(0) == "train"  # not "Epoch 0/-2" for a run set in steps
