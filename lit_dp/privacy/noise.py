"""Gaussian noise for the DP step, drawn from an explicit generator.

The one noise formula of lit_dp: the Gaussian mechanism adds, once per optimizer step, noise of
standard deviation ``std = noise_multiplier * max_grad_norm`` (sigma * C, in gradient-norm units)
to every coordinate of the clipped gradient sum. Noise is drawn in fp32 (a bf16 draw would
round a small std away; secure mode draws float64) from a generator that the caller owns, so
that it can be seeded identically on every DDP rank (one draw per step, never one per rank) and
checkpointed (a resumed run continues the same noise stream).

The noise seed and generator state are secret operator-side state: they belong in checkpoints,
never in an exported model.

Two kinds of generator are accepted wherever a generator is (``NoiseGenerator``): a
``torch.Generator`` (the default, fast mode: statistically sound, not cryptographic) and a
``lit_dp.privacy.secure_noise.SecureNoiseGenerator`` (``model.secure_noise: true``: a ChaCha20
keystream, float64 Box-Muller, a sum of Gaussians, one rounding to fp32; see that module).
"""

from __future__ import annotations

import math
import secrets

import torch

from lit_dp.privacy.secure_noise import SecureNoiseGenerator

# What the noise functions draw from: torch's generator (fast mode) or the secure-mode one.
NoiseGenerator = torch.Generator | SecureNoiseGenerator

# Seeds are drawn below 2**63 so that they fit an int64 tensor (the DDP broadcast of the seed).
_SEED_BITS = 63


def _check_scalar(name: str, value: float, *, positive: bool) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}={value} must be a finite number")
    if positive and value <= 0.0:
        raise ValueError(f"{name}={value} must be > 0")
    if not positive and value < 0.0:
        raise ValueError(f"{name}={value} must be >= 0 (use 0 for no noise)")
    return value


def noise_std(*, noise_multiplier: float, max_grad_norm: float) -> float:
    """Per-coordinate standard deviation of the Gaussian noise added to a clipped gradient sum.

    ``std = noise_multiplier * max_grad_norm`` (sigma * C). The result is in the units of the
    gradient sum; divide by the expected batch size q * N for the noise std in the averaged
    gradient.

    Args:
        noise_multiplier: sigma >= 0, the noise std in units of the clip bound.
        max_grad_norm: C > 0, the L2 bound of each privacy unit's clipped gradient. C = inf
            (no clipping, the non-private baseline) is allowed only with sigma = 0.

    Returns:
        sigma * C as a Python float (0.0 when sigma = 0, whatever C).

    Raises:
        ValueError: a non-finite or negative noise_multiplier, a max_grad_norm <= 0 or nan, or
            max_grad_norm = inf with sigma > 0 (unbounded noise).
    """
    sigma = _check_scalar("noise_multiplier", noise_multiplier, positive=False)
    clip = float(max_grad_norm)
    if sigma == 0.0 and clip == math.inf:
        return 0.0  # no clipping and no noise: 0 * inf would be nan
    if clip == math.inf:
        raise ValueError(
            f"max_grad_norm=inf with noise_multiplier={sigma} > 0 gives unbounded noise; "
            "clip to a finite C or use noise_multiplier=0"
        )
    clip = _check_scalar("max_grad_norm", clip, positive=True)
    return sigma * clip


def describe_noise_sampler(*, secure: bool, seed_fixed: bool) -> str:
    """What the noise of a run guarantees, in one line for the privacy report.

    Args:
        secure: ``model.secure_noise``.
        seed_fixed: whether ``model.noise_seed`` was fixed (the key or seed is then known).
    """
    if not secure:
        origin = "a fixed noise_seed" if seed_fixed else "OS entropy"
        return (
            f"fast: torch generator seeded from {origin}, fp32 draws; statistically sound, "
            "not a cryptographic generator and no floating-point attack mitigation"
        )
    origin = "derived from a fixed noise_seed (NOT secret)" if seed_fixed else "from OS entropy"
    return (
        f"secure: ChaCha20 keystream (CSPRNG) with a key {origin}, float64 Box-Muller, each "
        "coordinate a sum of 2 Gaussians (floating-point attack mitigation), rounded once to fp32"
    )


def make_generator(
    seed: int | None = None, device: str | torch.device = "cpu"
) -> tuple[torch.Generator, int]:
    """A seeded ``torch.Generator`` for noise, and the seed it was given.

    Args:
        seed: an integer in [0, 2**64). ``None`` (recommended for real runs) draws a 63-bit seed
            from OS entropy (``secrets``), so the noise cannot be predicted from the config.
        device: the device the generator draws on (noise is drawn where the sums live).

    Returns:
        ``(generator, seed)``. Under DDP, rank 0's seed is broadcast and every rank re-seeds its
        generator with it, so all ranks add the identical noise draw once.

    Raises:
        ValueError: a negative seed or one of 2**64 or more.
    """
    if seed is None:
        seed = secrets.randbits(_SEED_BITS)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed={seed!r} must be an integer in [0, 2**64) or None (OS entropy)")
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(seed)
    return generator, seed


def gaussian_noise_like(t: torch.Tensor, *, std: float, generator: NoiseGenerator) -> torch.Tensor:
    """Gaussian noise N(0, std^2) with the shape of ``t``, on the generator's device.

    The noise is fp32 whatever ``t``'s dtype (bf16 noise would round away most of a small std);
    a secure-mode generator draws it in float64 on the CPU, and adding it to an fp32 sum rounds
    the noisy sum once.

    Args:
        t: tensor whose shape the noise takes (its values and dtype are not used).
        std: per-coordinate standard deviation, >= 0 (see ``noise_std``).
        generator: the noise generator (``torch.Generator`` or ``SecureNoiseGenerator``).

    Returns:
        A new tensor of ``t.shape`` on ``generator.device``: fp32 from a torch generator,
        float64 from a secure-mode one.
    """
    std = _check_scalar("std", std, positive=False)
    if isinstance(generator, SecureNoiseGenerator):
        return generator.normal(t.shape, std=std)
    noise = torch.randn(t.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return noise.mul_(std)


def add_noise_(
    grads: dict[str, torch.Tensor],
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    generator: NoiseGenerator,
) -> None:
    """Add N(0, (noise_multiplier * max_grad_norm)^2) noise in place to each clipped gradient sum.

    Parameters are visited in sorted-name order, so the same generator state gives the same noise
    to each parameter whatever the dict's insertion order (model wrappers may reorder it).
    With ``noise_multiplier == 0`` nothing is added and nothing is drawn (the generator does not
    advance), so a sigma = 0 run costs no full-model draw and its sums stay bitwise unchanged.

    Args:
        grads: parameter name -> clipped gradient sum, fp32 or fp64 (the sums are
            accumulated in fp32, never in the model's bf16). Modified in place.
        noise_multiplier: sigma >= 0 applied to this sum (the raised gradient multiplier when the
            clip bound is a private quantile, see ``ClipBoundEstimator.grad_noise_multiplier``).
        max_grad_norm: C > 0, the clip bound used for these sums (inf only with sigma = 0).
        generator: the noise generator (identically seeded on every DDP rank). A secure-mode
            generator's float64 noise is added in float64 and the sum rounded once to the
            gradient's dtype.

    Raises:
        ValueError: bad noise_multiplier or max_grad_norm (see ``noise_std``).
        TypeError: a gradient sum in a dtype narrower than fp32.
    """
    std = noise_std(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm)
    for name in sorted(grads):
        g = grads[name]
        if g.dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"grads[{name!r}] is {g.dtype}; accumulate clipped sums in fp32 before adding noise"
            )
    if std == 0.0:
        return
    for name in sorted(grads):
        g = grads[name]
        g.add_(gaussian_noise_like(g, std=std, generator=generator).to(device=g.device))


def generator_state(generator: NoiseGenerator) -> torch.Tensor | dict:
    """A copy of the generator's state for a checkpoint; keep it private.

    A CPU uint8 tensor for a torch generator; for a secure-mode one, a dict with its key and
    nonce counter (``SecureNoiseGenerator.get_state``).
    """
    if isinstance(generator, SecureNoiseGenerator):
        return generator.get_state()
    return generator.get_state().clone()


def load_generator_state(generator: NoiseGenerator, state: torch.Tensor | dict) -> None:
    """Restore a state from ``generator_state`` so noise continues exactly where it stopped.

    Raises:
        ValueError: ``state`` is not a state of this kind of generator (a uint8 tensor for a
            torch generator, a ChaCha20 state dict for a secure-mode one): a checkpoint written
            with the other ``model.secure_noise`` setting.
    """
    if isinstance(generator, SecureNoiseGenerator):
        generator.set_state(state)  # it checks that the state is its own kind
        return
    if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8:
        raise ValueError(
            "state must be the uint8 tensor returned by generator_state() (a checkpoint written "
            "with model.secure_noise=true holds a ChaCha20 state; resume with the same "
            "model.secure_noise)"
        )
    generator.set_state(state.cpu())
