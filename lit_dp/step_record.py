"""The one typed record that the DP step hands to callbacks (EMA, clip-driven LR, accounting)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DPStepRecord:
    """What one optimizer step did. Written by ``DPCausalLM.training_step``, read by callbacks.

    Fields marked "operator-side" are computed from raw (non-privatized) data: they may be logged
    for the operator but must never influence anything that reaches the weights.
    """

    step: int  # 0-based index of the optimizer step this record describes
    private: bool  # False for the non-private baseline (no clipping, no noise, no accounting)
    sample_rate: float  # q_t: global Poisson inclusion probability of each privacy unit
    noise_multiplier: float  # sigma_t as accounted (0.0 when not private)
    grad_noise_multiplier: (
        float  # multiplier applied to the gradient sum (>= sigma_t with private quantile)
    )
    max_grad_norm: float  # C_t used for this step's clipping
    expected_batch_size: float  # q_t * N, the divisor of the noisy sum
    clip_rate: float | None  # privatized fraction of units clipped (noisy count / expected batch)
    batch_size: int  # realized global batch size (operator-side)
    loss: float  # mean per-unit training loss over the batch (operator-side; nan if empty)
    num_nonfinite: int  # units whose gradient was non-finite and was zeroed (operator-side)
