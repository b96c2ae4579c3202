"""RDP accountant: pinned values, dp-accounting, mpmath integration of the Renyi divergence,
closed forms, composition, checkpointing, peek, calibration and argument errors."""

from __future__ import annotations

import copy
import itertools
import json
import math
import time

import mpmath as mp
import numpy as np
import pytest

from lit_dp.privacy.calibration import calibrate_rdp_noise_multiplier
from lit_dp.privacy.rdp import DEFAULT_ORDERS, OPACUS_ORDERS, compute_rdp, rdp_to_epsilon
from lit_dp.privacy.rdp_accountant import RDPAccountant

# Heterogeneous schedules of (noise_multiplier, sample_rate, num_steps) runs.
SCHEDULES = [
    pytest.param([(1.5, 0.04, 2250)], id="opacus-pinned"),
    pytest.param([(1.1, 0.01, 500), (0.9, 0.02, 300), (2.0, 0.005, 1000)], id="three-runs"),
    pytest.param([(0.7, 0.3, 10), (5.0, 0.9, 3), (1.0, 1.0, 2), (1.2, 0.0, 7)], id="edge-rates"),
    pytest.param([(0.8, 0.1, 100), (1.3, 0.02, 400)], id="two-runs"),
]


def _dp_accounting_rdp(schedule, orders):
    """Per-order RDP from dp-accounting's RdpAccountant, an independent implementation."""
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    acc = rdp_privacy_accountant.RdpAccountant(list(orders))
    for sigma, q, n in schedule:
        event = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))
        acc.compose(dp_event.SelfComposedDpEvent(event, n))
    return np.asarray(acc._rdp, dtype=float), acc


def _mpmath_rdp(alpha: float, q: float, sigma: float) -> float:
    """D_alpha((1-q) N(0,s^2) + q N(1,s^2) || N(0,s^2)) by numerical integration (40 digits).

    Integrates f^alpha - 1 - alpha (f - 1) (>= 0; E[f - 1] = 0) so that log1p keeps the digits of a
    small divergence; breakpoints at the crossover z0 and the mode alpha of the tilted Gaussian.
    """
    with mp.workdps(40):
        a, q, s = mp.mpf(alpha), mp.mpf(q), mp.mpf(sigma)
        z0 = s * s * mp.log((1 - q) / q) + mp.mpf(1) / 2

        def integrand(z):
            ratio_minus_1 = q * (mp.exp((2 * z - 1) / (2 * s * s)) - 1)  # f - 1
            return mp.npdf(z, 0, s) * ((1 + ratio_minus_1) ** a - 1 - a * ratio_minus_1)

        points = sorted({-mp.inf, z0 - 5 * s, z0, z0 + 5 * s, a - 5 * s, a, a + 5 * s, mp.inf})
        return float(mp.log1p(mp.quad(integrand, points)) / (a - 1))


# --- reference values ------------------------------------------------------------------------
def test_pinned_opacus_epsilon():
    acc = RDPAccountant(orders=OPACUS_ORDERS)
    acc.step(noise_multiplier=1.5, sample_rate=0.04, num_steps=2250)
    eps, order = acc.get_privacy_spent(delta=1e-5)
    assert eps == pytest.approx(7.32911117143, rel=1e-9)
    assert order == 3.9
    assert acc.get_epsilon(1e-5) == eps


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_matches_dp_accounting_at_integer_orders(schedule):
    # Integer orders: both sides use the exact binomial expansion; so does epsilon.
    orders = [*range(2, 64), 128, 256]
    ref, ref_acc = _dp_accounting_rdp(schedule, orders)
    acc = RDPAccountant(orders=orders)
    for sigma, q, n in schedule:
        acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=n)
    np.testing.assert_allclose(acc.get_rdp(), ref, rtol=1e-9, atol=0)
    eps, order = acc.get_privacy_spent(delta=1e-5)
    ref_eps, ref_order = ref_acc.get_epsilon_and_optimal_order(1e-5)
    assert eps == pytest.approx(ref_eps, rel=1e-9)
    assert order == ref_order


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_dp_accounting_fractional_orders_are_conservative(schedule):
    # dp-accounting's fractional series (mpmath-checked below) overestimates: ~5e-5 relative at
    # order 3.9 and up to ~18% at order 1.1 (it even gives inf for q=0.3, sigma=0.7 at orders < 2).
    # Ours matches numerical integration, so: theirs >= ours everywhere, close at orders >= 5.
    orders = np.asarray(OPACUS_ORDERS, dtype=float)
    ref, ref_acc = _dp_accounting_rdp(schedule, orders)
    acc = RDPAccountant(orders=OPACUS_ORDERS)
    for sigma, q, n in schedule:
        acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=n)
    ours = acc.get_rdp()
    frac = orders != np.round(orders)
    assert np.all(ref[frac] >= ours[frac] * (1 - 1e-12))
    high = frac & (orders >= 5)
    np.testing.assert_allclose(ours[high], ref[high], rtol=1e-4, atol=0)
    eps = acc.get_epsilon(1e-5)
    ref_eps = ref_acc.get_epsilon(1e-5)
    assert eps <= ref_eps * (1 + 1e-12)
    assert eps == pytest.approx(ref_eps, rel=1e-2)


def test_fractional_order_is_exact_where_dp_accounting_is_not():
    # dp-accounting gives 4.124928 at order 3.9 for this run; the exact divergence is 4.124705.
    rdp = compute_rdp(noise_multiplier=1.5, sample_rate=0.04, num_steps=2250, orders=[3.9])
    assert rdp[0] == pytest.approx(4.124705, rel=1e-6)
    assert rdp[0] == pytest.approx(2250 * _mpmath_rdp(3.9, 0.04, 1.5), rel=1e-10)


@pytest.mark.parametrize(
    ("alpha", "q", "sigma"),
    [
        pytest.param(3.9, 0.04, 1.5, id="opacus-3.9"),
        pytest.param(1.1, 0.5, 0.5, id="low-order-high-q"),
        pytest.param(1.5, 0.01, 1.0, id="frac-1.5"),
        pytest.param(10.5, 0.2, 0.8, id="frac-10.5"),
        pytest.param(2.5, 1e-4, 2.0, id="tiny-q"),
        pytest.param(1.7, 0.9, 0.7, id="q-above-half"),
        pytest.param(1.5, 1e-6, 20.0, id="cost-1e-15"),
        pytest.param(2.5, 1e-9, 1000.0, id="huge-sigma"),
        pytest.param(6.5, 0.5, 0.2, id="tiny-sigma"),
        pytest.param(50.5, 0.01, 2.0, id="frac-50.5"),
        pytest.param(4.0, 0.04, 1.5, id="int-4"),
        pytest.param(33.0, 0.01, 0.8, id="int-33"),
    ],
)
def test_matches_mpmath_integration(alpha, q, sigma):
    rdp = compute_rdp(noise_multiplier=sigma, sample_rate=q, num_steps=1, orders=[alpha])[0]
    assert rdp == pytest.approx(_mpmath_rdp(alpha, q, sigma), rel=1e-8)


@pytest.mark.parametrize(
    ("q", "sigma"),
    [
        pytest.param(1e-9, 1000.0, id="tiny-q-huge-sigma"),
        pytest.param(1e-4, 0.3, id="small-q-small-sigma"),
        pytest.param(0.02, 1.0, id="typical"),
        pytest.param(0.5, 0.1, id="half-tiny-sigma"),
        pytest.param(0.99, 5.0, id="q-near-one"),
    ],
)
def test_rdp_is_monotone_and_continuous_in_order(q, sigma):
    # D_alpha is non-decreasing in alpha: a cross-check of the fractional series against the
    # integer expansion on one grid, including orders within 1e-7 of an integer.
    orders = np.array(sorted([*DEFAULT_ORDERS, 2.9999999, 3.0000001, 20.5, 63.5]))
    rdp = compute_rdp(noise_multiplier=sigma, sample_rate=q, num_steps=1, orders=orders)
    assert np.all(np.isfinite(rdp)) and np.all(rdp > 0)
    assert np.all(np.diff(rdp) >= -1e-9 * rdp[1:])
    at3 = rdp[np.isin(orders, [2.9999999, 3.0, 3.0000001])]
    np.testing.assert_allclose(at3, at3[1], rtol=1e-5)


# --- closed forms and composition --------------------------------------------------------------
@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0], ids=lambda s: f"sigma{s}")
def test_full_batch_is_gaussian_mechanism(sigma):
    orders = np.asarray(DEFAULT_ORDERS, dtype=float)
    rdp = compute_rdp(noise_multiplier=sigma, sample_rate=1.0, num_steps=3, orders=orders)
    np.testing.assert_allclose(rdp, 3 * orders / (2 * sigma**2), rtol=1e-15)


def test_q_near_one_approaches_gaussian_mechanism():
    orders = [1.5, 2.0, 7.3, 12.0]
    near = compute_rdp(noise_multiplier=1.0, sample_rate=1 - 1e-9, num_steps=1, orders=orders)
    np.testing.assert_allclose(near, np.asarray(orders) / 2.0, rtol=1e-6)


def test_zero_rate_costs_nothing_and_zero_noise_is_infinite():
    rdp = compute_rdp(noise_multiplier=0.0, sample_rate=0.0, num_steps=5, orders=DEFAULT_ORDERS)
    assert np.all(rdp == 0.0)
    acc = RDPAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.0, num_steps=100)
    assert acc.get_epsilon(1e-5) == 0.0
    acc.step(noise_multiplier=0.0, sample_rate=0.01)
    assert acc.get_epsilon(1e-5) == math.inf


def test_empty_ledger_has_zero_epsilon():
    acc = RDPAccountant()
    assert acc.total_steps == 0
    assert acc.get_epsilon(1e-5) == 0.0


def test_epsilon_grows_with_steps():
    acc = RDPAccountant()
    eps = []
    for _ in range(5):
        acc.step(noise_multiplier=1.0, sample_rate=0.02, num_steps=200)
        eps.append(acc.get_epsilon(1e-6))
    assert all(b > a for a, b in itertools.pairwise(eps))
    assert acc.history == [(1.0, 0.02, 1000)]  # equal (sigma, q) merge into one run
    assert acc.total_steps == 1000


def test_heterogeneous_ledger_is_sum_of_parts():
    runs = [(1.1, 0.01, 50), (0.8, 0.05, 20), (1.1, 0.01, 30), (3.0, 0.5, 4)]
    acc = RDPAccountant()
    for sigma, q, n in runs:
        acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=n)
    parts = sum(
        compute_rdp(noise_multiplier=s, sample_rate=q, num_steps=n, orders=DEFAULT_ORDERS)
        for s, q, n in runs
    )
    np.testing.assert_allclose(acc.get_rdp(), parts, rtol=1e-13)
    assert acc.history == [tuple(r) for r in runs]
    assert acc.total_steps == 104
    expected = rdp_to_epsilon(orders=DEFAULT_ORDERS, rdp=parts, delta=1e-5)
    assert acc.get_privacy_spent(delta=1e-5) == pytest.approx(expected, rel=1e-12)


def test_balle_conversion_formula():
    orders = np.array([2.0, 8.0, 32.0])
    rdp = np.array([0.5, 1.0, 3.0])
    delta = 1e-6
    by_hand = (
        rdp - (math.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)
    )
    eps, order = rdp_to_epsilon(orders=orders, rdp=rdp, delta=delta)
    assert eps == pytest.approx(by_hand.min(), rel=1e-14)
    assert order == orders[np.argmin(by_hand)]


def test_long_ledger_is_fast():
    acc = RDPAccountant()
    start = time.perf_counter()
    for t in range(10_000):  # alternating rates: 10,000 runs that never merge, 2 cached vectors
        acc.step(noise_multiplier=1.0, sample_rate=0.01 if t % 2 else 0.02)
        if t % 1000 == 0:
            acc.get_epsilon(1e-5)
    eps = acc.get_epsilon(1e-5)
    assert time.perf_counter() - start < 5.0
    assert len(acc.history) == 10_000
    ref = RDPAccountant()
    ref.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=5000)
    ref.step(noise_multiplier=1.0, sample_rate=0.02, num_steps=5000)
    assert eps == pytest.approx(ref.get_epsilon(1e-5), rel=1e-10)


# --- state ----------------------------------------------------------------------------------
def test_state_dict_json_round_trip():
    acc = RDPAccountant(orders=OPACUS_ORDERS)
    acc.step(noise_multiplier=1.3, sample_rate=0.02, num_steps=40)
    acc.step(noise_multiplier=0.9, sample_rate=0.05, num_steps=7)
    restored = RDPAccountant()  # default orders: the loaded orders replace them
    restored.load_state_dict(json.loads(json.dumps(acc.state_dict())))
    assert restored.history == acc.history
    assert restored.total_steps == 47
    np.testing.assert_array_equal(restored.orders, acc.orders)
    assert restored.get_epsilon(1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-14)
    # Resume: both continue identically.
    for a in (acc, restored):
        a.step(noise_multiplier=0.9, sample_rate=0.05, num_steps=3)
    assert restored.state_dict() == acc.state_dict()
    assert restored.get_epsilon(1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-14)


@pytest.mark.parametrize(
    ("state", "match"),
    [
        pytest.param({"orders": [2.0], "history": [], "extra": 1}, "extra", id="unknown-key"),
        pytest.param({"orders": [2.0]}, "history", id="missing-history"),
        pytest.param({"history": []}, "orders", id="missing-orders"),
        pytest.param({"orders": [2.0], "history": [[1.0, 2.0, 3]]}, "sample_rate", id="bad-rate"),
        pytest.param({"orders": [2.0], "history": [[1.0, 0.1]]}, "history", id="short-entry"),
        pytest.param({"orders": [0.5], "history": []}, "orders", id="bad-orders"),
    ],
)
def test_load_state_dict_rejects_bad_state(state, match):
    with pytest.raises(ValueError, match=match):
        RDPAccountant().load_state_dict(state)


def test_peek_epsilon_equals_stepping_a_copy_and_does_not_mutate():
    acc = RDPAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=100)
    before = acc.state_dict()
    eps_before = acc.get_epsilon(1e-5)
    peek = acc.peek_epsilon(delta=1e-5, noise_multiplier=0.8, sample_rate=0.03, num_steps=25)
    stepped = copy.deepcopy(acc)
    stepped.step(noise_multiplier=0.8, sample_rate=0.03, num_steps=25)
    assert peek == pytest.approx(stepped.get_epsilon(1e-5), rel=1e-14)
    assert acc.state_dict() == before
    assert acc.get_epsilon(1e-5) == eps_before
    assert peek > eps_before


# --- calibration ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("target", "sample_rate", "steps"),
    [
        pytest.param(8.0, 0.01, 1000, id="constant-eps8"),
        pytest.param(1.0, 0.02, 500, id="constant-eps1"),
        pytest.param(3.0, [0.005] * 100 + [0.01] * 200 + [0.02] * 100, 400, id="per-step"),
        pytest.param(50.0, 0.5, 10, id="large-eps"),
        pytest.param(2.0, [0.001 + 0.0001 * t for t in range(200)], 200, id="ramp-200-rates"),
    ],
)
def test_calibrate_hits_target_from_below(target, sample_rate, steps):
    delta = 1e-5
    sigma = calibrate_rdp_noise_multiplier(
        target_epsilon=target, delta=delta, sample_rate=sample_rate, steps=steps
    )
    acc = RDPAccountant()
    rates = sample_rate if isinstance(sample_rate, list) else [sample_rate] * steps
    for q in rates:
        acc.step(noise_multiplier=sigma, sample_rate=q)
    eps = acc.get_epsilon(delta)
    assert 0.99 * target <= eps <= target


def test_calibrate_unreachable_target_raises():
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate_rdp_noise_multiplier(
            target_epsilon=0.01, delta=1e-5, sample_rate=1.0, steps=1000, max_noise_multiplier=5.0
        )


# --- argument errors ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"sample_rate": 1.5}, "sample_rate", id="rate-above-1"),
        pytest.param({"sample_rate": -0.1}, "sample_rate", id="rate-negative"),
        pytest.param({"sample_rate": math.nan}, "sample_rate", id="rate-nan"),
        pytest.param({"noise_multiplier": -1.0}, "noise_multiplier", id="sigma-negative"),
        pytest.param({"noise_multiplier": math.inf}, "noise_multiplier", id="sigma-inf"),
        pytest.param({"noise_multiplier": math.nan}, "noise_multiplier", id="sigma-nan"),
        pytest.param({"num_steps": -1}, "num_steps", id="steps-negative"),
        pytest.param({"num_steps": 2.5}, "num_steps", id="steps-float"),
        pytest.param({"num_steps": True}, "num_steps", id="steps-bool"),
        pytest.param({"orders": [1.0, 2.0]}, "orders", id="order-one"),
        pytest.param({"orders": []}, "orders", id="orders-empty"),
    ],
)
def test_compute_rdp_rejects_bad_input(kwargs, match):
    args = {"noise_multiplier": 1.0, "sample_rate": 0.1, "num_steps": 1, "orders": [2.0]}
    with pytest.raises(ValueError, match=match):
        compute_rdp(**{**args, **kwargs})


@pytest.mark.parametrize(
    ("call", "match"),
    [
        pytest.param(
            lambda a: a.step(noise_multiplier=1.0, sample_rate=2.0), "sample_rate", id="step-rate"
        ),
        pytest.param(
            lambda a: a.step(noise_multiplier=-1, sample_rate=0.1),
            "noise_multiplier",
            id="step-sigma",
        ),
        pytest.param(
            lambda a: a.step(noise_multiplier=1, sample_rate=0.1, num_steps=-3),
            "num_steps",
            id="step-n",
        ),
        pytest.param(lambda a: a.get_epsilon(0.0), "delta", id="delta-zero"),
        pytest.param(lambda a: a.get_epsilon(1.0), "delta", id="delta-one"),
        pytest.param(lambda a: a.get_privacy_spent(delta=math.nan), "delta", id="delta-nan"),
        pytest.param(
            lambda a: a.peek_epsilon(delta=1e-5, noise_multiplier=1, sample_rate=-1),
            "sample_rate",
            id="peek-rate",
        ),
        pytest.param(lambda a: RDPAccountant(orders=[0.5]), "orders", id="init-orders"),
    ],
)
def test_accountant_rejects_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(RDPAccountant())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"target_epsilon": 0.0}, "target_epsilon", id="eps-zero"),
        pytest.param({"target_epsilon": -1.0}, "target_epsilon", id="eps-negative"),
        pytest.param({"delta": 1.5}, "delta", id="delta"),
        pytest.param({"sample_rate": [0.01] * 3}, "sample_rate", id="rate-length"),
        pytest.param({"sample_rate": 1.2}, "sample_rate", id="rate-range"),
        pytest.param({"sample_rate": 0.0}, "sample_rate", id="rate-all-zero"),
        pytest.param({"steps": 0}, "steps", id="steps-zero"),
        pytest.param({"orders": [1.0]}, "orders", id="orders"),
        pytest.param({"max_noise_multiplier": -1.0}, "max_noise_multiplier", id="max-sigma"),
    ],
)
def test_calibrate_rejects_bad_input(kwargs, match):
    args = {"target_epsilon": 1.0, "delta": 1e-5, "sample_rate": 0.01, "steps": 10}
    with pytest.raises(ValueError, match=match):
        calibrate_rdp_noise_multiplier(**{**args, **kwargs})


def test_rdp_to_epsilon_rejects_bad_input():
    with pytest.raises(ValueError, match="rdp"):
        rdp_to_epsilon(orders=[2.0, 3.0], rdp=[0.1], delta=1e-5)
    with pytest.raises(ValueError, match="rdp"):
        rdp_to_epsilon(orders=[2.0], rdp=[-0.1], delta=1e-5)
    with pytest.raises(ValueError, match="delta"):
        rdp_to_epsilon(orders=[2.0], rdp=[0.1], delta=0.0)
