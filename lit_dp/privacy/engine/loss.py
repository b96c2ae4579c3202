"""The per-unit loss all engines differentiate, computed in fp32 from the logits.

loss_u = mean token cross-entropy over the label tokens of unit u (HF shift: logits[:, :-1]
predict labels[:, 1:], -100 ignored); nan for a unit without label tokens.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_dp.privacy.engine.units import Units


def per_example_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """(B,) fp32 mean shifted token cross-entropy per row over its label tokens.

    A row without label tokens gets nan (filter it before averaging); its gradient is zero, not
    nan, so ``torch.where(has_labels, losses, 0).sum().backward()`` is safe.
    """
    total, count = row_loss_sums(logits, labels)
    safe = total / count.clamp(min=1)
    return torch.where(count > 0, safe, torch.full_like(safe, math.nan))


def extra_kwargs(model: nn.Module) -> dict[str, Any]:
    """``use_cache=False`` for a Hugging Face model (no KV cache in training), else nothing."""
    config = getattr(model, "config", None)
    return {"use_cache": False} if hasattr(config, "use_cache") else {}


def logits_of(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, T, V) logits of ``model`` (an HF output's ``.logits`` or the first output)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, **extra_kwargs(model))
    return out.logits if hasattr(out, "logits") else out[0]


def row_loss_sums(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(B,) fp32 summed shifted token CE and (B,) label-token counts per row.

    Labels are shifted left (with -100 appended) instead of slicing the logits, so an fp32
    (B, T, V) logits tensor is read in place.
    """
    rows, seq, vocab = logits.shape
    shifted = torch.cat([labels[:, 1:], labels.new_full((rows, 1), -100)], dim=1)
    ce = F.cross_entropy(
        logits.reshape(-1, vocab).float(), shifted.reshape(-1), ignore_index=-100, reduction="none"
    )
    return ce.view(rows, seq).sum(1), (shifted != -100).sum(1)


def unit_losses(row_sums: Tensor, units: Units, counts: Tensor) -> Tensor:
    """(U,) mean token CE per unit, nan for a unit without label tokens."""
    sums = units.sum_rows(row_sums)
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, math.nan))
