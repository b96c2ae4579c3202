"""PLD accountant: Opacus' PRV accountant, dp-accounting's own PLD accountant, the exact Gaussian
mechanism, RDP as an upper bound, the sample-rate grid, pinned values, peek, checkpointing."""

from __future__ import annotations

import copy
import itertools
import json
import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from lit_dp.privacy.pld_accountant import PLDAccountant, round_up_sample_rate
from lit_dp.privacy.rdp_accountant import RDPAccountant

# (schedule of (noise_multiplier, sample_rate, num_steps) runs, delta, pinned PLD epsilon).
# Pinned values: this accountant (default settings) at dp-accounting 0.6; each is checked below
# against Opacus' PRV estimate within PRV's stated error, so a pin is never only our own output.
CASES = [
    pytest.param([(1.0, 0.01, 10000)], 1e-5, 6.1885275803508915, id="q0.01-10k"),
    pytest.param([(0.8, 0.001, 10000)], 1e-6, 0.9504697446912606, id="small-q-small-eps"),
    pytest.param([(1.5, 0.04, 2250)], 1e-5, 6.768954888334995, id="opacus-classic"),
    pytest.param([(0.6, 12 / 256, 16)], 1e-5, 6.086895400736298, id="quickstart-like"),
    pytest.param([(2.0, 0.05, 200)], 1e-5, 1.5606458022196366, id="sigma2"),
    pytest.param(
        [(1.1, 0.01, 500), (0.9, 0.02, 300), (2.0, 0.005, 1000)],
        1e-5,
        3.019414702556239,
        id="three-runs",
    ),
    pytest.param([(0.8, 0.1, 100), (1.3, 0.02, 400)], 1e-5, 11.135134605717768, id="two-runs"),
]
PRV_EPS_ERROR = 0.01  # Opacus' default: |estimate - true epsilon| <= eps_error


def _steps(acc, schedule):
    for sigma, q, n in schedule:
        acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=n)
    return acc


def _prv_bounds(schedule, delta, eps_error=PRV_EPS_ERROR):
    """(lower, estimate, upper) epsilon of Opacus' PRV accountant (Gopi et al. 2021), built from
    its public analysis functions as ``PRVAccountant.get_epsilon`` builds it."""
    from opacus.accountants.analysis import prv

    delta_error = delta / 1000
    prvs = [prv.PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in schedule]
    counts = [n for _, _, n in schedule]
    size = prv.compute_safe_domain_size(
        prvs=prvs, max_self_compositions=counts, eps_error=eps_error, delta_error=delta_error
    )
    mesh = eps_error / np.sqrt(sum(counts) * np.log(12 / delta_error) / 2)
    domain = prv.Domain.create_aligned(-size, size, mesh)
    dprvs = [
        prv.discretize(prv.TruncatedPrivacyRandomVariable(p, domain.t_min, domain.t_max), domain)
        for p in prvs
    ]
    composed = prv.compose_heterogeneous(dprvs=dprvs, num_self_compositions=counts)
    return composed.compute_epsilon(delta, delta_error, eps_error)


def _exact_rates(**kwargs):
    return PLDAccountant(sample_rate_resolution=0.0, **kwargs)  # exact rates, as PRV composes


# --- independent references -------------------------------------------------------------------
@pytest.mark.parametrize(("schedule", "delta", "pinned"), CASES)
def test_within_prv_error_and_never_below_it(schedule, delta, pinned):
    lower, estimate, upper = _prv_bounds(schedule, delta)
    eps = _steps(_exact_rates(), schedule).get_epsilon(delta)
    # An upper bound: never below PRV's lower bound (the true epsilon is >= it) ...
    assert eps >= lower
    # ... and as tight as PRV: within its stated error of its estimate.
    assert eps <= upper
    assert abs(eps - estimate) <= PRV_EPS_ERROR
    # The pinned value (default grid) is checked by the same reference; the grid only rounds
    # the rates that differ from the first one up, by at most 1 %.
    assert pinned >= lower and abs(pinned - estimate) <= PRV_EPS_ERROR + 0.015 * estimate


@pytest.mark.parametrize(("schedule", "delta", "pinned"), CASES)
def test_pinned_values(schedule, delta, pinned):
    acc = _steps(PLDAccountant(), schedule)
    assert acc.get_epsilon(delta) == pytest.approx(pinned, rel=1e-7)


@pytest.mark.parametrize(("schedule", "delta", "pinned"), CASES[:5])
def test_matches_dp_accounting_pld_accountant(schedule, delta, pinned):
    # dp-accounting's own PLDAccountant, composed as a DpEvent without lit_dp's ledger or grid.
    from dp_accounting import dp_event
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant as Reference

    ref = Reference(value_discretization_interval=5e-4)
    for sigma, q, n in schedule:
        event = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))
        ref.compose(dp_event.SelfComposedDpEvent(event, n))
    assert _steps(PLDAccountant(), schedule).get_epsilon(delta) == pytest.approx(
        ref.get_epsilon(delta), rel=1e-9
    )


def _gaussian_mechanism_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of a Gaussian mechanism with mu = sensitivity / std (Balle & Wang 2018):
    delta(eps) = Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu)."""

    def gap(eps: float) -> float:
        return norm.cdf(mu / 2 - eps / mu) - math.exp(eps) * norm.cdf(-mu / 2 - eps / mu) - delta

    return brentq(gap, 0.0, 100.0, xtol=1e-14)


@pytest.mark.parametrize(("sigma", "steps"), [(1.0, 4), (2.0, 50), (5.0, 3)])
def test_full_batch_is_the_exact_gaussian_mechanism(sigma, steps):
    # q = 1: T steps of std sigma compose to one Gaussian mechanism with mu = sqrt(T) / sigma.
    exact = _gaussian_mechanism_epsilon(math.sqrt(steps) / sigma, 1e-5)
    eps = PLDAccountant()
    eps.step(noise_multiplier=sigma, sample_rate=1.0, num_steps=steps)
    assert exact <= eps.get_epsilon(1e-5) <= exact + 2e-3


def test_never_above_rdp_on_random_schedules():
    rng = np.random.default_rng(1234)
    for _ in range(20):
        schedule = [
            (float(rng.uniform(0.6, 3.0)), float(np.exp(rng.uniform(np.log(1e-3), np.log(0.3)))),
             int(rng.integers(1, 500)))
            for _ in range(int(rng.integers(1, 5)))
        ]  # fmt: skip
        delta = float(10 ** rng.uniform(-7, -4))
        pld = _steps(PLDAccountant(), schedule).get_epsilon(delta)
        rdp = _steps(RDPAccountant(), schedule).get_epsilon(delta)
        assert 0.0 < pld <= rdp, (schedule, delta)


# --- the sample-rate grid ---------------------------------------------------------------------
def test_round_up_is_never_below_and_at_most_one_grid_step_above():
    rng = np.random.default_rng(0)
    for q in np.exp(rng.uniform(np.log(1e-6), 0.0, size=2000)):
        for anchor in (0.01, 0.3, 1e-5):
            g = round_up_sample_rate(q, anchor=anchor, resolution=0.01)
            assert q <= g <= min(1.0, q * 1.01 * (1 + 1e-12))
    assert round_up_sample_rate(0.0123, anchor=0.0123, resolution=0.01) == 0.0123
    assert round_up_sample_rate(0.0123, anchor=0.01, resolution=0.0) == 0.0123
    assert round_up_sample_rate(0.999, anchor=0.5, resolution=0.01) == 1.0


def test_grid_rounding_is_conservative_on_a_ramp():
    ramp = [(1.0, 0.005 + 0.015 * t / 80, 1) for t in range(80)]  # 80 rates, 4x
    coarse = {"value_discretization_interval": 2e-3}  # (the grid does not depend on it)
    gridded = PLDAccountant(**coarse)
    gridded.load_state_dict({**gridded.state_dict(), "history": [list(r) for r in ramp]})
    exact = _steps(_exact_rates(**coarse), ramp).get_epsilon(1e-5)
    eps = gridded.get_epsilon(1e-5)
    assert exact <= eps <= exact * 1.015
    assert gridded.history == ramp  # the ledger keeps the exact rates


def test_constant_rate_is_not_rounded():
    acc = _steps(PLDAccountant(), [(1.0, 0.0123, 100)])
    ref = _steps(_exact_rates(), [(1.0, 0.0123, 100)])
    assert acc.get_epsilon(1e-5) == ref.get_epsilon(1e-5)


# --- composition, peek, edge cases --------------------------------------------------------------
def test_step_by_step_equals_recomposed_ledger():
    # Training composes one step at a time; resume recomposes run by run (self-compositions).
    ramp = [(1.0, 0.01 + 0.01 * t / 60, 1) for t in range(60)] + [(1.2, 0.02, 1)] * 40
    stepped = _steps(PLDAccountant(value_discretization_interval=2e-3), ramp)
    loaded = PLDAccountant()
    loaded.load_state_dict(json.loads(json.dumps(stepped.state_dict())))
    assert loaded.history == stepped.history
    assert loaded.get_epsilon(1e-5) == pytest.approx(stepped.get_epsilon(1e-5), rel=1e-8)


def test_peek_equals_stepping_a_copy_and_does_not_mutate():
    acc = _steps(PLDAccountant(), [(1.0, 0.01, 100)])
    before, eps_before = acc.state_dict(), acc.get_epsilon(1e-5)
    peek = acc.peek_epsilon(delta=1e-5, noise_multiplier=0.8, sample_rate=0.03, num_steps=25)
    stepped = copy.deepcopy(acc)
    stepped._peeked = None  # recompose from scratch, not from the kept peek
    stepped.step(noise_multiplier=0.8, sample_rate=0.03, num_steps=25)
    assert peek == stepped.get_epsilon(1e-5)
    assert acc.state_dict() == before and acc.get_epsilon(1e-5) == eps_before
    assert peek > eps_before
    acc.step(noise_multiplier=0.8, sample_rate=0.03, num_steps=25)  # reuses the peeked result
    assert acc.get_epsilon(1e-5) == peek


def test_zero_rate_costs_nothing_zero_noise_is_infinite_empty_is_zero():
    acc = PLDAccountant()
    assert acc.get_epsilon(1e-5) == 0.0 and acc.total_steps == 0
    acc.step(noise_multiplier=1.0, sample_rate=0.0, num_steps=100)
    acc.step(noise_multiplier=1.0, sample_rate=0.5, num_steps=0)
    assert acc.get_epsilon(1e-5) == 0.0 and acc.total_steps == 100
    assert acc.peek_epsilon(delta=1e-5, noise_multiplier=0.0, sample_rate=0.01) == math.inf
    acc.step(noise_multiplier=0.0, sample_rate=0.01)
    assert acc.get_epsilon(1e-5) == math.inf


def test_equal_runs_merge_and_epsilon_grows():
    acc = PLDAccountant()
    eps = []
    for _ in range(4):
        acc.step(noise_multiplier=1.0, sample_rate=0.02, num_steps=50)
        eps.append(acc.get_epsilon(1e-6))
    assert all(b > a for a, b in itertools.pairwise(eps))
    assert acc.history == [(1.0, 0.02, 200)] and acc.total_steps == 200


# --- state ----------------------------------------------------------------------------------------
def test_state_dict_json_round_trip_and_resume():
    acc = PLDAccountant(value_discretization_interval=1e-3)
    _steps(acc, [(1.3, 0.02, 40), (0.9, 0.05, 7)])
    restored = PLDAccountant()  # default settings: the loaded ones replace them
    restored.load_state_dict(json.loads(json.dumps(acc.state_dict())))
    assert restored.value_discretization_interval == 1e-3
    assert restored.history == acc.history and restored.total_steps == 47
    assert restored.get_epsilon(1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    for a in (acc, restored):
        a.step(noise_multiplier=0.9, sample_rate=0.05, num_steps=3)
    assert restored.state_dict() == acc.state_dict()
    assert restored.get_epsilon(1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)


GOOD = {"value_discretization_interval": 5e-4, "sample_rate_resolution": 0.01, "history": []}


@pytest.mark.parametrize(
    ("state", "match"),
    [
        pytest.param({**GOOD, "extra": 1}, "extra", id="unknown-key"),
        pytest.param({k: v for k, v in GOOD.items() if k != "history"}, "history", id="missing"),
        pytest.param(
            {**GOOD, "value_discretization_interval": 0.0}, "value_discretization", id="interval"
        ),
        pytest.param(
            {**GOOD, "sample_rate_resolution": -0.1}, "sample_rate_resolution", id="resolution"
        ),
        pytest.param({**GOOD, "history": [[1.0, 2.0, 3]]}, "sample_rate", id="bad-rate"),
        pytest.param({**GOOD, "history": [[1.0, 0.1]]}, "history", id="short-entry"),
    ],
)
def test_load_state_dict_rejects_bad_state(state, match):
    with pytest.raises(ValueError, match=match):
        PLDAccountant().load_state_dict(state)


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
            lambda a: a.step(noise_multiplier=1, sample_rate=0.1, num_steps=2.5),
            "num_steps",
            id="step-n",
        ),
        pytest.param(lambda a: a.get_epsilon(0.0), "delta", id="delta-zero"),
        pytest.param(
            lambda a: a.peek_epsilon(delta=1e-5, noise_multiplier=1, sample_rate=-1),
            "sample_rate",
            id="peek-rate",
        ),
        pytest.param(
            lambda a: PLDAccountant(value_discretization_interval=-1e-3),
            "value_discretization",
            id="init-interval",
        ),
        pytest.param(
            lambda a: PLDAccountant(sample_rate_resolution=math.nan),
            "sample_rate_resolution",
            id="init-res",
        ),
    ],
)
def test_rejects_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(PLDAccountant())
