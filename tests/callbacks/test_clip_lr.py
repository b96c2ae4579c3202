"""Clip-driven LR multiplier (DP-Adam-AC's rule, docs/method.md) and base schedules."""

import math
import warnings
from types import SimpleNamespace

import pytest
import torch

from lit_dp.callbacks.clip_lr import ClipDrivenLR, base_schedule, next_lr_multiplier
from lit_dp.privacy.clipping import FixedClip, PrivateQuantile


@pytest.mark.parametrize(
    ("clip_rate", "expected"),
    [
        (0.0, 1.01),
        (0.05, 1.01),
        (0.1, 1.0),
        (0.2, 1.0),
        (0.3, 1.0),
        (0.31, 0.995),
        (0.9, 0.995),
        (None, 1.0),
    ],
)
def test_rule(clip_rate, expected):
    assert next_lr_multiplier(1.0, clip_rate, target_clip_rate=0.2) == pytest.approx(expected)


def test_rule_clamps():
    g = 1.0
    for _ in range(2000):
        g = next_lr_multiplier(g, 0.0, target_clip_rate=0.2)
    assert g == 2.0
    for _ in range(5000):
        g = next_lr_multiplier(g, 1.0, target_clip_rate=0.2)
    assert g == pytest.approx(0.1)


def test_nan_clip_rate_ignored():
    assert next_lr_multiplier(1.3, math.nan, target_clip_rate=0.2) == 1.3


def test_cosine_schedule():
    kw = dict(kind="cosine", warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert base_schedule(0, **kw) == pytest.approx(0.1)
    assert base_schedule(9, **kw) == pytest.approx(1.0)
    assert base_schedule(60, **kw) == pytest.approx(0.55)
    assert base_schedule(110, **kw) == pytest.approx(0.1)
    assert (
        base_schedule(500, kind="constant", warmup_steps=0, total_steps=None, min_lr_ratio=0.1)
        == 1.0
    )


def test_callback_sets_lr_and_updates_gamma_from_record():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.5)
    trainer = SimpleNamespace(max_steps=100, global_step=0, optimizers=[opt])
    logged = {}
    pl = SimpleNamespace(last_record=None, log=lambda k, v, **kw: logged.__setitem__(k, v))
    cb = ClipDrivenLR(adaptive=True)
    cb.on_train_batch_start(trainer, pl, None, 0)
    assert opt.param_groups[0]["lr"] == 0.5
    pl.last_record = SimpleNamespace(clip_rate=0.0)
    cb.on_train_batch_end(trainer, pl, None, None, 0)
    assert cb.gamma == pytest.approx(1.01)
    cb.on_train_batch_start(trainer, pl, None, 1)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.505)
    assert logged["lr_multiplier"] == pytest.approx(1.01)
    restored = ClipDrivenLR(adaptive=True)
    restored.load_state_dict(cb.state_dict())
    assert restored.gamma == cb.gamma


def test_multiplier_is_off_by_default_and_warns_without_a_clip_rate():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.5)
    trainer = SimpleNamespace(max_steps=100, global_step=0, optimizers=[opt])
    pl = SimpleNamespace(last_record=SimpleNamespace(clip_rate=0.0), log=lambda *a, **kw: None)
    cb = ClipDrivenLR()  # the default: the base schedule only
    cb.on_train_batch_end(trainer, pl, None, None, 0)
    assert cb.gamma == 1.0
    # Switched on beside a fixed clip bound, it could never move: the user is told, once per fit.
    pl.clip = FixedClip(1.0)
    with pytest.warns(UserWarning, match=r"clip_lr.adaptive=true has no effect.*FixedClip"):
        ClipDrivenLR(adaptive=True).setup(trainer, pl, "fit")
    pl.clip = PrivateQuantile(target_clip_rate=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adaptive = ClipDrivenLR(adaptive=True)
        adaptive.setup(trainer, pl, "fit")
        ClipDrivenLR(adaptive=True).setup(trainer, SimpleNamespace(clip=FixedClip(1.0)), "test")
    assert adaptive.rule["target_clip_rate"] == 0.3  # it follows the estimator's target


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("warmup_steps", {"warmup_steps": -1}),
        ("target_clip_rate", {"target_clip_rate": 1.5}),
        ("schedule", {"schedule": "linear"}),
    ],
)
def test_bad_args(field, kwargs):
    with pytest.raises(ValueError, match=field):
        ClipDrivenLR(**kwargs)
