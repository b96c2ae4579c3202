"""Training speed users feel: steps/s of ``lit-dp fit``, private against ``private: false``.

Each run is the real CLI (``python -m lit_dp fit --config ...``) in a subprocess, with the same
config, seed and Poisson batches (``data.sampling_seed`` fixed); the only difference is
``--model.private``. A callback passed on the command line
(``--trainer.callbacks+=benchmarks.step_time.fit_speed.StepTimer``) records the wall time of every
optimizer step; steps/s is taken over the steps after ``--warmup`` (the first steps pay for lazy
initialization). Validation, export and checkpoints are switched off so that only training is
timed. Private and non-private runs alternate (p, n, p, n, ...), so that load drift on a shared
machine hits both alike; the ratio is the median private step time over the median non-private
one.

    python -m benchmarks.step_time.fit_speed                        # configs/tiny.yaml
    python -m benchmarks.step_time.fit_speed --config configs/quickstart.yaml --steps 10 --repeats 1
    python -m benchmarks.step_time.fit_speed --json benchmarks/results/fit_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L

from benchmarks.common import ROOT, provenance


class StepTimer(L.Callback):
    """Writes the wall-clock seconds of every training step to ``out`` (JSON) at the end of fit."""

    def __init__(self, out: str) -> None:
        self.out, self.seconds, self._start = out, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.perf_counter() - self._start)

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            Path(self.out).write_text(json.dumps({"step_seconds": self.seconds}))


def run_fit(
    config: Path, *, private: bool, steps: int, workdir: Path, extra: list[str]
) -> list[float]:
    """One ``lit-dp fit`` of ``steps`` steps; returns its per-step seconds."""
    out = workdir / f"steps_{'private' if private else 'nonprivate'}_{time.monotonic_ns()}.json"
    args = [
        sys.executable,
        "-m",
        "lit_dp",
        "fit",
        "--config",
        str(config),
        "--trainer.max_steps",
        str(steps),
        "--trainer.limit_val_batches",
        "0",
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--model.eval_before_fit",
        "false",
        "--export.dirpath",
        "null",
        "--model.private",
        str(private).lower(),
        # the same Poisson batches in both runs (a realized batch size differs run to run)
        "--data.init_args.sampling_seed",
        "0",
        "--trainer.callbacks+=benchmarks.step_time.fit_speed.StepTimer",
        f"--trainer.callbacks.out={out}",
        *(
            []
            if private
            else ["--model.noise_multiplier", "0.0", "--privacy.target_epsilon", "null"]
        ),
        *extra,
    ]
    env = {
        **os.environ,
        # this checkout's lit_dp, and benchmarks/ for the callback's class path
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"lit-dp fit failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        )
    return json.loads(out.read_text())["step_seconds"]


def measure(
    config: Path, *, steps: int, warmup: int, repeats: int, extra: list[str]
) -> dict[str, Any]:
    if steps <= warmup:
        raise ValueError(f"--steps={steps} must exceed --warmup={warmup}")
    timed: dict[str, list[float]] = {"private": [], "nonprivate": []}
    with tempfile.TemporaryDirectory(prefix="lit_dp_fit_speed_") as tmp:
        for r in range(repeats):
            for private in (True, False):
                name = "private" if private else "nonprivate"
                seconds = run_fit(
                    config, private=private, steps=steps, workdir=Path(tmp), extra=extra
                )
                timed[name] += seconds[warmup:]
                print(
                    f"  repeat {r + 1}/{repeats} {name:10s}: median step "
                    f"{statistics.median(seconds[warmup:]):.3f} s",
                    flush=True,
                )
    med = {k: statistics.median(v) for k, v in timed.items()}
    return {
        "config": str(config.relative_to(ROOT) if config.is_relative_to(ROOT) else config),
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "extra_args": extra,
        "median_step_s": med,
        "steps_per_s": {k: 1.0 / v for k, v in med.items()},
        "private_over_nonprivate": med["private"] / med["nonprivate"],
        "timed_steps": {k: len(v) for k, v in timed.items()},
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--steps", type=int, default=12, help="steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="first steps of each run left untimed")
    ap.add_argument("--repeats", type=int, default=2, help="private/non-private pairs")
    ap.add_argument("--json", help="append the result to this JSON file (a list)")
    args, extra = ap.parse_known_args(argv)
    result = measure(
        Path(args.config).resolve(),
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
        extra=extra,
    )
    result["_meta"] = provenance()
    s = result["steps_per_s"]
    print(
        f"{result['config']}: private {s['private']:.3f} steps/s, non-private "
        f"{s['nonprivate']:.3f} steps/s, private step = {result['private_over_nonprivate']:.2f}x "
        "the non-private one"
    )
    if args.json:
        path = Path(args.json)
        runs = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps([*runs, result], indent=1))


if __name__ == "__main__":
    main()
