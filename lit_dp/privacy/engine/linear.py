"""Per-unit rules for a weight W used as ``a @ W.T`` (nn.Linear, and "bitlinear" layers).

For "bitlinear" layers, a is their activation act(x). Gradient ``g^T a`` from the layer input
a (B, T, d_in) and output gradient g (B, T, d_out). Pure functions; fp32 results even for a bf16
model.

Squared per-unit norm, by the cheaper exact route (U units, T' tokens per unit):
    ghost        sum_{t,s} (a_t . a_s)(g_t . g_s)     cost ~ U T'^2 (d_in + d_out)
    instantiate  ||g_u^T a_u||_F^2                     cost ~ U T' d_in d_out
Clipped sum (c: the (U,) clip factors):
    ghost / instantiate    sum_u c_u g_u^T a_u = (c g)^T a     one matmul, no second backward
    instantiate, kept      sum_u c_u G_u from the kept G_u = g_u^T a_u   one GEMV

The route is a memory rule: instantiate where the U per-unit gradients take no more memory than
the layer's stored (a, g), T'(d_in + d_out) > d_in d_out, which is also where they are cheaper to
compute than Gram matrices. There the per-unit gradients are kept and replace (a, g), so the norm
is the only weight-gradient-sized matmul of the layer, as in non-private training.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_dp.privacy.engine.units import Units

# Largest temporary (elements) a norm computation may allocate at once; units are chunked above.
_TEMP_BUDGET = 1 << 25


# --- fp32 products ---------------------------------------------------------------------------
def f32(x: Tensor) -> Tensor:
    """``x`` as float32 (itself when it already is)."""
    return x if x.dtype == torch.float32 else x.float()


def bmm32(x: Tensor, y: Tensor) -> Tensor:
    """Batched matrix product ``x @ y`` computed in float32."""
    return torch.bmm(f32(x), f32(y))


def _gram(x: Tensor) -> Tensor:
    """(U, T, d) -> (U, T, T) fp32 token Gram matrices."""
    return bmm32(x, x.transpose(1, 2))


def chunks(n: int, per_item: int) -> list[slice]:
    """Slices of ``n`` units such that ``per_item`` elements per unit stay within the budget."""
    step = max(1, _TEMP_BUDGET // max(1, per_item))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def zero_dropped(x: Tensor, zero_rows: Tensor | None) -> Tensor:
    """``x`` (B, ...) with the rows of dropped units (factor 0, maybe non-finite) set to 0."""
    if zero_rows is None:
        return x
    return torch.where(zero_rows.view(-1, *[1] * (x.dim() - 1)), 0.0, x)


# --- route choice ----------------------------------------------------------------------------
def ghost_is_cheaper(tokens: int, d_in: int, d_out: int) -> bool:
    """T'^2 (d_in + d_out) (two Gram matrices) vs T' d_in d_out (per-unit gradient)."""
    return tokens * (d_in + d_out) <= d_in * d_out


def keeps_per_unit(stored_bytes: int, num_units: int, d_in: int, d_out: int) -> bool:
    """The fp32 per-unit gradients (U, d_out, d_in) fit in the ``stored_bytes`` of (a, g)."""
    return num_units * d_in * d_out * 4 <= stored_bytes


# --- squared norms ---------------------------------------------------------------------------
def linear_sq(a: Tensor, g: Tensor, units: Units, grams: dict) -> tuple[Tensor, Tensor | None]:
    """(U,) squared Frobenius norms of g_u^T a_u, and the kept per-unit gradients.

    The kept gradients are (U, d_out, d_in) fp32, where the route keeps them (else None; the caller
    then may free a and g).

    ``a`` (B, T, d_in) and ``g`` (B, T, d_out) are the stored rows. ``grams`` keeps the last
    unchunked a a^T: consecutive layers reading one activation (q/k/v, gate/up) share it. It is
    keyed by the rows' memory and keeps them alive, so the key cannot be reused by another
    tensor.
    """
    au, gu = units.to_units(a), units.to_units(g)  # (U, T', d_in), (U, T', d_out)
    num_units, tokens, d_in = au.shape
    d_out = gu.shape[-1]
    out = torch.empty(num_units, dtype=torch.float32, device=au.device)
    if ghost_is_cheaper(tokens, d_in, d_out):
        key = a.data_ptr(), a.shape, a.stride(), a.dtype
        for sl in chunks(num_units, tokens * tokens):
            if sl.stop - sl.start < num_units:  # chunked: too large to keep
                ga = _gram(au[sl])
            elif key not in grams:
                grams.clear()
                ga = grams.setdefault(key, (a, _gram(au)))[1]
            else:
                ga = grams[key][1]
            out[sl] = (ga * _gram(gu[sl])).flatten(1).sum(1)
        return out, None
    stored = a.numel() * a.element_size() + g.numel() * g.element_size()
    if keeps_per_unit(stored, num_units, d_in, d_out):
        kept = torch.empty(num_units, d_out, d_in, dtype=torch.float32, device=au.device)
        for sl in chunks(num_units, d_in * d_out):
            torch.bmm(f32(gu[sl]).transpose(1, 2), f32(au[sl]), out=kept[sl])
        return torch.linalg.vector_norm(kept.flatten(1), dim=1).square_(), kept
    for sl in chunks(num_units, d_in * d_out):
        per_unit = bmm32(gu[sl].transpose(1, 2), au[sl]).flatten(1)
        out[sl] = torch.linalg.vector_norm(per_unit, dim=1).square_()
    return out, None


# --- clipped sums ----------------------------------------------------------------------------
def linear_clipped(a: Tensor, g: Tensor, c_row: Tensor, zero_rows: Tensor | None) -> Tensor:
    """(d_out, d_in) fp32 sum over rows of c_row * g_row^T a_row.

    c_row (B,) is each row's unit factor and ``zero_rows`` the rows of dropped units.
    """
    g, a = zero_dropped(g, zero_rows), zero_dropped(a, zero_rows)
    scale = c_row.view(-1, 1, 1)  # fp32: scale the narrower of the two
    g, a = (f32(g) * scale, a) if g.shape[-1] <= a.shape[-1] else (g, f32(a) * scale)
    d_out, d_in = g.shape[-1], a.shape[-1]
    return torch.mm(f32(g.reshape(-1, d_out)).t(), f32(a.reshape(-1, d_in)))


def kept_clipped(kept: Tensor, factor: Tensor, zero_rows: Tensor | None) -> Tensor:
    """sum_u factor_u G_u, flat (d_out * d_in,), from the kept (U, d_out, d_in) per-unit gradients.

    Where some unit is dropped (``zero_rows`` not None), units with factor 0 are left out (their
    values may be non-finite).
    """
    flat = kept.flatten(1)
    if zero_rows is not None:
        live = factor != 0
        flat, factor = flat[live], factor[live]
    return factor @ flat
