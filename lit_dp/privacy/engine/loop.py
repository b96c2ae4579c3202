"""The reference engine: one forward and one ``torch.autograd.grad`` per privacy unit.

Slow and simple on purpose: the other engines are tested against it.
"""

from __future__ import annotations

import math

import torch

from lit_dp.privacy.engine.job import ClippedBatch, Job, clip_factor
from lit_dp.privacy.engine.loss import logits_of, row_loss_sums


def loop_clip(job: Job) -> ClippedBatch:
    """Per-unit clipped gradient sum of ``job``, one unit at a time."""
    units, counts = job.units, job.counts
    names, plist = list(job.params), list(job.params.values())
    sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in plist]
    num_units = units.num_units
    norms = torch.zeros(num_units, dtype=torch.float32, device=counts.device)
    losses = torch.full_like(norms, math.nan)
    nonfinite = 0
    for u in range(num_units):
        if int(counts[u]) == 0:  # no label tokens: zero gradient, norm 0
            continue
        rows = (units.row_unit == u).nonzero().squeeze(1)
        logits = logits_of(job.model, job.input_ids[rows], job.attention_mask[rows])
        row_sums, _ = row_loss_sums(logits, job.labels[rows])
        loss = row_sums.sum() / counts[u]
        losses[u] = loss.detach()
        if not plist or not loss.requires_grad:
            continue
        grads = torch.autograd.grad(loss, plist, allow_unused=True)
        grads32 = [
            torch.zeros_like(s) if g is None else g.float()
            for g, s in zip(grads, sums, strict=True)
        ]
        norm = torch.stack([g.pow(2).sum() for g in grads32]).sum().sqrt()
        norms[u] = norm
        if not torch.isfinite(norm):
            nonfinite += 1
            continue
        torch._foreach_add_(sums, grads32, alpha=float(clip_factor(norm, job.max_grad_norm)))
    return ClippedBatch(dict(zip(names, sums, strict=True)), norms, losses, nonfinite)
