"""DPCausalLM: empty batches, budget stop, noise calibration, checkpoint -> resume equality,
its components and their validation, micro-batches and the privacy report's coverage. The DP
step against independent references is in test_dp_step.py; shared builders in module_helpers.py."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from module_helpers import Crash, CrashAt, make_dm, make_module, make_trainer, trainable

from lit_dp.callbacks.accounting import PrivacyAccounting
from lit_dp.callbacks.clip_lr import ClipDrivenLR
from lit_dp.callbacks.ema import EMAWeights
from lit_dp.module import DPCausalLM
from lit_dp.optim import DPAdamW
from lit_dp.privacy.clipping import FixedClip
from lit_dp.privacy.mechanism import split_micro_batches


def test_empty_batches_are_noise_only_steps_that_are_accounted(tmp_path):
    dm = make_dm(num_train=64, expected=0.5)  # q = 1/128: most batches are empty
    module = make_module()
    trainer = make_trainer(tmp_path, max_steps=6)
    before = trainable(module)
    trainer.fit(module, datamodule=dm)
    acct = next(c for c in trainer.callbacks if isinstance(c, PrivacyAccounting))
    assert acct.accountant.total_steps == 6
    assert trainer.global_step == 6
    moved = any(not torch.equal(before[n], p) for n, p in trainable(module).items())
    assert moved  # noise moved the weights even with empty batches


def test_budget_stop_before_exceeding_target(tmp_path):
    dm = make_dm(num_train=32, expected=8.0)
    module = make_module(noise_multiplier=1.5)  # at delta = 1e-5: 6 steps fit in epsilon = 3
    trainer = make_trainer(tmp_path, max_steps=50, target_epsilon=3.0)
    trainer.fit(module, datamodule=dm)
    acct = next(c for c in trainer.callbacks if isinstance(c, PrivacyAccounting))
    eps = acct.epsilon()
    assert 0 < eps <= 3.0
    assert trainer.global_step < 50
    # one more step would have exceeded the budget
    assert (
        acct.accountant.peek_epsilon(delta=acct.delta, noise_multiplier=1.5, sample_rate=0.25) > 3.0
    )
    report = json.loads((tmp_path / "privacy_report.json").read_text())
    assert report["stop_reason"].startswith("budget")
    assert report["epsilon"] == pytest.approx(eps)


def test_auto_noise_is_calibrated_to_target(tmp_path):
    dm = make_dm(num_train=32, expected=8.0)
    # sigma ~ 0.99 at delta = 1e-5: the count noise std 8 / 8 = 1 stays above sigma / 2.
    module = make_module(
        noise_multiplier="auto", clipping="private_quantile", count_noise_divisor=8.0
    )
    trainer = make_trainer(tmp_path, max_steps=4, target_epsilon=5.0)
    trainer.fit(module, datamodule=dm)
    report = json.loads((tmp_path / "privacy_report.json").read_text())
    assert 0.99 * 5.0 <= report["epsilon"] <= 5.0
    assert report["steps"] == 4
    assert report["clipping"]["name"] == "private_quantile"
    for key in (
        "epsilon",
        "delta",
        "steps",
        "noise_multiplier",
        "sample_rate",
        "privacy_unit",
        "accountant",
        "clipping",
        "covers",
        "not_covered",
        "stop_reason",
    ):
        assert key in report


def test_auto_noise_under_each_accountant(tmp_path):
    """privacy.accountant picks the calibration and the report's epsilon; RDP is always beside."""
    reports, sigmas = {}, {}
    for name in ("pld", "rdp"):
        dm = make_dm(num_train=32, expected=8.0)
        module = make_module(noise_multiplier="auto", clipping="fixed")
        trainer = make_trainer(tmp_path / name, max_steps=3, target_epsilon=4.0, accountant=name)
        trainer.fit(module, datamodule=dm)
        reports[name] = json.loads((tmp_path / name / "privacy_report.json").read_text())
        sigmas[name] = module.noise_multiplier
    pld, rdp = reports["pld"], reports["rdp"]
    assert pld["accountant"] == "pld" and rdp["accountant"] == "rdp"
    assert 0.98 * 4.0 <= pld["epsilon"] <= 4.0 and 0.98 * 4.0 <= rdp["epsilon"] <= 4.0
    assert pld["epsilon_pld"] == pld["epsilon"] < pld["epsilon_rdp"]
    assert rdp["epsilon_rdp"] == rdp["epsilon"] and "epsilon_pld" not in rdp
    assert sigmas["pld"] < sigmas["rdp"]  # the tighter accountant needs less noise
    assert pld["calibrated_noise_multiplier"] == sigmas["pld"]


def _run(tmp_path, max_steps, ckpt_path=None, every=None, crash_at=None):
    torch.manual_seed(0)
    dm = make_dm(num_train=48, expected=16.0, seed=7)
    module = make_module(clipping="private_quantile", noise_multiplier=1.0, noise_correction=True)
    cbs = (
        [ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1)]
        if every
        else []
    )
    cbs += [CrashAt(crash_at)] if crash_at is not None else []
    trainer = make_trainer(tmp_path, max_steps=max_steps, callbacks=cbs)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    acct = next(c for c in trainer.callbacks if isinstance(c, PrivacyAccounting))
    ema = next(c for c in trainer.callbacks if isinstance(c, EMAWeights))
    lr = next(c for c in trainer.callbacks if isinstance(c, ClipDrivenLR))
    return module, acct, ema, lr


def test_crash_resume_equals_uninterrupted(tmp_path):
    full, acct_full, ema_full, lr_full = _run(tmp_path / "a", 6)
    with pytest.raises(Crash):  # the same run (max_steps 6) crashes after its step-3 checkpoint
        _run(tmp_path / "b", 6, every=3, crash_at=3)
    ckpt = next((tmp_path / "b" / "ckpt").glob("*step=3*.ckpt"))
    resumed, acct_res, ema_res, lr_res = _run(tmp_path / "c", 6, ckpt_path=str(ckpt))
    a, b = trainable(full), trainable(resumed)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=1e-6)
    assert acct_res.accountant.total_steps == 6
    # PLD: resume recomposes the ledger run by run, the uninterrupted run composed step by step;
    # they agree to FFT round-off (~1e-10). The ledger itself is restored exactly.
    assert acct_res.accountant.history == acct_full.accountant.history
    assert acct_res.epsilon() == pytest.approx(acct_full.epsilon(), rel=1e-9)
    assert acct_res.rdp.get_epsilon(acct_res.delta) == pytest.approx(
        acct_full.rdp.get_epsilon(acct_full.delta), rel=1e-12
    )
    assert resumed.clip.max_grad_norm == pytest.approx(full.clip.max_grad_norm, rel=1e-9)
    assert lr_res.gamma == pytest.approx(lr_full.gamma)
    for n in ema_full.shadow:
        torch.testing.assert_close(ema_full.shadow[n], ema_res.shadow[n], rtol=0, atol=1e-6)


def test_optimizer_component_is_validated():
    """The module refuses what is not an optimizer factory (naming the field); the optimizer
    validates its own fields when it is built (DPAdamW's checks: tests/test_optim.py)."""
    with pytest.raises(TypeError, match=r"model\.optimizer"):
        DPCausalLM(model="tiny-qwen2", optimizer="lion")
    with pytest.raises(TypeError, match=r"model\.clipping"):
        DPCausalLM(model="tiny-qwen2", clipping="fixed")
    module = DPCausalLM(model="tiny-qwen2", optimizer=functools.partial(DPAdamW, lr=-1.0))
    with pytest.raises(ValueError, match=r"lr=-1\.0"):
        module.configure_optimizers()
    with pytest.raises(TypeError, match="momentum"):  # DPAdamW has no momentum field
        DPCausalLM(
            model="tiny-qwen2", optimizer=functools.partial(DPAdamW, momentum=0.9)
        ).configure_optimizers()


def test_components_have_no_shared_default_instance():
    """Two modules built with the defaults get their own clip-bound estimator."""
    a, b = DPCausalLM(model="tiny-qwen2"), DPCausalLM(model="tiny-qwen2")
    assert isinstance(a.clip, FixedClip) and a.clip is not b.clip
    assert isinstance(a.configure_optimizers(), DPAdamW)


def test_variance_floor_reaches_the_optimizer():
    opt = make_module(noise_correction=True, variance_floor=1e-4).configure_optimizers()
    assert opt.param_groups[0]["variance_floor"] == 1e-4 and opt.param_groups[0]["noise_correction"]


def test_micro_batches_never_split_a_unit():
    ids = torch.tensor([0, 0, 0, 1, 2, 2, 3])
    batch = {
        "input_ids": torch.zeros(7, 3),
        "attention_mask": torch.zeros(7, 3),
        "labels": torch.zeros(7, 3),
        "unit_ids": ids,
    }
    parts = split_micro_batches(batch, 3)
    seen = [p["unit_ids"].tolist() for p in parts]
    assert sum(len(s) for s in seen) == 7
    for s in seen:
        assert len(s) <= 3 or len(set(s)) == 1
    flat = [set(s) for s in seen]
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            assert not flat[i] & flat[j]


def test_configure_optimizers_twice_never_wraps_or_hooks_the_model():
    """Lightning may call configure_optimizers more than once; it must never wrap or hook the
    model."""
    module = make_module()
    model_type = type(module.model)
    hooks_before = sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.model.modules()
    )
    first, second = module.configure_optimizers(), module.configure_optimizers()
    assert type(module.model) is model_type
    hooks_after = sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.model.modules()
    )
    assert hooks_after == hooks_before
    ids = lambda opt: [id(p) for g in opt.param_groups for p in g["params"]]  # noqa: E731
    assert (
        ids(first) == ids(second) == [id(p) for p in module.model.parameters() if p.requires_grad]
    )


def test_history_percentile_is_reported_as_not_covered(tmp_path):
    dm = make_dm(num_train=32, expected=8.0)
    module = make_module(clipping="history_percentile")
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.fit(module, datamodule=dm)
    report = json.loads((tmp_path / "privacy_report.json").read_text())
    assert report["covers"].startswith("nothing")
    assert any("raw" in item for item in report["not_covered"])
    assert report["clipping"]["covered_by_dp"] is False
