"""Clip-bound estimators: fixed, private quantile (Andrew et al. 2021), history percentile."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm as normal_dist

from lit_dp.privacy.clipping import (
    ClipBoundEstimator,
    FixedClip,
    HistoryPercentile,
    PrivateQuantile,
    make_clip_estimator,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _norms(n: int, seed: int, *, mu: float = 0.0, s: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp(mu + s * torch.randn(n, generator=g))  # lognormal unit norms, fp32


# --- shared interface -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "covered"),
    [("fixed", True), ("private_quantile", True), ("history_percentile", False)],
)
def test_factory_and_interface(kind, covered):
    est = make_clip_estimator(kind)
    assert isinstance(est, ClipBoundEstimator)
    assert est.name == kind and est.covered_by_dp is covered
    assert est.max_grad_norm == 1.0
    desc = est.describe()
    assert desc["name"] == kind and desc["covered_by_dp"] is covered
    assert isinstance(desc["parameters"], dict) and isinstance(desc["note"], str)
    # The parameters rebuild an identical estimator (the report records the config in full).
    assert make_clip_estimator(kind, **desc["parameters"]).describe() == desc
    if not covered:
        assert "NOT" in desc["note"]  # every report labels the non-private mode
    # Empty batch: never a crash (noise-only step).
    est.update(norms=torch.zeros(0), expected_batch_size=10.0, generator=_gen())
    assert math.isfinite(est.max_grad_norm)


def test_factory_rejects_unknown_kind():
    with pytest.raises(ValueError, match="private_quantile"):
        make_clip_estimator("adaptive")


def test_fixed_clip_never_changes_and_returns_no_rate():
    est = FixedClip(max_grad_norm=0.7)
    assert est.grad_noise_multiplier(noise_multiplier=1.1, expected_batch_size=5.0) == 1.1
    for seed in range(3):
        assert (
            est.update(norms=_norms(50, seed), expected_batch_size=50.0, generator=_gen()) is None
        )
    assert est.max_grad_norm == 0.7


BAD_ARGS = [
    (FixedClip, {"max_grad_norm": 0.0}, "max_grad_norm"),
    (FixedClip, {"max_grad_norm": math.nan}, "max_grad_norm"),
    (PrivateQuantile, {"target_clip_rate": 1.0}, "target_clip_rate"),
    (PrivateQuantile, {"target_clip_rate": 0.0}, "target_clip_rate"),
    (PrivateQuantile, {"learning_rate": 0.0}, "learning_rate"),
    (PrivateQuantile, {"count_noise_divisor": -1.0}, "count_noise_divisor"),
    (PrivateQuantile, {"min_clip": 0.0}, "min_clip"),
    (PrivateQuantile, {"min_clip": 2.0, "max_clip": 1.0}, "max_clip"),
    (PrivateQuantile, {"initial_clip": 200.0}, "initial_clip"),
    (HistoryPercentile, {"history_size": 0}, "history_size"),
    (HistoryPercentile, {"history_size": 10.5}, "history_size"),
    (HistoryPercentile, {"initial_clip": 0.001}, "initial_clip"),
    (HistoryPercentile, {"max_clip": math.inf}, "max_clip"),
]


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    BAD_ARGS,
    ids=[f"{c.__name__}-" + ",".join(f"{k}={v}" for k, v in kw.items()) for c, kw, _ in BAD_ARGS],
)
def test_bad_constructor_args_name_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=field) as info:
        cls(**kwargs)
    assert "use" in str(info.value) or "in (0, 1)" in str(info.value)  # says the fix


# --- private quantile -----------------------------------------------------------------------
@pytest.mark.parametrize("z", [0.5, 1.0, 3.0, 9.9])
def test_raised_noise_multiplier_matches_theorem_1(z):
    expected_batch = 100.0
    est = PrivateQuantile(count_noise_divisor=20.0)
    sigma_b = expected_batch / 20.0
    z_grad = est.grad_noise_multiplier(noise_multiplier=z, expected_batch_size=expected_batch)
    assert z_grad == pytest.approx((z**-2 - (2 * sigma_b) ** -2) ** -0.5, rel=1e-12)
    assert z_grad > z
    # The combined mechanism (gradient at z_grad, centered count at sigma_b) is accounted at z.
    assert (z_grad**-2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(z, rel=1e-12)


def test_zero_noise_multiplier_stays_zero():
    est = PrivateQuantile()
    assert est.grad_noise_multiplier(noise_multiplier=0.0, expected_batch_size=1.0) == 0.0


def test_batch_too_small_for_count_noise_is_a_clear_error():
    est = PrivateQuantile(count_noise_divisor=20.0)
    # sigma_b = 20 / 20 = 1 <= z / 2 = 1: impossible.
    with pytest.raises(ValueError, match="expected batch size") as info:
        est.grad_noise_multiplier(noise_multiplier=2.0, expected_batch_size=20.0)
    msg = str(info.value)
    assert "above 20" in msg  # the needed expected batch size: divisor * z / 2
    assert "count_noise_divisor" in msg


def test_update_divides_the_noisy_count_by_the_expected_batch_size():
    est = PrivateQuantile(initial_clip=1.0, target_clip_rate=0.2, learning_rate=0.2)
    norms = torch.tensor([0.5] * 30 + [2.0] * 18 + [math.nan, math.inf])  # realized B = 50
    expected = 100.0
    rate = est.update(norms=norms, expected_batch_size=expected, generator=_gen(42))
    # Independent re-derivation: the same single fp32 draw, sigma_b = 100 / 20 = 5.
    noise = 5.0 * torch.randn((), generator=_gen(42), dtype=torch.float32).item()
    unclipped = 30  # nan and inf count as clipped
    b_bar = (unclipped - 50 / 2 + noise) / expected + 0.5  # centered count over E, not B
    assert rate == pytest.approx(1.0 - b_bar, abs=1e-9)
    assert est.max_grad_norm == pytest.approx(math.exp(-0.2 * (b_bar - 0.8)), rel=1e-9)
    # When the realized batch equals the expected one this is (#unclipped + noise) / E.
    est2 = PrivateQuantile()
    rate2 = est2.update(
        norms=torch.cat([norms, torch.full((50,), 0.1)]),
        expected_batch_size=expected,
        generator=_gen(42),
    )
    assert rate2 == pytest.approx(1.0 - (80 + noise) / expected, abs=1e-9)


def test_private_clip_rate_is_clamped_and_c_stays_in_bounds():
    est = PrivateQuantile(initial_clip=1.0, min_clip=0.5, max_clip=2.0, learning_rate=5.0)
    for seed in range(20):
        norms = torch.full((4,), 1e-3 if seed % 2 else 1e3)
        rate = est.update(norms=norms, expected_batch_size=4.0, generator=_gen(seed))
        assert 0.0 <= rate <= 1.0
        assert 0.5 <= est.max_grad_norm <= 2.0


def test_private_quantile_converges_to_target_quantile():
    mu, s = -1.0, 0.8  # lognormal unit norms; target: 80% of units below C
    est = PrivateQuantile(initial_clip=1.0, target_clip_rate=0.2)
    gen = _gen(2024)
    expected = 200.0
    for step in range(500):
        g = torch.Generator().manual_seed(10_000 + step)
        size = int(torch.poisson(torch.tensor(expected), generator=g).item())  # Poisson batch
        norms = _norms(size, 10_000 + step, mu=mu, s=s)
        est.update(norms=norms, expected_batch_size=expected, generator=gen)
    below = normal_dist.cdf((math.log(est.max_grad_norm) - mu) / s)
    assert below == pytest.approx(0.8, abs=0.05)


# --- history percentile ---------------------------------------------------------------------
def test_history_percentile_equals_numpy_percentile_including_overflow():
    est = HistoryPercentile(initial_clip=1.0, target_clip_rate=0.2, history_size=1000)
    seen: list[float] = []
    for step in range(14):  # 14 * 97 = 1358 norms > H: the buffer overflows
        norms = _norms(97, step)
        norms[step % 97] = math.nan  # non-finite norms are not buffered
        prev_c = est.max_grad_norm
        rate = est.update(norms=norms, expected_batch_size=97.0, generator=_gen())
        # Raw clip rate: this batch's norms > C before the update (nan counts as clipped).
        clipped = (~(norms.double() <= prev_c)).double().mean().item()
        assert rate == pytest.approx(clipped, abs=1e-12)
        seen.extend(v for v in norms.double().tolist() if math.isfinite(v))
        buffer = np.array(seen[-1000:])
        assert len(est.buffer) == len(buffer)
        ref = float(np.clip(np.percentile(buffer, 80.0, method="linear"), 0.01, 100.0))
        assert est.max_grad_norm == pytest.approx(ref, rel=1e-12)
    assert len(seen) > 1000


def test_history_percentile_clamps_and_handles_empty_batches():
    est = HistoryPercentile(initial_clip=1.0, history_size=5, min_clip=0.1, max_clip=10.0)
    assert est.update(norms=torch.zeros(0), expected_batch_size=3.0, generator=_gen()) is None
    assert est.max_grad_norm == 1.0
    est.update(norms=torch.full((3,), 1e4), expected_batch_size=3.0, generator=_gen())
    assert est.max_grad_norm == 10.0
    est.update(norms=torch.full((5,), 1e-4), expected_batch_size=3.0, generator=_gen())
    assert est.max_grad_norm == 0.1
    assert est.grad_noise_multiplier(noise_multiplier=1.3, expected_batch_size=1.0) == 1.3


# --- checkpoints ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fixed", "private_quantile", "history_percentile"])
def test_state_dict_round_trip_gives_identical_updates(kind):
    kwargs = {} if kind == "fixed" else {"initial_clip": 0.5}
    if kind == "history_percentile":
        kwargs["history_size"] = 50
    run = make_clip_estimator(kind, **kwargs)
    gen = _gen(7)
    for step in range(6):
        run.update(norms=_norms(30, step), expected_batch_size=30.0, generator=gen)
    buf = io.BytesIO()
    torch.save({"clip": run.state_dict(), "gen": gen.get_state()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # plain types only
    resumed = make_clip_estimator(kind, **kwargs)
    resumed.load_state_dict(ckpt["clip"])
    gen2 = torch.Generator()
    gen2.set_state(ckpt["gen"])
    assert resumed.max_grad_norm == run.max_grad_norm
    for step in range(6, 12):
        a = run.update(norms=_norms(30, step), expected_batch_size=30.0, generator=gen)
        b = resumed.update(norms=_norms(30, step), expected_batch_size=30.0, generator=gen2)
        assert a == b
        assert run.max_grad_norm == resumed.max_grad_norm
    assert run.state_dict() == resumed.state_dict()


def test_load_state_dict_refuses_another_kind():
    with pytest.raises(ValueError, match="history_percentile"):
        PrivateQuantile().load_state_dict(HistoryPercentile().state_dict())
