"""The report's accountant description states what the PLD accountant's rate rounding costs in
this run, and the stated bound holds against the composition of the exact rates."""

from __future__ import annotations

import re

import pytest

from lit_dp.privacy.accountant import ACCOUNTANTS, describe_accountant
from lit_dp.privacy.pld_accountant import PLDAccountant
from lit_dp.privacy.rdp_accountant import RDPAccountant
from lit_dp.privacy.sampling import SampleRateSchedule


def _stepped(rates, sigma, **kw):
    acc = PLDAccountant(**kw)
    for q in rates:
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc


def _grid_rounding(rates, resolution=0.01):
    """Reference: the largest q_rounded / q - 1, q_rounded the smallest grid point
    anchor * (1 + resolution)^k >= q (k any integer, anchor the first rate), capped at 1."""
    grid = [rates[0] * (1 + resolution) ** k for k in range(-400, 400)]
    return max(min(1.0, min(g for g in grid if g >= q)) / q - 1 for q in rates)


@pytest.mark.parametrize(
    ("sigma", "start", "end", "steps"),
    [(1.0, 0.01, 0.05, 30), (3.0, 0.05, 0.005, 60)],
    ids=["rising", "falling"],
)
def test_described_rounding_bound_holds_for_a_ramp(sigma, start, end, steps):
    rates = SampleRateSchedule.linear(start_rate=start, end_rate=end, ramp_steps=steps).rates(steps)
    rounded, exact = _stepped(rates, sigma), _stepped(rates, sigma, sample_rate_resolution=0.0)
    eps_rounded, eps_exact = rounded.get_epsilon(1e-5), exact.get_epsilon(1e-5)
    r = rounded.rate_rounding()
    assert r == pytest.approx(_grid_rounding(rates), rel=1e-9) and 0.0 < r <= 0.01
    text = describe_accountant("pld", rounded)
    assert text.startswith(ACCOUNTANTS["pld"])
    stated = re.search(r"rounded up by at most ([\d.]+) %.*at most about ([\d.]+) % above", text)
    assert stated is not None
    assert float(stated.group(1)) == pytest.approx(100 * r, rel=1e-2)
    bound = float(stated.group(2)) / 100
    # An upper bound of the exact-rate epsilon, no more than the stated share above it.
    assert eps_exact <= eps_rounded <= eps_exact * (1 + bound)
    # The effect is a relative one, larger than the discretization's 1e-3 alone would suggest.
    assert eps_rounded - eps_exact > 1e-3


def test_constant_rate_is_described_as_exact():
    acc = _stepped([0.02] * 50, 1.0)
    assert acc.rate_rounding() == 0.0
    assert "every sample rate composed exactly" in describe_accountant("pld", acc)
    rdp = RDPAccountant()
    rdp.step(noise_multiplier=1.0, sample_rate=0.02, num_steps=50)
    assert describe_accountant("rdp", rdp) == ACCOUNTANTS["rdp"]


def test_generic_description_no_longer_claims_1e_3_overall():
    assert "1.2 %" in ACCOUNTANTS["pld"] and "within ~1e-3" not in ACCOUNTANTS["pld"]
