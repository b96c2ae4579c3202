"""What a run shows on the console while it trains.

In a terminal: a progress bar with epsilon and the train loss, labelled "train" (Lightning's
"Epoch 0/-2" counts epochs of a run whose length is set in steps) and without Lightning's
``v_num``. With the output redirected (a batch job), a bar would print nothing readable; one
line per validation says where the run is instead: step, epsilon, validation loss.
"""

from __future__ import annotations

import sys
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

# The epsilon the accounting callback logs at every step (shown in the bar).
EPSILON_METRIC = "privacy/epsilon"


def _bar_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The bar's metrics without the logger version; epsilon first."""
    items = {k: v for k, v in metrics.items() if k != "v_num"}
    if EPSILON_METRIC in items:
        items = {"epsilon": items.pop(EPSILON_METRIC), **items}
    return items


def _train_label(trainer: L.Trainer, epoch: int) -> str:
    """The bar's label: train for a run set in steps, epoch e/E when max_epochs sets it."""
    max_epochs = trainer.max_epochs
    return f"epoch {epoch}/{max_epochs - 1}" if max_epochs and max_epochs > 0 else "train"


class DPRichProgressBar(RichProgressBar):
    """Lightning's rich bar, labelled by steps, with epsilon and without ``v_num``."""

    def _get_train_description(self, current_epoch: int) -> str:
        return _train_label(self.trainer, current_epoch)

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        return _bar_metrics(super().get_metrics(trainer, pl_module))


class DPTQDMProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar (without the rich package), with the same changes."""

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        self.train_progress_bar.set_description(_train_label(trainer, trainer.current_epoch))

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        return _bar_metrics(super().get_metrics(trainer, pl_module))


def progress_bar() -> RichProgressBar | TQDMProgressBar:
    """The bar Lightning would pick (rich when installed), with lit_dp's changes."""
    try:
        import rich  # noqa: F401
    except ImportError:
        return DPTQDMProgressBar()
    return DPRichProgressBar()


def is_terminal() -> bool:
    """Whether the console output goes to a terminal (a bar can be drawn)."""
    return sys.stdout.isatty()


class ValidationLines(L.Callback):
    """One line per validation on stdout: step, epsilon, validation loss (EMA and raw).

    For runs without a progress bar (output redirected, or ``enable_progress_bar: false``).
    """

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        history = getattr(pl_module, "val_history", None)
        fitting = trainer.state.fn == "fit"  # `lit-dp validate` prints its own results
        if trainer.sanity_checking or not fitting or not trainer.is_global_zero or not history:
            return
        last = history[-1]
        if last["step"] != trainer.global_step:
            return  # no new validation result (an empty validation set)
        eps = trainer.callback_metrics.get(EPSILON_METRIC)
        privacy = "not private" if not getattr(pl_module, "private", True) else (
            f"epsilon = {float(eps):.4f}" if eps is not None else "epsilon = 0 (no step yet)"
        )  # fmt: skip
        limit = f"/{trainer.max_steps}" if trainer.max_steps and trainer.max_steps > 0 else ""
        print(
            f"step {trainer.global_step}{limit}: {privacy}, val/loss = {last['loss_ema']:.4f} "
            f"(EMA), {last['loss_raw']:.4f} (raw)",
            flush=True,
        )
