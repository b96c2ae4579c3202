"""benchmarks/utility/study1.py: the study's plan, its results file and its report.

The end-to-end test runs the --quick recipe (tiny organisms, a few steps) into a temporary file
and cache.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from benchmarks.utility import study1 as utility

RUN_KEYS = {
    "model",
    "variant",
    "epsilon",
    "seed",
    "lr",
    "steps",
    "expected_batch_size",
    "val_loss",
    "val_loss_curve",
}
VARIANT_NAMES = {
    "dp-adam-ac",
    "dp-adam-ac-no-ema",
    "dp-adam-ac-no-clip-lr",
    "dp-adam-ac-fixed-clip",
    "dp-adamw",
    "dp-sgd",
    "dp-adambc",
    "nonprivate",
}


@pytest.mark.parametrize(
    ("losses", "expected_rates", "expected_best"),
    [
        ({}, [0.1, 0.316, 1.0], None),  # nothing run yet
        ({0.1: 3.0, 0.316: 2.0}, [0.1, 0.316, 1.0], None),  # one point missing
        ({0.1: 3.0, 0.316: 2.0, 1.0: 2.5}, [0.1, 0.316, 1.0], 0.316),  # interior best
        ({0.1: 3.0, 0.316: 2.5, 1.0: 2.0}, [0.1, 0.316, 1.0, 3.16], None),  # grows upward
        ({0.1: 3.0, 0.316: 2.5, 1.0: 2.0, 3.16: 2.2}, [0.1, 0.316, 1.0, 3.16], 1.0),
        ({0.1: 1.0, 0.316: 2.5, 1.0: 2.0}, [0.0316, 0.1, 0.316, 1.0], None),  # grows downward
        # two extensions per side at most: the edge is then accepted (and flagged in the report)
        (
            {0.01: 0.5, 0.0316: 0.8, 0.1: 1.0, 0.316: 2.5, 1.0: 2.0},
            [0.01, 0.0316, 0.1, 0.316, 1.0],
            0.01,
        ),
    ],
    ids=["empty", "partial", "interior", "up", "up-done", "down", "max-extensions"],
)
def test_tuned_grid(losses, expected_rates, expected_best):
    rates, best = utility.tuned_grid((0.1, 0.316, 1.0), losses, max_extensions=2)
    assert rates == pytest.approx(expected_rates, rel=1e-9)
    assert best == expected_best


def test_cpu_plan_covers_the_issue():
    """The full study before any run: >= 3 rates per family on seed 0, the tuned rate on seeds
    1-2, ablations and the epsilon curve on 3 seeds, the BitNet twin on 3 seeds."""
    recipe = utility.RECIPES["cpu"]
    specs = utility.plan(recipe, [])
    by_phase = {p: [s for s in specs if s.phase == p] for p in range(1, 6)}
    for family in ("dp-adam-ac", "dp-adamw", "dp-sgd", "nonprivate"):
        tune = [s for s in by_phase[1] if s.variant == family]
        assert len(tune) >= 3 and {s.seed for s in tune} == {0}
        assert all(s.lr is not None for s in tune)
        assert {s.seed for s in by_phase[2] if s.variant == family} == {1, 2}
    assert {s.variant for s in by_phase[3]} == {
        "dp-adam-ac-no-clip-lr",
        "dp-adam-ac-fixed-clip",
        "dp-adambc",
    }
    assert all(
        len([s for s in by_phase[3] if s.variant == v]) == 3
        for v in ("dp-adam-ac-no-clip-lr", "dp-adam-ac-fixed-clip", "dp-adambc")
    )
    assert sorted({(s.variant, s.epsilon) for s in by_phase[4]}) == [
        (f, e) for f in ("dp-adam-ac", "dp-sgd") for e in (1.0, 2.0, 4.0)
    ]
    assert len(by_phase[4]) == 18
    assert {s.model for s in by_phase[5]} == {"bitnet"}
    assert len(by_phase[5]) == 15
    assert all(s.lr is None for p in (2, 3, 4) for s in by_phase[p])  # nothing tuned yet
    assert all(s.epsilon is None for s in specs if s.variant == "nonprivate")
    assert recipe.num_train >= 2000 and recipe.expected_batch_size >= 64 and recipe.steps >= 300


def test_claims_share_a_study_between_processes(tmp_path):
    """A claimed run is skipped by the next claim while its process lives, and offered again
    once that process is gone or the claim is released."""
    import argparse
    import subprocess

    out = tmp_path / "utility.json"
    out.write_text(json.dumps({"runs": []}))
    recipe = utility.RECIPES["cpu"]
    args = argparse.Namespace(phase=None, only=None, model=None)
    first, todo, others = utility.claim_next(out, recipe, args)
    assert (first.phase, first.variant, first.seed, others) == (1, "dp-adam-ac", 0, 0)
    assert len(todo) == 62
    second, _, others = utility.claim_next(out, recipe, args)
    assert utility.spec_key(second) != utility.spec_key(first) and others == 1
    claims_file = tmp_path / ".utility.json.claims.json"
    claims = json.loads(claims_file.read_text())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    claims[utility.spec_key(first)]["pid"] = dead.pid
    claims_file.write_text(json.dumps(claims))
    again, _, _ = utility.claim_next(out, recipe, args)
    assert utility.spec_key(again) == utility.spec_key(first)
    utility.release(out, utility.spec_key(second))
    assert utility.spec_key(second) not in json.loads(claims_file.read_text())


def test_a_results_file_refuses_another_organism(tmp_path):
    """Runs of one file share their organisms: a cache rebuilt with other weights (pretraining is
    not bit-reproducible across machines) is refused, the same weights are accepted."""
    recipe = utility.RECIPES["cpu"]
    out = tmp_path / "utility.json"
    setup = {"models": {"slm": {"weights_sha256": "a" * 64}}}
    utility.check_or_create(
        out, recipe, lambda: setup, allow_mixed=False, fingerprints={"slm": "a" * 64}
    )
    utility.check_or_create(
        out, recipe, lambda: setup, allow_mixed=False, fingerprints={"slm": "a" * 64}
    )
    with pytest.raises(SystemExit, match="another slm organism"):
        utility.check_or_create(
            out, recipe, lambda: setup, allow_mixed=False, fingerprints={"slm": "b" * 64}
        )


def test_quick_study_end_to_end(tmp_path, capsys, restore_threads):
    out, cache = tmp_path / "new-dir" / "utility.json", tmp_path / "cache"
    # one thread: the tiny models gain nothing from more, and a busy machine loses a lot
    args = ["--quick", "--out", str(out), "--cache-dir", str(cache), "--threads", "1"]
    utility.main(args)
    data = json.loads(out.read_text())

    # schema
    assert {"commit", "machine", "torch"} <= set(data["_meta"]["provenance"])
    setup = data["setup"]
    assert {"models", "num_train", "expected_batch_size", "steps", "delta"} <= set(setup)
    for info in setup["models"].values():
        assert math.isfinite(info["pretrained_val_loss"]) and info["parameters"] > 0
    runs = data["runs"]
    assert {r["variant"] for r in runs} >= {
        "dp-adam-ac",
        "dp-adam-ac-no-ema",
        "dp-sgd",
        "nonprivate",
        "dp-adambc",
    }
    assert {r["model"] for r in runs} == {"slm", "bitnet"}
    for r in runs:
        assert set(r) >= RUN_KEYS, r["variant"]
        assert r["variant"] in VARIANT_NAMES
        assert r["steps"] == 3 and r["expected_batch_size"] == 16.0
        assert r["val_loss"] == r["val_loss_curve"][-1]["loss"]
        assert [p["step"] for p in r["val_loss_curve"]] == [0, 2, 3]
        # the step-0 loss is the organism's pretrained loss, computed by DPCausalLM here and by
        # the benchmark's own evaluation in setup
        assert r["val_loss_curve"][0]["loss"] == pytest.approx(
            setup["models"][r["model"]]["pretrained_val_loss"], rel=1e-5
        )
        if r["variant"] == "nonprivate":
            assert r["epsilon"] is None and r["epsilon_spent"] is None
        else:
            assert r["epsilon"] == 8.0 and 7.0 < r["epsilon_spent"] <= 8.0
    ac = next(r for r in runs if r["variant"] == "dp-adam-ac" and r["model"] == "slm")
    no_ema = next(r for r in runs if r["variant"] == "dp-adam-ac-no-ema" and r["model"] == "slm")
    assert no_ema["derived_from"] and no_ema["seconds"] == 0.0 and ac["weights"] == "ema"
    assert no_ema["val_loss"] != ac["val_loss"]  # raw weights differ from the EMA
    bc = next(r for r in runs if r["variant"] == "dp-adambc")
    assert bc["variance_floor"] == pytest.approx((bc["noise_multiplier"] * 1.0 / 16.0) ** 2)

    # the organisms load back through the library: tokenizer with its chat template, and the
    # twin with its ternary QAT layers
    from benchmarks.utility.organisms import CHAT_TEMPLATE, organism_dir
    from lit_dp.models import has_bitnet_qat, load_model, load_tokenizer

    for name, cfg in utility.RECIPES["quick"].organisms.items():
        path = organism_dir(cfg, cache)
        assert load_tokenizer(str(path)).chat_template == CHAT_TEMPLATE
        assert has_bitnet_qat(load_model(str(path))) == (name == "bitnet")
    fixed_note = utility.VARIANTS["dp-adam-ac-fixed-clip"].note
    assert "multiplier stays at 1" in fixed_note

    # resumable: a second invocation trains nothing and leaves the file as it was
    before = out.read_text()
    utility.main(args)
    assert out.read_text() == before

    # one study, one commit
    data["_meta"]["provenance"]["commit"] = "0" * 40
    out.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="allow-mixed-commits"):
        utility.main(args)

    capsys.readouterr()
    utility.main([*args, "--report"])
    text = capsys.readouterr().out
    assert "| dp-adam-ac | 0.003 | 1 |" in text and "| nonprivate |" in text
    assert (out.parent / "utility_epsilon.png").stat().st_size > 0
    assert (out.parent / "utility_curves.png").stat().st_size > 0


def _load_clip():
    """benchmarks/utility/clip.py, the study's clip-bound supplement."""
    from benchmarks.utility import clip

    return clip


def test_clip_supplement_tables_the_shipped_recipe_against_the_study():
    """clip.py's report: the shipped recipe per (model, epsilon), with paired deltas."""
    clip = _load_clip()

    def rec(model, variant, eps, seed, lr, loss, **extra):
        return dict(
            model=model, variant=variant, epsilon=eps, seed=seed, lr=lr, val_loss=loss, **extra
        )

    study = []
    for model, lr in (("slm", 3.16e-3), ("bitnet", 1e-2)):
        study += [rec(model, "dp-adam-ac", 8.0, 0, 1e-3, 9.0)]  # a worse rate of the grid
        study += [rec(model, "dp-sgd", 8.0, 0, 0.1, 9.0)]
        for s in range(3):
            study += [
                rec(model, "dp-adam-ac", 8.0, s, lr, 2.0 + s),
                rec(model, "dp-sgd", 8.0, s, 0.0316, 1.5 + s),
            ]
    study += [rec("slm", "dp-adam-ac-fixed-clip", 8.0, s, 3.16e-3, 1.0 + s) for s in range(3)]
    study += [rec("slm", "dp-adam-ac", 2.0, s, 3.16e-3, 3.0 + s) for s in range(3)]

    def fixed1(model, eps, seed, lr, loss, weights="ema"):
        """A supplement record of the shipped recipe (its raw weights under their own name)."""
        variant = "dp-adam-ac-fixed-clip" + ("-raw" if weights == "raw" else "") + "@fixed-1"
        return rec(model, variant, eps, seed, lr, loss, setting="fixed-1", weights=weights)

    mine = [fixed1("bitnet", 8.0, s, 1e-2, 1.75 + s) for s in range(3)]
    mine += [fixed1("slm", 2.0, s, 3.16e-3, 2.5 + s * 1.1) for s in range(2)]
    # the raw weights of the twin's runs, 0.1 above dp-sgd on every seed
    mine += [fixed1("bitnet", 8.0, s, 1e-2, 1.6 + s, weights="raw") for s in range(3)]

    assert clip.study_rate("bitnet", study) == 1e-2
    with pytest.raises(SystemExit, match="no tuned dp-adam-ac rate for bitnet"):
        clip.study_rate("bitnet", study[:0])
    rows = {
        tuple(line.split(" | ")[:2]): line
        for line in clip._shipped_table(study, *clip._shipped_runs(study, mine)).splitlines()
        if line.startswith("| ") and "---" not in line
    }
    bitnet = rows[("| bitnet", "8")]
    # shipped 1.75+s against dp-adam-ac 2+s (-0.25 every seed) and dp-sgd 1.5+s (+0.25)
    assert "2.750 ± 1.000" in bitnet and "-0.250 [-0.250, -0.250]" in bitnet
    assert "+0.250 [+0.250, +0.250]" in bitnet
    assert bitnet.endswith("| +0.100 [+0.100, +0.100] |") and "2.600 ± 1.000" in bitnet
    slm2 = rows[("| slm", "2")]  # two seeds; the study has no dp-sgd at epsilon 2 here
    assert "3.050 ± 0.778" in slm2 and "—" in slm2
    assert ("| slm", "8") in rows  # the study's own shipped runs are a row too
    # nothing beyond the study: no table
    assert clip._shipped_table(study, *clip._shipped_runs(study, [])) == ""


def test_clip_supplement_records_the_raw_weights_of_each_run(monkeypatch):
    """A fixed-clip run (no derived no-EMA variant) gets a raw-weights record from the same run."""
    clip = _load_clip()
    from benchmarks.utility import train as utility_train

    curve = [{"step": 0, "loss": 10.0}, {"step": 300, "loss": 2.5}]
    seen = {}

    def fake_train_one(spec, recipe, organism):
        seen.update(spec=spec, recipe=recipe)
        ema = {
            "variant": spec.variant,
            "model": spec.model,
            "epsilon": spec.epsilon,
            "seed": spec.seed,
            "lr": spec.lr,
            "weights": "ema",
            "val_loss": 2.0,
            "val_loss_curve": [],
            "val_loss_raw_curve": curve,
            "seconds": 9.0,
        }
        return [ema]

    monkeypatch.setattr(utility_train, "train_one", fake_train_one)
    records = clip._run("bitnet", "fixed-1", 4.0, 2, 1e-3, Path("unused"))
    assert seen["spec"].epsilon == 4.0 and seen["spec"].model == "bitnet"
    assert seen["recipe"].max_grad_norm == 1.0
    assert [(r["variant"], r["weights"], r["val_loss"]) for r in records] == [
        ("dp-adam-ac-fixed-clip@fixed-1", "ema", 2.0),
        ("dp-adam-ac-fixed-clip-raw@fixed-1", "raw", 2.5),
    ]
    assert records[1]["val_loss_curve"] == curve and records[1]["seconds"] == 0.0
    assert {r["setting"] for r in records} == {"fixed-1"}


def test_bitnet_table_pairs_the_cost_of_dp_per_seed():
    """The twin's gap above its own ceiling, against the slm's, paired over seeds."""
    from benchmarks.utility import report as utility_report

    runs = []
    for s in range(3):
        for model, extra in (("slm", 0.0), ("bitnet", 0.5)):
            runs += [
                {
                    "model": model,
                    "variant": "nonprivate",
                    "epsilon": None,
                    "seed": s,
                    "lr": 1e-3,
                    "val_loss": 0.6 + 0.1 * s,
                },
                {
                    "model": model,
                    "variant": "dp-adam-ac",
                    "epsilon": 8.0,
                    "seed": s,
                    "lr": 1e-3,
                    "val_loss": 1.8 + extra + 0.2 * s,
                },
                {
                    "model": model,
                    "variant": "dp-adam-ac-no-ema",
                    "epsilon": 8.0,
                    "seed": s,
                    "lr": 1e-3,
                    "val_loss": 1.9 + 0.2 * s,
                },
                {
                    "model": model,
                    "variant": "dp-sgd",
                    "epsilon": 8.0,
                    "seed": s,
                    "lr": 0.01,
                    "val_loss": 1.7 + extra + 0.1 * s,
                },
            ]
    setup = {"models": {"bitnet": {"pretrained_val_loss": 10.0}}}
    text = "\n".join(
        utility_report._bitnet_table(runs, utility_report.tuned_rates(runs), setup, 10.7)
    )
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    # DP costs the twin 0.5 more on every seed; its raw weights no more than the slm's
    assert rows["| dp-adam-ac"].endswith("| +0.500 [+0.500, +0.500] |")
    assert rows["| dp-sgd"].endswith("| +0.500 [+0.500, +0.500] |")
    assert rows["| dp-adam-ac-no-ema"].endswith("| +0.000 [+0.000, +0.000] |")
    # within the twin: 0.1, 0.2, 0.3 over the seeds (t-interval with 2 degrees of freedom)
    assert "dp-adam-ac - dp-sgd +0.200 [-0.048, +0.448]" in text
    assert "EMA - raw weights +0.400 [+0.400, +0.400]" in text


def _run(model, variant, eps, seed, lr, curve, **extra):
    """A study record with a validation curve {step: loss} (val_loss = its last point)."""
    points = [{"step": s, "loss": v} for s, v in sorted(curve.items())]
    return dict(
        model=model,
        variant=variant,
        epsilon=eps,
        seed=seed,
        lr=lr,
        val_loss=points[-1]["loss"],
        val_loss_curve=points,
        **extra,
    )


def test_limits_split_the_shipped_lead_into_optimizer_and_ema():
    """limits.ema_lead: dp-adamw is the shipped recipe's training with raw weights, so the lead
    over DP-SGD splits into dp-adamw - dp-sgd and EMA alone; a different trace is reported."""
    from benchmarks.utility import limits

    def trace(seed):
        return [{"step": 10, "train_loss": 5.0 + seed, "lr": 3e-3}]

    runs = []
    for s in range(3):
        runs += [
            _run(
                "slm",
                "dp-adam-ac-fixed-clip",
                8.0,
                s,
                3e-3,
                {300: 1.6 + 0.1 * s},
                trace=trace(s),
                weights="ema",
            ),
            _run("slm", "dp-adam-ac", 8.0, s, 3e-3, {300: 1.8 + 0.1 * s}, weights="ema"),
            _run(
                "slm",
                "dp-adamw",
                8.0,
                s,
                3e-3,
                {300: 1.75 + 0.1 * s + 0.01 * s},
                trace=trace(s),
                weights="raw",
            ),
            _run("slm", "dp-sgd", 8.0, s, 0.03, {300: 1.7 + 0.1 * s}, weights="raw"),
        ]
    lead = limits.ema_lead(runs)
    assert lead["same_training"] and lead["sgd_weights"] == ["raw"]
    assert lead["shipped_minus_sgd"][:3] == pytest.approx((-0.1, -0.1, -0.1))
    # dp-adamw - dp-sgd: 0.05, 0.06, 0.07 -> mean 0.06, t-interval 0.06 +- 4.303 * 0.01 / sqrt(3)
    mean, low, high, n = lead["adamw_minus_sgd"]
    assert (mean, n) == (pytest.approx(0.06), 3)
    assert high - mean == pytest.approx(4.302653 * 0.01 / math.sqrt(3), rel=1e-5)
    assert mean - low == pytest.approx(high - mean)
    assert lead["ema"][0] == pytest.approx(-0.16)
    runs[2]["trace"] = [{"step": 10, "train_loss": 9.0, "lr": 3e-3}]  # seed 0's dp-adamw
    assert not limits.ema_lead(runs)["same_training"]
    assert limits.ema_lead([r for r in runs if r["variant"] != "dp-adamw"]) is None


def test_limits_find_curves_that_rise_and_runs_still_falling():
    """limits.rising_runs lists a (variant, epsilon) only when every seed's lowest validation
    loss comes before the end; late_fall is the loss 50 steps before the end minus the last."""
    from benchmarks.utility import limits

    runs = [_run("slm", "dp-sgd", 8.0, s, 0.03, {0: 10.0, 250: 2.0, 300: 1.9}) for s in range(2)]
    runs += [
        _run("slm", "dp-sgd", 1.0, 0, 0.03, {0: 10.0, 100: 3.6, 150: 3.7, 300: 4.0}),
        _run("slm", "dp-sgd", 1.0, 1, 0.03, {0: 10.0, 100: 3.8, 150: 3.5, 300: 3.9}),
        _run("slm", "dp-sgd", 2.0, 0, 0.03, {0: 10.0, 250: 2.7, 300: 2.6}),  # still falling
        _run("slm", "dp-sgd", 2.0, 1, 0.03, {0: 10.0, 250: 2.6, 300: 2.7}),
    ]
    rising = limits.rising_runs(runs)
    assert [(r["variant"], r["epsilon"]) for r in rising] == [("dp-sgd", 1.0)]
    assert [(m["step"], m["best"]) for m in rising[0]["seeds"]] == [(100, 3.6), (150, 3.5)]
    assert [m["rise"] for m in rising[0]["seeds"]] == pytest.approx([0.4, 0.4])
    assert limits.late_fall({0: runs[0], 1: runs[1]}) == pytest.approx([0.1, 0.1])
    assert limits.late_fall({0: runs[2]}) == []  # no point 50 steps before the end


def test_limits_selection_optimism_and_gain_fractions():
    """The selection estimate follows s / sqrt(n) * E[max of k normals]; the gain fractions are
    measured from the pretrained start and from ln(vocabulary size)."""
    from benchmarks.utility import limits

    assert limits.expected_max_normal(1) == pytest.approx(0.0, abs=1e-9)
    assert limits.expected_max_normal(2) == pytest.approx(1 / math.sqrt(math.pi))
    # a: seeds 1, 2, 3 (sd 1); b: the same shifted by 0.5 (sd 1, no interaction); c: one seed
    configs = {
        "a": {s: {"val_loss": 1.0 + s} for s in range(3)},
        "b": {s: {"val_loss": 1.5 + s} for s in range(3)},
        "c": {0: {"val_loss": 9.0}},
    }
    opt = limits.selection_optimism(configs)
    assert (opt["k"], opt["n"]) == (3, 3)
    assert opt["sd_total"] == pytest.approx(1.0) and opt["sd_interaction"] == pytest.approx(0.0)
    e3 = limits.expected_max_normal(3)
    assert e3 == pytest.approx(1.5 / math.sqrt(math.pi))
    assert opt["optimism_total"] == pytest.approx(e3 / math.sqrt(3))
    assert limits.selection_optimism({"a": configs["a"], "c": configs["c"]}) is None

    runs = [_run("slm", "nonprivate", None, s, 1e-3, {300: 0.5}) for s in range(3)]
    data = {
        "runs": runs,
        "setup": {"models": {"slm": {"pretrained_val_loss": 10.5, "vocab_size": 1000}}},
    }
    sel = {s: {"val_loss": 1.5} for s in range(3)}
    g = limits.gain_fractions(data, "slm", sel)
    assert g["from_start"] == pytest.approx(0.9) and g["gap"] == pytest.approx(1.0)
    assert g["from_uniform"] == pytest.approx((math.log(1000) - 1.5) / (math.log(1000) - 0.5))
    assert g["perplexity_ratio"] == pytest.approx(math.e)


def test_limits_ema_cap_and_seed0_luck():
    """The warm-up's decay at the last step and the first step a decay acts; seed 0's loss at
    the rate it chose against the other seeds'."""
    from benchmarks.utility import limits

    cap = limits.ema_cap(300)
    assert cap["default"] == 0.999 and cap["at_end"] == pytest.approx(300 / 309)
    from lit_dp.callbacks.ema import ema_decay

    assert [limits.first_step_at(d) for d in (0.8, 0.9, 0.95)] == [35, 80, 170]
    for d in (0.8, 0.9, 0.95, 0.99):  # the first step where the warm-up no longer binds
        t = limits.first_step_at(d)
        assert ema_decay(t, decay=d) == pytest.approx(d) and ema_decay(t - 1, decay=d) < d
    runs = [
        _run("slm", "dp-sgd", 8.0, 0, lr, {300: loss}) for lr, loss in ((0.1, 2.0), (0.03, 1.6))
    ]
    runs += [_run("slm", "dp-sgd", 8.0, s, 0.03, {300: 1.7 + 0.1 * (s - 1)}) for s in (1, 2)]
    luck = limits.seed0_luck(runs)
    assert luck["per_family"] == {("slm", "dp-sgd"): pytest.approx(-0.15)}
