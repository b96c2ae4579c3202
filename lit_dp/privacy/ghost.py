"""The fast per-unit clipping engine: book-keeping ghost clipping (Bu et al. 2023).

One forward and one backward of ``sum_u loss_u``. During that pass every trainable parameter has
``requires_grad=False``, so autograd computes activation gradients only (no weight gradients);
hooks record, per layer call, the input activation ``a`` (B, T, d_in) and the output gradient
``g`` (B, T, d_out). From them, for a weight W used as ``a @ W.T`` (gradient ``g^T a``):

    per-unit squared norm, by the cheaper exact route per layer (U units, T' tokens per unit):
        ghost        sum_{t,s} (a_t . a_s)(g_t . g_s)     cost ~ U T'^2 (d_in + d_out)
        instantiate  ||g_u^T a_u||_F^2                     cost ~ U T' d_in d_out
    clip factors     c_u = min(1, C / ||grad_u||)
    clipped sum      ghost: sum_u c_u g_u^T a_u = (c g)^T a      one matmul, no 2nd backward
                     instantiate: sum_u c_u G_u from the kept G_u = g_u^T a_u (one GEMV)

The route is a memory rule: instantiate where the U per-unit gradients take no more memory than
the layer's stored (a, g), T'(d_in + d_out) > d_in d_out, which is also where they are cheaper to
compute than Gram matrices. There the per-unit gradients replace (a, g): the norm pass is the
only weight-gradient-sized matmul of the layer, as in non-private training.

Embeddings (gradient = index_add of g at the token ids) take the exact per-unit norm through
segment sums over (unit, token id) pairs, O(T d). A weight shared by an Embedding and a Linear
(tied input/output embeddings) gets the norm of the SUM of both uses: the cross term
2 <G_emb, G_head> = 2 sum_{t,s} dlogits[s, x_t] <g_emb_t, h_s> is added (O(T^2 d)).
Norm layers (RMSNorm, LayerNorm) and Linear biases have small per-row gradients (B, d), taken in
the gradient hook. Other modules with trainable parameters raise ValueError (see layer_kind).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_dp.models import BITLINEAR_TYPES, bitlinear_input

if TYPE_CHECKING:  # per_sample imports this module; the layout is only duck-typed here
    from lit_dp.privacy.per_sample import Units

# Largest temporary (elements) a norm computation may allocate at once; units are chunked above.
_TEMP_BUDGET = 1 << 25

# The direct parameters each layer kind has a rule for; the weights of _AG_KINDS are (a, g) weights.
_WB, _W = ("weight", "bias"), ("weight",)
_KIND_PARAMS = {"bitlinear": _WB, "linear": _WB, "embedding": _W, "rmsnorm": _W, "layernorm": _WB}
_AG_KINDS = ("linear", "bitlinear", "embedding")
# isinstance dispatch in order: AutoBitLinear before nn.Linear (it subclasses it).
_BUILTIN: tuple[tuple[type | tuple[type, ...], str], ...] = (
    (BITLINEAR_TYPES, "bitlinear"),
    (nn.Linear, "linear"),
    (nn.Embedding, "embedding"),
    (nn.LayerNorm, "layernorm"),
    (getattr(nn, "RMSNorm", ()), "rmsnorm"),
)
_REGISTRY: list[tuple[type[nn.Module], str]] = []
_FREED = torch.empty(0)  # replaces a norm layer's stored input once its gradient is taken
_VERIFIED: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # name-matched norms found exact


def register_layer(module_type: type[nn.Module], kind: str) -> None:
    """Declare that instances of ``module_type`` compute like layer ``kind`` for the fast engine:
    "linear" (y = x W^T + b), "embedding" (nn.Embedding semantics), "rmsnorm" (y = w * x/rms(x),
    ``variance_epsilon`` or ``eps`` attribute), "layernorm" (nn.LayerNorm semantics)."""
    if kind not in _KIND_PARAMS or kind == "bitlinear":
        raise ValueError(
            f"kind={kind!r} must be one of 'linear', 'embedding', 'rmsnorm', 'layernorm'"
        )
    _REGISTRY.insert(0, (module_type, kind))


def layer_kind(module: nn.Module, *, declared_only: bool = False) -> str | None:
    """The fast-engine rule for ``module``, or None if it has none."""
    for cls, kind in (*_REGISTRY, *_BUILTIN):
        if isinstance(module, cls):
            return kind
    if declared_only:
        return None
    # HF's Qwen2RMSNorm, LlamaRMSNorm, BitNetRMSNorm... recognised by name and attributes; each
    # of their calls is then checked to compute w * x/rms(x) (see _verify_rmsnorm).
    weight = getattr(module, "weight", None)
    if (
        "rmsnorm" in type(module).__name__.lower()
        and isinstance(weight, Tensor)
        and weight.dim() == 1
        and (hasattr(module, "variance_epsilon") or hasattr(module, "eps"))
    ):
        return "rmsnorm"
    return None


# --- fp32 products (norms and clipped sums are fp32 even for a bf16 model) ------------------
def _f32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float32 else x.float()


def _bmm32(x: Tensor, y: Tensor) -> Tensor:
    return torch.bmm(_f32(x), _f32(y))


def _gram(x: Tensor) -> Tensor:
    """(U, T, d) -> (U, T, T) fp32 token Gram matrices."""
    return _bmm32(x, x.transpose(1, 2))


def _chunks(n: int, per_item: int) -> list[slice]:
    step = max(1, _TEMP_BUDGET // max(1, per_item))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


# --- per-unit squared norms ---------------------------------------------------------------
def _ghost_is_cheaper(tokens: int, d_in: int, d_out: int) -> bool:
    """T'^2 (d_in + d_out) (two Gram matrices) vs T' d_in d_out (per-unit gradient)."""
    return tokens * (d_in + d_out) <= d_in * d_out


def _keeps_per_unit(use: _Use, num_units: int, d_in: int, d_out: int) -> bool:
    """The fp32 per-unit gradients (U, d_out, d_in) fit in the memory of the stored (a, g)."""
    stored = use.a.numel() * use.a.element_size() + use.grad.numel() * use.grad.element_size()
    return num_units * d_in * d_out * 4 <= stored


def _linear_sq(use: _Use, units: Units, grams: dict) -> Tensor:
    """(U,) squared Frobenius norms of g_u^T a_u, a (U, T', d_in) and g (U, T', d_out) being
    the use's rows laid out per unit. ``grams`` keeps the last unchunked a a^T: consecutive
    layers reading one activation (q/k/v, gate/up) share it. It is keyed by the stored rows'
    memory and keeps them alive, so the key cannot be reused by another tensor. On the
    instantiate route, ``use.per_unit`` keeps the per-unit gradients when they fit (see
    _keeps_per_unit); the caller then frees (a, g)."""
    a, g = units.to_units(use.a), units.to_units(use.grad)
    num_units, tokens, d_in = a.shape
    d_out = g.shape[-1]
    out = torch.empty(num_units, dtype=torch.float32, device=a.device)
    if _ghost_is_cheaper(tokens, d_in, d_out):
        key = use.a.data_ptr(), use.a.shape, use.a.stride(), use.a.dtype
        for sl in _chunks(num_units, tokens * tokens):
            if sl.stop - sl.start < num_units:  # chunked: too large to keep
                ga = _gram(a[sl])
            elif key not in grams:
                grams.clear()
                ga = grams.setdefault(key, (use.a, _gram(a)))[1]
            else:
                ga = grams[key][1]
            out[sl] = (ga * _gram(g[sl])).flatten(1).sum(1)
    elif _keeps_per_unit(use, num_units, d_in, d_out):
        kept = torch.empty(num_units, d_out, d_in, dtype=torch.float32, device=a.device)
        for sl in _chunks(num_units, d_in * d_out):
            torch.bmm(_f32(g[sl]).transpose(1, 2), _f32(a[sl]), out=kept[sl])
        out = torch.linalg.vector_norm(kept.flatten(1), dim=1).square_()
        use.per_unit = kept
    else:
        for sl in _chunks(num_units, d_in * d_out):
            per_unit = _bmm32(g[sl].transpose(1, 2), a[sl]).flatten(1)
            out[sl] = torch.linalg.vector_norm(per_unit, dim=1).square_()
    return out


def _embedding_sq(ids: Tensor, g: Tensor, units: Units, vocab: int, pad: int | None) -> Tensor:
    """Exact per-unit ||index_add(g at ids)||^2 via segment sums over (unit, token id) keys;
    ids (B, T) long, g (B, T, d); tokens equal to padding_idx get no gradient (nn.Embedding)."""
    d = g.shape[-1]
    keys = (units.row_unit[:, None] * vocab + ids).reshape(-1)
    rows = _f32(g).reshape(-1, d)
    if pad is not None:
        keep = ids.reshape(-1) != pad
        keys, rows = keys[keep], rows[keep]
    uniq, inverse = torch.unique(keys, return_inverse=True)
    seg = rows.new_zeros(uniq.numel(), d).index_add_(0, inverse, rows)  # (K, d)
    out = torch.zeros(units.num_units, dtype=torch.float32, device=g.device)
    return out.index_add_(0, uniq // vocab, seg.pow(2).sum(1))


def _tied_cross(emb: _Use, head: _Use, units: Units) -> Tensor:
    """(U,) <G_emb_u, G_head_u> for one weight W (V, d) used as an Embedding and a Linear head.

    G_emb = sum_t e_{x_t} g_emb_t^T and G_head = sum_s dlogits_s h_s^T, so the inner product is
    sum_{t,s} dlogits[s, x_t] <g_emb_t, h_s> (padding_idx tokens excluded): O(T^2 d) per unit.
    """
    ids = units.to_units(emb.a)  # (U, Te)
    g_emb = units.to_units(emb.grad)  # (U, Te, d)
    if emb.padding_idx is not None:
        g_emb = g_emb * (ids != emb.padding_idx).unsqueeze(-1)
    h = units.to_units(head.a)  # (U, Th, d)
    dlogits = units.to_units(head.grad)  # (U, Th, V)
    num_units, t_e = ids.shape
    out = torch.empty(num_units, dtype=torch.float32, device=h.device)
    for sl in _chunks(num_units, h.shape[1] * t_e):
        index = ids[sl].unsqueeze(1).expand(-1, h.shape[1], -1)
        picked = dlogits[sl].gather(2, index)  # (u, Th, Te): dlogits[s, x_t]
        dots = _bmm32(h[sl], g_emb[sl].transpose(1, 2))  # (u, Th, Te)
        out[sl] = (_f32(picked) * dots).flatten(1).sum(1)
    return out


# --- recording ---------------------------------------------------------------------------
@dataclass
class _Use:
    """One call of a hooked layer: what its weight gradient is built from."""

    kind: str
    a: Tensor  # linear: activation (B, T, d_in); embedding: ids (B, T); norms: input x
    g: Tensor | None = None  # output gradient (B, T, d_out), set by the tensor hook
    padding_idx: int | None = None  # embedding: row that receives no gradient
    vocab: int = 0  # embedding: number of rows
    version: int = 0  # a._version when recorded: in-place changes are caught
    per_unit: Tensor | None = None  # linear: kept (U, d_out, d_in) fp32 per-unit gradients

    @property
    def grad(self) -> Tensor:
        assert self.g is not None, "the layer output received no gradient"
        return self.g


@dataclass
class _Layer:
    module: nn.Module
    kind: str
    names: dict[str, str]  # attr ("weight"/"bias") -> trainable parameter name
    uses: list[_Use] = field(default_factory=list)
    verify: bool = False  # an RMSNorm recognised by its name only: check each call's arithmetic


class GhostRecorder:
    """Book-keeping for the fast engine on one batch of B rows.

    ``with rec.record(): rec.backward(compute_loss())`` runs the activation-only pass (trainable
    parameters switched to requires_grad=False, forward hooks on every layer that owns one; both
    undone on exit); then ``squared_norms(units)`` gives the (U,) unclipped squared norms and
    ``clipped_sums(factor)`` the fp32 sums sum_u factor_u * per-unit gradient.
    Raises ValueError at construction for a trainable parameter without a rule.
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
            kind = layer_kind(module) or "unknown"
            for attr, pname in local.items():
                if attr not in _KIND_PARAMS.get(kind, ()):
                    raise ValueError(
                        f"engine='fast' has no per-example rule for trainable parameter {pname!r} "
                        f"({mod_name}.{attr} of {type(module).__name__}); use engine='vmap', "
                        "freeze it, or lit_dp.privacy.ghost.register_layer the module type"
                    )
            if kind == "embedding" and (module.max_norm or module.scale_grad_by_freq):
                raise ValueError(f"engine='fast': {mod_name} uses max_norm/scale_grad_by_freq")
            verify = kind == "rmsnorm" and not layer_kind(module, declared_only=True)
            self.layers.append(layer := _Layer(module, kind, local, verify=verify))
            for attr, pname in local.items():
                owners[pname].append((layer, attr))
        for pname, uses in owners.items():  # an (a, g) weight cannot also be a per-row parameter
            if len({layer.kind in _AG_KINDS and attr == "weight" for layer, attr in uses}) > 1:
                raise ValueError(
                    f"engine='fast' cannot combine the uses of shared parameter {pname!r}; "
                    "use engine='vmap'"
                )
        self.per_row: dict[str, Tensor] = {}  # param name -> (B, *shape) fp32 per-row gradients
        self.leaves: list[Tensor] = []
        self._captured: dict[int, Tensor] = {}  # id(BitLinear) -> its quantized input
        self._patched: list[nn.Module] = []
        self._recording = False
        self._handles: list = []

    @contextmanager
    def record(self) -> Iterator[None]:
        flags = [p.requires_grad for p in self.params.values()]
        try:
            for p in self.params.values():  # autograd computes activation gradients only
                p.requires_grad_(False)
            for layer in self.layers:
                hook = self._make_forward_hook(layer)
                self._handles.append(layer.module.register_forward_hook(hook, with_kwargs=True))
                module = layer.module
                if layer.kind == "bitlinear" and "quantized_input" not in module.__dict__:
                    self._capture_quantized_input(module)  # only BitLinearQAT has the method
            self._recording = True
            yield
        finally:
            self._recording = False
            for h in self._handles:
                h.remove()
            self._handles.clear()
            self._captured.clear()
            for module in self._patched:
                del module.__dict__["quantized_input"]
            self._patched.clear()
            for p, flag in zip(self.params.values(), flags, strict=True):
                p.requires_grad_(flag)

    def backward(self, total: Tensor) -> None:
        """Activation gradients of ``total``; the tensor hooks store each layer's g."""
        if total.requires_grad and self.leaves:
            torch.autograd.grad(total, self.leaves, allow_unused=True)
        self.leaves.clear()

    def squared_norms(self, units: Units) -> Tensor:
        """(U,) fp32 squared per-unit gradient norms over all trainable parameters."""
        sq = torch.zeros(units.num_units, dtype=torch.float32, device=units.row_unit.device)
        self._weights = _collect_weight_uses(self)
        self._units = units
        grams: dict = {}  # see _linear_sq
        for uses in self._weights.values():
            sq += _weight_sq(uses, units, grams)
        for value in self.per_row.values():
            sq += units.sum_rows(value).flatten(1).pow(2).sum(1)
        return sq

    def clipped_sums(self, factor: Tensor) -> dict[str, Tensor]:
        """fp32 sum over units of factor (U,) times each unit's gradient, by parameter name;
        units with factor 0 are dropped (their values may be non-finite)."""
        c_row = factor[self._units.row_unit]  # (B,): every row takes its unit's factor
        zero_rows = None if bool(factor.ne(0).all()) else c_row == 0
        grads: dict[str, Tensor] = {}
        for name, p in self.params.items():
            parts = [
                _clipped(u, factor, c_row, zero_rows, p.shape) for u in self._weights.pop(name, [])
            ]
            value = self.per_row.pop(name, None)  # (B, *shape)
            if value is not None:
                if zero_rows is not None:
                    value = torch.where(zero_rows.view(-1, *[1] * (value.dim() - 1)), 0.0, value)
                parts.append((c_row @ value.flatten(1)).view(p.shape))
            if not parts:  # trainable but not used in the forward pass
                parts = [torch.zeros(p.shape, dtype=torch.float32, device=p.device)]
            grads[name] = sum(parts[1:], parts[0])
        return grads

    def _rows(self, x: Tensor, name: str) -> Tensor:
        """(B, ..., d) -> (B, T, d): the layer must see the batch in dim 0."""
        if x.dim() < 2 or x.shape[0] != self.batch_size:
            raise ValueError(
                f"engine='fast': layer {name} saw an input of shape {tuple(x.shape)} whose first "
                f"dimension is not the batch ({self.batch_size}); use engine='vmap'"
            )
        return x.reshape(self.batch_size, -1, x.shape[-1]) if x.dim() != 2 else x.unsqueeze(1)

    def _capture_quantized_input(self, module: Any) -> None:
        """Keep what BitLinearQAT.forward computes anyway instead of quantizing x again."""
        original = getattr(module, "quantized_input", None)
        if original is None:  # transformers' own AutoBitLinear: _bitlinear_activation recomputes
            return

        def capture(x: Tensor) -> Tensor:
            self._captured[id(module)] = out = original(x)
            return out

        module.__dict__["quantized_input"] = capture  # instance attribute, removed by record()
        self._patched.append(module)

    def _bitlinear_activation(self, module: Any, x: Tensor) -> Tensor:
        """The activation multiplying an AutoBitLinear's weight gradient (see bitlinear_input)."""
        captured = self._captured.pop(id(module), None)
        if captured is not None:
            return captured.detach()
        self._recording = False  # its rms_norm submodule runs again here: do not record that
        try:
            with torch.no_grad():
                return bitlinear_input(module, x)
        finally:
            self._recording = True

    def _make_forward_hook(self, layer: _Layer) -> Callable:
        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> Tensor | None:
            if not (self._recording and torch.is_grad_enabled() and isinstance(output, Tensor)):
                return None
            x = args[0] if args else next(iter(kwargs.values()))
            kind, name = layer.kind, next(iter(layer.names.values()))
            if kind == "bitlinear":
                use = _Use("linear", self._rows(self._bitlinear_activation(module, x), name))
            elif kind == "linear":
                use = _Use("linear", self._rows(x.detach(), name), version=x._version)
            elif kind == "embedding":
                use = _Use(
                    "embedding", x, padding_idx=module.padding_idx, vocab=module.num_embeddings
                )
            else:  # norm layers: keep x until the gradient arrives, then keep (B, d) only
                if layer.verify and module not in _VERIFIED:
                    _verify_rmsnorm(module, len(args) + len(kwargs), x, output, name)
                use = _Use(kind, x.detach(), version=x._version)
            layer.uses.append(use)
            forced = not output.requires_grad
            if forced:  # first trainable layer: start the activation-gradient graph here
                output = output.detach().requires_grad_(True)
                self.leaves.append(output)
            output.register_hook(self._make_grad_hook(layer, use))
            return output if forced else None

        return hook

    def _make_grad_hook(self, layer: _Layer, use: _Use) -> Callable:
        def hook(grad: Tensor) -> None:
            g = grad.detach()
            if use.kind in ("linear", "embedding"):
                use.g = g.reshape(*use.a.shape[:2], -1)  # (B, T, d_out)
                if "bias" in layer.names:  # (B, d_out)
                    self._add_row_grad(layer.names["bias"], _f32(use.g).sum(1))
                return
            x, use.a = use.a, _FREED  # (B, ..., d); freed after this hook
            _check_version(x, use.version, layer)
            module: Any = layer.module
            shape = module.normalized_shape if layer.kind == "layernorm" else module.weight.shape
            gb = _f32(g).reshape(self.batch_size, -1, *shape)  # (B, T, *shape)
            if "weight" in layer.names:  # sum_t g_t * xhat_t
                self._add_row_grad(
                    layer.names["weight"], _norm_weight_rows(module, layer.kind, gb, x)
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


def _norm_weight_rows(module: Any, kind: str, gb: Tensor, x: Tensor) -> Tensor:
    """(B, *shape) fp32 per-row weight gradient sum_t g_t * xhat_t of a LayerNorm or an RMSNorm
    (xhat in fp32: HF rounds it to x.dtype, a difference below bf16 precision)."""
    x = x.reshape(gb.shape)  # (B, T, *shape)
    if kind == "layernorm":
        return (gb * F.layer_norm(_f32(x), module.normalized_shape, eps=module.eps)).sum(1)
    return (gb * _rms_normalized(module, x, gb.dim() - 2)).sum(1)


def _rms_normalized(module: Any, x: Tensor, ndim: int) -> Tensor:
    """fp32 x / sqrt(mean(x^2) + eps) over the last ``ndim`` dims (torch.nn.RMSNorm semantics:
    eps=None is the input dtype's machine epsilon)."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    eps, xf = torch.finfo(x.dtype).eps if eps is None else eps, _f32(x)
    return xf * torch.rsqrt(xf.square().mean(tuple(range(-ndim, 0)), keepdim=True) + eps)


def _verify_rmsnorm(module: Any, num_args: int, x: Tensor, y: Tensor, name: str) -> None:
    """Fail closed for a module taken for an RMSNorm by its name (a gated norm would get a wrong
    per-example gradient): check y = w * x/rms(x) on one row of its first call (one sync)."""
    if num_args == 1 and x.shape == y.shape:
        with torch.no_grad():
            xhat, y0 = _rms_normalized(module, x[:1], 1), _f32(y[:1])
            tol = (1e-4 if y.dtype == torch.float32 else 3e-2) * float(y0.abs().max()) + 1e-12
            if float((_f32(module.weight) * xhat - y0).abs().max()) <= tol:
                return _VERIFIED.add(module)
    raise ValueError(
        f"engine='fast': {type(module).__name__} ({name}) does not compute w * x/rms(x); use "
        "engine='vmap', or ghost.register_layer(cls, 'rmsnorm') if its weight gradient is "
        "g * x/rms(x) (e.g. y = (1 + w) * x/rms(x))"
    )


def _collect_weight_uses(recorder: GhostRecorder) -> dict[str, list[_Use]]:
    """(a, g) uses per weight parameter; calls of one kind are concatenated along tokens."""
    out: dict[str, list[_Use]] = {}
    for layer in recorder.layers:
        name = layer.names.get("weight")
        if name is None or layer.kind not in _AG_KINDS:
            continue
        for use in (u for u in layer.uses if u.kind == "linear"):
            _check_version(use.a, use.version, layer)
        out.setdefault(name, []).extend(u for u in layer.uses if u.g is not None)
        layer.uses = []
    for name, uses in out.items():
        merged = []
        for kind in ("linear", "embedding"):
            same = [u for u in uses if u.kind == kind]
            if len({u.padding_idx for u in same}) > 1:
                raise ValueError(f"engine='fast': embeddings using {name!r} differ in padding_idx")
            if len(same) > 1:  # several calls: one use over the concatenated tokens
                a, g = torch.cat([u.a for u in same], 1), torch.cat([u.grad for u in same], 1)
                same = [_Use(kind, a, g, padding_idx=same[0].padding_idx, vocab=same[0].vocab)]
            merged += same
        out[name] = merged
    return out


def _weight_sq(uses: list[_Use], units: Units, grams: dict) -> Tensor:
    """(U,) squared norm of one weight's per-unit gradient, summed over its uses."""
    lin = next((u for u in uses if u.kind == "linear"), None)
    emb = next((u for u in uses if u.kind == "embedding"), None)
    sq = torch.zeros(units.num_units, dtype=torch.float32, device=units.row_unit.device)
    if lin is not None:
        sq += _linear_sq(lin, units, grams)
    if emb is not None:
        sq += _embedding_sq(emb.a, emb.grad, units, emb.vocab, emb.padding_idx)
    if lin is not None and emb is not None:  # tied: ||G_lin + G_emb||^2 has a cross term
        sq += 2.0 * _tied_cross(emb, lin, units)
    if lin is not None and lin.per_unit is not None:  # (a, g) are no longer needed
        lin.a = lin.g = _FREED
    return sq


def _clipped(
    use: _Use, factor: Tensor, c_row: Tensor, zero_rows: Tensor | None, shape: torch.Size
) -> Tensor:
    """sum_rows c_row * (this call's per-row weight gradient), fp32, of the weight's shape;
    c_row = factor[row_unit], and ``zero_rows`` marks the rows of units with factor 0."""
    if use.per_unit is not None:  # kept (U, d_out, d_in): sum_u factor_u G_u
        kept = use.per_unit.flatten(1)
        if zero_rows is not None:  # factor 0: dropped (the unit's values may be non-finite)
            live = factor != 0
            kept, factor = kept[live], factor[live]
        return (factor @ kept).view(shape)
    g = use.grad
    if zero_rows is not None:
        g = torch.where(zero_rows.view(-1, *[1] * (g.dim() - 1)), 0.0, g)
    if use.kind == "embedding":
        ids = use.a.reshape(-1)
        rows = (_f32(g) * c_row.view(-1, 1, 1)).reshape(-1, g.shape[-1])
        if use.padding_idx is not None:
            keep = ids != use.padding_idx
            ids, rows = ids[keep], rows[keep]
        return rows.new_zeros(shape).index_add_(0, ids, rows)
    a = use.a
    if zero_rows is not None:
        a = torch.where(zero_rows.view(-1, 1, 1), 0.0, a)
    scale = c_row.view(-1, 1, 1)  # fp32: scale the narrower of the two
    g, a = (_f32(g) * scale, a) if g.shape[-1] <= a.shape[-1] else (g, _f32(a) * scale)
    d_out, d_in = g.shape[-1], a.shape[-1]
    return torch.mm(_f32(g.reshape(-1, d_out)).t(), _f32(a.reshape(-1, d_in)))
