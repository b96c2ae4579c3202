"""The fast engine's own machinery, each part against the per-unit loop reference where it
computes: every per-layer norm route (forced), per-unit gradients kept in place of (a, g), the
layer rules the tiny HF models lack (LayerNorm, torch RMSNorm, reused and biased Linears),
RMSNorms recognised by name, what the registry refuses (unknown modules, subclasses that
override forward such as an unregistered AutoBitLinear), and the ClipPlan's enforced order."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODELS, make_batch
from engine_checks import (
    FAST_ENGINES,
    check_nonfinite_unit_is_zeroed_and_counted,
    grouped_batch,
    matches_loop,
    module_state,
)
from torch import nn
from transformers.integrations.bitnet import AutoBitLinear

from lit_dp.models import build_tiny_model
from lit_dp.privacy.engine import clip_plan as engine_plan
from lit_dp.privacy.engine import linear, registry
from lit_dp.privacy.engine.loss import logits_of, row_loss_sums
from lit_dp.privacy.engine.recorder import GhostRecorder
from lit_dp.privacy.engine.units import unit_layout
from lit_dp.privacy.per_sample import layer_kind, per_example_clip, register_layer

# --- per-layer norm routes, each against the loop reference --------------------------------
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
    matches_loop(tiny_model, make_batch(batch_size=5, seq_len=10), ("fast",))


@pytest.mark.parametrize("route", ROUTES)
def test_fast_norm_routes_match_loop_on_grouped_units(route, monkeypatch):
    _force_route(monkeypatch, route)
    batch, _ = grouped_batch()
    matches_loop(build_tiny_model("qwen2", tie_word_embeddings=True), batch, ("fast",))


def test_kept_per_unit_gradients_replace_stored_activations(monkeypatch):
    """Where the per-unit gradients are no larger than (a, g), they are kept and (a, g) freed."""
    model = build_tiny_model("llama")
    batch = make_batch(batch_size=3, seq_len=200, vocab_size=128)  # T (d_in + d_out) > d_in d_out
    kept = []
    original = engine_plan._weight_sq

    def spy(uses, units, grams):
        out = original(uses, units, grams)
        kept.extend((u.per_unit is not None, u.a.numel()) for u in uses if u.kind == "linear")
        return out

    monkeypatch.setattr(engine_plan, "_weight_sq", spy)
    matches_loop(model, batch, ("fast",))
    assert kept and all(k and numel == 0 for k, numel in kept)


@pytest.mark.parametrize("route", ROUTES)
def test_nonfinite_unit_is_zeroed_on_every_fast_route(route, monkeypatch):
    _force_route(monkeypatch, route)
    check_nonfinite_unit_is_zeroed_and_counted("fast")


# --- layer rules ---------------------------------------------------------------------------
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
    matches_loop(_ToyLM(), make_batch(vocab_size=32), (engine,))


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
        register_layer(_OffsetRMSNorm, "rmsnorm")
        matches_loop(model, batch, ("fast",))
    with pytest.raises(ValueError, match="kind"):
        register_layer(norm_type, "conv")


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


def test_fast_engine_restores_state_after_an_error():
    model = build_tiny_model("bitnet")
    flags, state = [p.requires_grad for p in model.parameters()], module_state(model)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    mlp = model.model.layers[1].mlp
    mlp.forward = broken
    with pytest.raises(RuntimeError, match="boom"):
        per_example_clip(model, make_batch(), max_grad_norm=1.0, engine="fast")
    del mlp.forward
    assert [p.requires_grad for p in model.parameters()] == flags
    assert module_state(model) == state


def test_tiny_models_cover_every_layer_rule():
    """The fixtures exercise each rule the fast engine dispatches to."""
    kinds = set()
    for _, arch, overrides in TINY_MODELS:
        model = build_tiny_model(arch, **overrides)
        kinds |= {
            layer_kind(m) for m in model.modules() if any(True for _ in m.parameters(recurse=False))
        }
    assert kinds == {"bitlinear", "linear", "embedding", "rmsnorm"}


# --- registry: what gets a rule, and what is refused -----------------------------------------
class _SubclassedLinear(nn.Linear):
    """Keeps nn.Linear.forward: the nn.Linear rule holds."""


class _ScaledLinear(nn.Linear):
    """Overrides forward (y = 2 x W^T): the nn.Linear rule would be wrong by a factor 2."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_subclass_overriding_forward_gets_no_inherited_rule():
    assert layer_kind(_SubclassedLinear(4, 4)) == "linear"
    assert layer_kind(_ScaledLinear(4, 4)) is None
    model = nn.Sequential(nn.Embedding(32, 8), _ScaledLinear(8, 32))
    with pytest.raises(ValueError, match=r"1\.weight.*_ScaledLinear.*overrides forward.*vmap"):
        GhostRecorder(model, dict(model.named_parameters()), batch_size=2)


def test_bitnet_layers_without_their_registration_are_refused(monkeypatch):
    """AutoBitLinear subclasses nn.Linear but multiplies its weight gradient by q(x), not x:
    without lit_dp.bitnet's registration the fast engine must refuse it, not clip it as a Linear."""
    model = build_tiny_model("bitnet")
    qat = model.model.layers[0].mlp.up_proj
    plain = AutoBitLinear(8, 8, online_quant=True)  # transformers' own layer
    assert layer_kind(qat) == layer_kind(plain) == "bitlinear"  # lit_dp.models imported bitnet
    monkeypatch.setattr(registry, "_REGISTRY", [])
    assert layer_kind(qat) is None and layer_kind(plain) is None
    with pytest.raises(ValueError, match=r"BitLinearQAT.*overrides forward.*lit_dp\.models"):
        per_example_clip(model, make_batch(), max_grad_norm=1.0, engine="fast")
    single = nn.Sequential(plain)
    with pytest.raises(ValueError, match=r"AutoBitLinear.*subclasses Linear"):
        GhostRecorder(single, dict(single.named_parameters()), batch_size=2)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    ("kind", "kwargs", "match"),
    [
        ("bitlinear", {}, "activation"),
        ("linear", {"activation": lambda m, x: x}, "activation"),
        ("linear", {"capture": "quantized_input"}, "capture"),
    ],
    ids=["bitlinear-without-activation", "linear-with-activation", "linear-with-capture"],
)
def test_register_layer_validates_its_arguments(kind, kwargs, match, monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", [])
    with pytest.raises(ValueError, match=match):
        register_layer(_ScaledLinear, kind, **kwargs)
    assert registry._REGISTRY == []


# --- the ClipPlan runs its two steps once each, in order --------------------------------------
def _recorded_plan(model, batch):
    """A ClipPlan of one recorded pass of sum_u loss_u (each unit its own row)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows = batch["input_ids"].shape[0]
    counts = (batch["labels"][:, 1:] != -100).sum(1)
    recorder = GhostRecorder(model, params, rows)
    with recorder.record():
        logits = logits_of(model, batch["input_ids"], batch["attention_mask"])
        row_sums, _ = row_loss_sums(logits, batch["labels"])
        recorder.backward((row_sums / counts.clamp(min=1)).sum())
    return recorder.plan(unit_layout(None, rows, torch.device("cpu")))


def test_clip_plan_enforces_norms_then_sums_once():
    model, batch = build_tiny_model("qwen2"), make_batch()
    ref = per_example_clip(model, batch, max_grad_norm=math.inf, engine="loop")
    clip_plan = _recorded_plan(model, batch)
    ones = torch.ones(4)
    with pytest.raises(RuntimeError, match=r"squared_norms\(\) first"):
        clip_plan.clipped_sums(ones)
    sq = clip_plan.squared_norms()
    torch.testing.assert_close(sq.sqrt(), ref.norms, rtol=1e-4, atol=1e-7)
    with pytest.raises(RuntimeError, match="ran already"):
        clip_plan.squared_norms()
    with pytest.raises(ValueError, match=r"one factor per unit, \(4,\)"):
        clip_plan.clipped_sums(torch.ones(3))
    grads = clip_plan.clipped_sums(ones)  # C = inf: the plain sum of the unit gradients
    scale = max(float(g.abs().max()) for g in ref.grads.values())
    for name, g in ref.grads.items():
        torch.testing.assert_close(grads[name], g, rtol=0, atol=1e-5 * scale, msg=name)
    for step in (clip_plan.squared_norms, lambda: clip_plan.clipped_sums(ones)):
        with pytest.raises(RuntimeError, match="spent"):
            step()


def test_offline_autobitlinear_is_refused_when_trainable():
    """transformers' AutoBitLinear with online_quant=False scales its output by weight_scale, so
    grad_out^T q(x) is not its weight gradient: trainable, the rule refuses it (naming the fix);
    frozen, it gives the quantized activation that the layer multiplies."""
    from transformers.integrations.bitnet import AutoBitLinear

    from lit_dp.bitnet import bitlinear_input

    x = torch.randn(2, 5, 8)
    layer = AutoBitLinear(8, 4, online_quant=False)
    with pytest.raises(ValueError, match="online_quant=False"):
        bitlinear_input(layer, x)
    layer.weight.requires_grad_(False)
    q = bitlinear_input(layer, x)
    # int8 activation quantization: every row is a multiple of its own step max|x| / 127
    step = x.abs().amax(dim=-1, keepdim=True) / 127
    torch.testing.assert_close(q / step, torch.round(q / step), rtol=0, atol=1e-4)
    assert not torch.allclose(q, x)
