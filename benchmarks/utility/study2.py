"""Utility study 2: the best model per epsilon at equal compute, judged on an untouched test split.

One organism (study 1's ``slm``, weights pinned by hash), the private ``records`` data with a
512-record test split that no choice looks at, and every run through lit_dp's public API. It
compares, at epsilon 2 and 8 and at equal compute (the same number of example-gradients):
- methods: DP-AdamW (the shipped recipe: fixed C below the gradient norms, i.e. normalized),
  DP-SGD with momentum 0.9 (same clipping), banded-MF correlated noise on DP-AdamW (b from the
  planner rule b ~ epsilon sqrt(n) / k, and b / 2 and 2 b beside it), and non-private AdamW;
- EMA or not: every run evaluates its EMA and its raw weights (EMA is post-processing, so one
  run gives both; each is tuned and reported on its own);
- schedules: a constant rate, and cosine decay to 0;
- compute allocations: E[B] x steps at a fixed number of example-gradients.

Phases (a pure function of the results file, so rerunning continues the study):
  1. learning rates, seed 0, per setting (method, schedule, allocation, epsilon, bands): a
     half-decade grid of 3, grown by one point past an edge where the best (EMA or raw) sits,
     at most twice per side;
  2. seeds 1 and 2 at each setting's tuned rates (the best by validation for EMA and for raw).
Selection uses validation losses only; ``test_loss`` is recorded for every run and read only by
the report.

    python -m benchmarks.utility.study2 --plan          # the run list and its CPU estimate
    nohup nice python -m benchmarks.utility.study2 --threads 1 > u2.log 2>&1 &   # run / continue
    python -m benchmarks.utility.study2 --report        # tables + plots from the results file
    python -m benchmarks.utility.study2 --design quick --out /tmp/u2.json  # smoke run: tiny model

Results: benchmarks/results/utility2.json, one record per (run, weights); each finished run is
appended atomically and a run already in the file is skipped. Records from another commit than
the file's first are refused (``--allow-mixed-commits`` to override; each record keeps its
commit).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.common import CODE_PATHS, RESULTS, build_trainer, git_commit, provenance
from benchmarks.common.results import (
    claim_alive,
    claims_path,
    load_results,
    new_claim,
    release_claim,
    results_lock,
    write_atomic,
)

METHODS = ("dp-adamw", "dp-sgd", "bandmf", "nonprivate")
SCHEDULES = ("constant", "cosine")


# --- the study's design ----------------------------------------------------------------------
@dataclass(frozen=True)
class Design:
    name: str
    organism: str  # directory under results/organisms (or a path)
    organism_sha256: str | None  # pinned weights; None = not checked (quick)
    num_train: int = 4000
    num_val: int = 256
    num_test: int = 512
    data_seed: int = 0
    max_length: int = 128
    eval_batch_size: int = 64
    max_physical_batch_size: int = 128
    max_grad_norm: float = 1.0
    example_gradients: int = 38400  # E[B] x steps of every private run
    batch_sizes: tuple[int, ...] = (64, 128, 256)  # allocations: steps = example_gradients / E[B]
    epsilons: tuple[float, ...] = (2.0, 8.0)
    evaluations: int = 10  # validation points per run (plus step 0)
    seeds: tuple[int, ...] = (0, 1, 2)
    grid_center: dict[str, float] = field(default_factory=dict)
    max_extensions: int = 2
    cpu_seconds_per_example_gradient: float = 0.0175  # --plan estimate (one thread)

    def steps(self, batch_size: int) -> int:
        return self.example_gradients // batch_size

    def identity(self) -> dict[str, Any]:
        skip = {"seeds", "grid_center", "max_extensions", "cpu_seconds_per_example_gradient"}
        return json.loads(json.dumps({k: v for k, v in asdict(self).items() if k not in skip}))


DESIGNS = {
    "cpu": Design(
        name="cpu",
        organism="slm-a4c8a8ed5d2c",
        organism_sha256="a2a1e0f213c66c76941aaf2162265cc555f650078a722d1ee47463cccc8ee6d8",
        # study 1's tuned rates (epsilon 8, E[B] 64): Adam 1e-3, DP-SGD 0.1
        grid_center={"dp-adamw": 1e-3, "bandmf": 1e-3, "nonprivate": 1e-3, "dp-sgd": 0.1},
    ),
    "quick": Design(
        name="quick",
        organism="quick",
        organism_sha256=None,
        num_train=96,
        num_val=8,
        num_test=8,
        max_length=160,
        eval_batch_size=8,
        example_gradients=96,
        batch_sizes=(16, 32),
        epsilons=(8.0,),
        evaluations=2,
        seeds=(0, 1),
        grid_center={"dp-adamw": 3e-3, "bandmf": 3e-3, "nonprivate": 3e-3, "dp-sgd": 0.3},
        max_extensions=0,
    ),
}


@dataclass(frozen=True)
class Setting:
    """What a learning rate is tuned for."""

    method: str
    schedule: str
    batch_size: int
    epsilon: float | None  # None: non-private
    bands: int = 1


@dataclass(frozen=True)
class Spec:
    phase: int
    setting: Setting
    seed: int
    lr: float


def spec_key(setting: Setting, seed: int, lr: float) -> str:
    s = setting
    return f"{s.method}|{s.schedule}|{s.batch_size}|{s.epsilon}|{s.bands}|{seed}|{lr:.4g}"


def record_key(r: dict[str, Any]) -> str:
    s = Setting(
        r["method"], r["lr_schedule"], int(r["expected_batch_size"]), r["epsilon"], r["bands"]
    )
    return spec_key(s, r["seed"], r["lr"])


def suggested_bands(design: Design, batch_size: int, epsilon: float) -> int:
    """lit_dp's planner rule b ~ epsilon sqrt(n) / k, within b E[B] <= N (cyclic groups)."""
    from lit_dp.privacy.bandmf import suggest_bands

    steps = design.steps(batch_size)
    return suggest_bands(
        epsilon=epsilon,
        steps=steps,
        epochs=steps * batch_size / design.num_train,
        max_bands=max(1, design.num_train // batch_size),
    )


def lr_grid(center: float, points: int = 3) -> list[float]:
    half = points // 2
    return [float(f"{center * 10 ** (0.5 * (i - half)):.3g}") for i in range(points)]


def _step(lr: float, k: int) -> float:
    return float(f"{lr * 10 ** (0.5 * k):.3g}")


# --- the plan: a pure function of the design and the finished runs --------------------------
def settings(design: Design, runs: list[dict[str, Any]]) -> list[tuple[Setting, Setting | None]]:
    """Every setting, in the order they run, each with the setting whose tuned rates it borrows
    (None = tuned on its own). Later blocks appear once the choices they follow are settled.

    M. methods at the middle allocation, each epsilon: DP-AdamW and DP-SGD, constant and cosine;
       non-private AdamW, constant and cosine (the same-compute reference);
    A. allocations: DP-AdamW at the other E[B] x steps, each epsilon, with the schedule that won
       block M for DP-AdamW at that epsilon; non-private at the other allocations with its
       block-M schedule;
    B. banded MF on DP-AdamW at the allocation and schedule that won blocks M + A at each
       epsilon: the planner's b (tuned) and b / 2, 2 b (at the planner b's tuned rates).
    """
    mid = design.batch_sizes[len(design.batch_sizes) // 2]
    others = [b for b in design.batch_sizes if b != mid]
    eps_order = sorted(design.epsilons, reverse=True)
    out: list[tuple[Setting, Setting | None]] = []
    for eps in eps_order:
        for method in ("dp-adamw", "dp-sgd"):
            for sch in SCHEDULES:
                out.append((Setting(method, sch, mid, eps), None))
    for sch in SCHEDULES:
        out.append((Setting("nonprivate", sch, mid, None), None))
    for eps in eps_order:
        sch = _winner(design, runs, [Setting("dp-adamw", x, mid, eps) for x in SCHEDULES])
        if sch is not None:
            out += [(Setting("dp-adamw", sch.schedule, bs, eps), None) for bs in others]
    sch = _winner(design, runs, [Setting("nonprivate", x, mid, None) for x in SCHEDULES])
    if sch is not None:
        out += [(Setting("nonprivate", sch.schedule, bs, None), None) for bs in others]
    for eps in eps_order:
        m = _winner(design, runs, [Setting("dp-adamw", x, mid, eps) for x in SCHEDULES])
        if m is None:
            continue
        best = _winner(design, runs, [replace(m, batch_size=bs) for bs in design.batch_sizes])
        if best is None:
            continue
        b = suggested_bands(design, best.batch_size, eps)
        cap = max(1, design.num_train // best.batch_size)
        planner = replace(best, method="bandmf", bands=b)
        if b >= 2:
            out.append((planner, None))
        for nb in sorted({max(2, b // 2), min(cap, 2 * b)} - {b}):
            if 2 <= nb <= cap:
                out.append((replace(planner, bands=nb), planner))
    return out


def _seed0(runs: list[dict[str, Any]], s: Setting, ema: bool) -> dict[float, float]:
    return {
        r["lr"]: r["val_loss"]
        for r in runs
        if r["seed"] == 0 and r["ema"] == ema and record_key(r).startswith(_prefix(s))
    }


def _prefix(s: Setting) -> str:
    return f"{s.method}|{s.schedule}|{s.batch_size}|{s.epsilon}|{s.bands}|"


def tuned(design: Design, runs: list[dict[str, Any]], s: Setting) -> tuple[dict, list[float]]:
    """({ema: best lr} once the grid is settled, the next rates to try on seed 0)."""
    grid = lr_grid(design.grid_center[s.method])
    best: dict[bool, float] = {}
    todo: list[float] = []
    for ema in (True, False):
        losses = _seed0(runs, s, ema)
        missing = [lr for lr in grid if lr not in losses]
        if missing:
            return {}, missing
    # grow the grid past an edge where the best rate (EMA or raw) sits
    for ema in (True, False):
        losses = _seed0(runs, s, ema)
        tried = sorted(losses)
        finite = {lr: v for lr, v in losses.items() if math.isfinite(v)}
        if not finite:
            best[ema] = tried[0]
            continue
        lr_best = min(finite, key=finite.get)
        best[ema] = lr_best
        lo, hi = tried[0], tried[-1]
        low_ext = sum(1 for lr in tried if lr < min(grid))
        high_ext = sum(1 for lr in tried if lr > max(grid))
        if lr_best == lo and low_ext < design.max_extensions:
            todo.append(_step(lo, -1))
        if lr_best == hi and high_ext < design.max_extensions:
            todo.append(_step(hi, 1))
    todo = sorted(set(todo))
    return ({} if todo else best), todo


def _winner(design: Design, runs, candidates: list[Setting]) -> Setting | None:
    """The candidate with the lowest tuned seed-0 validation loss of its EMA weights, once every
    candidate's grid is settled; None before."""
    scores = {}
    for c in candidates:
        best, todo = tuned(design, runs, c)
        if todo or not best:
            return None
        scores[c] = _seed0(runs, c, True)[best[True]]
    return min(scores, key=scores.get)


def plan(design: Design, runs: list[dict[str, Any]]) -> list[Spec]:
    """The runs still to do, in order: seed-0 tuning (phase 1), then the other seeds at each
    setting's tuned rates (phase 2); a borrowing setting runs every seed at its lender's."""
    done = {record_key(r) for r in runs}
    out: list[Spec] = []
    for s, lender in settings(design, runs):
        if lender is None:
            best, todo = tuned(design, runs, s)
            out += [Spec(1, s, design.seeds[0], lr) for lr in todo]
            seeds = design.seeds[1:]
        else:
            best, todo = tuned(design, runs, lender)
            best = {} if todo else best
            seeds = design.seeds
        for lr in sorted(set(best.values())):
            out += [Spec(2, s, seed, lr) for seed in seeds]
    return [p for p in out if spec_key(p.setting, p.seed, p.lr) not in done]


# --- one run ------------------------------------------------------------------------------------
def organism_path(design: Design) -> Path:
    p = Path(design.organism)
    return p if p.is_absolute() else RESULTS / "organisms" / design.organism


def weights_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def train(design: Design, spec: Spec, organism: Path) -> list[dict[str, Any]]:
    """Fit one run; returns its two records (EMA weights, raw weights)."""
    import lightning as L
    import torch

    from lit_dp import (
        ClipDrivenLR,
        DPAdamW,
        DPCausalLM,
        EMAWeights,
        PrivacyAccounting,
        SyntheticDataModule,
    )
    from lit_dp.data import ConstantBatchSize
    from lit_dp.privacy.clipping import FixedClip
    from lit_dp.privacy.noise_mechanism import BandedMF

    s = spec.setting
    private = s.method != "nonprivate"
    steps = design.steps(s.batch_size)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    L.seed_everything(spec.seed, verbose=False)
    dm = SyntheticDataModule(
        tokenizer=str(organism),
        dataset="records",
        num_train=design.num_train,
        num_val=design.num_val,
        num_test=design.num_test,
        data_seed=design.data_seed,
        batch_schedule=ConstantBatchSize(float(s.batch_size)),
        sampling_seed=spec.seed,
        max_length=design.max_length,
        eval_batch_size=design.eval_batch_size,
    )
    optimizer = (
        partial(torch.optim.SGD, lr=spec.lr, momentum=0.9)
        if s.method == "dp-sgd"
        else partial(DPAdamW, lr=spec.lr)
    )
    module = DPCausalLM(
        model=str(organism),
        private=private,
        noise_multiplier="auto" if private else 0.0,
        clipping=FixedClip(design.max_grad_norm),
        noise_mechanism=BandedMF(bands=s.bands) if s.method == "bandmf" else None,
        optimizer=optimizer,
        noise_seed=spec.seed,
        max_physical_batch_size=design.max_physical_batch_size,
        eval_before_fit=True,
    )
    ema_weights = EMAWeights()  # the shipped decay; both weights are evaluated
    callbacks: list[Any] = [
        ema_weights,
        ClipDrivenLR(schedule=s.schedule, min_lr_ratio=0.0),
    ]
    accounting = PrivacyAccounting(target_epsilon=s.epsilon) if private else None
    if accounting is not None:
        callbacks.append(accounting)
    with tempfile.TemporaryDirectory(prefix="lit_dp_utility2_") as workdir:
        trainer = build_trainer(
            max_steps=steps,
            callbacks=callbacks,
            val_every=max(1, steps // design.evaluations),
            workdir=workdir,
        )
        start, cpu_start = time.time(), time.process_time()
        trainer.fit(module, datamodule=dm)
        seconds, cpu_seconds = time.time() - start, time.process_time() - cpu_start
        test = dm.test_dataloader()
        test_raw = module.evaluate_loss(test)
        with module.evaluation_weights():  # the EMA weights (installed by EMAWeights)
            test_ema = module.evaluate_loss(test)
            val_ema = module.evaluate_loss(dm.val_dataloader())
    # The test losses are of the weights the curves end with: the EMA shadow is swapped in.
    final_ema = next(h["loss_ema"] for h in reversed(module.val_history))
    if not math.isclose(val_ema, final_ema, rel_tol=1e-5) or test_ema == test_raw:
        raise RuntimeError(
            f"EMA weights not evaluated after fit (val {val_ema} vs {final_ema}; test "
            f"{test_ema} vs raw {test_raw})"
        )
    commit = git_commit(*CODE_PATHS)
    records = []
    for ema, test_loss in ((True, test_ema), (False, test_raw)):
        by_step: dict[int, float] = {}
        for h in module.val_history:
            by_step[int(h["step"])] = float(h["loss_ema" if ema else "loss_raw"])
        curve = [{"step": k, "loss": v} for k, v in sorted(by_step.items())]
        records.append(
            {
                "model": "slm" if design.name == "cpu" else design.name,
                "organism": organism.name,
                "method": s.method,
                "ema": ema,
                "lr_schedule": s.schedule,
                "lr": spec.lr,
                "epsilon": s.epsilon,
                "seed": spec.seed,
                "expected_batch_size": s.batch_size,
                "steps": int(trainer.global_step),
                "planned_steps": steps,
                "bands": s.bands,
                "noise_multiplier": float(module.noise_multiplier) if private else 0.0,
                "noise_per_step": (
                    float(module.noise_multiplier) * design.max_grad_norm / s.batch_size
                    if private
                    else 0.0
                ),
                "epsilon_spent": accounting.epsilon() if accounting else None,
                "delta": accounting.delta if accounting else None,
                "stop_reason": accounting.stop_reason if accounting else None,
                "val_loss": curve[-1]["loss"],
                "test_loss": test_loss,
                "val_loss_curve": curve,
                "phase": spec.phase,
                "commit": commit,
                "seconds": round(seconds, 1),
                "cpu_seconds": round(cpu_seconds, 1),
                "torch_threads": torch.get_num_threads(),
            }
        )
    return records


# --- the results file ---------------------------------------------------------------------------
def setup_record(design: Design, organism: Path) -> dict[str, Any]:
    info = (
        json.loads((organism / "organism.json").read_text())
        if (organism / "organism.json").exists()
        else {}
    )
    return {
        "organism": organism.name,
        "weights_sha256": weights_sha256(organism),
        "organism_info": info,
        "private_data": "synthetic records",
        "design": design.identity(),
        "steps_per_allocation": {str(b): design.steps(b) for b in design.batch_sizes},
        "planner_bands": {
            f"{b}x{design.steps(b)}@{e:g}": suggested_bands(design, b, e)
            for b in design.batch_sizes
            for e in design.epsilons
        },
        "ema": "EMAWeights() defaults: decay 0.999 with warm-up min(d, (1+t)/(10+t))",
        "schedules": {"constant": "base rate", "cosine": "cosine from the base rate to 0"},
        "clipping": f"FixedClip({design.max_grad_norm}) for every private method",
        "accounting": "PrivacyAccounting defaults (PLD, delta = min(1e-5, 1/N^1.1))",
    }


def open_results(path: Path, design: Design, organism: Path, allow_mixed: bool) -> None:
    commit = git_commit(*CODE_PATHS)
    with results_lock(path):
        data = load_results(path)
        if not data:
            data = {
                "_meta": {"provenance": provenance(*CODE_PATHS), "design": design.name},
                "setup": setup_record(design, organism),
                "runs": [],
            }
            write_atomic(path, data)
            return
        if data["setup"]["design"] != design.identity():
            raise SystemExit(f"{path} holds another design; use another --out")
        first = data["_meta"]["provenance"]["commit"]
        if commit != first and not allow_mixed:
            raise SystemExit(
                f"{path} was started at commit {first}, this checkout is {commit}: results must "
                "come from one commit (run from a worktree of it, or --allow-mixed-commits)"
            )


def claim_next(path: Path, design: Design) -> tuple[Spec | None, int]:
    with results_lock(path):
        runs = load_results(path)["runs"]
        claims = {k: c for k, c in load_results(claims_path(path)).items() if claim_alive(c)}
        todo = plan(design, runs)
        ready = [p for p in todo if spec_key(p.setting, p.seed, p.lr) not in claims]
        if ready:
            claims[spec_key(ready[0].setting, ready[0].seed, ready[0].lr)] = new_claim()
        write_atomic(claims_path(path), claims)
    return (ready[0] if ready else None), len(todo)


def append(path: Path, records: list[dict[str, Any]], key: str) -> None:
    with results_lock(path):
        data = load_results(path)
        have = {(record_key(r), r["ema"]) for r in data["runs"]}
        data["runs"].extend(r for r in records if (record_key(r), r["ema"]) not in have)
        write_atomic(path, data)
        claims = load_results(claims_path(path))
        claims.pop(key, None)
        write_atomic(claims_path(path), claims)


# --- CLI ----------------------------------------------------------------------------------------
def _hms(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def print_plan(design: Design, runs: list[dict[str, Any]]) -> None:
    todo = plan(design, runs)
    per = design.cpu_seconds_per_example_gradient * design.example_gradients
    done = {record_key(r) for r in runs}
    print(f"{len(done)} runs done; {len(todo)} runnable now (more appear as grids settle)")
    for p in todo:
        s = p.setting
        eps = "nonprivate" if s.epsilon is None else f"eps {s.epsilon:g}"
        b = f" b={s.bands}" if s.bands > 1 else ""
        print(
            f"  phase {p.phase}: {s.method}{b} {s.schedule} E[B]={s.batch_size} x "
            f"{design.steps(s.batch_size)} {eps} seed {p.seed} lr {p.lr:g}"
        )
    print(f"runnable now: ~{_hms(len(todo) * per)} CPU (one thread, {per:.0f} s per run)")


def quick_organism() -> Path:
    """Study 1's tiny smoke-run organism (built and cached on first use, about 10 s)."""
    from benchmarks.utility.organisms import build_organism, cache_root
    from benchmarks.utility.study1 import RECIPES

    return build_organism(RECIPES["quick"].organisms["slm"], cache_root())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--design", default="cpu", choices=sorted(DESIGNS))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--organism", type=Path, default=None, help="override the organism dir")
    ap.add_argument("--plan", action="store_true")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-runs", type=int, default=None)
    ap.add_argument("--allow-mixed-commits", action="store_true")
    args = ap.parse_args(argv)
    design = DESIGNS[args.design]
    if args.organism is not None:
        design = replace(design, organism=str(args.organism.resolve()))
    out = args.out or RESULTS / (
        "utility2.json" if design.name == "cpu" else f"utility2_{design.name}.json"
    )
    if args.report:
        from benchmarks.utility.study2_report import report

        report(out)
        return
    if args.plan:
        print_plan(design, load_results(out).get("runs", []))
        return
    import torch

    torch.set_num_threads(args.threads)
    organism = quick_organism() if design.name == "quick" else organism_path(design)
    if design.organism_sha256 and weights_sha256(organism) != design.organism_sha256:
        raise SystemExit(f"{organism}: weights differ from the pinned sha256")
    open_results(out, design, organism, args.allow_mixed_commits)
    n = 0
    while args.max_runs is None or n < args.max_runs:
        spec, left = claim_next(out, design)
        if spec is None:
            print(f"nothing runnable ({left} waiting on other workers' runs)", flush=True)
            break
        key = spec_key(spec.setting, spec.seed, spec.lr)
        print(
            f"[{time.strftime('%H:%M:%S')}] {key} (phase {spec.phase}; {left} runnable)", flush=True
        )
        try:
            records = train(design, spec, organism)
        except BaseException:
            release_claim(out, key)
            raise
        append(out, records, key)
        n += 1
        ema, raw = records
        print(
            f"    val {ema['val_loss']:.4f} (EMA) {raw['val_loss']:.4f} (raw); "
            f"sigma {ema['noise_multiplier']:.4g}; {ema['cpu_seconds']:.0f} CPU s",
            flush=True,
        )


if __name__ == "__main__":
    main()
