"""EMA weights: decay warm-up, update rule against a hand computation, swap/restore, state."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lit_dp.callbacks.ema import EMAWeights, ema_decay


def _module(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[1].bias.requires_grad_(False)  # frozen params are not tracked
    return SimpleNamespace(model=model, last_record=None)


@pytest.mark.parametrize(
    ("step", "expected"), [(0, 0.1), (1, 2 / 11), (10, 11 / 20), (10_000, 0.999)]
)
def test_decay_warmup(step, expected):
    assert ema_decay(step, decay=0.999) == pytest.approx(expected)


def test_update_matches_hand_computation():
    pl = _module()
    cb = EMAWeights(decay=0.9)
    cb.on_fit_start(None, pl)
    params = {n: p for n, p in pl.model.named_parameters() if p.requires_grad}
    expected = {n: p.detach().clone() for n, p in params.items()}
    assert set(cb.shadow) == set(params)
    for step in range(5):
        with torch.no_grad():
            for p in params.values():
                p.add_(torch.randn_like(p))
        pl.last_record = SimpleNamespace(step=step)
        cb.on_train_batch_end(None, pl, None, None, step)
        d = min(0.9, (1 + step) / (10 + step))
        for n, p in params.items():
            expected[n] = d * expected[n] + (1 - d) * p.detach()
    for n in params:
        torch.testing.assert_close(cb.shadow[n], expected[n], rtol=0, atol=1e-6)


def test_no_update_without_step_record():
    pl = _module()
    cb = EMAWeights(decay=0.5)
    cb.on_fit_start(None, pl)
    before = {n: t.clone() for n, t in cb.shadow.items()}
    with torch.no_grad():
        pl.model[0].weight.add_(1.0)
    cb.on_train_batch_end(None, pl, None, None, 0)  # last_record None: budget stop, skipped step
    for n in before:
        torch.testing.assert_close(cb.shadow[n], before[n])


def test_swapped_restores_raw_weights():
    pl = _module()
    cb = EMAWeights(decay=0.5)
    cb.on_fit_start(None, pl)
    cb.shadow = {n: torch.full_like(t, 7.0) for n, t in cb.shadow.items()}
    raw = pl.model[0].weight.detach().clone()
    with cb.swapped(pl):
        assert torch.all(pl.model[0].weight == 7.0)
    torch.testing.assert_close(pl.model[0].weight, raw)


def test_state_dict_round_trip():
    pl = _module()
    cb = EMAWeights(decay=0.5)
    cb.on_fit_start(None, pl)
    cb.shadow = {n: torch.randn_like(t) for n, t in cb.shadow.items()}
    restored = EMAWeights(decay=0.9)
    restored.load_state_dict(cb.state_dict())
    restored.on_fit_start(None, pl)
    assert restored.decay == 0.5
    for n in cb.shadow:
        torch.testing.assert_close(restored.shadow[n], cb.shadow[n])


def test_bad_decay():
    with pytest.raises(ValueError, match="decay"):
        EMAWeights(decay=1.0)
