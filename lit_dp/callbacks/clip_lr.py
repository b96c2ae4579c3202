"""Clip-driven learning-rate multiplier on top of a base schedule (DP-Adam-AC; docs/method.md).

gamma_{t+1} = clamp(gamma_t * up,   gamma_min, gamma_max)  if clip_rate < rho* - band
            = clamp(gamma_t * down, gamma_min, gamma_max)  if clip_rate > rho* + band
            = gamma_t                                       otherwise
lr_t = base_lr * schedule(t) * gamma_t. The clip rate is the privatized one from the step record;
steps without a privatized clip rate (fixed clipping, non-private) leave gamma unchanged.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

from lit_dp.callbacks.contract import ClipSource, StepSource
from lit_dp.privacy.clipping import (
    DEFAULT_TARGET_CLIP_RATE,
    FixedClip,
    HistoryPercentile,
    PrivateQuantile,
)


def next_lr_multiplier(
    gamma: float,
    clip_rate: float | None,
    *,
    target_clip_rate: float,
    band: float = 0.1,
    up: float = 1.01,
    down: float = 0.995,
    gamma_min: float = 0.1,
    gamma_max: float = 2.0,
) -> float:
    """The paper's multiplier rule; a ``None`` clip rate leaves gamma unchanged."""
    if clip_rate is None or not math.isfinite(clip_rate):
        return gamma
    if clip_rate < target_clip_rate - band:
        gamma *= up
    elif clip_rate > target_clip_rate + band:
        gamma *= down
    return min(gamma_max, max(gamma_min, gamma))


def base_schedule(
    step: int, *, kind: str, warmup_steps: int, total_steps: int | None, min_lr_ratio: float
) -> float:
    """Factor in (0, 1] multiplying the base lr: constant, or linear warm-up then cosine decay."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant" or not total_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class ClipDrivenLR(L.Callback):
    """Sets every param group's lr before each step to base_lr * schedule(t) * gamma_t.

    Args:
        schedule: "constant" or "cosine" (linear warm-up, then cosine to min_lr_ratio * base_lr
            at trainer.max_steps).
        warmup_steps: linear warm-up steps (0 = none).
        min_lr_ratio: final lr / base lr for the cosine schedule.
        adaptive: apply the clip-driven multiplier gamma (the paper's rule). Off by default: it
            needs the privatized clip rate of an adaptive ``model.clipping`` (the default
            ``FixedClip`` releases none), and in the utility study (``benchmarks/README.md``
            section 5) it changed the final loss by less than the seed-to-seed spread.
        target_clip_rate: rho*, the clip rate the multiplier steers toward; null (default) takes
            the clip-bound estimator's own target (``model.clipping``), else 0.5.
        band: no change while |clip_rate - rho*| <= band.
        up: factor when the clip rate is below rho* - band.
        down: factor when the clip rate is above rho* + band.
        gamma_min: lower bound of gamma.
        gamma_max: upper bound of gamma.
    """

    def __init__(
        self,
        schedule: Literal["constant", "cosine"] = "constant",
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        adaptive: bool = False,
        target_clip_rate: float | None = None,
        band: float = 0.1,
        up: float = 1.01,
        down: float = 0.995,
        gamma_min: float = 0.1,
        gamma_max: float = 2.0,
    ) -> None:
        checks = {
            "clip_lr.warmup_steps": warmup_steps >= 0,
            "clip_lr.min_lr_ratio": 0.0 <= min_lr_ratio <= 1.0,
            "clip_lr.target_clip_rate": target_clip_rate is None or 0.0 < target_clip_rate < 1.0,
            "clip_lr.band": band >= 0.0,
            "clip_lr.up": up >= 1.0,
            "clip_lr.down": 0.0 < down <= 1.0,
            "clip_lr.gamma_min": 0.0 < gamma_min <= 1.0 <= gamma_max,
        }
        for field, ok in checks.items():
            if not ok:
                raise ValueError(
                    f"{field} is out of range; see the ClipDrivenLR docstring for bounds"
                )
        if schedule not in ("constant", "cosine"):
            raise ValueError(f"clip_lr.schedule={schedule!r} must be 'constant' or 'cosine'")
        self.schedule, self.warmup_steps, self.min_lr_ratio = schedule, warmup_steps, min_lr_ratio
        self.adaptive = adaptive
        self.rule = dict(
            target_clip_rate=DEFAULT_TARGET_CLIP_RATE
            if target_clip_rate is None
            else target_clip_rate,
            band=band,
            up=up,
            down=down,
            gamma_min=gamma_min,
            gamma_max=gamma_max,
        )
        self.target_clip_rate = target_clip_rate
        self.gamma = 1.0

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Steer toward the estimator's target unless one was given here.

        Warns when the multiplier is on but the estimator releases no clip rate to drive it.
        """
        clip = pl_module.clip if isinstance(pl_module, ClipSource) else None
        target = self.target_clip_rate
        if target is None and isinstance(clip, PrivateQuantile | HistoryPercentile):
            target = clip.target_clip_rate
        self.rule["target_clip_rate"] = (
            DEFAULT_TARGET_CLIP_RATE if target is None else float(target)
        )
        if stage == "fit" and self.adaptive and isinstance(clip, FixedClip):
            rank_zero_warn(
                "clip_lr.adaptive=true has no effect here: a fixed clip bound (FixedClip, or a "
                "non-private run) releases no clip rate, so the lr multiplier stays 1. Set "
                "clip_lr.adaptive false, or use an adaptive model.clipping (PrivateQuantile)."
            )

    def state_dict(self) -> dict[str, Any]:
        return {"gamma": self.gamma}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.gamma = float(state_dict["gamma"])

    def current_lr_factor(self, step: int, total_steps: int | None) -> float:
        factor = base_schedule(
            step,
            kind=self.schedule,
            warmup_steps=self.warmup_steps,
            total_steps=total_steps,
            min_lr_ratio=self.min_lr_ratio,
        )
        return factor * self.gamma

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        factor = self.current_lr_factor(trainer.global_step, total)
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                group.setdefault("base_lr", group["lr"])
                group["lr"] = group["base_lr"] * factor
        pl_module.log(
            "lr", trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False
        )
        pl_module.log("lr_multiplier", self.gamma, on_step=True, on_epoch=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = pl_module.last_record if isinstance(pl_module, StepSource) else None
        if record is None or not self.adaptive:
            return
        self.gamma = next_lr_multiplier(self.gamma, record.clip_rate, **self.rule)
