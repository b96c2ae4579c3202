"""Step time and memory of banded-MF noise (DP-BandMF) against independent (DP-SGD) noise.

Each model is built once, with one ragged batch. For independent noise and for
``BandedMF(bands=b)``, b in ``--bands``, the step timed is training's own:
``lit_dp.privacy.privatize(engine="fast", FixedClip(1.0), noise=mechanism)`` and the DPAdamW
step. Before timing, every banded mechanism makes b - 1 noise-only draws, so its b - 1 buffers are
full and every timed step is a steady-state step (the recursion over all b - 1 of them). The
mechanisms are timed round-robin (repeat r of each before repeat r + 1 of any), so load drift on
a shared machine hits them alike. ``noise_s`` times the mechanism's ``add_noise_`` alone on the
same sums, the part of the step that banded MF changes.

Memory: ``buffer_mb`` is the exact size of the mechanism's noise buffers (b - 1 fp32 copies of
the trainable parameters); with ``--memory`` each (model, b) also runs in a fresh subprocess
that reports its peak RSS (VmHWM) after the buffers are full and two steps are taken.

Models: ``smollm2-135m-lora`` (SmolLM2-135M, LoRA rank 8 on the attention and MLP projections,
only the adapters trainable) and ``qwen2-5m`` (the step-time benchmark's 4-layer Qwen2, every
weight trainable).

Usage:
    python -m benchmarks.step_time.bandmf --json benchmarks/results/step_time_bandmf.json --memory
    python -m benchmarks.step_time.bandmf --models qwen2-5m --bands 4,16 --repeats 3
    python -m benchmarks.step_time.bandmf --json benchmarks/results/step_time_bandmf.json \
        --memory-only      # redo the peak-RSS children only, into an existing results file
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

from benchmarks.common import ROOT, provenance
from benchmarks.step_time.methods import build_model, make_batch, training_max_rows
from benchmarks.step_time.processes import _peak_rss_mb

# name -> (compare.py's model, LoRA rank (0 = every weight trainable), batch rows, tokens)
MODELS = {"smollm2-135m-lora": ("smollm2-135m", 8, 4, 64), "qwen2-5m": ("qwen2-5m", 0, 8, 64)}
SIGMA, CLIP, LR = 1.0, 1.0, 1e-4
CODE = ("lit_dp", "benchmarks/step_time", "benchmarks/common")  # what the numbers depend on


def _model(name: str) -> torch.nn.Module:
    base, lora_rank, _, _ = MODELS[name]
    model = build_model(base)
    if lora_rank:
        from lit_dp.models import apply_lora

        model = apply_lora(model, rank=lora_rank, alpha=16.0)
    return model


def _mechanism(bands: int) -> Any:
    from lit_dp.privacy.noise_mechanism import BandedMF, IndependentGaussian

    return IndependentGaussian() if bands == 1 else BandedMF(bands=bands)


def _setup(model: torch.nn.Module, batch: dict[str, torch.Tensor], bands: int) -> dict[str, Any]:
    """One method: its mechanism (buffers filled), optimizer, generator and step closures."""
    from lit_dp.optim import DPAdamW
    from lit_dp.privacy.clipping import FixedClip
    from lit_dp.privacy.mechanism import privatize

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    mech, gen = _mechanism(bands), torch.Generator().manual_seed(bands)
    zeros = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    for _ in range(bands - 1):  # fill the b - 1 buffers: steady state from the first timed step
        mech.add_noise_(zeros, noise_multiplier=SIGMA, max_grad_norm=CLIP, generator=gen)
    opt, clip, rows = DPAdamW(params.values(), lr=LR), FixedClip(CLIP), batch["input_ids"].shape[0]
    max_rows = training_max_rows()

    def step() -> None:
        out = privatize(
            model, batch, clip=clip, noise_multiplier=SIGMA, expected_batch_size=rows,
            generator=gen, engine="fast", max_rows=max_rows, noise=mech,
        )  # fmt: skip
        for n, p in params.items():
            p.grad = out.grads[n].to(p.dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def noise() -> None:
        mech.add_noise_(zeros, noise_multiplier=SIGMA, max_grad_norm=CLIP, generator=gen)

    return {"step": step, "noise": noise, "buffer_bytes": mech.buffer_bytes()}


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_model(name: str, bands: list[int], *, warmup: int, repeats: int) -> list[dict[str, Any]]:
    """Median step and noise seconds of independent noise and of every b, timed round-robin."""
    model = _model(name)
    _, _, rows, seq = MODELS[name]
    batch = make_batch(int(model.config.vocab_size), rows, seq)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    methods = {b: _setup(model, batch, b) for b in [1, *bands]}
    for m in methods.values():
        for _ in range(warmup):
            m["step"]()
    steps: dict[int, list[float]] = {b: [] for b in methods}
    noises: dict[int, list[float]] = {b: [] for b in methods}
    for _ in range(repeats):
        for b, m in methods.items():
            steps[b].append(_timed(m["step"]))
            noises[b].append(_timed(m["noise"]))
    base = statistics.median(steps[1])
    return [
        {
            "model": name,
            "shape": f"{rows}x{seq}",
            "trainable_params": trainable,
            "bands": b,
            "mechanism": "IndependentGaussian" if b == 1 else "BandedMF",
            "step_s": statistics.median(steps[b]),
            "step_over_independent": statistics.median(steps[b]) / base,
            "noise_s": statistics.median(noises[b]),
            "buffer_mb": methods[b]["buffer_bytes"] / 2**20,
            "buffer_over_trainable_fp32": methods[b]["buffer_bytes"] / (4 * trainable),
        }
        for b in methods
    ]


def single(name: str, bands: int) -> dict[str, Any]:
    """Peak RSS of a fresh process: model, full buffers, two steps."""
    model = _model(name)
    _, _, rows, seq = MODELS[name]
    m = _setup(model, make_batch(int(model.config.vocab_size), rows, seq), bands)
    m["step"]()
    m["step"]()
    return {"model": name, "bands": bands, "peak_rss_mb": _peak_rss_mb()}


def _child_rss(name: str, bands: int, threads: int) -> float | None:
    """``single`` in a fresh process (its peak RSS; None if it died)."""
    cmd = [sys.executable, "-m", "benchmarks.step_time.bandmf", "--single", f"{name}:{bands}",
           "--threads", str(threads)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT).stdout
    line = next((x for x in out.splitlines() if x.startswith("ROW ")), None)
    return None if line is None else json.loads(line[4:])["peak_rss_mb"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--bands", default="4,16,64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory", action="store_true", help="peak RSS per (model, b), subprocesses")
    ap.add_argument("--memory-models", help="limit --memory to these models (default: all run)")
    ap.add_argument(
        "--memory-only",
        action="store_true",
        help="only the peak-RSS children; merge them into the rows of the existing --json file",
    )
    ap.add_argument("--json", help="write results to this path")
    ap.add_argument("--single", help=argparse.SUPPRESS)  # MODEL:B, the --memory child
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.single:
        name, b = args.single.split(":")
        print("ROW " + json.dumps(single(name, int(b))))
        return
    bands = [int(b) for b in args.bands.split(",")]
    if args.memory_only:
        with open(args.json) as f:
            results = json.load(f)
        for row in results["rows"]:
            row["peak_rss_mb"] = _child_rss(row["model"], row["bands"], args.threads)
            print(json.dumps(row), flush=True)
        results["meta"]["memory"] = provenance(*CODE)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        return
    rows: list[dict[str, Any]] = []
    for name in args.models.split(","):
        rows += run_model(name, bands, warmup=args.warmup, repeats=args.repeats)
        if args.memory and name in (args.memory_models or args.models).split(","):
            for row in rows:
                if row["model"] == name:
                    row["peak_rss_mb"] = _child_rss(name, row["bands"], args.threads)
        for row in rows:
            if row["model"] == name:
                print(json.dumps(row), flush=True)
    if args.json:
        meta = {**provenance(*CODE), "sigma": SIGMA,
                "clip": CLIP, "warmup": args.warmup, "repeats": args.repeats,
                "threads": args.threads}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
