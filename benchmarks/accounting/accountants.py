"""Accountant benchmark: the cost of PLD accounting per training step, on long ledgers and
schedules that change every step, against RDP; and what PLD saves in noise.

What is timed (each the median of a few repeats, after a warm-up):

    per training step    what PrivacyAccounting does each step: peek_epsilon (budget stop),
                         step (the ledger), get_epsilon (the logged curve), at ledger lengths
                         1,000 and 10,000; constant q, and inside a linear ramp of q
    get_epsilon          on a 10,000-step ledger with a linear rate schedule: reading the kept
                         composition, and composing the ledger from scratch (load_state_dict:
                         what a resume costs)
    calibration          calibrate_noise_multiplier for 10,000 constant and ramped steps

and, without timing: epsilon under PLD and RDP at the same (sigma, q, steps, delta), and the
quickstart's calibrated sigma under each.

Usage:
    python -m benchmarks.accounting.accountants --json benchmarks/results/accounting.json  (~10 min)
    python -m benchmarks.accounting.accountants --quick                                    (~1 min)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from benchmarks.common import provenance
from lit_dp.privacy.calibration import calibrate_noise_multiplier, epsilon_for_schedule
from lit_dp.privacy.pld_accountant import PLDAccountant
from lit_dp.privacy.rdp_accountant import RDPAccountant

DELTA = 1e-5
SIGMA = 1.0
Q = 0.01


def ramp(steps: int, start: float = 0.005, end: float = 0.02) -> list[float]:
    """A linear ramp of q over all ``steps`` (a new rate every step)."""
    return [start + (end - start) * t / steps for t in range(steps)]


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up (caches, first-call imports)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def loaded(kind: str, rates: list[float], sigma: float = SIGMA) -> PLDAccountant | RDPAccountant:
    acc: PLDAccountant | RDPAccountant = PLDAccountant() if kind == "pld" else RDPAccountant()
    state = acc.state_dict()
    state["history"] = [[sigma, q, 1] for q in rates]
    acc.load_state_dict(state)
    return acc


def per_step(kind: str, history: list[float], next_rates: list[float]) -> float:
    """Mean seconds of peek + step + get_epsilon over ``next_rates``, after ``history``."""
    acc = loaded(kind, history)
    start = time.perf_counter()
    for q in next_rates:
        acc.peek_epsilon(delta=DELTA, noise_multiplier=SIGMA, sample_rate=q)
        acc.step(noise_multiplier=SIGMA, sample_rate=q)
        acc.get_epsilon(DELTA)
    return (time.perf_counter() - start) / len(next_rates)


def run(quick: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"provenance": provenance(), "delta": DELTA}
    lengths = (1_000,) if quick else (1_000, 10_000)
    window = 20 if quick else 50
    rows = []
    for n in lengths:
        for kind in ("pld", "rdp"):
            rows.append(
                {
                    "accountant": kind,
                    "ledger_steps": n,
                    "schedule": "constant",
                    "seconds_per_step": per_step(kind, [Q] * n, [Q] * window),
                }
            )
            # Inside a ramp over 4x (q 0.005 -> 0.02 over 2n steps): a new rate every step.
            full = ramp(2 * n)
            rows.append(
                {
                    "accountant": kind,
                    "ledger_steps": n,
                    "schedule": "linear",
                    "seconds_per_step": per_step(kind, full[:n], full[n : n + 10 * window]),
                }
            )
            print(rows[-2], rows[-1], flush=True)
    out["per_training_step"] = rows

    n = 1_000 if quick else 10_000
    rates = ramp(n)
    ledger = {}
    for kind in ("pld", "rdp"):
        start = time.perf_counter()
        acc = loaded(kind, rates)
        compose = time.perf_counter() - start
        deltas = iter(DELTA * (1 + k / 1000) for k in range(10))  # a new delta: never cached
        fresh = median_time(lambda a=acc, d=deltas: a.get_epsilon(next(d)), 3)
        ledger[kind] = {
            "steps": n,
            "compose_ledger_seconds": compose,
            "get_epsilon_seconds": fresh,
            "epsilon": acc.get_epsilon(DELTA),
        }
        print(kind, ledger[kind], flush=True)
    out["linear_ledger"] = ledger

    calib = []
    for label, sample_rate in (("constant", Q), ("linear", rates)):
        for kind in ("pld", "rdp"):
            start = time.perf_counter()
            sigma = calibrate_noise_multiplier(
                target_epsilon=8.0, delta=DELTA, sample_rate=sample_rate, steps=n, accountant=kind
            )
            seconds = time.perf_counter() - start
            calib.append(
                {
                    "accountant": kind,
                    "schedule": label,
                    "steps": n,
                    "sigma": sigma,
                    "seconds": seconds,
                }
            )
            print(calib[-1], flush=True)
    out["calibration"] = calib

    # Epsilon at the same (sigma, q, steps, delta), and the quickstart's sigma for epsilon 8.
    gaps = []
    for sigma, q, steps, delta in (
        (1.0, 0.01, 1000, 1e-5),
        (1.0, 0.01, 10000, 1e-5),
        (0.8, 0.01, 10000, 1e-5),
        (2.0, 0.001, 10000, 1e-6),
        (0.8, 0.001, 10000, 1e-6),
    ):
        eps = {
            kind: epsilon_for_schedule(
                noise_multiplier=sigma, delta=delta, sample_rate=q, steps=steps, accountant=kind
            )
            for kind in ("pld", "rdp")
        }
        gaps.append(
            {
                "sigma": sigma,
                "q": q,
                "steps": steps,
                "delta": delta,
                **eps,
                "pld_below_rdp": 1 - eps["pld"] / eps["rdp"],
            }
        )
        print(gaps[-1], flush=True)
    out["epsilon_pld_vs_rdp"] = gaps
    quickstart = []
    for delta, note in ((1e-5, "min(1e-5, 1/N^1.1) at N=256"), (1 / 256**1.1, "1/N^1.1 at N=256")):
        sig = {
            kind: calibrate_noise_multiplier(
                target_epsilon=8.0, delta=delta, sample_rate=12 / 256, steps=16, accountant=kind
            )
            for kind in ("pld", "rdp")
        }
        quickstart.append(
            {
                "delta": delta,
                "delta_rule": note,
                "target_epsilon": 8.0,
                "q": 12 / 256,
                "steps": 16,
                "sigma_pld": sig["pld"],
                "sigma_rdp": sig["rdp"],
                "pld_below_rdp": 1 - sig["pld"] / sig["rdp"],
            }
        )
        print(quickstart[-1], flush=True)
    out["quickstart_sigma"] = quickstart
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000-step ledgers only")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = run(args.quick)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
