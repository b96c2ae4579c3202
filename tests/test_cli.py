"""The CLI: tiny.yaml runs end to end, bad input fails early with a clear error naming the field,
before training and without leaving a checkpoint, multi-process runs use the DP strategy, and
``lit-dp generate`` (configs: test_configs.py; ``lit-dp plan``: test_plan.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from module_helpers import json_keys
from shipped_configs import TINY

from lit_dp.cli import LitDPCLI, check_trainer_config
from lit_dp.commands import main
from lit_dp.plan import format_plan, make_plan, read_config


def test_quiet_output_drops_what_is_not_about_the_run():
    """Lightning's tips and absent-accelerator lines and third-party deprecation warnings go;
    Lightning's other lines, lit_dp's warnings and Lightning's config deprecations stay."""
    import logging
    import warnings

    from lightning.fabric.utilities.rank_zero import LightningDeprecationWarning
    from lightning.pytorch.utilities import rank_zero_info

    from lit_dp.callbacks.accounting import check_delta
    from lit_dp.cli import quiet_third_party_output

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    log.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            quiet_third_party_output()
            for line in (
                "💡 Tip: For seamless cloud logging, try installing [litlogger]",
                "GPU available: False, used: False",
                "TPU available: False, using: 0 TPU cores",
                "GPU available: True (cuda), used: True",
                "`Trainer.fit` stopped: `max_steps=4` reached.",
            ):
                rank_zero_info(line)
            warnings.warn_explicit(
                "`x` is deprecated",
                FutureWarning,
                "torch/_pytree.py",
                21,
                module="torch.utils._pytree",
            )
            warnings.warn_explicit(
                "old", DeprecationWarning, "transformers/x.py", 1, module="transformers.x"
            )
            warnings.warn_explicit(
                "precision=16 is deprecated",
                LightningDeprecationWarning,
                "lightning/x.py",
                1,
                module="lightning.pytorch.x",
            )
            check_delta(1e-4, 256)  # lit_dp's own warning
    finally:
        log.removeHandler(handler)
    assert [r.getMessage() for r in records] == [
        "GPU available: True (cuda), used: True",
        "`Trainer.fit` stopped: `max_steps=4` reached.",
    ]
    messages = [str(w.message) for w in caught]
    assert messages[0] == "precision=16 is deprecated" and "privacy.delta=0.0001" in messages[1]
    assert len(messages) == 2


# Exact data-dependent counts: the run directory's report only, never the exported one.
OPERATOR_SIDE = {
    "num_records",
    "num_validation",
    "num_test",
    "truncated",
    "records_without_labels",
    "num_nonfinite_zeroed",
}


def test_tiny_config_end_to_end(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    overrides = [
        "--trainer.max_steps",
        "4",
        "--trainer.val_check_interval",
        "2",
        "--data.init_args.sampling_seed",
        "3",
    ]
    plan = make_plan(read_config(["--config", TINY, *overrides]))  # before fit, as a user would
    cli = LitDPCLI(args=["fit", "--config", TINY, *overrides, "--trainer.default_root_dir", "root"])
    out, err = capfd.readouterr()
    assert "privacy: epsilon = " in out and "validation loss: before = " in out
    assert "accountant: PLD (RDP, looser, would bound the same steps at epsilon = " in out
    assert "Writing model shards" not in out + err  # transformers' progress bar at export
    log_dir = Path(cli.trainer.log_dir)
    assert log_dir == Path("root") / "lit_dp" / "version_0"  # follows trainer.default_root_dir
    assert not Path("runs").exists()
    report = json.loads((log_dir / "privacy_report.json").read_text())
    assert 0.98 * 8.0 <= report["epsilon"] <= 8.0
    assert report["steps"] == 4
    assert report["privacy_unit"] == "example"
    assert report["delta"] == 1e-5  # min(1e-5, 1/256^1.1 = 0.0022)
    # The PLD accountant calibrated the run; RDP is reported beside it, larger for the same sigma.
    assert (
        report["accountant"] == "pld"
        and "privacy loss distributions" in report["accountant_description"]
    )
    assert report["epsilon_pld"] == report["epsilon"] < report["epsilon_rdp"]
    # The plan printed before training is what fit reports: N, q, delta, sigma, both epsilons.
    assert report["sample_rate"]["distinct_rates"] == [plan.schedule.rate(0)]
    assert (plan.num_units, plan.delta, plan.steps) == (
        report["num_units"],
        report["delta"],
        report["steps"],
    )
    assert (
        plan.noise_multiplier["pld"]
        == report["calibrated_noise_multiplier"]
        == report["noise_multiplier"]
    )
    assert plan.epsilon["pld"] == pytest.approx(report["epsilon"], rel=1e-8)
    assert plan.epsilon_rdp_of_run == pytest.approx(report["epsilon_rdp"], rel=1e-10)
    printed = format_plan(plan)
    assert f"{report['noise_multiplier']:.6g}" in printed and f"{report['epsilon']:.4f}" in printed
    assert f"{report['delta']:.4g}" in printed and f"{report['epsilon_rdp']:.4f}" in printed
    assert set(report["operator_side"]) == OPERATOR_SIDE
    assert report["operator_side"]["num_records"] == 256
    assert any(
        "operator_side" in item and "never exported" in item for item in report["not_covered"]
    )
    export = log_dir / "export"
    assert (export / "config.json").exists()
    exported = json.loads((export / "privacy_report.json").read_text())
    assert not json_keys(exported) & (OPERATOR_SIDE | {"operator_side"})
    # No seed or generator state; only whether a seed was fixed (data.sampling_seed here).
    assert exported["sampling_seed_fixed"] is True and exported["noise_seed_fixed"] is False
    secret = {k for k in json_keys(exported) if re.search("seed|generator|rng", k, re.IGNORECASE)}
    assert secret == {"noise_seed_fixed", "sampling_seed_fixed"}
    # Everything else is the run report: what epsilon covers and public configuration.
    assert set(exported) == set(report) - {"operator_side"}
    assert exported["epsilon"] == report["epsilon"] and exported["data"]["num_units"] == 256
    from lit_dp.models import load_model

    reloaded = load_model(str(export))
    assert sum(p.numel() for p in reloaded.parameters()) == sum(
        p.numel() for p in cli.model.model.parameters()
    )
    events = list(log_dir.glob("events.out.tfevents.*"))
    assert events, "TensorBoard events missing"
    # Checkpoints by default: last.ckpt at the final step, loadable.
    last = torch.load(log_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 4 and "lit_dp" in last
    assert "checkpoint: " in out and "last.ckpt" in out


def _no_checkpoint(root: Path) -> bool:
    return not list(root.rglob("*.ckpt"))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["--model.noise_multiplier", "-1"], "noise_multiplier"),
        (["--model.clipping", "FixedClip", "--model.clipping.max_grad_norm", "0"], "max_grad_norm"),
        (["--privacy.delta", "0.01"], "delta"),
        (
            [
                "--data.init_args.batch_schedule",
                "lit_dp.data.ConstantSampleRate",
                "--data.init_args.batch_schedule.init_args.sample_rate",
                "1.5",
            ],
            "sample_rate",
        ),
        (["--model.model", "./no/such/model"], "no/such/model"),
        (["--model.noise_multiplier", "0.1", "--privacy.target_epsilon", "0.5"], "target_epsilon"),
        (["--data.init_args.num_train", "0"], "empty"),
        (["--trainer.strategy", "fsdp"], "strategy"),
        (["--trainer.accumulate_grad_batches", "2"], "accumulate_grad_batches"),
        (["--trainer.min_steps", "3"], "trainer.min_steps=3"),
        (["--trainer.min_epochs", "2"], "trainer.min_epochs=2"),
        (["--trainer.precision", "16-mixed"], "trainer.precision='16-mixed'"),
        (["--trainer.precision", "16"], "bf16-mixed"),
        (["--ckpt_path", "last"], "ckpt_path=last: no checkpoint found"),
    ],
    ids=[
        "negative-sigma",
        "clip-zero",
        "delta-too-large",
        "sample-rate-gt-1",
        "missing-model",
        "unreachable-epsilon",
        "empty-dataset",
        "fsdp",
        "grad-accumulation",
        "min-steps-with-budget",
        "min-epochs-with-budget",
        "fp16-mixed",
        "fp16-legacy-name",
        "resume-without-checkpoint",
    ],
)
def test_bad_input_fails_before_training(overrides, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError, OSError)) as exc:
        LitDPCLI(args=["fit", "--config", TINY, *overrides])
    assert match in str(exc.value)
    assert _no_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("content", "match"),
    [("", "empty"), ('{"prompt": "hi"}\n', "response"), ("{not json\n", "not valid JSON")],
    ids=["empty-file", "missing-field", "bad-json"],
)
def test_bad_jsonl_fails_before_training(content, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "train.jsonl"
    path.write_text(content)
    args = [
        "fit",
        "--config",
        TINY,
        "--data",
        "lit_dp.data.JSONLDataModule",
        "--data.init_args.train_path",
        str(path),
        "--data.init_args.max_length",
        "512",
    ]
    with pytest.raises(ValueError, match=match):
        LitDPCLI(args=args)
    assert _no_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("cfg", "strategy"),
    [
        ({"strategy": "ddp"}, "dp_ddp"),
        ({"strategy": "auto", "accelerator": "cpu", "devices": 1}, "auto"),
        ({"strategy": "auto", "accelerator": "cpu", "devices": 2}, "dp_ddp"),
        ({"accelerator": "cpu", "devices": "2"}, "dp_ddp"),
        ({"strategy": "auto", "accelerator": "gpu", "devices": [0, 1]}, "dp_ddp"),
        ({"strategy": "auto", "accelerator": "gpu", "devices": "0,1"}, "dp_ddp"),
        ({"strategy": "auto", "accelerator": "cpu", "devices": 1, "num_nodes": 2}, "dp_ddp"),
        ({"strategy": "single_device", "accelerator": "cpu", "devices": 2}, "dp_ddp"),
        ({"strategy": "auto", "accelerator": "cpu", "devices": "auto"}, "auto"),
        ({"strategy": "ddp_spawn", "devices": 2}, "dp_ddp_spawn"),
    ],
    ids=[
        "ddp",
        "one-device",
        "two-devices",
        "two-devices-str",
        "gpu-list",
        "gpu-str-list",
        "two-nodes",
        "single-device-name",
        "cpu-auto",
        "spawn",
    ],
)
def test_every_multi_process_run_is_mapped_to_the_dp_strategy(cfg, strategy):
    check_trainer_config(cfg)
    assert cfg["strategy"] == strategy


def test_two_devices_without_a_strategy_build_the_dp_strategy(tmp_path, monkeypatch):
    from lit_dp.distributed import DPDDPStrategy

    monkeypatch.chdir(tmp_path)
    cli = LitDPCLI(args=["--config", TINY, "--trainer.devices", "2"], run=False)
    assert type(cli.trainer.strategy) is DPDDPStrategy and cli.trainer.num_devices == 2


def test_lightning_ddp_is_refused_at_setup():
    """Outside the CLI, a multi-process run on Lightning's own DDP stops before the model
    could be wrapped in DistributedDataParallel."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy

    from lit_dp.distributed import DPDDPStrategy, check_dp_strategy

    with pytest.raises(ValueError, match=r"trainer\.strategy=DDPStrategy runs 2 processes"):
        check_dp_strategy(SimpleNamespace(world_size=2, strategy=DDPStrategy()))
    check_dp_strategy(SimpleNamespace(world_size=2, strategy=DPDDPStrategy()))
    check_dp_strategy(SimpleNamespace(world_size=1, strategy=DDPStrategy()))


def test_enable_checkpointing_false_turns_the_checkpoint_callback_off(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = LitDPCLI(args=["--config", TINY, "--trainer.enable_checkpointing", "false"], run=False)
    assert cli.trainer.checkpoint_callback is None
    cli = LitDPCLI(args=["--config", TINY], run=False)
    from lit_dp.checkpoint import DPModelCheckpoint

    assert isinstance(cli.trainer.checkpoint_callback, DPModelCheckpoint)


def test_generate_reads_a_prompt_file_written_on_windows(tmp_path):
    from lit_dp.generate import read_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"prompt": "Hello", "id": 1}\r\n\r\n{"prompt": "Bye", "id": 2}\r\n'
    )
    assert read_prompts(path, "prompt") == [
        {"prompt": "Hello", "id": 1},
        {"prompt": "Bye", "id": 2},
    ]


def test_generate_subcommand_writes_responses(tmp_path, monkeypatch, capsys):
    from lit_dp.export import export_model
    from lit_dp.models import load_model, load_tokenizer

    export = export_model(
        load_model("tiny-qwen2"), load_tokenizer("tiny-qwen2"), tmp_path / "export"
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hello", "id": 1}\n{"prompt": "Bye", "id": 2}\n')
    out = tmp_path / "out.jsonl"
    main(
        [
            "generate",
            "--model",
            str(export),
            "--prompts",
            str(prompts),
            "--out",
            str(out),
            "--max-new-tokens",
            "4",
        ]
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 2]
    assert all(isinstance(r["response"], str) for r in rows)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(SystemExit):  # the error's one line (test_cli_messages.py)
        main(["generate", "--model", str(export), "--prompts", str(bad), "--out", str(out)])
    assert "has no string field 'prompt'" in capsys.readouterr().err


# --- a resume is the same run: `last` never crosses to another run ---------------------------
_SHORT = [
    "--trainer.max_steps",
    "4",
    "--trainer.val_check_interval",
    "2",
    "--data.init_args.num_train",
    "64",
    "--data.init_args.num_val",
    "4",
    "--data.init_args.batch_schedule.init_args.expected_batch_size",
    "8",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.default_root_dir",
    "root",
]
NONPRIVATE = str(Path(TINY).with_name("nonprivate.yaml"))


class Killed(Exception):
    """The process dies here."""


class KillAfterFirstCheckpoint(L.Callback):
    """Stands in for killing the run once its first checkpoint (step 2) is on disk."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 2:
            raise Killed


def test_private_resume_never_takes_the_nonprivate_baselines_checkpoint(tmp_path, monkeypatch):
    """The new user's sequence: tiny.yaml killed after its first checkpoint, the non-private
    baseline run in the same root, then the first command again with --ckpt_path last. `last`
    is the baseline's newer checkpoint: refused, naming the private/non-private mismatch and the
    run this config belongs to, before anything of the baseline's run is rewritten."""
    monkeypatch.chdir(tmp_path)
    kill = ["--trainer.callbacks+=test_cli.KillAfterFirstCheckpoint"]
    with pytest.raises(Killed):
        LitDPCLI(args=["fit", "--config", TINY, *_SHORT, *kill])
    private_run, baseline_run = Path("root/lit_dp/version_0"), Path("root/lit_dp/version_1")
    assert (
        torch.load(private_run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
        == 2
    )
    LitDPCLI(args=["fit", "--config", NONPRIVATE, *_SHORT])
    baseline = {p: p.read_bytes() for p in baseline_run.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="refused, this checkpoint is not of this run") as exc:
        LitDPCLI(args=["fit", "--config", TINY, *_SHORT, "--ckpt_path", "last"])
    message = str(exc.value)
    assert str(baseline_run / "checkpoints" / "last.ckpt") in message
    assert "model.private: False in the checkpoint, True in this run" in message
    assert f"This config's own run is {private_run}" in message
    assert "--fork" not in message  # a private run cannot fork non-private weights either
    assert {p: p.read_bytes() for p in baseline_run.rglob("*") if p.is_file()} == baseline
    # The way the refusal points to: the private run, resumed in its own directory.
    cli = LitDPCLI(
        args=["fit", "--config", TINY, *_SHORT, "--trainer.logger.init_args.version",
              private_run.name, "--ckpt_path", "last"]
    )  # fmt: skip
    assert Path(cli.trainer.log_dir) == private_run
    report = json.loads((private_run / "privacy_report.json").read_text())
    assert report["private"] and report["steps"] == 4 and report["fork_of"] is None
    assert 0.98 * 8.0 <= report["epsilon"] <= 8.0


def test_training_longer_after_a_finished_run_says_the_budget_is_spent(tmp_path, monkeypatch):
    """A finished 4-step run resumed with trainer.max_steps 8 is refused (it took 0 steps and
    exited 0): its budget is spent, a longer run needs a new plan. --fork with a larger target is
    the explicit way on: a new run directory whose epsilon counts the 4 steps."""
    monkeypatch.chdir(tmp_path)
    LitDPCLI(args=["fit", "--config", TINY, *_SHORT])
    last = Path("root/lit_dp/version_0/checkpoints/last.ckpt")
    longer = [*_SHORT, "--trainer.max_steps", "8"]
    with pytest.raises(ValueError, match="refused, this checkpoint is not of this run") as exc:
        LitDPCLI(args=["fit", "--config", TINY, *longer, "--ckpt_path", "last"])
    message = str(exc.value)
    assert "the checkpoint's run is finished: it took all 4 planned steps" in message
    assert "the budget is spent" in message
    assert "A run of 8 steps needs a new plan from the start: run without --ckpt_path" in message
    assert "max_steps: trainer.max_steps: value 4 -> 8" in message
    assert torch.load(last, weights_only=False)["global_step"] == 4
    fork = ["--privacy.target_epsilon", "12", "--fork", "--ckpt_path", "last"]
    cli = LitDPCLI(args=["fit", "--config", TINY, *longer, *fork])
    assert Path(cli.trainer.log_dir).name == "version_1"  # the fork is a new run
    report = json.loads((Path(cli.trainer.log_dir) / "privacy_report.json").read_text())
    assert report["fork_of"]["checkpoint"] == str(last) and report["fork_of"]["steps"] == 4
    assert report["steps"] == 8 and report["ledger"][0][2] == 4  # the parent's 4 steps first
    assert 0.99 * 12.0 <= report["epsilon"] <= 12.0


def test_fork_needs_a_checkpoint_to_fork(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--fork needs `lit-dp fit` and --ckpt_path"):
        LitDPCLI(args=["fit", "--config", TINY, "--fork"])
    assert _no_checkpoint(tmp_path)
