"""The per-unit clipping engines ("fast" ghost clipping, "vmap") against the per-unit loop
reference, and the loop reference against plain autograd: every tiny model, grouped units,
trainable subsets (LoRA, frozen and shared weights), precision, empty and non-finite units, and
the public entry points' arguments and side effects. The fast engine's own routes and layer
rules are tested in test_fast_engine.py."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_batch
from engine_checks import (
    FAST_ENGINES,
    GRAD_ATOL,
    NORM_RTOL,
    assert_close,
    check_nonfinite_unit_is_zeroed_and_counted,
    clip_between,
    grouped_batch,
    independent_unit_loss,
    matches_loop,
    module_state,
)

from lit_dp.models import build_tiny_model
from lit_dp.privacy.engine import vmap
from lit_dp.privacy.per_sample import (
    ENGINES,
    clipped_grad_sum,
    per_example_clip,
    per_example_losses,
)


# --- helpers -------------------------------------------------------------------------------
def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _grad_norm(loss, model):
    grads = torch.autograd.grad(loss, list(_trainable(model).values()))
    return torch.cat([g.flatten() for g in grads]).norm()


def _perturb_lora_b(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # LoRA B starts at zero, which would hide lora_A gradients
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


# --- engines against the loop reference ----------------------------------------------------
@pytest.mark.parametrize("engine", FAST_ENGINES)
def test_engine_matches_loop(tiny_model, engine):
    batch = make_batch() | {"sample_rate": 0.1, "step": 3}  # extra keys are ignored
    c = clip_between(tiny_model, batch)
    ref = per_example_clip(tiny_model, batch, max_grad_norm=c, engine="loop")
    live = ref.norms[ref.norms > 0]
    assert (live > c).any() and (live < c).any()  # some units clip, some do not
    assert ref.norms[-1] == 0 and math.isnan(ref.losses[-1])  # the row without labels
    assert_close(per_example_clip(tiny_model, batch, max_grad_norm=c, engine=engine), ref)


def test_vmap_chunked_matches_loop(monkeypatch):
    monkeypatch.setattr(vmap, "_VMAP_BUDGET", 1)  # one unit per chunk
    matches_loop(build_tiny_model("qwen2"), make_batch(), ("vmap",))


@pytest.mark.parametrize("engine", FAST_ENGINES)
def test_left_padding(engine):
    # Left padding; the first real token of a row is predicted from a pad position, so outputs at
    # fully masked query positions and the padding_idx embedding row both matter.
    batch = {k: v.flip(1) for k, v in make_batch().items()}
    matches_loop(build_tiny_model("llama"), batch, (engine,))


# --- the loop reference against plain autograd ---------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_no_clipping_equals_autograd_sum(tiny_model, engine):
    batch = make_batch()
    params = _trainable(tiny_model)
    total = sum(independent_unit_loss(tiny_model, batch, [i]) for i in range(3))  # 3: no labels
    expected = torch.autograd.grad(total, list(params.values()))
    grads, norms = clipped_grad_sum(tiny_model, batch, max_grad_norm=math.inf, engine=engine)
    assert norms.shape == (4,)
    scale = max(float(g.abs().max()) for g in expected)
    for (name, g), e in zip(grads.items(), expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=GRAD_ATOL * scale, msg=name)


@pytest.mark.parametrize("engine", ENGINES)
def test_clipped_unit_norms_are_min_of_norm_and_c(engine):
    model = build_tiny_model("qwen2")
    batch = make_batch(empty_label_row=False)
    c = clip_between(model, batch)
    for i in range(4):
        single = {k: v[i : i + 1] for k, v in batch.items()}
        norm = _grad_norm(independent_unit_loss(model, batch, [i]), model)
        out = per_example_clip(model, single, max_grad_norm=c, engine=engine)
        clipped = torch.cat([g.flatten() for g in out.grads.values()]).norm()
        torch.testing.assert_close(out.norms[0], norm, rtol=NORM_RTOL, atol=0)
        assert clipped <= c * (1 + 1e-5)
        torch.testing.assert_close(clipped, torch.minimum(norm, torch.tensor(c)), rtol=1e-5, atol=0)


# --- privacy units -------------------------------------------------------------------------
def test_loop_reference_groups_units():
    model = build_tiny_model("qwen2")
    batch, groups = grouped_batch()
    out = per_example_clip(model, batch, max_grad_norm=math.inf, engine="loop")
    for u, rows in enumerate(groups[:2]):
        loss = independent_unit_loss(model, batch, rows)
        torch.testing.assert_close(out.norms[u], _grad_norm(loss, model), rtol=NORM_RTOL, atol=0)
        torch.testing.assert_close(out.losses[u], loss.detach(), rtol=1e-5, atol=0)
    assert out.norms[2:].eq(0).all() and out.losses[2:].isnan().all()


@pytest.mark.parametrize("engine", FAST_ENGINES)
def test_grouped_units_match_loop(tiny_model, engine):
    batch, _ = grouped_batch()
    assert matches_loop(tiny_model, batch, (engine,)).norms.shape == (4,)


# --- trainable subsets ---------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_frozen_parameters_excluded(tiny_model, engine):
    tiny_model.get_input_embeddings().weight.requires_grad_(False)  # (and the tied head)
    tiny_model.model.layers[0].input_layernorm.weight.requires_grad_(False)
    batch = make_batch()
    keys = [n for n, p in tiny_model.named_parameters() if p.requires_grad]
    c = clip_between(tiny_model, batch)
    out = per_example_clip(tiny_model, batch, max_grad_norm=c, engine=engine)
    assert list(out.grads) == keys
    assert "model.embed_tokens.weight" not in out.grads
    if engine != "loop":
        assert_close(out, per_example_clip(tiny_model, batch, max_grad_norm=c, engine="loop"))


@pytest.mark.parametrize("engine", FAST_ENGINES)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lora_matches_loop(arch, engine):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        build_tiny_model(arch),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    _perturb_lora_b(model)
    ref = matches_loop(model, make_batch(), (engine,))  # same keys, in the same order
    assert all("lora_" in n for n in ref.grads)
    assert len(ref.grads) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)


def test_weight_shared_by_two_linears():
    model = build_tiny_model("llama")
    layers = model.model.layers
    layers[1].mlp.up_proj.weight = layers[0].mlp.up_proj.weight  # one parameter, two modules
    assert "model.layers.1.mlp.up_proj.weight" not in matches_loop(model, make_batch()).grads


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [("bitnet", {"tie_word_embeddings": True}), ("llama", {"attn_implementation": "eager"})],
    ids=["bitnet-tied", "llama-eager"],
)
def test_more_model_variants_match_loop(arch, overrides):
    matches_loop(build_tiny_model(arch, **overrides), make_batch())


# --- precision, empty and non-finite units -------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_empty_batch(engine):
    model = build_tiny_model("qwen2")
    batch = {k: v[:0] for k, v in make_batch().items()}
    out = per_example_clip(model, batch, max_grad_norm=1.0, engine=engine)
    assert out.norms.shape == (0,) and out.losses.shape == (0,) and out.num_nonfinite == 0
    assert list(out.grads) == [n for n, _ in model.named_parameters()]
    assert all(g.dtype == torch.float32 and not g.any() for g in out.grads.values())


@pytest.mark.parametrize("engine", ENGINES)
def test_batch_without_any_label(engine):
    model = build_tiny_model("qwen2")
    batch = make_batch() | {"unit_ids": torch.tensor([3, 3, 1, 0])}
    batch["labels"][:] = -100
    out = per_example_clip(model, batch, max_grad_norm=1.0, engine=engine)
    assert out.norms.eq(0).all() and out.norms.shape == (3,) and out.losses.isnan().all()
    assert all(not g.any() for g in out.grads.values()) and out.num_nonfinite == 0


@pytest.mark.parametrize("engine", FAST_ENGINES)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bf16_model_gives_fp32_close_to_fp32_reference(arch, engine):
    model = build_tiny_model(arch)
    batch = make_batch()
    c = clip_between(model, batch)
    ref = per_example_clip(model, batch, max_grad_norm=c, engine="loop")
    out = per_example_clip(model.to(torch.bfloat16), batch, max_grad_norm=c, engine=engine)
    assert all(g.dtype == torch.float32 for g in out.grads.values())
    assert out.norms.dtype == torch.float32 and out.losses.dtype == torch.float32
    torch.testing.assert_close(out.norms, ref.norms, rtol=1e-2, atol=1e-6)  # bf16: ~2e-3
    num = sum(float((out.grads[n] - g).pow(2).sum()) for n, g in ref.grads.items())
    den = sum(float(g.pow(2).sum()) for g in ref.grads.values())
    assert math.sqrt(num / den) < 2e-2  # relative error of the whole clipped sum (bf16: ~6e-3)


@pytest.mark.parametrize("engine", ENGINES)
def test_nonfinite_unit_is_zeroed_and_counted(engine):
    check_nonfinite_unit_is_zeroed_and_counted(engine)


def test_per_example_losses_matches_cross_entropy_and_is_gradient_safe():
    model = build_tiny_model("llama")
    batch = make_batch()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    losses = per_example_losses(logits, batch["labels"])
    assert losses.dtype == torch.float32 and losses.shape == (4,)
    expected = torch.stack([independent_unit_loss(model, batch, [i]) for i in range(3)])
    torch.testing.assert_close(losses.detach()[:3], expected.detach(), rtol=1e-5, atol=0)
    assert math.isnan(losses[3].item())
    has_labels = (batch["labels"][:, 1:] != -100).any(1)
    torch.where(has_labels, losses, 0.0).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# --- arguments and side effects ------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
        ({"max_grad_norm": math.nan}, "max_grad_norm"),
        ({"max_grad_norm": 1.0, "engine": "ghost"}, "engine"),
        ({"max_grad_norm": 1.0, "unit_ids": torch.tensor([0, 1])}, "unit_ids"),
    ],
    ids=["zero-c", "neg-c", "nan-c", "unknown-engine", "short-unit-ids"],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    batch = make_batch() | {k: v for k, v in kwargs.items() if k == "unit_ids"}
    kwargs = {k: v for k, v in kwargs.items() if k != "unit_ids"}
    with pytest.raises(ValueError, match=name):
        per_example_clip(build_tiny_model("qwen2"), batch, **kwargs)


@pytest.mark.parametrize("engine", ENGINES)
def test_runs_under_no_grad(engine):
    model = build_tiny_model("llama")
    batch = make_batch()
    ref = per_example_clip(model, batch, max_grad_norm=1.0, engine=engine)
    with torch.no_grad():
        out = per_example_clip(model, batch, max_grad_norm=1.0, engine=engine)
    assert_close(out, ref, norm_rtol=1e-6, grad_atol=1e-7)
    assert ref.norms[:3].gt(0).all()


@pytest.mark.parametrize("engine", ENGINES)
def test_model_state_untouched(tiny_model, engine):
    model = tiny_model.train()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    params = dict(model.named_parameters())
    sentinel = torch.full_like(params["model.norm.weight"], 7.0)
    params["model.norm.weight"].grad = sentinel
    flags, state = {n: p.requires_grad for n, p in params.items()}, module_state(model)
    per_example_clip(model, make_batch(), max_grad_norm=0.5, engine=engine)
    assert params["model.norm.weight"].grad is sentinel and sentinel.eq(7.0).all()
    assert all(p.grad is None for n, p in params.items() if n != "model.norm.weight")
    assert {n: p.requires_grad for n, p in params.items()} == flags
    assert module_state(model) == state and model.training
