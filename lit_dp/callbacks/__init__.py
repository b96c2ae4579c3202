"""Lightning glue around the DP step: EMA weights, clip-driven LR, privacy accounting, export."""

from lit_dp.callbacks.accounting import PrivacyAccounting
from lit_dp.callbacks.clip_lr import ClipDrivenLR
from lit_dp.callbacks.ema import EMAWeights
from lit_dp.callbacks.export import ExportModel

__all__ = ["ClipDrivenLR", "EMAWeights", "ExportModel", "PrivacyAccounting"]
