"""The CLI: every config parses, tiny.yaml runs end to end, and bad input fails early with a
clear error naming the field, before training and without leaving a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lit_dp.cli import LitDPCLI, check_trainer_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
TINY = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")


def test_every_config_is_commented():
    assert CONFIGS, "no configs found"
    for cfg in CONFIGS:
        text = cfg.read_text()
        assert text.startswith("#"), f"{cfg.name} needs a header comment"
        assert text.count("#") > 10, f"{cfg.name} must be commented field by field"


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exc:
        LitDPCLI(args=["fit", "--config", str(config), "--print_config"])
    assert exc.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model:" in printed and "privacy:" in printed


def test_tiny_config_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli = LitDPCLI(args=["fit", "--config", TINY, "--trainer.max_steps", "4",
                         "--trainer.val_check_interval", "2", "--data.init_args.sampling_seed", "3"])
    out = capsys.readouterr().out
    assert "privacy: epsilon = " in out and "validation loss: before = " in out
    report = json.loads((Path(cli.trainer.log_dir) / "privacy_report.json").read_text())
    assert 0 < report["epsilon"] <= 8.0
    assert report["steps"] == 4
    assert report["privacy_unit"] == "example"
    export = Path(cli.trainer.log_dir) / "export"
    assert (export / "config.json").exists() and (export / "privacy_report.json").exists()
    from lit_dp.models import load_model

    reloaded = load_model(str(export))
    assert sum(p.numel() for p in reloaded.parameters()) == sum(
        p.numel() for p in cli.model.model.parameters()
    )
    events = list(Path(cli.trainer.log_dir).glob("events.out.tfevents.*"))
    assert events, "TensorBoard events missing"


def _no_checkpoint(root: Path) -> bool:
    return not list(root.rglob("*.ckpt"))


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["--model.noise_multiplier", "-1"], "noise_multiplier"),
        (["--model.max_grad_norm", "0"], "max_grad_norm"),
        (["--privacy.delta", "0.01"], "delta"),
        (["--data.init_args.expected_batch_size", "null", "--data.init_args.sample_rate", "1.5"], "sample_rate"),
        (["--model.model", "./no/such/model"], "no/such/model"),
        (["--model.noise_multiplier", "0.1", "--privacy.target_epsilon", "0.5"], "target_epsilon"),
        (["--data.init_args.num_train", "0"], "empty"),
        (["--trainer.strategy", "fsdp"], "strategy"),
        (["--trainer.accumulate_grad_batches", "2"], "accumulate_grad_batches"),
    ],
    ids=["negative-sigma", "clip-zero", "delta-too-large", "sample-rate-gt-1", "missing-model",
         "unreachable-epsilon", "empty-dataset", "fsdp", "grad-accumulation"],
)
def test_bad_input_fails_before_training(overrides, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError, OSError)) as exc:
        LitDPCLI(args=["fit", "--config", TINY, *overrides])
    assert match in str(exc.value)
    assert _no_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "content,match",
    [("", "empty"), ('{"prompt": "hi"}\n', "response"), ("{not json\n", "not valid JSON")],
    ids=["empty-file", "missing-field", "bad-json"],
)
def test_bad_jsonl_fails_before_training(content, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "train.jsonl"
    path.write_text(content)
    args = ["fit", "--config", TINY, "--data", "lit_dp.data.JSONLDataModule",
            "--data.init_args.train_path", str(path), "--data.init_args.max_length", "512"]
    with pytest.raises(ValueError, match=match):
        LitDPCLI(args=args)
    assert _no_checkpoint(tmp_path)


def test_ddp_is_mapped_to_the_dp_strategy():
    cfg = {"strategy": "ddp"}
    check_trainer_config(cfg)
    assert cfg["strategy"] == "dp_ddp"


def test_generate_reads_a_prompt_file_written_on_windows(tmp_path):
    from lit_dp.generate import read_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "Hello", "id": 1}\r\n\r\n{"prompt": "Bye", "id": 2}\r\n')
    assert read_prompts(path, "prompt") == [{"prompt": "Hello", "id": 1}, {"prompt": "Bye", "id": 2}]


def test_generate_subcommand_writes_responses(tmp_path, monkeypatch):
    from lit_dp.cli import main
    from lit_dp.models import export_model, load_model, load_tokenizer

    export = export_model(load_model("tiny-qwen2"), load_tokenizer("tiny-qwen2"), tmp_path / "export")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hello", "id": 1}\n{"prompt": "Bye", "id": 2}\n')
    out = tmp_path / "out.jsonl"
    main(["generate", "--model", str(export), "--prompts", str(prompts), "--out", str(out),
          "--max-new-tokens", "4"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 2]
    assert all(isinstance(r["response"], str) for r in rows)
    with pytest.raises(ValueError, match="prompt"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"text": "x"}\n')
        main(["generate", "--model", str(export), "--prompts", str(bad), "--out", str(out)])
