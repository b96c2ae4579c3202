"""Compute allocation: every E[B] x steps at the same compute is calibrated to the same epsilon
(checked against dp-accounting's own PLD accountant), the rule picks the largest E[B] that keeps
enough steps, and ``lit-dp plan`` prints the table and a command line that reproduces the pick."""

from __future__ import annotations

import pytest
from shipped_configs import CONFIGS, TINY

from lit_dp.commands import main
from lit_dp.plan import make_plan, read_config
from lit_dp.privacy.allocation import (
    Allocation,
    allocations,
    candidate_batch_sizes,
    recommend,
)
from lit_dp.privacy.clipping import PrivateQuantile

N, COMPUTE, EPS, DELTA = 4000, 38_400, 8.0, 1e-5


@pytest.fixture(scope="module")
def table() -> list[Allocation]:
    return allocations(num_units=N, compute=COMPUTE, target_epsilon=EPS, delta=DELTA)


def test_candidates_spend_the_same_compute(table):
    assert [a.expected_batch_size for a in table] == [8, 16, 32, 64, 128, 256, 512, 1024, 2048]
    for a in table:
        assert a.steps == round(COMPUTE / a.expected_batch_size)
        assert abs(a.expected_batch_size * a.steps - COMPUTE) <= a.expected_batch_size / 2
        assert a.epochs == pytest.approx(a.expected_batch_size * a.steps / N)
    # the config's own E[B] joins the powers of two; nothing above N, nothing beyond the compute
    assert candidate_batch_sizes(100, 1000, extra=[12, 500]) == [8, 12, 16, 32, 64]
    assert candidate_batch_sizes(10_000, 20) == [8, 16]


def test_every_candidate_is_calibrated_to_the_target_by_an_independent_accountant(table):
    from dp_accounting import dp_event
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant as Reference

    for a in table:
        ref = Reference(value_discretization_interval=1e-4)
        event = dp_event.PoissonSampledDpEvent(
            a.sample_rate, dp_event.GaussianDpEvent(a.plan.noise_multiplier)
        )
        ref.compose(dp_event.SelfComposedDpEvent(event, a.steps))
        eps = ref.get_epsilon(DELTA)
        assert 0.97 * EPS <= eps <= EPS * 1.005, (a.expected_batch_size, eps)


def test_noise_per_step_falls_as_the_batch_grows(table):
    # At fixed compute and epsilon sigma grows with E[B], but more slowly: sigma / E[B] falls.
    sigmas = [a.noise_multiplier for a in table]
    ratios = [a.noise_batch_ratio for a in table]
    assert sigmas == sorted(sigmas)
    assert ratios == sorted(ratios, reverse=True)
    assert all(r == pytest.approx(a.noise_multiplier / a.expected_batch_size)
               for r, a in zip(ratios, table, strict=True))  # fmt: skip


def test_rule_takes_the_largest_batch_that_keeps_enough_steps(table):
    assert (recommend(table, min_steps=150).expected_batch_size, recommend(table, 150).steps) == (
        256,
        150,
    )
    assert recommend(table, min_steps=151).expected_batch_size == 128
    assert recommend(table, min_steps=1).expected_batch_size == 2048
    # too little compute for min_steps: no recommendation (the rule says nothing there)
    small = allocations(num_units=N, compute=400, target_epsilon=EPS, delta=DELTA)
    assert small and recommend(small, min_steps=150) is None
    with pytest.raises(ValueError, match="min_steps=0"):
        recommend(table, min_steps=0)


def test_infeasible_candidates_say_why_and_are_never_recommended():
    # A private quantile's count noise needs a batch large enough: the small ones are refused.
    clip = PrivateQuantile(count_noise_divisor=100)
    options = allocations(num_units=N, compute=COMPUTE, target_epsilon=EPS, delta=DELTA, clip=clip)
    bad = [a for a in options if a.plan is None]
    assert bad and all("too small" in a.error for a in bad)
    assert max(a.expected_batch_size for a in bad) < min(
        a.expected_batch_size for a in options if a.plan is not None
    )
    assert recommend(options, min_steps=1).plan is not None
    assert recommend(bad, min_steps=1) is None


def test_plan_prints_the_table_and_its_command_line_reproduces_the_pick(capsys):
    main(["plan", "--config", TINY, "--compute", "2048", "--min-steps", "16"])
    out = capsys.readouterr().out
    assert "compute                       2,048 example-gradients" in out
    assert "<- this run" not in out  # --compute: the run's own allocation is another compute
    line = next(ln for ln in out.splitlines() if "--trainer.max_steps" in ln).split()
    batch, steps = float(line[1]), int(line[3])
    assert (batch, steps) == (128, 16)  # tiny.yaml: N = 256; the largest E[B] with >= 16 steps
    picked = next(ln for ln in out.splitlines() if ln.endswith("<- recommended")).split()
    # the pick, planned as a run of its own, has the sigma the table printed
    view = make_plan(read_config(["--config", TINY, *line]))
    assert view.steps == steps and view.expected_batch_size(0) == batch
    assert f"{view.sigma:.4f}" == picked[2]
    assert float(picked[3]) == pytest.approx(view.sigma / batch, rel=1e-3)
    # the config's own allocation is marked when the compute is its own
    main(["plan", "--config", TINY])
    out = capsys.readouterr().out
    assert "<- this run" in out
    # tiny.yaml spends 256 example-gradients: fewer than 150 steps at any E[B] >= 8
    assert "recommended allocation        none: no E[B] >= 8 leaves 150 steps" in out
    assert "<- recommended" not in out and "--trainer.max_steps" not in out


@pytest.mark.parametrize("bad", ["0", "-5", "x"])
def test_bad_compute_names_the_flag(bad, capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--config", TINY, "--compute", bad])
    assert f"--compute needs a positive float, got '{bad}'" in capsys.readouterr().err


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_the_runs_own_row_is_the_runs_plan_on_every_shipped_config(config):
    # The table's row for the config's own E[B] x steps is the plan fit builds (same sigma, same
    # noise per step), the noise mechanism included (banded MF's b q <= 1 refuses large E[B]).
    view = make_plan(read_config(["--config", str(config)]))
    if not view.private:
        assert view.allocations == [] and view.recommended is None
        return
    own = [
        a
        for a in view.allocations
        if a.expected_batch_size == view.expected_batch_size(0) and a.steps == view.steps
    ]
    assert len(own) == 1 and own[0].plan is not None
    assert own[0].noise_multiplier == view.grad_noise_multiplier(0)
    assert own[0].noise_batch_ratio == pytest.approx(view.noise_std(0) / view.max_grad_norm)
    bands = view.mechanism.bands
    for a in view.allocations:
        if a.expected_batch_size * bands > view.num_units:
            assert a.plan is None and f"bands={bands} times the sample rate" in a.error


def test_config_comments_quote_the_plans_recommendation():
    # A shipped config that names the plan's pick in a comment names the one it prints today.
    import re

    quoted = 0
    for config in CONFIGS:
        m = re.search(r"its rule .*? picks (\d+) x (\d+)", config.read_text())
        if m is None:
            continue
        rec = make_plan(read_config(["--config", str(config)])).recommended
        assert rec is not None, config.name
        assert (rec.expected_batch_size, rec.steps) == (int(m[1]), int(m[2])), config.name
        quoted += 1
    assert quoted >= 2
