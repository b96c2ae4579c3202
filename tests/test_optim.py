"""DPAdamW: parity with torch.optim.AdamW, DP-AdamBC against a hand derivation, checkpoints."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch

from lit_dp.optim import DPAdamW

SHAPES = [(4, 3), (5,), (2, 2, 2)]


def _params(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def _groups(params: list[torch.nn.Parameter]) -> list[dict]:
    # Several groups with their own hyper-parameters; weight decay on.
    return [
        {"params": params[:1]},
        {"params": params[1:2], "lr": 3e-3, "weight_decay": 0.1},
        {"params": params[2:], "betas": (0.8, 0.99), "eps": 1e-6},
    ]


def _grads(step: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1000 + step)
    return [torch.randn(s, generator=g) * 0.1 for s in SHAPES]


def _set_grads(params, grads) -> None:
    for p, gr in zip(params, grads, strict=True):
        p.grad = gr.to(p.dtype).clone()


def test_equals_torch_adamw_without_noise_correction():
    ours_p, ref_p = _params(), _params()
    ours = DPAdamW(_groups(ours_p), lr=1e-2, weight_decay=0.05)
    ref = torch.optim.AdamW(_groups(ref_p), lr=1e-2, weight_decay=0.05, foreach=False)
    for t in range(20):
        grads = _grads(t)
        _set_grads(ours_p, grads)
        _set_grads(ref_p, grads)
        if t == 7:  # a parameter without a gradient is skipped by both
            ours_p[1].grad = None
            ref_p[1].grad = None
        ours.step()
        ref.step()
        for a, b in zip(ours_p, ref_p, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    ref_state = ref.state_dict()["state"]
    for i, st in ours.state_dict()["state"].items():
        assert float(st["step"]) == float(ref_state[i]["step"])
        torch.testing.assert_close(st["exp_avg_sq"], ref_state[i]["exp_avg_sq"], rtol=0, atol=1e-9)


def _reference_adambc(
    theta0: np.ndarray,
    grads: list[np.ndarray],
    stds: list[float],
    *,
    lr,
    beta1,
    beta2,
    eps,
    wd,
    floor,
) -> np.ndarray:
    """Independent float64 re-derivation of DP-AdamBC (Tang et al. 2024) with AdamW decay."""
    theta = theta0.astype(np.float64).copy()
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    phi = 0.0
    for t, (g, s) in enumerate(zip(grads, stds, strict=True), start=1):
        g = g.astype(np.float64)
        theta = theta * (1 - lr * wd)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        phi = beta2 * phi + (1 - beta2) * s * s
        m_hat = m / (1 - beta1**t)
        v_hat = v / (1 - beta2**t)
        phi_hat = phi / (1 - beta2**t)
        theta = theta - lr * m_hat / (np.sqrt(np.maximum(v_hat - phi_hat, floor)) + eps)
    return theta


def test_noise_correction_matches_hand_derivation():
    lr, betas, eps, wd, floor = 1e-2, (0.9, 0.99), 1e-8, 0.02, 1e-4
    rng = np.random.default_rng(0)
    theta0 = rng.normal(size=(50,))
    stds = [0.5, 0.1, 1.0, 0.0, 0.3]  # varies every step, including a noise-free step
    # Noisy gradients: a signal plus noise of the announced std, so v_hat - phi_hat straddles
    # the floor on some coordinates (both branches of the max are exercised).
    grads = [rng.normal(size=50) * 0.2 + rng.normal(size=50) * s for s in stds]
    expected = _reference_adambc(
        theta0, grads, stds, lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, wd=wd, floor=floor
    )
    p = torch.nn.Parameter(torch.tensor(theta0, dtype=torch.float64))
    opt = DPAdamW(
        [p],
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=wd,
        noise_correction=True,
        variance_floor=floor,
    )
    for g, s in zip(grads, stds, strict=True):
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.set_noise_std(s)
        opt.step()
    np.testing.assert_allclose(p.detach().numpy(), expected, rtol=0, atol=1e-12)
    # Coverage of both branches: the floor was active on some coordinates, not on others.
    st = opt.state[p]
    v_hat = st["exp_avg_sq"].numpy() / (1 - betas[1] ** 5)
    phi_hat = st["noise_var_avg"] / (1 - betas[1] ** 5)
    assert (v_hat - phi_hat < floor).any() and (v_hat - phi_hat > floor).any()


def test_zero_noise_std_with_tiny_floor_equals_adamw():
    ours_p, ref_p = _params(), _params()
    ours = DPAdamW(ours_p, lr=1e-2, weight_decay=0.01, noise_correction=True, variance_floor=1e-30)
    ref = torch.optim.AdamW(ref_p, lr=1e-2, weight_decay=0.01, foreach=False)
    for t in range(5):
        grads = _grads(t)
        _set_grads(ours_p, grads)
        _set_grads(ref_p, grads)
        ours.set_noise_std(0.0)
        ours.step()
        ref.step()
    for a, b in zip(ours_p, ref_p, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_missing_set_noise_std_raises_every_step():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = DPAdamW([p], noise_correction=True)
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="set_noise_std"):
        opt.step()
    opt.set_noise_std(0.1)
    opt.step()
    with pytest.raises(RuntimeError, match="set_noise_std"):  # consumed by the previous step
        opt.step()


def test_state_dict_round_trip_continues_identically():
    def make(params):
        return DPAdamW(_groups(params), lr=1e-2, noise_correction=True, variance_floor=1e-6)

    stds = [0.05 * (1 + t % 3) for t in range(10)]
    run_p = _params()
    run = make(run_p)
    for t in range(4):
        _set_grads(run_p, _grads(t))
        run.set_noise_std(stds[t])
        run.step()
    buf = io.BytesIO()
    torch.save({"opt": run.state_dict(), "params": [p.detach().clone() for p in run_p]}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # plain types and tensors only
    assert all("noise_var_avg" in st for st in ckpt["opt"]["state"].values())

    resumed_p = [torch.nn.Parameter(t) for t in ckpt["params"]]
    resumed = make(resumed_p)
    resumed.load_state_dict(ckpt["opt"])
    for t in range(4, 10):
        for params, opt in ((run_p, run), (resumed_p, resumed)):
            _set_grads(params, _grads(t))
            opt.set_noise_std(stds[t])
            opt.step()
    for a, b in zip(run_p, resumed_p, strict=True):
        assert torch.equal(a, b)
    for st_a, st_b in zip(run.state.values(), resumed.state.values(), strict=True):
        assert st_a["noise_var_avg"] == st_b["noise_var_avg"]


def test_noise_var_ema_is_bias_corrected_like_v():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = DPAdamW([p], betas=(0.9, 0.99), noise_correction=True)
    phi = 0.0
    for s in [0.3, 0.7, 0.2]:
        p.grad = torch.ones(2)
        opt.set_noise_std(s)
        opt.step()
        phi = 0.99 * phi + 0.01 * s * s
        assert opt.state[p]["noise_var_avg"] == pytest.approx(phi, rel=1e-12)
    # A constant noise variance is recovered exactly by the bias correction.
    q = torch.nn.Parameter(torch.zeros(1))
    opt = DPAdamW([q], betas=(0.9, 0.99), noise_correction=True)
    for _ in range(3):
        q.grad = torch.ones(1)
        opt.set_noise_std(0.4)
        opt.step()
    assert opt.state[q]["noise_var_avg"] / (1 - 0.99**3) == pytest.approx(0.16, rel=1e-12)


def test_bf16_params_with_noise_correction_stay_finite():
    params = _params(dtype=torch.bfloat16)
    opt = DPAdamW(params, lr=1e-2, noise_correction=True)
    for t in range(3):
        _set_grads(params, _grads(t))
        opt.set_noise_std(0.05)
        opt.step()
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lr": -1e-3}, "lr"),
        ({"lr": math.nan}, "lr"),
        ({"betas": (1.0, 0.999)}, "betas"),
        ({"betas": (0.9, -0.1)}, "betas"),
        ({"eps": -1e-8}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"variance_floor": 0.0}, "variance_floor"),
        ({"variance_floor": -1.0}, "variance_floor"),
    ],
    ids=[
        "neg-lr",
        "nan-lr",
        "beta1-one",
        "beta2-neg",
        "neg-eps",
        "neg-wd",
        "zero-floor",
        "neg-floor",
    ],
)
def test_bad_arguments_name_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DPAdamW([torch.nn.Parameter(torch.zeros(1))], **kwargs)


def test_bad_group_override_and_bad_noise_std():
    p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="lr"):
        DPAdamW([{"params": [p]}, {"params": [q], "lr": -1.0}])
    opt = DPAdamW([p], noise_correction=True)
    for bad in (-0.1, math.inf):
        with pytest.raises(ValueError, match="std"):
            opt.set_noise_std(bad)


def test_state_dict_layout_matches_adamw_and_deepcopies():
    params = _params()
    opt = DPAdamW(params, noise_correction=True)
    _set_grads(params, _grads(0))
    opt.set_noise_std(0.1)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    group = sd["param_groups"][0]
    assert group["noise_correction"] is True and group["variance_floor"] == 1e-8
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "noise_var_avg"}
