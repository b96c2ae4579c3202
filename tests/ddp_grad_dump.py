"""Test-only callback for the DDP tests: saves each rank's privatized gradient of every step,
and which strategy ran and whether the model was wrapped in DistributedDataParallel."""

from __future__ import annotations

import json
import os

import lightning as L
import torch
from torch.nn.parallel import DistributedDataParallel


class GradDump(L.Callback):
    """Writes ``<dirpath>/grads_rank{R}.pt`` (a list over steps of the flattened p.grad) and
    ``<dirpath>/strategy_rank{R}.json``."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath, self.grads, self.strategy = dirpath, [], {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.strategy = {
            "strategy": type(trainer.strategy).__name__,
            "world_size": trainer.world_size,
            "ddp_wrapped": isinstance(trainer.strategy.model, DistributedDataParallel)
            or any(isinstance(m, DistributedDataParallel) for m in pl_module.modules()),
        }

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        flat = torch.cat(
            [p.grad.flatten() for p in pl_module.model.parameters() if p.grad is not None]
        )
        self.grads.append(flat.detach().clone())

    def on_fit_end(self, trainer, pl_module) -> None:
        os.makedirs(self.dirpath, exist_ok=True)
        rank = trainer.global_rank
        torch.save(self.grads, os.path.join(self.dirpath, f"grads_rank{rank}.pt"))
        with open(os.path.join(self.dirpath, f"strategy_rank{rank}.json"), "w") as fh:
            json.dump(self.strategy, fh)
