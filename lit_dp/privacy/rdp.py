"""Renyi-DP (RDP) of the Poisson-subsampled Gaussian mechanism, and RDP -> (epsilon, delta).

Pure math, no state: ``RDPAccountant`` (rdp_accountant.py) keeps the ledger and calls these;
the argument checks are in checks.py.

The mechanism: each privacy unit is in the batch with probability q (the sample rate); the clipped
sum gets Gaussian noise of std sigma * C. Its RDP at order alpha > 1 (Mironov, Talwar, Zhang 2019,
"Renyi Differential Privacy of the Sampled Gaussian Mechanism") is

    rdp(alpha) = log(A_alpha) / (alpha - 1),
    A_alpha = E_{z ~ N(0, sigma^2)} [((1 - q) + q * exp((2z - 1) / (2 sigma^2)))^alpha],

i.e. D_alpha((1 - q) N(0, sigma^2) + q N(1, sigma^2) || N(0, sigma^2)), in nats. Composition over
steps adds RDP order by order, so every step may have its own (q, sigma).

Numerics (why it is written this way):
- Everything is computed as ``A_alpha - 1`` first and then ``log A = log1p(A - 1)``: for small q,
  A is 1 + O(q^2) and ``log(A)`` of a rounded A would lose all digits of the cost.
- Integer alpha: binomial expansion. Because sum_k C(alpha, k) (1-q)^(alpha-k) q^k = 1,
  A - 1 = sum_{k>=2} C(alpha, k) (1-q)^(alpha-k) q^k expm1((k^2 - k) / (2 sigma^2)), all terms
  positive, summed with logsumexp.
- Fractional alpha: the two-series expansion of MTZ19 (split the integral at
  z0 = sigma^2 log(1/q - 1) + 1/2, where q exp((2z-1)/(2sigma^2)) = 1 - q, and expand the binomial
  on each side). Terms are formed in log space with signs (C(alpha, i) alternates for i > alpha),
  the i = 0, 1 terms are rewritten so that the leading 1 cancels exactly, and the alternating
  polynomially decaying tail is summed with repeated averaging of partial sums (Euler).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from scipy.special import gammaln, gammasgn, log_ndtr, logsumexp

from lit_dp.privacy.checks import (
    check_delta,
    check_noise_multiplier,
    check_num_steps,
    check_orders,
    check_sample_rate,
)

# Opacus' default orders; the pinned epsilon 7.32911117143 (sigma=1.5, q=0.04, 2250 steps,
# delta=1e-5) uses these.
OPACUS_ORDERS: list[float] = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
# A fine fractional grid 1.1..10.9 (small epsilons, many steps), integers 12..63 and three large
# orders (large epsilons, few steps).
DEFAULT_ORDERS: list[float] = [*OPACUS_ORDERS, 128, 256, 512]

_EULER_PASSES = 12  # averaging passes over the last partial sums of the alternating tail
_START_TERMS = 64
_MAX_TERMS = 1 << 15
_REL_TOL = 1e-15


# --- RDP of one step ---------------------------------------------------------------------------
# log-binomials depend only on the orders: cached, they are most of the cost of one (sigma, q).
@lru_cache(maxsize=64)
def _log_binom_int(alpha: tuple[float, ...]) -> np.ndarray:
    """Log C(a, k) for integer a (I,) and k = 2..max(a), shape (I, K); 0 where k > a (masked)."""
    a = np.asarray(alpha)[:, None]
    k = np.arange(2, int(a.max()) + 1, dtype=float)[None, :]
    rest = np.where(k <= a, a - k + 1.0, 1.0)
    out = gammaln(a + 1.0) - gammaln(k + 1.0) - gammaln(rest)
    out.setflags(write=False)
    return out


@lru_cache(maxsize=64)
def _log_binom_frac(alpha: tuple[float, ...], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(log|C(a, i)|, sign C(a, i)) for fractional a (F,) and i = 0..n-1, each (F, n)."""
    a = np.asarray(alpha)[:, None]
    i = np.arange(n, dtype=float)[None, :]
    log_binom = gammaln(a + 1.0) - gammaln(i + 1.0) - gammaln(a - i + 1.0)
    sign = gammasgn(a - i + 1.0)  # C(a, i) alternates in sign for i > a
    log_binom.setflags(write=False)
    sign.setflags(write=False)
    return log_binom, sign


def _log_a_integer(alpha: np.ndarray, q: float, sigma: float) -> np.ndarray:
    """Log A_alpha for integer alpha (I,), 0 < q < 1, sigma > 0, via A - 1 (positive terms)."""
    k = np.arange(2, int(alpha.max()) + 1, dtype=float)[None, :]  # (1, K)
    a = alpha[:, None]  # (I, 1)
    valid = k <= a  # (I, K)
    log_binom = _log_binom_int(tuple(alpha.tolist()))
    x = (k * k - k) / (2.0 * sigma * sigma)  # > 0 for k >= 2
    log_expm1 = x + np.log(-np.expm1(-x))  # log(exp(x) - 1), stable for small and large x
    terms = log_binom + (a - k) * math.log1p(-q) + k * math.log(q) + log_expm1
    log_a_minus_1 = logsumexp(np.where(valid, terms, -np.inf), axis=1)
    return np.logaddexp(0.0, log_a_minus_1)


def _euler_tail(partial: np.ndarray) -> np.ndarray:
    """Limit estimate from the last partial sums (F, P) of an alternating series.

    Average neighbours repeatedly (each pass cancels one more order of the tail).
    """
    s = partial
    while s.shape[1] > 1:
        s = 0.5 * (s[:, 1:] + s[:, :-1])
    return s[:, 0]


def _log_lead(b: np.ndarray, q: float) -> np.ndarray:
    """log((1-q)^b (1 + b q)) = b log1p(-q) + log1p(b q) <= 0, for b = alpha - 1 (F,).

    The two logs cancel to O(b^2 q^2); for small b q use the series
    sum_{k>=2} q^k / k * ((-1)^(k+1) b^k - b), which keeps full relative precision.
    """
    direct = b * math.log1p(-q) + np.log1p(b * q)
    k = np.arange(2, 26, dtype=float)[None, :]  # (1, K); (b q)^25 < 1e-32 below the cutoff
    bq = (b * q)[:, None]
    series = (((-1.0) ** (k + 1) * bq**k - bq * q ** (k - 1)) / k).sum(axis=1)
    return np.where(b * q < 0.05, series, direct)


def _frac_series(
    a: np.ndarray, q: float, sigma: float, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A - 1 from n terms per series, for fractional a (F,).

    Returns (m, est, converged), each (F,): A - 1 = exp(m) * est, and whether the tail estimate
    moved by less than the tolerance between the last two windows of partial sums.
    """
    i = np.arange(n, dtype=float)[None, :]  # (1, N)
    a = a[:, None]  # (F, 1)
    s2 = sigma * sigma
    log_q, log_1mq = math.log(q), math.log1p(-q)
    z0 = s2 * (log_1mq - log_q) + 0.5
    log_binom, sign = _log_binom_frac(tuple(a[:, 0].tolist()), n)
    # Series 1 (z <= z0): C(a,i) (1-q)^(a-i) q^i exp((i^2-i)/(2s^2)) Phi((z0 - i)/sigma).
    log1 = log_binom + (a - i) * log_1mq + i * log_q + (i * i - i) / (2 * s2)
    log1 = log1 + log_ndtr((z0 - i) / sigma)
    # Series 2 (z > z0): C(a,i) q^(a-i) (1-q)^i exp(((a-i)^2-(a-i))/(2s^2)) Phi((a-i-z0)/sigma).
    j = a - i
    log2 = log_binom + i * log_1mq + j * log_q + (j * j - j) / (2 * s2) + log_ndtr((j - z0) / sigma)
    sign1 = np.broadcast_to(sign, log1.shape).copy()
    # Terms i = 0, 1 of series 1 are (1-q)^a (1 - Phi(-z0/s)) and
    # a (1-q)^(a-1) q (1 - Phi((1-z0)/s)):
    # keep only their -Phi parts here and add the rest, (1-q)^(a-1) (1 + (a-1) q) - 1 <= 0, exactly.
    a0 = a[:, 0]
    log1[:, 0] = a0 * log_1mq + log_ndtr(-z0 / sigma)
    log1[:, 1] = np.log(a0) + (a0 - 1) * log_1mq + log_q + log_ndtr((1.0 - z0) / sigma)
    sign1[:, :2] = -1.0
    lead = np.expm1(_log_lead(a0 - 1, q))  # (F,), in (-1, 0]
    with np.errstate(divide="ignore"):
        log_lead = np.log(-lead)
    m = np.maximum(np.maximum(log1.max(axis=1), log2.max(axis=1)), log_lead)  # (F,)
    terms = sign1 * np.exp(log1 - m[:, None]) + sign * np.exp(log2 - m[:, None])  # (F, N)
    partial = np.cumsum(terms, axis=1) - np.exp(log_lead - m)[:, None]
    p = _EULER_PASSES + 1
    est = _euler_tail(partial[:, -p:])
    prev = _euler_tail(partial[:, -2 * p : -p])
    converged = np.abs(est - prev) <= _REL_TOL * np.maximum(np.abs(est), 1e-300)
    return m, est, converged


def _log_a_fractional(alpha: np.ndarray, q: float, sigma: float) -> np.ndarray:
    """Log A_alpha for fractional alpha (F,), 0 < q < 1, sigma > 0 (two-series expansion)."""
    out = np.empty_like(alpha)
    todo = np.arange(alpha.size)
    n = _START_TERMS + 2 * math.ceil(float(alpha.max()))
    while todo.size:
        m, est, ok = _frac_series(alpha[todo], q, sigma, n)
        done = ok if n < _MAX_TERMS else np.ones_like(ok)
        with np.errstate(divide="ignore", invalid="ignore"):
            # A - 1 = e^m * est >= 0; a rounding-level negative est means A - 1 ~ 0.
            log_d = np.where(est > 0, m + np.log(np.where(est > 0, est, 1.0)), -np.inf)
        out[todo[done]] = np.logaddexp(0.0, log_d[done])
        todo = todo[~done]
        n *= 2
    return out


def rdp_per_step(noise_multiplier: float, sample_rate: float, orders: np.ndarray) -> np.ndarray:
    """RDP (nats) of one step at each order; arguments assumed already validated."""
    sigma, q = noise_multiplier, sample_rate
    if q == 0.0:
        return np.zeros_like(orders)
    if sigma == 0.0:
        return np.full_like(orders, np.inf)
    if q == 1.0:
        return orders / (2.0 * sigma * sigma)  # plain Gaussian mechanism, sensitivity 1
    log_a = np.empty_like(orders)
    is_int = orders == np.round(orders)
    # Integer orders in groups of similar size: one (I, max order) matrix would be mostly padding.
    for group in (is_int & (orders <= 64), *(orders == a for a in orders[is_int & (orders > 64)])):
        if group.any():
            log_a[group] = _log_a_integer(orders[group], q, sigma)
    if (~is_int).any():
        log_a[~is_int] = _log_a_fractional(orders[~is_int], q, sigma)
    return log_a / (orders - 1.0)


def compute_rdp(
    *,
    noise_multiplier: float,
    sample_rate: float,
    num_steps: int,
    orders: Sequence[float] | np.ndarray,
) -> np.ndarray:
    """RDP of ``num_steps`` steps of the Poisson-subsampled Gaussian mechanism.

    rdp(alpha) = num_steps * log(A_alpha) / (alpha - 1) in nats (see the module docstring), for
    add/remove of one privacy unit with L2 sensitivity 1 (the clip bound) and noise std
    ``noise_multiplier`` (in units of the clip bound). Special cases: q = 0 costs 0;
    q = 1 is the plain Gaussian mechanism, alpha / (2 sigma^2) per step; sigma = 0 with q > 0 is
    not private (inf).

    Args:
        noise_multiplier: sigma >= 0, noise std / clip bound.
        sample_rate: q in [0, 1], the Poisson inclusion probability of each privacy unit.
        num_steps: number of steps (int >= 0) with this (sigma, q).
        orders: RDP orders alpha > 1 (fractional or integer).

    Returns:
        Array of shape (len(orders),): the composed RDP at each order, in nats.

    Raises:
        ValueError: an argument out of range, named in the message with the fix.
    """
    sigma = check_noise_multiplier(noise_multiplier)
    q = check_sample_rate(sample_rate)
    steps = check_num_steps(num_steps)
    alpha = check_orders(orders)
    if steps == 0:
        return np.zeros_like(alpha)
    return steps * rdp_per_step(sigma, q, alpha)


def rdp_to_epsilon(
    *, orders: Sequence[float] | np.ndarray, rdp: Sequence[float] | np.ndarray, delta: float
) -> tuple[float, float]:
    """Convert RDP to (epsilon, delta)-DP with the Balle et al. 2020 bound; best order wins.

    eps(alpha) = rdp(alpha) - (log(delta) + log(alpha)) / (alpha - 1) + log((alpha - 1) / alpha),
    epsilon = max(0, min over alpha of eps(alpha)). An RDP of exactly 0 at every order (nothing
    released) gives epsilon 0.

    Args:
        orders: RDP orders alpha > 1.
        rdp: RDP at each order, in nats, >= 0 (inf allowed).
        delta: target delta in (0, 1).

    Returns:
        (epsilon in nats, the order alpha that attains it).

    Raises:
        ValueError: bad orders, delta, or an rdp of the wrong shape / negative / NaN.
    """
    alpha = check_orders(orders)
    d = check_delta(delta)
    values = np.asarray(rdp, dtype=float).reshape(-1)
    if values.shape != alpha.shape:
        raise ValueError(
            f"rdp has {values.size} values but orders has {alpha.size}; give one rdp per order"
        )
    if np.any(np.isnan(values)) or np.any(values < 0):
        raise ValueError("rdp must hold non-negative numbers (nats), one per order; got NaN or < 0")
    if np.all(values == 0.0):
        return 0.0, float(alpha[-1])
    eps = values - (math.log(d) + np.log(alpha)) / (alpha - 1.0) + np.log1p(-1.0 / alpha)
    best = int(np.argmin(eps))
    return max(0.0, float(eps[best])), float(alpha[best])
