"""``lit-dp plan`` with banded MF: sigma and epsilon of the banded event, its budget stop in
rounds, the suggested number of bands, and every shipped private config planned with bands."""

from __future__ import annotations

import math

import pytest
from shipped_configs import CONFIG_DIR, CONFIGS, TINY

from lit_dp.plan import format_plan, make_plan, read_config
from lit_dp.privacy.calibration import calibrate_noise_multiplier
from lit_dp.privacy.noise_mechanism import BandedMF
from lit_dp.privacy.pld_accountant import PLDAccountant

BANDMF = str(CONFIG_DIR / "bandmf.yaml")
_BANDED = ["--model.noise_mechanism", "lit_dp.privacy.noise_mechanism.BandedMF"]


def test_plan_calibrates_sigma_for_the_banded_event():
    plan = make_plan(read_config(["--config", BANDMF, "--trainer.max_steps", "10"]))
    assert isinstance(plan.mechanism, BandedMF) and plan.mechanism.bands == 4
    # Independent construction: ceil(10 / 4) = 3 rounds at the group rate 4 x 32 / 256.
    expected = calibrate_noise_multiplier(
        target_epsilon=8.0, delta=1e-5, sample_rate=[0.5] * 3, steps=3
    )
    assert plan.noise_multiplier["pld"] == expected
    assert 0.98 * 8.0 <= plan.epsilon["pld"] <= 8.0
    text = format_plan(plan, "bandmf.yaml")
    assert "banded MF, b = 4 bands" in text and "accounted rounds              3 of 4" in text
    assert "1, 0.5, 0.375, 0.3125" in text
    # The fresh noise is scaled by the column norm of C.
    norm = math.sqrt(1 + 0.25 + 0.375**2 + 0.3125**2)
    assert plan.noise_std(0) == pytest.approx(expected * 1.0 * norm / 32, rel=1e-12)


def test_plan_budget_stop_comes_at_a_round_boundary():
    plan = make_plan(read_config([
        "--config", BANDMF, "--model.noise_multiplier", "0.8", "--trainer.max_steps", "200",
    ]))  # fmt: skip
    # Independent reference: compose rounds at 0.5 until epsilon would pass 8.
    ledger, rounds = PLDAccountant(), 0
    while ledger.peek_epsilon(delta=1e-5, noise_multiplier=0.8, sample_rate=0.5) <= 8.0:
        ledger.step(noise_multiplier=0.8, sample_rate=0.5)
        rounds += 1
    assert 0 < rounds < 50
    assert plan.budget_steps == 4 * rounds


def test_plan_suggests_bands_from_the_rule():
    # tiny.yaml at 400 steps: k = 400 x 32 / 256 = 50 epochs, b ~ 8 sqrt(400) / 50 = 3.2 -> 3.
    plan = make_plan(read_config(["--config", TINY, "--trainer.max_steps", "400"]))
    assert plan.suggested_bands == 3
    assert "suggested bands               b = 3" in format_plan(plan)
    # A short run would want more bands than the schedule allows (b q <= 1: at most 8).
    assert make_plan(read_config(["--config", TINY])).suggested_bands == 8


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_private_config_plans_with_bands(config):
    if "private: false" in config.read_text():
        pytest.skip("non-private config")
    plan = make_plan(read_config(["--config", str(config), *_BANDED,
                                  "--model.noise_mechanism.bands", "2"]))  # fmt: skip
    assert plan.mechanism.bands == 2
    if plan.steps is not None:
        assert plan.noise_multiplier and all(e > 0 for e in plan.epsilon.values())


def test_plan_compares_the_released_noise_with_independent_noise_at_the_same_epsilon():
    import numpy as np

    steps = 24
    args = ["--config", BANDMF, "--trainer.max_steps", str(steps)]
    plan = make_plan(read_config(args))
    alone = make_plan(read_config([*args, "--model.noise_mechanism", "null"]))
    assert alone.mechanism.bands == 1 and alone.independent is None
    assert plan.independent is not None
    assert plan.independent.noise_multiplier == alone.noise_multiplier["pld"]
    # Independent construction of the settled factor: the last row of C^-1, C the dense
    # banded Toeplitz matrix of the coefficients.
    c = plan.mechanism.coefficients
    dense = sum(np.diag(np.full(steps - j, c[j]), -j) for j in range(len(c)))
    factor = float(np.linalg.norm(np.linalg.inv(dense)[-1]))
    assert plan.settled_factor() == pytest.approx(factor, rel=1e-12)
    ratio = plan.noise_std(0) * factor / alone.noise_std(0)
    text = format_plan(plan)
    assert f"{plan.noise_std(0) * factor:.4g} per coordinate by step {steps}" in text
    assert f"against independent noise     {ratio:.3g} x the std" in text
    assert ratio > 1  # the correlated stream is noisier per step; its gain is in the sums
    assert "released noise std" not in format_plan(alone)


def test_plan_says_why_it_cannot_compare_with_independent_noise(monkeypatch):
    import lit_dp.plan as plan_module

    real = plan_module.RunPlan.create

    def refuse_independent(**kw):
        if kw["mechanism"] is None:  # independent noise
            raise ValueError("privacy.target_epsilon=8: no sigma reaches it\nsecond line")
        return real(**kw)

    monkeypatch.setattr(plan_module.RunPlan, "create", refuse_independent)
    plan = make_plan(read_config(["--config", BANDMF]))
    assert plan.independent is None
    text = format_plan(plan)
    assert "against independent noise     not computed: privacy.target_epsilon=8" in text
    assert "second line" not in text
