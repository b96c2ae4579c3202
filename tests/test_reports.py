"""The CLI's privacy reports and the export's model card: one type and a true value per field,
no local path in what is shared, fixed seeds said out loud (issue: every report named the
optimizer "call_without_instantiate_context", the baseline claimed DP-covered clipping, the
shared report held the data file's absolute path, and a fixed seed was dropped silently)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from shipped_configs import CONFIG_DIR, TINY

from lit_dp.cli import LitDPCLI

NONPRIVATE = str(CONFIG_DIR / "nonprivate.yaml")
SHORT = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2"]


def _reports(log_dir: Path) -> tuple[dict, dict, str]:
    run = json.loads((log_dir / "privacy_report.json").read_text())
    export = log_dir / "export"
    return (
        run,
        json.loads((export / "privacy_report.json").read_text()),
        (export / "README.md").read_text(),
    )


def _check_types(report: dict) -> None:
    assert isinstance(report["noise_multiplier"], float)
    assert set(report["sample_rate"]) == {"schedule", "distinct_rates"}
    assert all(isinstance(q, float) for q in report["sample_rate"]["distinct_rates"])
    assert isinstance(report["noise_seed_fixed"], bool)
    assert isinstance(report["sampling_seed_fixed"], bool)


@pytest.fixture
def private_jsonl_run(tmp_path_factory, capfd):
    root = tmp_path_factory.mktemp("private")
    data = root / "alice_mail.jsonl"
    data.write_text("".join(json.dumps({"text": f"note {i}: see you at {i}"}) + "\n"
                            for i in range(60)))  # fmt: skip
    # The fixed seed is warned about at fit.
    with pytest.warns(UserWarning, match="model.noise_seed fixed: epsilon holds only while"):
        cli = LitDPCLI(args=[
            "fit", "--config", TINY, *SHORT, "--trainer.default_root_dir", str(root / "runs"),
            "--data", "lit_dp.data.JSONLDataModule", "--data.init_args.train_path", str(data),
            "--data.init_args.batch_schedule.init_args.expected_batch_size", "8",
            "--model.noise_seed", "7",
        ])  # fmt: skip
    return Path(cli.trainer.log_dir), data, capfd.readouterr().out


def test_private_report_and_model_card(private_jsonl_run):
    log_dir, data, out = private_jsonl_run
    run, shared, card = _reports(log_dir)
    for report in (run, shared):
        _check_types(report)
        assert report["mechanism"]["optimizer"] == "lit_dp.optim.DPAdamW"
        assert report["mechanism"]["optimizer_hyperparameters"]["lr"] == pytest.approx(0.00316)
        assert report["noise_multiplier"] == run["calibrated_noise_multiplier"] > 0
        assert report["sample_rate"]["distinct_rates"] == [pytest.approx(8 / run["num_units"])]
        # A fixed noise seed: said in both reports, and epsilon is conditional on its secrecy.
        assert report["noise_seed_fixed"] is True and report["sampling_seed_fixed"] is False
        assert "only as long as nobody learns the fixed model.noise_seed" in report["covers"]
    # The shared copy holds no local path (nor the file's name); the run directory's does.
    assert str(data) in json.dumps(run)
    assert data.name not in json.dumps(shared) and str(data.parent) not in json.dumps(shared)
    assert shared["data"]["dataset"].startswith("jsonl")
    # ... and printed in the summary.
    assert "seeds: model.noise_seed FIXED" in out
    # The model card: Hugging Face front matter, the privacy statement and the recipe.
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "transformers" and "differential-privacy" in front["tags"]
    assert "base_model" not in front  # tiny-qwen2 is no hub id
    eps = f"{shared['epsilon']:.4g}"
    assert f"**({eps}, 1e-05)-differentially private**" in card
    assert "example-level" in card and "PLD accountant" in card
    assert shared["covers"] in card and all(item in card for item in shared["not_covered"])
    assert "lit_dp.optim.DPAdamW" in card and "lr=0.00316" in card
    assert "noise" in card.split("fixed seeds")[1].splitlines()[0]
    assert data.name not in card and str(data.parent) not in card


def test_nonprivate_report_says_nothing_is_covered(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = LitDPCLI(args=["fit", "--config", NONPRIVATE, *SHORT])
    run, shared, card = _reports(Path(cli.trainer.log_dir))
    for report in (run, shared):
        _check_types(report)
        assert report["private"] is False and report["noise_multiplier"] == 0.0
        assert report["clipping"]["covered_by_dp"] is False
        assert report["clipping"]["max_grad_norm"] is None
        assert report["sample_rate"]["distinct_rates"] == [32 / 256]  # Poisson-sampled batches
        assert report["mechanism"]["optimizer"] == "lit_dp.optim.DPAdamW"
    assert "**Not differentially private.**" in card
    assert "non-private" in yaml.safe_load(card.split("---\n")[1])["tags"]


def test_shareable_report_keeps_no_local_path_of_a_forks_parent():
    """A fork's report names its parent checkpoint; the shareable copy keeps the file name and
    the fingerprint, not the operator's directory layout."""
    from lit_dp.report import shareable as _scrub

    report = {
        "fork_of": {
            "checkpoint": "/home/alice/runs/lit_dp/version_0/checkpoints/last.ckpt",
            "fingerprint": "ab12",
            "steps": 4,
            "fork_of": None,
        },
        "dataset": "jsonl:/home/alice/mail.jsonl",
    }
    shared = _scrub(report)
    assert shared["fork_of"] == {
        "checkpoint": "last.ckpt",
        "fingerprint": "ab12",
        "steps": 4,
        "fork_of": None,
    }
    assert "/home/alice" not in json.dumps(shared)
