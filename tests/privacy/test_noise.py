"""Noise: the sigma * C formula, fp32 draws, explicit seeding and statistics of large draws."""

from __future__ import annotations

import math

import pytest
import torch

from lit_dp.privacy.noise import (
    add_noise_,
    gaussian_noise_like,
    generator_state,
    load_generator_state,
    make_generator,
    noise_std,
)


def test_noise_std_is_sigma_times_c():
    assert noise_std(noise_multiplier=1.3, max_grad_norm=0.5) == pytest.approx(0.65, abs=1e-15)
    assert noise_std(noise_multiplier=0.0, max_grad_norm=2.0) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"noise_multiplier": -0.1, "max_grad_norm": 1.0}, "noise_multiplier"),
        ({"noise_multiplier": math.nan, "max_grad_norm": 1.0}, "noise_multiplier"),
        ({"noise_multiplier": math.inf, "max_grad_norm": 1.0}, "noise_multiplier"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 0.0}, "max_grad_norm"),
        ({"noise_multiplier": 1.0, "max_grad_norm": -1.0}, "max_grad_norm"),
        ({"noise_multiplier": 1.0, "max_grad_norm": math.inf}, "max_grad_norm"),
    ],
    ids=["neg-sigma", "nan-sigma", "inf-sigma", "zero-c", "neg-c", "inf-c"],
)
def test_bad_inputs_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        noise_std(**kwargs)
    gen, _ = make_generator(0)
    with pytest.raises(ValueError, match=name):
        add_noise_({"w": torch.zeros(3)}, generator=gen, **kwargs)


def test_bad_std_and_seed():
    gen, _ = make_generator(0)
    with pytest.raises(ValueError, match="std"):
        gaussian_noise_like(torch.zeros(2), std=-1.0, generator=gen)
    with pytest.raises(ValueError, match="seed"):
        make_generator(-1)


def test_empirical_std_and_mean_of_large_draw():
    sigma, c = 1.7, 0.3
    gen, _ = make_generator(1234)
    grads = {"w": torch.zeros(1000, 1000)}  # 1e6 coordinates
    add_noise_(grads, noise_multiplier=sigma, max_grad_norm=c, generator=gen)
    x = grads["w"].double()
    std = sigma * c
    assert x.std().item() == pytest.approx(std, rel=0.02)
    # The sample mean of 1e6 draws has std std/1000; 5 standard errors.
    assert abs(x.mean().item()) < 5 * std / 1000


def test_same_seed_same_noise_and_successive_draws_differ():
    g1, s1 = make_generator(7)
    g2, s2 = make_generator(7)
    assert s1 == s2 == 7
    a = gaussian_noise_like(torch.empty(100), std=1.0, generator=g1)
    b = gaussian_noise_like(torch.empty(100), std=1.0, generator=g2)
    assert torch.equal(a, b)
    a2 = gaussian_noise_like(torch.empty(100), std=1.0, generator=g1)
    assert not torch.equal(a, a2)


def test_os_entropy_seeds_differ_and_fit_int64():
    seeds = {make_generator()[1] for _ in range(8)}
    assert len(seeds) == 8
    assert all(0 <= s < 2**63 for s in seeds)  # broadcastable as an int64 tensor under DDP
    gen, seed = make_generator()
    ref, _ = make_generator(seed)  # the returned seed reproduces the generator (DDP re-seeding)
    x = torch.empty(10)
    assert torch.equal(
        gaussian_noise_like(x, std=1.0, generator=gen),
        gaussian_noise_like(x, std=1.0, generator=ref),
    )


def test_noise_is_fp32_for_bf16_grads():
    gen, _ = make_generator(0)
    t = torch.zeros(4, 5, dtype=torch.bfloat16)
    noise = gaussian_noise_like(t, std=1e-3, generator=gen)
    assert noise.dtype == torch.float32
    assert noise.shape == t.shape
    assert noise.device == gen.device
    # A bf16 sum would round noise away; add_noise_ refuses it.
    with pytest.raises(TypeError, match="fp32"):
        add_noise_({"w": t}, noise_multiplier=1.0, max_grad_norm=1.0, generator=gen)


def test_add_noise_order_is_by_sorted_name():
    shapes = {"b": (3,), "a": (2, 2), "c": (5,)}
    g1, _ = make_generator(3)
    g2, _ = make_generator(3)
    forward = {n: torch.zeros(s) for n, s in shapes.items()}
    backward = {n: torch.zeros(shapes[n]) for n in reversed(list(shapes))}
    add_noise_(forward, noise_multiplier=1.0, max_grad_norm=1.0, generator=g1)
    add_noise_(backward, noise_multiplier=1.0, max_grad_norm=1.0, generator=g2)
    for n in shapes:
        assert torch.equal(forward[n], backward[n])
    # Independent reference: one sequential draw, split in sorted-name order.
    ref_gen, _ = make_generator(3)
    flat = torch.randn(4 + 3 + 5, generator=ref_gen)
    assert torch.equal(forward["a"].flatten(), flat[:4])
    assert torch.equal(forward["b"], flat[4:7])
    assert torch.equal(forward["c"], flat[7:])


def test_add_noise_is_in_place_and_adds_to_existing_sum():
    gen, _ = make_generator(5)
    base = torch.arange(6, dtype=torch.float32)
    grads = {"w": base.clone()}
    ptr = grads["w"].data_ptr()
    add_noise_(grads, noise_multiplier=2.0, max_grad_norm=0.5, generator=gen)
    ref_gen, _ = make_generator(5)
    expected = base + torch.randn(6, generator=ref_gen) * 1.0
    assert grads["w"].data_ptr() == ptr
    torch.testing.assert_close(grads["w"], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("c", [1.0, math.inf], ids=["finite-c", "inf-c"])
def test_zero_sigma_adds_nothing_and_draws_nothing(c):
    # C = inf is the non-private baseline (no clipping); it is only allowed without noise.
    assert noise_std(noise_multiplier=0.0, max_grad_norm=c) == 0.0
    gen, _ = make_generator(9)
    before = gen.get_state().clone()
    grads = {"w": torch.tensor([1.0, -0.0, math.inf, 2.5])}
    expected = grads["w"].clone()
    add_noise_(grads, noise_multiplier=0.0, max_grad_norm=c, generator=gen)
    assert torch.equal(grads["w"], expected)
    assert torch.equal(grads["w"].signbit(), expected.signbit())  # bitwise: nothing was added
    assert torch.equal(gen.get_state(), before)  # no full-model draw for sigma = 0


def test_generator_state_round_trip_continues_identically():
    gen, _ = make_generator(11)
    gaussian_noise_like(torch.empty(7), std=1.0, generator=gen)
    state = generator_state(gen)
    expected = gaussian_noise_like(torch.empty(7), std=1.0, generator=gen)
    fresh, _ = make_generator(0)
    load_generator_state(fresh, state)
    assert torch.equal(gaussian_noise_like(torch.empty(7), std=1.0, generator=fresh), expected)
    with pytest.raises(ValueError, match="uint8"):
        load_generator_state(fresh, torch.zeros(3))
