"""The one-run audit's epsilon lower bound (Steinke, Nasr and Jagielski 2023), numpy/scipy only.

Setup: m canaries, each included in training independently with probability 1/2 (a fair coin
from OS entropy). After training, every canary gets a membership score (higher = more likely
included). The auditor guesses "included" for the ``num_positive`` highest scores and "excluded"
for the ``num_negative`` lowest, abstains on the rest: r = num_positive + num_negative guesses,
v of them correct.

If training is (epsilon, delta)-DP with respect to each canary, the paper's main theorem bounds
the chance of v or more correct guesses by

    p(epsilon) = B(v) + 2 m delta * max_{1 <= i <= v} (B(v - i) - B(v)) / i,

where B(u) = P[Binomial(r, e^eps / (1 + e^eps)) >= u]. With delta = 0 this is the binomial tail:
an epsilon-DP mechanism cannot make the guesses more accurate than randomized response does.
The lower bound is the largest epsilon at which this p-value is still <= 1 - confidence: every
(epsilon', delta)-DP claim with epsilon' below it is rejected at that confidence.

Choosing the guess counts after seeing the scores is a multiple test: ``audit_lower_bound``
tries a fixed grid of G (num_positive, num_negative) pairs and tests each at level
(1 - confidence) / G (Bonferroni), so the reported maximum keeps the stated confidence.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import special, stats

# Fractions of the m canaries guessed on, and how the guesses split: (fraction guessed "in",
# fraction guessed "out"). Fixed in advance so the Bonferroni factor is the grid's size.
GUESS_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
GUESS_SPLITS = ((0.5, 0.5), (1.0, 0.0))
_EPS_STEP = 0.05  # the scan's step; the first crossing is then refined by bisection
_EPS_MAX = 60.0  # far above any bound m <= 10^7 canaries can give (all guesses right)


def _check_counts(num_canaries: int, num_guesses: int, num_correct: int) -> None:
    if not 0 <= num_correct <= num_guesses <= num_canaries:
        raise ValueError(
            f"need 0 <= num_correct ({num_correct}) <= num_guesses ({num_guesses}) <= "
            f"num_canaries ({num_canaries})"
        )


def one_run_p_value(
    *, num_canaries: int, num_guesses: int, num_correct: int, epsilon: float, delta: float
) -> float:
    """P[>= num_correct correct guesses] bound for an (epsilon, delta)-DP mechanism.

    The module docstring gives the formula; ``num_canaries`` is m (every randomized canary,
    guessed or not), ``num_guesses`` r, ``num_correct`` v.
    """
    _check_counts(num_canaries, num_guesses, num_correct)
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    q = float(special.expit(epsilon))  # accuracy of epsilon-DP randomized response
    tail = float(stats.binom.sf(num_correct - 1, num_guesses, q))  # B(v)
    if delta == 0 or num_correct == 0:
        return min(tail, 1.0)
    i = np.arange(1, num_correct + 1)
    gaps = stats.binom.sf(num_correct - i - 1, num_guesses, q) - tail  # B(v - i) - B(v)
    alpha = float(np.max(gaps / i))
    return min(tail + 2.0 * num_canaries * delta * alpha, 1.0)


def one_run_epsilon(
    *,
    num_canaries: int,
    num_guesses: int,
    num_correct: int,
    significance: float,
    delta: float,
) -> float:
    """Largest epsilon whose (epsilon, delta)-DP claim is rejected at level ``significance``.

    Returns the first crossing: the epsilon where the p-value first exceeds ``significance``
    scanning up from 0 (0.0 when epsilon = 0 is not rejected). Every smaller epsilon is then
    rejected too, and the result never rests on a p-value that dips below the level again at a
    larger epsilon (the delta term need not be monotone), which keeps the bound conservative.

    With delta = 0 the crossing is closed-form: P[Binomial(r, q) >= v] is the regularized
    incomplete beta function I_q(v, r - v + 1), increasing in q, so q* = I^-1(level) and
    epsilon = logit(q*). The delta term only adds to the p-value, so that epsilon caps the
    scan for delta > 0.
    """
    if not 0 < significance < 1:
        raise ValueError(f"significance={significance} must be in (0, 1)")
    _check_counts(num_canaries, num_guesses, num_correct)
    if num_correct == 0:
        return 0.0
    q_star = float(special.betaincinv(num_correct, num_guesses - num_correct + 1, significance))
    eps_pure = max(float(special.logit(q_star)), 0.0) if q_star < 1 else _EPS_MAX
    if delta == 0 or eps_pure == 0.0:
        return min(eps_pure, _EPS_MAX)

    def rejected(eps: float) -> bool:
        p = one_run_p_value(
            num_canaries=num_canaries,
            num_guesses=num_guesses,
            num_correct=num_correct,
            epsilon=eps,
            delta=delta,
        )
        return p <= significance

    if not rejected(0.0):
        return 0.0
    grid = np.arange(_EPS_STEP, min(eps_pure, _EPS_MAX) + _EPS_STEP, _EPS_STEP)
    # p-values over the whole grid at once: (G,) tails and (G, v) gaps
    q = special.expit(grid)[:, None]
    tail = stats.binom.sf(num_correct - 1, num_guesses, q)  # (G, 1)
    i = np.arange(1, num_correct + 1)
    gaps = stats.binom.sf(num_correct - i - 1, num_guesses, q) - tail  # (G, v)
    p_grid = np.minimum(tail[:, 0] + 2.0 * num_canaries * delta * np.max(gaps / i, axis=1), 1.0)
    over = np.flatnonzero(p_grid > significance)
    first = int(over[0]) if len(over) else len(grid) - 1
    lo = float(grid[first - 1]) if first > 0 else 0.0
    hi = float(grid[first])
    for _ in range(30):  # bisection: lo rejected, hi not; width 0.05 / 2^30
        mid = 0.5 * (lo + hi)
        if rejected(mid):
            lo = mid
        else:
            hi = mid
    return lo


def count_correct(
    scores: np.ndarray, included: np.ndarray, *, num_positive: int, num_negative: int
) -> int:
    """Correct guesses: the ``num_positive`` top scores guessed in, ``num_negative`` bottom out.

    Ties are broken by position (a stable sort), which does not look at the bits.
    """
    m = len(scores)
    if num_positive + num_negative > m:
        raise ValueError(f"num_positive + num_negative must be <= {m} canaries")
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")  # highest first
    bits = np.asarray(included, dtype=bool)[order]
    right_in = int(bits[:num_positive].sum())
    right_out = int((~bits[m - num_negative :]).sum()) if num_negative else 0
    return right_in + right_out


def guess_grid(num_canaries: int) -> list[tuple[int, int]]:
    """The fixed (num_positive, num_negative) pairs ``audit_lower_bound`` tries (no duplicates)."""
    pairs: list[tuple[int, int]] = []
    for frac in GUESS_FRACTIONS:
        r = max(1, round(frac * num_canaries))
        for share_in, share_out in GUESS_SPLITS:
            pos = round(r * share_in)
            neg = round(r * share_out)
            pair = (min(pos, num_canaries), min(neg, num_canaries - min(pos, num_canaries)))
            if sum(pair) > 0 and pair not in pairs:
                pairs.append(pair)
    return pairs


@dataclass(frozen=True)
class AuditResult:
    """The one-run bound and how it was reached (all counts are of canaries)."""

    epsilon_lower_bound: float
    confidence: float
    delta: float
    num_canaries: int
    num_included: int
    num_positive: int  # guessed "in" by the best pair
    num_negative: int  # guessed "out" by the best pair
    num_guesses: int
    num_correct: int
    num_candidates: int  # pairs tried (Bonferroni factor)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def audit_lower_bound(
    scores: np.ndarray | list[float],
    included: np.ndarray | list[bool],
    *,
    confidence: float = 0.95,
    delta: float = 0.0,
    guesses: list[tuple[int, int]] | None = None,
) -> AuditResult:
    """The one-run epsilon lower bound of canaries with membership ``scores`` and inclusion bits.

    Args:
        scores: (m,) membership scores, higher = more likely included; computed from the trained
            model and public information only (never from the bits).
        included: (m,) the fair-coin inclusion bits.
        confidence: 1 - beta; the bound is wrong (above the mechanism's true epsilon) with
            probability at most 1 - confidence.
        delta: the delta of the (epsilon, delta) claim being tested (the run's accounted delta).
        guesses: (num_positive, num_negative) pairs to try, fixed before looking at the scores;
            None = ``guess_grid(m)``. The level is split evenly across them (Bonferroni).
    """
    s = np.asarray(scores, dtype=float)
    bits = np.asarray(included, dtype=bool)
    if s.ndim != 1 or s.shape != bits.shape or len(s) == 0:
        raise ValueError(f"scores {s.shape} and included {bits.shape} must be equal-length 1-D")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite (a canary's loss was nan or inf)")
    if not 0 < confidence < 1:
        raise ValueError(f"audit confidence={confidence} must be in (0, 1), e.g. 0.95")
    m = len(s)
    pairs = guess_grid(m) if guesses is None else list(guesses)
    if not pairs:
        raise ValueError("guesses must name at least one (num_positive, num_negative) pair")
    level = (1.0 - confidence) / len(pairs)
    best: tuple[float, int, int, int] = (-1.0, 0, 0, 0)
    for pos, neg in pairs:
        correct = count_correct(s, bits, num_positive=pos, num_negative=neg)
        if delta > 0 and best[0] >= 0:  # the delta = 0 bound is an upper limit: skip losers
            pure = one_run_epsilon(
                num_canaries=m,
                num_guesses=pos + neg,
                num_correct=correct,
                significance=level,
                delta=0.0,
            )
            if pure <= best[0]:
                continue
        eps = one_run_epsilon(
            num_canaries=m,
            num_guesses=pos + neg,
            num_correct=correct,
            significance=level,
            delta=delta,
        )
        if eps > best[0]:
            best = (eps, pos, neg, correct)
    eps, pos, neg, correct = best
    return AuditResult(
        epsilon_lower_bound=float(eps),
        confidence=float(confidence),
        delta=float(delta),
        num_canaries=m,
        num_included=int(bits.sum()),
        num_positive=pos,
        num_negative=neg,
        num_guesses=pos + neg,
        num_correct=correct,
        num_candidates=len(pairs),
    )
