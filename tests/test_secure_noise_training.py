"""model.secure_noise in training: the module draws from the ChaCha20 generator, a fresh key per
run, rank 0's key on every DDP rank (2 gloo processes), a crash -> resume equal to the
uninterrupted run, and the privacy report naming the mode."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import ModelCheckpoint
from module_helpers import Crash, CrashAt, make_dm, make_module, make_trainer, trainable

from lit_dp.privacy.secure_noise import SecureNoiseGenerator

pytestmark = pytest.mark.filterwarnings("ignore:model.secure_noise=true with a fixed")


def _run(tmp_path, max_steps, *, secure=True, ckpt_path=None, every=None, crash_at=None):
    torch.manual_seed(0)
    dm = make_dm(num_train=48, expected=16.0, seed=7)
    module = make_module(
        clipping="private_quantile",  # its count noise comes from the same generator
        noise_multiplier=1.0,
        noise_seed=123,
        secure_noise=secure,
    )
    cbs = (
        [ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1)]
        if every
        else []
    )
    cbs += [CrashAt(crash_at)] if crash_at is not None else []
    trainer = make_trainer(tmp_path, max_steps=max_steps, callbacks=cbs)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module, trainer


def test_secure_crash_resume_equals_uninterrupted(tmp_path):
    full, _ = _run(tmp_path / "a", 4)
    assert isinstance(full._noise_generator, SecureNoiseGenerator)
    with pytest.raises(Crash):  # the same run (max_steps 4) crashes after its step-2 checkpoint
        _run(tmp_path / "b", 4, every=2, crash_at=2)
    ckpt = next((tmp_path / "b" / "ckpt").glob("*step=2*.ckpt"))
    state = torch.load(ckpt, weights_only=False)["lit_dp"]["noise_generator"]
    assert state["kind"] == "chacha20" and state["nonce"] > 0  # the key and stream position
    resumed, _ = _run(tmp_path / "c", 4, ckpt_path=str(ckpt))
    assert resumed._noise_generator.nonce == full._noise_generator.nonce
    a, b = trainable(full), trainable(resumed)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=1e-6)
    assert resumed.clip.max_grad_norm == pytest.approx(full.clip.max_grad_norm, rel=1e-9)
    # The same seed in fast mode draws other noise: the secure generator is the one in use.
    fast, _ = _run(tmp_path / "d", 4, secure=False)
    assert any(not torch.equal(a[n], p) for n, p in trainable(fast).items())
    # A fast-mode checkpoint cannot resume a secure run (and the error names the field).
    with pytest.raises(Crash):
        _run(tmp_path / "e", 4, secure=False, every=2, crash_at=2)
    fast_ckpt = next((tmp_path / "e" / "ckpt").glob("*step=2*.ckpt"))
    with pytest.raises(ValueError, match="secure_noise"):
        _run(tmp_path / "f", 4, ckpt_path=str(fast_ckpt))


def test_every_fresh_run_gets_a_new_key_and_the_report_names_the_mode(tmp_path):
    keys = set()
    for i in range(3):
        module = make_module(noise_seed=None, secure_noise=True)
        keys.add(module._generator().key)
        assert isinstance(module._generator(), SecureNoiseGenerator)
        assert module.privacy_description()["noise_sampler"].startswith("secure: ChaCha20")
        assert "OS entropy" in module.privacy_description()["noise_sampler"]
        assert i + 1 == len(keys)
    with pytest.raises(TypeError, match=r"model\.secure_noise='yes' must be true or false"):
        make_module(secure_noise="yes")  # a truthy string must not switch modes silently
    fast = make_module(noise_seed=None)
    assert isinstance(fast._generator(), torch.Generator)
    assert fast.privacy_description()["noise_sampler"].startswith("fast:")
    with pytest.warns(UserWarning, match="NOT secret"):
        make_module(noise_seed=5, secure_noise=True)._generator()
    assert (
        "NOT secret"
        in make_module(noise_seed=5, secure_noise=True).privacy_description()["noise_sampler"]
    )
    # The report of a run carries it.
    dm = make_dm(num_train=32, expected=8.0)
    module = make_module(noise_seed=None, secure_noise=True)
    make_trainer(tmp_path, max_steps=1).fit(module, datamodule=dm)
    report = json.loads((tmp_path / "privacy_report.json").read_text())
    assert report["mechanism"]["noise_sampler"].startswith("secure: ChaCha20")


def _rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))  # module_helpers in the spawned process
    from module_helpers import make_module as build

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        # Each rank draws its own key from OS entropy, then takes rank 0's.
        gen = build(noise_seed=None, secure_noise=True)._generator()
        noise = gen.normal((1000,), std=1.0)
        torch.save(
            {"key": gen.key, "noise": noise, "nonce": gen.nonce},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_share_rank_zeros_key_and_draw_identical_noise(tmp_path):
    mp.start_processes(
        _rank_worker,
        args=(str(tmp_path / "init"), str(tmp_path)),
        nprocs=2,
        start_method="spawn",
    )
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["key"] == r1["key"]  # without the broadcast, two independent OS keys
    assert torch.equal(r0["noise"], r1["noise"]) and r0["nonce"] == r1["nonce"] == 1
