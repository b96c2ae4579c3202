"""Per-row rules for norm layers (LayerNorm, RMSNorm).

Their weight gradient is small, (B, d), so it is taken per row in the gradient hook, as
sum_t g_t * xhat_t (bias: sum_t g_t).

RMSNorms recognised by their class name only (Hugging Face's Qwen2RMSNorm, LlamaRMSNorm, ...)
are checked once per module to compute w * x/rms(x) (:func:`computes_rmsnorm`): a gated norm
or Gemma's (1 + w) form would otherwise get a wrong per-example gradient. Pure functions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_dp.privacy.engine.linear import f32


def norm_weight_rows(module: Any, kind: str, gb: Tensor, x: Tensor) -> Tensor:
    """(B, *shape) fp32 per-row weight gradient sum_t g_t * xhat_t of a LayerNorm or an RMSNorm.

    The layer type is ``kind``; from gb (B, T, *shape) fp32 and its input x (xhat in fp32: HF rounds
    it to x.dtype, a difference below bf16 precision).
    """
    x = x.reshape(gb.shape)  # (B, T, *shape)
    if kind == "layernorm":
        return (gb * F.layer_norm(f32(x), module.normalized_shape, eps=module.eps)).sum(1)
    return (gb * rms_normalized(module, x, gb.dim() - 2)).sum(1)


def rms_normalized(module: Any, x: Tensor, ndim: int) -> Tensor:
    """fp32 x / sqrt(mean(x^2) + eps) over the last ``ndim`` dims.

    torch.nn.RMSNorm semantics: eps=None is the input dtype's machine epsilon.
    """
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    eps, xf = torch.finfo(x.dtype).eps if eps is None else eps, f32(x)
    return xf * torch.rsqrt(xf.square().mean(tuple(range(-ndim, 0)), keepdim=True) + eps)


def computes_rmsnorm(module: Any, num_args: int, x: Tensor, y: Tensor) -> bool:
    """Whether one call (``num_args`` inputs, first input x, output y) computed w * x/rms(x).

    Checked on its first row (one device sync).
    """
    if num_args != 1 or x.shape != y.shape:
        return False
    with torch.no_grad():
        xhat, y0 = rms_normalized(module, x[:1], 1), f32(y[:1])
        tol = (1e-4 if y.dtype == torch.float32 else 3e-2) * float(y0.abs().max()) + 1e-12
        return float((f32(module.weight) * xhat - y0).abs().max()) <= tol
