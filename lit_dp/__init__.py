"""lit_dp: differentially private fine-tuning of small causal LMs (DP-Adam-AC) on Lightning.

The public names below load on first use (PEP 562), so importing a submodule such as
``lit_dp.privacy.per_sample`` does not import Lightning or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lit_dp.callbacks.accounting import PrivacyAccounting
    from lit_dp.callbacks.clip_lr import ClipDrivenLR
    from lit_dp.callbacks.ema import EMAWeights
    from lit_dp.callbacks.export import ExportModel
    from lit_dp.data import DPDataModule, JSONLDataModule, SyntheticDataModule
    from lit_dp.module import DPCausalLM
    from lit_dp.optim import DPAdamW
    from lit_dp.privacy.calibration import calibrate_noise_multiplier
    from lit_dp.privacy.mechanism import PrivateStep, privatize
    from lit_dp.privacy.per_sample import clipped_grad_sum
    from lit_dp.privacy.pld_accountant import PLDAccountant
    from lit_dp.privacy.rdp_accountant import RDPAccountant

# public name -> the module defining it
_SOURCES = {
    "ClipDrivenLR": "lit_dp.callbacks.clip_lr",
    "DPAdamW": "lit_dp.optim",
    "DPCausalLM": "lit_dp.module",
    "DPDataModule": "lit_dp.data",
    "EMAWeights": "lit_dp.callbacks.ema",
    "ExportModel": "lit_dp.callbacks.export",
    "JSONLDataModule": "lit_dp.data",
    "PLDAccountant": "lit_dp.privacy.pld_accountant",
    "PrivacyAccounting": "lit_dp.callbacks.accounting",
    "PrivateStep": "lit_dp.privacy.mechanism",
    "RDPAccountant": "lit_dp.privacy.rdp_accountant",
    "SyntheticDataModule": "lit_dp.data",
    "calibrate_noise_multiplier": "lit_dp.privacy.calibration",
    "clipped_grad_sum": "lit_dp.privacy.per_sample",
    "privatize": "lit_dp.privacy.mechanism",
}

__all__ = [
    "ClipDrivenLR",
    "DPAdamW",
    "DPCausalLM",
    "DPDataModule",
    "EMAWeights",
    "ExportModel",
    "JSONLDataModule",
    "PLDAccountant",
    "PrivacyAccounting",
    "PrivateStep",
    "RDPAccountant",
    "SyntheticDataModule",
    "calibrate_noise_multiplier",
    "clipped_grad_sum",
    "privatize",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module 'lit_dp' has no attribute {name!r}")
    value = getattr(importlib.import_module(source), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
