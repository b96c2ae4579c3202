"""The paper's experiments at CPU scale: loss vs steps per noise level, and an ablation.

(1) Figures 1-2 analogue: EMA validation loss vs optimizer step for sigma in {0 (non-private),
    0.5, 1, 2} for a small LM (SmolLM2-135M-Instruct, LoRA adapters) and its BitNet b1.58
    version (the same checkpoint with every Linear but lm_head made a ternary QAT layer, all
    weights trained), on both synthetic datasets. One PNG per dataset, one panel per model.
(2) Ablation at a fixed epsilon (noise_multiplier "auto" calibrated to --epsilon over the planned
    steps), small LM: DP-Adam-AC, then each part switched off in turn (adaptive clipping, EMA,
    clip-driven LR), second-moment correction switched on, DP-AdamW with a fixed clip, DP-SGD.

Every run goes through the public API (DPCausalLM, SyntheticDataModule and the EMA, clip-LR and
accounting callbacks); every epsilon comes from PrivacyAccounting's RDP accountant.

    python -m benchmarks.utility.paper_figures            # CPU default: everything, ~35 min
    python -m benchmarks.utility.paper_figures --datasets records --parts ablation   # one piece
    python -m benchmarks.utility.paper_figures --report   # tables from the JSON files
    python -m benchmarks.utility.paper_figures --quick --out /tmp/pf  # smoke run: tiny models
    python -m benchmarks.utility.paper_figures --full     # full-size GPU recipe (not run here)

Outputs in --out: paper_figures_<dataset>.json, paper_fig_<dataset>.png,
paper_ablation_<dataset>.json; each JSON records the git commit that produced it.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch

from benchmarks.common import RESULTS, build_trainer, provenance
from lit_dp import (
    ClipDrivenLR,
    DPAdamW,
    DPCausalLM,
    EMAWeights,
    PrivacyAccounting,
    SyntheticDataModule,
)
from lit_dp.data import ConstantBatchSize
from lit_dp.privacy.clipping import ClipBoundEstimator, FixedClip, PrivateQuantile

SIGMAS = (0.0, 0.5, 1.0, 2.0)
C0 = 1.0  # the clip bound at step 0 (fixed clipping keeps it)
DATASETS = ("emails", "records")

# Each recipe: the model sizes and run lengths; "lm"/"bitnet" are DPCausalLM overrides.
RECIPES: dict[str, dict[str, Any]] = {
    "cpu": dict(
        lm=dict(model="smollm2-135m-instruct", lora_rank=16, lora_alpha=32.0),
        bitnet=dict(model="smollm2-135m-instruct", bitnet=True, lora_rank=0),
        num_train=256,
        num_val=8,
        batch=8.0,
        steps=20,
        val_every=5,
        lr=2e-3,
        sgd_lr=0.02,
        max_length=160,
        ema=0.9,
        physical=8,
        count_noise_divisor=4.0,
        accelerator="cpu",
    ),
    "quick": dict(
        lm=dict(model="tiny-qwen2"),
        bitnet=dict(model="tiny-bitnet"),
        num_train=64,
        num_val=4,
        batch=8.0,
        steps=6,
        val_every=3,
        lr=3e-3,
        sgd_lr=0.05,
        max_length=512,
        ema=0.9,
        physical=8,
        count_noise_divisor=4.0,
        accelerator="cpu",
    ),
    "full": dict(
        lm=dict(model="smollm2-135m-instruct"),
        bitnet=dict(model="smollm2-135m-instruct", bitnet=True),
        num_train=8192,
        num_val=128,
        batch=512.0,
        steps=1000,
        val_every=50,
        lr=5e-4,
        sgd_lr=0.5,
        max_length=256,
        ema=0.999,
        physical=64,
        count_noise_divisor=20.0,
        accelerator="auto",
    ),
}

# name -> (DPCausalLM overrides, ClipDrivenLR adaptive, reported weights)
ABLATIONS: dict[str, tuple[dict[str, Any], bool, str]] = {
    "DP-Adam-AC (private-quantile clip + EMA + clip-driven LR)": ({}, True, "loss_ema"),
    "- adaptive clipping (fixed C = 1)": ({"clipping": "fixed"}, True, "loss_ema"),
    "- EMA (raw weights)": ({}, True, "loss_raw"),
    "- clip-driven LR": ({}, False, "loss_ema"),
    "+ second-moment correction (DP-AdamBC, floor 1e-8)": (
        {"noise_correction": True},
        True,
        "loss_ema",
    ),
    # "noise": the floor is the per-coordinate noise variance (sigma C0 / E[B])^2 of the first step
    "+ second-moment correction (DP-AdamBC, floor = noise variance)": (
        {"noise_correction": True, "variance_floor": "noise"},
        True,
        "loss_ema",
    ),
    "DP-AdamW, fixed clip (no EMA, no clip-driven LR)": ({"clipping": "fixed"}, False, "loss_raw"),
    "DP-SGD, fixed clip (momentum 0.9)": (
        {"clipping": "fixed", "optimizer": "sgd", "momentum": 0.9},
        False,
        "loss_raw",
    ),
}


class TrainLog(L.Callback):
    """Per-step operator-side record: training loss, clip bound, realized batch size."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        r = pl_module.last_record
        if r is not None:
            self.rows.append(
                {"step": r.step, "loss": r.loss, "clip": r.max_grad_norm, "batch": r.batch_size}
            )


def run_one(
    cfg: dict[str, Any],
    model_kw: dict[str, Any],
    *,
    dataset: str,
    sigma: float | str,
    target_eps: float | None,
    seed: int,
    workdir: str,
    adaptive_lr: bool = True,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One training run; returns its validation history, train log and epsilon."""
    private = sigma != 0.0
    L.seed_everything(seed, verbose=False)
    dm = SyntheticDataModule(
        tokenizer=model_kw["model"],
        dataset=dataset,
        num_train=cfg["num_train"],
        num_val=cfg["num_val"],
        num_test=0,
        max_length=cfg["max_length"],
        batch_schedule=ConstantBatchSize(cfg["batch"]),
        sampling_seed=seed,
    )
    ov = dict(overrides or {})
    # The overrides name the ablated part; here they become the module's components.
    if ov.pop("clipping", "private_quantile") == "fixed":
        clip: ClipBoundEstimator = FixedClip(max_grad_norm=C0)
    else:
        clip = PrivateQuantile(  # rho* 0.2: the paper's example, as the committed results used
            initial_clip=C0,
            target_clip_rate=0.2,
            count_noise_divisor=cfg["count_noise_divisor"],
        )
    if ov.pop("optimizer", "adamw") == "sgd":
        optimizer = partial(torch.optim.SGD, lr=cfg["sgd_lr"], momentum=ov.pop("momentum", 0.0))
    else:
        optimizer = partial(
            DPAdamW,
            lr=cfg["lr"],
            noise_correction=ov.pop("noise_correction", False),
            variance_floor=ov.pop("variance_floor", 1e-8),
        )
    if ov:
        raise ValueError(f"unknown ablation overrides {sorted(ov)}")
    module = DPCausalLM(
        **model_kw,
        private=private,
        noise_multiplier=sigma if private else 0.0,
        clipping=clip,
        optimizer=optimizer,
        max_physical_batch_size=cfg["physical"],
        noise_seed=seed,
        eval_before_fit=True,
    )
    log, acct = TrainLog(), PrivacyAccounting(target_epsilon=target_eps)
    callbacks = [EMAWeights(decay=cfg["ema"]), ClipDrivenLR(adaptive=adaptive_lr), log, acct]
    trainer = build_trainer(
        max_steps=cfg["steps"],
        callbacks=callbacks,
        val_every=cfg["val_every"],
        workdir=workdir,
        accelerator=cfg["accelerator"],
    )
    start = time.time()
    trainer.fit(module, datamodule=dm)
    return {
        "dataset": dataset,
        "model": {
            **model_kw,
            "clipping": module.clip.describe(),
            "optimizer": repr(optimizer),
            "max_physical_batch_size": cfg["physical"],
        },
        "seed": seed,
        "private": private,
        "noise_multiplier": float(module.noise_multiplier) if private else 0.0,
        "epsilon": acct.epsilon() if private else None,
        "delta": acct.delta if private else None,
        "clip_driven_lr": adaptive_lr,
        "steps": int(trainer.global_step),
        "seconds": round(time.time() - start, 1),
        "val_history": module.val_history,
        "train": log.rows,
    }


def final(run: dict[str, Any], key: str = "loss_ema") -> float:
    return float(run["val_history"][-1][key])


def plot(
    runs: list[dict[str, Any]],
    dataset: str,
    labels: dict[str, str],
    cfg: dict[str, Any],
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {0.0: "black", 0.5: "tab:blue", 1.0: "tab:orange", 2.0: "tab:red"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, panel in zip(axes, ("lm", "bitnet"), strict=True):
        for run in (r for r in runs if r["panel"] == panel):
            hist = run["val_history"]
            name = (
                "non-private"
                if not run["private"]
                else (f"σ={run['noise_multiplier']:g}, ε={run['epsilon']:.1f}")
            )
            ax.plot(
                [h["step"] for h in hist],
                [h["loss_ema"] for h in hist],
                marker="o",
                ms=3,
                color=colors.get(run["sigma_nominal"], "gray"),
                label=name,
            )
        ax.set_title(labels[panel], fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation loss, EMA weights (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    deltas = sorted({r["delta"] for r in runs if r.get("delta")})
    delta = f"delta={deltas[0]:.3g}" if len(deltas) == 1 else f"delta in {deltas}"
    fig.suptitle(
        f"{dataset}: N={cfg['num_train']}, E[B]={cfg['batch']:g}, {delta}, {cfg['steps']} steps",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_figures(cfg, dataset, seed, out: Path, meta) -> None:
    labels = {p: describe(cfg[p]) for p in ("lm", "bitnet")}
    runs = []
    for panel in ("lm", "bitnet"):
        for sigma in SIGMAS:
            run = run_one(
                cfg,
                cfg[panel],
                dataset=dataset,
                sigma=sigma,
                target_eps=None,
                seed=seed,
                workdir=str(out / ".tmp"),
            )
            run.update(panel=panel, sigma_nominal=sigma)
            runs.append(run)
            print(
                f"[figures] {dataset} {panel} sigma={sigma:g}: val loss "
                f"{run['val_history'][0]['loss_ema']:.3f} -> {final(run):.3f} "
                f"eps={run['epsilon']} ({run['seconds']} s)",
                flush=True,
            )
    (out / f"paper_figures_{dataset}.json").write_text(
        json.dumps({"meta": {**meta, "labels": labels}, "runs": runs}, indent=1)
    )
    plot(runs, dataset, labels, cfg, out / f"paper_fig_{dataset}.png")


def run_ablation(cfg, dataset, seed, epsilon, out: Path, meta) -> None:
    runs: dict[str, dict[str, Any]] = {}
    table = []
    for name, (overrides, adaptive, key) in ABLATIONS.items():
        cache_key = json.dumps([overrides, adaptive], sort_keys=True)
        if overrides.get("variance_floor") == "noise":
            # every DP run here has the same calibrated sigma; the first run has set it
            sigma = next(iter(runs.values()))["noise_multiplier"]
            overrides = {**overrides, "variance_floor": (sigma * C0 / cfg["batch"]) ** 2}
        if cache_key not in runs:  # "- EMA" reads the raw weights of the DP-Adam-AC run
            runs[cache_key] = run_one(
                cfg,
                cfg["lm"],
                dataset=dataset,
                sigma="auto",
                target_eps=epsilon,
                seed=seed,
                adaptive_lr=adaptive,
                overrides=overrides,
                workdir=str(out / ".tmp"),
            )
        run = runs[cache_key]
        table.append(
            {
                "variant": name,
                "weights": key.removeprefix("loss_"),
                "start": run["val_history"][0][key],
                "final": final(run, key),
                "sigma": run["noise_multiplier"],
                "epsilon": run["epsilon"],
            }
        )
        print(
            f"[ablation] {dataset} {name}: {final(run, key):.3f} eps={run['epsilon']:.2f}",
            flush=True,
        )
    ref = run_one(
        cfg,
        cfg["lm"],
        dataset=dataset,
        sigma=0.0,
        target_eps=None,
        seed=seed,
        workdir=str(out / ".tmp"),
    )
    table.append(
        {
            "variant": "non-private AdamW (reference)",
            "weights": "ema",
            "start": ref["val_history"][0]["loss_ema"],
            "final": final(ref),
            "sigma": 0.0,
            "epsilon": None,
        }
    )
    (out / f"paper_ablation_{dataset}.json").write_text(
        json.dumps(
            {
                "meta": {**meta, "target_epsilon": epsilon},
                "table": table,
                "runs": [*runs.values(), ref],
            },
            indent=1,
        )
    )


def describe(model_kw: dict[str, Any]) -> str:
    name = model_kw["model"] + (" + BitNet b1.58 QAT" if model_kw.get("bitnet") else "")
    rank = model_kw.get("lora_rank", 0)
    return f"{name}, " + (f"LoRA r={rank}" if rank else "all weights trained")


def report(out: Path) -> None:
    """Markdown tables from the JSON files in ``out``."""
    for path in sorted(out.glob("paper_figures_*.json")):
        data = json.loads(path.read_text())
        print(f"\n{path.name} (commit {data['meta']['commit']})\n")
        print("| model | sigma | epsilon | EMA val loss: start | end | min |")
        print("|---|---|---|---|---|---|")
        for r in data["runs"]:
            eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.1f}"
            losses = [h["loss_ema"] for h in r["val_history"]]
            print(
                f"| {data['meta']['labels'][r['panel']]} | {r['noise_multiplier']:.2f} | {eps} "
                f"| {losses[0]:.3f} | {losses[-1]:.3f} | {min(losses):.3f} |"
            )
    for path in sorted(out.glob("paper_ablation_*.json")):
        data = json.loads(path.read_text())
        print(
            f"\n{path.name} (commit {data['meta']['commit']}, target epsilon "
            f"{data['meta']['target_epsilon']})\n"
        )
        print("| variant | weights | val loss: start | end | sigma | epsilon |")
        print("|---|---|---|---|---|---|")
        for row in data["table"]:
            eps = "-" if row["epsilon"] is None else f"{row['epsilon']:.2f}"
            print(
                f"| {row['variant']} | {row['weights']} | {row['start']:.3f} | {row['final']:.3f} "
                f"| {row['sigma']:.3f} | {eps} |"
            )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default=str(RESULTS))
    recipe = ap.add_mutually_exclusive_group()
    recipe.add_argument("--quick", action="store_true", help="smoke run on tiny random models")
    recipe.add_argument("--full", action="store_true", help="full-size GPU recipe")
    ap.add_argument("--datasets", default=",".join(DATASETS), help="comma list")
    ap.add_argument("--parts", default="figures,ablation", help="comma list: figures, ablation")
    ap.add_argument("--steps", type=int, default=None, help="override the recipe's steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epsilon", type=float, default=8.0, help="ablation budget")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--report", action="store_true", help="print tables from --out and exit")
    args = ap.parse_args()
    out = Path(args.out)
    if args.report:
        report(out)
        return
    name = "full" if args.full else "quick" if args.quick else "cpu"
    cfg = dict(RECIPES[name])
    if args.steps:
        cfg["steps"] = args.steps
    datasets = [d for d in args.datasets.split(",") if d]
    parts = [p for p in args.parts.split(",") if p]
    for value, allowed, flag in (
        (datasets, DATASETS, "--datasets"),
        (parts, ("figures", "ablation"), "--parts"),
    ):
        bad = sorted(set(value) - set(allowed))
        if bad:
            ap.error(f"{flag}: unknown {bad}; choose from {list(allowed)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "recipe": name,
        **cfg,
        "seed": args.seed,
        **provenance("lit_dp", "benchmarks/utility", "benchmarks/common"),
    }
    start = time.time()
    for dataset in datasets:
        if "figures" in parts:
            run_figures(cfg, dataset, args.seed, out, meta)
        if "ablation" in parts:
            run_ablation(cfg, dataset, args.seed, args.epsilon, out, meta)
    print(f"total {time.time() - start:.0f} s")
    report(out)


if __name__ == "__main__":
    main()
