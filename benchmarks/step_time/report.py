"""compare.py's output: the results table, the fast vs non-private scaling sweep and the
torch.profiler view of one step."""

from __future__ import annotations

import copy
from typing import Any

import torch

from benchmarks.step_time.methods import build_model, make_batch, make_step, time_methods


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
        "### Scaling: fast vs non-private, qwen2-5m "
        f"(batch sweep at T={fixed_t}, length sweep at B={fixed_b})\n"
    )
    print(
        "| B x T | non-private s | fast s | fast x non-private | x (min) | fast tokens/s "
        "| Linear norms |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for i in range(0, len(rows), 2):
        npv, fast = rows[i], rows[i + 1]
        print(
            f"| {npv['batch_size']}x{npv['seq_len']} | {_fmt(npv['step_s'], '.3f')} | "
            f"{_fmt(fast['step_s'], '.3f')} | {_fmt(fast['ratio_vs_nonprivate'], '.2f')} | "
            f"{_fmt(fast['min_ratio_vs_nonprivate'], '.2f')} | "
            f"{_fmt(fast['tokens_per_s'], ',.0f')} | "
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
            f"### torch.profiler, {m} step, {model_name} {batch_size}x{seq_len} "
            f"(top {top} by self CPU)\n"
        )
        print("```")
        print(
            prof.key_averages().table(
                sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48
            )
        )
        print("```\n", flush=True)
