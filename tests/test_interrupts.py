"""Ctrl-C and SIGTERM during ``lit-dp fit``: the run stops after the step in progress, writes
the report marked interrupted, prints the summary so far with the last checkpoint and the
command that resumes it, and exits 130 (SIGINT) or 143 (SIGTERM), never 0 (``fit && generate``
must not carry on). A second Ctrl-C stops at once."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from shipped_configs import TINY

import lit_dp.cli  # noqa: F401 - Lightning's log handlers bind the real stderr, not capsys'
from lit_dp.callbacks.interrupts import GracefulInterrupt
from lit_dp.commands import main

ARGS = ["fit", "--config", TINY, "--trainer.max_steps", "40", "--trainer.val_check_interval", "2"]


def _signal_at_step(monkeypatch, signum: int, *, step: int = 3, times: int = 1) -> None:
    """Send ``signum`` to this process ``times`` times when step ``step`` ends."""

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == step:
            for _ in range(times):
                os.kill(os.getpid(), signum)

    monkeypatch.setattr(GracefulInterrupt, "on_train_batch_end", on_train_batch_end)


@pytest.mark.parametrize(
    ("signum", "name", "code"),
    [(signal.SIGINT, "SIGINT", 130), (signal.SIGTERM, "SIGTERM", 143)],
    ids=["ctrl-c", "sigterm"],
)
def test_a_signal_ends_fit_with_report_summary_and_failure(
    signum, name, code, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    _signal_at_step(monkeypatch, signum)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(SystemExit) as exc:
        main(ARGS)
    assert exc.value.code == code
    log_dir = Path("runs/lit_dp/version_0")
    report = json.loads((log_dir / "privacy_report.json").read_text())
    assert report["interrupted"] is True
    assert report["stop_reason"].startswith(f"interrupted: {name} after step 3;")
    assert report["steps"] == 3 and 0 < report["epsilon"] < 8.0  # the budget is for 40 steps
    assert not (log_dir / "export").exists()  # an unfinished model is not exported
    out = capsys.readouterr().out
    assert f"privacy: epsilon = {report['epsilon']:.4f}" in out
    assert f"stopped: interrupted: {name} after step 3" in out
    assert f"last checkpoint: {log_dir}/checkpoints/last.ckpt" in out
    assert f"resume with: lit-dp fit --config {TINY} --trainer.max_steps 40" in out
    assert out.splitlines()[-2].endswith("--ckpt_path last")  # above the closing line
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # the handlers are restored


def test_a_second_ctrl_c_stops_inside_the_step(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _signal_at_step(monkeypatch, signal.SIGINT, times=2)
    with pytest.raises(SystemExit) as exc:
        main(ARGS)
    assert exc.value.code == 130
    report = json.loads(Path("runs/lit_dp/version_0/privacy_report.json").read_text())
    assert report["interrupted"] is True and "a second Ctrl-C" in report["stop_reason"]
    assert "resume with: lit-dp fit" in capsys.readouterr().out
