"""``privatize`` called directly (public API) with a batch whose units are not contiguous: every
unit is clipped once, as a whole, whatever the micro-batch size, as a per-unit loop computes."""

from __future__ import annotations

import pytest
import torch

from lit_dp.models import build_tiny_model
from lit_dp.privacy.clipping import FixedClip
from lit_dp.privacy.mechanism import privatize, split_micro_batches
from lit_dp.privacy.per_sample import per_example_clip

UNIT_IDS = [0, 1, 0, 2, 1, 0]  # unit 0 on rows 0, 2, 5; unit 1 on rows 1, 4; unit 2 on row 3


def _batch(length=9, vocab=64):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (len(UNIT_IDS), length), generator=gen)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids.clone(),
        "unit_ids": torch.tensor(UNIT_IDS),
    }


def _per_unit_reference(model, batch, clip_bound):
    """Each unit alone (its rows only), clipped by the loop engine; the clipped sum and norms."""
    total, norms = None, []
    for unit in dict.fromkeys(UNIT_IDS):  # order of first appearance
        rows = torch.tensor([i for i, u in enumerate(UNIT_IDS) if u == unit])
        alone = {k: v[rows] for k, v in batch.items()}
        out = per_example_clip(model, alone, max_grad_norm=clip_bound, engine="loop")
        norms.append(float(out.norms[0]))
        clipped = torch.cat([g.reshape(-1) for g in out.grads.values()])
        assert clipped.norm() <= clip_bound * (1 + 1e-5)  # one unit adds at most C
        total = clipped if total is None else total + clipped
    return total, norms


@pytest.mark.parametrize("max_rows", [1, 2, 4, 6])
def test_privatize_clips_a_unit_split_across_rows_once(max_rows):
    model = build_tiny_model("qwen2", seed=0)
    batch = _batch()
    clip_bound = 1e-3  # below every unit norm: each unit adds exactly C in its own direction
    step = privatize(
        model,
        batch,
        clip=FixedClip(clip_bound),
        noise_multiplier=0.0,
        expected_batch_size=1.0,  # the sum itself
        generator=torch.Generator().manual_seed(0),
        engine="loop",
        max_rows=max_rows,
    )
    want, norms = _per_unit_reference(model, batch, clip_bound)
    got = torch.cat([step.grads[n].reshape(-1) for n in step.grads])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(step.norms, torch.tensor(norms), rtol=1e-4, atol=0)
    assert step.batch_size == 3  # three units, not five runs of rows


def test_split_micro_batches_gathers_each_unit_into_one_micro_batch():
    parts = split_micro_batches(_batch(), 2)
    seen = [p["unit_ids"].tolist() for p in parts]
    assert sorted(u for s in seen for u in s) == sorted(UNIT_IDS)
    for unit in set(UNIT_IDS):
        assert sum(unit in s for s in seen) == 1  # never in two micro-batches
    # Rows keep their order within a unit, units their order of first appearance.
    assert [u for s in seen for u in s] == [0, 0, 0, 1, 1, 2]
    rows = torch.cat([p["input_ids"] for p in parts])
    torch.testing.assert_close(rows, _batch()["input_ids"][[0, 2, 5, 1, 4, 3]])
