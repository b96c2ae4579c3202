"""Step-time benchmark: one full DP training step of lit_dp against non-private and Opacus.

Each method runs the real optimizer step on the same model and batch:

    nonprivate    forward, mean per-row loss, backward, torch.optim.AdamW step
    fast          lit_dp.privacy.privatize(engine="fast") + DPAdamW step: training's own step
                  (micro-batches of DPCausalLM's default max_physical_batch_size, clipped sums,
                  noise, division by the expected batch size, private-quantile clip update)
    vmap          the same with engine="vmap"
    fast_secure   fast with model.secure_noise's generator (not in the default list;
                  benchmarks.step_time.secure_noise compares it with fast)
    opacus_hooks  opacus GradSampleModule (per-sample grads by hooks) + DPOptimizer(AdamW)
    opacus_ghost  opacus GradSampleModuleFastGradientClipping(use_ghost_clipping=True)
                  + DPOptimizerFastGradientClipping(AdamW), two backward passes

All methods of one (model, shape) are built first, warmed up, then timed round-robin (repeat r of
every method before repeat r + 1 of any), so load drift on a shared machine hits them alike and
the ratios come from one run. Every method uses the same loss (lit_dp's fp32 per-row mean token
cross-entropy), noise multiplier 1.0 and clip bound 1.0. A method that cannot run is reported
with the exception in its ``note``.

Peak memory (``--memory``): each (model, shape, method) runs in a fresh subprocess
(``--single METHOD``) that builds the model, does warm-up + repeats and reports its peak RSS
(VmHWM; see ``_peak_rss_mb`` for why not ru_maxrss). It is the whole process: Python, torch, the
model and optimizer state are included, identically for every method.

Usage:
    python -m benchmarks.step_time.compare                # quick default (< 5 min on 2 cores)
    python -m benchmarks.step_time.compare --full --json benchmarks/results/step_time.json
                                    # every model x shape, peak memory, scaling (~25 min on 2 cores)
    python -m benchmarks.step_time.compare --models qwen2-5m --shapes 8x512 --memory  # one piece
    python -m benchmarks.step_time.compare --scaling --models none  # fast vs non-private sweep
    python -m benchmarks.step_time.compare --profile      # top ops of the fast step
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch

from benchmarks.common import provenance
from benchmarks.step_time.methods import CLIP, METHODS, MODELS, SIGMA, time_methods
from benchmarks.step_time.processes import measure_memory, single, time_shape
from benchmarks.step_time.report import print_table, profile_fast, scaling

DEFAULT_RUNS = "qwen2-5m:32x64,bitnet-5m:16x128"
FULL_SHAPES = "32x64,16x128,8x512"


def run_meta(args: argparse.Namespace) -> dict[str, Any]:
    """Where and from what the numbers came: commit, machine, versions, settings."""
    versions = {"torch": torch.__version__}
    try:
        import opacus

        versions["opacus"] = opacus.__version__
    except ImportError:
        versions["opacus"] = None
    return {
        **provenance("lit_dp", "benchmarks/step_time", "benchmarks/common"),
        "versions": versions,
        "sigma": SIGMA,
        "clip": CLIP,
        "warmup": args.warmup,
        "repeats": args.repeats,
    }


def parse_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for s in text.split(","):
        b, t = s.lower().split("x")
        out.append((int(b), int(t)))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--models",
        help=f"comma list from {MODELS} ('none' to skip); with --shapes, "
        f"runs every model x shape. Default: {DEFAULT_RUNS}",
    )
    ap.add_argument("--shapes", help="comma list of BxT, e.g. 32x64,16x128,8x512")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--memory", action="store_true", help="peak RSS per method in fresh subprocesses"
    )
    ap.add_argument("--memory-models", help="limit --memory to these models (default: all run)")
    ap.add_argument("--json", help="write results to this path")
    ap.add_argument("--scaling", action="store_true", help="fast vs non-private sweep on qwen2-5m")
    ap.add_argument("--scaling-batches", default="4,8,16,32,64")
    ap.add_argument("--scaling-seqs", default="64,128,256,512,1024")
    ap.add_argument(
        "--profile", action="store_true", help="torch.profiler top ops of the fast step"
    )
    ap.add_argument("--profile-shape", default="qwen2-5m:16x128")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--full",
        action="store_true",
        help="every model x shape of the issue, with --memory and --scaling",
    )
    ap.add_argument("--single", help=argparse.SUPPRESS)
    ap.add_argument("--shape-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.full:
        args.models, args.shapes = args.models or ",".join(MODELS), args.shapes or FULL_SHAPES
        args.memory = args.scaling = True

    if args.models and args.models != "none":
        models = args.models.split(",")
        shapes = parse_shapes(args.shapes or "32x64,16x128")
        runs = [(m, b, t) for m in models for b, t in shapes]
    elif args.models == "none":
        runs = []
    else:
        runs = []
        for item in DEFAULT_RUNS.split(","):
            m, s = item.split(":")
            runs += [(m, *parse_shapes(s)[0])]
    if args.single:
        m, b, t = runs[0]
        single(m, b, t, args.single, args.warmup, args.repeats)
        return
    if args.shape_child:
        m, b, t = runs[0]
        rows = time_methods(
            m, b, t, args.methods.split(","), warmup=args.warmup, repeats=args.repeats
        )
        print("ROWS " + json.dumps(rows), flush=True)
        return

    methods = args.methods.split(",")
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, warm-up {args.warmup}, "
        f"repeats {args.repeats} (median), sigma {SIGMA}, C {CLIP}\n",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    meta = run_meta(args)  # before the runs: the code that produces the numbers
    scale_rows: list[dict] = []

    def dump() -> None:  # after every shape: a crash keeps what was measured
        if not args.json:
            return
        keep = (
            "model",
            "seq_len",
            "batch_size",
            "method",
            "step_s",
            "peak_mem_mb",
            "ratio_vs_nonprivate",
            "note",
            "tokens_per_s",
            "mem_ratio_vs_nonprivate",
            "min_s",
            "min_ratio_vs_nonprivate",
        )
        out = {"meta": meta, "results": [{k: r[k] for k in keep} for r in rows]}
        if scale_rows:
            out["scaling"] = [{k: r[k] for k in keep} for r in scale_rows]
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)

    for m, b, t in runs:
        t0 = time.perf_counter()
        # a 135M model on a CPU: fewer repeats (each step takes seconds)
        warmup, repeats = (
            (1, min(args.repeats, 3)) if m == "smollm2-135m" else (args.warmup, args.repeats)
        )
        part = time_shape(m, b, t, methods, warmup=warmup, repeats=repeats, threads=args.threads)
        if args.memory and (not args.memory_models or m in args.memory_models.split(",")):
            measure_memory(part, warmup=1, repeats=2)  # the peak comes in the first steps
        rows += part
        print(
            f"# {m} {b}x{t} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True
        )
        print_table(part, args.memory)
        dump()
    if rows:
        print("### All results\n")
        print_table(rows, args.memory)
    if args.scaling:
        scale_rows = scaling(
            args.warmup,
            args.repeats,
            [int(x) for x in args.scaling_batches.split(",")],
            [int(x) for x in args.scaling_seqs.split(",")],
            fixed_t=64,
            fixed_b=8,
        )
    if args.profile:
        m, s = args.profile_shape.split(":")
        profile_fast(m, *parse_shapes(s)[0], top=15)
    meta["load_avg_at_end"] = os.getloadavg()
    dump()


if __name__ == "__main__":
    main()
