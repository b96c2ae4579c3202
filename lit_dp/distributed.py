"""DDP for DP training: ranks exchange clipped sums, never raw gradients.

``DPDDPStrategy`` is Lightning's DDP strategy without the DistributedDataParallel wrapper: DDP's
own gradient hook would average raw per-rank gradients, which is exactly what DP must not do.
The DP step instead sums the clipped per-unit gradients across ranks (``all_reduce_sum_``), then
every rank adds the same noise draw (identical generators, seeded from rank 0).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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
    """Refuse a multi-process run on any strategy but :class:`DPDDPStrategy`: Lightning's own
    DDP (what ``strategy: auto`` picks for several devices) wraps the model in
    DistributedDataParallel, whose hooks all-reduce raw gradients next to the clipped sums."""
    if trainer.world_size > 1 and not isinstance(trainer.strategy, DPDDPStrategy):
        raise ValueError(
            f"trainer.strategy={type(trainer.strategy).__name__} runs {trainer.world_size} processes "
            "without lit_dp's DP exchange; use trainer.strategy: dp_ddp (the lit-dp CLI maps "
            "every multi-device run to it)"
        )


def all_reduce_sum_(tensors: list[torch.Tensor]) -> None:
    """In-place sum across ranks of a list of tensors (flattened into one buffer per dtype)."""
    if not is_distributed() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def all_gather_norms(norms: torch.Tensor) -> torch.Tensor:
    """Concatenate the per-unit norms of every rank (variable lengths), rank order."""
    if not is_distributed():
        return norms
    size = torch.tensor([norms.numel()], device=norms.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.full((longest,), float("nan"), device=norms.device, dtype=norms.dtype)
    padded[: norms.numel()] = norms
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(s.item())] for g, s in zip(gathered, sizes, strict=True)])


def broadcast_int(value: int, device: torch.device) -> int:
    """Rank 0's value on every rank (used for the noise seed)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return int(t.item())
