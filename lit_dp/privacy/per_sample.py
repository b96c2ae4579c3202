"""Per-unit gradient norms and clipped gradient sums for causal LMs.

A privacy unit is one row of the batch, or all rows sharing ``batch["unit_ids"]`` (user-level DP).
Its loss is the mean token cross-entropy over its label tokens (HF shift: logits[:, :-1] predict
labels[:, 1:], -100 ignored), computed here in fp32 from the logits, never by the model. Its
gradient g_u covers every trainable parameter (a tied weight once: the sum of both uses). Output:

    sum_u g_u * min(1, C / ||g_u||)      (fp32; units with a non-finite gradient contribute zero)

Three engines agree up to floating-point error:
    "fast"  book-keeping ghost clipping, one forward + one activation-only backward (ghost.py)
    "vmap"  torch.func: vmap(grad) of the per-unit loss over units, in memory-bounded chunks
    "loop"  reference: one forward and torch.autograd.grad per unit
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_dp.privacy.ghost import GhostRecorder

ENGINES = ("fast", "vmap", "loop")

# Per-unit gradients the vmap engine may hold at once (elements), summed over parameters.
_VMAP_BUDGET = 1 << 26


@dataclass
class ClippedBatch:
    """Result of :func:`per_example_clip` for one physical batch of U units.

    Attributes:
        grads: parameter name -> sum_u g_u * min(1, C/||g_u||), fp32, shape of the parameter.
        norms: (U,) fp32 unclipped per-unit gradient norms (non-finite where g_u was).
        losses: (U,) fp32 detached per-unit losses (nan for a unit without label tokens).
        num_nonfinite: units whose gradient was non-finite; they contribute zero to ``grads``.
    """

    grads: dict[str, Tensor]
    norms: Tensor
    losses: Tensor
    num_nonfinite: int


@dataclass(frozen=True)
class Units:
    """How the B rows of a batch form U privacy units (units numbered by first appearance).

    A unit's tokens are the concatenation of its rows' tokens, so per-unit sums run over
    (rows, tokens): ``to_units`` lays rows out as (U, max_rows * T, ...) with zero padding.
    """

    row_unit: Tensor  # (B,) long: unit of each row
    slot: Tensor  # (B,) long: position of the row within its unit
    num_units: int
    max_rows: int

    @property
    def trivial(self) -> bool:
        """Each row is its own unit, in order."""
        return self.max_rows == 1 and self.num_units == self.row_unit.numel()

    def to_units(self, x: Tensor) -> Tensor:
        """(B, T, ...) -> (U, max_rows * T, ...), padded with zeros (which add nothing)."""
        if self.trivial:
            return x
        out = x.new_zeros(self.num_units * self.max_rows, *x.shape[1:])
        out[self.row_unit * self.max_rows + self.slot] = x
        return out.view(self.num_units, self.max_rows * x.shape[1], *x.shape[2:])

    def sum_rows(self, x: Tensor) -> Tensor:
        """(B, ...) -> (U, ...): per-unit sums of per-row values."""
        if self.trivial:
            return x
        return x.new_zeros(self.num_units, *x.shape[1:]).index_add_(0, self.row_unit, x)


def per_example_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """(B,) fp32 mean shifted token cross-entropy per row over its label tokens.

    A row without label tokens gets nan (filter it before averaging); its gradient is zero, not
    nan, so ``torch.where(has_labels, losses, 0).sum().backward()`` is safe.
    """
    total, count = _row_loss_sums(logits, labels)
    safe = total / count.clamp(min=1)
    return torch.where(count > 0, safe, torch.full_like(safe, math.nan))


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
    units = _unit_layout(batch.get("unit_ids"), rows, device)
    counts = units.sum_rows((labels[:, 1:] != -100).sum(1))  # (U,) label tokens per unit
    job = _Job(model, params, input_ids, attention_mask, labels, units, counts, max_grad_norm)
    if torch.is_inference_mode_enabled():
        raise RuntimeError("per_example_clip needs autograd: call it outside torch.inference_mode")
    with torch.enable_grad():  # also under a caller's torch.no_grad()
        return {"fast": _fast_clip, "vmap": _vmap_clip, "loop": _loop_clip}[engine](job)


def clipped_grad_sum(
    model: nn.Module, batch: dict[str, Any], *, max_grad_norm: float, engine: str = "fast"
) -> tuple[dict[str, Tensor], Tensor]:
    """``(grads, norms)`` of :func:`per_example_clip` (see there)."""
    out = per_example_clip(model, batch, max_grad_norm=max_grad_norm, engine=engine)
    return out.grads, out.norms


# --- shared pieces -----------------------------------------------------------------------
@dataclass(frozen=True)
class _Job:
    """One engine call: the batch tensors (B, T), its unit layout and (U,) label-token counts."""

    model: nn.Module
    params: dict[str, nn.Parameter]
    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    units: Units
    counts: Tensor
    max_grad_norm: float


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


def _unit_layout(unit_ids: Any, rows: int, device: torch.device) -> Units:
    """Row -> unit map, units numbered by first appearance of their id."""
    if unit_ids is None:
        return Units(
            torch.arange(rows, device=device),
            torch.zeros(rows, dtype=torch.long, device=device),
            rows,
            1,
        )
    ids = torch.as_tensor(unit_ids, device=device).reshape(-1)
    if ids.numel() != rows:
        raise ValueError(f"unit_ids has {ids.numel()} entries for a batch of {rows} rows")
    order_rows = torch.arange(rows, device=device)
    uniq, inverse = torch.unique(ids, return_inverse=True)
    first = torch.full((uniq.numel(),), rows, dtype=torch.long, device=device)
    first = first.scatter_reduce(0, inverse, order_rows, reduce="amin")
    rank = torch.empty_like(first)
    rank[torch.argsort(first)] = torch.arange(uniq.numel(), device=device)
    row_unit = rank[inverse]
    counts = torch.bincount(row_unit, minlength=uniq.numel())
    grouped = torch.argsort(row_unit * rows + order_rows)  # rows grouped by unit, in row order
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(row_unit)
    slot[grouped] = order_rows - starts[row_unit[grouped]]
    return Units(row_unit, slot, int(uniq.numel()), int(counts.max()))


def _extra_kwargs(model: nn.Module) -> dict[str, Any]:
    """``use_cache=False`` for a Hugging Face model (no KV cache in training), else nothing."""
    config = getattr(model, "config", None)
    return {"use_cache": False} if hasattr(config, "use_cache") else {}


def _logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    out = model(input_ids=input_ids, attention_mask=attention_mask, **_extra_kwargs(model))
    return out.logits if hasattr(out, "logits") else out[0]


def _row_loss_sums(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
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


def _unit_losses(row_sums: Tensor, units: Units, counts: Tensor) -> Tensor:
    """(U,) mean token CE per unit, nan for a unit without label tokens."""
    sums = units.sum_rows(row_sums)
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, math.nan))


def _clip_factor(norm: Tensor, max_grad_norm: float) -> Tensor:
    """min(1, C / norm) elementwise (1 for norm 0 or C = inf)."""
    if not math.isfinite(max_grad_norm):
        return torch.ones_like(norm)
    return (max_grad_norm / norm).clamp(max=1.0)


# --- engines -----------------------------------------------------------------------------
def _clip_factors(sq: Tensor, empty: Tensor, max_grad_norm: float) -> tuple[Tensor, Tensor, int]:
    """(U,) norms (0 for units without labels), (U,) factors min(1, C/norm) with 0 for units that
    add nothing (non-finite or no labels), and the number of non-finite units with labels."""
    norms = torch.where(empty, torch.zeros_like(sq), sq.sqrt())
    finite = torch.isfinite(norms)
    factor = torch.where(finite & ~empty, _clip_factor(norms, max_grad_norm), torch.zeros_like(sq))
    return norms, factor, int((~finite).sum())


def _fast_clip(job: _Job) -> ClippedBatch:
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
        logits = _logits(model, job.input_ids, job.attention_mask)
        row_sums, _ = _row_loss_sums(logits, job.labels)
        del logits
        recorder.backward((row_sums * weights[units.row_unit]).sum())
    losses = _unit_losses(row_sums.detach(), units, counts)
    del row_sums
    # 2. Per-unit norms and clip factors; 3. clipped sums straight from the stored (a, g).
    sq = recorder.squared_norms(units)
    norms, factor, nonfinite = _clip_factors(sq, counts == 0, job.max_grad_norm)
    grads = recorder.clipped_sums(factor)  # factor 0 (nan/inf, no labels): dropped
    return ClippedBatch(grads, norms, losses, nonfinite)


def _loop_clip(job: _Job) -> ClippedBatch:
    units, counts = job.units, job.counts
    names, plist = list(job.params), list(job.params.values())
    sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in plist]
    num_units = units.num_units
    norms = torch.zeros(num_units, dtype=torch.float32, device=counts.device)
    losses = torch.full_like(norms, math.nan)
    nonfinite = 0
    for u in range(num_units):
        if int(counts[u]) == 0:  # no label tokens: zero gradient, norm 0
            continue
        rows = (units.row_unit == u).nonzero().squeeze(1)
        logits = _logits(job.model, job.input_ids[rows], job.attention_mask[rows])
        row_sums, _ = _row_loss_sums(logits, job.labels[rows])
        loss = row_sums.sum() / counts[u]
        losses[u] = loss.detach()
        if not plist or not loss.requires_grad:
            continue
        grads = torch.autograd.grad(loss, plist, allow_unused=True)
        grads32 = [
            torch.zeros_like(s) if g is None else g.float()
            for g, s in zip(grads, sums, strict=True)
        ]
        norm = torch.stack([g.pow(2).sum() for g in grads32]).sum().sqrt()
        norms[u] = norm
        if not torch.isfinite(norm):
            nonfinite += 1
            continue
        torch._foreach_add_(sums, grads32, alpha=float(_clip_factor(norm, job.max_grad_norm)))
    return ClippedBatch(dict(zip(names, sums, strict=True)), norms, losses, nonfinite)


def _mask_4d(model: nn.Module, attention_mask: Tensor) -> Tensor:
    """(B, 1, T, T) causal + padding mask in the model's attention convention.

    vmap cannot run HF's mask builder (data-dependent checks), so the same mask is made here:
    query t sees key s iff s <= t and attention_mask[s] (a fully masked query row stays masked).
    """
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None) or "sdpa"
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise ValueError(
            f"engine='vmap' supports full causal attention only, not {sorted(layer_types)}"
        )
    seq = attention_mask.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = (causal & attention_mask.bool()[:, None, :]).unsqueeze(1)
    if impl == "sdpa":
        return allowed
    if impl == "eager":
        dtype = next(model.parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    raise ValueError(
        f"engine='vmap' supports attention 'sdpa' and 'eager', not {impl!r}; use engine='loop'"
    )


def _vmap_clip(job: _Job) -> ClippedBatch:
    from torch.func import functional_call, grad, vmap

    model, params, units, counts = job.model, job.params, job.units, job.counts
    num_units, max_rows, device = units.num_units, units.max_rows, counts.device
    # (U, R) row index per unit slot; missing slots repeat the unit's first row with no labels,
    # so they add exactly zero gradient and stay finite.
    index = torch.full((num_units, max_rows), -1, dtype=torch.long, device=device)
    index[units.row_unit, units.slot] = torch.arange(units.row_unit.numel(), device=device)
    real = index >= 0
    index = torch.where(real, index, index[:, :1])
    unit_ids = job.input_ids[index]  # (U, R, T)
    unit_masks = _mask_4d(model, job.attention_mask)[index]  # (U, R, 1, T, T)
    unit_labels = torch.where(real[..., None], job.labels[index], -100)
    detached = {n: p.detach() for n, p in params.items()}
    extra = _extra_kwargs(model)

    def unit_loss(p: dict[str, Tensor], ids: Tensor, mask: Tensor, lab: Tensor, n: Tensor):
        out = functional_call(model, p, (), {"input_ids": ids, "attention_mask": mask, **extra})
        logits = out.logits if hasattr(out, "logits") else out[0]
        loss = _row_loss_sums(logits, lab)[0].sum() / n.clamp(min=1)
        return loss, loss.detach()

    per_unit_grad: Callable = vmap(
        grad(unit_loss, has_aux=True), in_dims=(None, 0, 0, 0, 0), randomness="different"
    )
    sums = {
        n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()
    }
    norms = torch.zeros(num_units, dtype=torch.float32, device=device)
    losses = torch.full_like(norms, math.nan)
    size = sum(p.numel() for p in params.values())
    step = max(1, _VMAP_BUDGET // max(1, size))
    nonfinite = 0
    for start in range(0, num_units, step):
        sl = slice(start, min(num_units, start + step))
        with warnings.catch_warnings():  # sdpa has no vmap batching rule: correct, just slower
            warnings.filterwarnings("ignore", message=".*performance drop.*")
            grads, loss = per_unit_grad(
                detached, unit_ids[sl], unit_masks[sl], unit_labels[sl], counts[sl]
            )
        empty = counts[sl] == 0
        sq = torch.zeros(sl.stop - sl.start, dtype=torch.float32, device=device)
        for g in grads.values():
            sq += g.float().pow(2).flatten(1).sum(1)
        norm, factor, bad = _clip_factors(sq, empty, job.max_grad_norm)
        nonfinite += bad
        for n, g in grads.items():
            g = torch.where(factor.view(-1, *[1] * (g.dim() - 1)) > 0, g.float(), 0.0)
            sums[n] += torch.tensordot(factor, g, dims=1)
        norms[sl] = norm
        losses[sl] = torch.where(empty, torch.full_like(loss, math.nan), loss.float())
    return ClippedBatch(sums, norms, losses, nonfinite)
