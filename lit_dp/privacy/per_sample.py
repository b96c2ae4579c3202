"""Per-unit gradient norms and clipped gradient sums for causal LMs: the public entry points.

A privacy unit is one row of the batch, or all rows sharing ``batch["unit_ids"]`` (user-level DP).
Its loss is the mean token cross-entropy over its label tokens (HF shift: logits[:, :-1] predict
labels[:, 1:], -100 ignored), computed here in fp32 from the logits, never by the model. Its
gradient g_u covers every trainable parameter (a tied weight once: the sum of both uses). Output:

    sum_u g_u * min(1, C / ||g_u||)      (fp32; units with a non-finite gradient contribute zero)

Three engines agree up to floating-point error (their code is in lit_dp.privacy.engine, whose
docstring maps its files):
    "fast"  book-keeping ghost clipping, one forward + one activation-only backward
    "vmap"  torch.func: vmap(grad) of the per-unit loss over units, in memory-bounded chunks
    "loop"  reference: one forward and torch.autograd.grad per unit

The fast engine has a rule per layer kind; :func:`register_layer` declares the kind of a module
type it does not know (:func:`layer_kind` says which kind a module gets).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from lit_dp.privacy.engine.fast import fast_clip
from lit_dp.privacy.engine.job import ClippedBatch, Job
from lit_dp.privacy.engine.loop import loop_clip
from lit_dp.privacy.engine.loss import per_example_losses
from lit_dp.privacy.engine.registry import layer_kind, register_layer
from lit_dp.privacy.engine.units import Units, unit_layout
from lit_dp.privacy.engine.vmap import vmap_clip

__all__ = [
    "ENGINES",
    "ClippedBatch",
    "Units",
    "clipped_grad_sum",
    "layer_kind",
    "per_example_clip",
    "per_example_losses",
    "register_layer",
]

ENGINES = ("fast", "vmap", "loop")
_RUN = {"fast": fast_clip, "vmap": vmap_clip, "loop": loop_clip}


def per_example_clip(
    model: nn.Module, batch: dict[str, Any], *, max_grad_norm: float, engine: str = "fast"
) -> ClippedBatch:
    """Per-unit clipped gradient sum of ``model`` on ``batch``.

    Args:
        model: a Hugging Face causal LM (or any module taking input_ids/attention_mask and
            returning logits); its trainable parameters are those with requires_grad.
        batch: ``input_ids`` (B, T), ``attention_mask`` (B, T), ``labels`` (B, T) with -100
            ignored, optionally ``unit_ids`` (B,); other keys are ignored. B may be 0.
        max_grad_norm: clip bound C > 0 in gradient-norm units (L2 over all trainable
            parameters); ``inf`` disables clipping.
        engine: "fast", "vmap" or "loop".

    Returns:
        ClippedBatch. ``p.grad``, hooks and requires_grad flags are left as they were.
    """
    max_grad_norm = _check_max_grad_norm(max_grad_norm)
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is not one of {ENGINES}")
    params = _trainable_parameters(model)
    input_ids = batch["input_ids"]
    labels = batch["labels"]
    attention_mask = batch.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    rows = int(input_ids.shape[0])
    device = input_ids.device
    if rows == 0:  # empty Poisson batch: a noise-only step
        grads = {
            n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()
        }
        empty = torch.zeros(0, dtype=torch.float32, device=device)
        return ClippedBatch(grads, empty, empty.clone(), 0)
    units = unit_layout(batch.get("unit_ids"), rows, device)
    counts = units.sum_rows((labels[:, 1:] != -100).sum(1))  # (U,) label tokens per unit
    job = Job(model, params, input_ids, attention_mask, labels, units, counts, max_grad_norm)
    if torch.is_inference_mode_enabled():
        raise RuntimeError("per_example_clip needs autograd: call it outside torch.inference_mode")
    with torch.enable_grad():  # also under a caller's torch.no_grad()
        return _RUN[engine](job)


def clipped_grad_sum(
    model: nn.Module, batch: dict[str, Any], *, max_grad_norm: float, engine: str = "fast"
) -> tuple[dict[str, Tensor], Tensor]:
    """``(grads, norms)`` of :func:`per_example_clip` (see there)."""
    out = per_example_clip(model, batch, max_grad_norm=max_grad_norm, engine=engine)
    return out.grads, out.norms


def _check_max_grad_norm(max_grad_norm: float) -> float:
    try:
        value = float(max_grad_norm)
    except (TypeError, ValueError):
        raise ValueError(
            f"max_grad_norm={max_grad_norm!r} must be a positive number (or inf)"
        ) from None
    if math.isnan(value) or value <= 0:
        raise ValueError(f"max_grad_norm={max_grad_norm!r} must be > 0 (inf disables clipping)")
    return value


def _trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters by their first name (named_parameters drops tied duplicates)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
