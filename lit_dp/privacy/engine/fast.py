"""The "fast" engine: book-keeping ghost clipping (Bu et al. 2023).

One forward and one backward of ``sum_u loss_u`` in which autograd computes activation
gradients only (recorder.py); then, from the recorded per-layer (a, g), the per-unit squared
norms, the clip factors min(1, C / ||g_u||), and the clipped sums straight from the same (a, g)
(clip_plan.py): no second backward pass and no per-unit gradient of the whole model.
"""

from __future__ import annotations

from lit_dp.privacy.engine.job import ClippedBatch, Job, clip_factors
from lit_dp.privacy.engine.loss import logits_of, row_loss_sums, unit_losses
from lit_dp.privacy.engine.recorder import GhostRecorder


def fast_clip(job: Job) -> ClippedBatch:
    """Per-unit clipped gradient sum of ``job`` by ghost clipping.

    Raises:
        ValueError: activation checkpointing is on, or a trainable parameter has no rule
            (see registry.py).
    """
    model, units, counts = job.model, job.units, job.counts
    if getattr(model, "is_activation_checkpointing", None) or getattr(
        model, "gradient_checkpointing", 0
    ):
        raise ValueError(
            "engine='fast' cannot run with activation checkpointing; use 'vmap' or 'loop'"
        )
    weights = 1.0 / counts.clamp(min=1).float()  # (U,) token weight: loss_u is a mean
    recorder = GhostRecorder(model, job.params, int(job.input_ids.shape[0]))
    with recorder.record():  # 1. one forward, one activation-only backward of sum_u loss_u
        logits = logits_of(model, job.input_ids, job.attention_mask)
        row_sums, _ = row_loss_sums(logits, job.labels)
        del logits
        recorder.backward((row_sums * weights[units.row_unit]).sum())
    losses = unit_losses(row_sums.detach(), units, counts)
    del row_sums
    plan = recorder.plan(units)
    # 2. Per-unit norms and clip factors; 3. clipped sums straight from the stored (a, g).
    sq = plan.squared_norms()
    norms, factor, nonfinite = clip_factors(sq, counts == 0, job.max_grad_norm)
    grads = plan.clipped_sums(factor)  # factor 0 (nan/inf, no labels): dropped
    return ClippedBatch(grads, norms, losses, nonfinite)
