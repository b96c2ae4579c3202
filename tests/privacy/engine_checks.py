"""Shared checks for the clipping-engine tests: agreement with the per-unit loop reference, a
plain autograd reference loss, and the poisoned (non-finite) unit check."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from conftest import make_batch

from lit_dp.models import build_tiny_model
from lit_dp.privacy.per_sample import per_example_clip

FAST_ENGINES = ("fast", "vmap")
NORM_RTOL = 1e-4
GRAD_ATOL = 1e-5  # times the largest reference entry (scale-aware)


def clip_between(model, batch) -> float:
    """A clip bound strictly between the smallest and largest non-zero reference norm."""
    norms = per_example_clip(model, batch, max_grad_norm=math.inf, engine="loop").norms
    nz = norms[norms > 0]
    return float((nz.min() * nz.max()).sqrt())


def matches_loop(model, batch, engines=FAST_ENGINES):
    """Each engine agrees with the loop reference at a clip bound between the unit norms."""
    c = clip_between(model, batch)
    ref = per_example_clip(model, batch, max_grad_norm=c, engine="loop")
    for engine in engines:
        assert_close(per_example_clip(model, batch, max_grad_norm=c, engine=engine), ref)
    return ref


def assert_close(out, ref, *, norm_rtol=NORM_RTOL, grad_atol=GRAD_ATOL):
    assert list(out.grads) == list(ref.grads)
    for name, g in out.grads.items():
        assert g.dtype == torch.float32 and g.shape == ref.grads[name].shape, name
    assert out.norms.dtype == torch.float32
    torch.testing.assert_close(out.norms, ref.norms, rtol=norm_rtol, atol=1e-7, equal_nan=True)
    torch.testing.assert_close(out.losses, ref.losses, rtol=1e-5, atol=1e-6, equal_nan=True)
    scale = max(float(g.abs().max()) for g in ref.grads.values()) or 1.0
    for name, g in out.grads.items():
        torch.testing.assert_close(g, ref.grads[name], rtol=0, atol=grad_atol * scale, msg=name)
    assert out.num_nonfinite == ref.num_nonfinite


def independent_unit_loss(model, batch, rows):
    """Mean shifted token CE over all label tokens of ``rows`` (a plain, separate reference)."""
    ids, mask, labels = (batch[k][rows] for k in ("input_ids", "attention_mask", "labels"))
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    ce = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="sum")  # -100 ignored
    return ce / (labels[:, 1:] != -100).sum()


def grouped_batch():
    batch = make_batch(batch_size=7)  # row 6 has no labels
    batch["labels"][3] = -100
    batch["labels"][4] = -100
    # units by first appearance: 4 = rows {0, 2}; 2 = rows {1, 4 (no labels), 5}; 3 = {3} and
    # 9 = {6} have no labels at all.
    batch["unit_ids"] = torch.tensor([4, 2, 4, 3, 2, 2, 9])
    return batch, [[0, 2], [1, 4, 5], [3], [6]]


def module_state(model):
    """Hooks and instance attributes of every module (the fast engine patches BitLinear's)."""
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return [[len(getattr(m, h)) for h in hooks] + sorted(m.__dict__) for m in model.modules()]


POISON = 5  # token id that makes a row's forward pass non-finite


def _poison(model):
    """Monkeypatch: the MLP output of every row containing token POISON is multiplied by inf."""
    seen = {}

    def grab(module, args, kwargs):
        seen["ids"] = kwargs["input_ids"]

    def blow_up(module, args, output):
        bad = (seen["ids"] == POISON).any(1)
        return output * torch.where(bad, math.inf, 1.0)[:, None, None]

    return [
        model.register_forward_pre_hook(grab, with_kwargs=True),
        model.model.layers[0].mlp.register_forward_hook(blow_up),
    ]


def check_nonfinite_unit_is_zeroed_and_counted(engine):
    """A unit with a non-finite gradient is counted, reported and adds nothing to the sum."""
    model = build_tiny_model("llama")
    batch = make_batch()
    batch["input_ids"][batch["input_ids"] == POISON] = 7
    clean = {k: v[[0, 2, 3]] for k, v in batch.items()}
    batch["input_ids"][1, 4] = POISON
    c = clip_between(model, clean)
    ref = per_example_clip(model, clean, max_grad_norm=c, engine="loop")
    handles = _poison(model)
    try:
        out = per_example_clip(model, batch, max_grad_norm=c, engine=engine)
    finally:
        for h in handles:
            h.remove()
    assert out.num_nonfinite == 1
    assert not torch.isfinite(out.norms[1]) and math.isnan(out.losses[1])
    torch.testing.assert_close(out.norms[[0, 2, 3]], ref.norms, rtol=NORM_RTOL, atol=0)
    scale = max(float(g.abs().max()) for g in ref.grads.values())
    for name, g in out.grads.items():
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, ref.grads[name], rtol=0, atol=GRAD_ATOL * scale, msg=name)
