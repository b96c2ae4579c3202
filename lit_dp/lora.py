"""LoRA adapters for DP fine-tuning (peft): apply, detect, merge.

Kept apart from model loading so that ``lit_dp.export`` can ask whether a model carries adapters
without importing the loaders (``lit_dp.models`` re-exports these names).
"""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

from lit_dp.bitnet import has_bitnet_qat

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def apply_lora(
    model: nn.Module,
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    target_modules: list[str] | str | None = None,
) -> nn.Module:
    """Wrap ``model`` in a peft LoRA model; only adapter weights stay trainable.

    Call it after the model is on its device (adapters are created beside the wrapped weights).
    ``target_modules``: None = attention and MLP projections (``DEFAULT_LORA_TARGETS``, those
    present), "all-linear" (every Linear but lm_head), or a list of module-name suffixes.
    BitLinearQAT layers can be targeted: the frozen base keeps its ternary forward and the
    adapter adds a full-precision low-rank path.

    ``dropout`` must be 0: a dropout mask is random per forward pass, so the per-example
    gradients whose norms the clipping engines measure (vmap refuses randomness, the loop
    reference and ghost clipping run their own passes) would not be the gradients that are
    summed, and the per-example sensitivity bound max_grad_norm would not hold exactly.
    """
    if dropout != 0:
        raise ValueError(
            f"LoRA dropout={dropout} must be 0 under DP: random dropout masks differ between the "
            "passes that measure and sum per-example gradients, breaking exact clipping"
        )
    if rank < 1:
        raise ValueError(f"LoRA rank={rank} must be >= 1")
    if is_lora(model):
        raise ValueError("model already has LoRA adapters; apply_lora must run once")
    from peft import LoraConfig, get_peft_model

    if target_modules is None:
        names = {n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        target_modules = [t for t in DEFAULT_LORA_TARGETS if t in names]
        if not target_modules:
            raise ValueError(f"no module named like {DEFAULT_LORA_TARGETS}; pass target_modules")
    options: dict[str, Any] = dict(lora_alpha=alpha, target_modules=target_modules)  # alpha: float
    config = LoraConfig(r=rank, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **options)
    peft_model = get_peft_model(model, config)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    if not trainable or any("lora_" not in n for n in trainable):
        raise RuntimeError(f"LoRA must leave only adapter weights trainable, got {trainable[:5]}")
    return peft_model


def is_lora(model: nn.Module) -> bool:
    """Whether ``model`` carries peft LoRA adapters."""
    if "peft" not in sys.modules:  # peft never imported: no adapters can exist
        return False
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    return isinstance(model, PeftModel) or any(isinstance(m, LoraLayer) for m in model.modules())


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights and return the plain transformers model.

    Mutates ``model`` (export_model merges a copy). Not exact for BitLinearQAT bases: the merged
    latent weight would be re-quantized to ternary, so this raises for them.
    """
    if not is_lora(model):
        return model
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError("merge_lora needs the PeftModel returned by apply_lora")
    if has_bitnet_qat(model):
        raise ValueError(
            "LoRA over BitLinearQAT cannot be merged exactly (ternary re-quantization); "
            "export_model saves such adapters unmerged"
        )
    return model.merge_and_unload()
