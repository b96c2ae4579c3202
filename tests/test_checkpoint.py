"""Checkpoints: atomic writes (an interrupted or killed save leaves the previous checkpoint
loadable), last.ckpt at every validation and at the end, and ``ckpt_path: last`` resolution."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from module_helpers import quiet_trainer

from lit_dp.callbacks.accounting import PrivacyAccounting
from lit_dp.callbacks.clip_lr import ClipDrivenLR
from lit_dp.callbacks.ema import EMAWeights
from lit_dp.checkpoint import (
    AtomicCheckpointIO,
    DPModelCheckpoint,
    atomic_torch_save,
    find_last_checkpoint,
)
from lit_dp.cli import resolve_last_checkpoint
from lit_dp.data import ConstantBatchSize, SyntheticDataModule
from lit_dp.fingerprint import FINGERPRINT_KEY, short_id
from lit_dp.models import tiny_tokenizer
from lit_dp.module import DPCausalLM
from lit_dp.privacy.calibration import epsilon_for_schedule
from lit_dp.privacy.clipping import FixedClip
from lit_dp.privacy.pld_accountant import PLDAccountant
from lit_dp.privacy.secure_noise import SecureNoiseGenerator


def test_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1, "w": torch.arange(4.0)}, path)

    def torn_save(obj, fh):  # writes part of the file, then the process "dies"
        fh.write(b"PK\x03\x04 partial checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"step": 2, "w": torch.zeros(4)}, path)
    monkeypatch.undo()
    old = torch.load(path)
    assert old["step"] == 1 and torch.equal(old["w"], torch.arange(4.0))
    assert os.listdir(tmp_path) == ["last.ckpt"]  # the partial temp file is removed


_WRITER = """
import sys, torch
from lit_dp.checkpoint import atomic_torch_save
atomic_torch_save({"step": 1}, sys.argv[1])
print("first", flush=True)
while True:  # large saves until killed
    atomic_torch_save({"step": 2, "w": torch.ones(64 * 2**20)}, sys.argv[1])
"""


def test_save_killed_mid_write_leaves_the_previous_checkpoint(tmp_path):
    """SIGKILL while the temp file is being written: the target still holds a whole file."""
    path = tmp_path / "last.ckpt"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "first"
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".last.ckpt.*.tmp")):  # a save of the 256 MB tensor started
            assert time.monotonic() < deadline, "the writer never started its second save"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    state = torch.load(path)  # whole: step 1, or step 2 if a save completed before the kill
    assert state["step"] in (1, 2)
    if state["step"] == 2:
        assert state["w"].numel() == 64 * 2**20


def _fit(root: Path, *, max_steps: int, callback: DPModelCheckpoint, plugins=None) -> L.Trainer:
    dm = SyntheticDataModule(
        tokenizer=tiny_tokenizer(),
        num_train=32,
        num_val=2,
        num_test=0,
        max_length=512,
        batch_schedule=ConstantBatchSize(4.0),
        sampling_seed=1,
    )
    module = DPCausalLM(
        model="tiny-qwen2",
        noise_multiplier=1.0,
        clipping=FixedClip(1.0),
        noise_seed=1,
        eval_before_fit=False,
        max_physical_batch_size=8,
    )
    trainer = quiet_trainer(
        root,
        max_steps,
        [EMAWeights(), ClipDrivenLR(), PrivacyAccounting(target_epsilon=None), callback],
        max_epochs=-1,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        plugins=plugins,
    )
    trainer.fit(module, datamodule=dm)
    return trainer


def test_checkpoint_at_every_validation_and_at_the_end(tmp_path):
    """val every 2 steps, 5 steps: saves at 2, 4 (validation) and 5 (end); last.ckpt is step 5
    and holds the DP state. save_top_k=-1 keeps the step-numbered files to show each save."""
    callback = DPModelCheckpoint(save_top_k=-1)
    trainer = _fit(tmp_path, max_steps=5, callback=callback)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "last.ckpt",
        "step=2.ckpt",
        "step=4.ckpt",
        "step=5.ckpt",
    ]
    last = torch.load(ckpts / "last.ckpt", weights_only=False)
    assert last["global_step"] == 5
    assert last["lit_dp"]["noise_generator"] is not None
    acct = next(v for k, v in last["callbacks"].items() if k.startswith("PrivacyAccounting"))
    assert acct["accountant"]["history"][-1][2] == 5  # (sigma, q, steps): all 5 steps composed


def test_default_keeps_only_last_removes_stale_temp_files_and_respects_a_custom_io(tmp_path):
    class MyIO(TorchCheckpointIO):
        """A user's own checkpoint IO (e.g. for a remote store): kept as given."""

    stale = tmp_path / "checkpoints" / ".last.ckpt.k1ll3d.tmp"  # left by a writer killed mid-save
    stale.parent.mkdir()
    stale.write_bytes(b"partial")
    callback = DPModelCheckpoint()
    trainer = _fit(tmp_path, max_steps=3, callback=callback, plugins=[MyIO()])
    assert type(trainer.strategy.checkpoint_io) is MyIO
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]
    assert (
        torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    )


def _touch_last(root: Path, version: str, mtime: float) -> Path:
    path = root / version / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({}, path)
    os.utime(path, (mtime, mtime))
    return path


def test_last_is_the_newest_run(tmp_path):
    runs = tmp_path / "runs" / "lit_dp"
    assert find_last_checkpoint(runs) is None
    _touch_last(runs, "version_0", 1000.0)
    newest = _touch_last(runs, "version_1", 3000.0)
    _touch_last(runs, "version_2", 2000.0)
    (runs / "version_3").mkdir()  # a run that crashed before its first checkpoint
    assert find_last_checkpoint(runs) == newest


def _cli_cfg(save_dir, version=None, dirpath=None, logger=True):
    init = {"save_dir": str(save_dir), "name": "lit_dp", "version": version}
    logger_cfg = (
        SimpleNamespace(class_path="TensorBoardLogger", init_args=init) if logger else False
    )
    return {
        "trainer": {"logger": logger_cfg, "default_root_dir": str(save_dir)},
        "checkpoint": {"dirpath": dirpath},
    }


def test_resolving_last_continues_in_the_run_directory(tmp_path):
    runs = tmp_path / "lit_dp"
    _touch_last(runs, "version_0", 1000.0)
    newest = _touch_last(runs, "version_4", 2000.0)
    cfg = _cli_cfg(tmp_path)
    assert resolve_last_checkpoint(cfg) == str(newest)
    assert cfg["trainer"]["logger"].init_args["version"] == 4  # the run continues there
    # A named logger version, an explicit checkpoint directory: their last.ckpt.
    assert resolve_last_checkpoint(_cli_cfg(tmp_path, version=0)).endswith(
        "version_0/checkpoints/last.ckpt"
    )
    with pytest.raises(ValueError, match=r"no checkpoint found at .*version_7"):
        resolve_last_checkpoint(_cli_cfg(tmp_path, version=7))
    assert resolve_last_checkpoint(_cli_cfg(tmp_path, dirpath=str(newest.parent))) == str(newest)
    with pytest.raises(ValueError, match=r"ckpt_path=last: no checkpoint found at .*checkpoints"):
        resolve_last_checkpoint(_cli_cfg(tmp_path, logger=False))
    with pytest.raises(ValueError, match=r"ckpt_path=last: no checkpoint found at .*empty"):
        resolve_last_checkpoint(_cli_cfg(tmp_path / "empty"))


# --- crash -> resume through the CLI ---------------------------------------------------------
_TINY = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")
_RUN = [
    "--config",
    _TINY,
    "--trainer.max_steps",
    "6",
    "--trainer.val_check_interval",
    "2",
    "--data.init_args.num_train",
    "64",
    "--data.init_args.num_val",
    "4",
    "--data.init_args.batch_schedule.init_args.expected_batch_size",
    "8",
    "--data.init_args.sampling_seed",
    "3",
    "--model.noise_seed",
    "5",
    "--trainer.enable_progress_bar",
    "false",
]


def _cli(root: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    args = [
        sys.executable,
        "-m",
        "lit_dp",
        "fit",
        *_RUN,
        "--trainer.default_root_dir",
        str(root),
        *extra,
    ]
    return subprocess.Popen(
        args, cwd=root.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.slow
def test_cli_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL a CLI run once its first checkpoint exists; `--ckpt_path last` then ends with the
    same steps, epsilon, exported EMA weights and final weights as a run never interrupted
    (fixed seeds: seed_everything, data.sampling_seed, model.noise_seed)."""
    from safetensors.torch import load_file

    full_root, crash_root = tmp_path / "full", tmp_path / "crash"
    full = _cli(full_root)
    crashed = _cli(crash_root)
    last = crash_root / "lit_dp" / "version_0" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 600
    while not last.exists():  # atomic writes: the file appears only when whole
        assert crashed.poll() is None, crashed.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.05)
    crashed.send_signal(signal.SIGKILL)
    assert crashed.wait(timeout=60) == -signal.SIGKILL
    killed_at = torch.load(last, weights_only=False)["global_step"]
    assert killed_at in (2, 4)  # a validation checkpoint, before the end (step 6)
    out_full = full.communicate(timeout=900)[0]
    assert full.returncode == 0, out_full[-3000:]

    resumed = _cli(crash_root, "--ckpt_path", "last")
    out_resumed = resumed.communicate(timeout=900)[0]
    assert resumed.returncode == 0, out_resumed[-3000:]
    assert [p.name for p in (crash_root / "lit_dp").iterdir()] == [
        "version_0"
    ]  # continued in place

    a, b = full_root / "lit_dp" / "version_0", crash_root / "lit_dp" / "version_0"
    rep_a = json.loads((a / "privacy_report.json").read_text())
    rep_b = json.loads((b / "privacy_report.json").read_text())
    assert rep_a["steps"] == rep_b["steps"] == 6
    assert rep_b["ledger"] == rep_a["ledger"]  # the same steps, rates and noise, exactly
    # The resumed PLD is recomposed from that ledger with equal steps as one self-composition
    # (an FFT power) where the uninterrupted run convolved step by step: the same pessimistic
    # bound, rounded in another order (seen: 1.3e-11 relative).
    assert rep_b["epsilon"] == pytest.approx(rep_a["epsilon"], rel=1e-9)
    assert rep_b["epsilon_rdp"] == pytest.approx(rep_a["epsilon_rdp"], rel=1e-12)
    exported_a = load_file(a / "export" / "model.safetensors")
    exported_b = load_file(b / "export" / "model.safetensors")
    assert exported_a.keys() == exported_b.keys()
    for name in exported_a:  # EMA weights
        torch.testing.assert_close(exported_b[name], exported_a[name], rtol=0, atol=1e-6)
    final_a = torch.load(a / "checkpoints" / "last.ckpt", weights_only=False)
    final_b = torch.load(b / "checkpoints" / "last.ckpt", weights_only=False)
    assert final_a["global_step"] == final_b["global_step"] == 6
    for name, value in final_a["state_dict"].items():  # raw weights
        torch.testing.assert_close(final_b["state_dict"][name], value, rtol=0, atol=1e-6)
    # Quiet output: the run's lines, none of Lightning's tips or third-party deprecations.
    assert "privacy: epsilon = " in out_full and "privacy: epsilon = " in out_resumed
    for noise in (
        "Tip:",
        "GPU available: False",
        "TPU available",
        "deprecated",
        "Writing model shards",
    ):
        assert noise not in out_full + out_resumed, noise


# --- a resume is the same run, or it is refused; forks are explicit --------------------------
def _dp_run(
    root: Path,
    *,
    max_steps: int = 4,
    num_train: int = 32,
    expected: float = 4.0,
    data_seed: int = 0,
    target_epsilon: float | None = None,
    ckpt: Path | None = None,
    fork: bool = False,
    checked_at_setup: bool = True,
    secure_noise: bool = False,
):
    """A tiny private run (sigma 1, or auto with a target) saving every 2 steps under root/ckpt;
    ``ckpt`` resumes it (named before fit, as the CLI does, or only passed to Trainer.fit)."""
    dm = SyntheticDataModule(
        tokenizer=tiny_tokenizer(),
        num_train=num_train,
        num_val=0,
        num_test=0,
        max_length=512,
        batch_schedule=ConstantBatchSize(expected),
        sampling_seed=1,
        data_seed=data_seed,
    )
    module = DPCausalLM(
        model="tiny-qwen2",
        noise_multiplier=1.0 if target_epsilon is None else "auto",
        clipping=FixedClip(1.0),
        noise_seed=1,
        secure_noise=secure_noise,
        eval_before_fit=False,
        max_physical_batch_size=8,
    )
    acct = PrivacyAccounting(target_epsilon=target_epsilon)
    if ckpt is not None and checked_at_setup:
        acct.resume_from(ckpt, fork=fork)
    saver = DPModelCheckpoint(dirpath=str(root / "ckpt"), every_n_train_steps=2, save_top_k=-1)
    trainer = quiet_trainer(
        root, max_steps, [EMAWeights(), ClipDrivenLR(), acct, saver], limit_val_batches=0
    )
    trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt) if ckpt is not None else None)
    return trainer, module, acct


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    """The step-2 checkpoint of a 4-step run (sigma 1, N = 32, E[B] = 4, data_seed 0)."""
    root = tmp_path_factory.mktemp("parent")
    _dp_run(root)
    return root / "ckpt" / "step=2.ckpt"


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (
            {"data_seed": 1},
            r"data: the training units or their order .*units_sha256 \"\w+\" -> \"\w+\"",
        ),
        ({"num_train": 40}, r"num_units: N, the number of privacy units: value 32 -> 40"),
        ({"max_steps": 6}, r"was planned for trainer.max_steps=4 .* is at step 2"),
        ({"expected": 8.0}, r"batch_schedule: .*expected_batch_size 4\.0 -> 8\.0"),
    ],
    ids=["data", "N", "max_steps", "batch-size"],
)
def test_resume_of_a_changed_run_is_refused_naming_the_change(parent, tmp_path, change, named):
    with pytest.raises(ValueError, match="refused, this checkpoint is not of this run") as exc:
        _dp_run(tmp_path, ckpt=parent, **change)
    assert re.search(named, str(exc.value)), str(exc.value)
    assert not (tmp_path / "ckpt").exists()  # refused before the first step


def test_resume_outside_the_cli_is_checked_when_the_checkpoint_loads(parent, tmp_path):
    """Trainer.fit(ckpt_path=...) without resume_from: the same refusal, from the loaded file."""
    with pytest.raises(ValueError, match=r"num_units: .*value 32 -> 40"):
        _dp_run(tmp_path, ckpt=parent, num_train=40, checked_at_setup=False)


def test_a_resume_prints_no_not_resumable_warning(parent, tmp_path):
    """Resumed at step 2 of an 8-step epoch (q = 1/8): Lightning's warning that the loader is
    not resumable would contradict the sampler's exact resume; it is not shown."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _, acct = _dp_run(tmp_path, ckpt=parent)
    assert trainer.global_step == 4 and acct.accountant.total_steps == 4
    assert not [w for w in caught if "not resumable" in str(w.message)]


def test_fork_reseeds_the_noise_and_its_ledger_keeps_the_parents_steps(parent, tmp_path):
    _, cont, _ = _dp_run(tmp_path / "continued", ckpt=parent)
    _, forked, acct = _dp_run(tmp_path / "fork", ckpt=parent, fork=True)
    # Fixed-clip steps draw the same amount of noise: equal generator states after the same two
    # steps would mean the fork replayed the parent's noise stream.
    assert not torch.equal(forked._generator().get_state(), cont._generator().get_state())
    assert (
        max(
            (a - b).abs().max().item()
            for a, b in zip(forked.model.parameters(), cont.model.parameters(), strict=True)
        )
        > 1e-4
    )
    saved = torch.load(parent, weights_only=False)
    q = 4.0 / 32
    assert acct.accountant.history == [(1.0, q, 4)]  # the parent's 2 steps and the fork's 2
    assert acct.epsilon() == pytest.approx(
        epsilon_for_schedule(noise_multiplier=1.0, delta=acct.delta, sample_rate=q, steps=4),
        rel=1e-9,
    )
    assert acct.fork_of == {
        "checkpoint": str(parent),
        "fingerprint": short_id(saved[FINGERPRINT_KEY]),
        "steps": 2,
        "fork_of": None,
    }
    report = acct.report(forked.trainer, forked)
    assert report["fork_of"]["checkpoint"] == str(parent) and report["steps"] == 4


def test_fork_of_a_secure_run_draws_a_fresh_key(tmp_path):
    """Secure mode: the continuation keeps the parent's ChaCha20 key, a fork gets a new one from
    the OS (the parent's fixed noise_seed is not reused), so the two never share a noise draw."""
    _dp_run(tmp_path / "p", secure_noise=True)
    ckpt = tmp_path / "p" / "ckpt" / "step=2.ckpt"
    _, cont, _ = _dp_run(tmp_path / "c", ckpt=ckpt, secure_noise=True)
    _, forked, _ = _dp_run(tmp_path / "f", ckpt=ckpt, fork=True, secure_noise=True)
    parent_key = SecureNoiseGenerator.create(1).key  # noise_seed=1 derives the parent's key
    assert cont._generator().key == parent_key
    assert forked._generator().key != parent_key


def test_fork_plan_counts_the_parents_steps(tmp_path):
    """auto noise: the fork's sigma is calibrated so that the parent's 2 steps (its sigma) and
    the fork's 4 planned steps together spend the target."""
    _dp_run(tmp_path / "p", target_epsilon=8.0)
    ckpt = tmp_path / "p" / "ckpt" / "step=2.ckpt"
    _, module, acct = _dp_run(tmp_path / "f", target_epsilon=8.0, max_steps=6, ckpt=ckpt, fork=True)
    parent_sigma = torch.load(ckpt, weights_only=False)["lit_dp"]["noise_multiplier"]
    q = 4.0 / 32
    assert acct.accountant.history == [(parent_sigma, q, 2), (module.noise_multiplier, q, 4)]
    assert module.noise_multiplier > parent_sigma  # 4 steps left on the budget of 2
    reference = PLDAccountant()
    reference.step(noise_multiplier=parent_sigma, sample_rate=q, num_steps=2)
    reference.step(noise_multiplier=module.noise_multiplier, sample_rate=q, num_steps=4)
    eps = reference.get_epsilon(acct.delta)
    assert 0.99 * 8.0 <= eps <= 8.0
    assert acct.epsilon() == pytest.approx(eps, rel=1e-9)


def test_a_private_report_over_steps_its_ledger_lacks_is_refused():
    acct = PrivacyAccounting()
    trainer = SimpleNamespace(global_step=8)
    module = SimpleNamespace(
        private=True,
        privacy_description=dict,
        num_nonfinite_total=0,
        noise_multiplier=1.0,
        hparams={},
    )
    with pytest.raises(RuntimeError, match="weights took 8 steps but the privacy ledger holds 0"):
        acct.report(trainer, module)  # type: ignore[arg-type]
