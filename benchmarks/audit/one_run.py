"""The one-run audit (``audit:``) of real training runs on the utility study's organism.

The shipped recipe (DP-AdamW at the study's tuned 3.16e-3, fixed clip C = 1, EMA decay 0.999)
fine-tunes the study's slm organism (a ~3M-parameter Llama-style decoder pretrained on public
``emails``) on the private synthetic ``records`` data exactly as utility study 1
(``benchmarks.utility.study1``) does (N = 4000, expected batch 64, 300 steps, library default
delta and accountant), with m = 1000 random-token audit canaries of 32 tokens added by
``lit_dp.callbacks.audit.AuditCanaries``: each joins the training set with probability 1/2 (so N
is about 4500), and the bound is the one-run epsilon lower bound at 95% confidence. Targets:
epsilon 1, 4, 8 and non-private, seeds 0-2.

    python -m benchmarks.audit.one_run --threads 1     # run (or continue) every missing run
    python -m benchmarks.audit.one_run --max-runs 1    # one run
    python -m benchmarks.audit.one_run --report        # the table for benchmarks/README.md
    python -m benchmarks.audit.one_run --quick --out /tmp/a.json   # smoke test: tiny model, ~30 s

Results: ``results/audit_run.json``; each finished run is appended atomically and a run already
there (same epsilon and seed) is skipped. The canaries' tokens and bits come from OS entropy, so
a rerun draws new ones (the bound's confidence is over that draw).
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.common import CODE_PATHS, RESULTS, build_trainer, provenance
from benchmarks.common.results import load_results, write_atomic

OUT = RESULTS / "audit_run.json"
ORGANISM = RESULTS / "organisms" / "slm-a4c8a8ed5d2c"
ORGANISM_SHA256 = "a2a1e0f213c66c76941aaf2162265cc555f650078a722d1ee47463cccc8ee6d8"
EPSILONS: tuple[float | None, ...] = (None, 8.0, 4.0, 1.0)  # None = non-private
SEEDS = (0, 1, 2)
RECIPE = {
    "num_train": 4000,
    "num_val": 256,
    "data_seed": 0,
    "expected_batch_size": 64.0,
    "steps": 300,
    "max_length": 128,
    "eval_batch_size": 64,
    "max_physical_batch_size": 128,
    "max_grad_norm": 1.0,
    "lr": 3.16e-3,
    "num_canaries": 1000,
    "canary_length": 32,
    "confidence": 0.95,
}
QUICK = {**RECIPE, "num_train": 96, "num_val": 16, "steps": 6, "expected_batch_size": 16.0}
QUICK.update(num_canaries=64, canary_length=16)


def _auroc(scores: list[float], bits: list[bool]) -> float:
    """P[score of an included canary > score of an excluded one] (ties count 1/2)."""
    ins = [s for s, b in zip(scores, bits, strict=True) if b]
    outs = [s for s, b in zip(scores, bits, strict=True) if not b]
    if not ins or not outs:
        return math.nan
    wins = sum((a > b) + 0.5 * (a == b) for a in ins for b in outs)
    return wins / (len(ins) * len(outs))


def train_one(epsilon: float | None, seed: int, recipe: dict[str, Any], organism: str) -> dict:
    """One audited run; returns its record (the bound, the accounted epsilon, the losses).

    Lightning's info lines and warnings are silenced for the run only: the process (a test
    calling ``main``) gets its logging level and warning filters back.
    """
    log = logging.getLogger("lightning.pytorch")
    level = log.level
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        log.setLevel(logging.ERROR)
        try:
            return _train_one(epsilon, seed, recipe, organism)
        finally:
            log.setLevel(level)


def _train_one(epsilon: float | None, seed: int, recipe: dict[str, Any], organism: str) -> dict:
    import lightning as L
    import torch

    from lit_dp import DPAdamW, DPCausalLM, EMAWeights, PrivacyAccounting, SyntheticDataModule
    from lit_dp.callbacks.audit import AuditCanaries
    from lit_dp.data import ConstantBatchSize
    from lit_dp.privacy.clipping import FixedClip

    L.seed_everything(seed, verbose=False)
    private = epsilon is not None
    dm = SyntheticDataModule(
        tokenizer=organism,
        dataset="records",
        num_train=recipe["num_train"],
        num_val=recipe["num_val"],
        num_test=0,
        data_seed=recipe["data_seed"],
        batch_schedule=ConstantBatchSize(recipe["expected_batch_size"]),
        sampling_seed=seed,
        max_length=recipe["max_length"],
        eval_batch_size=recipe["eval_batch_size"],
    )
    module = DPCausalLM(
        model=organism,
        private=private,
        noise_multiplier="auto" if private else 0.0,
        clipping=FixedClip(recipe["max_grad_norm"]),
        optimizer=partial(DPAdamW, lr=recipe["lr"]),
        noise_seed=seed,
        max_physical_batch_size=recipe["max_physical_batch_size"],
        eval_before_fit=True,
    )
    audit = AuditCanaries(
        num_canaries=recipe["num_canaries"],
        canary_length=recipe["canary_length"],
        confidence=recipe["confidence"],
    )
    accounting = PrivacyAccounting(target_epsilon=epsilon)  # delta: the library default
    with tempfile.TemporaryDirectory(prefix="lit_dp_audit_") as workdir:
        trainer = build_trainer(
            max_steps=recipe["steps"],
            callbacks=[audit, accounting, EMAWeights()],  # audit first: it adds to N
            val_every=recipe["steps"],
            workdir=workdir,
        )
        start, cpu_start = time.time(), time.process_time()
        trainer.fit(module, datamodule=dm)
        seconds, cpu_seconds = time.time() - start, time.process_time() - cpu_start
    section = audit.privacy_report_section()["audit"]
    side = section["operator_side"]
    scores, bits = side["scores"], side["included"]
    return {
        "epsilon_target": epsilon,
        "seed": seed,
        "private": private,
        "epsilon_spent": accounting.epsilon() if private else None,
        "delta": section["delta"],
        "noise_multiplier": float(module.noise_multiplier) if private else 0.0,
        "steps": int(trainer.global_step),
        "num_units": int(dm.num_units),
        "num_canaries": recipe["num_canaries"],
        "num_included": side["num_included"],
        "confidence": recipe["confidence"],
        "epsilon_lower_bound": section["epsilon_lower_bound"],
        "guesses": side["guesses"],
        "auroc": _auroc(scores, bits),
        "mean_score_in": statistics.fmean(s for s, b in zip(scores, bits, strict=True) if b),
        "mean_score_out": statistics.fmean(s for s, b in zip(scores, bits, strict=True) if not b),
        "val_loss_ema": module.val_history[-1]["loss_ema"],
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "torch_threads": torch.get_num_threads(),
    }


def _key(epsilon: float | None, seed: int) -> str:
    return f"{'nonprivate' if epsilon is None else f'{epsilon:g}'}/{seed}"


def run(out: Path, recipe: dict[str, Any], organism: str, max_runs: int | None) -> None:
    data = load_results(out) or {"setup": {**recipe, "organism": organism}, "runs": []}
    if data["setup"] != {**recipe, "organism": organism}:
        raise SystemExit(f"{out} holds runs of another setup; pass --out for a new file")
    done = {_key(r["epsilon_target"], r["seed"]) for r in data["runs"]}
    todo = [(e, s) for s in SEEDS for e in EPSILONS if _key(e, s) not in done]
    source = provenance(*CODE_PATHS)  # the code this process loaded, not a later checkout
    for count, (epsilon, seed) in enumerate(todo):
        if max_runs is not None and count >= max_runs:
            break
        rec = train_one(epsilon, seed, recipe, organism)
        rec["provenance"] = source
        data = load_results(out) or data
        data["runs"].append(rec)
        write_atomic(out, data)
        spent = rec["epsilon_spent"]
        print(
            f"{_key(epsilon, seed)}: bound {rec['epsilon_lower_bound']:.3f} at epsilon "
            f"{'inf' if spent is None else f'{spent:.3f}'} (AUROC {rec['auroc']:.3f}, "
            f"{rec['guesses']['num_correct']}/{rec['guesses']['num_guesses']} right), val "
            f"{rec['val_loss_ema']:.3f}, {rec['cpu_seconds']:.0f} CPU s",
            flush=True,
        )


def report(out: Path) -> str:
    """The markdown table for benchmarks/README.md: per target, the seeds' bounds."""
    runs = load_results(out).get("runs", [])
    lines = [
        "| accounted epsilon (delta) | seeds | lower bound per seed | right / guessed per seed "
        "| mean AUROC | val loss |",
        "|---|---|---|---|---|---|",
    ]
    for epsilon in EPSILONS:
        rs = sorted((r for r in runs if r["epsilon_target"] == epsilon), key=lambda r: r["seed"])
        if not rs:
            continue
        spent = (
            "non-private (inf)"
            if epsilon is None
            else f"{statistics.fmean(r['epsilon_spent'] for r in rs):.2f} ({rs[0]['delta']:.0e})"
        )
        bounds = ", ".join(f"{r['epsilon_lower_bound']:.2f}" for r in rs)
        guesses = ", ".join(
            f"{r['guesses']['num_correct']}/{r['guesses']['num_guesses']}" for r in rs
        )
        auroc = statistics.fmean(r["auroc"] for r in rs)
        val = statistics.fmean(r["val_loss_ema"] for r in rs)
        lines.append(f"| {spent} | {len(rs)} | {bounds} | {guesses} | {auroc:.3f} | {val:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many runs")
    p.add_argument("--out", type=Path, default=OUT, help="results file")
    p.add_argument("--report", action="store_true", help="print the README table and exit")
    p.add_argument("--quick", action="store_true", help="smoke test on a tiny random model")
    args = p.parse_args(argv)
    if args.report:
        print(report(args.out))
        return
    import torch

    torch.set_num_threads(args.threads)
    if args.quick:
        if args.out == OUT:
            raise SystemExit("--quick writes a smoke-test file: give --out")
        run(args.out, QUICK, "tiny-llama", args.max_runs)
        return
    from benchmarks.utility.organisms import organism_fingerprint

    if organism_fingerprint(ORGANISM) != ORGANISM_SHA256:
        raise SystemExit(f"{ORGANISM} is not the utility study's slm organism")
    run(args.out, RECIPE, str(ORGANISM), args.max_runs)


if __name__ == "__main__":
    main()
