"""The ``torch.func`` engine: vmap(grad) of the per-unit loss over units.

It runs in memory-bounded chunks of units. Works for any module torch.func can trace; needs full
causal attention (``sdpa`` or ``eager``), since HF's mask builder cannot run under vmap.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lit_dp.privacy.engine.job import ClippedBatch, Job, clip_factors
from lit_dp.privacy.engine.loss import extra_kwargs, row_loss_sums

# Per-unit gradients the vmap engine may hold at once (elements), summed over parameters.
_VMAP_BUDGET = 1 << 26


def _mask_4d(model: nn.Module, attention_mask: Tensor) -> Tensor:
    """(B, 1, T, T) causal + padding mask in the model's attention convention.

    vmap cannot run HF's mask builder (data-dependent checks), so the same mask is made here:
    query t sees key s iff s <= t and attention_mask[s] (a fully masked query row stays masked).
    """
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None) or "sdpa"
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise ValueError(
            f"engine='vmap' supports full causal attention only, not {sorted(layer_types)}"
        )
    seq = attention_mask.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = (causal & attention_mask.bool()[:, None, :]).unsqueeze(1)
    if impl == "sdpa":
        return allowed
    if impl == "eager":
        dtype = next(model.parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    raise ValueError(
        f"engine='vmap' supports attention 'sdpa' and 'eager', not {impl!r}; use engine='loop'"
    )


def vmap_clip(job: Job) -> ClippedBatch:
    """Per-unit clipped gradient sum of ``job``, vmapped over chunks of units."""
    from torch.func import functional_call, grad, vmap

    model, params, units, counts = job.model, job.params, job.units, job.counts
    num_units, max_rows, device = units.num_units, units.max_rows, counts.device
    # (U, R) row index per unit slot; missing slots repeat the unit's first row with no labels,
    # so they add exactly zero gradient and stay finite.
    index = torch.full((num_units, max_rows), -1, dtype=torch.long, device=device)
    index[units.row_unit, units.slot] = torch.arange(units.row_unit.numel(), device=device)
    real = index >= 0
    index = torch.where(real, index, index[:, :1])
    unit_ids = job.input_ids[index]  # (U, R, T)
    unit_masks = _mask_4d(model, job.attention_mask)[index]  # (U, R, 1, T, T)
    unit_labels = torch.where(real[..., None], job.labels[index], -100)
    detached = {n: p.detach() for n, p in params.items()}
    extra = extra_kwargs(model)

    def unit_loss(p: dict[str, Tensor], ids: Tensor, mask: Tensor, lab: Tensor, n: Tensor):
        out = functional_call(model, p, (), {"input_ids": ids, "attention_mask": mask, **extra})
        logits = out.logits if hasattr(out, "logits") else out[0]
        loss = row_loss_sums(logits, lab)[0].sum() / n.clamp(min=1)
        return loss, loss.detach()

    per_unit_grad: Callable = vmap(
        grad(unit_loss, has_aux=True), in_dims=(None, 0, 0, 0, 0), randomness="different"
    )
    sums = {
        n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()
    }
    norms = torch.zeros(num_units, dtype=torch.float32, device=device)
    losses = torch.full_like(norms, math.nan)
    size = sum(p.numel() for p in params.values())
    step = max(1, _VMAP_BUDGET // max(1, size))
    nonfinite = 0
    for start in range(0, num_units, step):
        sl = slice(start, min(num_units, start + step))
        with warnings.catch_warnings():  # sdpa has no vmap batching rule: correct, just slower
            warnings.filterwarnings("ignore", message=".*performance drop.*")
            grads, loss = per_unit_grad(
                detached, unit_ids[sl], unit_masks[sl], unit_labels[sl], counts[sl]
            )
        empty = counts[sl] == 0
        sq = torch.zeros(sl.stop - sl.start, dtype=torch.float32, device=device)
        for g in grads.values():
            sq += g.float().pow(2).flatten(1).sum(1)
        norm, factor, bad = clip_factors(sq, empty, job.max_grad_norm)
        nonfinite += bad
        for n, g in grads.items():
            g = torch.where(factor.view(-1, *[1] * (g.dim() - 1)) > 0, g.float(), 0.0)
            sums[n] += torch.tensordot(factor, g, dims=1)
        norms[sl] = norm
        losses[sl] = torch.where(empty, torch.full_like(loss, math.nan), loss.float())
    return ClippedBatch(sums, norms, losses, nonfinite)
