"""CausalLMEvaluation: the evaluation half of DPCausalLM (validation, test, before/after losses).

It evaluates ``self.model`` with the *evaluation weights*: whatever context the EMA callback
installs with ``use_evaluation_weights`` (the EMA shadow swapped in), or the raw weights when
none is installed. It never changes the weights it evaluates and spends no privacy budget: the
validation and test metrics are computed on held-out data. The module saves nothing: the
``ExportModel`` callback (``lit_dp.callbacks.export``) exports these weights at the end of fit.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import lightning as L
import torch
from torchmetrics.aggregation import MeanMetric
from torchmetrics.text import Perplexity


class CausalLMEvaluation(L.LightningModule):
    """Validation/test losses of ``self.model`` with its evaluation weights.

    Subclasses set ``self.model`` (a Hugging Face causal LM) and save the hyperparameter
    ``eval_before_fit`` (evaluate once before the first step and once after the last).
    """

    model: Any

    def __init__(self) -> None:
        super().__init__()
        self.val_history: list[dict[str, float]] = []
        self._evaluation_weights: Callable[[], AbstractContextManager[None]] | None = None
        self.privacy_report: dict[str, Any] | None = None
        self.val_loss_ema, self.val_loss_raw = MeanMetric(), MeanMetric()
        self.val_perplexity = Perplexity(ignore_index=-100)

    def _datamodule(self) -> Any:
        """The trainer's datamodule (None outside a trainer or without one)."""
        return getattr(self.trainer, "datamodule", None) if self._trainer is not None else None

    # --- evaluation --------------------------------------------------------------------------
    def use_evaluation_weights(
        self, swap: Callable[[], AbstractContextManager[None]] | None
    ) -> None:
        """Evaluate (and let ExportModel export) the weights ``swap()`` loads in for its context.

        They are loaded for the duration of its context (and restored on exit); None = the raw
        weights. The EMA callback installs its swap at setup, so this module never looks the
        callback up.
        """
        self._evaluation_weights = swap

    def evaluation_weights(self) -> AbstractContextManager[None]:
        """Context in which ``self.model`` holds the weights that are evaluated and exported."""
        swap = self._evaluation_weights
        return swap() if swap is not None else contextlib.nullcontext()

    def set_privacy_report(self, report: dict[str, Any] | None) -> None:
        """The run's privacy report, handed over in memory by the accounting callback.

        It is handed over at the end of fit; the ``ExportModel`` callback writes its shareable
        part beside the exported weights (``lit_dp.callbacks.export``).
        """
        self.privacy_report = report

    def _eval_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
        logits = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
        labels = batch["labels"][:, 1:]
        token_nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        return token_nll, logits, int((labels != -100).sum())

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        nll_raw, logits, tokens = self._eval_loss(batch)
        nll = nll_raw
        if self._evaluation_weights is not None:  # val/loss and perplexity: evaluation weights
            with self.evaluation_weights():
                nll, logits, _ = self._eval_loss(batch)
        if tokens == 0:
            return
        self.val_loss_raw.update(nll_raw / tokens, weight=tokens)
        self.val_loss_ema.update(nll / tokens, weight=tokens)
        self.val_perplexity.update(logits[:, :-1].float(), batch["labels"][:, 1:])

    def on_validation_epoch_end(self) -> None:
        if self.val_loss_ema.update_count == 0:
            return
        ema_loss, raw_loss = self.val_loss_ema.compute(), self.val_loss_raw.compute()
        ppl = self.val_perplexity.compute()
        for metric in (self.val_loss_ema, self.val_loss_raw, self.val_perplexity):
            metric.reset()
        if self.trainer.sanity_checking:
            return
        self.log_dict({"val/loss": ema_loss, "val/loss_raw": raw_loss, "val/perplexity": ppl})
        self.val_history.append(
            {
                "step": int(self.global_step),
                "loss_ema": float(ema_loss),
                "loss_raw": float(raw_loss),
            }
        )

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        nll, _, tokens = self._eval_loss(batch)
        if tokens:
            self.log("test/loss", nll / tokens, batch_size=tokens)

    @torch.no_grad()
    def evaluate_loss(self, loader: Any = None) -> float:
        """Token-mean NLL of the current weights over ``loader`` (default: the validation set).

        The weights evaluated are whatever ``self.model`` holds now: call it inside
        ``evaluation_weights()`` for the EMA weights. It spends no privacy budget when the loader
        holds held-out data (validation or test). NaN when there is no loader or no token.
        """
        if loader is None:
            dm = self._datamodule()
            loader = dm.val_dataloader() if dm is not None else None
        if loader is None:
            return math.nan
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        for batch in loader:
            batch = self.transfer_batch_to_device(batch, self.device, 0)
            nll, _, tokens = self._eval_loss(batch)
            total, count = total + float(nll), count + tokens
        self.model.train(was_training)
        return total / count if count else math.nan

    def on_train_start(self) -> None:
        # The "before" loss: at step 0 the EMA weights equal the raw weights.
        if self.hparams["eval_before_fit"] and self.global_step == 0:
            loss = self.evaluate_loss()
            self.val_history.append({"step": 0, "loss_ema": loss, "loss_raw": loss})

    def on_train_end(self) -> None:
        # The "after" loss, whatever the trainer's validation interval: EMA and raw weights.
        if not self.hparams["eval_before_fit"]:
            return
        raw = self.evaluate_loss()
        ema_loss = raw
        if self._evaluation_weights is not None:
            with self.evaluation_weights():
                ema_loss = self.evaluate_loss()
        self.val_history.append(
            {"step": int(self.global_step), "loss_ema": ema_loss, "loss_raw": raw}
        )
