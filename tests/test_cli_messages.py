"""What ``lit-dp`` says: every command in ``--help``, a short ``plan --help``, one line (no
traceback) for a bad flag or value with the field and the fix, "did you mean" for a guessed flag,
and the top-level ``--optimizer`` refused (it would replace the DP optimizer)."""

from __future__ import annotations

from pathlib import Path

import pytest
from shipped_configs import TINY

import lit_dp.cli  # noqa: F401 - Lightning's log handlers bind the real stderr, not capsys'
from lit_dp.commands import COMMANDS, main


def _fails(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err.strip()
    return exc.value.code, err


def test_help_lists_every_command_with_a_line(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for name in ("fit", "plan", "generate", "validate", "test"):
        assert any(line.split()[:1] == [name] and len(line.split()) > 3
                   for line in out.splitlines()), name  # fmt: skip
    assert set(COMMANDS) == {"fit", "plan", "generate", "validate", "test"}
    assert "--debug" in out


def test_plan_help_is_short_and_says_what_plan_does(capsys):
    main(["plan", "--help"])
    out = capsys.readouterr().out
    assert len(out.splitlines()) < 30
    assert "privacy" in out and "before any training" in out and "--config" in out


def test_unknown_command_suggests_the_closest(capsys):
    code, err = _fails(["fitt", "--config", TINY], capsys)
    assert code == 2 and "did you mean 'fit'" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("flag", "suggestion"),
    [
        ("--trainer.maxsteps", "--trainer.max_steps"),
        ("--model.noise_multipler", "--model.noise_multiplier"),
        ("--data.init_args.sampling_sed", "--data.init_args.sampling_seed"),
        ("--model.optimizer.init_args.lrr", "--model.optimizer.init_args.lr"),
    ],
    ids=["trainer", "model", "data-component", "optimizer-component"],
)
def test_a_guessed_flag_gets_did_you_mean(flag, suggestion, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = _fails(["fit", "--config", TINY, flag, "3"], capsys)
    assert code == 2
    assert err == (
        f"lit-dp fit: error: unknown option {flag}; did you mean {suggestion}? "
        "(lit-dp fit --help lists the options)"
    )


@pytest.mark.parametrize(
    ("flag", "pointer"), [("--optimizer", "model.optimizer"), ("--lr_scheduler", "clip_lr")]
)
def test_top_level_optimizer_flags_are_refused(flag, pointer, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = _fails(["fit", "--config", TINY, flag, "torch.optim.SGD"], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{flag} is not a lit_dp option" in err and pointer in err
    assert not (tmp_path / "runs").exists()  # refused before anything ran


@pytest.mark.parametrize(
    ("overrides", "field", "fix"),
    [
        (["--model.optimizer.init_args.lr", "-0.1"], "model.optimizer.init_args: lr=-0.1", ">= 0"),
        (
            ["--data.init_args.batch_schedule.init_args.expected_batch_size", "300"],
            "expected_batch_size=300",
            "lower it",
        ),
        (
            ["--data", "lit_dp.data.JSONLDataModule", "--data.init_args.train_path", "no.jsonl"],
            "data.train_path: file 'no.jsonl' does not exist",
            "check the path",
        ),
        (["--model.engine", "fastt"], "model.engine", "'fast', 'vmap', 'loop'"),
    ],
    ids=["negative-lr", "batch-above-n", "missing-train-path", "bad-literal"],
)
def test_a_bad_value_ends_in_one_line(overrides, field, fix, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIT_DP_DEBUG", raising=False)
    code, err = _fails(["fit", "--config", TINY, "--trainer.max_steps", "2", *overrides], capsys)
    assert code in (1, 2)
    last = err.splitlines()[-1]
    assert last.startswith("lit-dp fit: error: ") and field in last and fix in last
    assert "Traceback" not in err and "Namespace(" not in err and "Given value" not in err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="expected_batch_size=300"):
        main([
            "fit", "--config", TINY, "--debug",
            "--data.init_args.batch_schedule.init_args.expected_batch_size", "300",
        ])  # fmt: skip
    monkeypatch.setenv("LIT_DP_DEBUG", "1")
    with pytest.raises(ValueError, match="delta"):
        main(["plan", "--config", TINY, "--privacy.delta", "0.01"])


def test_config_file_keys_get_the_same_answers(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("typo.yaml").write_text("trainer:\n  max_stepz: 3\n")
    Path("opt.yaml").write_text("optimizer:\n  class_path: torch.optim.SGD\n")
    code, err = _fails(["fit", "--config", TINY, "--config", "typo.yaml"], capsys)
    assert code == 2
    assert "unknown config key trainer.max_stepz; did you mean trainer.max_steps?" in err
    code, err = _fails(["fit", "--config", TINY, "--config", "opt.yaml"], capsys)
    assert code == 2 and "config section optimizer: is not a lit_dp option" in err
    assert "model.optimizer" in err


@pytest.mark.parametrize("given", ["flag", "config-file"])
def test_a_moved_key_names_the_key_that_replaces_it(given, capsys, tmp_path, monkeypatch):
    """model.export_dir (the export is the export: section's callback): fit and plan name
    export.dirpath, from a flag or from an older config file."""
    monkeypatch.chdir(tmp_path)
    Path("old.yaml").write_text("model:\n  export_dir: null\n")
    extra = ["--model.export_dir", "null"] if given == "flag" else ["--config", "old.yaml"]
    for command in ("fit", "plan"):
        code, err = _fails([command, "--config", TINY, *extra], capsys)
        assert code == 2 and len(err.splitlines()) == 1
        assert "model.export_dir moved to export.dirpath" in err and "null = no export" in err
    assert not (tmp_path / "runs").exists()
