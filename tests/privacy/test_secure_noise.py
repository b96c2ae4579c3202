"""Secure-mode noise: the RFC 8439 keystream, the Box-Muller sum against a per-element
reference, moments and a KS test of large draws, fresh keys, seeded keys, the stream position
in the state, and the noise functions' dispatch (float64 noise, one rounding)."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
from scipy import stats

from lit_dp.privacy import secure_noise
from lit_dp.privacy.noise import (
    add_noise_,
    gaussian_noise_like,
    generator_state,
    load_generator_state,
    make_generator,
)
from lit_dp.privacy.secure_noise import (
    SecureNoiseGenerator,
    chacha20_keystream,
    standard_normal_sums,
)

KEY = bytes(range(32))


def _ks_bound(n: int, alpha: float = 1e-6) -> float:
    """DKW: P(sup |F_n - F| > eps) <= 2 exp(-2 n eps^2); the eps of false-alarm rate alpha."""
    return math.sqrt(math.log(2.0 / alpha) / (2.0 * n))


def test_keystream_is_rfc8439_chacha20():
    # RFC 8439 section 2.3.2: key 00..1f, nonce 00:00:00:09:00:00:00:4a:00:00:00:00, counter 1.
    block = chacha20_keystream(
        KEY, nonce=bytes.fromhex("000000090000004a00000000"), num_bytes=64, initial_block=1
    )
    expected = bytes.fromhex(
        "10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e"
        "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e"
    )
    assert bytes(block) == expected
    # The stream is contiguous across blocks: bytes 64..127 from block 0 are block 1.
    two = chacha20_keystream(
        KEY, nonce=bytes.fromhex("000000090000004a00000000"), num_bytes=128, initial_block=0
    )
    assert bytes(two[64:]) == expected
    with pytest.raises(ValueError, match="32-byte key"):
        chacha20_keystream(b"short", nonce=bytes(12), num_bytes=8)


def _reference_normals(stream: bytes, k: int) -> np.ndarray:
    """Element by element, from the words: u = (m + 1) / 2**64, Box-Muller, sum, / sqrt(k)."""
    words = struct.unpack(f"<{len(stream) // 8}Q", stream)
    h = len(words) // (2 * k)
    rows = [words[r * h : (r + 1) * h] for r in range(2 * k)]
    out = np.zeros(2 * h)
    for i in range(h):
        for j in range(k):
            u_r = (float(rows[2 * j][i]) + 1.0) / 2.0**64
            u_a = (float(rows[2 * j + 1][i]) + 1.0) / 2.0**64
            r = math.sqrt(-2.0 * math.log(u_r))
            out[i] += r * math.cos(2.0 * math.pi * u_a)
            out[h + i] += r * math.sin(2.0 * math.pi * u_a)
    return out / math.sqrt(k)


@pytest.mark.parametrize("k", [1, 2, 3], ids=["k1", "k2", "k3"])
def test_box_muller_sum_matches_per_element_reference(k):
    stream = chacha20_keystream(KEY, nonce=bytes(12), num_bytes=16 * k * 50)
    got = standard_normal_sums(bytearray(stream), num_summands=k).numpy()
    np.testing.assert_allclose(got, _reference_normals(bytes(stream), k), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="rows"):
        standard_normal_sums(bytearray(24), num_summands=1)  # 3 words: not 2 rows


def test_extreme_words_stay_finite():
    """m = 0 gives the largest radius sqrt(128 ln 2); m = 2**64 - 1 gives u = 1 (radius 0)."""
    words = struct.pack("<4Q", 0, 2**64 - 1, 2**64 - 1, 0)  # (radius, angle) pairs: k = 1, h = 2
    z = standard_normal_sums(bytearray(words), num_summands=1)
    assert torch.isfinite(z).all()
    max_radius = math.sqrt(128.0 * math.log(2.0))
    assert abs(z[0].item()) == pytest.approx(max_radius, rel=1e-12)  # cos(2 pi * ~1) ~ 1
    assert z[1].item() == 0.0  # radius 0


@pytest.mark.parametrize("k", [1, 2, 4], ids=["k1", "k2", "k4"])
def test_moments_and_ks_against_the_normal(k):
    """Mean, variance, fourth moment within 5 standard errors and the KS distance within the
    DKW bound at alpha = 1e-6: the sum of k Gaussians of std/sqrt(k) is N(0, std^2)."""
    n, std = 2**20, 0.37
    gen = SecureNoiseGenerator(KEY, num_summands=k)
    x = gen.normal((n,), std=std).numpy()
    assert x.dtype == np.float64
    var = std**2
    assert abs(x.mean()) < 5 * std / math.sqrt(n)
    assert abs(x.var() - var) < 5 * var * math.sqrt(2.0 / n)  # sd of the sample variance
    m4 = np.mean(x**4)  # E[z^4] = 3 std^4, sd sqrt(96) std^4 / sqrt(n)
    assert abs(m4 - 3 * var**2) < 5 * math.sqrt(96.0) * var**2 / math.sqrt(n)
    assert stats.kstest(x / std, "norm").statistic < _ks_bound(n)
    # The cos and sin outputs of the same pairs land in different coordinates, uncorrelated.
    h = secure_noise.CHUNK // 2
    r = np.corrcoef(x[:h], x[h : 2 * h])[0, 1]
    assert abs(r) < 5 / math.sqrt(h)


def test_fresh_generators_have_different_keys_and_noise():
    gens = [SecureNoiseGenerator.create() for _ in range(4)]
    assert len({g.key for g in gens}) == 4
    assert all(len(g.key) == 32 and g.nonce == 0 for g in gens)
    a, b = (g.normal((64,), std=1.0) for g in gens[:2])
    assert not torch.equal(a, b)


def test_fixed_seed_derives_a_key_and_warns_that_it_is_not_secret():
    with pytest.warns(UserWarning, match="NOT secret"):
        a = SecureNoiseGenerator.create(7)
    with pytest.warns(UserWarning, match="noise_seed"):
        b = SecureNoiseGenerator.create(7)
    with pytest.warns(UserWarning, match="noise_seed=8"):
        c = SecureNoiseGenerator.create(8)
    assert a.key == b.key != c.key
    assert torch.equal(a.normal((10,), std=1.0), b.normal((10,), std=1.0))
    with pytest.raises(ValueError, match="noise_seed"):
        SecureNoiseGenerator.create(-1)


def test_draws_advance_the_nonce_chunk_by_chunk(monkeypatch):
    """A draw of n coordinates uses ceil(n / CHUNK) fresh nonces, each its own keystream."""
    monkeypatch.setattr(secure_noise, "CHUNK", 4)
    gen = SecureNoiseGenerator(KEY)
    x = gen.normal((3, 3), std=2.0)  # 9 coordinates: chunks of 4, 4, 1
    assert x.shape == (3, 3) and gen.nonce == 3
    parts = []
    for nonce, n in ((0, 4), (1, 4), (2, 1)):
        half = (n + 1) // 2
        stream = chacha20_keystream(KEY, nonce=nonce.to_bytes(12, "little"), num_bytes=32 * half)
        parts.append(standard_normal_sums(stream, num_summands=2)[:n])
    torch.testing.assert_close(x.flatten(), 2.0 * torch.cat(parts), rtol=0, atol=0)
    y = gen.normal((9,), std=2.0)  # the next draw starts at nonce 3: no reuse
    assert not torch.equal(x.flatten(), y)


def test_state_round_trip_continues_the_stream_and_refuses_the_other_mode():
    gen = SecureNoiseGenerator(KEY)
    gen.normal((5,), std=1.0)
    state = generator_state(gen)
    assert state["kind"] == "chacha20" and state["nonce"] == 1
    expected = gen.normal((5,), std=1.0)
    fresh = SecureNoiseGenerator.create()
    load_generator_state(fresh, state)
    assert fresh.key == KEY
    assert torch.equal(fresh.normal((5,), std=1.0), expected)
    torch_gen, _ = make_generator(0)
    with pytest.raises(ValueError, match="secure_noise"):
        load_generator_state(torch_gen, state)
    with pytest.raises(ValueError, match="secure_noise"):
        load_generator_state(fresh, generator_state(torch_gen))


def test_noise_functions_dispatch_to_the_secure_generator():
    a, b = SecureNoiseGenerator(KEY), SecureNoiseGenerator(KEY)
    noise = gaussian_noise_like(torch.empty(2, 3, dtype=torch.bfloat16), std=0.5, generator=a)
    assert noise.dtype == torch.float64 and noise.shape == (2, 3)
    torch.testing.assert_close(noise, b.normal((2, 3), std=0.5), rtol=0, atol=0)
    # add_noise_: sorted-name order, float64 noise added to the fp32 sum, rounded once to fp32.
    a, b = SecureNoiseGenerator(KEY), SecureNoiseGenerator(KEY)
    base = {"w": torch.linspace(-1, 1, 6).reshape(2, 3), "b": torch.full((4,), 1e3)}
    grads = {n: t.clone() for n, t in base.items()}
    add_noise_(grads, noise_multiplier=2.0, max_grad_norm=0.25, generator=a)
    for name in ("b", "w"):
        expected = (base[name].double() + b.normal(base[name].shape, std=0.5)).float()
        assert grads[name].dtype == torch.float32
        assert torch.equal(grads[name], expected)
    nonce = a.nonce
    add_noise_(grads, noise_multiplier=0.0, max_grad_norm=1.0, generator=a)
    assert a.nonce == nonce  # sigma = 0 draws nothing
