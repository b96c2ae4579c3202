"""Thin Lightning glue around the DP step: EMA weights, clip-driven LR, privacy accounting."""

from lit_dp.callbacks.accounting import PrivacyAccounting
from lit_dp.callbacks.clip_lr import ClipDrivenLR
from lit_dp.callbacks.ema import EMAWeights

__all__ = ["ClipDrivenLR", "EMAWeights", "PrivacyAccounting"]
