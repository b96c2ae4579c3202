"""The clip bound, a supplement to the utility study (``study1.py``): where should C sit?

The study's ablation runs DP-Adam-AC with the private-quantile clip at the paper's target clip
rate rho* = 0.2 (C_t tracks the 80th percentile of the unit gradient norms) and with a fixed
C = 1. This script asks what lies between and beyond, on the same slm organism, private data,
run length, seeds and learning rate (DP-Adam-AC's tuned 3.16e-3), one setting at a time:

  pq-0.2      PrivateQuantile, rho* = 0.2: the study's ``dp-adam-ac`` again, a control that must
              reproduce its seed's loss (it shows the two files are comparable)
  pq-0.5      PrivateQuantile, rho* = 0.5 (the median norm)
  pq-0.9      PrivateQuantile, rho* = 0.9 (C near the 10th percentile: most units clipped)
  fixed-0.1   FixedClip, C = 0.1 (every unit clipped, like the study's C = 1, at a tenth of it)
  fixed-1     FixedClip, C = 1: the study's ``dp-adam-ac-fixed-clip``, the recipe lit_dp ships.
              On slm the study already has it; ``--model bitnet`` runs it on the BitNet twin,
              whose study runs cover DP-Adam-AC only with the private-quantile bound

EMA and the clip-driven lr are on (the clip-driven lr steers to the same rho*; with a fixed C
there is no privatized clip rate and it stays at 1). The rate is the study's tuned DP-Adam-AC
rate of that model (seed 0, epsilon 8). Records go to ``results/utility_clip.json``, one per
run and one for its raw weights (EMA is post-processing), appended as each finishes; a setting
already there is skipped. The organisms must be the study's (same weights sha256).

    python -m benchmarks.utility.clip --threads 1                 # every slm setting on seed 0
    python -m benchmarks.utility.clip --only pq-0.9 --seed 1 --seed 2
    python -m benchmarks.utility.clip --model bitnet --only fixed-1 --seed 0 --seed 1 --seed 2
    python -m benchmarks.utility.clip --report                    # the tables, with the study's
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

from benchmarks.common import CODE_PATHS, RESULTS, git_commit, provenance
from benchmarks.common.results import load_results, write_atomic
from benchmarks.utility.organisms import build_organism, cache_root, organism_fingerprint
from benchmarks.utility.plan import EPS_MAIN, RunSpec
from benchmarks.utility.report import (
    SHIPPED,
    fmt,
    paired,
    plot_epsilon,
    select,
    tuned_rates,
    val_losses,
)
from benchmarks.utility.results import append_runs
from benchmarks.utility.study1 import RECIPES

# label -> (study variant it runs as, Recipe fields it changes)
SETTINGS: dict[str, tuple[str, dict[str, float]]] = {
    "pq-0.2": ("dp-adam-ac", {"target_clip_rate": 0.2}),
    "pq-0.5": ("dp-adam-ac", {"target_clip_rate": 0.5}),
    "pq-0.9": ("dp-adam-ac", {"target_clip_rate": 0.9}),
    "fixed-0.1": ("dp-adam-ac-fixed-clip", {"max_grad_norm": 0.1}),
    "fixed-1": ("dp-adam-ac-fixed-clip", {"max_grad_norm": 1.0}),
}
MODELS = ("slm", "bitnet")
OUT = RESULTS / "utility_clip.json"
PLOT = RESULTS / "utility_clip_epsilon.png"
STUDY = RESULTS / "utility.json"


def study_rate(model: str, runs: list[dict[str, Any]]) -> float:
    """DP-Adam-AC's rate as the study tuned it for ``model`` (seed 0, epsilon 8)."""
    lr = tuned_rates(runs).get((model, "dp-adam-ac"))
    if lr is None:
        raise SystemExit(f"the study has no tuned dp-adam-ac rate for {model} yet: run its grid")
    return lr


def _key(model: str, label: str, epsilon: float, seed: int) -> str:
    return json.dumps([model, label, float(epsilon), seed])


def _run(
    model: str, label: str, epsilon: float, seed: int, lr: float, organism: Path
) -> list[dict[str, Any]]:
    from benchmarks.utility.train import train_one

    variant, fields = SETTINGS[label]
    recipe = dataclasses.replace(RECIPES["cpu"], ema_sweep=(), **fields)
    spec = RunSpec(phase=6, model=model, variant=variant, epsilon=epsilon, seed=seed, lr=lr)
    records = train_one(spec, recipe, organism)
    if not any(r["weights"] == "raw" for r in records):  # no derived twin: record the raw weights
        ema, curve = records[0], records[0]["val_loss_raw_curve"]
        records.append(
            {
                **ema,
                "variant": f"{ema['variant']}-raw",
                "weights": "raw",
                "val_loss": curve[-1]["loss"],
                "val_loss_curve": curve,
                "derived_from": f"{ema['variant']} same run (its raw weights)",
                "seconds": 0.0,
                "cpu_seconds": 0.0,
            }
        )
    commit = git_commit(*CODE_PATHS)
    for r in records:
        r.update(setting=label, target_clip_rate=recipe.target_clip_rate)
        r.update(max_grad_norm=recipe.max_grad_norm, commit=commit)
        r["variant"] = f"{r['variant']}@{label}"  # unique keys for the shared append helper
    return records


def run(
    model: str, labels: list[str], epsilons: list[float], seeds: list[int], cache_dir: str | None
) -> None:
    study = load_results(STUDY)
    lr = study_rate(model, study["runs"])
    organism = build_organism(RECIPES["cpu"].organisms[model], cache_root(cache_dir))
    want = study["setup"]["models"][model]["weights_sha256"]
    if organism_fingerprint(organism) != want:
        raise SystemExit(f"{organism} is not the study's {model} organism (sha256 {want[:12]}...)")
    if not OUT.exists():
        write_atomic(OUT, {"_meta": {"provenance": provenance(*CODE_PATHS)}, "runs": []})
    for epsilon in epsilons:
        for seed in seeds:
            for label in labels:
                done = {
                    _key(r["model"], r["setting"], r["epsilon"], r["seed"])
                    for r in load_results(OUT)["runs"]
                }
                if _key(model, label, epsilon, seed) in done:
                    continue
                records = _run(model, label, epsilon, seed, lr, organism)
                append_runs(OUT, records)
                r = records[0]
                print(
                    f"{model} {label} epsilon {epsilon:g} seed {seed}: val {r['val_loss']:.3f} "
                    f"({r['weights']}), final C {r['final_clip_bound']:.3g}, lr x "
                    f"{r['final_lr_multiplier']:.3f}, {r['cpu_seconds']:.0f} CPU s",
                    flush=True,
                )


def _cell(losses: list[float]) -> str:
    """The study report's mean ± sd (or one seed's value), with the seed count."""
    return f"{fmt(losses)} ({len(losses)} seeds)" if len(losses) > 1 else fmt(losses)


def report() -> str:
    """The clip settings per model at epsilon 8, then the shipped recipe across epsilon.

    Also draws the study's epsilon curve with the shipped recipe's added (``PLOT``).
    """
    study = load_results(STUDY)
    everything = study["runs"]
    mine = load_results(OUT).get("runs", []) if OUT.exists() else []
    shipped, raw = _shipped_runs(everything, mine)
    slm = {eps: val_losses(sel) for (model, eps), sel in shipped.items() if model == "slm"}
    if len(slm) > 1:
        label = f"shipped: FixedClip C = 1 + EMA (lr {study_rate('slm', everything):g})"
        plot_epsilon(study, PLOT, extra=((label, "tab:green", slm),))
    tables = [_clip_table(model, everything, mine) for model in MODELS]
    tables.append(_shipped_table(everything, shipped, raw))
    return "\n\n".join(t for t in tables if t)


def _clip_table(model: str, everything: list[dict[str, Any]], mine: list[dict[str, Any]]) -> str:
    """One model's clip settings at epsilon 8, or "" where the supplement has none."""
    mine = [r for r in mine if r["model"] == model and r["epsilon"] == EPS_MAIN]
    if not mine:
        return ""
    lr = study_rate(model, everything)
    study = [
        r for r in everything if r["model"] == model and r["lr"] == lr and r["epsilon"] == EPS_MAIN
    ]
    groups = [
        ("study: PrivateQuantile, rho* = 0.2", study, "dp-adam-ac"),
        ("study: FixedClip, C = 1", study, "dp-adam-ac-fixed-clip"),
    ] + [(label, [r for r in mine if r["setting"] == label], None) for label in SETTINGS]
    rows = [
        f"{model}, DP-Adam-AC's rate {lr:g}, epsilon {EPS_MAIN:g}:",
        "",
        "| clip bound | C at the end | val loss (EMA) | val loss (raw) |",
        "|---|---|---|---|",
    ]
    for name, runs, variant in groups:
        if variant is not None:  # the study's: its own variant names
            ema = [r for r in runs if r["variant"] == variant]
            raw = [r for r in runs if r["variant"] == f"{variant}-no-ema"]
        else:
            ema = [r for r in runs if r["weights"] == "ema"]
            raw = [r for r in runs if r["weights"] == "raw"]
        if not ema:
            continue  # no run of this setting for this model
        bounds = [r["final_clip_bound"] for r in ema]
        c_end = f"{statistics.mean(bounds):.3g}" if bounds else "—"
        ema_cell = _cell([r["val_loss"] for r in ema])
        raw_cell = _cell([r["val_loss"] for r in raw])
        rows.append(f"| {name} | {c_end} | {ema_cell} | {raw_cell} |")
    return "\n".join(rows)


Seeds = dict[int, dict[str, Any]]  # seed -> run record


def _shipped_runs(
    everything: list[dict[str, Any]], mine: list[dict[str, Any]]
) -> tuple[dict[tuple[str, float], Seeds], dict[tuple[str, float], Seeds]]:
    """The shipped recipe's runs (EMA weights) and their raw weights, by (model, epsilon).

    The study's ``dp-adam-ac-fixed-clip`` runs at DP-Adam-AC's tuned rate, then this
    supplement's ``fixed-1`` runs; the study's keep only the EMA weights' loss.
    """
    tuned = tuned_rates(everything)
    shipped: dict[tuple[str, float], Seeds] = {}
    raw: dict[tuple[str, float], Seeds] = {}
    for r in everything:
        if r["variant"] == SHIPPED and r["lr"] == tuned.get((r["model"], "dp-adam-ac")):
            shipped.setdefault((r["model"], r["epsilon"]), {})[r["seed"]] = r
    for r in mine:
        if r["setting"] == "fixed-1":
            into = shipped if r["weights"] == "ema" else raw
            into.setdefault((r["model"], r["epsilon"]), {})[r["seed"]] = r
    return shipped, raw


def _shipped_table(
    everything: list[dict[str, Any]],
    shipped: dict[tuple[str, float], Seeds],
    raw: dict[tuple[str, float], Seeds],
) -> str:
    """The shipped recipe (``_shipped_runs``) against the study's private methods.

    One row per (model, epsilon) where the recipe ran, or "" where only the study's own
    epsilon-8 slm runs exist; Δ is paired over seeds (same sampling and noise seeds) with its
    95% t-interval.
    """
    if not any(model != "slm" or eps != EPS_MAIN for model, eps in shipped):
        return ""
    tuned = tuned_rates(everything)
    rows = [
        "The shipped recipe (FixedClip C = 1, EMA) against the study's private methods:",
        "",
        "| model | epsilon | shipped | its raw weights | dp-adam-ac (rho* 0.2) | dp-sgd "
        "| Δ shipped - dp-adam-ac | Δ shipped - dp-sgd | Δ raw weights - dp-sgd |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (model, eps), ours in sorted(shipped.items()):
        ac, sgd = (select(everything, tuned, model, v, eps) for v in ("dp-adam-ac", "dp-sgd"))
        plain = raw.get((model, eps), {})
        rows.append(
            f"| {model} | {eps:g} | {fmt(val_losses(ours))} | {fmt(val_losses(plain))} | "
            f"{fmt(val_losses(ac))} | {fmt(val_losses(sgd))} | {paired(ours, ac)} | "
            f"{paired(ours, sgd)} | {paired(plain, sgd)} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", choices=MODELS, default="slm", help="which study organism")
    ap.add_argument("--only", action="append", choices=sorted(SETTINGS), help="repeatable")
    ap.add_argument("--seed", type=int, action="append", help="repeatable (default 0)")
    ap.add_argument(
        "--epsilon", type=float, action="append", help=f"repeatable (default {EPS_MAIN:g})"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--cache-dir", default=None, help="organism cache (as study1.py)")
    ap.add_argument("--report", action="store_true", help="print the table, run nothing")
    args = ap.parse_args(argv)
    if args.report:
        print(report())
        return
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    labels = args.only or [label for label in SETTINGS if label != "fixed-1"]
    epsilons = args.epsilon or [EPS_MAIN]
    if args.model == "slm" and "fixed-1" in labels and EPS_MAIN in epsilons:
        ap.error(
            f"fixed-1 on slm at epsilon {EPS_MAIN:g} repeats the study's "
            "dp-adam-ac-fixed-clip runs: pass --epsilon 1 --epsilon 2 --epsilon 4"
        )
    if any(not 0 < e < float("inf") for e in epsilons):
        ap.error(f"--epsilon must be a positive finite number, got {epsilons}")
    run(args.model, labels, epsilons, args.seed or [0], args.cache_dir)


if __name__ == "__main__":
    main()
