"""PrivacyAccounting's state: both ledgers survive a checkpoint, the accountant of a checkpoint
must match the run's, and checkpoints from before the accountant was selectable load as RDP."""

from __future__ import annotations

import pytest

from lit_dp.callbacks.accounting import PrivacyAccounting
from lit_dp.privacy.accountant import RDPAccountant
from lit_dp.privacy.pld import PLDAccountant

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
