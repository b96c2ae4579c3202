"""The Lightning Trainer of every study's training runs, built in one place."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # lightning is imported when a Trainer is built: the step-time children that
    import lightning as L  # import benchmarks.common measure their peak memory without it


def build_trainer(
    *,
    max_steps: int,
    callbacks: Sequence[L.Callback] = (),
    val_every: int | None = None,
    workdir: str | Path | None = None,
    accelerator: str = "cpu",
) -> L.Trainer:
    """A one-device Trainer for a benchmark run, with nothing but the run itself.

    It trains for ``max_steps`` optimizer steps (no epoch limit) and writes no logs, checkpoints,
    progress bar or model summary; the datamodule does its own (Poisson) sampling, so Lightning
    adds no distributed sampler, and there is no sanity validation.

    Args:
        max_steps: optimizer steps to train.
        callbacks: the run's callbacks (accounting, EMA, clip-driven lr, the study's observers).
        val_every: validate every this many steps; None switches validation off (a module with
            ``eval_before_fit`` still evaluates before the first and after the last step).
        workdir: Lightning's ``default_root_dir`` (None: the current directory).
        accelerator: Lightning's accelerator ("cpu", or "auto" for a GPU recipe).

    Returns:
        The Trainer; the caller fits it (``trainer.fit(module, datamodule=dm)``).
    """
    import lightning as L

    if val_every is not None and val_every < 1:
        raise ValueError(f"val_every must be a whole number of steps >= 1 or None, got {val_every}")
    validation: dict[str, Any] = (
        {"limit_val_batches": 0}
        if val_every is None
        else {"val_check_interval": val_every, "check_val_every_n_epoch": None}
    )
    return L.Trainer(
        max_steps=max_steps,
        max_epochs=-1,
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        default_root_dir=workdir,
        callbacks=list(callbacks),
        **validation,
    )
