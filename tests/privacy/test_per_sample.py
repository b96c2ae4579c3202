"""Per-unit clipping engines ("fast" ghost clipping, "vmap") against the per-unit loop reference,
and the loop reference against plain autograd."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODELS, make_batch
from torch import nn

from lit_dp.models import build_tiny_model
from lit_dp.privacy import per_sample
from lit_dp.privacy.engine import linear, plan, registry, vmap
from lit_dp.privacy.per_sample import clipped_grad_sum, per_example_clip, per_example_losses

ENGINES = per_sample.ENGINES
FAST_ENGINES = ("fast", "vmap")
NORM_RTOL = 1e-4
GRAD_ATOL = 1e-5  # times the largest reference entry (scale-aware)


# --- helpers -----------------------------------------------------------------------------
def _clip_between(model, batch) -> float:
    """A clip bound strictly between the smallest and largest non-zero reference norm."""
    norms = per_example_clip(model, batch, max_grad_norm=math.inf, engine="loop").norms
    nz = norms[norms > 0]
    return float((nz.min() * nz.max()).sqrt())


def _matches_loop(model, batch, engines=FAST_ENGINES):
    """Each engine agrees with the loop reference at a clip bound between the unit norms."""
    c = _clip_between(model, batch)
    ref = per_example_clip(model, batch, max_grad_norm=c, engine="loop")
    for engine in engines:
        _assert_close(per_example_clip(model, batch, max_grad_norm=c, engine=engine), ref)
    return ref


def _assert_close(out, ref, *, norm_rtol=NORM_RTOL, grad_atol=GRAD_ATOL):
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


def _independent_unit_loss(model, batch, rows):
    """Mean shifted token CE over all label tokens of ``rows`` (a plain, separate reference)."""
    ids, mask, labels = (batch[k][rows] for k in ("input_ids", "attention_mask", "labels"))
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    ce = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="sum")  # -100 ignored
    return ce / (labels[:, 1:] != -100).sum()


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
    c = _clip_between(tiny_model, batch)
    ref = per_example_clip(tiny_model, batch, max_grad_norm=c, engine="loop")
    live = ref.norms[ref.norms > 0]
    assert (live > c).any() and (live < c).any()  # some units clip, some do not
    assert ref.norms[-1] == 0 and math.isnan(ref.losses[-1])  # the row without labels
    _assert_close(per_example_clip(tiny_model, batch, max_grad_norm=c, engine=engine), ref)


ROUTES = ["ghost", "instantiate", "instantiate-kept"]


def _force_route(monkeypatch, route):
    """Every Linear weight takes ``route``: Gram matrices, or per-unit gradients that are
    recomputed by the clipped sum, or per-unit gradients kept for it."""
    monkeypatch.setattr(linear, "ghost_is_cheaper", lambda *a: route == "ghost")
    monkeypatch.setattr(linear, "keeps_per_unit", lambda *a: route == "instantiate-kept")
    monkeypatch.setattr(linear, "_TEMP_BUDGET", 200)  # 1-2 units per chunk (T^2 = 100)


@pytest.mark.parametrize("route", ROUTES)
def test_fast_norm_routes_match_loop(tiny_model, route, monkeypatch):
    """Each exact per-layer route, with units chunked."""
    _force_route(monkeypatch, route)
    _matches_loop(tiny_model, make_batch(batch_size=5, seq_len=10), ("fast",))


@pytest.mark.parametrize("route", ROUTES)
def test_fast_norm_routes_match_loop_on_grouped_units(route, monkeypatch):
    _force_route(monkeypatch, route)
    batch, _ = _grouped_batch()
    _matches_loop(build_tiny_model("qwen2", tie_word_embeddings=True), batch, ("fast",))


def test_kept_per_unit_gradients_replace_stored_activations(monkeypatch):
    """Where the per-unit gradients are no larger than (a, g), they are kept and (a, g) freed."""
    model = build_tiny_model("llama")
    batch = make_batch(batch_size=3, seq_len=200, vocab_size=128)  # T (d_in + d_out) > d_in d_out
    kept = []
    original = plan._weight_sq

    def spy(uses, units, grams):
        out = original(uses, units, grams)
        kept.extend((u.per_unit is not None, u.a.numel()) for u in uses if u.kind == "linear")
        return out

    monkeypatch.setattr(plan, "_weight_sq", spy)
    _matches_loop(model, batch, ("fast",))
    assert kept and all(k and numel == 0 for k, numel in kept)


def test_vmap_chunked_matches_loop(monkeypatch):
    monkeypatch.setattr(vmap, "_VMAP_BUDGET", 1)  # one unit per chunk
    _matches_loop(build_tiny_model("qwen2"), make_batch(), ("vmap",))


@pytest.mark.parametrize("engine", FAST_ENGINES)
def test_left_padding(engine):
    # Left padding; the first real token of a row is predicted from a pad position, so outputs at
    # fully masked query positions and the padding_idx embedding row both matter.
    batch = {k: v.flip(1) for k, v in make_batch().items()}
    _matches_loop(build_tiny_model("llama"), batch, (engine,))


# --- the loop reference against plain autograd ---------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_no_clipping_equals_autograd_sum(tiny_model, engine):
    batch = make_batch()
    params = _trainable(tiny_model)
    total = sum(_independent_unit_loss(tiny_model, batch, [i]) for i in range(3))  # 3: no labels
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
    c = _clip_between(model, batch)
    for i in range(4):
        single = {k: v[i : i + 1] for k, v in batch.items()}
        norm = _grad_norm(_independent_unit_loss(model, batch, [i]), model)
        out = per_example_clip(model, single, max_grad_norm=c, engine=engine)
        clipped = torch.cat([g.flatten() for g in out.grads.values()]).norm()
        torch.testing.assert_close(out.norms[0], norm, rtol=NORM_RTOL, atol=0)
        assert clipped <= c * (1 + 1e-5)
        torch.testing.assert_close(clipped, torch.minimum(norm, torch.tensor(c)), rtol=1e-5, atol=0)


# --- privacy units -------------------------------------------------------------------------
def _grouped_batch():
    batch = make_batch(batch_size=7)  # row 6 has no labels
    batch["labels"][3] = -100
    batch["labels"][4] = -100
    # units by first appearance: 4 = rows {0, 2}; 2 = rows {1, 4 (no labels), 5}; 3 = {3} and
    # 9 = {6} have no labels at all.
    batch["unit_ids"] = torch.tensor([4, 2, 4, 3, 2, 2, 9])
    return batch, [[0, 2], [1, 4, 5], [3], [6]]


def test_loop_reference_groups_units():
    model = build_tiny_model("qwen2")
    batch, groups = _grouped_batch()
    out = per_example_clip(model, batch, max_grad_norm=math.inf, engine="loop")
    for u, rows in enumerate(groups[:2]):
        loss = _independent_unit_loss(model, batch, rows)
        torch.testing.assert_close(out.norms[u], _grad_norm(loss, model), rtol=NORM_RTOL, atol=0)
        torch.testing.assert_close(out.losses[u], loss.detach(), rtol=1e-5, atol=0)
    assert out.norms[2:].eq(0).all() and out.losses[2:].isnan().all()


@pytest.mark.parametrize("engine", FAST_ENGINES)
def test_grouped_units_match_loop(tiny_model, engine):
    batch, _ = _grouped_batch()
    assert _matches_loop(tiny_model, batch, (engine,)).norms.shape == (4,)


# --- trainable subsets ---------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_frozen_parameters_excluded(tiny_model, engine):
    tiny_model.get_input_embeddings().weight.requires_grad_(False)  # (and the tied head)
    tiny_model.model.layers[0].input_layernorm.weight.requires_grad_(False)
    batch = make_batch()
    keys = [n for n, p in tiny_model.named_parameters() if p.requires_grad]
    c = _clip_between(tiny_model, batch)
    out = per_example_clip(tiny_model, batch, max_grad_norm=c, engine=engine)
    assert list(out.grads) == keys
    assert "model.embed_tokens.weight" not in out.grads
    if engine != "loop":
        _assert_close(out, per_example_clip(tiny_model, batch, max_grad_norm=c, engine="loop"))


@pytest.mark.parametrize("engine", FAST_ENGINES)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lora_matches_loop(arch, engine):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        build_tiny_model(arch),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    _perturb_lora_b(model)
    ref = _matches_loop(model, make_batch(), (engine,))  # same keys, in the same order
    assert all("lora_" in n for n in ref.grads)
    assert len(ref.grads) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)


def test_weight_shared_by_two_linears():
    model = build_tiny_model("llama")
    layers = model.model.layers
    layers[1].mlp.up_proj.weight = layers[0].mlp.up_proj.weight  # one parameter, two modules
    assert "model.layers.1.mlp.up_proj.weight" not in _matches_loop(model, make_batch()).grads


class _ToyLM(nn.Module):
    """Layer types the HF tiny models lack: nn.LayerNorm (with bias), torch.nn.RMSNorm (also over
    two dims), a biased Linear called twice, an Embedding without padding_idx. Not a Hugging Face
    model: forward takes no ``use_cache``."""

    def __init__(self, vocab=32, dim=8):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim)
        self.ln = nn.LayerNorm(dim)
        self.rms = nn.RMSNorm(dim, eps=1e-6)
        self.rms2d = nn.RMSNorm((2, dim // 2))
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)
        with torch.no_grad():  # non-trivial affine parameters
            for p in (self.ln.weight, self.rms.weight, self.rms2d.weight):
                p.normal_(1.0, 0.3)
            self.ln.bias.normal_(0.0, 0.3)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        h = torch.cumsum(h, dim=1) / torch.arange(1, h.shape[1] + 1)[:, None]  # causal mixing
        h = self.ln(h)
        h = h + torch.tanh(self.mix(h))
        h = self.rms(h + torch.tanh(self.mix(h)))  # mix runs twice: two uses of one weight
        h = self.rms2d(h.unflatten(-1, (2, -1))).flatten(-2)
        return SimpleNamespace(logits=self.head(h))


@pytest.mark.parametrize("engine", FAST_ENGINES)
def test_layernorm_rmsnorm_and_reused_linear(engine):
    _matches_loop(_ToyLM(), make_batch(vocab_size=32), (engine,))


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [("bitnet", {"tie_word_embeddings": True}), ("llama", {"attn_implementation": "eager"})],
    ids=["bitnet-tied", "llama-eager"],
)
def test_more_model_variants_match_loop(arch, overrides):
    _matches_loop(build_tiny_model(arch, **overrides), make_batch())


class _OffsetRMSNorm(nn.Module):
    """Gemma-style y = (1 + w) * x/rms(x): its weight gradient is that of w * x/rms(x)."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(-0.5, 0.5, dim))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class _GatedRMSNorm(_OffsetRMSNorm):
    """Named like an RMSNorm but gated: y = (1 + w) * x/rms(x) * silu(gate)."""

    def forward(self, x, gate):
        return super().forward(x) * F.silu(gate)


class _NormLM(nn.Module):
    def __init__(self, norm, vocab=32, dim=8):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.norm, self.head = nn.Embedding(vocab, dim), norm, nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        h = self.norm(h, h) if isinstance(self.norm, _GatedRMSNorm) else self.norm(h)
        return SimpleNamespace(logits=self.head(torch.cumsum(h, dim=1)))


@pytest.mark.parametrize("norm_type", [_GatedRMSNorm, _OffsetRMSNorm])
def test_fast_verifies_norms_recognised_by_name_only(norm_type, monkeypatch):
    """A module taken for an RMSNorm by its class name must compute w * x/rms(x), or be
    registered: a gated norm or Gemma's (1 + w) form would otherwise be refused, not guessed."""
    monkeypatch.setattr(registry, "_REGISTRY", [])
    model, batch = _NormLM(norm_type(8)), make_batch(vocab_size=32)
    with pytest.raises(ValueError, match=rf"{norm_type.__name__} \(norm\.weight\).*vmap"):
        per_example_clip(model, batch, max_grad_norm=1.0, engine="fast")
    assert all(p.requires_grad for p in model.parameters())
    if norm_type is _OffsetRMSNorm:  # its weight gradient is g * x/rms(x): registration is exact
        per_sample.register_layer(_OffsetRMSNorm, "rmsnorm")
        _matches_loop(model, batch, ("fast",))
    with pytest.raises(ValueError, match="kind"):
        per_sample.register_layer(norm_type, "conv")


class _InPlaceLM(_ToyLM):
    def forward(self, input_ids, attention_mask=None):
        h = self.ln(self.embed(input_ids))
        out = self.mix(h)
        h.mul_(2.0)  # changes the stored input of `mix` after it ran
        return SimpleNamespace(logits=self.head(out + h))


def test_fast_refuses_inputs_modified_in_place():
    with pytest.raises(RuntimeError, match="modified in place"):
        per_example_clip(_InPlaceLM(), make_batch(vocab_size=32), max_grad_norm=1.0)


def test_fast_refuses_activation_checkpointing():
    model = build_tiny_model("llama")
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="checkpointing"):
        per_example_clip(model, make_batch(), max_grad_norm=1.0, engine="fast")


def test_unknown_trainable_module_raises_naming_it():
    model = build_tiny_model("llama")
    model.model.layers[0].mlp.extra = nn.Parameter(torch.ones(3))  # owned by LlamaMLP itself
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.extra.*LlamaMLP.*vmap"):
        per_example_clip(model, make_batch(), max_grad_norm=1.0, engine="fast")
    out = per_example_clip(model, make_batch(), max_grad_norm=1.0, engine="vmap")
    assert out.grads["model.layers.0.mlp.extra"].abs().max() == 0  # unused: zero gradient


# --- precision, empty and non-finite units --------------------------------------------------
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
    c = _clip_between(model, batch)
    ref = per_example_clip(model, batch, max_grad_norm=c, engine="loop")
    out = per_example_clip(model.to(torch.bfloat16), batch, max_grad_norm=c, engine=engine)
    assert all(g.dtype == torch.float32 for g in out.grads.values())
    assert out.norms.dtype == torch.float32 and out.losses.dtype == torch.float32
    torch.testing.assert_close(out.norms, ref.norms, rtol=1e-2, atol=1e-6)  # bf16: ~2e-3
    num = sum(float((out.grads[n] - g).pow(2).sum()) for n, g in ref.grads.items())
    den = sum(float(g.pow(2).sum()) for g in ref.grads.values())
    assert math.sqrt(num / den) < 2e-2  # relative error of the whole clipped sum (bf16: ~6e-3)


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


@pytest.mark.parametrize("route", ROUTES)
def test_nonfinite_unit_is_zeroed_on_every_fast_route(route, monkeypatch):
    _force_route(monkeypatch, route)
    test_nonfinite_unit_is_zeroed_and_counted("fast")


@pytest.mark.parametrize("engine", ENGINES)
def test_nonfinite_unit_is_zeroed_and_counted(engine):
    model = build_tiny_model("llama")
    batch = make_batch()
    batch["input_ids"][batch["input_ids"] == POISON] = 7
    clean = {k: v[[0, 2, 3]] for k, v in batch.items()}
    batch["input_ids"][1, 4] = POISON
    c = _clip_between(model, clean)
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


def test_per_example_losses_matches_cross_entropy_and_is_gradient_safe():
    model = build_tiny_model("llama")
    batch = make_batch()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    losses = per_example_losses(logits, batch["labels"])
    assert losses.dtype == torch.float32 and losses.shape == (4,)
    expected = torch.stack([_independent_unit_loss(model, batch, [i]) for i in range(3)])
    torch.testing.assert_close(losses.detach()[:3], expected.detach(), rtol=1e-5, atol=0)
    assert math.isnan(losses[3].item())
    has_labels = (batch["labels"][:, 1:] != -100).any(1)
    torch.where(has_labels, losses, 0.0).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# --- arguments and side effects --------------------------------------------------------------
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
    _assert_close(out, ref, norm_rtol=1e-6, grad_atol=1e-7)
    assert ref.norms[:3].gt(0).all()


def _module_state(model):
    """Hooks and instance attributes of every module (the fast engine patches BitLinear's)."""
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return [[len(getattr(m, h)) for h in hooks] + sorted(m.__dict__) for m in model.modules()]


@pytest.mark.parametrize("engine", ENGINES)
def test_model_state_untouched(tiny_model, engine):
    model = tiny_model.train()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    params = dict(model.named_parameters())
    sentinel = torch.full_like(params["model.norm.weight"], 7.0)
    params["model.norm.weight"].grad = sentinel
    flags, state = {n: p.requires_grad for n, p in params.items()}, _module_state(model)
    per_example_clip(model, make_batch(), max_grad_norm=0.5, engine=engine)
    assert params["model.norm.weight"].grad is sentinel and sentinel.eq(7.0).all()
    assert all(p.grad is None for n, p in params.items() if n != "model.norm.weight")
    assert {n: p.requires_grad for n, p in params.items()} == flags
    assert _module_state(model) == state and model.training


def test_fast_engine_restores_state_after_an_error():
    model = build_tiny_model("bitnet")
    flags, state = [p.requires_grad for p in model.parameters()], _module_state(model)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    mlp = model.model.layers[1].mlp
    mlp.forward = broken
    with pytest.raises(RuntimeError, match="boom"):
        per_example_clip(model, make_batch(), max_grad_norm=1.0, engine="fast")
    del mlp.forward
    assert [p.requires_grad for p in model.parameters()] == flags
    assert _module_state(model) == state


def test_tiny_models_cover_every_layer_rule():
    """The fixtures exercise each rule the fast engine dispatches to (checklist item 8)."""
    kinds = set()
    for _, arch, overrides in TINY_MODELS:
        model = build_tiny_model(arch, **overrides)
        kinds |= {
            per_sample.layer_kind(m)
            for m in model.modules()
            if any(True for _ in m.parameters(recurse=False))
        }
    assert kinds == {"bitlinear", "linear", "embedding", "rmsnorm"}
