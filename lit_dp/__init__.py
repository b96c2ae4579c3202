"""lit_dp: differentially private fine-tuning of small causal LMs (DP-Adam-AC) on Lightning."""

from lit_dp.callbacks.accounting import PrivacyAccounting
from lit_dp.callbacks.clip_lr import ClipDrivenLR
from lit_dp.callbacks.ema import EMAWeights
from lit_dp.data import DPDataModule, JSONLDataModule, SyntheticDataModule
from lit_dp.module import DPCausalLM
from lit_dp.optim import DPAdamW
from lit_dp.privacy.accountant import RDPAccountant
from lit_dp.privacy.budget import calibrate_noise_multiplier
from lit_dp.privacy.per_sample import clipped_grad_sum
from lit_dp.privacy.pld import PLDAccountant

__all__ = [
    "ClipDrivenLR",
    "DPAdamW",
    "DPCausalLM",
    "DPDataModule",
    "EMAWeights",
    "JSONLDataModule",
    "PLDAccountant",
    "PrivacyAccounting",
    "RDPAccountant",
    "SyntheticDataModule",
    "calibrate_noise_multiplier",
    "clipped_grad_sum",
]
__version__ = "0.1.0"
