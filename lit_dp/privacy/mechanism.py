"""The DP mechanism of one training step, written once: :func:`privatize`.

Given a Poisson batch, it returns the gradient that the optimizer may see:

1. the batch is cut into physical micro-batches of at most ``max_rows`` rows, never splitting a
   privacy unit (:func:`split_micro_batches`); memory only, the math is the same;
2. per micro-batch, every unit's gradient is clipped to the bound C_t and the clipped gradients
   are summed in fp32 (``lit_dp.privacy.per_sample``; units with a non-finite gradient add zero);
3. under DDP the clipped sums, and nothing raw, are summed across ranks;
4. one Gaussian draw of std ``grad_sigma * C_t`` per coordinate is added, where ``grad_sigma``
   is the accounted sigma, raised by the clip-bound estimator when it spends part of the budget
   on its own release (private quantile); every rank draws the same noise. A noise mechanism
   (``lit_dp.privacy.noise_mechanism``) may instead add correlated noise (banded MF) from the
   same draw, scaled by its sensitivity;
5. the noisy sum is divided by the expected batch size q_t * N, never the realized one;
6. the clip-bound estimator updates C for the next step from the unit norms (privatized counts
   for the private quantile), drawing its noise from the same generator after the gradient's.

Training (``DPCausalLM``) and the step-time benchmark call this same function; the optimizer
step that follows is pure post-processing.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lit_dp.privacy.clipping import ClipBoundEstimator
from lit_dp.privacy.collectives import all_gather_norms, all_reduce_sum_
from lit_dp.privacy.noise import NoiseGenerator, add_noise_
from lit_dp.privacy.noise_mechanism import NoiseMechanism
from lit_dp.privacy.per_sample import per_example_clip

__all__ = ["PrivateStep", "privatize", "split_micro_batches"]

_MODEL_KEYS = ("input_ids", "attention_mask", "labels")


def split_micro_batches(batch: Mapping[str, Any], max_rows: int) -> list[dict[str, Tensor]]:
    """Physical micro-batches of at most ``max_rows`` rows that never split a privacy unit.

    Rows sharing a ``unit_ids`` value are one unit wherever they stand: when they are not
    contiguous (a caller's own batch; the DataModules' batches already are), the rows are first
    gathered unit by unit, units in order of first appearance and rows in their order, so that
    no unit is clipped twice (once per micro-batch, which could let it add up to 2 C). A unit
    larger than ``max_rows`` goes alone.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows={max_rows} must be >= 1 (rows per physical micro-batch)")
    batch = _gather_units(batch)
    rows = batch["input_ids"].shape[0]
    unit_ids = batch.get("unit_ids")
    if unit_ids is None:
        bounds = [*list(range(0, rows, max_rows)), rows]
    else:
        starts = [0] + [i for i in range(1, rows) if unit_ids[i] != unit_ids[i - 1]] + [rows]
        bounds = [0]
        for unit_start, unit_end in itertools.pairwise(starts):
            # Close the current micro-batch before a unit that would overflow it.
            if unit_end - bounds[-1] > max_rows and unit_start > bounds[-1]:
                bounds.append(unit_start)
        bounds.append(rows)
    keys = [*_MODEL_KEYS, "unit_ids"] if unit_ids is not None else list(_MODEL_KEYS)
    return [{k: batch[k][a:b] for k in keys} for a, b in itertools.pairwise(bounds)]


def _gather_units(batch: Mapping[str, Any]) -> Mapping[str, Any]:
    """``batch`` with the rows of each unit made contiguous (unchanged when they already are)."""
    unit_ids = batch.get("unit_ids")
    if unit_ids is None:
        return batch
    rows_of: dict[Any, list[int]] = {}  # unit id -> its rows, units in order of first appearance
    for row, unit in enumerate(torch.as_tensor(unit_ids).reshape(-1).tolist()):
        rows_of.setdefault(unit, []).append(row)
    order = [row for rows in rows_of.values() for row in rows]
    if order == sorted(order):
        return batch
    keys = [*_MODEL_KEYS, "unit_ids"]
    return {k: batch[k][torch.tensor(order, device=torch.as_tensor(batch[k]).device)] for k in keys}


@dataclass(frozen=True)
class PrivateStep:
    """What :func:`privatize` returns.

    ``grads`` is the only field that may reach the weights. ``max_grad_norm``,
    ``grad_noise_multiplier``, ``noise_std`` and ``clip_rate`` are privatized or public;
    ``norms``, ``losses``, ``batch_size`` and ``num_nonfinite`` are raw (operator-side).
    """

    grads: dict[str, Tensor]  # parameter name -> privatized average gradient (fp32)
    max_grad_norm: float  # C_t, the bound this step clipped to (before the estimator's update)
    grad_noise_multiplier: float  # std of the noise on the sum, in units of C_t
    noise_std: float  # std of the noise on the averaged gradient: grad_sigma * C_t / (q_t N)
    # (times the marginal std of a correlated noise mechanism's row, see noise_mechanism.py)
    clip_rate: float | None  # the estimator's privatized clip rate (None if it has none)
    norms: Tensor  # every rank's raw per-unit norms, rank order (operator-side)
    losses: Tensor  # this rank's per-unit losses (operator-side)
    batch_size: int  # realized units over all ranks (operator-side)
    num_nonfinite: int  # units whose gradient was non-finite and zeroed, all ranks


def privatize(
    model: nn.Module,
    batch: Mapping[str, Any],
    *,
    clip: ClipBoundEstimator,
    noise_multiplier: float,
    expected_batch_size: float,
    generator: NoiseGenerator,
    engine: str = "fast",
    max_rows: int = 16,
    noise: NoiseMechanism | None = None,
) -> PrivateStep:
    """The privatized average gradient of ``model`` on one Poisson ``batch`` (steps 1-6 above).

    Args:
        model: the causal LM; its trainable parameters (requires_grad) get gradients.
        batch: ``input_ids``, ``attention_mask``, ``labels`` (B, T), optionally ``unit_ids``
            (B,): rows sharing an id are one unit, clipped as a whole even when they are not
            contiguous; this rank's share of the global Poisson batch (B may be 0).
        clip: the clip-bound estimator; its bound is used, then updated (step 6).
        noise_multiplier: sigma as accounted for this step.
        expected_batch_size: q_t * N, the public divisor.
        generator: the noise generator, identically seeded on every rank: a
            ``torch.Generator`` (fast mode) or a ``SecureNoiseGenerator`` (secure mode).
        engine: per-unit clipping engine, ``"fast"``, ``"vmap"`` or ``"loop"``.
        max_rows: rows per physical micro-batch (memory, not math).
        noise: the noise mechanism (stateful: called once per step); None = independent
            Gaussian noise, ``lit_dp.privacy.noise.add_noise_``.

    Model gradients (``.grad``) are not touched: the caller hands ``grads`` to its optimizer.
    """
    sigma, expected = float(noise_multiplier), float(expected_batch_size)
    c = float(clip.max_grad_norm)
    grad_sigma = clip.grad_noise_multiplier(noise_multiplier=sigma, expected_batch_size=expected)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    device = next(iter(params.values())).device if params else torch.device("cpu")

    # 1-2. Per-unit clipped gradients summed over the physical micro-batches, in fp32.
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    norms, losses, nonfinite = [], [], 0
    for micro in split_micro_batches(batch, max_rows):
        out = per_example_clip(model, micro, max_grad_norm=c, engine=engine)
        torch._foreach_add_([sums[n] for n in out.grads], list(out.grads.values()))
        norms.append(out.norms)
        losses.append(out.losses)
        nonfinite += out.num_nonfinite
    norms_t = torch.cat(norms) if norms else torch.zeros(0, device=device)
    losses_t = torch.cat(losses) if losses else torch.zeros(0, device=device)

    # 3. Across ranks: clipped sums and counts only, never raw gradients.
    counts = torch.tensor([float(norms_t.numel()), float(nonfinite)], device=device)
    all_reduce_sum_([*sums.values(), counts])
    all_norms = all_gather_norms(norms_t)

    # 4. One Gaussian draw of std grad_sigma * C per coordinate (identical on every rank).
    # ``spread``: the added noise's marginal std in units of grad_sigma * C (1 when independent).
    if noise is None:
        add_noise_(sums, noise_multiplier=grad_sigma, max_grad_norm=c, generator=generator)
        spread = 1.0
    else:
        spread = noise.add_noise_(
            sums, noise_multiplier=grad_sigma, max_grad_norm=c, generator=generator
        )

    # 5. Divide by the expected batch size q * N, never the realized one.
    grads = {n: s.div_(expected) for n, s in sums.items()}

    # 6. The clip bound for the next step (private quantile: noisy counts, same generator).
    clip_rate = clip.update(norms=all_norms, expected_batch_size=expected, generator=generator)
    return PrivateStep(
        grads=grads,
        max_grad_norm=c,
        grad_noise_multiplier=grad_sigma,
        noise_std=grad_sigma * c * spread / expected,
        clip_rate=clip_rate,
        norms=all_norms,
        losses=losses_t,
        batch_size=int(counts[0].item()),
        num_nonfinite=int(counts[1].item()),
    )
