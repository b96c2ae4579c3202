"""Banded MF across processes (slow): DDP on 2 CPU processes gives the single process's weights
with the same seeds, and a CLI run killed mid-round resumes to the uninterrupted result."""

from __future__ import annotations

import json
import signal
import time

import pytest
import torch
from test_checkpoint import _cli
from test_distributed import _fit

_BANDED = [
    "--model.noise_mechanism",
    "lit_dp.privacy.noise_mechanism.BandedMF",
    "--model.noise_mechanism.bands",
    "4",
]


@pytest.mark.slow
def test_ddp_equals_one_process_with_banded_noise(tmp_path):
    # tiny.yaml at q = 32 / 256 and 4 bands (group rate 0.5); 6 steps span two rounds and use
    # the noise buffers from the second step on.
    run = [*_BANDED, "--model.noise_multiplier", "1.0", "--privacy.target_epsilon", "null",
           "--trainer.max_steps", "6"]  # fmt: skip
    _fit(tmp_path / "single", *run)
    _fit(tmp_path / "ddp", *run, "--trainer.strategy", "ddp", "--trainer.devices", "2")
    single = torch.load(tmp_path / "single" / "grads_rank0.pt")
    r0 = torch.load(tmp_path / "ddp" / "grads_rank0.pt")
    r1 = torch.load(tmp_path / "ddp" / "grads_rank1.pt")
    assert len(single) == len(r0) == len(r1) == 6
    for a, b in zip(r0, r1, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # one correlated draw on both ranks
    # Same seeds: the same cyclic batches and the same correlated noise; the all-reduced clipped
    # sums differ from the single process's by summation order only.
    for step, (a, b) in enumerate(zip(r0, single, strict=True)):
        scale = float(b.abs().max())
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * scale, msg=f"step {step}")
    # The noise is correlated, not fresh: the privatized gradients of step 1 and 0 are close to
    # -c_1 = -1/2 correlated (the clipped sums are small next to the noise std 1.22 / 32).
    corr = torch.corrcoef(torch.stack([single[0], single[1]]))[0, 1].item()
    assert corr == pytest.approx(-0.5 / (1 + 0.25) ** 0.5, abs=0.1)


@pytest.mark.slow
def test_cli_run_killed_mid_round_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL a banded run once a checkpoint exists (step 2 or 4, inside a round of 4 steps);
    ``--ckpt_path last`` then ends with the uninterrupted run's ledger and weights."""
    full_root, crash_root = tmp_path / "full", tmp_path / "crash"
    full = _cli(full_root, *_BANDED)
    crashed = _cli(crash_root, *_BANDED)
    last = crash_root / "lit_dp" / "version_0" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 600
    while not last.exists():
        assert crashed.poll() is None, crashed.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.05)
    crashed.send_signal(signal.SIGKILL)
    assert crashed.wait(timeout=60) == -signal.SIGKILL
    saved = torch.load(last, weights_only=False)
    assert saved["global_step"] in (2, 4)
    assert saved["lit_dp"]["noise_mechanism"]["step"] == saved["global_step"]
    out_full = full.communicate(timeout=900)[0]
    assert full.returncode == 0, out_full[-3000:]
    resumed = _cli(crash_root, *_BANDED, "--ckpt_path", "last")
    out_resumed = resumed.communicate(timeout=900)[0]
    assert resumed.returncode == 0, out_resumed[-3000:]

    a, b = full_root / "lit_dp" / "version_0", crash_root / "lit_dp" / "version_0"
    rep_a = json.loads((a / "privacy_report.json").read_text())
    rep_b = json.loads((b / "privacy_report.json").read_text())
    assert rep_a["steps"] == rep_b["steps"] == 6 and rep_a["rounds"] == rep_b["rounds"] == 2
    assert rep_b["ledger"] == rep_a["ledger"]
    assert rep_b["epsilon"] == pytest.approx(rep_a["epsilon"], rel=1e-9)
    final_a = torch.load(a / "checkpoints" / "last.ckpt", weights_only=False)
    final_b = torch.load(b / "checkpoints" / "last.ckpt", weights_only=False)
    for name, value in final_a["state_dict"].items():
        torch.testing.assert_close(final_b["state_dict"][name], value, rtol=0, atol=1e-6)
    hist_a = final_a["lit_dp"]["noise_mechanism"]["history"]
    hist_b = final_b["lit_dp"]["noise_mechanism"]["history"]
    for h_a, h_b in zip(hist_a, hist_b, strict=True):
        for name in h_a:
            torch.testing.assert_close(h_b[name], h_a[name], rtol=0, atol=1e-6)
