"""Utility study 2's tables and plots, recomputed from its results file (utility2.json).

Every number comes from the records: a setting's rate is the one its seed-0 validation loss
chose (separately for EMA and raw weights), its score is the mean *test* loss over the seeds
run at that rate, and a comparison between two settings is the mean of their per-seed
differences with a 95% t-interval (seeds share data order and noise seeds across settings, so
the differences are paired). "Above non-private" is measured seed by seed against the best
non-private setting (by validation) at the same compute: every allocation of the design spends
the same number of example-gradients, so the reference is the best non-private allocation,
schedule and weights, as a non-private user with that compute would choose them.

    python -m benchmarks.utility.study2 --report      # writes results/utility2_report.md + plots
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.common.results import load_results
from benchmarks.utility.study2 import DESIGNS, Setting, record_key, settings, tuned

Key = tuple[Setting, bool]  # (setting, EMA weights?)


def setting_of(r: dict[str, Any]) -> Setting:
    return Setting(
        r["method"], r["lr_schedule"], int(r["expected_batch_size"]), r["epsilon"], r["bands"]
    )


def t_interval(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% t-interval (None with fewer than 2 values)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    from scipy.stats import t

    sd = statistics.stdev(values)
    return mean, float(t.ppf(0.975, len(values) - 1) * sd / math.sqrt(len(values)))


def fmt_interval(values: list[float], *, signed: bool = False) -> str:
    if not values:
        return "—"
    mean, half = t_interval(values)
    sign = "+" if signed else ""
    if half is None:
        return f"{mean:{sign}.3f} (1 seed)"
    return f"{mean:{sign}.3f} [{mean - half:{sign}.3f}, {mean + half:{sign}.3f}]"


class Study:
    """The results file, indexed: tuned rates and per-seed records of every (setting, weights)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.runs: list[dict[str, Any]] = data.get("runs", [])
        design_name = data.get("_meta", {}).get("design", "cpu")
        self.design = DESIGNS[design_name]
        self.by_setting: dict[Setting, list[dict[str, Any]]] = defaultdict(list)
        for r in self.runs:
            self.by_setting[setting_of(r)].append(r)
        self.lenders = {s: lender for s, lender in settings(self.design, self.runs) if lender}

    def rate(self, key: Key) -> float | None:
        """The rate seed 0 chose for these weights (None while the grid is open); a setting
        that borrows rates (a banded-MF neighbour) uses its lender's."""
        setting, ema = key
        lender = self.lenders.get(setting)
        best, todo = tuned(self.design, self.runs, lender or setting)
        return best[ema] if best and not todo else None

    def seeds(self, key: Key) -> dict[int, dict[str, Any]]:
        """{seed: record} at the tuned rate (empty while the grid is open)."""
        lr = self.rate(key)
        if lr is None:
            return {}
        setting, ema = key
        return {
            r["seed"]: r
            for r in self.by_setting.get(setting, [])
            if r["lr"] == lr and r["ema"] == ema
        }

    def at_edge(self, key: Key) -> bool:
        lr = self.rate(key)
        tried = sorted({r["lr"] for r in self.by_setting.get(key[0], []) if r["seed"] == 0})
        return lr is not None and len(tried) > 1 and lr in (tried[0], tried[-1])

    def nonprivate_reference(self) -> Key | None:
        """The non-private (setting, weights) with the lowest seed-0 validation loss at the
        design's compute, over its allocations (its own extras included: EMA and schedule are
        chosen the same way)."""
        best: tuple[float, Key] | None = None
        for s in self.by_setting:
            if s.method != "nonprivate":
                continue
            for ema in (True, False):
                rec = self.seeds((s, ema)).get(0)
                if rec is not None and (best is None or rec["val_loss"] < best[0]):
                    best = (rec["val_loss"], (s, ema))
        return None if best is None else best[1]

    def best(self, method: str, epsilon: float, batch_size: int | None = None) -> Key | None:
        """The method at its best at this epsilon: the (setting, weights) of any schedule,
        allocation (or this ``batch_size``'s) and b with the lowest seed-0 validation loss at
        its tuned rate."""
        keys = [
            (s, ema)
            for s in self.by_setting
            if s.method == method and s.epsilon == epsilon and batch_size in (None, s.batch_size)
            for ema in (True, False)
            if 0 in self.seeds((s, ema))
        ]
        return min(keys, key=lambda k: self.seeds(k)[0]["val_loss"], default=None)

    def diffs(self, a: Key, b: Key, field: str = "test_loss") -> list[float]:
        """Per-seed a - b over the seeds both have."""
        ra, rb = self.seeds(a), self.seeds(b)
        return [ra[s][field] - rb[s][field] for s in sorted(set(ra) & set(rb))]


def _label(s: Setting) -> str:
    b = f" b={s.bands}" if s.method == "bandmf" else ""
    return f"{s.method}{b}"


def _alloc(study: Study, s: Setting) -> str:
    return f"{s.batch_size} x {study.design.steps(s.batch_size)}"


def _tail_drop(rec: dict[str, Any]) -> float | None:
    """Validation loss fall over the last ~20% of steps (positive = still improving)."""
    curve = rec.get("val_loss_curve") or []
    if len(curve) < 3:
        return None
    end = curve[-1]["step"]
    earlier = [c for c in curve if c["step"] <= 0.8 * end]
    return earlier[-1]["loss"] - curve[-1]["loss"] if earlier else None


def _eps(s: Setting) -> str:
    return "non-private" if s.epsilon is None else f"{s.epsilon:g}"


def main_table(study: Study) -> list[str]:
    """Every tuned (setting, weights): rate, seeds, test loss, nats and perplexity ratio above
    the non-private reference at the same compute, and the last-20% validation fall."""
    lines = [
        "| epsilon | E[B] x steps | method | schedule | weights | lr (seed-0 val) | seeds | "
        "sigma | sigma / E[B] | test loss | above non-private (nats) | perplexity ratio | "
        "val fall, last 20% |",
        "|---|---|---|---|---|---:|---:|---:|---:|---|---|---:|---:|",
    ]
    order = sorted(
        study.by_setting,
        key=lambda s: (-(s.epsilon or 1e9), s.batch_size, s.method, s.schedule, s.bands),
    )
    for s in order:
        for ema in (True, False):
            key = (s, ema)
            recs = study.seeds(key)
            if not recs:
                continue
            lr = study.rate(key)
            ref = study.nonprivate_reference()
            gap = study.diffs(key, ref) if ref is not None and s.method != "nonprivate" else []
            ratio = f"{math.exp(statistics.fmean(gap)):.3f}" if gap else "—"
            first = next(iter(recs.values()))
            falls = [f for f in (_tail_drop(r) for r in recs.values()) if f is not None]
            edge = " (edge)" if study.at_edge(key) else ""
            fall = f"{statistics.fmean(falls):.3f}" if falls else "—"
            lines.append(
                f"| {_eps(s)} | {_alloc(study, s)} | {_label(s)} | {s.schedule} | "
                f"{'EMA' if ema else 'raw'} | {lr:g}{edge} | {len(recs)} | "
                f"{first['noise_multiplier']:.3f} | {first.get('noise_per_step', 0.0):.2e} | "
                f"{fmt_interval([r['test_loss'] for r in recs.values()])} | "
                f"{fmt_interval(gap, signed=True) if gap else '—'} | {ratio} | {fall} |"
            )
    return lines


NAMES = {"bandmf": "banded MF", "dp-adamw": "DP-AdamW", "dp-sgd": "DP-SGD"}


def comparisons(study: Study) -> list[tuple[str, Key, Key]]:
    """The paired questions the study asks, for every epsilon and allocation with both sides:
    within an allocation (EMA, schedule, method, banded MF against independent noise), across
    allocations (DP-AdamW and the non-private reference at each against the middle one), and
    each method at its best."""
    mid = study.design.batch_sizes[len(study.design.batch_sizes) // 2]
    out = [c for s in study.by_setting for c in _pairs_of(study, s, mid)]
    # each method at its best (schedule, allocation, b and weights chosen on validation)
    for eps in sorted({s.epsilon for s in study.by_setting if s.epsilon is not None}):
        best = {m: study.best(m, eps) for m in NAMES}
        for a, b in (("dp-adamw", "dp-sgd"), ("bandmf", "dp-adamw"), ("bandmf", "dp-sgd")):
            ka, kb = best[a], best[b]
            if ka is not None and kb is not None:
                out.append((f"best {NAMES[a]} - best {NAMES[b]}", ka, kb))
        # at the one allocation where both optimizers ran: equal tuning of everything else
        ka, kb = study.best("dp-adamw", eps, mid), study.best("dp-sgd", eps, mid)
        if ka is not None and kb is not None:
            out.append(("best DP-AdamW - best DP-SGD, same E[B] x steps", ka, kb))
    return out


def _pairs_of(study: Study, s: Setting, mid: int) -> list[tuple[str, Key, Key]]:
    """The comparisons that setting ``s`` is the first side of (both weights where paired)."""
    both = (True, False)
    out: list[tuple[str, Key, Key]] = []
    if s.method in ("dp-adamw", "dp-sgd", "nonprivate"):
        out.append(("EMA - raw", (s, True), (s, False)))
    if s.method in ("dp-adamw", "nonprivate"):
        other = replace(s, schedule="cosine")
        if s.schedule == "constant" and other in study.by_setting:
            out += [("constant - cosine", (s, e), (other, e)) for e in both]
        sgd = replace(s, method="dp-sgd")
        if s.method == "dp-adamw" and sgd in study.by_setting:
            out += [("DP-AdamW - DP-SGD", (s, e), (sgd, e)) for e in both]
        middle = replace(s, batch_size=mid)
        if s.batch_size != mid and middle in study.by_setting:
            out += [("allocation", (s, e), (middle, e)) for e in both]
    if s.method == "bandmf":
        base = replace(s, method="dp-adamw", bands=1)
        out += [("banded MF - DP-AdamW", (s, e), (base, e)) for e in both]
    return out


def comparison_table(study: Study) -> list[str]:
    lines = [
        "| question | epsilon | E[B] x steps | A | B | seeds | A - B test loss [95% t] |",
        "|---|---|---|---|---|---:|---|",
    ]
    rows = []
    for name, a, b in comparisons(study):
        d = study.diffs(a, b)
        if not d:
            continue
        sa, sb = a[0], b[0]
        where = sa.batch_size != sb.batch_size  # then each side names its allocation
        desc = [
            f"{_label(x)} {x.schedule} {'EMA' if e else 'raw'}"
            + (f" ({_alloc(study, x)})" if where else "")
            for x, e in ((sa, a[1]), (sb, b[1]))
        ]
        rows.append(
            (
                name,
                -(sa.epsilon or 0),
                sa.batch_size,
                f"| {name} | {_eps(sa)} | {'each its own' if where else _alloc(study, sa)} | "
                f"{desc[0]} | {desc[1]} | "
                f"{len(d)} | {fmt_interval(d, signed=True)} |",
            )
        )
    lines += [r[-1] for r in sorted(rows)]
    return lines


def allocation_table(study: Study) -> list[str]:
    """The best DP-AdamW (by seed-0 validation) per allocation and epsilon, scored on test."""
    lines = [
        "| epsilon | E[B] x steps | best DP-AdamW (val) | test loss | above non-private |",
        "|---|---|---|---|---|",
    ]
    for eps in sorted({s.epsilon for s in study.by_setting if s.epsilon is not None}):
        for bs in study.design.batch_sizes:
            cands = [
                (s, ema)
                for s in study.by_setting
                if s.method == "dp-adamw" and s.batch_size == bs and s.epsilon == eps
                for ema in (True, False)
                if 0 in study.seeds((s, ema))
            ]
            if not cands:
                continue
            key = min(cands, key=lambda k: study.seeds(k)[0]["val_loss"])
            ref = study.nonprivate_reference()
            gap = study.diffs(key, ref) if ref else []
            tests = [r["test_loss"] for r in study.seeds(key).values()]
            lines.append(
                f"| {eps:g} | {_alloc(study, key[0])} | {key[0].schedule} "
                f"{'EMA' if key[1] else 'raw'} | {fmt_interval(tests)} | "
                f"{fmt_interval(gap, signed=True) if gap else '—'} |"
            )
    return lines


def tables(data: dict[str, Any]) -> str:
    study = Study(data)
    prov = data.get("_meta", {}).get("provenance", {})
    commits = sorted({r["commit"] for r in study.runs})
    cpu = sum(r["cpu_seconds"] for r in study.runs if r["ema"]) / 3600
    setup = data.get("setup", {})
    lines = [
        f"Results file started at commit `{prov.get('commit')}`; runs from "
        f"{', '.join(f'`{c}`' for c in commits) or 'none yet'}. {len(study.runs) // 2} "
        f"trainings, {cpu:.1f} CPU hours. Organism `{setup.get('organism')}` "
        f"(weights sha256 {str(setup.get('weights_sha256'))[:12]}...).",
        "",
        "Rates are chosen on seed 0's validation loss; scores are test losses over the seeds "
        "run at that rate, mean [95% t-interval]; '(edge)' marks a rate at the edge of its "
        "grid after the grid grew as far as it may.",
        "",
        "### Every tuned setting",
        "",
        *main_table(study),
        "",
        "### Compute allocation (DP-AdamW)",
        "",
        *allocation_table(study),
        "",
        "### Paired comparisons",
        "",
        *comparison_table(study),
        "",
    ]
    return "\n".join(lines)


def _best_at(study: Study, keys: list[Key]) -> Key | None:
    """The (setting, weights) among ``keys`` with the lowest seed-0 validation loss."""
    keys = [k for k in keys if 0 in study.seeds(k)]
    return min(keys, key=lambda k: study.seeds(k)[0]["val_loss"], default=None)


def _errorbar(ax: Any, study: Study, points: Sequence[tuple[float, Key]], **style: Any) -> None:
    """Mean test loss with its 95% t half-width at each (x, key) that has tuned seeds."""
    xs, ys, errs = [], [], []
    for x, key in points:
        tests = [r["test_loss"] for r in study.seeds(key).values()]
        if not tests:
            continue
        mean, half = t_interval(tests)
        xs.append(x)
        ys.append(mean)
        errs.append(half or 0.0)
    if xs:
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, **style)


def _allocation_plot(study: Study, plt: Any, path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, eps in zip(axes, (8.0, 2.0), strict=True):
        for method in ("dp-adamw", "dp-sgd", "nonprivate"):
            points = []
            for bs in study.design.batch_sizes:
                key = _best_at(
                    study,
                    [
                        (s, ema)
                        for s in study.by_setting
                        if s.method == method
                        and s.batch_size == bs
                        and (s.epsilon == eps or method == "nonprivate")
                        for ema in (True, False)
                    ],
                )
                if key is not None:
                    points.append((bs, key))
            _errorbar(ax, study, points, label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("E[B] (steps = example-gradients / E[B])")
        ax.set_title(f"epsilon {eps:g}")
        ax.legend()
    axes[0].set_ylabel("test loss (nats/token), best by validation")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def band_series(study: Study, epsilon: float, ema: bool) -> list[tuple[int, Key]]:
    """(b, key) for each banded-MF setting at this epsilon, and b = 1 for DP-AdamW with
    independent noise at the same allocation and schedule, ordered by b."""
    band = [s for s in study.by_setting if s.method == "bandmf" and s.epsilon == epsilon]
    base = {replace(s, method="dp-adamw", bands=1) for s in band}
    points = [(s.bands, (s, ema)) for s in band]
    points += [(1, (s, ema)) for s in base if s in study.by_setting]
    return sorted(points, key=lambda p: p[0])


def _bands_plot(study: Study, plt: Any, path: Path) -> Path | None:
    """Test loss against b at each epsilon where banded MF ran: b = 1 is DP-AdamW with
    independent noise at the same allocation and schedule; DP-SGD at its best is a line."""
    epsilons = sorted(
        {s.epsilon for s in study.by_setting if s.method == "bandmf" and s.epsilon is not None},
        reverse=True,
    )
    if not epsilons:
        return None
    fig, axes = plt.subplots(1, len(epsilons), figsize=(5.5 * len(epsilons), 4), squeeze=False)
    for ax, eps in zip(axes[0], epsilons, strict=True):
        band = [s for s in study.by_setting if s.method == "bandmf" and s.epsilon == eps]
        for ema in (True, False):
            points = [(float(b), key) for b, key in band_series(study, eps, ema)]
            _errorbar(ax, study, points, label=f"{'EMA' if ema else 'raw'} weights")
        sgd = study.best("dp-sgd", eps)
        if sgd is not None and study.seeds(sgd):
            mean = statistics.fmean(r["test_loss"] for r in study.seeds(sgd).values())
            how = f"{_alloc(study, sgd[0])}, {sgd[0].schedule}, {'EMA' if sgd[1] else 'raw'}"
            ax.axhline(mean, ls="--", color="grey", label=f"DP-SGD at its best ({how})")
        for planner in {study.lenders.get(s, s) for s in band}:
            ax.axvline(planner.bands, ls=":", color="black", label="planner's b (rates tuned)")
        alloc = ", ".join(sorted({_alloc(study, s) for s in band}))
        ax.set_xlabel("bands b (1 = independent noise)")
        ax.set_title(f"epsilon {eps:g}, E[B] x steps {alloc}")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("test loss (nats/token)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _curves_plot(study: Study, plt: Any, path: Path) -> Path:
    """Seed-0 validation curves of each method at its best, against example-gradients seen,
    so that allocations of the same compute share the x axis."""
    epsilons = (8.0, 2.0)
    fig, axes = plt.subplots(1, len(epsilons), figsize=(11, 4), sharey=True)
    for ax, eps in zip(axes, epsilons, strict=True):
        for method in ("dp-adamw", "dp-sgd", "bandmf", "nonprivate"):
            if method == "nonprivate":
                everywhere = [(s, e) for s in study.by_setting for e in (True, False)]
                key = _best_at(study, [k for k in everywhere if k[0].method == method])
            else:
                key = study.best(method, eps)
            if key is None:
                continue
            s, ema = key
            curve = study.seeds(key)[0].get("val_loss_curve") or []
            ax.plot(
                [c["step"] * s.batch_size for c in curve],
                [c["loss"] for c in curve],
                marker=".",
                label=f"{_label(s)} {s.schedule} {'EMA' if ema else 'raw'} ({_alloc(study, s)})",
            )
        ax.set_yscale("log")
        ax.set_xlabel("example-gradients")
        ax.set_title(f"epsilon {eps:g} (seed 0, validation)")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("validation loss (nats/token)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plots(data: dict[str, Any], out: Path) -> list[Path]:
    """Test loss against allocation per epsilon (best DP-AdamW, DP-SGD, non-private), test loss
    against the number of bands, and the validation curves of each method at its best."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    study = Study(data)
    written = [
        _allocation_plot(study, plt, out / "utility2_allocation.png"),
        _bands_plot(study, plt, out / "utility2_bands.png"),
        _curves_plot(study, plt, out / "utility2_curves.png"),
    ]
    return [p for p in written if p is not None]


def report(path: Path) -> str:
    data = load_results(path)
    if not data.get("runs"):
        raise SystemExit(f"{path}: no runs yet")
    text = tables(data)
    md = path.with_name(path.stem + "_report.md")
    md.write_text("# Utility study 2: tables\n\n" + text)
    written = plots(data, path.parent)
    print(text)
    print(f"wrote {md} and {', '.join(str(p) for p in written)}")
    return text


__all__ = ["Study", "record_key", "report", "t_interval", "tables"]
