"""Per-unit rules for an embedding weight W (V, d), and for one tied weight.

The tied weight is one weight shared between an Embedding and a Linear head. Pure functions;
fp32 results.

An embedding's gradient is the index_add of its output gradient g at the token ids (tokens equal
to padding_idx get none, as in nn.Embedding); its exact per-unit norm comes from segment sums
over (unit, token id) pairs, O(T d).

A weight shared by an Embedding and a Linear (tied input/output embeddings) gets the norm of the
SUM of both uses: ||G_emb + G_head||^2 = ||G_emb||^2 + ||G_head||^2 + 2 <G_emb, G_head>, with
G_emb = sum_t e_{x_t} g_emb_t^T and G_head = sum_s dlogits_s h_s^T, so the cross term is
sum_{t,s} dlogits[s, x_t] <g_emb_t, h_s>: O(T^2 d) per unit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_dp.privacy.engine.linear import bmm32, chunks, f32, zero_dropped
from lit_dp.privacy.engine.units import Units


def embedding_sq(ids: Tensor, g: Tensor, units: Units, vocab: int, pad: int | None) -> Tensor:
    """(U,) exact per-unit ||index_add(g at ids)||^2 via segment sums over (unit, token id) keys.

    ids (B, T) long, g (B, T, d), ``vocab`` rows, ``pad`` the padding_idx or None.
    """
    d = g.shape[-1]
    keys = (units.row_unit[:, None] * vocab + ids).reshape(-1)
    rows = f32(g).reshape(-1, d)
    if pad is not None:
        keep = ids.reshape(-1) != pad
        keys, rows = keys[keep], rows[keep]
    uniq, inverse = torch.unique(keys, return_inverse=True)
    seg = rows.new_zeros(uniq.numel(), d).index_add_(0, inverse, rows)  # (K, d)
    out = torch.zeros(units.num_units, dtype=torch.float32, device=g.device)
    return out.index_add_(0, uniq // vocab, seg.pow(2).sum(1))


def tied_cross(
    ids: Tensor, g_emb: Tensor, pad: int | None, h: Tensor, dlogits: Tensor, units: Units
) -> Tensor:
    """(U,) <G_emb_u, G_head_u> for one weight W (V, d) used as an Embedding and a Linear head.

    As an Embedding: token ids (B, Te), output gradient g_emb (B, Te, d); as a Linear head: input
    h (B, Th, d), output gradient dlogits (B, Th, V). padding_idx tokens excluded.
    """
    ids_u = units.to_units(ids)  # (U, Te)
    g_u = units.to_units(g_emb)  # (U, Te, d)
    if pad is not None:
        g_u = g_u * (ids_u != pad).unsqueeze(-1)
    h_u = units.to_units(h)  # (U, Th, d)
    dlogits_u = units.to_units(dlogits)  # (U, Th, V)
    num_units, t_e = ids_u.shape
    out = torch.empty(num_units, dtype=torch.float32, device=h_u.device)
    for sl in chunks(num_units, h_u.shape[1] * t_e):
        index = ids_u[sl].unsqueeze(1).expand(-1, h_u.shape[1], -1)
        picked = dlogits_u[sl].gather(2, index)  # (u, Th, Te): dlogits[s, x_t]
        dots = bmm32(h_u[sl], g_u[sl].transpose(1, 2))  # (u, Th, Te)
        out[sl] = (f32(picked) * dots).flatten(1).sum(1)
    return out


def embedding_clipped(
    ids: Tensor,
    g: Tensor,
    pad: int | None,
    c_row: Tensor,
    zero_rows: Tensor | None,
    shape: torch.Size,
) -> Tensor:
    """(V, d) fp32 sum over rows of c_row * (the row's embedding gradient).

    c_row (B,) is each row's unit factor and ``zero_rows`` the rows of dropped units.
    """
    g = zero_dropped(g, zero_rows)
    flat_ids = ids.reshape(-1)
    rows = (f32(g) * c_row.view(-1, 1, 1)).reshape(-1, g.shape[-1])
    if pad is not None:
        keep = flat_ids != pad
        flat_ids, rows = flat_ids[keep], rows[keep]
    return rows.new_zeros(shape).index_add_(0, flat_ids, rows)
