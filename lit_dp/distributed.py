"""DDP for DP training: ranks exchange clipped sums, never raw gradients.

``DPDDPStrategy`` is Lightning's DDP strategy without the DistributedDataParallel wrapper: DDP's
own gradient hook would average raw per-rank gradients, which is exactly what DP must not do.
The DP step instead sums the clipped per-unit gradients across ranks (the collectives live in
``lit_dp.privacy.collectives``, re-exported here), then every rank adds the same noise draw
(identical generators, seeded from rank 0).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from lit_dp.privacy.collectives import (
    all_gather_norms,
    all_reduce_sum_,
    broadcast_int,
    is_distributed,
)

__all__ = [
    "DPDDPStrategy",
    "all_gather_norms",
    "all_reduce_sum_",
    "broadcast_int",
    "check_dp_strategy",
    "is_distributed",
]


class DPDDPStrategy(DDPStrategy):
    """DDP process group and launch from Lightning; no DistributedDataParallel wrapper."""

    strategy_name = "dp_ddp"

    def _setup_model(self, model: nn.Module) -> nn.Module:  # type: ignore[override]
        # Identical starting weights on every rank (a random init or a load may differ).
        if is_distributed():
            with torch.no_grad():
                for tensor in list(model.parameters()) + list(model.buffers()):
                    dist.broadcast(tensor.data, src=0)
        return model

    def _register_ddp_hooks(self) -> None:
        return None


def check_dp_strategy(trainer) -> None:
    """Refuse a multi-process run on any strategy but :class:`DPDDPStrategy`.

    Lightning's own DDP (what ``strategy: auto`` picks for several devices) wraps the model in
    DistributedDataParallel, whose hooks all-reduce raw gradients next to the clipped sums.
    """
    if trainer.world_size > 1 and not isinstance(trainer.strategy, DPDDPStrategy):
        raise ValueError(
            f"trainer.strategy={type(trainer.strategy).__name__} runs {trainer.world_size} "
            "processes without lit_dp's DP exchange; use trainer.strategy: dp_ddp (the lit-dp "
            "CLI maps every multi-device run to it)"
        )
