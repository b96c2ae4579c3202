"""Export of the trained model at the end of fit: the evaluation (EMA) weights as a HF directory.

Lightning's ``ModelCheckpoint`` saves the run's state to resume from; this callback saves the
model to release. At the end of fit it writes the module's evaluation weights (the EMA shadow
when ``EMAWeights`` is on, else the raw weights) with the DataModule's tokenizer and the
shareable part of the privacy report (``lit_dp.export.export_model``; ``lit_dp.report.shareable``
decides what that part keeps). The export is post-processing of the weights: it spends no
privacy budget.

It needs the report that ``PrivacyAccounting.on_fit_end`` hands to the module, so it is listed
after that callback (``HOOK_ORDER`` 3 in ``lit_dp.callbacks.contract``); ``setup`` refuses the
other order. Nothing is exported from a run that ends with an exception (an interrupt included):
Lightning calls no ``on_fit_end`` then.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L

from lit_dp.callbacks.accounting import PrivacyAccounting
from lit_dp.callbacks.contract import TokenizerSource, export_source
from lit_dp.export import export_model

AUTO = "auto"
EXPORT_SUBDIR = "export"  # dirpath "auto": <log_dir>/export


class ExportModel(L.Callback):
    """Writes the module's evaluation weights as a Hugging Face model directory at the end of fit.

    Only global rank 0 writes. The directory holds the model, the tokenizer, the shareable
    ``privacy_report.json`` and a model card (layout: ``lit_dp.export``).

    Args:
        dirpath: where to write: "auto" (the default) = ``<log_dir>/export``, a directory, or
            None (``null`` in a config) for no export.

    Attributes:
        export_path: the directory written by the last fit (None: nothing exported, or not on
            rank 0).
    """

    def __init__(self, dirpath: str | None = AUTO) -> None:
        if dirpath is not None and not str(dirpath).strip():
            raise ValueError(
                "export.dirpath is empty: give 'auto' (<log_dir>/export), a directory, or null "
                "for no export"
            )
        self.dirpath = dirpath
        self.export_path: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.dirpath is None:
            return
        self.export_path = None
        export_source(pl_module, caller="ExportModel")  # refused before training, not after
        callbacks = list(getattr(trainer, "callbacks", []))  # set by Lightning, not declared
        accounting = [i for i, cb in enumerate(callbacks) if isinstance(cb, PrivacyAccounting)]
        if accounting and self in callbacks and accounting[0] > callbacks.index(self):
            raise ValueError(
                "ExportModel is listed before PrivacyAccounting in trainer.callbacks: it would "
                "export before the privacy report is written; list it after PrivacyAccounting "
                "(lit-dp's export: section does)"
            )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = Path(trainer.log_dir or ".")  # a collective under DDP: all ranks ask
        if self.dirpath is None or trainer.global_rank != 0:
            return
        module = export_source(pl_module, caller="ExportModel")
        out = log_dir / EXPORT_SUBDIR if self.dirpath == AUTO else Path(self.dirpath)
        datamodule = getattr(trainer, "datamodule", None)  # attached by Lightning at fit
        tokenizer = datamodule.tokenizer if isinstance(datamodule, TokenizerSource) else None
        with module.evaluation_weights():  # export_model keeps the report's shareable part only
            self.export_path = export_model(
                module.model,
                tokenizer,
                out,
                privacy_report=module.privacy_report,
                base_model=module.hparams.get("model"),
            )
