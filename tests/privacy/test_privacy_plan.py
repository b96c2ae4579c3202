"""PrivacyPlan: the delta default and check, calibration, the noise it implies, epsilon per
step, the budget-stop step and the noise-mechanism slot, each against an independent
computation (accountants stepped one step at a time, the clip estimator's own Theorem 1)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from lit_dp.privacy.clipping import PrivateQuantile
from lit_dp.privacy.plan import PrivacyPlan, default_delta
from lit_dp.privacy.pld_accountant import PLDAccountant
from lit_dp.privacy.rdp_accountant import RDPAccountant
from lit_dp.privacy.sampling import SampleRateSchedule

CONSTANT = SampleRateSchedule.constant(0.125)
RAMP = SampleRateSchedule.linear(start_rate=0.05, end_rate=0.1, ramp_steps=6)


def _plan(**kw):
    args = dict(
        num_units=256, schedule=CONSTANT, steps=8, noise_multiplier="auto", target_epsilon=8.0
    )
    return PrivacyPlan.create(**{**args, **kw})


def _stepped(accountant, sigma, rates, delta):
    out = []
    for q in rates:
        accountant.step(noise_multiplier=sigma, sample_rate=q)
        out.append(accountant.get_epsilon(delta))
    return out


@pytest.mark.parametrize(("n", "expected"), [(256, 1e-5), (12, 1e-5), (10**5, 10**-5.5)])
def test_delta_default_is_min_of_1e5_and_n_to_minus_1_1(n, expected):
    plan = _plan(num_units=n, noise_multiplier=1.0, target_epsilon=None)
    assert plan.delta == pytest.approx(expected, rel=1e-12)
    assert plan.delta_is_default
    assert default_delta(n) == plan.delta


def test_delta_checks_name_the_field():
    with pytest.raises(ValueError, match=r"privacy\.delta=0.01 must be below 1/N"):
        _plan(num_units=100, delta=0.01)
    messages = []
    plan = _plan(num_units=100, delta=1e-3, noise_multiplier=1.0, warn=messages.append)
    assert plan.delta == 1e-3 and not plan.delta_is_default
    assert len(messages) == 1 and "above 1e-5" in messages[0]


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
@pytest.mark.parametrize("schedule", [CONSTANT, RAMP], ids=["constant", "ramp"])
def test_calibrated_plan_spends_the_budget_when_stepped(accountant, schedule):
    plan = _plan(schedule=schedule, accountant=accountant, steps=12, target_epsilon=6.0)
    assert plan.calibrated and isinstance(plan.noise_multiplier, float)
    acct = PLDAccountant() if accountant == "pld" else RDPAccountant()
    rates = [schedule.rate(t) for t in range(12)]
    eps = _stepped(acct, plan.noise_multiplier, rates, plan.delta)
    assert 0.98 * 6.0 <= eps[-1] <= 6.0
    assert plan.epsilon_curve(12) == eps  # the curve is training's composition
    for k in (1, 5, 12):
        assert plan.epsilon_after(k) == pytest.approx(eps[k - 1], rel=1e-8)


def test_budget_stop_step_is_the_last_step_within_the_target():
    plan = _plan(noise_multiplier=1.0, accountant="rdp", target_epsilon=3.0, steps=10)
    eps = _stepped(RDPAccountant(), 1.0, [0.125] * 10, plan.delta)
    expected = max(k for k in range(11) if k == 0 or eps[k - 1] <= 3.0)
    assert 0 < expected < 10
    assert plan.budget_stop_step() == expected
    assert _plan(noise_multiplier=1.0, target_epsilon=100.0).budget_stop_step() is None


def test_fixed_sigma_over_budget_in_one_step_and_auto_without_target_are_refused():
    with pytest.raises(ValueError, match=r"target_epsilon=0.5 is unreachable: one step"):
        _plan(noise_multiplier=0.5, target_epsilon=0.5)
    with pytest.raises(ValueError, match=r"needs privacy\.target_epsilon and trainer\.max_steps"):
        _plan(target_epsilon=None)
    with pytest.raises(ValueError, match=r"unreachable in 8 steps"):
        _plan(target_epsilon=1e-4)


@pytest.mark.parametrize("step", [0, 3, 6, 9])
def test_noise_raising_matches_the_private_quantile_estimator(step):
    plan = _plan(
        schedule=RAMP, count_noise_divisor=5.0, max_grad_norm=0.5, noise_multiplier=0.9,
        num_units=1024, target_epsilon=None,
    )  # fmt: skip
    expected_batch = RAMP.rate(step) * 1024
    z = PrivateQuantile(initial_clip=0.5, count_noise_divisor=5.0).grad_noise_multiplier(
        noise_multiplier=0.9, expected_batch_size=expected_batch
    )
    assert plan.grad_noise_multiplier(step) == pytest.approx(z, rel=1e-15)
    assert plan.noise_std(step) == pytest.approx(z * 0.5 / expected_batch, rel=1e-15)
    # Theorem 1: the gradient and count precisions add up to the accounted one.
    share = plan.count_noise_share(step)
    assert z**-2 == pytest.approx(0.9**-2 * (1 - share), rel=1e-12)
    assert _plan(noise_multiplier=0.9).grad_noise_multiplier(step) == 0.9


def test_the_plan_is_frozen():
    plan = _plan(noise_multiplier=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.noise_multiplier = 2.0  # type: ignore[misc]


class _Rounds:
    """A mechanism accounted once per round of 2 steps at rate 2 q (as banded MF with b = 2)."""

    bands = 2
    sensitivity = 1.25

    def round_sample_rates(self, rate_of, steps):
        return [min(1.0, 2 * rate_of(t)) for t in range(0, steps, 2)]

    def describe(self):
        return {"bands": 2}


def test_a_mechanism_with_its_own_event_sets_the_ledger_and_the_calibration():
    plan = _plan(mechanism=_Rounds(), accountant="rdp", steps=8, target_epsilon=5.0)
    assert plan.ledger(8) == [[plan.noise_multiplier, 0.25, 4]]
    assert plan.ledger(3) == [[plan.noise_multiplier, 0.25, 2]]  # a round is charged at its start
    eps = _stepped(RDPAccountant(), plan.noise_multiplier, [0.25] * 4, plan.delta)
    assert 0.99 * 5.0 <= eps[-1] <= 5.0
    assert plan.describe()["noise_mechanism"] == {"bands": 2}
    assert plan.noise_std(0) == pytest.approx(plan.noise_multiplier * 1.25 / 32, rel=1e-15)
    assert plan.budget_stop_step() is None


def test_a_fork_plan_counts_the_steps_taken():
    taken = [[1.2, 0.125, 4]]
    plan = _plan(steps=10, taken=taken, first_step=4, target_epsilon=6.0)
    assert plan.ledger(10) == [[1.2, 0.125, 4], [plan.noise_multiplier, 0.125, 6]]
    acct = PLDAccountant()
    acct.step(noise_multiplier=1.2, sample_rate=0.125, num_steps=4)
    eps = _stepped(acct, plan.noise_multiplier, [0.125] * 6, plan.delta)
    assert 0.98 * 6.0 <= eps[-1] <= 6.0
    assert math.isfinite(plan.epsilon_after(10))


def test_a_mechanism_round_stops_the_budget_at_a_round_boundary():
    eps = _stepped(RDPAccountant(), 1.5, [0.25] * 4, 1e-5)
    target = (eps[1] + eps[2]) / 2  # two rounds fit, a third would pass the target
    plan = _plan(
        mechanism=_Rounds(), accountant="rdp", steps=8, target_epsilon=target,
        noise_multiplier=1.5,
    )  # fmt: skip
    assert plan.budget_stop_step() == 4  # 2 rounds of 2 steps; step 4 would start the third
    assert plan.epsilon_after(4) == pytest.approx(eps[1], rel=1e-12)
    assert plan.epsilon_after(5) == pytest.approx(eps[2], rel=1e-12)  # charged at its start
