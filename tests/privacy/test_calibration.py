"""Calibration under both accountants, checked by stepping a fresh accountant through the plan one
step at a time (as training does); accountant choice and the epsilon of a planned schedule."""

from __future__ import annotations

import pytest

from lit_dp.privacy.accountant import make_accountant
from lit_dp.privacy.calibration import calibrate_noise_multiplier, epsilon_for_schedule
from lit_dp.privacy.pld_accountant import PLDAccountant
from lit_dp.privacy.rdp_accountant import RDPAccountant

PLANS = [
    pytest.param(8.0, 0.125, 8, id="tiny-config"),
    pytest.param(8.0, 0.05, 300, id="constant-eps8"),
    pytest.param(1.0, 0.02, 400, id="constant-eps1"),
    pytest.param(3.0, [0.005] * 30 + [0.01] * 50 + [0.02] * 20, 100, id="three-phases"),
    pytest.param(50.0, 0.5, 10, id="large-eps"),
    # 200 distinct rates over 1.25x: 23 points of the 1 % rate grid (a PLD each per candidate
    # sigma; wider ramps cost proportionally more, see benchmarks/README.md).
    pytest.param(1.0, [0.01 + 0.0025 * t / 200 for t in range(200)], 200, id="ramp-200-rates"),
]


def _stepped_epsilon(accountant, sigma, rates, delta):
    for q in rates:  # one step at a time, the way PrivacyAccounting steps during training
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
@pytest.mark.parametrize(("target", "sample_rate", "steps"), PLANS)
def test_calibrated_sigma_lands_within_two_percent_below_target(
    accountant, target, sample_rate, steps
):
    delta = 1e-5
    sigma = calibrate_noise_multiplier(
        target_epsilon=target, delta=delta, sample_rate=sample_rate, steps=steps,
        accountant=accountant,
    )  # fmt: skip
    rates = sample_rate if isinstance(sample_rate, list) else [sample_rate] * steps
    eps = _stepped_epsilon(make_accountant(accountant), sigma, rates, delta)
    assert 0.98 * target <= eps <= target


@pytest.mark.parametrize(("target", "sample_rate", "steps"), PLANS[:-1])
def test_pld_needs_less_noise_than_rdp(target, sample_rate, steps):
    kwargs = {"target_epsilon": target, "delta": 1e-5, "sample_rate": sample_rate, "steps": steps}
    pld = calibrate_noise_multiplier(**kwargs, accountant="pld")
    rdp = calibrate_noise_multiplier(**kwargs, accountant="rdp")
    assert pld < rdp


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_epsilon_for_schedule_equals_stepping(accountant):
    rates = [0.01] * 50 + [0.012 + 0.0001 * t for t in range(30)]
    eps = epsilon_for_schedule(
        noise_multiplier=0.9, delta=1e-6, sample_rate=rates, steps=80, accountant=accountant
    )
    stepped = _stepped_epsilon(make_accountant(accountant), 0.9, rates, 1e-6)
    assert eps == pytest.approx(stepped, rel=1e-8)


def test_make_accountant():
    assert isinstance(make_accountant("pld"), PLDAccountant)
    assert isinstance(make_accountant("rdp"), RDPAccountant)
    with pytest.raises(ValueError, match=r"privacy\.accountant"):
        make_accountant("gdp")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"accountant": "gdp"}, "accountant", id="accountant"),
        pytest.param({"target_epsilon": 0.0}, "target_epsilon", id="eps-zero"),
        pytest.param({"delta": 1.5}, "delta", id="delta"),
        pytest.param({"sample_rate": [0.01] * 3}, "sample_rate", id="rate-length"),
        pytest.param({"sample_rate": 0.0}, "sample_rate", id="rate-all-zero"),
        pytest.param({"steps": 0}, "steps", id="steps-zero"),
        pytest.param({"max_noise_multiplier": 0.0}, "max_noise_multiplier", id="max-sigma"),
        pytest.param(
            {
                "target_epsilon": 0.01,
                "sample_rate": 1.0,
                "steps": 1000,
                "max_noise_multiplier": 5.0,
            },
            "unreachable",
            id="unreachable",
        ),
    ],
)
def test_calibrate_rejects_bad_input(kwargs, match):
    args = {"target_epsilon": 1.0, "delta": 1e-5, "sample_rate": 0.01, "steps": 10}
    with pytest.raises(ValueError, match=match):
        calibrate_noise_multiplier(**{**args, **kwargs})
