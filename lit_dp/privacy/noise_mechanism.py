"""The noise of the DP step as a component: independent Gaussian (DP-SGD) or banded MF.

A ``NoiseMechanism`` is chosen in a config as ``model.noise_mechanism`` (``class_path`` and
``init_args``) and owns three things that belong together:

- the noise: ``add_noise_`` adds one step's noise to the clipped sums (after the all-reduce,
  from the generator every rank seeds identically, fp32), keeping whatever state it needs;
- its sensitivity: the factor by which the per-coordinate noise std exceeds sigma * C;
- its accounting event: ``accounted_rate`` says which (sigma, q) a step adds to the ledger
  (none within a round of banded MF), and ``round_sample_rates`` gives the rates of a planned
  run for calibration and ``lit-dp plan``.

``IndependentGaussian`` is lit_dp's DP-SGD noise (the default): each step adds fresh
N(0, (sigma C)^2) noise and is accounted at its own rate. ``BandedMF`` adds correlated noise
(``lit_dp.privacy.bandmf`` gives the math): row t of C^{-1} Z, scaled by sigma * C_t * ||c||_2,
with the b - 1 previous noise vectors as state, and is accounted once per round of b steps at
the group rate b q. It needs the cyclic participation of ``lit_dp.privacy.cyclic_sampling``,
which the DataModule switches on when the model asks for it.

The noise buffers are secret operator-side state, like the generator's: they go into
checkpoints (``state_dict``), never into an exported model. Under a varying clip bound C_t the
buffers stay in units of Z and each step scales its own row: the released sum divided by its
(public) std is then X_t / std_t + (C^{-1} Z)_t, whose normalized contributions have
sensitivity 1 / sigma per round, so the accounting holds for every clip-bound estimator.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lit_dp.privacy.bandmf import (
    bsr_coefficients,
    column_norm,
    group_sample_rate,
    load_coefficients,
    round_sample_rates,
)
from lit_dp.privacy.noise import NoiseGenerator, add_noise_, gaussian_noise_like, noise_std

__all__ = ["BandedEvent", "BandedMF", "IndependentGaussian", "NoiseMechanism"]


@dataclass(frozen=True)
class BandedEvent:
    """Banded MF's accounting event as the privacy plan holds it: configuration only, frozen.

    The plan (``lit_dp.privacy.plan.PrivacyPlan``, a ``NoiseEvent``) needs the bands, the
    coefficients' sensitivity and the rates of the rounds, never the noise buffers, so two plans
    of the same config compare equal whatever state their mechanisms hold.
    """

    bands: int
    coefficients: tuple[float, ...]
    coefficients_file: str | None = None

    @property
    def sensitivity(self) -> float:
        """||c||_2: the per-coordinate noise std is sigma * C * sensitivity."""
        return column_norm(list(self.coefficients))

    def round_sample_rates(self, rate_of: Callable[[int], float], steps: int) -> list[float]:
        """One (b q) rate per round of b steps: the ledger after ``steps`` planned steps."""
        return round_sample_rates(rate_of, bands=self.bands, steps=steps)

    def describe(self) -> dict[str, Any]:
        """The mechanism as the privacy report and ``lit-dp plan`` name it."""
        b = self.bands
        return {
            "class_path": "lit_dp.privacy.noise_mechanism.BandedMF",
            "bands": b,
            "coefficients": list(self.coefficients),
            "coefficients_source": (
                "banded square root: c_j = binom(2j, j) / 4^j"
                if self.coefficients_file is None
                else f"file {self.coefficients_file}"
            ),
            "sensitivity": self.sensitivity,
            "participation": (
                f"cyclic Poisson: units in {b} fixed groups (drawn from the sampling "
                f"seed), step t samples group t mod {b} at rate {b} q_t"
            ),
            "accounting": (
                f"amplified BandMF: one Poisson-subsampled Gaussian (sigma, {b} q) per "
                f"round of {b} steps, ceil(steps / {b}) rounds"
            ),
            "noise_std": "sigma x C_t x sensitivity per coordinate of Z; "
            "the step adds row t of C^{-1} Z",
        }


class NoiseMechanism(ABC):
    """How the DP step's noise is drawn and accounted (see the module docstring)."""

    bands: int = 1

    @property
    @abstractmethod
    def coefficients(self) -> list[float]:
        """The strategy's first column (c_0 = 1, ..., c_{b-1}); [1.0] for independent noise."""

    @property
    def sensitivity(self) -> float:
        """||c||_2: the per-coordinate noise std is sigma * C * sensitivity."""
        return column_norm(self.coefficients)

    @abstractmethod
    def add_noise_(
        self,
        sums: dict[str, torch.Tensor],
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        generator: NoiseGenerator,
    ) -> float:
        """Add this step's noise to the clipped sums in place (sorted parameter names).

        Returns:
            The marginal std of the added noise per coordinate, in units of
            noise_multiplier * max_grad_norm (1.0 for independent noise).
        """

    def accounted_rate(
        self, *, step: int, sample_rate: float, rate_of: Callable[[int], float]
    ) -> float | None:
        """The sample rate the ledger records for optimizer step ``step`` (None: nothing new).

        Args:
            step: 0-based optimizer step about to be (or just) taken.
            sample_rate: that step's marginal rate q_t (the batch's).
            rate_of: the schedule's q_t for any step (banded MF charges a round at its start).
        """
        return float(sample_rate)

    def round_sample_rates(self, rate_of: Callable[[int], float], steps: int) -> list[float]:
        """The rates the ledger will hold after ``steps`` planned steps, one per ledger step."""
        return [float(rate_of(t)) for t in range(steps)]

    def buffer_bytes(self) -> int:
        """Bytes of noise state held now (0 for independent noise)."""
        return 0

    def event(self) -> BandedEvent | None:
        """The accounting event the privacy plan composes; None = one step per step (DP-SGD)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(
                f"the checkpoint holds noise state {sorted(state)} that {type(self).__name__} "
                "does not have; resume with the model.noise_mechanism the run was started with"
            )

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The mechanism as the privacy report names it."""


class IndependentGaussian(NoiseMechanism):
    """Fresh N(0, (sigma C)^2) noise every step (DP-SGD); each step accounted at its own q_t."""

    @property
    def coefficients(self) -> list[float]:
        return [1.0]

    def add_noise_(self, sums, *, noise_multiplier, max_grad_norm, generator) -> float:
        add_noise_(
            sums, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            generator=generator,
        )  # fmt: skip
        return 1.0

    def describe(self) -> dict[str, Any]:
        return {
            "class_path": "lit_dp.privacy.noise_mechanism.IndependentGaussian",
            "bands": 1,
            "coefficients": [1.0],
            "sensitivity": 1.0,
            "participation": "Poisson sampling of all units at every step",
            "accounting": "one Poisson-subsampled Gaussian per step at (sigma, q_t)",
        }


class BandedMF(NoiseMechanism):
    """Amplified banded matrix factorization: correlated noise over ``bands`` steps.

    Step t adds ``sigma * C_t * ||c||_2 * w_t`` with ``w_t = z_t - sum_{j=1}^{b-1} c_j w_{t-j}``
    (z_t i.i.d. N(0, I), fp32). The b - 1 previous w are kept per trainable parameter: b - 1
    fp32 copies of the trainable parameters (use LoRA when that is too much memory). Units
    are sampled cyclically (b groups, one per step) and the ledger holds one
    (sigma, b q) step per round of b steps. ``bands: 1`` is DP-SGD, bit for bit.

    Args:
        bands: b >= 1, the number of bands of the strategy C (the minimum separation of a
            unit's participations, in steps). ``lit-dp plan`` suggests one.
        coefficients_file: optional file of b coefficients (a JSON list or whitespace
            separated, c_0 = 1), e.g. optimized offline; null = the banded square root,
            c_j = binom(2j, j) / 4^j.
    """

    def __init__(self, bands: int = 4, coefficients_file: str | None = None) -> None:
        self._coefficients = (
            bsr_coefficients(bands)
            if coefficients_file is None
            else load_coefficients(coefficients_file, bands)
        )
        self.bands = bands
        self.coefficients_file = coefficients_file
        self._history: list[dict[str, torch.Tensor]] = []  # w_{t-1}, w_{t-2}, ... (unit std)
        self._step = 0  # noise draws made so far (the row of C^{-1} drawn next)
        self._inverse_sq = [1.0]  # prefix sums of d_k^2 (marginal variance), extended lazily
        self._inverse = [1.0]

    @property
    def coefficients(self) -> list[float]:
        return list(self._coefficients)

    # --- accounting -------------------------------------------------------------------------
    def accounted_rate(self, *, step, sample_rate, rate_of) -> float | None:
        if step % self.bands:
            return None  # within a round: the unit of this step's group was charged at its start
        return round_sample_rates(lambda s: rate_of(step + s), bands=self.bands, steps=1)[0]

    def round_sample_rates(self, rate_of: Callable[[int], float], steps: int) -> list[float]:
        return round_sample_rates(rate_of, bands=self.bands, steps=steps)

    def group_sample_rate(self, sample_rate: float) -> float:
        """The group rate b q of a step of marginal rate q (its units' inclusion probability)."""
        return group_sample_rate(sample_rate, self.bands)

    # --- noise ------------------------------------------------------------------------------
    def _marginal(self, t: int) -> float:
        """sqrt(sum_{k<=t} d_k^2): the std of row t of C^{-1} Z per unit std of Z."""
        c, d, sq = self._coefficients, self._inverse, self._inverse_sq
        while len(d) <= t:
            k = len(d)
            d.append(-math.fsum(c[j] * d[k - j] for j in range(1, min(k, len(c) - 1) + 1)))
            sq.append(sq[-1] + d[-1] * d[-1])
        return math.sqrt(sq[t])

    def add_noise_(self, sums, *, noise_multiplier, max_grad_norm, generator) -> float:
        sens = self.sensitivity
        std = noise_std(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm) * sens
        for name, g in sums.items():
            if g.dtype not in (torch.float32, torch.float64):
                raise TypeError(
                    f"sums[{name!r}] is {g.dtype}; accumulate clipped sums in fp32 before noise"
                )
        marginal = sens * self._marginal(self._step)
        if std == 0.0:
            return marginal  # no noise, nothing drawn (as independent noise): the state stays
        if self._history:
            first = next(iter(self._history[0].values()), None)
            if first is not None and first.device != generator.device:  # after a CPU load
                self._history = [
                    {n: w.to(generator.device) for n, w in h.items()} for h in self._history
                ]
        c = self._coefficients
        new: dict[str, torch.Tensor] = {}
        for name in sorted(sums):
            w = gaussian_noise_like(sums[name], std=1.0, generator=generator)  # z_t, (shape)
            for j, previous in enumerate(self._history, start=1):
                w.add_(previous[name], alpha=-c[j])  # w_t = z_t - sum_j c_j w_{t-j}
            sums[name].add_(w.mul(std).to(device=sums[name].device))
            new[name] = w
        # Keep the b - 1 most recent w (none when b = 1).
        self._history = [new, *self._history][: self.bands - 1]
        self._step += 1
        return marginal

    # --- state ------------------------------------------------------------------------------
    def buffer_bytes(self) -> int:
        """Bytes of the noise buffers held now: (b - 1) x the trainable parameters in fp32."""
        return sum(w.numel() * w.element_size() for h in self._history for w in h.values())

    def state_dict(self) -> dict[str, Any]:
        """Bands, coefficients, draws made and the b - 1 noise buffers (CPU copies; private)."""
        return {
            "bands": self.bands,
            "coefficients": list(self._coefficients),
            "step": self._step,
            "history": [{n: w.detach().cpu().clone() for n, w in h.items()} for h in self._history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("bands") != self.bands or list(state.get("coefficients", [])) != list(
            self._coefficients
        ):
            raise ValueError(
                f"the checkpoint's noise mechanism has bands={state.get('bands')} and "
                f"coefficients {state.get('coefficients')}, this run bands={self.bands} and "
                f"{self._coefficients}; resume with the model.noise_mechanism the run started with"
            )
        history = list(state["history"])
        if len(history) > self.bands - 1:
            raise ValueError(f"the checkpoint holds {len(history)} noise buffers > bands - 1")
        self._history = [dict(h) for h in history]
        self._step = int(state["step"])

    def event(self) -> BandedEvent | None:
        """Its accounting event (None at b = 1: that is DP-SGD's, step by step)."""
        if self.bands == 1:
            return None
        return BandedEvent(self.bands, tuple(self._coefficients), self.coefficients_file)

    def describe(self) -> dict[str, Any]:
        return BandedEvent(self.bands, tuple(self._coefficients), self.coefficients_file).describe()

    def __repr__(self) -> str:
        return f"BandedMF(bands={self.bands}, coefficients_file={self.coefficients_file!r})"
