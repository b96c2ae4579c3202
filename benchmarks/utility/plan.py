"""The utility study's plan: recipes' shape, run keys, learning-rate grids and the phases.

``plan(recipe, runs)`` is a pure function of the recipe and the runs already in the results file,
so the study continues wherever it stopped: tuning grids grow at an edge that holds the best
rate, and later phases get each family's tuned rate once its grid is complete.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from benchmarks.utility.organisms import OrganismConfig
from benchmarks.utility.train import VARIANTS

EPS_MAIN = 8.0


def half_decades(rate: float, steps: int) -> float:
    """The rate ``steps`` half-decades from ``rate`` on the lattice {1, 3.16} x 10^n."""
    k = round(2 * math.log10(rate)) + steps
    return float(f"{10 ** (k / 2):.3g}")


def lr_grid(center: float, points: int = 3) -> tuple[float, ...]:
    """``points`` half-decade-spaced rates centred on ``center``."""
    return tuple(half_decades(center, i - points // 2) for i in range(points))


@dataclass(frozen=True)
class Recipe:
    """One study: organisms, private data, run length and the phases' grids."""

    name: str
    organisms: dict[str, OrganismConfig]
    results: str
    num_train: int = 4000
    num_val: int = 256
    data_seed: int = 0
    expected_batch_size: float = 64.0
    steps: int = 300
    val_every: int = 50
    max_length: int = 128
    eval_batch_size: int = 64
    max_physical_batch_size: int = 128
    max_grad_norm: float = 1.0
    target_clip_rate: float = 0.2
    lora_rank: int = 0
    lora_alpha: float = 16.0
    accelerator: str = "cpu"
    trace_every: int = 10
    # Within 300 steps the warm-up min(d, (1+t)/(10+t)) caps every decay >= 0.971, so larger
    # decays equal the shipped default there; these are the ones that differ.
    ema_sweep: tuple[float, ...] = (0.8, 0.9, 0.95)
    seeds: tuple[int, ...] = (0, 1, 2)
    families: tuple[str, ...] = ("dp-adam-ac", "dp-adamw", "dp-sgd", "nonprivate")
    ablations: tuple[str, ...] = ("dp-adam-ac-no-clip-lr", "dp-adam-ac-fixed-clip", "dp-adambc")
    curve_families: tuple[str, ...] = ("dp-adam-ac", "dp-sgd")
    curve_epsilons: tuple[float, ...] = (1.0, 2.0, 4.0)
    bitnet_families: tuple[str, ...] = ("dp-adam-ac", "dp-sgd", "nonprivate")
    # (model, family) -> starting grid; "*" = any model
    grids: dict[tuple[str, str], tuple[float, ...]] = field(default_factory=dict)
    max_extensions: int = 2  # per side of a grid
    seconds_per_run: dict[str, float] = field(default_factory=dict)  # --plan estimate per model

    def grid(self, model: str, family: str) -> tuple[float, ...]:
        return self.grids.get((model, family)) or self.grids[("*", family)]

    def identity(self) -> dict[str, Any]:
        """What makes two results files the same study (checked before appending)."""
        skip = {
            "seeds",
            "grids",
            "max_extensions",
            "seconds_per_run",
            "families",
            "ablations",
            "curve_families",
            "curve_epsilons",
            "bitnet_families",
            "accelerator",
        }
        out = {k: v for k, v in asdict(self).items() if k not in skip and k != "organisms"}
        out["organisms"] = {m: c.key() for m, c in self.organisms.items()}
        return json.loads(json.dumps(out))


# --- the plan: a pure function of the recipe and the finished runs ------------------------------
@dataclass(frozen=True)
class RunSpec:
    phase: int
    model: str
    variant: str
    epsilon: float | None
    seed: int
    lr: float | None  # None: the family's rate is not tuned yet


def run_key(model: str, variant: str, epsilon: float | None, seed: int, lr: float | None) -> str:
    eps = None if epsilon is None else float(epsilon)
    return json.dumps([model, variant, eps, int(seed), None if lr is None else float(lr)])


def spec_key(spec: RunSpec) -> str:
    return run_key(spec.model, spec.variant, spec.epsilon, spec.seed, spec.lr)


def record_key(run: dict[str, Any]) -> str:
    return run_key(run["model"], run["variant"], run["epsilon"], run["seed"], run["lr"])


def tuned_grid(
    grid: tuple[float, ...], losses: dict[float, float], *, max_extensions: int
) -> tuple[list[float], float | None]:
    """The grid grown at an edge that holds the best loss, and the best rate once all is run.

    ``losses``: final validation loss per rate already run (seed 0). Each extension adds the next
    half-decade point beyond that edge, at most ``max_extensions`` per side. Returns
    (rates to run, best rate or None while some rate of the grid has no result yet).
    """
    rates = sorted(grid)
    low = high = 0
    while True:
        if any(r not in losses for r in rates):
            return rates, None
        best = min(rates, key=lambda r: (losses[r], r))
        if len(rates) > 1 and best == rates[0] and low < max_extensions:
            rates.insert(0, half_decades(rates[0], -1))
            low += 1
        elif len(rates) > 1 and best == rates[-1] and high < max_extensions:
            rates.append(half_decades(rates[-1], 1))
            high += 1
        else:
            return rates, best


def _eps(variant: str, epsilon: float = EPS_MAIN) -> float | None:
    return None if not VARIANTS[variant].private else epsilon


def plan(recipe: Recipe, runs: list[dict[str, Any]]) -> list[RunSpec]:
    """Every training of the study in phase order (derived variants are not trainings)."""
    seed0, rest = recipe.seeds[0], recipe.seeds[1:]
    finals = {record_key(r): r["val_loss"] for r in runs}
    tuned: dict[tuple[str, str], float | None] = {}
    specs: list[RunSpec] = []

    def tune(phase: int, model: str, family: str) -> None:
        losses = {}
        for lr in _candidate_rates(recipe, model, family):
            key = run_key(model, family, _eps(family), seed0, lr)
            if key in finals:
                losses[lr] = finals[key]
        rates, best = tuned_grid(
            recipe.grid(model, family), losses, max_extensions=recipe.max_extensions
        )
        specs.extend(RunSpec(phase, model, family, _eps(family), seed0, lr) for lr in rates)
        tuned[(model, family)] = best

    for family in recipe.families:
        tune(1, "slm", family)
    for family in recipe.families:
        specs.extend(
            RunSpec(2, "slm", family, _eps(family), s, tuned[("slm", family)]) for s in rest
        )
    for variant in recipe.ablations:
        lr = tuned.get(("slm", VARIANTS[variant].lr_family))
        specs.extend(RunSpec(3, "slm", variant, _eps(variant), s, lr) for s in recipe.seeds)
    for family in recipe.curve_families:
        for eps in recipe.curve_epsilons:
            specs.extend(
                RunSpec(4, "slm", family, eps, s, tuned[("slm", family)]) for s in recipe.seeds
            )
    if "bitnet" in recipe.organisms:
        for family in recipe.bitnet_families:
            tune(5, "bitnet", family)
        for family in recipe.bitnet_families:
            specs.extend(
                RunSpec(5, "bitnet", family, _eps(family), s, tuned[("bitnet", family)])
                for s in rest
            )
    return specs


def _candidate_rates(recipe: Recipe, model: str, family: str) -> list[float]:
    """The grid and every point an extension can add (what a seed-0 result may be keyed by)."""
    rates = sorted(recipe.grid(model, family))
    low, high = [rates[0]], [rates[-1]]
    for _ in range(recipe.max_extensions):
        low.append(half_decades(low[-1], -1))
        high.append(half_decades(high[-1], 1))
    return sorted(set(rates + low + high))
