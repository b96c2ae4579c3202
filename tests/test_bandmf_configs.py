"""Banded MF from the CLI on every shipped private config: the config's own recipe (optimizer,
clipping, LoRA, BitNet, schedule) with the model swapped for the tiny random Qwen2 and the data
cut to a few steps, so the configs whose model lives on a hub run here too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from shipped_configs import CONFIGS

from lit_dp.cli import LitDPCLI

PRIVATE = [c for c in CONFIGS if "private: false" not in c.read_text()]


@pytest.mark.parametrize("config", PRIVATE, ids=[c.name for c in PRIVATE])
def test_every_private_config_fits_with_bands(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(config),
            "--model.model", "tiny-qwen2",
            "--model.noise_mechanism", "lit_dp.privacy.noise_mechanism.BandedMF",
            "--model.noise_mechanism.bands", "2",
            "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
            "--trainer.enable_progress_bar", "false",
            "--data.init_args.num_train", "48", "--data.init_args.num_val", "4",
            "--data.init_args.num_test", "4", "--data.init_args.max_length", "512",
            "--data.init_args.batch_schedule", "lit_dp.data.ConstantBatchSize",
            "--data.init_args.batch_schedule.expected_batch_size", "6",
            "--trainer.default_root_dir", "root"]  # fmt: skip
    cli = LitDPCLI(args=args)
    assert cli.trainer.global_step == 4
    report = json.loads((Path(cli.trainer.log_dir) / "privacy_report.json").read_text())
    mech = report["mechanism"]["noise_mechanism"]
    assert mech["class_path"].endswith("BandedMF") and mech["bands"] == 2
    assert report["steps"] == 4 and report["rounds"] == 2
    assert 0 < report["epsilon"] <= (report["target_epsilon"] or float("inf"))
