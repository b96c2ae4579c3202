"""Banded MF: coefficients, the correlated noise, cyclic sampling and the amplified event."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from lit_dp.privacy.bandmf import (
    bsr_coefficients,
    check_coefficients,
    column_norm,
    inverse_coefficients,
    load_coefficients,
    round_sample_rates,
    suggest_bands,
)
from lit_dp.privacy.calibration import calibrate_noise_multiplier, epsilon_for_schedule
from lit_dp.privacy.cyclic_sampling import CyclicPoissonBatchSampler, cyclic_draw, unit_groups
from lit_dp.privacy.noise import add_noise_
from lit_dp.privacy.noise_mechanism import BandedMF, IndependentGaussian
from lit_dp.privacy.rdp_accountant import RDPAccountant
from lit_dp.privacy.sampling import PoissonBatchSampler, SampleRateSchedule


def _toeplitz(first_column, n):
    m = np.zeros((n, n))
    for j, c in enumerate(first_column[:n]):
        m += np.diag(np.full(n - j, c), -j)
    return m


# --- coefficients ----------------------------------------------------------------------------
@pytest.mark.parametrize("bands", [1, 2, 5, 64])
def test_bsr_coefficients_are_the_closed_form(bands):
    closed = [math.comb(2 * j, j) / 4**j for j in range(bands)]
    np.testing.assert_allclose(bsr_coefficients(bands), closed, rtol=1e-13, atol=0)


def test_bsr_coefficients_square_to_the_prefix_sum_series():
    # (1 - x)^(-1/2) squared is (1 - x)^(-1) = 1 + x + x^2 + ...: the coefficients convolve to 1.
    c = np.asarray(bsr_coefficients(40))
    np.testing.assert_allclose(np.convolve(c, c)[:40], np.ones(40), rtol=1e-12)


def test_inverse_coefficients_invert_the_strategy():
    c = bsr_coefficients(4)
    n = 12
    inv = _toeplitz(inverse_coefficients(c, n), n)
    np.testing.assert_allclose(inv @ _toeplitz(c, n), np.eye(n), atol=1e-12)


def test_coefficients_file_and_its_errors(tmp_path):
    good = tmp_path / "c.json"
    good.write_text(json.dumps([1.0, 0.4, 0.1]))
    assert load_coefficients(good, 3) == [1.0, 0.4, 0.1]
    text = tmp_path / "c.txt"
    text.write_text("1 0.4\n0.1\n")
    assert load_coefficients(text, 3) == [1.0, 0.4, 0.1]
    assert BandedMF(bands=3, coefficients_file=str(good)).coefficients == [1.0, 0.4, 0.1]
    with pytest.raises(ValueError, match="3 coefficients for bands=2"):
        load_coefficients(good, 2)
    with pytest.raises(ValueError, match=r"c_0=2\.0 must be 1"):
        check_coefficients([2.0, 0.5])
    with pytest.raises(ValueError, match="not a file"):
        load_coefficients(tmp_path / "missing.json", 3)
    with pytest.raises(ValueError, match="bands=0 must be an integer >= 1"):
        BandedMF(bands=0)


# --- the correlated noise --------------------------------------------------------------------
def _released_noise(mechanism, *, steps, dim, sigma, clip, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out, marginals = [], []
    for _ in range(steps):
        sums = {"w": torch.zeros(dim)}
        marginals.append(
            mechanism.add_noise_(sums, noise_multiplier=sigma, max_grad_norm=clip, generator=gen)
        )
        out.append(sums["w"].double().numpy())
    return np.stack(out), marginals  # (steps, dim): each coordinate an independent trial


def test_released_noise_has_the_covariance_of_the_factorization():
    bands, steps, sigma, clip = 3, 7, 1.3, 0.5
    mech = BandedMF(bands=bands)
    noise, marginals = _released_noise(mech, steps=steps, dim=40_000, sigma=sigma, clip=clip)
    c = bsr_coefficients(bands)
    c_inv = np.linalg.inv(_toeplitz(c, steps))
    # Z has per-coordinate std sigma * C * ||c||: released noise C^{-1} Z.
    expected = c_inv @ c_inv.T * (sigma * clip * column_norm(c)) ** 2
    empirical = noise @ noise.T / noise.shape[1]
    scale = (sigma * clip * column_norm(c)) ** 2
    np.testing.assert_allclose(empirical, expected, atol=0.04 * scale)
    # The mechanism's reported marginal std is the diagonal, in units of sigma * C.
    np.testing.assert_allclose(
        np.asarray(marginals) * sigma * clip, np.sqrt(np.diag(expected)), rtol=1e-12
    )


def test_one_band_is_independent_noise_bit_for_bit():
    grads = {"b": torch.randn(7, 3), "a": torch.randn(5)}
    ref = {n: g.clone() for n, g in grads.items()}
    ours = {n: g.clone() for n, g in grads.items()}
    other = {n: g.clone() for n, g in grads.items()}
    mech, indep = BandedMF(bands=1), IndependentGaussian()
    g1, g2, g3 = (torch.Generator().manual_seed(5) for _ in range(3))
    for _ in range(3):
        add_noise_(ref, noise_multiplier=0.9, max_grad_norm=0.7, generator=g1)
        assert mech.add_noise_(ours, noise_multiplier=0.9, max_grad_norm=0.7, generator=g2) == 1.0
        indep.add_noise_(other, noise_multiplier=0.9, max_grad_norm=0.7, generator=g3)
    for n in grads:
        assert torch.equal(ours[n], ref[n]) and torch.equal(other[n], ref[n])
    assert mech.state_dict()["history"] == []


def test_noise_state_resumes_the_same_stream():
    def run(mech, gen, steps):
        out = []
        for _ in range(steps):
            sums = {"w": torch.zeros(10), "v": torch.zeros(2, 2)}
            mech.add_noise_(sums, noise_multiplier=1.0, max_grad_norm=1.0, generator=gen)
            out.append(sums)
        return out

    whole = run(BandedMF(bands=4), torch.Generator().manual_seed(1), 7)
    first, gen = BandedMF(bands=4), torch.Generator().manual_seed(1)
    run(first, gen, 3)
    state, gen_state = first.state_dict(), gen.get_state()
    assert len(state["history"]) == 3 and state["step"] == 3
    assert first.buffer_bytes() == 3 * (10 + 4) * 4  # b - 1 fp32 copies of the parameters
    resumed, gen2 = BandedMF(bands=4), torch.Generator()
    resumed.load_state_dict(state)
    gen2.set_state(gen_state)
    for a, b in zip(run(resumed, gen2, 4), whole[3:], strict=True):
        assert all(torch.equal(a[n], b[n]) for n in a)
    with pytest.raises(ValueError, match="bands=4"):
        BandedMF(bands=2).load_state_dict(state)


def test_zero_noise_draws_nothing():
    mech, gen = BandedMF(bands=3), torch.Generator().manual_seed(0)
    before = gen.get_state()
    sums = {"w": torch.ones(4)}
    mech.add_noise_(sums, noise_multiplier=0.0, max_grad_norm=1.0, generator=gen)
    assert torch.equal(sums["w"], torch.ones(4)) and torch.equal(gen.get_state(), before)


# --- cyclic sampling -------------------------------------------------------------------------
def test_sampler_never_puts_a_unit_in_two_steps_less_than_b_apart():
    n, bands, steps = 300, 5, 60
    sampler = CyclicPoissonBatchSampler(
        n, SampleRateSchedule.constant(0.15), seed=11, bands=bands, steps_per_epoch=steps
    )
    last: dict[int, int] = {}
    sizes = []
    for batch in sampler:
        sizes.append(len(batch))
        for unit in batch:
            if unit in last:
                assert batch.step - last[unit] >= bands
                assert (batch.step - last[unit]) % bands == 0  # always the same group
            last[unit] = batch.step
        assert batch.sample_rate == 0.15
    # E[B] = q N = 45 still (group rate 0.75 over ~60 units): the mean of 60 steps within 15 %.
    assert np.mean(sizes) == pytest.approx(45, rel=0.15)
    groups = unit_groups(n, bands=bands, seed=11)
    assert torch.bincount(groups, minlength=bands).min() > n / bands / 2


def test_one_band_sampler_is_the_poisson_sampler():
    schedule = SampleRateSchedule.linear(start_rate=0.1, end_rate=0.3, ramp_steps=5)
    ours = CyclicPoissonBatchSampler(50, schedule, seed=3, bands=1, steps_per_epoch=8)
    ref = PoissonBatchSampler(50, schedule, seed=3, steps_per_epoch=8)
    assert [list(b) for b in ours] == [list(b) for b in ref]


def test_sampler_resumes_exactly_and_shards_the_same_draw():
    schedule = SampleRateSchedule.constant(0.2)
    whole = [list(b) for b in CyclicPoissonBatchSampler(40, schedule, seed=9, bands=4,
                                                         steps_per_epoch=10)]  # fmt: skip
    first = CyclicPoissonBatchSampler(40, schedule, seed=9, bands=4, steps_per_epoch=4)
    list(first)
    second = CyclicPoissonBatchSampler(40, schedule, seed=0, bands=4, steps_per_epoch=6)
    second.load_state_dict(first.state_dict())
    assert [list(b) for b in second] == whole[4:]
    shards = [CyclicPoissonBatchSampler(40, schedule, seed=9, bands=4, steps_per_epoch=10,
                                        rank=r, world_size=2) for r in range(2)]  # fmt: skip
    merged = [sorted(a + b) for a, b in zip(*([list(x) for x in s] for s in shards), strict=True)]
    assert merged == whole


def test_group_rate_above_one_is_refused():
    groups = unit_groups(10, bands=4, seed=0)
    with pytest.raises(ValueError, match="bands=4 times the sample rate"):
        cyclic_draw(0.3, groups=groups, bands=4, seed=0, step=0)


# --- accounting ------------------------------------------------------------------------------
_INTEGER_ORDERS = [*range(2, 64), 128, 256]


def _reference_epsilon(sigma, q_group, rounds, delta, accountant):
    # The amplified BandMF event built directly in dp-accounting.
    from dp_accounting import dp_event
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
    from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

    event = dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(q_group, dp_event.GaussianDpEvent(sigma)), rounds
    )
    ref = (
        PLDAccountant(value_discretization_interval=5e-4)
        if accountant == "pld"
        else RdpAccountant(_INTEGER_ORDERS)
    )
    return ref.compose(event).get_epsilon(delta)


@pytest.mark.parametrize("bands", [1, 4, 7])
@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_accounting_matches_an_independent_dp_accounting_event(bands, accountant):
    sigma, q, steps, delta = 0.9, 0.02, 100, 1e-5
    mech = BandedMF(bands=bands)
    rates = mech.round_sample_rates(lambda t: q, steps)
    assert len(rates) == math.ceil(steps / bands) and set(rates) == {bands * q}
    ref = _reference_epsilon(sigma, bands * q, math.ceil(steps / bands), delta, accountant)
    if accountant == "pld":  # the same discretization: equal to round-off
        ours = epsilon_for_schedule(
            noise_multiplier=sigma, delta=delta, sample_rate=rates, steps=len(rates)
        )
    else:  # the same integer orders: both expand the binomial exactly
        acc = RDPAccountant(orders=_INTEGER_ORDERS)
        for rate in rates:
            acc.step(noise_multiplier=sigma, sample_rate=rate)
        ours = acc.get_epsilon(delta)
    assert ours == pytest.approx(ref, rel=1e-9)


def test_one_band_accounts_exactly_as_dp_sgd():
    schedule = SampleRateSchedule.linear(start_rate=0.01, end_rate=0.03, ramp_steps=7)
    assert BandedMF(bands=1).round_sample_rates(schedule.rate, 12) == schedule.rates(12)
    assert IndependentGaussian().round_sample_rates(schedule.rate, 12) == schedule.rates(12)
    mech = BandedMF(bands=1)
    for t in range(12):
        assert mech.accounted_rate(step=t, sample_rate=schedule.rate(t), rate_of=schedule.rate) == (
            schedule.rate(t)
        )


def test_rounds_are_charged_at_their_start_with_their_largest_rate():
    rate_of = SampleRateSchedule.linear(start_rate=0.01, end_rate=0.05, ramp_steps=8).rate
    mech = BandedMF(bands=4)
    charged = [mech.accounted_rate(step=t, sample_rate=rate_of(t), rate_of=rate_of)
               for t in range(10)]  # fmt: skip
    assert charged[1:4] == [None] * 3 and charged[5:8] == [None] * 3
    assert charged[0] == pytest.approx(4 * rate_of(3)) and charged[4] == pytest.approx(4 * 0.045)
    assert [c for c in charged if c is not None] == round_sample_rates(rate_of, bands=4, steps=10)


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_epsilon_and_calibrated_sigma_grow_with_bands_at_a_fixed_batch(accountant):
    # At a fixed sigma and E[B], b bands compose n / b rounds at rate b q: less amplification,
    # since the subsampled Gaussian's privacy loss grows faster than linearly in q.
    sigma, q, steps, delta = 1.0, 0.01, 96, 1e-5

    def rates(b):
        return {"sample_rate": [b * q] * (steps // b), "steps": steps // b}

    eps = [
        epsilon_for_schedule(noise_multiplier=sigma, delta=delta, accountant=accountant, **rates(b))
        for b in (1, 2, 4, 8, 16)
    ]
    assert all(a < b for a, b in itertools.pairwise(eps))
    sigmas = [
        calibrate_noise_multiplier(
            target_epsilon=2.0, delta=delta, accountant=accountant, **rates(b)
        )
        for b in (1, 4, 16)
    ]
    assert sigmas[0] < sigmas[1] < sigmas[2]


def test_suggested_bands_follow_the_rule_and_its_limits():
    # b ~ epsilon sqrt(n) / k: epsilon 8, n 10,000, 20 epochs -> 40.
    assert suggest_bands(epsilon=8.0, steps=10_000, epochs=20.0, max_bands=1000) == 40
    assert suggest_bands(epsilon=8.0, steps=10_000, epochs=20.0, max_bands=16) == 16
    assert suggest_bands(epsilon=0.01, steps=100, epochs=5.0, max_bands=16) == 1
