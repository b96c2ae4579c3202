"""benchmarks/utility/study2.py: the plan (a pure function of the results), and a quick
end-to-end run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks.utility import study2 as u2

ISSUE_FIELDS = {
    "model", "method", "ema", "lr_schedule", "lr", "epsilon", "seed", "expected_batch_size",
    "steps", "bands", "noise_multiplier", "val_loss", "test_loss", "val_loss_curve", "commit",
    "organism",
}  # fmt: skip


DESIGN = u2.DESIGNS["cpu"]


def _rec(setting, seed, lr, ema_loss, raw_loss):
    base = {
        "method": setting.method,
        "lr_schedule": setting.schedule,
        "expected_batch_size": setting.batch_size,
        "epsilon": setting.epsilon,
        "bands": setting.bands,
        "seed": seed,
        "lr": lr,
    }
    return [
        {**base, "ema": True, "val_loss": ema_loss},
        {**base, "ema": False, "val_loss": raw_loss},
    ]


def test_first_runs_tune_the_shipped_recipe_at_the_middle_allocation():
    first = u2.plan(DESIGN, [])[0]
    assert first.phase == 1 and first.seed == 0
    assert first.setting == u2.Setting("dp-adamw", "constant", 128, 8.0)
    assert DESIGN.steps(64) * 64 == DESIGN.steps(128) * 128 == DESIGN.steps(256) * 256
    # nothing of blocks A and B before block M has settled
    assert {p.setting.batch_size for p in u2.plan(DESIGN, [])} == {128}
    assert not any(p.setting.method == "bandmf" for p in u2.plan(DESIGN, []))


def test_a_grid_grows_past_the_edge_where_ema_or_raw_is_best():
    s = u2.Setting("dp-sgd", "cosine", 128, 2.0)
    grid = u2.lr_grid(DESIGN.grid_center["dp-sgd"])
    runs = []
    # EMA best in the middle, raw best at the low edge: one more rate below, nothing above
    for lr, (e, r) in zip(grid, [(3.0, 2.0), (2.5, 2.6), (2.9, 3.0)], strict=True):
        runs += _rec(s, 0, lr, e, r)
    best, todo = u2.tuned(DESIGN, runs, s)
    assert best == {} and todo == [u2._step(grid[0], -1)]
    runs += _rec(s, 0, todo[0], 3.5, 2.4)  # the new point is worse for raw: settled
    best, todo = u2.tuned(DESIGN, runs, s)
    assert todo == [] and best == {True: grid[1], False: grid[0]}
    seeds = [p for p in u2.plan(DESIGN, runs) if p.setting == s]
    assert sorted((p.seed, p.lr) for p in seeds) == sorted(
        (seed, lr) for seed in (1, 2) for lr in (grid[0], grid[1])
    )


def test_a_grid_grows_at_most_twice_per_side():
    s = u2.Setting("dp-adamw", "constant", 128, 8.0)
    runs = []
    lr = u2.lr_grid(DESIGN.grid_center["dp-adamw"])
    for i, x in enumerate(lr):
        runs += _rec(s, 0, x, 5.0 - i, 5.0 - i)  # always best at the top
    for _ in range(DESIGN.max_extensions):
        _, todo = u2.tuned(DESIGN, runs, s)
        assert len(todo) == 1 and todo[0] > max(r["lr"] for r in runs)
        runs += _rec(s, 0, todo[0], 0.0 - len(runs), 0.0 - len(runs))
    best, todo = u2.tuned(DESIGN, runs, s)
    assert todo == [] and best[True] == max(r["lr"] for r in runs)


def _settle(settings, runs, score):
    for s in settings:
        for lr in u2.lr_grid(DESIGN.grid_center[s.method]):
            runs += _rec(s, 0, lr, score(s, lr), score(s, lr) + 0.1)


def test_later_blocks_follow_the_winners_and_bandmf_uses_the_planner_rule():
    runs: list[dict] = []
    mid = [s for s, _ in u2.settings(DESIGN, runs)]

    def score(s, lr):  # cosine wins, the middle rate wins
        return 3.0 - (0.5 if s.schedule == "cosine" else 0.0) + abs(math.log10(lr) + 3)

    _settle(mid, runs, score)
    block_a = [s for s, _ in u2.settings(DESIGN, runs) if s.batch_size != 128]
    assert {(s.method, s.schedule) for s in block_a} == {
        ("dp-adamw", "cosine"),
        ("nonprivate", "cosine"),
    }
    assert {s.batch_size for s in block_a} == {64, 256}

    def score_a(s, lr):  # E[B] 256 wins at both epsilons
        return score(s, lr) - (1.0 if s.batch_size == 256 else 0.0)

    _settle(block_a, runs, score_a)
    bandmf = [(s, lender) for s, lender in u2.settings(DESIGN, runs) if s.method == "bandmf"]
    for eps in DESIGN.epsilons:
        b = u2.suggested_bands(DESIGN, 256, eps)
        mine = [(s, lender) for s, lender in bandmf if s.epsilon == eps]
        assert all(s.batch_size == 256 and s.schedule == "cosine" for s, _ in mine)
        tuned_here = [s for s, lender in mine if lender is None]
        assert [s.bands for s in tuned_here] == ([b] if b >= 2 else [])
        neighbours = {s.bands for s, lender in mine if lender is not None}
        assert neighbours <= {max(2, b // 2), min(DESIGN.num_train // 256, 2 * b)}
        assert all(lender.bands == b for s, lender in mine if lender is not None)
    # b never exceeds N / E[B]: each of the b groups must hold E[B] units on average
    assert all(s.bands * s.batch_size <= DESIGN.num_train for s, _ in bandmf)


def test_quick_study_end_to_end_and_resume(tmp_path, monkeypatch, restore_threads):
    monkeypatch.setenv("LIT_DP_CACHE", str(tmp_path / "cache"))  # the tiny organism's cache
    out = tmp_path / "u2.json"
    u2.main(["--design", "quick", "--out", str(out), "--max-runs", "2"])
    data = json.loads(out.read_text())
    assert {"_meta", "setup", "runs"} <= set(data)
    assert data["_meta"]["provenance"]["commit"]
    runs = data["runs"]
    assert len(runs) == 4  # two runs, each recorded for its EMA and its raw weights
    for r in runs:
        assert set(r) >= ISSUE_FIELDS, ISSUE_FIELDS - set(r)
        assert math.isfinite(r["val_loss"]) and math.isfinite(r["test_loss"])
        assert (
            r["val_loss_curve"][0]["step"] == 0 and r["val_loss_curve"][-1]["loss"] == r["val_loss"]
        )
        assert r["steps"] == u2.DESIGNS["quick"].steps(r["expected_batch_size"])
        assert r["noise_multiplier"] > 0 and r["epsilon_spent"] <= r["epsilon"] + 1e-9
    ema, raw = runs[0], runs[1]
    assert ema["ema"] and not raw["ema"] and u2.record_key(ema) == u2.record_key(raw)
    # EMA and raw start from the same weights; after training they differ
    assert ema["val_loss_curve"][0] == raw["val_loss_curve"][0]
    assert ema["val_loss"] != raw["val_loss"]
    assert ema["test_loss"] != raw["test_loss"]  # each weights' own test loss
    # a second invocation continues: it never reruns a finished run
    u2.main(["--design", "quick", "--out", str(out), "--max-runs", "1"])
    again = json.loads(out.read_text())["runs"]
    assert again[:4] == runs and len(again) == 6
    assert len({(u2.record_key(r), r["ema"]) for r in again}) == 6
    assert (
        not (tmp_path / ".u2.json.claims.json").exists()
        or json.loads((tmp_path / ".u2.json.claims.json").read_text()) == {}
    )


def test_a_results_file_of_another_design_is_refused(tmp_path):
    out = tmp_path / "u2.json"
    setup = {"design": u2.DESIGNS["cpu"].identity()}
    out.write_text(
        json.dumps({"_meta": {"provenance": {"commit": "x"}}, "setup": setup, "runs": []})
    )
    with pytest.raises(SystemExit, match="another design"):
        u2.open_results(out, u2.DESIGNS["quick"], Path("."), allow_mixed=False)


def _full(setting, seed, lr, val, test, *, ema=True):
    return {
        "method": setting.method,
        "lr_schedule": setting.schedule,
        "expected_batch_size": setting.batch_size,
        "epsilon": setting.epsilon,
        "bands": setting.bands,
        "seed": seed,
        "lr": lr,
        "ema": ema,
        "val_loss": val,
        "test_loss": test,
        "noise_multiplier": 1.0,
        "commit": "c",
        "cpu_seconds": 1.0,
        "val_loss_curve": [{"step": 0, "loss": 9.0}, {"step": 80, "loss": val + 0.1},
                           {"step": 100, "loss": val}],
    }  # fmt: skip


def test_report_scores_on_test_the_rate_validation_chose_and_pairs_seeds():
    from benchmarks.utility import study2_report as rep

    dp = u2.Setting("dp-adamw", "constant", 128, 8.0)
    npv = u2.Setting("nonprivate", "constant", 128, None)
    grid = u2.lr_grid(DESIGN.grid_center["dp-adamw"])
    runs = []
    for s, base in ((dp, 2.0), (npv, 1.0)):
        for lr, v, t in zip(grid, [0.3, 0.0, 0.1], [0.0, 0.5, 0.2], strict=True):
            for ema in (True, False):  # test prefers grid[0]; validation chooses grid[1]
                runs.append(_full(s, 0, lr, base + v, base + t, ema=ema))
        for seed, t in ((1, 0.7), (2, 0.3)):
            for ema in (True, False):
                runs.append(_full(s, seed, grid[1], base + 0.1, base + t, ema=ema))
    study = rep.Study({"_meta": {"design": "cpu"}, "runs": runs})
    assert study.rate((dp, True)) == grid[1]
    tests = sorted(r["test_loss"] for r in study.seeds((dp, True)).values())
    assert tests == pytest.approx([2.3, 2.5, 2.7])
    assert study.nonprivate_reference() in {(npv, True), (npv, False)}
    diffs = study.diffs((dp, True), (npv, True))
    assert diffs == pytest.approx([1.0, 1.0, 1.0])
    mean, half = rep.t_interval([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0) and half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    text = rep.tables({"_meta": {"design": "cpu"}, "runs": runs, "setup": {}})
    row = next(line for line in text.splitlines() if line.startswith("| 8 | 128 x 300 | dp-adamw"))
    assert "2.500 [" in row and "+1.000" in row and f"{grid[1]:g}" in row


def _settled(setting, val_by_seed, test_by_seed, *, rate_index=1):
    """Records of a settled grid (seed 0 best at grid[rate_index], mid-grid) plus seeds 1, 2."""
    grid = u2.lr_grid(DESIGN.grid_center["dp-sgd" if setting.method == "dp-sgd" else "dp-adamw"])
    runs = []
    for i, lr in enumerate(grid):
        for ema in (True, False):
            off = 0.0 if i == rate_index else 0.5
            runs.append(_full(setting, 0, lr, val_by_seed[0] + off, test_by_seed[0] + off, ema=ema))
    for seed in (1, 2):
        for ema in (True, False):
            runs.append(
                _full(
                    setting, seed, grid[rate_index], val_by_seed[seed], test_by_seed[seed], ema=ema
                )
            )
    return runs


def test_report_compares_allocations_and_each_method_at_its_best():
    from benchmarks.utility import study2_report as rep

    mid = u2.Setting("dp-adamw", "constant", 128, 8.0)
    big = u2.Setting("dp-adamw", "constant", 256, 8.0)
    sgd = u2.Setting("dp-sgd", "cosine", 128, 8.0)
    runs = (
        _settled(mid, [1.5, 1.5, 1.5], [1.5, 1.6, 1.7])
        + _settled(big, [1.2, 1.2, 1.2], [1.2, 1.4, 1.3])  # validation prefers 256 x 150
        + _settled(sgd, [1.3, 1.3, 1.3], [1.3, 1.3, 1.3])
    )
    study = rep.Study({"_meta": {"design": "cpu"}, "runs": runs})
    assert study.best("dp-adamw", 8.0)[0] == big  # across allocations, by seed-0 validation
    assert study.best("dp-sgd", 8.0)[0] == sgd
    assert study.best("bandmf", 8.0) is None
    rows = {(name, a, b): study.diffs(a, b) for name, a, b in rep.comparisons(study)}
    assert rows[("allocation", (big, True), (mid, True))] == pytest.approx([-0.3, -0.2, -0.4])
    best = [k for k in rows if k[0] == "best DP-AdamW - best DP-SGD"]
    assert len(best) == 1 and rows[best[0]] == pytest.approx([-0.1, 0.1, 0.0])
    same = [k for k in rows if k[0] == "best DP-AdamW - best DP-SGD, same E[B] x steps"]
    assert len(same) == 1 and same[0][1] == (mid, True)  # 128 x 300, where both ran
    assert rows[same[0]] == pytest.approx([0.2, 0.3, 0.4])
    text = rep.tables({"_meta": {"design": "cpu"}, "runs": runs, "setup": {}})
    row = next(ln for ln in text.splitlines() if ln.startswith("| best DP-AdamW - best DP-SGD"))
    assert "each its own" in row and "(256 x 150)" in row and "(128 x 300)" in row


def test_report_does_not_score_a_grid_still_open():
    # One seed-0 run of a grid of three is not a tuned setting (it once looked like a borrower).
    from benchmarks.utility import study2_report as rep

    s = u2.Setting("dp-sgd", "constant", 128, 2.0)
    grid = u2.lr_grid(DESIGN.grid_center["dp-sgd"])
    study = rep.Study({"_meta": {"design": "cpu"}, "runs": [_full(s, 0, grid[0], 1.9, 1.9)]})
    assert study.rate((s, True)) is None and study.seeds((s, True)) == {}
    assert study.best("dp-sgd", 2.0) is None


def test_readme_results_match_the_committed_results_file():
    # Every "mean [low, high]" that benchmarks/README.md section 7 quotes is an interval the
    # report computes from results/utility2.json (a sign may be turned in the prose: "lower by").
    import re

    from benchmarks.common.results import load_results
    from benchmarks.utility import study2_report as rep

    triple = re.compile(r"([+-]?\d+\.\d{3})\s+\[([+-]?\d+\.\d{3}),\s+([+-]?\d+\.\d{3})\]")
    root = Path(__file__).parents[1]
    text = (root / "benchmarks" / "README.md").read_text()
    section = ""
    for heading, least in (("Results: epsilon 8", 10), ("Results: epsilon 2", 10),
                           ("The non-private reference", 4)):  # fmt: skip
        part = text.split(f"### {heading}\n", 1)[1].split("\n### ", 1)[0]
        part = part.split("\nEach record holds", 1)[0]
        assert len(triple.findall(part)) >= least, f"'{heading}' quotes too little"
        section += part
    # ... and the users' docs that quote it: the plan's rule (README) and the recipe (method.md)
    readme = (root / "README.md").read_text()
    section += readme.split("**How to spend the compute.**", 1)[1].split("\n\n", 1)[0]
    method = (root / "docs" / "method.md").read_text()
    section += method.split("A second study", 1)[1].split("The first study's findings", 1)[0]
    noise = (root / "docs" / "correlated-noise.md").read_text()
    utility = noise.split("\n## Utility\n", 1)[1].split("\n## ", 1)[0]
    assert len(triple.findall(utility)) >= 3  # banded MF's own page quotes the study too
    section += utility
    quoted = triple.findall(section)
    assert len(quoted) >= 10
    report = rep.tables(load_results(root / "benchmarks" / "results" / "utility2.json"))
    computed = {
        (abs(float(m)), frozenset({abs(float(lo)), abs(float(hi))}))
        for m, lo, hi in triple.findall(report)
    }
    for m, lo, hi in quoted:
        key = (abs(float(m)), frozenset({abs(float(lo)), abs(float(hi))}))
        assert key in computed, f"{m} [{lo}, {hi}] is not in the report"


def test_report_plots_test_loss_against_bands_with_independent_noise_as_b_1(tmp_path):
    from benchmarks.utility import study2_report as rep

    base = u2.Setting("dp-adamw", "constant", 256, 8.0)
    band = u2.Setting("bandmf", "constant", 256, 8.0, bands=10)
    sgd = u2.Setting("dp-sgd", "constant", 128, 8.0)
    runs = (
        _settled(base, [1.2, 1.2, 1.2], [1.2, 1.3, 1.4])
        + _settled(band, [1.0, 1.0, 1.0], [1.0, 1.1, 1.2])
        + _settled(sgd, [1.3, 1.3, 1.3], [1.3, 1.3, 1.3])
    )
    data = {"_meta": {"design": "cpu"}, "runs": runs, "setup": {}}
    study = rep.Study(data)
    series = rep.band_series(study, 8.0, True)
    assert [b for b, _ in series] == [1, 10]
    assert series[0][1] == (base, True) and series[1][1] == (band, True)
    assert rep.band_series(study, 2.0, True) == []
    rows = {(n, a, b): study.diffs(a, b) for n, a, b in rep.comparisons(study)}
    assert rows[("banded MF - DP-AdamW", (band, True), (base, True))] == pytest.approx([-0.2] * 3)
    written = rep.plots(data, tmp_path)
    names = sorted(p.name for p in written)
    assert names == ["utility2_allocation.png", "utility2_bands.png", "utility2_curves.png"]
    assert all(p.stat().st_size > 0 for p in written)
    # without banded-MF records there is no bands plot (and no empty figure)
    data["runs"] = [r for r in runs if r["method"] != "bandmf"]
    (tmp_path / "none").mkdir()
    assert "utility2_bands.png" not in {p.name for p in rep.plots(data, tmp_path / "none")}


def test_above_non_private_is_against_the_best_non_private_run_at_the_same_compute():
    # Every allocation spends the same example-gradients, so a private run at 128 x 300 is
    # measured against the non-private allocation that validation prefers (here 256 x 150).
    from benchmarks.utility import study2_report as rep

    dp = u2.Setting("dp-adamw", "constant", 128, 8.0)
    np_mid = u2.Setting("nonprivate", "constant", 128, None)
    np_big = u2.Setting("nonprivate", "constant", 256, None)
    runs = (
        _settled(dp, [1.5, 1.5, 1.5], [1.5, 1.6, 1.7])
        + _settled(np_mid, [0.8, 0.8, 0.8], [0.8, 0.8, 0.8])
        + _settled(np_big, [0.7, 0.7, 0.7], [0.7, 0.6, 0.5])
    )
    study = rep.Study({"_meta": {"design": "cpu"}, "runs": runs})
    assert study.nonprivate_reference()[0] == np_big
    text = rep.tables({"_meta": {"design": "cpu"}, "runs": runs, "setup": {}})
    row = next(ln for ln in text.splitlines() if ln.startswith("| 8 | 128 x 300 | dp-adamw"))
    assert "+1.000 [" in row and f"{math.exp(1.0):.3f}" in row


def test_report_pairs_the_non_private_reference_like_dp_adamw():
    # The reference's own choices (allocation, schedule, EMA) are paired questions too, so the
    # docs can say how non-private training spends compute beside how private training does.
    from benchmarks.utility import study2_report as rep

    mid = u2.Setting("nonprivate", "constant", 128, None)
    small = u2.Setting("nonprivate", "constant", 64, None)
    cos = u2.Setting("nonprivate", "cosine", 128, None)
    runs = (
        _settled(mid, [0.8, 0.8, 0.8], [0.8, 0.9, 1.0])
        + _settled(small, [0.7, 0.7, 0.7], [0.7, 0.7, 0.7])
        + _settled(cos, [0.9, 0.9, 0.9], [1.0, 1.0, 1.0])
    )
    study = rep.Study({"_meta": {"design": "cpu"}, "runs": runs})
    rows = {(name, a, b): study.diffs(a, b) for name, a, b in rep.comparisons(study)}
    assert rows[("allocation", (small, True), (mid, True))] == pytest.approx([-0.1, -0.2, -0.3])
    assert rows[("constant - cosine", (mid, False), (cos, False))] == pytest.approx(
        [-0.2, -0.1, 0.0]
    )
    assert ("EMA - raw", (small, True), (small, False)) in rows
    assert not any(name.startswith("DP-AdamW - DP-SGD") for name, _, _ in rows)
    text = rep.tables({"_meta": {"design": "cpu"}, "runs": runs, "setup": {}})
    row = next(ln for ln in text.splitlines() if ln.startswith("| allocation | non-private"))
    assert "(64 x 600)" in row and "(128 x 300)" in row and "-0.200 [" in row
