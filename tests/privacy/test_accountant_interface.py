"""The accountants' shared interface: both satisfy the ``Accountant`` protocol, and pricing a
ledger with ``epsilon_of_ledger`` equals restoring it into a fresh accountant (the checkpoint
path, bit for bit) without touching the accountant's own ledger; calibration under either
accountant goes through the one solver."""

from __future__ import annotations

import math

import pytest

from lit_dp.privacy import calibration
from lit_dp.privacy.accountant import Accountant, make_accountant

LEDGERS = [
    pytest.param([[1.1, 0.05, 30], [0.9, 0.08, 5]], id="two-runs"),
    pytest.param([[1.0, 0.01, 3], [1.0, 0.0, 4], [1.0, 0.0105, 2], [1.0, 0.01, 1]], id="ramp"),
    pytest.param([[0.0, 0.0, 3], [0.8, 0.2, 2]], id="zero-rate-noise-free"),
]


@pytest.mark.parametrize("name", ["pld", "rdp"])
def test_both_accountants_satisfy_the_protocol(name):
    assert isinstance(make_accountant(name), Accountant)


@pytest.mark.parametrize("name", ["pld", "rdp"])
@pytest.mark.parametrize("ledger", LEDGERS)
def test_epsilon_of_ledger_equals_a_restored_ledger_and_changes_no_state(name, ledger):
    delta = 1e-6
    restored = make_accountant(name)
    state = restored.state_dict()
    restored.load_state_dict({**state, "history": ledger})
    expected = restored.get_epsilon(delta)

    own = make_accountant(name)
    own.step(noise_multiplier=2.0, sample_rate=0.3, num_steps=2)
    before_state, before_eps = own.state_dict(), own.get_epsilon(delta)
    assert own.epsilon_of_ledger(ledger, delta=delta) == expected  # bit for bit
    assert own.state_dict() == before_state
    assert own.get_epsilon(delta) == before_eps
    assert 0.0 < expected < math.inf


@pytest.mark.parametrize("name", ["pld", "rdp"])
def test_epsilon_of_ledger_edge_cases(name):
    acct = make_accountant(name)
    assert acct.epsilon_of_ledger([], delta=1e-5) == 0.0
    assert acct.epsilon_of_ledger([[0.0, 0.1, 1]], delta=1e-5) == math.inf
    with pytest.raises(ValueError, match="sample_rate"):
        acct.epsilon_of_ledger([[1.0, 1.5, 1]], delta=1e-5)
    with pytest.raises(ValueError, match="history entry"):
        acct.epsilon_of_ledger([[1.0, 0.1]], delta=1e-5)


@pytest.mark.parametrize("name", ["pld", "rdp"])
def test_calibration_uses_the_one_solver(name, monkeypatch):
    calls = []
    solve = calibration.solve_noise_multiplier

    def spy(*args, **kwargs):
        calls.append(kwargs["target"])
        return solve(*args, **kwargs)

    monkeypatch.setattr(calibration, "solve_noise_multiplier", spy)
    sigma = calibration.calibrate_noise_multiplier(
        target_epsilon=4.0, delta=1e-5, sample_rate=0.1, steps=20, accountant=name
    )
    assert calls and sigma > 0
    assert max(calls) <= 4.0
