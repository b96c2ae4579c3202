"""Test-only callback for the DDP tests: saves each rank's privatized gradient of every step."""

from __future__ import annotations

import os

import lightning as L
import torch


class GradDump(L.Callback):
    """Writes ``<dirpath>/grads_rank{R}.pt``: a list over steps of the flattened p.grad."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath, self.grads = dirpath, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        flat = torch.cat([p.grad.flatten() for p in pl_module.model.parameters() if p.grad is not None])
        self.grads.append(flat.detach().clone())

    def on_fit_end(self, trainer, pl_module) -> None:
        os.makedirs(self.dirpath, exist_ok=True)
        torch.save(self.grads, os.path.join(self.dirpath, f"grads_rank{trainer.global_rank}.pt"))
