"""Step-time benchmark: one full DP training step of lit_dp against non-private and Opacus.

Each method runs the real optimizer step on the same model and batch:

    nonprivate    forward, mean per-row loss, backward, torch.optim.AdamW step
    fast          lit_dp.privacy.privatize(engine="fast") + DPAdamW step: training's own step
                  (micro-batches of DPCausalLM's default max_physical_batch_size, clipped sums,
                  noise, division by the expected batch size, private-quantile clip update)
    vmap          the same with engine="vmap"
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
    python benchmarks/step_time.py                       # quick default (< 5 min on 2 cores)
    python benchmarks/step_time.py --full --json benchmarks/results/step_time.json
                                    # every model x shape, peak memory, scaling (~25 min on 2 cores)
    python benchmarks/step_time.py --models qwen2-5m --shapes 8x512 --memory   # one piece
    python benchmarks/step_time.py --scaling --models none   # fast vs non-private sweep only
    python benchmarks/step_time.py --profile             # top ops of the fast step
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout
from _meta import provenance  # benchmarks/ is sys.path[0] when run as a script

METHODS = ("nonprivate", "fast", "vmap", "opacus_hooks", "opacus_ghost")
MODELS = ("qwen2-5m", "bitnet-5m", "smollm2-135m")
DEFAULT_RUNS = "qwen2-5m:32x64,bitnet-5m:16x128"
FULL_SHAPES = "32x64,16x128,8x512"
SIGMA = 1.0
CLIP = 1.0
LR = 1e-4

_TINY = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=4096,
    max_position_embeddings=2048,
)


# --- models and batches ---------------------------------------------------------------------
def build_model(name: str) -> torch.nn.Module:
    from lit_dp.models import build_tiny_model, load_model

    if name == "qwen2-5m":
        model = build_tiny_model("qwen2", **_TINY)
    elif name == "bitnet-5m":
        model = build_tiny_model("bitnet", **_TINY)
    elif name == "smollm2-135m":
        model = load_model("smollm2-135m-instruct", dtype="float32")
    else:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    model.config.use_cache = False
    return model.train()


def make_batch(vocab: int, batch_size: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch_size, seq_len), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    # Ragged rows: the last quarter of each row past a random cut is padding.
    for b in range(batch_size):
        cut = int(torch.randint(seq_len * 3 // 4, seq_len + 1, (1,), generator=g))
        mask[b, cut:] = 0
        labels[b, cut:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# --- one training step per method ----------------------------------------------------------
def _loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from lit_dp.privacy.per_sample import per_example_losses

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return per_example_losses(logits, batch["labels"])  # (B,) fp32


def training_max_rows() -> int:
    """Rows per physical micro-batch that training uses by default (DPCausalLM's default)."""
    import inspect

    from lit_dp.module import DPCausalLM

    return int(inspect.signature(DPCausalLM).parameters["max_physical_batch_size"].default)


def make_step(
    method: str, model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> Callable[[], None]:
    """A closure doing one full optimizer step of ``method`` on ``model`` (modified in place)."""
    rows = int(batch["input_ids"].shape[0])
    if method == "nonprivate":
        opt = torch.optim.AdamW(model.parameters(), lr=LR, foreach=False)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            _loss(model, batch).mean().backward()
            opt.step()

        return step
    if method in ("fast", "vmap"):
        # Training's own step: lit_dp.privacy.privatize (micro-batches of the module's default
        # size, clipped sums, noise, division by the expected batch size, the private-quantile
        # clip-bound update) and then the DPAdamW step, as DPCausalLM._dp_step runs them.
        from lit_dp.optim import DPAdamW
        from lit_dp.privacy.clipping import PrivateQuantile
        from lit_dp.privacy.mechanism import privatize
        from lit_dp.privacy.noise import make_generator

        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        opt = DPAdamW(params.values(), lr=LR)
        gen, _ = make_generator(0)
        clip = PrivateQuantile(initial_clip=CLIP)
        max_rows = training_max_rows()

        def step() -> None:
            out = privatize(
                model,
                batch,
                clip=clip,
                noise_multiplier=SIGMA,
                expected_batch_size=rows,
                generator=gen,
                engine=method,
                max_rows=max_rows,
            )
            for n, p in params.items():
                p.grad = out.grads[n].to(p.dtype)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step
    if method == "opacus_hooks":
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        opt = DPOptimizer(
            torch.optim.AdamW(gsm.parameters(), lr=LR, foreach=False),
            noise_multiplier=SIGMA,
            max_grad_norm=CLIP,
            expected_batch_size=rows,
            loss_reduction="mean",
        )

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            _loss(gsm, batch).mean().backward()
            opt.step()

        return step
    if method == "opacus_ghost":
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

        gsm = GradSampleModuleFastGradientClipping(
            model,
            batch_first=True,
            loss_reduction="mean",
            max_grad_norm=CLIP,
            use_ghost_clipping=True,
        )
        opt = DPOptimizerFastGradientClipping(
            torch.optim.AdamW(gsm.parameters(), lr=LR, foreach=False),
            noise_multiplier=SIGMA,
            max_grad_norm=CLIP,
            expected_batch_size=rows,
            loss_reduction="mean",
        )

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            per_row = _loss(gsm, batch)
            DPTensorFastGradientClipping(gsm, opt, per_row, "mean").backward()
            opt.step()

        return step
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def _why(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")
    return text[:160]


# --- timing ---------------------------------------------------------------------------------
def time_methods(
    model_name: str,
    batch_size: int,
    seq_len: int,
    methods: list[str],
    *,
    warmup: int,
    repeats: int,
    base: torch.nn.Module | None = None,
) -> list[dict[str, Any]]:
    """Median step seconds of each method, timed round-robin after warm-up."""
    base = base if base is not None else build_model(model_name)
    batch = make_batch(base.config.vocab_size, batch_size, seq_len)
    steps: dict[str, Callable[[], None]] = {}
    notes: dict[str, str] = {}
    for m in methods:
        too_big = _exceeds_memory(m, base, batch_size)
        if too_big:
            notes[m] = too_big
            continue
        try:
            fn = make_step(m, copy.deepcopy(base), batch)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(warmup):
                    fn()
            steps[m] = fn
        except Exception as exc:
            notes[m] = _why(exc)
        gc.collect()
    times: dict[str, list[float]] = {m: [] for m in steps}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(repeats):
            for m, fn in steps.items():
                t0 = time.perf_counter()
                fn()
                times[m].append(time.perf_counter() - t0)
    ref = statistics.median(times["nonprivate"]) if times.get("nonprivate") else None
    ref_min = min(times["nonprivate"]) if times.get("nonprivate") else None
    rows = []
    for m in methods:
        step_s = statistics.median(times[m]) if m in times else None
        min_s = min(times[m]) if m in times else None
        rows.append(
            dict(
                model=model_name,
                seq_len=seq_len,
                batch_size=batch_size,
                method=m,
                step_s=step_s,
                tokens_per_s=(batch_size * seq_len / step_s) if step_s else None,
                ratio_vs_nonprivate=(step_s / ref) if (step_s and ref) else None,
                min_s=min_s,
                min_ratio_vs_nonprivate=(min_s / ref_min) if (min_s and ref_min) else None,
                peak_mem_mb=None,
                mem_ratio_vs_nonprivate=None,
                note=notes.get(m, ""),
            )
        )
    return rows


def time_shape(
    model_name: str,
    batch_size: int,
    seq_len: int,
    methods: list[str],
    *,
    warmup: int,
    repeats: int,
    threads: int,
) -> list[dict[str, Any]]:
    """``time_methods`` in a child process, so that running out of memory at one shape costs
    that shape only. If the child dies, the shape is retried with non-private and fast alone and
    the other methods' rows say why they have no numbers."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--shape-child",
        "--models",
        model_name,
        "--shapes",
        f"{batch_size}x{seq_len}",
        "--warmup",
        str(warmup),
        "--repeats",
        str(repeats),
        "--threads",
        str(threads),
        "--methods",
    ]

    def child(names: list[str]) -> tuple[list[dict[str, Any]] | None, int]:
        proc = subprocess.run([*cmd, ",".join(names)], capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("ROWS ")), None)
        return (None if line is None else json.loads(line[len("ROWS ") :])), proc.returncode

    rows, code = child(methods)
    if rows is not None:
        return rows
    why = (
        f"not run: the process timing all methods at this shape died (exit {code}"
        f"{', killed: out of memory' if code == -9 else ''})"
    )
    print(
        f"# {model_name} {batch_size}x{seq_len}: {why}; retrying non-private and fast alone",
        file=sys.stderr,
        flush=True,
    )
    core = [m for m in methods if m in ("nonprivate", "fast")]
    rows = (child(core)[0] or []) if core != methods and core else []
    done = {r["method"] for r in rows}
    empty = dict(
        model=model_name,
        seq_len=seq_len,
        batch_size=batch_size,
        step_s=None,
        tokens_per_s=None,
        ratio_vs_nonprivate=None,
        min_s=None,
        min_ratio_vs_nonprivate=None,
        peak_mem_mb=None,
        mem_ratio_vs_nonprivate=None,
    )
    rows += [{**empty, "method": m, "note": why} for m in methods if m not in done]
    return sorted(rows, key=lambda r: methods.index(r["method"]))


def _exceeds_memory(method: str, model: torch.nn.Module, batch_size: int) -> str | None:
    """Why ``method`` is not run here, if its per-sample gradients (B x params x 4 bytes, held
    by Opacus hooks) would take over half of the memory still available."""
    if method != "opacus_hooks":
        return None
    need = batch_size * sum(p.numel() for p in model.parameters() if p.requires_grad) * 4
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(x.split()[1]) * 1024 for x in f if x.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None
    if need <= avail / 2:
        return None
    return (
        f"not run: its per-sample gradients need {need / 2**30:.1f} GiB (B x params x 4 bytes) "
        f"of {avail / 2**30:.1f} GiB available"
    )


def _peak_rss_mb() -> float:
    """Peak RSS of this process in MiB.

    VmHWM of /proc/self/status, not getrusage's ru_maxrss: Linux carries ru_maxrss across
    fork + execve, so a child started by a big parent would report the parent's peak. VmHWM
    belongs to the address space that execve created, so it starts fresh.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def single(
    model_name: str, batch_size: int, seq_len: int, method: str, warmup: int, repeats: int
) -> None:
    """Child process for --memory: run one method, print its peak RSS as one JSON line."""
    note = ""
    step_s = None
    try:
        rows = time_methods(
            model_name, batch_size, seq_len, [method], warmup=warmup, repeats=repeats
        )
        step_s, note = rows[0]["step_s"], rows[0]["note"]
    except Exception as exc:
        note = _why(exc)
    peak_mb = _peak_rss_mb()
    print("SINGLE " + json.dumps(dict(peak_mem_mb=peak_mb, step_s=step_s, note=note)), flush=True)


def measure_memory(rows: list[dict[str, Any]], warmup: int, repeats: int) -> None:
    """Fill peak_mem_mb of each row from a fresh subprocess per method."""
    for r in rows:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--single",
            r["method"],
            "--models",
            r["model"],
            "--shapes",
            f"{r['batch_size']}x{r['seq_len']}",
            "--warmup",
            str(warmup),
            "--repeats",
            str(repeats),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("SINGLE ")), None)
        if line is None:
            r["note"] = (r["note"] + " | memory run failed: " + proc.stderr[-200:]).strip(" |")
            continue
        child = json.loads(line[len("SINGLE ") :])
        # a method that did not run measured only the process around it: no figure
        r["peak_mem_mb"] = child["peak_mem_mb"] if child["step_s"] is not None else None
    by_key: dict[tuple, float] = {
        (r["model"], r["batch_size"], r["seq_len"]): r["peak_mem_mb"]
        for r in rows
        if r["method"] == "nonprivate" and r["peak_mem_mb"]
    }
    for r in rows:
        ref = by_key.get((r["model"], r["batch_size"], r["seq_len"]))
        if ref and r["peak_mem_mb"]:
            r["mem_ratio_vs_nonprivate"] = r["peak_mem_mb"] / ref


# --- output ---------------------------------------------------------------------------------
def _fmt(x: Any, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def print_table(rows: list[dict[str, Any]], memory: bool) -> None:
    head = (
        "| model | B x T | method | step s (median) | tokens/s | x non-private | "
        "min s | x non-private (min) |"
    )
    sep = "|---|---|---|---:|---:|---:|---:|---:|"
    if memory:
        head += " peak RSS MB | mem x non-private |"
        sep += "---:|---:|"
    head += " note |"
    sep += "---|"
    print(head)
    print(sep)
    for r in rows:
        line = (
            f"| {r['model']} | {r['batch_size']}x{r['seq_len']} | {r['method']} | "
            f"{_fmt(r['step_s'], '.3f')} | {_fmt(r['tokens_per_s'], ',.0f')} | "
            f"{_fmt(r['ratio_vs_nonprivate'], '.2f')} | {_fmt(r['min_s'], '.3f')} | "
            f"{_fmt(r['min_ratio_vs_nonprivate'], '.2f')} |"
        )
        if memory:
            line += (
                f" {_fmt(r['peak_mem_mb'], ',.0f')} | {_fmt(r['mem_ratio_vs_nonprivate'], '.2f')} |"
            )
        line += f" {r['note']} |"
        print(line)
    print(flush=True)


def ghost_plan(model: torch.nn.Module, tokens: int) -> str:
    """How many Linear weights the fast engine norms by Gram matrices (ghost) vs per-unit
    gradients at ``tokens`` tokens per unit (lit_dp's per-layer cost rule)."""
    from lit_dp.privacy.engine.linear import ghost_is_cheaper

    shapes = [m.weight.shape for m in model.modules() if isinstance(m, torch.nn.Linear)]
    ghost = sum(ghost_is_cheaper(tokens, d_in, d_out) for d_out, d_in in shapes)
    return f"{ghost} ghost / {len(shapes) - ghost} per-unit"


def scaling(
    warmup: int, repeats: int, batches: list[int], seqs: list[int], fixed_t: int, fixed_b: int
) -> list[dict]:
    base = build_model("qwen2-5m")
    rows = []
    grid = [(b, fixed_t) for b in batches] + [
        (fixed_b, t) for t in seqs if (fixed_b, t) not in [(b, fixed_t) for b in batches]
    ]
    for b, t in grid:
        rows += time_methods(
            "qwen2-5m", b, t, ["nonprivate", "fast"], warmup=warmup, repeats=repeats, base=base
        )
    print(
        f"### Scaling: fast vs non-private, qwen2-5m (batch sweep at T={fixed_t}, length sweep at B={fixed_b})\n"
    )
    print(
        "| B x T | non-private s | fast s | fast x non-private | x (min) | fast tokens/s | Linear norms |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for i in range(0, len(rows), 2):
        npv, fast = rows[i], rows[i + 1]
        print(
            f"| {npv['batch_size']}x{npv['seq_len']} | {_fmt(npv['step_s'], '.3f')} | "
            f"{_fmt(fast['step_s'], '.3f')} | {_fmt(fast['ratio_vs_nonprivate'], '.2f')} | "
            f"{_fmt(fast['min_ratio_vs_nonprivate'], '.2f')} | {_fmt(fast['tokens_per_s'], ',.0f')} | "
            f"{ghost_plan(base, npv['seq_len'])} |"
        )
    print(flush=True)
    return rows


def profile_fast(model_name: str, batch_size: int, seq_len: int, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    base = build_model(model_name)
    batch = make_batch(base.config.vocab_size, batch_size, seq_len)
    fns = {m: make_step(m, copy.deepcopy(base), batch) for m in ("nonprivate", "fast")}
    for m, fn in fns.items():
        for _ in range(2):
            fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(
            f"### torch.profiler, {m} step, {model_name} {batch_size}x{seq_len} (top {top} by self CPU)\n"
        )
        print("```")
        print(
            prof.key_averages().table(
                sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48
            )
        )
        print("```\n", flush=True)


def run_meta(args: argparse.Namespace) -> dict[str, Any]:
    """Where and from what the numbers came: commit, machine, versions, settings."""
    versions = {"torch": torch.__version__}
    try:
        import opacus

        versions["opacus"] = opacus.__version__
    except ImportError:
        versions["opacus"] = None
    return {
        **provenance("lit_dp", "benchmarks/step_time.py"),
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
