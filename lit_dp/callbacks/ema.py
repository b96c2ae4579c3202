"""EMA of the trainable weights, used for validation, test, prediction and export.

theta_ema <- d_t * theta_ema + (1 - d_t) * theta, with warm-up d_t = min(d, (1 + t) / (10 + t)).
The EMA is a function of the (private) weights only, so it is covered by the same guarantee.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import lightning as L
import torch
from torch import nn

from lit_dp.callbacks.contract import EvaluationWeights, TrainedModel


def ema_decay(step: int, *, decay: float) -> float:
    """Decay used after optimizer step ``step`` (0-based): min(decay, (1 + step) / (10 + step))."""
    return min(decay, (1.0 + step) / (10.0 + step))


class EMAWeights(L.Callback):
    """Keeps an exponential moving average of every trainable parameter of ``pl_module.model``.

    Args:
        decay: EMA decay d in [0, 1), with warm-up (see ``ema_decay``); default 0.999.
        evaluate_with_ema: swap the EMA weights in for test and predict (validation computes
            both EMA and raw losses; see ``DPCausalLM.validation_step``).
    """

    def __init__(self, decay: float = 0.999, evaluate_with_ema: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema.decay={decay} must be in [0, 1); 0.999 is the default")
        self.decay = decay
        self.evaluate_with_ema = evaluate_with_ema
        self.shadow: dict[str, torch.Tensor] = {}
        self._pending_state: dict[str, Any] | None = None
        self._ctx: AbstractContextManager[None] | None = None  # the EMA swap of test / predict

    # --- state -------------------------------------------------------------------------------
    @staticmethod
    def _trainable(module: nn.Module) -> dict[str, nn.Parameter]:
        return {n: p for n, p in module.named_parameters() if p.requires_grad}

    def _ensure_init(self, pl_module: TrainedModel) -> None:
        params = self._trainable(pl_module.model)
        if self._pending_state is not None:
            saved = self._pending_state["shadow"]
            if set(saved) != set(params):
                raise ValueError("EMA checkpoint does not match the model's trainable parameters")
            self.shadow = {n: saved[n].to(params[n].device, torch.float32) for n in params}
            self._pending_state = None
        elif not self.shadow:
            self.shadow = {n: p.detach().float().clone() for n, p in params.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": {n: t.cpu() for n, t in self.shadow.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.decay = float(state_dict["decay"])
        self._pending_state = state_dict  # applied once the model is on its device

    # --- hooks -------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # The module evaluates inside this swap (val/loss, the "after" loss), and ExportModel
        # exports inside it.
        if isinstance(pl_module, EvaluationWeights) and isinstance(pl_module, TrainedModel):
            pl_module.use_evaluation_weights(functools.partial(self.swapped, pl_module))

    # No teardown: after fit the module keeps evaluating with the EMA weights, so that
    # ``module.evaluation_weights()`` and ``evaluate_loss`` called after ``trainer.fit`` see
    # the weights the run evaluated and exported, not the raw ones.

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(pl_module, TrainedModel):
            self._ensure_init(pl_module)

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not isinstance(pl_module, TrainedModel) or pl_module.last_record is None:
            return
        record = pl_module.last_record
        self._ensure_init(pl_module)
        d = ema_decay(record.step, decay=self.decay)
        params = self._trainable(pl_module.model)
        shadow = [self.shadow[n] for n in params]
        current = [p.detach().float() for p in params.values()]
        torch._foreach_lerp_(shadow, current, 1.0 - d)  # ema += (1 - d) * (theta - ema)

    @contextmanager
    def swapped(self, pl_module: TrainedModel) -> Iterator[None]:
        """Temporarily load the EMA weights into ``pl_module.model`` (restored on exit)."""
        self._ensure_init(pl_module)
        params = self._trainable(pl_module.model)
        backup = {n: p.detach().clone() for n, p in params.items()}
        try:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(self.shadow[n].to(p.dtype))
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(backup[n])

    def _swap_in(self, pl_module: Any) -> None:
        if self.evaluate_with_ema and isinstance(pl_module, TrainedModel):
            self._ctx = self.swapped(pl_module)
            self._ctx.__enter__()

    def _swap_out(self) -> None:
        ctx = self._ctx
        if ctx is not None:
            ctx.__exit__(None, None, None)
            self._ctx = None

    def on_test_start(self, trainer, pl_module) -> None:
        self._swap_in(pl_module)

    def on_test_end(self, trainer, pl_module) -> None:
        self._swap_out()

    def on_predict_start(self, trainer, pl_module) -> None:
        self._swap_in(pl_module)

    def on_predict_end(self, trainer, pl_module) -> None:
        self._swap_out()
