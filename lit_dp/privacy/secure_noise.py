"""Secure-mode Gaussian noise: a ChaCha20 keystream, Box-Muller in float64, a sum of Gaussians.

The default noise (``lit_dp.privacy.noise``) is ``torch.randn`` on a seeded torch generator:
statistically sound and fast, but torch's generators are not cryptographic (their state can be
recovered from enough output), and a floating-point Gaussian sample from such a sampler has gaps:
some floats near a value are reachable and others are not, in a pattern that depends on the
sampler's inputs. Mironov (2012) showed that these gaps in Laplace samples let an observer tell
neighbouring datasets apart, and Jin, McMurtry, Rubinstein, Ohrimenko (2021) did the same for the
Gaussian samplers of DP libraries, Opacus' included. Secure mode (``model.secure_noise: true``)
changes how every draw is made; the noise distribution, and hence the accounting, is unchanged:

1. **CSPRNG.** The random bits are the ChaCha20 keystream (RFC 8439, the ``cryptography``
   package's OpenSSL binding) under a 256-bit key from the OS generator (``secrets``). Every draw
   of up to ``CHUNK`` coordinates uses its own 96-bit nonce, a counter that only grows, so no
   (key, nonce) pair is used twice; the stream position is that counter, checkpointed with the
   key.
2. **Uniforms from 64 bits.** Each uniform is ``u = (m + 1) / 2**64`` for a 64-bit word m,
   computed in float64, so u is in (0, 1] with full float64 resolution near 0 (the Gaussian
   tails): the Box-Muller radius is cut at ``sqrt(128 ln 2) = 9.42``, a cut of probability
   2**-64 per pair.
3. **Box-Muller in float64**: a pair (u_r, u_a) gives the two independent normals
   ``r cos(2 pi u_a)`` and ``r sin(2 pi u_a)`` with ``r = sqrt(-2 ln u_r)``.
4. **Sum of Gaussians.** Each coordinate is the sum of ``num_summands`` (default 2) such normals,
   each from its own pair, scaled by ``std / sqrt(num_summands)``: exactly N(0, std^2) in exact
   arithmetic. This is the mitigation of Holohan and Braghin (2021, *Secure Random Sampling in
   Differential Privacy*, ESORICS): a float that one sampler call can only hit from a few inputs
   is hit by a sum from many input combinations, so the gaps an attacker reads are filled, and
   inverting a sample means searching the summands' joint inputs. Their paper notes that the two
   outputs of one Box-Muller pair must never be summed together (``cos + sin`` is one sample in
   disguise); here the cos output of each pair goes to one coordinate and its sin output to
   another, and a coordinate's summands always come from different pairs. Opacus' secure mode
   follows the same idea (n = 2).
5. **One rounding.** The float64 noise is added to the fp32 clipped sum in float64 and the result
   is rounded once to fp32 (``lit_dp.privacy.noise.add_noise_``): the released gradient's
   resolution (24 bits) is far coarser than the noise's (53 bits).

What this is not: a proof of DP for floating-point outputs. The sum-of-Gaussians construction
removes the known attacks' signal but has no formal bound; exact guarantees need a discrete
Gaussian (Canonne, Kamath, Steinke 2020) with its own accounting, which lit_dp does not offer. The
cost is CPU time: about 16 bytes of keystream and one log, sqrt, cos and sin per coordinate,
drawn on the CPU in chunks (benchmarks/README.md gives the step-time ratio).

The key and the nonce counter are secret operator-side state, like the torch generator state of
the default mode: they belong in checkpoints, never next to an exported model.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import warnings
from typing import Any

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

__all__ = [
    "CHUNK",
    "KEY_BYTES",
    "SecureNoiseGenerator",
    "chacha20_keystream",
    "standard_normal_sums",
]

KEY_BYTES = 32  # ChaCha20's 256-bit key
CHUNK = 2**20  # coordinates per nonce: 16 MiB of keystream at 2 summands (far below 2**32 blocks)
_NONCE_LIMIT = 2**96  # RFC 8439's 96-bit nonce
_KEY_DOMAIN = b"lit_dp secure noise key from a fixed noise_seed, v1"


def chacha20_keystream(
    key: bytes, *, nonce: bytes, num_bytes: int, initial_block: int = 0
) -> bytearray:
    """``num_bytes`` of the RFC 8439 ChaCha20 keystream (the encryption of zeros).

    Args:
        key: the 32-byte key.
        nonce: the 12-byte nonce.
        num_bytes: how many bytes, at most ``(2**32 - initial_block) * 64``.
        initial_block: the 32-bit block counter the stream starts at (RFC 8439 calls it the
            initial counter).

    Returns:
        A new bytearray (writable, so that torch can view it without a copy).
    """
    if len(key) != KEY_BYTES or len(nonce) != 12:
        raise ValueError("ChaCha20 needs a 32-byte key and a 12-byte nonce")
    if num_bytes < 0 or initial_block * 64 + num_bytes > 2**32 * 64:
        raise ValueError(f"num_bytes={num_bytes} overruns the 32-bit block counter of one nonce")
    # OpenSSL's 16-byte ChaCha20 IV is the little-endian block counter, then the nonce.
    cipher = Cipher(algorithms.ChaCha20(key, initial_block.to_bytes(4, "little") + nonce), None)
    out = bytearray(num_bytes)
    if num_bytes:
        cipher.encryptor().update_into(bytes(num_bytes), out)  # a stream cipher: len(out) suffices
    return out


def standard_normal_sums(stream: bytearray, *, num_summands: int) -> torch.Tensor:
    """Standard normals in float64, each the scaled sum of ``num_summands`` Box-Muller normals.

    ``stream`` holds ``2 * num_summands * h`` little-endian 64-bit words, read as
    ``2 * num_summands`` rows of h words: rows 2j and 2j + 1 are the radius and angle uniforms
    of summand j. Output coordinate i < h is ``sum_j r_j[i] cos(2 pi a_j[i]) / sqrt(k)`` and
    coordinate h + i the same with sin, so each coordinate's summands come from k different
    pairs and the two outputs of one pair land in different coordinates.

    Returns:
        A float64 CPU tensor of 2h values, each N(0, 1) (up to the radius cut at 9.42).
    """
    k = int(num_summands)
    words = torch.frombuffer(stream, dtype=torch.uint64)
    if k < 1 or words.numel() % (2 * k):
        raise ValueError(f"stream of {words.numel()} words does not split into {2 * k} rows")
    u = words.to(torch.float64).add_(1.0).mul_(2.0**-64).view(2 * k, -1)  # (2k, h) in (0, 1]
    h = u.shape[1]
    out = torch.zeros(2, h, dtype=torch.float64)  # row 0: cos coordinates, row 1: sin
    for j in range(k):
        radius = u[2 * j].log_().mul_(-2.0).sqrt_()  # (h,) sqrt(-2 ln u_r)
        angle = u[2 * j + 1].mul_(2.0 * math.pi)  # (h,)
        out[0].addcmul_(radius, angle.cos())
        out[1].addcmul_(radius, angle.sin_())
    return out.view(-1).mul_(1.0 / math.sqrt(k))


class SecureNoiseGenerator:
    """The noise generator of secure mode: N(0, std^2) draws from a ChaCha20 keystream.

    It stands where a ``torch.Generator`` stands in ``lit_dp.privacy.noise`` (which dispatches
    on its type), draws on the CPU in float64, and has ``get_state``/``set_state`` so that a
    checkpoint holds its key and nonce counter and a resumed run continues the same stream.

    Args:
        key: the 32-byte ChaCha20 key (secret).
        num_summands: k, the number of Gaussians summed per coordinate (>= 1; 2 by default).
        nonce: the first nonce counter to use (0 for a fresh key).
    """

    device = torch.device("cpu")

    def __init__(self, key: bytes, *, num_summands: int = 2, nonce: int = 0) -> None:
        if not isinstance(key, bytes | bytearray) or len(key) != KEY_BYTES:
            raise ValueError(f"key must be {KEY_BYTES} bytes (a ChaCha20 key)")
        if isinstance(num_summands, bool) or not isinstance(num_summands, int) or num_summands < 1:
            raise ValueError(f"num_summands={num_summands!r} must be an integer >= 1")
        self._key = bytes(key)
        self.num_summands = num_summands
        self._nonce = self._check_nonce(nonce)

    @classmethod
    def create(cls, seed: int | None = None, *, num_summands: int = 2) -> SecureNoiseGenerator:
        """A generator keyed from OS entropy, or, for a fixed ``seed``, from a hash of it.

        A fixed seed makes the key, and so every noise draw, computable by anyone who knows the
        seed: secure mode then keeps its floating-point mitigation but loses its secrecy, and
        this warns loudly. Use it for reproducibility studies only, never for a release.

        Raises:
            ValueError: a seed that is not an integer in [0, 2**64).
        """
        if seed is None:
            return cls(secrets.token_bytes(KEY_BYTES), num_summands=num_summands)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"model.noise_seed={seed!r} must be an integer in [0, 2**64) or null")
        warnings.warn(
            f"model.secure_noise=true with a fixed model.noise_seed={seed}: the ChaCha20 key is "
            "derived from the seed, so anyone who knows the seed can recompute and subtract the "
            "noise. The noise is NOT secret; set model.noise_seed: null for any model you release",
            UserWarning,
            stacklevel=2,
        )
        key = hashlib.sha256(_KEY_DOMAIN + seed.to_bytes(8, "little")).digest()
        return cls(key, num_summands=num_summands)

    @property
    def key(self) -> bytes:
        """The secret key (operator-side: checkpoints, the DDP broadcast)."""
        return self._key

    @property
    def nonce(self) -> int:
        """The next nonce counter: the stream position."""
        return self._nonce

    def normal(self, shape: torch.Size | tuple[int, ...], *, std: float) -> torch.Tensor:
        """N(0, std^2) noise of ``shape``, float64 on the CPU; advances the stream.

        The draw is cut into chunks of ``CHUNK`` coordinates, each from its own nonce, so the
        keystream held at once stays at 16 MiB (2 summands) whatever the tensor's size.
        """
        numel = math.prod(shape)
        out = torch.empty(numel, dtype=torch.float64)
        for start in range(0, numel, CHUNK):
            n = min(CHUNK, numel - start)
            half = (n + 1) // 2  # a cos and a sin coordinate per k pairs of 64-bit words
            stream = chacha20_keystream(
                self._key,
                nonce=self._next_nonce().to_bytes(12, "little"),
                num_bytes=16 * self.num_summands * half,
            )
            out[start : start + n] = standard_normal_sums(stream, num_summands=self.num_summands)[
                :n
            ]
        return out.mul_(float(std)).view(shape)

    def _next_nonce(self) -> int:
        nonce = self._nonce
        self._nonce = self._check_nonce(nonce + 1)
        return nonce

    @staticmethod
    def _check_nonce(nonce: Any) -> int:
        if isinstance(nonce, bool) or not isinstance(nonce, int) or not 0 <= nonce < _NONCE_LIMIT:
            raise ValueError(f"nonce={nonce!r} must be an integer in [0, 2**96)")
        return nonce

    def get_state(self) -> dict[str, Any]:
        """Key, nonce counter and k, for a checkpoint (secret: keep it operator-side)."""
        return {
            "kind": "chacha20",
            "key": torch.tensor(list(self._key), dtype=torch.uint8),
            "nonce": self._nonce,
            "num_summands": self.num_summands,
        }

    def set_state(self, state: Any) -> None:
        """Restore a ``get_state`` dict: the stream continues exactly where it stopped.

        Raises:
            ValueError: ``state`` is not a secure-mode state (e.g. a torch generator's).
        """
        if not isinstance(state, dict) or state.get("kind") != "chacha20":
            raise ValueError(
                "this noise state is not a secure-mode (ChaCha20) state: the checkpoint was "
                "written with model.secure_noise=false; resume with the same model.secure_noise"
            )
        key = bytes(state["key"].to(torch.uint8).tolist())
        restored = SecureNoiseGenerator(
            key, num_summands=state["num_summands"], nonce=state["nonce"]
        )
        self._key, self.num_summands, self._nonce = key, restored.num_summands, restored.nonce
