"""Recording for the fast engine: one forward and one activation-only backward, with hooks.

During the pass every trainable parameter has ``requires_grad=False``, so autograd computes
activation gradients only (no weight gradients). Forward hooks on every module owning a
trainable parameter record each call's input a; tensor hooks on its output record the output
gradient g. (a, g) layers (registry.AG_KINDS) keep both for the plan; norm layers and Linear
biases turn theirs into small (B, *shape) per-row gradients in the gradient hook and free the
input. :meth:`GhostRecorder.plan` hands everything to a :class:`~.clip_plan.ClipPlan`.

Recording only: the arithmetic is in linear.py, embedding.py, norms.py and clip_plan.py; which
rule a module gets is in registry.py.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lit_dp.privacy.engine.clip_plan import FREED, ClipPlan, LayerCall
from lit_dp.privacy.engine.linear import f32
from lit_dp.privacy.engine.norms import computes_rmsnorm, norm_weight_rows
from lit_dp.privacy.engine.registry import (
    AG_KINDS,
    KIND_PARAMS,
    LayerRule,
    layer_rule,
    overridden_forward,
)
from lit_dp.privacy.engine.units import Units

_VERIFIED: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # name-matched norms found exact
_REGISTER_HINT = "lit_dp.privacy.per_sample.register_layer"


@dataclass
class _Layer:
    module: nn.Module
    rule: LayerRule
    names: dict[str, str]  # attr ("weight"/"bias") -> trainable parameter name
    uses: list[LayerCall] = field(default_factory=list)
    verify: bool = False  # an RMSNorm recognised by its name only: check each call's arithmetic

    @property
    def kind(self) -> str:
        return self.rule.kind


class GhostRecorder:
    """Records one activation-only pass over a batch of B rows for the fast engine.

    ``with rec.record(): rec.backward(compute_loss())`` runs the pass (trainable parameters
    switched to requires_grad=False, hooks on every layer that owns one; both undone on exit);
    then ``rec.plan(units)`` returns the :class:`~.plan.ClipPlan` of the recorded pass.

    Raises:
        ValueError: at construction, for a trainable parameter without a rule.
    """

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], batch_size: int) -> None:
        self.params = params
        self.batch_size = batch_size
        self.layers: list[_Layer] = []
        by_id = {id(p): n for n, p in params.items()}
        owners: dict[str, list[tuple[_Layer, str]]] = {n: [] for n in params}
        for mod_name, module in model.named_modules():
            local = {a: by_id[id(p)] for a, p in module._parameters.items() if id(p) in by_id}
            if not local:
                continue
            rule = layer_rule(module) or LayerRule("unknown")
            for attr, pname in local.items():
                if attr not in KIND_PARAMS.get(rule.kind, ()):
                    raise ValueError(_no_rule_message(module, mod_name, attr, pname))
            if rule.kind == "embedding" and (module.max_norm or module.scale_grad_by_freq):
                raise ValueError(f"engine='fast': {mod_name} uses max_norm/scale_grad_by_freq")
            verify = rule.kind == "rmsnorm" and not layer_rule(module, declared_only=True)
            self.layers.append(layer := _Layer(module, rule, local, verify=verify))
            for attr, pname in local.items():
                owners[pname].append((layer, attr))
        for pname, uses in owners.items():  # an (a, g) weight cannot also be a per-row parameter
            if len({layer.kind in AG_KINDS and attr == "weight" for layer, attr in uses}) > 1:
                raise ValueError(
                    f"engine='fast' cannot combine the uses of shared parameter {pname!r}; "
                    "use engine='vmap'"
                )
        self.per_row: dict[str, Tensor] = {}  # param name -> (B, *shape) fp32 per-row gradients
        self.leaves: list[Tensor] = []
        self._captured: dict[int, Tensor] = {}  # id(module) -> its captured activation
        self._patched: list[tuple[nn.Module, str]] = []
        self._recording = False
        self._handles: list = []

    @contextmanager
    def record(self) -> Iterator[None]:
        """Hooks in place and trainable parameters frozen inside; restored on exit."""
        flags = [p.requires_grad for p in self.params.values()]
        try:
            for p in self.params.values():  # autograd computes activation gradients only
                p.requires_grad_(False)
            for layer in self.layers:
                hook = self._make_forward_hook(layer)
                self._handles.append(layer.module.register_forward_hook(hook, with_kwargs=True))
                capture = layer.rule.capture
                if capture is not None and capture not in layer.module.__dict__:
                    self._capture_activation(layer.module, capture)
            self._recording = True
            yield
        finally:
            self._recording = False
            for h in self._handles:
                h.remove()
            self._handles.clear()
            self._captured.clear()
            for module, attr in self._patched:
                del module.__dict__[attr]
            self._patched.clear()
            for p, flag in zip(self.params.values(), flags, strict=True):
                p.requires_grad_(flag)

    def backward(self, total: Tensor) -> None:
        """Activation gradients of ``total``; the tensor hooks store each layer's g."""
        if total.requires_grad and self.leaves:
            torch.autograd.grad(total, self.leaves, allow_unused=True)
        self.leaves.clear()

    def plan(self, units: Units) -> ClipPlan:
        """Hand the recorded pass over to a :class:`~.plan.ClipPlan` (once, after backward).

        Raises:
            RuntimeError: a recorded layer input was modified in place after its call.
        """
        weight_calls: dict[str, list[LayerCall]] = {}
        for layer in self.layers:
            name = layer.names.get("weight")
            if name is None or layer.kind not in AG_KINDS:
                continue
            for use in (u for u in layer.uses if u.kind == "linear"):
                _check_version(use.a, use.version, layer)
            weight_calls.setdefault(name, []).extend(u for u in layer.uses if u.g is not None)
            layer.uses = []
        per_row, self.per_row = self.per_row, {}
        return ClipPlan(self.params, weight_calls, per_row, units)

    def _rows(self, x: Tensor, name: str) -> Tensor:
        """(B, ..., d) -> (B, T, d): the layer must see the batch in dim 0."""
        if x.dim() < 2 or x.shape[0] != self.batch_size:
            raise ValueError(
                f"engine='fast': layer {name} saw an input of shape {tuple(x.shape)} whose first "
                f"dimension is not the batch ({self.batch_size}); use engine='vmap'"
            )
        return x.reshape(self.batch_size, -1, x.shape[-1]) if x.dim() != 2 else x.unsqueeze(1)

    def _capture_activation(self, module: nn.Module, attr: str) -> None:
        """Keep what ``module.<attr>`` computes in the forward instead of computing it again."""
        original = getattr(module, attr, None)
        if original is None:  # no such method: _activation recomputes
            return

        def capture(x: Tensor) -> Tensor:
            self._captured[id(module)] = out = original(x)
            return out

        module.__dict__[attr] = capture  # instance attribute, removed by record()
        self._patched.append((module, attr))

    def _activation(self, layer: _Layer, x: Tensor) -> Tensor:
        """The tensor multiplying a "bitlinear" layer's weight gradient (its rule's activation)."""
        captured = self._captured.pop(id(layer.module), None)
        if captured is not None:
            return captured.detach()
        assert layer.rule.activation is not None  # register_layer requires it for "bitlinear"
        self._recording = False  # submodules (e.g. an input RMSNorm) run again: do not record
        try:
            with torch.no_grad():
                return layer.rule.activation(layer.module, x)
        finally:
            self._recording = True

    def _make_forward_hook(self, layer: _Layer) -> Callable:
        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> Tensor | None:
            if not (self._recording and torch.is_grad_enabled() and isinstance(output, Tensor)):
                return None
            x = args[0] if args else next(iter(kwargs.values()))
            kind, name = layer.kind, next(iter(layer.names.values()))
            if kind == "bitlinear":
                use = LayerCall("linear", self._rows(self._activation(layer, x), name))
            elif kind == "linear":
                use = LayerCall("linear", self._rows(x.detach(), name), version=x._version)
            elif kind == "embedding":
                use = LayerCall(
                    "embedding", x, padding_idx=module.padding_idx, vocab=module.num_embeddings
                )
            else:  # norm layers: keep x until the gradient arrives, then keep (B, d) only
                if layer.verify and module not in _VERIFIED:
                    if not computes_rmsnorm(module, len(args) + len(kwargs), x, output):
                        raise ValueError(_not_rmsnorm_message(module, name))
                    _VERIFIED.add(module)
                use = LayerCall(kind, x.detach(), version=x._version)
            layer.uses.append(use)
            forced = not output.requires_grad
            if forced:  # first trainable layer: start the activation-gradient graph here
                output = output.detach().requires_grad_(True)
                self.leaves.append(output)
            output.register_hook(self._make_grad_hook(layer, use))
            return output if forced else None

        return hook

    def _make_grad_hook(self, layer: _Layer, use: LayerCall) -> Callable:
        def hook(grad: Tensor) -> None:
            g = grad.detach()
            if use.kind in ("linear", "embedding"):
                use.g = g.reshape(*use.a.shape[:2], -1)  # (B, T, d_out)
                if "bias" in layer.names:  # (B, d_out)
                    self._add_row_grad(layer.names["bias"], f32(use.g).sum(1))
                return
            x, use.a = use.a, FREED  # (B, ..., d); freed after this hook
            _check_version(x, use.version, layer)
            module: Any = layer.module
            shape = module.normalized_shape if layer.kind == "layernorm" else module.weight.shape
            gb = f32(g).reshape(self.batch_size, -1, *shape)  # (B, T, *shape)
            if "weight" in layer.names:  # sum_t g_t * xhat_t
                self._add_row_grad(
                    layer.names["weight"], norm_weight_rows(module, layer.kind, gb, x)
                )
            if "bias" in layer.names:
                self._add_row_grad(layer.names["bias"], gb.sum(1))

        return hook

    def _add_row_grad(self, name: str, value: Tensor) -> None:
        prev = self.per_row.get(name)
        self.per_row[name] = value if prev is None else prev + value


def _check_version(t: Tensor, version: int, layer: _Layer) -> None:
    if t._version != version:  # weights need no saved input, so autograd would not notice
        raise RuntimeError(
            f"engine='fast': the input of {type(layer.module).__name__} "
            f"({next(iter(layer.names.values()))}) was modified in place; use engine='vmap'"
        )


def _no_rule_message(module: nn.Module, mod_name: str, attr: str, pname: str) -> str:
    where = f"{mod_name}.{attr} of {type(module).__name__}"
    base = overridden_forward(module)
    why = (
        f"; it subclasses {base.__name__} but overrides forward, so {base.__name__}'s rule may "
        "not hold (importing lit_dp.models or lit_dp.bitnet registers BitNet's AutoBitLinear)"
        if base is not None
        else ""
    )
    return (
        f"engine='fast' has no per-example rule for trainable parameter {pname!r} ({where}){why}; "
        f"use engine='vmap', freeze it, or {_REGISTER_HINT} the module type"
    )


def _not_rmsnorm_message(module: nn.Module, name: str) -> str:
    """Fail closed for a module taken for an RMSNorm by its name.

    A gated norm would get a wrong per-example gradient.
    """
    return (
        f"engine='fast': {type(module).__name__} ({name}) does not compute w * x/rms(x); use "
        f"engine='vmap', or {_REGISTER_HINT}(cls, 'rmsnorm') if its weight gradient is "
        "g * x/rms(x) (e.g. y = (1 + w) * x/rms(x))"
    )
