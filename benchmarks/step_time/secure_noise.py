"""Step-time cost of model.secure_noise: the DP step with the secure generator against the default.

For each model, three steps are timed round-robin in one process after warm-up (compare.py's
``time_methods``): ``nonprivate`` (the reference of the ratios), ``fast`` (training's DP step with
the default torch generator) and ``fast_secure`` (the same step with ``SecureNoiseGenerator``:
ChaCha20 keystream, float64 Box-Muller, a sum of 2 Gaussians per coordinate, one rounding).
The cost of secure mode is the ratio fast_secure / fast. The noise draw alone
(``add_noise_`` on zero sums shaped like the trainable parameters) is timed the same way for
both generators, which isolates the part of the step that secure mode changes.

Models (the noise is drawn once per step for every trainable coordinate):

    smollm2-135m-lora   SmolLM2-135M-Instruct with LoRA r = 16 (the quickstart's adapters)
    qwen2-5m            the tiny Qwen2 decoder of compare.py, every weight trained
    smollm2-135m        SmolLM2-135M, every weight trained: the most noise per step

Usage:
    python -m benchmarks.step_time.secure_noise --json benchmarks/results/secure_noise.json
    python -m benchmarks.step_time.secure_noise --models qwen2-5m --repeats 3     # one piece
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from typing import Any

import torch

from benchmarks.common import provenance
from benchmarks.step_time.methods import CLIP, SIGMA, build_model, time_methods

MODELS = {"smollm2-135m-lora": "16x128", "qwen2-5m": "16x128", "smollm2-135m": "16x128"}
METHODS = ["nonprivate", "fast", "fast_secure"]
LORA_RANK, LORA_ALPHA = 16, 32.0


def build(name: str) -> torch.nn.Module:
    if name == "smollm2-135m-lora":
        from lit_dp.models import apply_lora

        return apply_lora(build_model("smollm2-135m"), rank=LORA_RANK, alpha=LORA_ALPHA)
    return build_model(name)


def time_noise_draws(model: torch.nn.Module, *, warmup: int, repeats: int) -> dict[str, Any]:
    """Median seconds of one add_noise_ over every trainable parameter, per generator."""
    from lit_dp.privacy.noise import add_noise_, make_generator
    from lit_dp.privacy.secure_noise import SecureNoiseGenerator

    sums = {
        n: torch.zeros_like(p, dtype=torch.float32)
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    gens = {"fast": make_generator(0)[0], "fast_secure": SecureNoiseGenerator.create()}

    def draw(gen: Any) -> None:
        add_noise_(sums, noise_multiplier=SIGMA, max_grad_norm=CLIP, generator=gen)

    for _ in range(warmup):
        for gen in gens.values():
            draw(gen)
    times: dict[str, list[float]] = {m: [] for m in gens}
    for _ in range(repeats):
        for m, gen in gens.items():
            t0 = time.perf_counter()
            draw(gen)
            times[m].append(time.perf_counter() - t0)
    fast, secure = statistics.median(times["fast"]), statistics.median(times["fast_secure"])
    return {
        "trainable_params": sum(t.numel() for t in sums.values()),
        "noise_fast_s": fast,
        "noise_secure_s": secure,
        "noise_secure_over_fast": secure / fast,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list from {list(MODELS)}")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per method (median)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write results to this path")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    meta = {
        **provenance("lit_dp", "benchmarks/step_time", "benchmarks/common"),
        "sigma": SIGMA,
        "clip": CLIP,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "lora": {"rank": LORA_RANK, "alpha": LORA_ALPHA},
    }
    results = []
    for name in args.models.split(","):
        b, t = (int(x) for x in MODELS[name].split("x"))
        t0 = time.perf_counter()
        model = build(name)
        rows = time_methods(
            name, b, t, METHODS, warmup=args.warmup, repeats=args.repeats, base=model
        )
        step = {r["method"]: r for r in rows}
        noise = time_noise_draws(model, warmup=args.warmup, repeats=args.repeats)
        fast, secure = step["fast"]["step_s"], step["fast_secure"]["step_s"]
        result = {
            "model": name,
            "batch_size": b,
            "seq_len": t,
            "step_s": {m: step[m]["step_s"] for m in METHODS},
            "notes": {m: step[m]["note"] for m in METHODS if step[m]["note"]},
            "secure_over_fast": secure / fast if fast and secure else None,
            "fast_over_nonprivate": step["fast"]["ratio_vs_nonprivate"],
            "secure_over_nonprivate": step["fast_secure"]["ratio_vs_nonprivate"],
            **noise,
        }
        results.append(result)
        print(json.dumps(result), flush=True)
        print(f"# {name} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        del model
        gc.collect()
        if args.json:  # after every model: a crash keeps what was measured
            meta["load_avg_at_end"] = os.getloadavg()
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
