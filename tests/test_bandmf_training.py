"""Banded MF in training: b = 1 is today's DP-SGD bit for bit, a banded run samples cyclically
and is accounted once per round, calibration and the report, crash -> resume of the noise
buffers. The mechanism's math is tested in tests/privacy/test_bandmf.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from module_helpers import Crash, CrashAt, make_dm, make_module, make_trainer, trainable

from lit_dp.callbacks.accounting import PrivacyAccounting
from lit_dp.privacy.bandmf import bsr_coefficients
from lit_dp.privacy.calibration import calibrate_noise_multiplier
from lit_dp.privacy.cyclic_sampling import CyclicPoissonBatchSampler
from lit_dp.privacy.noise_mechanism import BandedMF


def _fit(
    root, max_steps, *, mechanism=None, ckpt_path=None, every=None, crash_at=None, **module_kw
):
    torch.manual_seed(0)
    dm = make_dm(num_train=48, expected=8.0, seed=7)
    module = make_module(noise_mechanism=mechanism, **module_kw)
    cbs = (
        [ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=every, save_top_k=-1)]
        if every
        else []
    )
    cbs += [CrashAt(crash_at)] if crash_at is not None else []
    trainer = make_trainer(root, max_steps=max_steps, callbacks=cbs)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    acct = next(c for c in trainer.callbacks if isinstance(c, PrivacyAccounting))
    return module, acct, dm


def test_one_band_is_dp_sgd_bit_for_bit(tmp_path):
    today, acct_today, _ = _fit(tmp_path / "a", 4)
    banded, acct_banded, dm = _fit(tmp_path / "b", 4, mechanism=BandedMF(bands=1))
    a, b = trainable(today), trainable(banded)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert acct_banded.accountant.history == acct_today.accountant.history
    assert acct_banded.epsilon() == acct_today.epsilon()
    assert type(dm._sampler).__name__ == "PoissonBatchSampler"


def test_banded_run_samples_cyclically_and_is_accounted_per_round(tmp_path):
    module, acct, dm = _fit(tmp_path, 8, mechanism=BandedMF(bands=4), noise_multiplier=1.2)
    assert isinstance(dm._sampler, CyclicPoissonBatchSampler) and dm._sampler.bands == 4
    q = 8.0 / 48
    assert acct.accountant.history == [(1.2, 4 * q, 2)]  # two rounds of 4 steps at rate 4 q
    state = module.noise_mechanism.state_dict()
    assert state["step"] == 8 and len(state["history"]) == 3
    trainable_names = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert set(state["history"][0]) == trainable_names
    report = json.loads((tmp_path / "privacy_report.json").read_text())
    assert report["steps"] == 8 and report["rounds"] == 2
    mech = report["mechanism"]["noise_mechanism"]
    assert mech["class_path"].endswith("BandedMF") and mech["bands"] == 4
    assert mech["coefficients"] == pytest.approx(bsr_coefficients(4), rel=1e-15)
    assert mech["sensitivity"] == pytest.approx(math.sqrt(sum(c * c for c in mech["coefficients"])))


def test_group_rate_above_one_is_refused_before_training(tmp_path):
    dm = make_dm(num_train=48, expected=16.0)  # q = 1/3: 4 bands would need a group rate 4/3
    module = make_module(noise_mechanism=BandedMF(bands=4))
    trainer = make_trainer(tmp_path, max_steps=2)
    with pytest.raises(ValueError, match="bands=4 times the sample rate"):
        trainer.fit(module, datamodule=dm)


def test_banded_crash_resume_equals_uninterrupted(tmp_path):
    # The checkpoint at step 4 is in the middle of the second round of 3 steps.
    full, acct_full, _ = _fit(tmp_path / "a", 7, mechanism=BandedMF(bands=3))
    with pytest.raises(Crash):  # the same 7-step run crashes after its step-4 checkpoint
        _fit(tmp_path / "b", 7, mechanism=BandedMF(bands=3), every=4, crash_at=4)
    ckpt = next((tmp_path / "b" / "ckpt").glob("*step=4*.ckpt"))
    saved = torch.load(ckpt, weights_only=False)["lit_dp"]["noise_mechanism"]
    assert saved["step"] == 4 and len(saved["history"]) == 2
    resumed, acct_res, _ = _fit(tmp_path / "c", 7, mechanism=BandedMF(bands=3), ckpt_path=str(ckpt))
    a, b = trainable(full), trainable(resumed)
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=0, atol=1e-6)
    assert acct_res.accountant.history == acct_full.accountant.history == [(1.0, 3 * 8 / 48, 3)]
    mine, theirs = resumed.noise_mechanism.state_dict(), full.noise_mechanism.state_dict()
    assert mine["step"] == theirs["step"] == 7
    for h_mine, h_theirs in zip(mine["history"], theirs["history"], strict=True):
        for n in h_theirs:
            torch.testing.assert_close(h_mine[n], h_theirs[n], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"resume with the model\.noise_mechanism"):
        _fit(tmp_path / "d", 7, mechanism=BandedMF(bands=2), ckpt_path=str(ckpt))


def test_a_fork_of_a_banded_run_is_refused(tmp_path):
    """A fork draws new sampling groups: a unit could take part twice within b steps."""
    _fit(tmp_path / "a", 4, mechanism=BandedMF(bands=2), every=2)
    ckpt = next((tmp_path / "a" / "ckpt").glob("*step=2*.ckpt"))
    dm = make_dm(num_train=48, expected=8.0, seed=7)
    trainer = make_trainer(tmp_path / "b", max_steps=4)
    acct = next(c for c in trainer.callbacks if isinstance(c, PrivacyAccounting))
    acct.resume_from(str(ckpt), fork=True)
    with pytest.raises(ValueError, match=r"refused for model\.noise_mechanism bands=2"):
        trainer.fit(make_module(noise_mechanism=BandedMF(bands=2)), datamodule=dm)
    assert trainer.global_step == 0


def test_calibration_uses_the_rounds(tmp_path):
    dm = make_dm(num_train=48, expected=8.0, seed=7)
    module = make_module(noise_mechanism=BandedMF(bands=2), noise_multiplier="auto")
    trainer = make_trainer(tmp_path, max_steps=6, target_epsilon=4.0)
    trainer.fit(module, datamodule=dm)
    acct = next(c for c in trainer.callbacks if isinstance(c, PrivacyAccounting))
    q = 8.0 / 48
    expected = calibrate_noise_multiplier(
        target_epsilon=4.0, delta=acct.delta, sample_rate=[2 * q] * 3, steps=3
    )
    assert module.noise_multiplier == expected
    assert acct.accountant.history == [(expected, 2 * q, 3)]
    assert 0.98 * 4.0 <= acct.epsilon() <= 4.0


@pytest.mark.parametrize(
    ("other", "coefficients"), [(2, None), (3, [1.0, 0.4, 0.2])], ids=["bands", "coefficients"]
)
def test_a_resume_with_another_strategy_is_refused_before_training(tmp_path, other, coefficients):
    """The run fingerprint holds the banded strategy: b and the coefficients."""
    _fit(tmp_path / "a", 4, mechanism=BandedMF(bands=3), every=2)
    ckpt = next((tmp_path / "a" / "ckpt").glob("*step=2*.ckpt"))
    mech = BandedMF(bands=other)
    if coefficients is not None:
        path = tmp_path / "coefficients.json"
        path.write_text(json.dumps(coefficients))
        mech = BandedMF(bands=other, coefficients_file=str(path))
    trainer = make_trainer(tmp_path / "b", max_steps=4)
    acct = next(c for c in trainer.callbacks if isinstance(c, PrivacyAccounting))
    acct.resume_from(str(ckpt))  # as `lit-dp fit --ckpt_path` does
    with pytest.raises(ValueError, match=r"(?s)not of this run.*model\.noise_mechanism"):
        trainer.fit(make_module(noise_mechanism=mech), datamodule=make_dm(48, 8.0, seed=7))
    assert trainer.global_step == 0
