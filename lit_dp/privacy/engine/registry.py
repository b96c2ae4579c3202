"""Layer kinds: which per-layer rule the fast engine applies to a module's trainable parameters.

A kind names what a module computes with its direct parameters, which fixes the rule for their
per-unit gradients (g: the layer output's gradient):

    "linear"     y = x W^T + b                     weight: g^T x; bias: sum_t g
    "bitlinear"  y = act(x) q(W)^T + b, q with a straight-through gradient: weight g^T act(x);
                 ``act`` is given at registration (lit_dp.bitnet, which lit_dp.models imports,
                 registers BitNet's AutoBitLinear and BitLinearQAT: no transformers import here)
    "embedding"  nn.Embedding semantics            weight: index_add of g at the token ids
    "rmsnorm"    y = w * x/rms(x)                  weight: sum_t g * x/rms(x)
    "layernorm"  nn.LayerNorm semantics            weight: sum_t g * xhat; bias: sum_t g

:func:`layer_kind` looks a module up in the registered types (the latest registration first),
then torch's nn.Linear, nn.Embedding, nn.LayerNorm and nn.RMSNorm, then recognises Hugging
Face RMSNorms by name (whose arithmetic the recorder checks on their first call).

Fail closed: a type matches a registered or built-in class only if it does not override that
class's ``forward``. transformers' AutoBitLinear subclasses nn.Linear but quantizes x and W, so
without its registration it has no kind, and the engine refuses its trainable weights instead
of applying the nn.Linear rule to the wrong activation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

# The direct parameters each kind has a rule for. The weights of AG_KINDS are (a, g) weights:
# their per-unit gradient is built from the layer input a and output gradient g (clip_plan.py);
# the others have small per-row gradients taken in the gradient hook (recorder.py).
_WB, _W = ("weight", "bias"), ("weight",)
KIND_PARAMS = {"bitlinear": _WB, "linear": _WB, "embedding": _W, "rmsnorm": _W, "layernorm": _WB}
AG_KINDS = ("linear", "bitlinear", "embedding")


@dataclass(frozen=True)
class LayerRule:
    """The rule for one module type.

    Attributes:
        kind: one of ``KIND_PARAMS``.
        activation: "bitlinear" only: ``activation(module, x)`` -> the tensor multiplying the
            weight gradient (B, ..., d_in), computed again under no_grad when not captured.
        capture: "bitlinear" only, optional: name of a method of the module that its forward
            calls to compute exactly that activation; the recorder wraps it on the instance while
            recording, so the forward's value is kept instead of computed twice.
    """

    kind: str
    activation: Callable[[nn.Module, Tensor], Tensor] | None = None
    capture: str | None = None


_BUILTIN: tuple[tuple[type[nn.Module], LayerRule], ...] = tuple(
    (cls, LayerRule(kind))
    for cls, kind in (
        (nn.Linear, "linear"),
        (nn.Embedding, "embedding"),
        (nn.LayerNorm, "layernorm"),
        (getattr(nn, "RMSNorm", None), "rmsnorm"),  # torch >= 2.4
    )
    if isinstance(cls, type)
)
_REGISTRY: list[tuple[type[nn.Module], LayerRule]] = []
_NAME_MATCHED_RMSNORM = LayerRule("rmsnorm")


def register_layer(
    module_type: type[nn.Module],
    kind: str,
    *,
    activation: Callable[[nn.Module, Tensor], Tensor] | None = None,
    capture: str | None = None,
) -> None:
    """Declare that instances of ``module_type`` compute like layer ``kind`` for the fast engine.

    Kinds: "linear" (y = x W^T + b), "embedding" (nn.Embedding semantics), "rmsnorm"
    (y = w * x/rms(x), ``variance_epsilon`` or ``eps`` attribute), "layernorm" (nn.LayerNorm
    semantics), or "bitlinear" (y = act(x) q(W)^T + b with a straight-through q; needs
    ``activation``, see :class:`LayerRule`). Subclasses that override ``forward`` need their own
    registration.
    """
    if kind not in KIND_PARAMS:
        raise ValueError(f"kind={kind!r} must be one of {sorted(KIND_PARAMS)}")
    if (kind == "bitlinear") != (activation is not None):
        raise ValueError(
            f"kind={kind!r}: pass activation=(module, x) -> the tensor multiplying the weight "
            "gradient for kind 'bitlinear', and only for it"
        )
    if capture is not None and kind != "bitlinear":
        raise ValueError(f"kind={kind!r}: capture= is for kind 'bitlinear' only")
    _REGISTRY.insert(0, (module_type, LayerRule(kind, activation, capture)))


def layer_rule(module: nn.Module, *, declared_only: bool = False) -> LayerRule | None:
    """The fast-engine rule for ``module``, or None if it has none (see the module docstring).

    ``declared_only`` skips the recognition of RMSNorms by name.
    """
    for cls, rule in (*_REGISTRY, *_BUILTIN):
        if _computes_like(module, cls):
            return rule
    if declared_only:
        return None
    # HF's Qwen2RMSNorm, LlamaRMSNorm, BitNetRMSNorm... recognised by name and attributes; each
    # of their calls is then checked to compute w * x/rms(x) (recorder.py).
    weight = getattr(module, "weight", None)
    if (
        "rmsnorm" in type(module).__name__.lower()
        and isinstance(weight, Tensor)
        and weight.dim() == 1
        and (hasattr(module, "variance_epsilon") or hasattr(module, "eps"))
    ):
        return _NAME_MATCHED_RMSNORM
    return None


def layer_kind(module: nn.Module, *, declared_only: bool = False) -> str | None:
    """The fast-engine kind of ``module`` ("linear", "bitlinear", ...), or None if it has none."""
    rule = layer_rule(module, declared_only=declared_only)
    return None if rule is None else rule.kind


def overridden_forward(module: nn.Module) -> type[nn.Module] | None:
    """The registered or built-in base of ``module``'s class whose forward it overrides, or None.

    That override is why ``module`` has no rule.
    """
    for cls, _ in (*_REGISTRY, *_BUILTIN):
        if isinstance(module, cls) and not _computes_like(module, cls):
            return cls
    return None


def _computes_like(module: nn.Module, cls: type[nn.Module]) -> bool:
    """An instance of ``cls`` whose class keeps ``cls.forward``.

    A subclass that overrides it may compute something else, so it does not inherit the rule of
    ``cls``.
    """
    return isinstance(module, cls) and type(module).forward is cls.forward
