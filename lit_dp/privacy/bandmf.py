"""Banded matrix factorization (DP-BandMF): the strategy's coefficients and its accounting.

Pure functions only; the stateful noise lives in ``lit_dp.privacy.noise_mechanism``.

The strategy. C is the n x n lower-triangular banded Toeplitz matrix with first column
``(c_0, c_1, ..., c_{b-1}, 0, ..., 0)``, c_0 = 1, b the number of bands. The mechanism releases
the clipped sums X plus C^{-1} Z (Z i.i.d. Gaussian): step t adds row t of C^{-1} Z, which the
recursion ``w_t = z_t - sum_{j=1}^{b-1} c_j w_{t-j}`` computes from the b - 1 previous w.

The default coefficients are the banded square root (BSR): the first b coefficients of the power
series of (1 - x)^(-1/2), c_j = binom(2j, j) / 4^j (C is then a truncated square root of the
prefix-sum matrix). Optimized coefficients computed offline can be loaded from a file.

Sensitivity and accounting (amplified BandMF, Choquette-Choo et al. 2023). The privacy units
are split into b fixed groups; step t Poisson-samples only from group t mod b, so a unit takes
part at most once in every b consecutive steps. Column t of C has its non-zeros in rows
t, ..., t + b - 1, so the columns of two steps b or more apart have disjoint supports: a unit's
contributions fall in disjoint blocks of C X + Z, and its privacy loss is the composition, over
the ceil(n / b) rounds of b steps, of one Poisson-subsampled Gaussian mechanism each, with
sampling rate q_group (the rate within the group) and sensitivity the column norm
||c||_2 = sqrt(sum_j c_j^2). Noise of std ``sigma * C_clip * ||c||_2`` per coordinate of Z
therefore makes each round a Gaussian of noise multiplier sigma: the ledger records
(sigma, q_group) once per round. With b = 1 this is DP-SGD, step by step.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = [
    "bsr_coefficients",
    "check_coefficients",
    "column_norm",
    "group_sample_rate",
    "inverse_coefficients",
    "load_coefficients",
    "round_sample_rates",
    "suggest_bands",
]

_FIELD = "model.noise_mechanism"


def bsr_coefficients(bands: int) -> list[float]:
    """The first ``bands`` coefficients of (1 - x)^(-1/2): c_j = binom(2j, j) / 4^j.

    Computed by the ratio c_j = c_{j-1} (2j - 1) / (2j), which stays exact to a few ulp where
    binom(2j, j) itself would overflow a float (j > 500).

    Raises:
        ValueError: ``bands`` not an integer >= 1.
    """
    b = _check_bands(bands)
    coeffs = [1.0]
    for j in range(1, b):
        coeffs.append(coeffs[-1] * (2 * j - 1) / (2 * j))
    return coeffs


def _check_bands(bands: object) -> int:
    if isinstance(bands, bool) or not isinstance(bands, int) or bands < 1:
        raise ValueError(
            f"{_FIELD}.bands={bands!r} must be an integer >= 1 (1 = independent noise, DP-SGD)"
        )
    return bands


def check_coefficients(coefficients: Sequence[float], bands: int | None = None) -> list[float]:
    """Validated strategy coefficients: finite floats with c_0 = 1, ``bands`` of them if given.

    Raises:
        ValueError: naming the problem and the fix.
    """
    coeffs = [float(c) for c in coefficients]
    if not coeffs:
        raise ValueError(f"{_FIELD}: the coefficient list is empty; give c_0 = 1, c_1, ...")
    if bands is not None and len(coeffs) != _check_bands(bands):
        raise ValueError(
            f"{_FIELD}: {len(coeffs)} coefficients for bands={bands}; give exactly one "
            "coefficient per band (c_0 = 1, c_1, ..., c_{b-1})"
        )
    if not all(math.isfinite(c) for c in coeffs):
        raise ValueError(f"{_FIELD}: coefficients {coeffs} must be finite numbers")
    if coeffs[0] != 1.0:
        raise ValueError(
            f"{_FIELD}: c_0={coeffs[0]!r} must be 1 (C has a unit diagonal); divide the "
            "coefficients by c_0 (the noise is scaled by their column norm anyway)"
        )
    return coeffs


def load_coefficients(path: str | Path, bands: int) -> list[float]:
    """Coefficients from a file: a JSON list of floats, or whitespace-separated numbers.

    Raises:
        ValueError: an unreadable file, or coefficients that ``check_coefficients`` refuses.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"{_FIELD}.coefficients_file={str(path)!r} is not a file")
    text = p.read_text()
    try:
        values = json.loads(text) if text.lstrip().startswith("[") else text.split()
        coeffs = [float(v) for v in values]
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{_FIELD}.coefficients_file={str(path)!r}: expected a JSON list of numbers or "
            f"whitespace-separated numbers ({err})"
        ) from err
    return check_coefficients(coeffs, bands)


def column_norm(coefficients: Sequence[float]) -> float:
    """||c||_2 = sqrt(sum_j c_j^2), the largest column norm of C.

    It is C's sensitivity under b-min-separated participation (1 for b = 1).
    """
    return math.sqrt(math.fsum(c * c for c in coefficients))


def inverse_coefficients(coefficients: Sequence[float], length: int) -> list[float]:
    """The first ``length`` coefficients d of 1 / c(x): C^{-1} is the Toeplitz matrix of d.

    d_0 = 1, d_k = -sum_{j=1}^{min(k, b-1)} c_j d_{k-j}. Row t of C^{-1} Z has per-coordinate
    variance sum_{k<=t} d_k^2 (the noise's marginal variance at step t, in units of Z's).
    """
    c = list(coefficients)
    d: list[float] = []
    for k in range(length):
        d.append(
            1.0 if k == 0 else -math.fsum(c[j] * d[k - j] for j in range(1, min(k, len(c) - 1) + 1))
        )
    return d


def group_sample_rate(sample_rate: float, bands: int) -> float:
    """q_group = bands * q: the rate within the group of a step that draws E[B] = q N units.

    Each step samples one of ``bands`` groups of about N / bands units, so keeping the expected
    batch size q N needs b q <= 1.

    Raises:
        ValueError: b q > 1, naming the fields to change.
    """
    b = _check_bands(bands)
    q = b * float(sample_rate)
    if q > 1.0:
        raise ValueError(
            f"{_FIELD}.bands={b} times the sample rate q={float(sample_rate):.6g} is {q:.6g} > 1: "
            f"each step samples one of {b} groups of about N/{b} units, so the expected batch "
            f"size q N must be at most N/{b}; lower data.batch_schedule's expected batch size "
            "or the number of bands"
        )
    return q


def round_sample_rates(rate_of: Callable[[int], float], *, bands: int, steps: int) -> list[float]:
    """The group rate of each of the ceil(steps / bands) rounds, in the order they are composed.

    Round k covers steps k b, ..., k b + b - 1 (all b of them, also past ``steps``: the rate the
    run charges when it starts the round). A unit takes part in at most one of them, at the rate
    b q_t of its group's step; the round is charged the largest of them (epsilon grows with q),
    so a constant schedule is charged exactly b q, and b = 1 gives the per-step rates q_t.

    Args:
        rate_of: q_t, the schedule's marginal rate of step t (E[B_t] / N).
        bands: b >= 1.
        steps: planned steps n >= 0.
    """
    b = _check_bands(bands)
    return [
        max(group_sample_rate(rate_of(t), b) for t in range(k * b, k * b + b))
        for k in range(math.ceil(steps / b))
    ]


def suggest_bands(*, epsilon: float, steps: int, epochs: float, max_bands: int) -> int:
    """The rule of thumb b ~ epsilon sqrt(n) / k (McKenna 2025), clamped to [1, max_bands].

    Args:
        epsilon: the run's budget (or epsilon).
        steps: n, planned steps.
        epochs: k, expected participations of a unit (sum_t q_t).
        max_bands: the largest b the schedule allows (b q_t <= 1, b <= n).
    """
    if not (epsilon > 0 and steps >= 1 and epochs > 0):
        return 1
    rule = epsilon * math.sqrt(steps) / epochs
    return max(1, min(int(max_bands), round(rule)))
