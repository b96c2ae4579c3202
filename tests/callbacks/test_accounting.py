"""PrivacyAccounting: both ledgers survive a checkpoint, the accountant of a checkpoint must match
the run's (checkpoints from before the accountant was selectable load as RDP), the default delta,
explicit deltas, and the refusal of a budget stop that Lightning's min_steps / min_epochs would
turn into an endless run."""

from __future__ import annotations

import warnings

import pytest
from module_helpers import quiet_trainer

from lit_dp.callbacks.accounting import PrivacyAccounting, check_delta, default_delta
from lit_dp.data import ConstantBatchSize, SyntheticDataModule
from lit_dp.models import tiny_tokenizer
from lit_dp.module import DPCausalLM
from lit_dp.privacy.clipping import FixedClip
from lit_dp.privacy.pld_accountant import PLDAccountant
from lit_dp.privacy.rdp_accountant import RDPAccountant

STEPS = [(1.1, 0.05, 30), (0.9, 0.08, 5)]


def _stepped(accountant: str) -> PrivacyAccounting:
    cb = PrivacyAccounting(accountant=accountant)
    cb.delta = 1e-5
    for sigma, q, n in STEPS:
        for _ in range(n):  # as on_train_batch_end does: the chosen ledger and the RDP one
            cb.accountant.step(noise_multiplier=sigma, sample_rate=q)
            if cb.rdp is not cb.accountant:
                cb.rdp.step(noise_multiplier=sigma, sample_rate=q)
    return cb


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_state_dict_round_trip_restores_both_ledgers(accountant):
    cb = _stepped(accountant)
    restored = PrivacyAccounting(accountant=accountant)
    restored.delta = 1e-5
    restored.load_state_dict(cb.state_dict())
    assert restored.accountant.history == cb.accountant.history == cb.rdp.history
    assert restored.accountant.total_steps == 35
    assert restored.epsilon() == pytest.approx(cb.epsilon(), rel=1e-9)
    assert restored.rdp.get_epsilon(1e-5) == pytest.approx(cb.rdp.get_epsilon(1e-5), rel=1e-12)
    expected = PLDAccountant if accountant == "pld" else RDPAccountant
    assert isinstance(restored.accountant, expected)
    if accountant == "pld":  # the report's two figures: PLD below RDP
        assert restored.epsilon() < restored.rdp.get_epsilon(1e-5)


def test_checkpoint_of_another_accountant_is_refused():
    state = _stepped("rdp").state_dict()
    with pytest.raises(ValueError, match=r"privacy\.accountant: rdp"):
        PrivacyAccounting(accountant="pld").load_state_dict(state)


def test_checkpoint_without_accountant_name_is_an_rdp_ledger():
    state = _stepped("rdp").state_dict()
    del state["accountant_name"]  # written before privacy.accountant existed
    cb = PrivacyAccounting(accountant="rdp")
    cb.load_state_dict(state)
    assert cb.accountant.total_steps == 35
    with pytest.raises(ValueError, match=r"privacy\.accountant"):
        PrivacyAccounting(accountant="pld").load_state_dict(state)


def test_unknown_accountant_is_refused():
    with pytest.raises(ValueError, match=r"privacy\.accountant='gdp'"):
        PrivacyAccounting(accountant="gdp")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("num_units", "expected"),
    [
        (12, 1e-5),
        (256, 1e-5),
        (35_000, 1e-5),
        (36_000, 1 / 36_000**1.1),
        (10**7, 1 / (10**7) ** 1.1),
    ],
    ids=["12-users", "N256", "N35k", "N36k", "N1e7"],
)
def test_default_delta_is_min_of_1e5_and_inverse_n_pow_1_1(num_units, expected):
    # 1/N^1.1 alone: 0.065 for 12 users, 0.0022 at N = 256; it drops below 1e-5 at N ~ 35,112.
    assert default_delta(num_units) == pytest.approx(expected, rel=1e-12)
    assert default_delta(num_units) < 1 / num_units
    check_delta(default_delta(num_units), num_units)  # the default never warns or fails


def test_explicit_delta_above_1e5_warns_and_at_or_above_1_over_n_fails():
    with pytest.warns(UserWarning, match=r"privacy.delta=0.0001 is above 1e-5"):
        check_delta(1e-4, 256)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_delta(1e-5, 256)
        check_delta(1e-6, 256)
    with pytest.raises(ValueError, match=r"privacy.delta=0.004 must be below 1/N = 0.00390625"):
        check_delta(1 / 250, 256)


@pytest.mark.parametrize(
    ("limits", "named"),
    [({"min_steps": 3}, "trainer.min_steps=3"), ({"min_epochs": 2}, "trainer.min_epochs=2")],
    ids=["min_steps", "min_epochs"],
)
def test_budget_stop_with_a_minimum_length_is_refused_before_training(tmp_path, limits, named):
    dm = SyntheticDataModule(
        tokenizer=tiny_tokenizer(),
        num_train=32,
        num_val=0,
        num_test=0,
        max_length=512,
        batch_schedule=ConstantBatchSize(8.0),
        sampling_seed=0,
    )
    module = DPCausalLM(
        model="tiny-qwen2",
        noise_multiplier=1.0,
        clipping=FixedClip(1.0),
        eval_before_fit=False,
    )
    trainer = quiet_trainer(tmp_path, 50, [PrivacyAccounting(target_epsilon=3.0)], **limits)
    with pytest.raises(ValueError, match=rf"{named} cannot be combined with the budget stop"):
        trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 0
    # Without a budget, the minimum length is allowed.
    trainer = quiet_trainer(tmp_path, 2, [PrivacyAccounting(target_epsilon=None)], min_steps=1)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
