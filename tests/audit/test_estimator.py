"""The one-run estimator: exact p-values, null calibration over many trials, validity and power
against simulated mechanisms whose epsilon is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, stats

from lit_dp.audit.estimator import (
    audit_lower_bound,
    count_correct,
    guess_grid,
    one_run_epsilon,
    one_run_p_value,
)

BETA = 0.05


def _tail(r: int, q: float, u: int) -> float:
    """P[Binomial(r, q) >= u], summed term by term with exact binomial coefficients."""
    return sum(math.comb(r, j) * q**j * (1 - q) ** (r - j) for j in range(max(u, 0), r + 1))


def _p_value_reference(m: int, r: int, v: int, eps: float, delta: float) -> float:
    q = math.exp(eps) / (1 + math.exp(eps))
    base = _tail(r, q, v)
    alpha = max(((_tail(r, q, v - i) - base) / i for i in range(1, v + 1)), default=0.0)
    return min(base + 2 * m * delta * alpha, 1.0)


def gaussian_epsilon(mu: float, *, delta: float) -> float:
    """Epsilon at delta of mu-GDP: delta = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""
    phi = stats.norm.cdf

    def gap(eps: float) -> float:
        return phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2) - delta

    return float(optimize.brentq(gap, 0.0, 100.0, xtol=1e-12))


@pytest.mark.parametrize(
    ("m", "r", "v", "eps", "delta"),
    [(50, 20, 15, 0.7, 0.0), (50, 20, 15, 0.7, 1e-3), (200, 40, 40, 2.5, 1e-5), (10, 6, 0, 1, 0.1)],
)
def test_p_value_matches_exact_sums(m, r, v, eps, delta):
    got = one_run_p_value(num_canaries=m, num_guesses=r, num_correct=v, epsilon=eps, delta=delta)
    assert got == pytest.approx(_p_value_reference(m, r, v, eps, delta), rel=1e-9, abs=1e-15)


def test_epsilon_is_the_first_crossing_of_the_level():
    kw = {"num_canaries": 1000, "num_guesses": 100, "num_correct": 85}
    eps = one_run_epsilon(**kw, significance=0.05, delta=1e-5)
    below = one_run_p_value(**kw, epsilon=eps - 1e-6, delta=1e-5)
    above = one_run_p_value(**kw, epsilon=eps + 1e-6, delta=1e-5)
    assert below <= 0.05 < above
    # delta > 0 only weakens the evidence
    assert eps < one_run_epsilon(**kw, significance=0.05, delta=0.0)
    # half right: no evidence at all
    assert one_run_epsilon(**{**kw, "num_correct": 50}, significance=0.05, delta=0.0) == 0.0


def test_perfect_separation_matches_the_closed_form():
    # All r guesses right: P[Bin(r, q) >= r] = q^r <= level  <=>  eps <= logit(level^(1/r)).
    m = 1000
    bits = np.arange(m) % 2 == 0  # 500 in, 500 out
    res = audit_lower_bound(bits.astype(float), bits, confidence=1 - BETA, delta=0.0)
    level = BETA / len(guess_grid(m))
    q = level ** (1 / m)  # the (500, 500) pair: every canary guessed, every guess right
    assert res.num_guesses == m and res.num_correct == m
    assert res.epsilon_lower_bound == pytest.approx(math.log(q / (1 - q)), abs=1e-6)


def test_count_correct_by_hand():
    scores = np.array([0.9, 0.1, 0.5, 0.8, 0.2])
    bits = np.array([1, 0, 0, 0, 1], dtype=bool)
    # top 2: 0.9 (in: right), 0.8 (out: wrong); bottom 2: 0.1 (out: right), 0.2 (in: wrong)
    assert count_correct(scores, bits, num_positive=2, num_negative=2) == 2
    assert count_correct(scores, bits, num_positive=1, num_negative=1) == 2


def test_null_scores_give_zero_at_the_stated_confidence():
    """Scores independent of the bits (an untrained model): bound > 0 in at most beta of trials."""
    rng = np.random.default_rng(20261205)
    trials, m = 2000, 200
    positive = 0
    for t in range(trials):
        bits = rng.random(m) < 0.5
        # half the trials with ties everywhere (identical losses: no training at all)
        scores = rng.normal(size=m) if t % 2 else np.zeros(m)
        positive += (
            audit_lower_bound(scores, bits, confidence=1 - BETA, delta=1e-5).epsilon_lower_bound > 0
        )
    # 3 binomial standard deviations of slack over the nominal rate
    assert positive / trials <= BETA + 3 * math.sqrt(BETA * (1 - BETA) / trials)


def test_single_pair_null_rejects_at_most_beta():
    """Without the Bonferroni grid one fixed guess count is already a level-beta test."""
    rng = np.random.default_rng(7)
    trials, m = 3000, 100
    hits = sum(
        audit_lower_bound(
            rng.normal(size=m), rng.random(m) < 0.5, confidence=1 - BETA, guesses=[(25, 25)]
        ).epsilon_lower_bound
        > 0
        for _ in range(trials)
    )
    assert hits / trials <= BETA + 3 * math.sqrt(BETA * (1 - BETA) / trials)


def test_randomized_response_never_exceeds_its_epsilon_beyond_the_confidence():
    """The tightest eps-DP mechanism here: each bit reported truthfully w.p. e^eps/(1+e^eps)."""
    rng = np.random.default_rng(11)
    eps_true, trials, m = 2.0, 400, 1000
    keep = math.exp(eps_true) / (1 + math.exp(eps_true))
    bounds = []
    for _ in range(trials):
        bits = rng.random(m) < 0.5
        reported = np.where(rng.random(m) < keep, bits, ~bits)
        scores = reported + 1e-3 * rng.random(m)  # order within a reported value: independent
        bounds.append(audit_lower_bound(scores, bits, confidence=1 - BETA).epsilon_lower_bound)
    bounds_arr = np.array(bounds)
    assert np.mean(bounds_arr > eps_true) <= BETA + 3 * math.sqrt(BETA * (1 - BETA) / trials)
    assert np.median(bounds_arr) > 0.5 * eps_true  # and the audit has power


@pytest.mark.parametrize("mu", [1.0, 4.0])
def test_gaussian_mechanism_bound_is_valid_and_has_power(mu):
    """Scores = mu * bit + N(0, 1) is mu-GDP, hence (eps(mu, delta), delta)-DP for every delta."""
    rng = np.random.default_rng(int(mu * 100))
    delta, trials, m = 1e-5, 300, 1000
    eps_true = gaussian_epsilon(mu, delta=delta)
    bounds = np.array(
        [
            audit_lower_bound(
                mu * (bits := rng.random(m) < 0.5) + rng.normal(size=m),
                bits,
                confidence=1 - BETA,
                delta=delta,
            ).epsilon_lower_bound
            for _ in range(trials)
        ]
    )
    assert np.mean(bounds > eps_true) <= BETA + 3 * math.sqrt(BETA * (1 - BETA) / trials)
    assert np.median(bounds) > 0.15 * eps_true  # the one-run audit is loose, but not empty
    if mu >= 4:
        assert np.min(bounds) > 1.0


def test_refuses_bad_input():
    with pytest.raises(ValueError, match="confidence"):
        audit_lower_bound([0.0, 1.0], [True, False], confidence=1.0)
    with pytest.raises(ValueError, match="finite"):
        audit_lower_bound([math.nan, 1.0], [True, False])
    with pytest.raises(ValueError, match="equal-length"):
        audit_lower_bound([0.0, 1.0], [True])
    with pytest.raises(ValueError, match="num_correct"):
        one_run_p_value(num_canaries=5, num_guesses=6, num_correct=1, epsilon=1, delta=0)
