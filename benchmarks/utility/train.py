"""One training run of the utility study, through lit_dp's public API only.

``train_one`` builds SyntheticDataModule (private ``records``), DPCausalLM and the callbacks the
variant asks for (PrivacyAccounting calibrates ``noise_multiplier: auto`` to the target epsilon
over the planned steps, with the library's default delta and accountant), fits, and returns the
run's record(s) for the results file. Three benchmark-side callbacks observe the run:
``Trace`` (operator-side per-step log: training loss, clip bound, privatized clip rate, lr),
``NoiseFloor`` (DP-AdamBC's floor = the per-coordinate noise variance of the calibrated sigma)
and ``EMASweep`` (extra EMA decays, evaluated once at the end: EMA is post-processing, so one
run prices every decay).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch

from benchmarks.common import build_trainer
from lit_dp import (
    ClipDrivenLR,
    DPAdamW,
    DPCausalLM,
    EMAWeights,
    PrivacyAccounting,
    SyntheticDataModule,
)
from lit_dp.callbacks.ema import ema_decay
from lit_dp.data import ConstantBatchSize
from lit_dp.privacy.clipping import FixedClip, PrivateQuantile


@dataclass(frozen=True)
class Variant:
    """How a variant trains and which weights it evaluates and exports."""

    private: bool = True
    clipping: str = "private_quantile"
    optimizer: str = "adamw"
    momentum: float = 0.0
    ema: bool = True
    clip_lr: bool = True
    noise_correction: bool = False
    lr_family: str = "dp-adam-ac"  # whose tuned learning rate this variant uses
    derived_from: str | None = None  # recorded from that variant's run (no training of its own)
    note: str | None = None

    @property
    def weights(self) -> str:
        return "ema" if self.ema else "raw"


VARIANTS: dict[str, Variant] = {
    "dp-adam-ac": Variant(),
    # EMA is post-processing: the raw weights of the same training run are the no-EMA variant.
    "dp-adam-ac-no-ema": Variant(ema=False, derived_from="dp-adam-ac"),
    "dp-adam-ac-no-clip-lr": Variant(clip_lr=False),
    "dp-adam-ac-fixed-clip": Variant(
        clipping="fixed",
        note="fixed clip: no privatized clip rate, so the clip-driven lr "
        "multiplier stays at 1 (this variant drops adaptive clipping and, in effect, the clip LR)",
    ),
    "dp-adamw": Variant(clipping="fixed", ema=False, clip_lr=False, lr_family="dp-adamw"),
    "dp-sgd": Variant(
        clipping="fixed",
        optimizer="sgd",
        momentum=0.9,
        ema=False,
        clip_lr=False,
        lr_family="dp-sgd",
    ),
    # DP-AdamW plus the second-moment correction, at DP-AdamW's tuned rate (one change at a time).
    "dp-adambc": Variant(
        clipping="fixed", ema=False, clip_lr=False, noise_correction=True, lr_family="dp-adamw"
    ),
    "nonprivate": Variant(
        private=False, clipping="fixed", ema=False, clip_lr=False, lr_family="nonprivate"
    ),
}


class Trace(L.Callback):
    """Every ``every`` steps: mean training loss since the last row (operator-side), the clip
    bound, the privatized clip rate, the lr in effect and the mean realized batch size."""

    def __init__(self, every: int) -> None:
        self.every, self.rows, self._acc = every, [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        r = pl_module.last_record
        if r is None:
            return
        self._acc.append((r.loss, r.batch_size))
        if (r.step + 1) % self.every == 0:
            losses = [x for x, _ in self._acc if math.isfinite(x)]
            self.rows.append(
                {
                    "step": r.step + 1,
                    "train_loss": sum(losses) / len(losses) if losses else None,
                    "clip_bound": r.max_grad_norm if math.isfinite(r.max_grad_norm) else None,
                    "clip_rate": r.clip_rate,
                    "lr": trainer.optimizers[0].param_groups[0]["lr"],
                    "batch_size": sum(b for _, b in self._acc) / len(self._acc),
                }
            )
            self._acc = []


class NoiseFloor(L.Callback):
    """Sets DP-AdamBC's variance floor to (sigma C / E[B])^2, the per-coordinate variance of the
    noise in the averaged gradient, in every optimizer group at the start of training (after
    PrivacyAccounting has calibrated sigma in setup and the optimizer has been built)."""

    def on_train_start(self, trainer, pl_module) -> None:
        dm = trainer.datamodule
        expected = dm.schedule.rate(0) * dm.num_units
        std = float(pl_module.noise_multiplier) * float(pl_module.clip.max_grad_norm) / expected
        self.floor = std**2
        for opt in trainer.optimizers:  # built by now: set DPAdamW's floor in every group
            for group in opt.param_groups:
                group["variance_floor"] = self.floor


class EMASweep(L.Callback):
    """Shadow weights for extra EMA decays (same warm-up rule as EMAWeights); at the end of
    training each is swapped in and evaluated on the validation set."""

    def __init__(self, decays: tuple[float, ...]) -> None:
        self.decays, self.shadows, self.final = decays, {}, {}

    def _params(self, pl_module) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in pl_module.model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        r = pl_module.last_record
        if r is None:
            return
        params = self._params(pl_module)
        for d in self.decays:
            if d not in self.shadows:
                self.shadows[d] = {n: p.detach().float().clone() for n, p in params.items()}
            shadow = self.shadows[d]
            torch._foreach_lerp_(
                [shadow[n] for n in params],
                [p.detach().float() for p in params.values()],
                1.0 - ema_decay(r.step, decay=d),
            )

    @torch.no_grad()
    def on_train_end(self, trainer, pl_module) -> None:
        params = self._params(pl_module)
        backup = {n: p.detach().clone() for n, p in params.items()}
        for d, shadow in self.shadows.items():
            for n, p in params.items():
                p.copy_(shadow[n].to(p.dtype))
            self.final[str(d)] = pl_module.evaluate_loss()  # the validation set
        for n, p in params.items():
            p.copy_(backup[n])


def _curve(history: list[dict[str, float]], key: str) -> list[dict[str, float]]:
    """[{step, loss}] of one weight kind; the end-of-fit evaluation replaces a periodic one at
    the same step (same weights, so the same value up to summation order)."""
    by_step: dict[int, float] = {}
    for h in history:
        by_step[int(h["step"])] = float(h[key])
    return [{"step": s, "loss": v} for s, v in sorted(by_step.items())]


def train_one(spec: Any, recipe: Any, organism: Path) -> list[dict[str, Any]]:
    """Train ``spec`` (model, variant, epsilon, seed, lr) on ``recipe``'s private data.

    Returns the run record, followed by one record per variant derived from the same run.
    """
    variant = VARIANTS[spec.variant]
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    L.seed_everything(spec.seed, verbose=False)
    dm = SyntheticDataModule(
        tokenizer=str(organism),
        dataset="records",
        num_train=recipe.num_train,
        num_val=recipe.num_val,
        num_test=0,
        data_seed=recipe.data_seed,
        batch_schedule=ConstantBatchSize(recipe.expected_batch_size),
        sampling_seed=spec.seed,
        max_length=recipe.max_length,
        eval_batch_size=recipe.eval_batch_size,
    )
    module = DPCausalLM(
        model=str(organism),
        lora_rank=recipe.lora_rank,
        lora_alpha=recipe.lora_alpha,
        private=variant.private,
        noise_multiplier="auto" if variant.private else 0.0,
        clipping=FixedClip(recipe.max_grad_norm)
        if variant.clipping == "fixed"
        else PrivateQuantile(
            initial_clip=recipe.max_grad_norm, target_clip_rate=recipe.target_clip_rate
        ),
        optimizer=partial(torch.optim.SGD, lr=spec.lr, momentum=variant.momentum)
        if variant.optimizer == "sgd"
        else partial(DPAdamW, lr=spec.lr, noise_correction=variant.noise_correction),
        noise_seed=spec.seed,
        max_physical_batch_size=recipe.max_physical_batch_size,
        eval_before_fit=True,
    )
    trace = Trace(every=recipe.trace_every)
    callbacks: list[L.Callback] = [trace]
    accounting = floor = sweep = None
    if variant.private:
        accounting = PrivacyAccounting(target_epsilon=spec.epsilon)  # delta: library default
        callbacks.append(accounting)
    if variant.noise_correction:
        floor = NoiseFloor()
        callbacks.append(floor)
    if variant.ema:
        callbacks.append(EMAWeights())  # the shipped default decay
    if variant.clip_lr:
        callbacks.append(ClipDrivenLR(adaptive=True, target_clip_rate=recipe.target_clip_rate))
    if spec.variant == "dp-adam-ac" and recipe.ema_sweep:
        sweep = EMASweep(tuple(recipe.ema_sweep))
        callbacks.append(sweep)
    with tempfile.TemporaryDirectory(prefix="lit_dp_utility_") as workdir:
        trainer = build_trainer(
            max_steps=recipe.steps,
            callbacks=callbacks,
            val_every=recipe.val_every,
            workdir=workdir,
            accelerator=recipe.accelerator,
        )
        start, cpu_start = time.time(), time.process_time()
        trainer.fit(module, datamodule=dm)
        seconds, cpu_seconds = time.time() - start, time.process_time() - cpu_start
    gamma = next((cb.gamma for cb in callbacks if isinstance(cb, ClipDrivenLR)), 1.0)
    common: dict[str, Any] = {
        "model": spec.model,
        "epsilon": spec.epsilon,
        "seed": spec.seed,
        "lr": spec.lr,
        "steps": int(trainer.global_step),
        "expected_batch_size": recipe.expected_batch_size,
        "phase": spec.phase,
        "private": variant.private,
        "noise_multiplier": float(module.noise_multiplier) if variant.private else 0.0,
        "epsilon_spent": accounting.epsilon() if accounting else None,
        "delta": accounting.delta if accounting else None,
        "clipping": variant.clipping if variant.private else None,
        "final_clip_bound": float(module.clip.max_grad_norm) if variant.private else None,
        "final_lr_multiplier": gamma,
        "variance_floor": floor.floor if floor else None,
        "stop_reason": accounting.stop_reason if accounting else None,
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "trace": trace.rows,
        # the raw weights' losses of the same run, also where no derived variant records them
        "val_loss_raw_curve": _curve(module.val_history, "loss_raw"),
    }
    records = []
    for name in [spec.variant, *[n for n, v in VARIANTS.items() if v.derived_from == spec.variant]]:
        v = VARIANTS[name]
        curve = _curve(module.val_history, "loss_ema" if v.ema else "loss_raw")
        rec = {
            "variant": name,
            **common,
            "weights": v.weights,
            "val_loss": curve[-1]["loss"],
            "val_loss_curve": curve,
            "derived_from": None,
            "note": v.note,
        }
        if v.derived_from:
            rec["derived_from"] = f"{v.derived_from} same run (its raw weights)"
            rec["seconds"] = rec["cpu_seconds"] = 0.0
        elif sweep is not None:
            rec["val_loss_ema_decays"] = sweep.final
        records.append(rec)
    return records
