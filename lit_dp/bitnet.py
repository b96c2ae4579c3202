"""BitNet b1.58 quantization-aware training layers, and their per-example rule.

transformers' ``AutoBitLinear`` (online mode) computes ``F.linear(q(x), q(W))`` with 8-bit
per-token activations q(x) and ternary absmean weights q(W), both with straight-through
gradients; :class:`BitLinearQAT` is the same layer with eager quantizers. Their weight gradient
is ``grad_out^T q(x)``, not the nn.Linear rule ``grad_out^T x``: importing this module registers
that rule with the fast clipping engine (``register_layer(..., "bitlinear", activation=...)``),
so the privacy core needs no transformers import. lit_dp.models imports this module, so every
model built or loaded through it has the rule; without the registration the fast engine refuses
these layers (they override nn.Linear.forward) instead of clipping with the wrong rule.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.bitnet import AutoBitLinear

from lit_dp.privacy.engine.registry import register_layer

# Module types whose weight gradient is grad_out^T * (quantized input); see bitlinear_input.
BITLINEAR_TYPES: tuple[type[nn.Module], ...] = (AutoBitLinear,)


def _ternary_weights(weight: torch.Tensor) -> torch.Tensor:
    """BitNet b1.58 weight quantizer: round(W / mean|W|) clamped to {-1, 0, 1}, times mean|W|."""
    w = weight.float()
    scale = 1.0 / w.abs().mean().clamp(min=1e-5)
    return ((w * scale).round().clamp(-1, 1) / scale).to(weight.dtype)


def _int8_activations(x: torch.Tensor) -> torch.Tensor:
    """BitNet b1.58 activation quantizer: symmetric 8 bit, absmax scale per token (last dim)."""
    xf = x.float()
    scale = 127.0 / xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return ((xf * scale).round().clamp(-128, 127) / scale).to(x.dtype)


class BitLinearQAT(AutoBitLinear):
    """``AutoBitLinear`` in online mode with the quantizers run eagerly.

    Same arithmetic and straight-through estimator as transformers' online AutoBitLinear; its
    quantizers are ``torch.compile``-decorated, which costs ~20 s per new shape on a CPU, so this
    subclass applies them as ``x + (q(x) - x).detach()`` instead (identical forward values and
    identity gradients).
    """

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """The activation that multiplies the weight in the forward pass (and in its gradient)."""
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        return x + (_int8_activations(x) - x).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w_q = w + (_ternary_weights(w) - w).detach()
        return F.linear(self.quantized_input(x), w_q, self.bias)


def bitlinear_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Activation multiplying an AutoBitLinear's weight gradient, for per-example clipping.

    With online quantization the weight gradient of ``F.linear(q(x), q(W))`` under the STE is
    ``grad_out^T q(x)``: the quantized (and, if configured, RMS-normalized) activation.
    """
    if isinstance(module, BitLinearQAT):
        return module.quantized_input(x)
    layer: Any = module  # transformers' own AutoBitLinear
    if not layer.online_quant and layer.weight.requires_grad:
        # Offline mode multiplies the output by weight_scale, so the weight gradient is not
        # grad_out^T q(x): a per-unit norm from this rule would not bound the real gradient.
        raise ValueError(
            "a trainable AutoBitLinear with online_quant=False (packed ternary weights scaled by "
            "weight_scale) is not supported by the per-example rule; train the latent weights "
            "with online quantization (lit_dp.bitnet.convert_to_bitnet, or model.bitnet: true), "
            "or freeze the layer (e.g. LoRA over it)"
        )
    if layer.rms_norm is not None:
        x = layer.rms_norm(x)
    return _int8_activations(x)  # the activation is quantized in both modes


def convert_to_bitnet(model: nn.Module, *, skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Swap every ``nn.Linear`` for transformers' ``AutoBitLinear`` with online quantization.

    Modules whose name ends with an entry of ``skip`` are left as they are; the weights are copied
    in place.

    The copied full-precision weights become the latent weights of quantization-aware training:
    the forward pass uses ternary weights (absmean scaling) and 8-bit per-token activations;
    gradients reach the latent weights through a straight-through estimator.
    """
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or isinstance(module, AutoBitLinear):
            continue
        if any(name == s or name.endswith("." + s) for s in skip):
            continue
        new = BitLinearQAT(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            device=module.weight.device,
            dtype=module.weight.dtype,
            online_quant=True,
        )
        new.weight = module.weight
        if module.bias is not None:
            new.bias = module.bias
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return model


def has_bitnet_qat(model: nn.Module) -> bool:
    """Whether ``model`` has ternary (AutoBitLinear / BitLinearQAT) layers."""
    return any(isinstance(m, BITLINEAR_TYPES) for m in model.modules())


# The fast engine's rule for both layer types (each overrides nn.Linear.forward, so each needs
# its own registration). BitLinearQAT.forward calls quantized_input: the engine keeps that value.
register_layer(AutoBitLinear, "bitlinear", activation=bitlinear_input)
register_layer(BitLinearQAT, "bitlinear", activation=bitlinear_input, capture="quantized_input")
