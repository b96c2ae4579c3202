"""benchmarks/audit/one_run.py: resumable results (a finished run is skipped) and the README table,
on its --quick recipe (a tiny random model, a few steps) in a temporary file."""

from __future__ import annotations

import json


def _load():
    from benchmarks.audit import one_run

    return one_run


def test_quick_runs_append_skip_what_is_done_and_report(tmp_path):
    bench = _load()
    out = tmp_path / "audit_run.json"
    bench.main(["--quick", "--out", str(out), "--max-runs", "1"])
    bench.main(["--quick", "--out", str(out), "--max-runs", "1"])  # continues, not repeats
    runs = json.loads(out.read_text())["runs"]
    assert [(r["epsilon_target"], r["seed"]) for r in runs] == [(None, 0), (8.0, 0)]
    private = runs[1]
    assert private["epsilon_spent"] <= 8.0 and private["num_units"] == 96 + private["num_included"]
    assert private["epsilon_lower_bound"] >= 0.0 and private["guesses"]["num_canaries"] == 64
    table = bench.report(out)
    assert "| non-private (inf) | 1 |" in table
    assert f"| {private['epsilon_spent']:.2f} (" in table
