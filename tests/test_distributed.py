"""DDP on 2 CPU processes: clipped sums are all-reduced, raw gradients never are,
and the noise is one draw shared by every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]


def _fit(tmp: Path, *extra: str) -> None:
    tmp.mkdir(parents=True, exist_ok=True)
    args = [
        sys.executable,
        "-m",
        "lit_dp",
        "fit",
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        "--model.clipping",
        "FixedClip",
        "--trainer.max_steps",
        "2",
        "--model.eval_before_fit",
        "false",
        "--data.init_args.sampling_seed",
        "5",
        "--model.noise_seed",
        "1",
        "--export.dirpath",
        "null",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.callbacks+=ddp_grad_dump.GradDump",
        f"--trainer.callbacks.dirpath={tmp}",
        *extra,
    ]
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    proc = subprocess.run(args, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_two_devices_without_a_strategy_run_dp_ddp_unwrapped(tmp_path):
    """`--trainer.devices 2` alone: Lightning's "auto" would run its own DDP, which wraps the
    model in DistributedDataParallel and all-reduces raw gradients; lit_dp maps it to dp_ddp."""
    quiet = ["--model.noise_multiplier", "0", "--privacy.target_epsilon", "null"]
    _fit(tmp_path / "auto", *quiet, "--trainer.devices", "2")
    for rank in (0, 1):
        info = json.loads((tmp_path / "auto" / f"strategy_rank{rank}.json").read_text())
        assert info == {"strategy": "DPDDPStrategy", "world_size": 2, "ddp_wrapped": False}
    r0 = torch.load(tmp_path / "auto" / "grads_rank0.pt")
    r1 = torch.load(tmp_path / "auto" / "grads_rank1.pt")
    for a, b in zip(r0, r1, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # one privatized gradient on both ranks


@pytest.mark.slow
def test_ddp_matches_single_process_and_adds_noise_once(tmp_path):
    quiet = ["--model.noise_multiplier", "0", "--privacy.target_epsilon", "null"]
    _fit(tmp_path / "single", *quiet)
    _fit(tmp_path / "ddp", *quiet, "--trainer.strategy", "ddp", "--trainer.devices", "2")
    single = torch.load(tmp_path / "single" / "grads_rank0.pt")
    r0 = torch.load(tmp_path / "ddp" / "grads_rank0.pt")
    r1 = torch.load(tmp_path / "ddp" / "grads_rank1.pt")
    assert len(single) == len(r0) == 2
    # Step 0 starts from identical weights: the all-reduced clipped sum equals the single run's.
    scale = single[0].abs().max()
    torch.testing.assert_close(r0[0], single[0], rtol=0, atol=1e-5 * float(scale))
    for a, b in zip(r0, r1, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # identical on both ranks

    # With noise: both ranks hold the same noisy gradient (one shared draw, not two).
    _fit(
        tmp_path / "noisy",
        "--model.noise_multiplier",
        "1.0",
        "--privacy.target_epsilon",
        "null",
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
    )
    n0 = torch.load(tmp_path / "noisy" / "grads_rank0.pt")
    n1 = torch.load(tmp_path / "noisy" / "grads_rank1.pt")
    for a, b in zip(n0, n1, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # ... and its spread is the single draw's: std(noisy - clean) = sigma C / (q N).
    expected_std = 1.0 * 1.0 / 32.0  # tiny.yaml: C = 1, expected batch q N = 32
    assert (n0[0] - r0[0]).std().item() == pytest.approx(expected_std, rel=0.05)

    # Secure mode with an OS-entropy key: rank 0's key is broadcast, so again one shared draw.
    _fit(
        tmp_path / "secure",
        "--model.noise_multiplier",
        "1.0",
        "--privacy.target_epsilon",
        "null",
        "--model.secure_noise",
        "true",
        "--model.noise_seed",
        "null",
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
    )
    s0 = torch.load(tmp_path / "secure" / "grads_rank0.pt")
    s1 = torch.load(tmp_path / "secure" / "grads_rank1.pt")
    for a, b in zip(s0, s1, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (s0[0] - r0[0]).std().item() == pytest.approx(expected_std, rel=0.05)
    assert not torch.equal(s0[0], n0[0])  # not the torch generator's draw
