"""Tables and plots of the utility study, from its results file (``study1.py --report``).

Every number is a final validation loss (nats per response token, private ``records``
validation set) of the weights the variant evaluates and exports. Seeds share their sampling and
noise seeds across variants, so differences between variants are paired per seed; the 95%
interval of a mean difference is Student's t over the seeds.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from benchmarks.utility.plan import EPS_MAIN
from benchmarks.utility.train import VARIANTS

ABLATION_ORDER = (
    "dp-adam-ac",
    "dp-adam-ac-no-ema",
    "dp-adam-ac-no-clip-lr",
    "dp-adam-ac-fixed-clip",
    "dp-adamw",
    "dp-adambc",
    "dp-sgd",
    "nonprivate",
)
FAMILIES = ("dp-adam-ac", "dp-adamw", "dp-sgd", "nonprivate")
# The variant whose settings lit_dp ships as its defaults (FixedClip, EMA, DP-AdamW).
SHIPPED = "dp-adam-ac-fixed-clip"


def _eps_of(variant: str, eps: float = EPS_MAIN) -> float | None:
    return eps if VARIANTS[variant].private else None


def tuned_rates(runs: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """(model, family) -> the rate with the lowest seed-0 loss at epsilon 8 (as the plan picks)."""
    best: dict[tuple[str, str], tuple[float, float]] = {}
    for r in runs:
        if r["seed"] != 0 or r["variant"] not in FAMILIES or r["epsilon"] != _eps_of(r["variant"]):
            continue
        key, cand = (r["model"], r["variant"]), (r["val_loss"], r["lr"])
        if key not in best or cand < best[key]:
            best[key] = cand
    return {k: lr for k, (_, lr) in best.items()}


def select(runs, tuned, model: str, variant: str, eps: float | None) -> dict[int, dict]:
    """seed -> run of ``variant`` at its family's tuned rate."""
    lr = tuned.get((model, VARIANTS[variant].lr_family))
    return {
        r["seed"]: r
        for r in runs
        if r["model"] == model and r["variant"] == variant and r["epsilon"] == eps and r["lr"] == lr
    }


def _stats(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else None


def fmt(values: list[float]) -> str:
    if not values:
        return "—"
    mean, sd = _stats(values)
    return f"{mean:.3f} ± {sd:.3f}" if sd is not None else f"{mean:.3f} (1 seed)"


def paired_stats(a: dict[int, dict], b: dict[int, dict]) -> tuple[float, float, float, int] | None:
    """(mean, low, high, n) of (a - b) over the n shared seeds: the mean paired difference with
    its 95% Student-t interval (n - 1 degrees of freedom; low = high = mean for one seed), or
    None when no seed is shared."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [a[s]["val_loss"] - b[s]["val_loss"] for s in seeds]
    mean, sd = _stats(diffs)
    if sd is None:
        return mean, mean, mean, 1
    from scipy.stats import t

    half = t.ppf(0.975, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return mean, mean - half, mean + half, len(diffs)


def fmt_paired(stats: tuple[float, float, float, int] | None) -> str:
    """``paired_stats`` as "+0.123 [+0.045, +0.201]" ("(1 seed)" without an interval)."""
    if stats is None:
        return "—"
    mean, low, high, n = stats
    if n == 1:
        return f"{mean:+.3f} (1 seed)"
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"


def paired(a: dict[int, dict], b: dict[int, dict]) -> str:
    """Mean of (a - b) over shared seeds with its 95% t-interval."""
    return fmt_paired(paired_stats(a, b))


def val_losses(sel: dict[int, dict]) -> list[float]:
    return [r["val_loss"] for _, r in sorted(sel.items())]


def _gap(sel, ceiling: list[float]) -> str:
    """Mean final loss above the same model's non-private ceiling (what DP costs)."""
    if not sel or not ceiling:
        return "—"
    return f"{statistics.fmean(val_losses(sel)) - statistics.fmean(ceiling):+.3f}"


def _deltas(runs: list[dict[str, Any]], setup: dict[str, Any]) -> str:
    """The delta the accountant used (from the runs; the setup's before any private run)."""
    used = sorted({r["delta"] for r in runs if r.get("delta") is not None})
    return ", ".join(f"{d:.3g}" for d in used) if used else f"{setup['delta']:.3g}"


def tables(data: dict[str, Any]) -> str:
    runs, setup = data["runs"], data["setup"]
    tuned = tuned_rates(runs)
    prov = data["_meta"]["provenance"]
    lines = [
        f"Results: commit `{prov['commit']}`, {prov['date']}, {prov['machine']} "
        f"({prov['cpu_count']} CPUs, torch {prov['torch']}, cuda {prov['cuda']}); "
        f"{len(runs)} run records.",
        "",
        f"Private data: synthetic records, N = {setup['num_train']} (example level), "
        f"E[B] = {setup['expected_batch_size']:g} (q = {setup['sample_rate']:.4g}), "
        f"{setup['steps']} steps, delta = {_deltas(runs, setup)}; validation on "
        f"{setup['num_val']} held-out records every {setup['val_every']} steps.",
        "",
        "| model | organism | parameters | pretrained val loss (records) | (public emails) |",
        "|---|---|---:|---:|---:|",
    ]
    for m, info in setup["models"].items():
        lines.append(
            f"| {m} | `{info['organism']}` | {info['parameters']:,} | "
            f"{info['pretrained_val_loss']:.3f} | "
            f"{info['pretrained_val_loss_public_emails']:.3f} |"
        )
    lines += [
        "",
        "Learning-rate tuning (seed 0, epsilon 8; * = chosen; an edge choice is flagged):",
        "",
        "| model | family | rate: final val loss |",
        "|---|---|---|",
    ]
    for (model, family), best in sorted(tuned.items()):
        pts = sorted(
            (r["lr"], r["val_loss"])
            for r in runs
            if r["model"] == model
            and r["variant"] == family
            and r["seed"] == 0
            and r["epsilon"] == _eps_of(family)
        )
        edge = " (at the grid's edge)" if best in (pts[0][0], pts[-1][0]) and len(pts) > 1 else ""
        cells = ", ".join(f"{lr:g}: {loss:.3f}{'*' if lr == best else ''}" for lr, loss in pts)
        lines.append(f"| {model} | {family} | {cells}{edge} |")

    start = setup["models"]["slm"]["pretrained_val_loss"]
    ceiling = val_losses(select(runs, tuned, "slm", "nonprivate", None))
    ref = select(runs, tuned, "slm", "dp-adam-ac", EPS_MAIN)
    shipped = select(runs, tuned, "slm", SHIPPED, EPS_MAIN)
    lines += [
        "",
        f"Ablation at epsilon = {EPS_MAIN:g} (slm; mean ± sd over seeds; Δ = paired "
        "difference with its 95% interval, negative = better: to dp-adam-ac (the paper's "
        f"method with lit_dp's PrivateQuantile bound at rho* {setup['target_clip_rate']:g} in "
        "place of its HistoryPercentile rule), and to "
        f"{SHIPPED}, the recipe lit_dp ships as its defaults; gap = above the non-private "
        "ceiling):",
        "",
        f"| variant | lr | seeds | val loss | Δ vs dp-adam-ac | Δ vs {SHIPPED} | gap |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| pretrained, not fine-tuned | — | — | {start:.3f} | — | — | — |",
    ]
    for v in ABLATION_ORDER:
        sel = select(runs, tuned, "slm", v, _eps_of(v))
        lr = tuned.get(("slm", VARIANTS[v].lr_family))
        lines.append(
            f"| {v} | {'—' if lr is None else f'{lr:g}'} | {len(sel)} | "
            f"{fmt(val_losses(sel))} | {'—' if v == 'dp-adam-ac' else paired(sel, ref)} | "
            f"{'—' if v == SHIPPED else paired(sel, shipped)} | {_gap(sel, ceiling)} |"
        )
    decays = sorted({d for r in ref.values() for d in r.get("val_loss_ema_decays", {})})
    if decays:
        raw = select(runs, tuned, "slm", "dp-adam-ac-no-ema", EPS_MAIN)
        lines += [
            "",
            "EMA decay, priced on the same dp-adam-ac runs (decay_t = min(d, (1+t)/(10+t))):",
            "",
            "| weights | val loss |",
            "|---|---:|",
            f"| raw (no EMA) | {fmt(val_losses(raw))} |",
        ]
        lines += [
            f"| EMA d = {d} | {fmt([r['val_loss_ema_decays'][d] for r in ref.values()])} |"
            for d in decays
        ]
        lines.append(f"| EMA d = shipped default | {fmt(val_losses(ref))} |")
    lines += [
        "",
        "Privacy-utility curve (slm):",
        "",
        "| epsilon | dp-adam-ac | dp-sgd | Δ (ac - sgd) |",
        "|---:|---:|---:|---:|",
    ]
    for eps in sorted(
        {r["epsilon"] for r in runs if r["epsilon"] is not None and r["model"] == "slm"}
    ):
        ac, sgd = (select(runs, tuned, "slm", f, eps) for f in ("dp-adam-ac", "dp-sgd"))
        lines.append(
            f"| {eps:g} | {fmt(val_losses(ac))} | {fmt(val_losses(sgd))} | {paired(ac, sgd)} |"
        )
    lines.append(f"| ∞ (non-private) | {fmt(ceiling)} | | |")
    if "bitnet" in setup["models"]:
        lines += _bitnet_table(runs, tuned, setup, start)
    return "\n".join(lines)


def _gaps(sel: dict[int, dict], ceiling: dict[int, dict]) -> dict[int, dict]:
    """Per seed, the run's loss above the same seed's non-private run (as a run-like record)."""
    return {
        s: {"val_loss": r["val_loss"] - ceiling[s]["val_loss"]}
        for s, r in sel.items()
        if s in ceiling
    }


def _bitnet_table(runs, tuned, setup, start: float) -> list[str]:
    """The BitNet twin against the slm organism at epsilon 8.

    gap = above that model's own non-private run of the same seed (what DP costs it); the last
    column pairs the two models' gaps per seed (positive = DP costs the twin more).
    """
    lines = [
        "",
        f"BitNet b1.58 twin against the SLM organism (epsilon {EPS_MAIN:g}; gap = above that "
        "model's own non-private ceiling: what DP costs it; Δ gap = bitnet's gap - slm's, "
        "paired per seed with its 95% interval, positive = DP costs the twin more):",
        "",
        "| variant | slm val loss | slm gap | bitnet val loss | bitnet gap "
        "| Δ gap (bitnet - slm) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| pretrained | {start:.3f} | | "
        f"{setup['models']['bitnet']['pretrained_val_loss']:.3f} | | |",
    ]
    ceil = {m: select(runs, tuned, m, "nonprivate", None) for m in ("slm", "bitnet")}
    for v in ("dp-adam-ac", "dp-adam-ac-no-ema", "dp-sgd", "nonprivate"):
        s, b = (select(runs, tuned, m, v, _eps_of(v)) for m in ("slm", "bitnet"))
        delta = "" if v == "nonprivate" else paired(_gaps(b, ceil["bitnet"]), _gaps(s, ceil["slm"]))
        lines.append(
            f"| {v} | {fmt(val_losses(s))} | {_gap(s, val_losses(ceil['slm']))} | "
            f"{fmt(val_losses(b))} | {_gap(b, val_losses(ceil['bitnet']))} | {delta} |"
        )
    ac, raw, sgd = (
        select(runs, tuned, "bitnet", v, EPS_MAIN)
        for v in ("dp-adam-ac", "dp-adam-ac-no-ema", "dp-sgd")
    )
    lines += [
        "",
        f"Within the twin (paired): dp-adam-ac - dp-sgd {paired(ac, sgd)}; EMA - raw weights "
        f"{paired(ac, raw)}.",
    ]
    return lines


def _mean_curve(
    sel: dict[int, dict], key: str = "val_loss_curve", field: str = "loss"
) -> tuple[list[int], list[float]]:
    """Mean over seeds at the steps every seed has."""
    by_step: dict[int, list[float]] = {}
    for r in sel.values():
        for p in r[key]:
            if p.get(field) is not None:
                by_step.setdefault(p["step"], []).append(p[field])
    steps = sorted(s for s, v in by_step.items() if len(v) == len(sel))
    return steps, [statistics.fmean(by_step[s]) for s in steps]


def plot_epsilon(
    data: dict[str, Any],
    path: Path,
    extra: tuple[tuple[str, str, dict[float, list[float]]], ...] = (),
) -> None:
    """The slm epsilon curve of DP-Adam-AC and DP-SGD against the non-private ceiling.

    ``extra``: more curves, (label, colour, epsilon -> final losses over seeds), drawn the same
    way (``clip.py`` adds the shipped recipe's).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, setup = data["runs"], data["setup"]
    tuned = tuned_rates(runs)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    epsilons = sorted(
        {r["epsilon"] for r in runs if r["epsilon"] is not None and r["model"] == "slm"}
    )
    drawn: list[float] = []
    curves = [
        (
            f"{family} (lr {tuned.get(('slm', family), float('nan')):g})",
            color,
            {eps: val_losses(select(runs, tuned, "slm", family, eps)) for eps in epsilons},
        )
        for family, color in (("dp-adam-ac", "tab:blue"), ("dp-sgd", "tab:orange"))
    ] + list(extra)
    offsets = [1.0 + 0.03 * (i - (len(curves) - 1) / 2) for i in range(len(curves))]
    for (label, color, by_eps), offset in zip(curves, offsets, strict=True):
        xs, ys, es = [], [], []
        for eps, values in sorted(by_eps.items()):
            if values:
                mean, sd = _stats(values)
                xs.append(eps * offset)
                ys.append(mean)
                es.append(sd or 0.0)
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, color=color, label=label)
            drawn += [y + e for y, e in zip(ys, es, strict=True)]
            drawn += [y - e for y, e in zip(ys, es, strict=True)]
    ceiling = val_losses(select(runs, tuned, "slm", "nonprivate", None))
    if ceiling:
        mean, sd = _stats(ceiling)
        ax.axhline(mean, color="black", lw=1.2, label="non-private AdamW (ceiling)")
        if sd:
            ax.axhspan(mean - sd, mean + sd, color="black", alpha=0.08)
        drawn += [mean - (sd or 0.0), mean + (sd or 0.0)]
    start = setup["models"]["slm"]["pretrained_val_loss"]
    span = (max(drawn) - min(drawn)) if drawn else 0.0
    if drawn and start > max(drawn) + span + 0.5:  # far above: a note, not a line to scale
        ax.text(
            0.01,
            0.98,
            f"pretrained, before fine-tuning: {start:.2f} (off scale)",
            transform=ax.transAxes,
            va="top",
            fontsize=8,
            color="gray",
        )
    else:
        ax.axhline(start, color="gray", ls="--", lw=1.2, label="pretrained, before fine-tuning")
    ax.set_xscale("log", base=2)
    ax.set_xlim(min(epsilons or [EPS_MAIN]) / 1.5, max(epsilons or [EPS_MAIN]) * 1.5)
    ax.set_xticks(epsilons or [EPS_MAIN])
    ax.set_xticklabels([f"{e:g}" for e in (epsilons or [EPS_MAIN])])
    ax.set_xlabel(f"epsilon (delta = {_deltas(runs, setup)})")
    ax.set_ylabel("final validation loss (nats / response token)")
    ax.set_title(
        f"slm organism on records: N={setup['num_train']}, E[B]={setup['expected_batch_size']:g}, "
        f"{setup['steps']} steps; mean ± sd over seeds",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _focus(ax, curves: list[list[float]]) -> None:
    """y range of the fine-tuning phase: the step-0 loss (far above, shared by all) is noted,
    not drawn to scale."""
    later = [v for c in curves for v in c[1:]]
    if not later:
        return
    low, high = min(later), max(c[1] for c in curves if len(c) > 1)
    ax.set_ylim(low - 0.05 * (high - low) - 0.02, high + 0.1 * (high - low) + 0.02)
    starts = sorted({round(c[0], 2) for c in curves})
    ax.text(
        0.99,
        0.97,
        f"step 0: {', '.join(f'{x:g}' for x in starts)} (off scale)",
        transform=ax.transAxes,
        ha="right",
        va="top",
        fontsize=7,
        color="gray",
    )


def plot_curves(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, setup = data["runs"], data["setup"]
    tuned = tuned_rates(runs)
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax, curves = axes[0, 0], []
    for v in ABLATION_ORDER:
        steps, losses = _mean_curve(select(runs, tuned, "slm", v, _eps_of(v)))
        if steps:
            ax.plot(steps, losses, marker=".", label=v, ls="--" if v == "nonprivate" else "-")
            curves.append(losses)
    _focus(ax, curves)
    ax.set_title(f"slm, epsilon {EPS_MAIN:g}: validation loss (mean over seeds)", fontsize=10)
    ax, curves = axes[0, 1], []
    for v, color in (("dp-adam-ac", "tab:blue"), ("dp-sgd", "tab:orange"), ("nonprivate", "black")):
        for model, ls in (("slm", "-"), ("bitnet", "--")):
            steps, losses = _mean_curve(select(runs, tuned, model, v, _eps_of(v)))
            if steps:
                ax.plot(steps, losses, ls=ls, color=color, marker=".", label=f"{model} {v}")
                curves.append(losses)
    _focus(ax, curves)
    ax.set_title(f"slm (solid) vs BitNet b1.58 twin (dashed), epsilon {EPS_MAIN:g}", fontsize=10)
    for ax in axes[0]:
        ax.set_ylabel("validation loss (nats / response token)")
        ax.legend(fontsize=7, loc="best")
    ref = select(runs, tuned, "slm", "dp-adam-ac", EPS_MAIN)
    fixed = select(runs, tuned, "slm", "dp-adam-ac-fixed-clip", EPS_MAIN)
    no_lr = select(runs, tuned, "slm", "dp-adam-ac-no-clip-lr", EPS_MAIN)
    ax = axes[1, 0]
    steps, clip = _mean_curve(ref, "trace", "clip_bound")
    ax.plot(steps, clip, color="tab:blue", label="dp-adam-ac: private-quantile clip bound C_t")
    if fixed:
        ax.axhline(setup["max_grad_norm"], color="tab:gray", ls="--", label="fixed clip (C = C0)")
    ax.set_ylabel("clip bound (gradient-norm units)")
    ax.set_title("clip bound (mean over seeds)", fontsize=10)
    ax = axes[1, 1]
    steps, rate = _mean_curve(ref, "trace", "clip_rate")
    ax.plot(steps, rate, color="tab:green", label="dp-adam-ac: privatized clip rate")
    ax.axhline(setup["target_clip_rate"], color="tab:green", ls=":", lw=1, label="target clip rate")
    for sel, color, name in (
        (ref, "tab:red", "dp-adam-ac"),
        (fixed, "tab:purple", "fixed-clip"),
        (no_lr, "tab:brown", "no-clip-lr"),
    ):
        if sel:
            base = next(iter(sel.values()))["lr"]
            steps, lr = _mean_curve(sel, "trace", "lr")
            ax.plot(steps, [x / base for x in lr], color=color, label=f"{name}: lr / base lr")
    ax.set_title(
        "privatized clip rate and clip-driven lr multiplier (mean over seeds)", fontsize=10
    )
    for ax in axes[1]:
        ax.legend(fontsize=7)
    for ax in axes.flat:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"{setup['recipe']} recipe: N={setup['num_train']}, E[B]="
        f"{setup['expected_batch_size']:g}, {setup['steps']} steps",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(path: Path) -> str:
    """Markdown of every table and of what the study does not show (``limits.section``, with
    ``<stem>_clip.json`` where it exists), also written to <stem>_report.md, and the two plots."""
    data = json.loads(Path(path).read_text())
    if not data.get("runs"):
        return f"{path}: no runs yet"
    stem = Path(path).with_suffix("")
    from benchmarks.utility.limits import section

    clip = Path(f"{stem}_clip.json")  # clip.py's supplement, beside the study's file
    clip_runs = json.loads(clip.read_text()).get("runs", []) if clip.exists() else []
    text = tables(data) + "\n\n" + section(data, clip_runs)
    plot_epsilon(data, Path(f"{stem}_epsilon.png"))
    plot_curves(data, Path(f"{stem}_curves.png"))
    Path(f"{stem}_report.md").write_text(text + "\n")
    return text + f"\n\nPlots: {stem}_epsilon.png, {stem}_curves.png"
