"""Collectives of the DP step: what ranks exchange (clipped sums, norms, the noise seed).

Only privatized or to-be-privatized quantities cross ranks: the clipped per-unit gradient sums
(before the noise, which every rank then adds identically), the per-unit norms the clip-bound
estimator counts, and rank 0's noise seed (or secure-mode key). Raw gradients never do. Outside
a process group every function is the identity, so single-process code calls them
unconditionally.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_norms",
    "all_reduce_sum_",
    "broadcast_bytes",
    "broadcast_int",
    "is_distributed",
]


def is_distributed() -> bool:
    """True inside an initialized process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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


def broadcast_bytes(value: bytes, device: torch.device) -> bytes:
    """Rank 0's bytes on every rank (used for the secure-mode noise key); lengths must agree."""
    if not is_distributed():
        return value
    t = torch.tensor(list(value), dtype=torch.uint8, device=device)
    dist.broadcast(t, src=0)
    return bytes(t.cpu().tolist())
