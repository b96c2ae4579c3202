"""What the utility study does not show: the numbers behind the limits its docs state.

Each function recomputes one limit of the study from its records (``utility.json``) and, where
it needs them, from its clip supplement's (``utility_clip.json``, the runs of ``clip.py``):

- ``ema_lead``: the shipped recipe's lead over DP-SGD at epsilon 8, split into the optimizer
  (``dp-adamw``: the same training as the recipe, raw weights) and its EMA weights;
- ``curve_minima``: where a run's validation loss was lowest, when that is before its end (a
  rate too high for the noise, e.g. DP-SGD at epsilon 1 with the rate tuned at 8);
- ``selection_optimism``: how much choosing among configurations on the one validation set
  flatters the chosen one, estimated from the seed-to-seed spread of the losses;
- ``late_fall``: how much each loss still fell in the last 50 steps (no run converged);
- ``gain_fractions``: the fraction of the non-private run's gain, from the pretrained start
  and from the uniform distribution over the vocabulary, beside the gap in nats;
- ``ema_cap``: the EMA decay in effect at the last step (the warm-up caps it);
- ``rate_multipliers``: the learning rate each run used relative to its base rate.

Differences are paired per seed (every variant at seed s shares its sampling and noise
seeds) with the 95% Student-t interval of the mean paired difference over the seeds (n = 3:
2 degrees of freedom), as in ``report.py``. ``section`` writes them as Markdown.
"""

from __future__ import annotations

import inspect
import math
import statistics
from typing import Any

from benchmarks.utility.plan import EPS_MAIN
from benchmarks.utility.report import (
    SHIPPED,
    fmt_paired,
    paired_stats,
    select,
    tuned_rates,
    val_losses,
)
from benchmarks.utility.train import VARIANTS

Seeds = dict[int, dict[str, Any]]  # seed -> run record
Stats = tuple[float, float, float, int]  # paired_stats: mean, low, high, n


def _curve(run: dict[str, Any]) -> dict[int, float]:
    return {p["step"]: p["loss"] for p in run["val_loss_curve"] if p.get("loss") is not None}


def shipped_runs(
    runs: list[dict[str, Any]], clip_runs: list[dict[str, Any]], model: str, eps: float
) -> Seeds:
    """The shipped recipe (FixedClip C = 1, EMA) of ``model`` at ``eps``: the study's
    ``dp-adam-ac-fixed-clip`` runs at DP-Adam-AC's tuned rate, else the supplement's ``fixed-1``
    runs (EMA weights)."""
    sel = select(runs, tuned_rates(runs), model, SHIPPED, eps)
    if sel:
        return sel
    return {
        r["seed"]: r
        for r in clip_runs
        if r.get("setting") == "fixed-1"
        and r["model"] == model
        and r["epsilon"] == eps
        and r.get("weights") == "ema"
    }


def _same_training(a: Seeds, b: Seeds) -> bool:
    """Whether the runs of every shared seed logged the same training trace (loss, lr)."""
    seeds = set(a) & set(b)
    return bool(seeds) and all(
        [(p["train_loss"], p["lr"]) for p in a[s].get("trace", [])]
        == [(p["train_loss"], p["lr"]) for p in b[s].get("trace", [])]
        for s in seeds
    )


def ema_lead(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The shipped recipe's lead over DP-SGD at epsilon 8 (slm), optimizer and EMA apart.

    ``dp-adamw`` runs the recipe's training (fixed C, DP-AdamW, its tuned rate) and evaluates
    the raw weights; ``same_training`` checks that its trace equals the recipe's on every seed.
    None when a variant is missing.
    """
    tuned = tuned_rates(runs)
    shipped, adamw, sgd = (
        select(runs, tuned, "slm", v, EPS_MAIN) for v in (SHIPPED, "dp-adamw", "dp-sgd")
    )
    if not (shipped and adamw and sgd):
        return None
    return {
        "shipped_minus_sgd": paired_stats(shipped, sgd),
        "adamw_minus_sgd": paired_stats(adamw, sgd),
        "ema": paired_stats(shipped, adamw),
        "same_training": _same_training(shipped, adamw),
        "sgd_weights": sorted({r["weights"] for r in sgd.values()}),
        "lr": {"shipped": next(iter(shipped.values()))["lr"], "dp-sgd": sgd[min(sgd)]["lr"]},
    }


def curve_minima(sel: Seeds) -> list[dict[str, Any]]:
    """Per seed: the step of the lowest validation loss, that loss, the final loss and the rise
    from the lowest point to the end (0 when the curve ends at its lowest point)."""
    out = []
    for seed, run in sorted(sel.items()):
        curve = _curve(run)
        step = min(curve, key=lambda s: (curve[s], s))
        final = curve[max(curve)]
        out.append(
            {
                "seed": seed,
                "step": step,
                "best": curve[step],
                "final": final,
                "rise": final - curve[step],
            }
        )
    return out


def rising_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every private (model, variant, epsilon) at the tuned rate whose validation loss was
    lowest before the end of the run on every seed, with ``curve_minima`` per seed."""
    tuned = tuned_rates(runs)
    out = []
    groups = sorted(
        {(r["model"], r["variant"], r["epsilon"]) for r in runs if r["epsilon"] is not None},
        key=lambda g: (g[0], g[1], g[2]),
    )
    for model, variant, eps in groups:
        sel = select(runs, tuned, model, variant, eps)
        minima = curve_minima(sel) if sel else []
        if minima and all(m["rise"] > 0 for m in minima):
            out.append({"model": model, "variant": variant, "epsilon": eps, "seeds": minima})
    return out


def expected_max_normal(k: int) -> float:
    """E[max of k independent standard normals] (0 for k = 1; 1.539 for k = 10)."""
    from scipy import integrate
    from scipy.stats import norm

    if k < 1:
        raise ValueError(f"k={k}: the number of configurations must be at least 1")
    value, _ = integrate.quad(lambda x: k * x * norm.pdf(x) * norm.cdf(x) ** (k - 1), -12, 12)
    return value


def selection_optimism(configs: dict[str, Seeds]) -> dict[str, Any] | None:
    """How much picking the lowest of ``configs`` on the one validation set flatters it.

    An estimate: were the k configurations equally good, the chosen one's reported mean over n
    seeds would sit below its expected loss by about s / sqrt(n) * E[max of k standard
    normals], where s is the noise of one run's loss. Two estimates of s from the records:
    ``sd_total``, the pooled seed-to-seed standard deviation within each configuration, and
    ``sd_interaction``, the part of it that is not shared by all configurations at the same seed
    (the residual of seed + configuration on the configurations run on every seed): shared
    sampling and noise seeds move every configuration together and do not bias the choice.
    Neither counts the noise of the 256 fixed validation records, which the records cannot
    measure. None with fewer than two configurations of two seeds or more.
    """
    full = {n: sel for n, sel in configs.items() if len(sel) > 1}
    if len(full) < 2:
        return None
    sds = [statistics.stdev(val_losses(sel)) for sel in full.values()]
    sd_total = math.sqrt(statistics.fmean(sd * sd for sd in sds))
    seeds = sorted(set.intersection(*(set(sel) for sel in full.values())))
    table = [[sel[s]["val_loss"] for s in seeds] for sel in full.values()]
    sd_interaction = None
    if len(seeds) > 1:
        grand = statistics.fmean(v for row in table for v in row)
        rows = [statistics.fmean(row) for row in table]
        cols = [statistics.fmean(col) for col in zip(*table, strict=True)]
        resid = [
            v - rows[i] - cols[j] + grand for i, row in enumerate(table) for j, v in enumerate(row)
        ]
        dof = (len(table) - 1) * (len(seeds) - 1)
        sd_interaction = math.sqrt(sum(x * x for x in resid) / dof)
    n = max(len(sel) for sel in full.values())
    k = len(configs)
    e_max = expected_max_normal(k)
    return {
        "k": k,
        "n": n,
        "configurations": sorted(configs),
        "sd_total": sd_total,
        "sd_interaction": sd_interaction,
        "e_max": e_max,
        "optimism_total": sd_total / math.sqrt(n) * e_max,
        "optimism_interaction": None
        if sd_interaction is None
        else sd_interaction / math.sqrt(n) * e_max,
    }


def epsilon8_configs(
    runs: list[dict[str, Any]], clip_runs: list[dict[str, Any]]
) -> dict[str, Seeds]:
    """Every private slm configuration compared at epsilon 8, as each was reported: the study's
    variants at their tuned rates and the supplement's clip settings (EMA weights), minus the
    supplement's repeats of study runs (``pq-0.2`` is ``dp-adam-ac``)."""
    tuned = tuned_rates(runs)
    configs = {
        v: sel
        for v in sorted(VARIANTS)
        if VARIANTS[v].private and (sel := select(runs, tuned, "slm", v, EPS_MAIN))
    }
    for r in clip_runs:
        name = r.get("setting")
        if r["model"] != "slm" or r["epsilon"] != EPS_MAIN or r.get("weights") != "ema":
            continue
        if name in ("pq-0.2", "fixed-1"):  # the study's dp-adam-ac and dp-adam-ac-fixed-clip
            continue
        configs.setdefault(f"clip {name}", {})[r["seed"]] = r
    return configs


def seed0_luck(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Rates were chosen on seed 0: per (model, family), seed 0's loss at the chosen rate minus
    the mean of the other seeds there (negative: seed 0, which chose the rate, was luckier)."""
    tuned = tuned_rates(runs)
    per = {}
    for (model, family), _ in sorted(tuned.items()):
        sel = select(runs, tuned, model, family, None if not VARIANTS[family].private else EPS_MAIN)
        others = [r["val_loss"] for s, r in sel.items() if s != 0]
        if 0 in sel and others:
            per[(model, family)] = sel[0]["val_loss"] - statistics.fmean(others)
    if not per:
        return None
    return {"per_family": per, "mean": statistics.fmean(per.values())}


def late_fall(sel: Seeds, last: int = 50) -> list[float]:
    """Per seed: the validation loss ``last`` steps before the end minus the final loss (how much
    it still fell; negative = it rose). Seeds whose curve has no point there are skipped."""
    out = []
    for _, run in sorted(sel.items()):
        curve = _curve(run)
        end = max(curve)
        if end - last in curve:
            out.append(curve[end - last] - curve[end])
    return out


def late_falls(
    runs: list[dict[str, Any]], clip_runs: list[dict[str, Any]], last: int = 50
) -> dict[tuple[str, str], list[float]]:
    """``late_fall`` of every epsilon-8 (or non-private) variant of each model at its tuned rate,
    plus the shipped recipe where only the supplement has it (the twin)."""
    tuned = tuned_rates(runs)
    out = {}
    for model in sorted({r["model"] for r in runs}):
        for v in sorted(VARIANTS):
            eps = EPS_MAIN if VARIANTS[v].private else None
            sel = select(runs, tuned, model, v, eps)
            if v == SHIPPED and not sel:
                sel = shipped_runs(runs, clip_runs, model, EPS_MAIN)
            if sel and (falls := late_fall(sel, last)):
                out[(model, v)] = falls
    return out


def gain_fractions(data: dict[str, Any], model: str, sel: Seeds) -> dict[str, float] | None:
    """The mean final loss of ``sel`` against ``model``'s non-private runs and starting points.

    ``from_start``: (start - loss) / (start - non-private), the fraction of the non-private
    run's gain from the pretrained model; ``from_uniform``: the same measured from ln(vocabulary
    size), the loss of the uniform distribution (a model worse than that has format to learn
    first); ``gap``: nats above the non-private run and ``perplexity_ratio`` = exp(gap).
    """
    runs, setup = data["runs"], data["setup"]
    ceiling = val_losses(select(runs, tuned_rates(runs), model, "nonprivate", None))
    info = setup["models"].get(model, {})
    if not sel or not ceiling or "vocab_size" not in info:
        return None
    loss, best = statistics.fmean(val_losses(sel)), statistics.fmean(ceiling)
    start, uniform = info["pretrained_val_loss"], math.log(info["vocab_size"])
    return {
        "loss": loss,
        "nonprivate": best,
        "start": start,
        "uniform": uniform,
        "vocab_size": info["vocab_size"],
        "from_start": (start - loss) / (start - best),
        "from_uniform": (uniform - loss) / (uniform - best),
        "gap": loss - best,
        "perplexity_ratio": math.exp(loss - best),
    }


def ema_cap(steps: int) -> dict[str, float]:
    """The shipped EMA decay d and the decay the warm-up min(d, (1+t)/(10+t)) leaves in effect
    at the last of ``steps`` optimizer steps (t = steps - 1)."""
    from lit_dp.callbacks.ema import EMAWeights, ema_decay

    default = inspect.signature(EMAWeights).parameters["decay"].default
    return {"default": default, "at_end": ema_decay(steps - 1, decay=default)}


def first_step_at(decay: float) -> int:
    """The first optimizer step t (0-based) at which the warm-up lets ``decay`` act:
    (1 + t) / (10 + t) >= decay."""
    return max(0, math.ceil((10 * decay - 1) / (1 - decay) - 1e-9))  # 1e-9: float rounding


def rate_multipliers(runs: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Per variant: the range of (lr in effect / the run's base lr) over every traced step of its
    private runs. (1, 1): a constant rate."""
    out: dict[str, tuple[float, float]] = {}
    for r in runs:
        ratios = [p["lr"] / r["lr"] for p in r.get("trace", []) if p.get("lr") is not None]
        if not ratios or r.get("derived_from"):
            continue
        low, high = out.get(r["variant"], (math.inf, -math.inf))
        out[r["variant"]] = (min(low, *ratios), max(high, *ratios))
    return out


def _lead_lines(runs: list[dict[str, Any]], clip_runs: list[dict[str, Any]]) -> list[str]:
    """The shipped recipe against DP-SGD: EMA apart at epsilon 8, and per epsilon."""
    out = []
    lead = ema_lead(runs)
    if lead:
        out.append(
            f"- **EMA carries the shipped recipe's lead over DP-SGD at epsilon {EPS_MAIN:g}**: "
            f"shipped - dp-sgd {fmt_paired(lead['shipped_minus_sgd'])}; dp-adamw (the "
            "recipe's training, raw weights; the same training trace on every seed: "
            f"{'yes' if lead['same_training'] else 'no'}) - dp-sgd "
            f"{fmt_paired(lead['adamw_minus_sgd'])}; EMA alone (shipped - dp-adamw) "
            f"{fmt_paired(lead['ema'])}. DP-SGD's evaluated weights: "
            f"{', '.join(lead['sgd_weights'])}."
        )
    for row in rising_runs(runs):
        seeds = row["seeds"]
        cells = "; ".join(
            f"seed {m['seed']}: lowest {m['best']:.3f} at step {m['step']}, final {m['final']:.3f}"
            for m in seeds
        )
        out.append(
            f"- **{row['model']} {row['variant']} at epsilon {row['epsilon']:g}** (its rate "
            f"tuned at {EPS_MAIN:g}): validation loss lowest before the end on every seed "
            f"({cells}); mean rise to the end {statistics.fmean(m['rise'] for m in seeds):.3f}."
        )
    tuned = tuned_rates(runs)
    for eps in sorted({r["epsilon"] for r in runs if r["epsilon"] not in (None, EPS_MAIN)}):
        ours = shipped_runs(runs, clip_runs, "slm", eps)
        sgd = select(runs, tuned, "slm", "dp-sgd", eps)
        if ours and sgd:
            best = {m["seed"]: {"val_loss": m["best"]} for m in curve_minima(sgd)}
            out.append(
                f"- slm at epsilon {eps:g}: shipped - dp-sgd "
                f"{fmt_paired(paired_stats(ours, sgd))}; shipped - dp-sgd's lowest point on "
                f"its curve (chosen with hindsight) {fmt_paired(paired_stats(ours, best))}."
            )
    return out


def _selection_lines(runs: list[dict[str, Any]], clip_runs: list[dict[str, Any]]) -> list[str]:
    """The optimism of choosing on the validation set."""
    out = []
    opt = selection_optimism(epsilon8_configs(runs, clip_runs))
    if opt:
        inter = (
            ""
            if opt["optimism_interaction"] is None
            else f"; with the part of it not shared by the configurations at a seed, s = "
            f"{opt['sd_interaction']:.3f}: {opt['optimism_interaction']:.3f} nats"
        )
        out.append(
            f"- **No test split.** Choosing the lowest of k = {opt['k']} private configurations "
            f"at epsilon {EPS_MAIN:g} on the same validation records flatters the chosen one's "
            f"mean over n = {opt['n']} seeds by about s / sqrt(n) x E[max of k standard "
            f"normals] (E = {opt['e_max']:.3f}) if they were equally good: with the pooled "
            f"seed-to-seed sd s = {opt['sd_total']:.3f}, {opt['optimism_total']:.3f} nats{inter}."
            " An estimate; the noise of the fixed validation records is not in it."
        )
    luck = seed0_luck(runs)
    if luck:
        cells = ", ".join(f"{m} {f} {d:+.3f}" for (m, f), d in luck["per_family"].items())
        out.append(
            "- Rates chosen on seed 0: seed 0's loss at the chosen rate minus the other seeds' "
            f"mean: {cells}; mean {luck['mean']:+.3f}."
        )
    return out


def _training_lines(data: dict[str, Any], clip_runs: list[dict[str, Any]]) -> list[str]:
    """Run length, schedule, batch, and what the gains measure."""
    runs, setup = data["runs"], data["setup"]
    out = []
    mult = rate_multipliers(runs)
    if mult:
        const = sorted(v for v, (lo, hi) in mult.items() if lo == hi == 1.0)
        moved = "; ".join(
            f"{v} {lo:.2f} to {hi:.2f}" for v, (lo, hi) in sorted(mult.items()) if v not in const
        )
        out.append(
            "- Learning rate / base rate over the traced steps: constant (no schedule) for "
            + ", ".join(const)
            + (f"; moved only by the clip-driven multiplier: {moved}" if moved else "")
            + "."
        )
    out.append(
        f"- Batch: E[B] = {setup['expected_batch_size']:g} (q = {setup['sample_rate']:.4g}) of "
        f"N = {setup['num_train']}, {setup['steps']} steps."
    )
    tuned = tuned_rates(runs)
    for model in ("slm", "bitnet"):
        for v in (SHIPPED, "dp-sgd"):
            sel = (
                shipped_runs(runs, clip_runs, model, EPS_MAIN)
                if v == SHIPPED
                else select(runs, tuned, model, v, EPS_MAIN)
            )
            g = gain_fractions(data, model, sel)
            if g:
                out.append(
                    f"- {model} {v} at epsilon {EPS_MAIN:g}: {g['loss']:.3f} against the "
                    f"non-private {g['nonprivate']:.3f}: **{g['gap']:+.3f} nats** above it "
                    f"(perplexity x {g['perplexity_ratio']:.2f}); fraction of the non-private "
                    f"gain from the pretrained start ({g['start']:.3f}) {g['from_start']:.1%}, "
                    f"from uniform over the {g['vocab_size']} tokens (ln {g['vocab_size']} = "
                    f"{g['uniform']:.3f}) {g['from_uniform']:.1%}."
                )
    return out


def _wording_lines(data: dict[str, Any], clip_runs: list[dict[str, Any]]) -> list[str]:
    """EMA decay in effect, which runs had EMA, which clip rules ran, fixed against adaptive."""
    runs, setup = data["runs"], data["setup"]
    out = []
    cap = ema_cap(setup["steps"])
    decays = sorted({float(d) for r in runs for d in r.get("val_loss_ema_decays", {})})
    if decays:
        starts = ", ".join(
            f"{d:g} from step {first_step_at(d)}"
            if first_step_at(d) < setup["steps"]
            else f"{d:g} not within the run"
            for d in decays
        )
        never = (
            f", so {cap['default']:g} was never in effect" if cap["at_end"] < cap["default"] else ""
        )
        out.append(
            f"- EMA decay: the warm-up caps the default {cap['default']:g} at "
            f"{cap['at_end']:.4f} at the last of {setup['steps']} steps{never}; the swept decays "
            f"act from a step on ({starts})."
        )
    weights = sorted({r["weights"] for r in runs if not VARIANTS[r["variant"]].private})
    if weights:
        out.append(f"- Non-private runs' evaluated weights: {', '.join(weights)}.")
    rules = sorted({r["clipping"] for r in [*runs, *clip_runs] if r.get("clipping")})
    out.append(f"- Clip-bound rules run: {', '.join(rules)}.")
    adaptive = best_adaptive(runs, clip_runs)
    if adaptive:
        name, stats = adaptive
        out.append(
            f"- Fixed clip against the best adaptive setting ({name}): shipped - {name} "
            f"{fmt_paired(stats)}."
        )
    return out


def _late_fall_table(runs: list[dict[str, Any]], clip_runs: list[dict[str, Any]]) -> list[str]:
    falls = late_falls(runs, clip_runs)
    if not falls:
        return []
    out = [
        "",
        f"Fall of the validation loss in the last 50 steps (loss 50 steps before the end minus "
        f"the final loss; epsilon {EPS_MAIN:g} or non-private, tuned rates; positive = still "
        "falling):",
        "",
        "| model | variant | seeds | mean | range |",
        "|---|---|---:|---:|---:|",
    ]
    out += [
        f"| {m} | {v} | {len(d)} | {statistics.fmean(d):+.3f} | {min(d):+.3f} to {max(d):+.3f} |"
        for (m, v), d in falls.items()
    ]
    return out


def section(data: dict[str, Any], clip_runs: list[dict[str, Any]] | None = None) -> str:
    """The limits as Markdown, each computed from the records; items whose runs are missing
    (e.g. the smoke recipe's) are left out."""
    clip_runs = clip_runs or []
    runs = data["runs"]
    seeds = max((len(s) for s in epsilon8_configs(runs, clip_runs).values()), default=0)
    lines = [
        "What this study does not show (every number recomputed from the records; Δ = mean "
        f"paired difference over n = {seeds} seeds with the 95% Student-t interval of the "
        "paired per-seed differences):",
        "",
        *_lead_lines(runs, clip_runs),
        *_selection_lines(runs, clip_runs),
        *_training_lines(data, clip_runs),
        *_wording_lines(data, clip_runs),
        *_late_fall_table(runs, clip_runs),
    ]
    return "\n".join(lines)


def best_adaptive(
    runs: list[dict[str, Any]], clip_runs: list[dict[str, Any]]
) -> tuple[str, Stats | None] | None:
    """The adaptive (private-quantile) setting with the lowest mean at epsilon 8 among those
    run on as many seeds as the shipped recipe, and the shipped recipe's paired difference to
    it. None without such a setting."""
    shipped = shipped_runs(runs, clip_runs, "slm", EPS_MAIN)
    configs = epsilon8_configs(runs, clip_runs)
    candidates = {
        name: sel
        for name, sel in configs.items()
        if len(sel) == len(shipped)
        and all(r.get("clipping") == "private_quantile" for r in sel.values())
        and all(r.get("weights") == "ema" for r in sel.values())
    }
    if not shipped or not candidates:
        return None
    name = min(candidates, key=lambda n: statistics.fmean(val_losses(candidates[n])))
    return name, paired_stats(shipped, candidates[name])
