"""The clip bound, a supplement to the utility study (``utility.py``): where should C sit?

The study's ablation runs DP-Adam-AC with the private-quantile clip at the paper's target clip
rate rho* = 0.2 (C_t tracks the 80th percentile of the unit gradient norms) and with a fixed
C = 1. This script asks what lies between and beyond, on the same slm organism, private data,
run length, seeds and learning rate (DP-Adam-AC's tuned 3.16e-3), one setting at a time:

  pq-0.2      PrivateQuantile, rho* = 0.2: the study's ``dp-adam-ac`` again, a control that must
              reproduce its seed's loss (it shows the two files are comparable)
  pq-0.5      PrivateQuantile, rho* = 0.5 (the median norm)
  pq-0.9      PrivateQuantile, rho* = 0.9 (C near the 10th percentile: most units clipped)
  fixed-0.1   FixedClip, C = 0.1 (every unit clipped, like the study's C = 1, at a tenth of it)

EMA and the clip-driven lr are on (the clip-driven lr steers to the same rho*; with a fixed C
there is no privatized clip rate and it stays at 1). Records go to
``results/utility_clip.json``, one per run and its no-EMA twin, appended as each finishes; a
setting already there is skipped. The organisms must be the study's (same weights sha256).

    python benchmarks/utility_clip.py --threads 1                 # every setting on seed 0
    python benchmarks/utility_clip.py --only pq-0.9 --seed 1 --seed 2
    python benchmarks/utility_clip.py --report                    # the table, with the study's
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lit_dp
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _meta import git_commit, provenance
from utility import RECIPES, RESULTS
from utility_organisms import build_organism, cache_root, organism_fingerprint
from utility_plan import EPS_MAIN, RunSpec
from utility_report import fmt
from utility_results import CODE_PATHS, append_runs, load_results, write_atomic

# label -> (study variant it runs as, Recipe fields it changes)
SETTINGS: dict[str, tuple[str, dict[str, float]]] = {
    "pq-0.2": ("dp-adam-ac", {"target_clip_rate": 0.2}),
    "pq-0.5": ("dp-adam-ac", {"target_clip_rate": 0.5}),
    "pq-0.9": ("dp-adam-ac", {"target_clip_rate": 0.9}),
    "fixed-0.1": ("dp-adam-ac-fixed-clip", {"max_grad_norm": 0.1}),
}
LR = 3.16e-3  # DP-Adam-AC's rate tuned by the study's phase 1 (seed 0, epsilon 8)
OUT = RESULTS / "utility_clip.json"
STUDY = RESULTS / "utility.json"


def _key(label: str, seed: int) -> str:
    return json.dumps([label, seed])


def _run(label: str, seed: int, organism: Path) -> list[dict[str, Any]]:
    from utility_train import train_one

    variant, fields = SETTINGS[label]
    recipe = dataclasses.replace(RECIPES["cpu"], ema_sweep=(), **fields)
    spec = RunSpec(phase=6, model="slm", variant=variant, epsilon=EPS_MAIN, seed=seed, lr=LR)
    records = train_one(spec, recipe, organism)
    commit = git_commit(*CODE_PATHS)
    for r in records:
        r.update(setting=label, target_clip_rate=recipe.target_clip_rate)
        r.update(max_grad_norm=recipe.max_grad_norm, commit=commit)
        r["variant"] = f"{r['variant']}@{label}"  # unique keys for the shared append helper
    return records


def run(labels: list[str], seeds: list[int], cache_dir: str | None) -> None:
    organism = build_organism(RECIPES["cpu"].organisms["slm"], cache_root(cache_dir))
    want = load_results(STUDY)["setup"]["models"]["slm"]["weights_sha256"]
    if organism_fingerprint(organism) != want:
        raise SystemExit(f"{organism} is not the study's slm organism (sha256 {want[:12]}...)")
    if not OUT.exists():
        write_atomic(OUT, {"_meta": {"provenance": provenance(*CODE_PATHS)}, "runs": []})
    for seed in seeds:
        for label in labels:
            done = {_key(r["setting"], r["seed"]) for r in load_results(OUT)["runs"]}
            if _key(label, seed) in done:
                continue
            records = _run(label, seed, organism)
            append_runs(OUT, records)
            r = records[0]
            print(
                f"{label} seed {seed}: val {r['val_loss']:.3f} ({r['weights']}), final C "
                f"{r['final_clip_bound']:.3g}, lr x {r['final_lr_multiplier']:.3f}, "
                f"{r['cpu_seconds']:.0f} CPU s",
                flush=True,
            )


def _cell(losses: list[float]) -> str:
    """The study report's mean ± sd (or one seed's value), with the seed count."""
    return f"{fmt(losses)} ({len(losses)} seeds)" if len(losses) > 1 else fmt(losses)


def report() -> str:
    """Each setting's final loss (EMA and raw) beside the study's runs at the same rate."""
    study = [
        r
        for r in load_results(STUDY)["runs"]
        if r["model"] == "slm" and r["lr"] == LR and r["epsilon"] == EPS_MAIN
    ]
    mine = load_results(OUT).get("runs", []) if OUT.exists() else []
    groups = [
        ("study: PrivateQuantile, rho* = 0.2", study, "dp-adam-ac"),
        ("study: FixedClip, C = 1", study, "dp-adam-ac-fixed-clip"),
    ] + [(label, [r for r in mine if r["setting"] == label], None) for label in SETTINGS]
    rows = ["| clip bound | C at the end | val loss (EMA) | val loss (raw) |", "|---|---|---|---|"]
    for name, runs, variant in groups:
        if variant is not None:  # the study's: its own variant names
            ema = [r for r in runs if r["variant"] == variant]
            raw = [r for r in runs if r["variant"] == f"{variant}-no-ema"]
        else:
            ema = [r for r in runs if r["weights"] == "ema"]
            raw = [r for r in runs if r["weights"] == "raw"]
        bounds = [r["final_clip_bound"] for r in ema]
        c_end = f"{statistics.mean(bounds):.3g}" if bounds else "—"
        ema_cell = _cell([r["val_loss"] for r in ema])
        raw_cell = _cell([r["val_loss"] for r in raw])
        rows.append(f"| {name} | {c_end} | {ema_cell} | {raw_cell} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--only", action="append", choices=sorted(SETTINGS), help="repeatable")
    ap.add_argument("--seed", type=int, action="append", help="repeatable (default 0)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--cache-dir", default=None, help="organism cache (as utility.py)")
    ap.add_argument("--report", action="store_true", help="print the table, run nothing")
    args = ap.parse_args(argv)
    if args.report:
        print(report())
        return
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    run(args.only or list(SETTINGS), args.seed or [0], args.cache_dir)


if __name__ == "__main__":
    main()
