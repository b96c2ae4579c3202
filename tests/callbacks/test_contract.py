"""The callbacks' contract with the module: Lightning still calls hooks in the order HOOK_ORDER
states (checked on plain Lightning objects that record their calls, not on lit_dp's), the module
satisfies the protocols, and a module without them is refused naming what it lacks."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from module_helpers import make_module, quiet_trainer
from torch.utils.data import DataLoader

from lit_dp.callbacks.accounting import PrivacyAccounting
from lit_dp.callbacks.contract import (
    HOOK_ORDER,
    ClipSource,
    DPModule,
    EvaluationWeights,
    ExportSource,
    ReportSource,
    StepSource,
    TrainedModel,
)
from lit_dp.callbacks.export import ExportModel


def _stage(stage) -> str:
    return str(getattr(stage, "value", stage))  # the DataModule gets Lightning's TrainerFn


class _Data(L.LightningDataModule):
    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def setup(self, stage):
        self.calls.append(f"datamodule.setup:{_stage(stage)}")

    def train_dataloader(self):
        return DataLoader([torch.zeros(1)] * 4, batch_size=1)


class _Module(L.LightningModule):
    def __init__(self, calls):
        super().__init__()
        self.calls = calls
        self.w = torch.nn.Parameter(torch.zeros(1))

    def setup(self, stage):
        self.calls.append(f"module.setup:{_stage(stage)}")

    def on_train_batch_start(self, batch, batch_idx):
        self.calls.append("module.on_train_batch_start")

    def training_step(self, batch, batch_idx):
        return (self.w * batch).sum()

    def on_fit_end(self):
        self.calls.append("module.on_fit_end")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Callback(L.Callback):
    def __init__(self, calls):
        self.calls = calls

    def setup(self, trainer, pl_module, stage):
        self.calls.append(f"callback.setup:{_stage(stage)}")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.calls.append("callback.on_train_batch_start")

    def on_fit_end(self, trainer, pl_module):
        self.calls.append("callback.on_fit_end")


def test_lightning_calls_the_hooks_in_the_stated_order(tmp_path):
    calls: list[str] = []
    trainer = quiet_trainer(tmp_path, 1, [_Callback(calls)])
    trainer.fit(_Module(calls), datamodule=_Data(calls))
    assert calls == [
        "datamodule.setup:fit",  # HOOK_ORDER 1: N and the schedule, then the plan, then the module
        "callback.setup:fit",
        "module.setup:fit",
        "callback.on_train_batch_start",  # HOOK_ORDER 2: the budget stop before the step
        "module.on_train_batch_start",
        "callback.on_fit_end",  # HOOK_ORDER 3: the callbacks' (report, then export)
        "module.on_fit_end",
    ]
    for hook in ("setup", "on_train_batch_start", "on_fit_end"):
        assert hook in HOOK_ORDER


def test_the_module_satisfies_every_protocol():
    module = make_module()
    for protocol in (DPModule, ReportSource, StepSource, TrainedModel, ClipSource):
        assert isinstance(module, protocol), protocol.__name__
    assert isinstance(module, EvaluationWeights)
    assert isinstance(module, ExportSource)


def test_a_module_without_the_privacy_members_is_refused_naming_them(tmp_path):
    with pytest.raises(TypeError, match=r"PrivacyAccounting needs a lit_dp.DPCausalLM.*lacks"):
        PrivacyAccounting().setup(None, _Module([]), "fit")  # type: ignore[arg-type]


def test_callbacks_run_in_list_order_and_train_end_precedes_fit_end(tmp_path):
    """HOOK_ORDER: the audit's setup (listed first) grows N before the accountant's setup plans,
    and its on_train_end scores the canaries before on_fit_end writes the report."""

    class _Named(_Callback):
        def __init__(self, calls, name):
            super().__init__(calls)
            self.name = name

        def setup(self, trainer, pl_module, stage):
            self.calls.append(f"{self.name}.setup")

        def on_train_end(self, trainer, pl_module):
            self.calls.append(f"{self.name}.on_train_end")

        def on_fit_end(self, trainer, pl_module):
            self.calls.append(f"{self.name}.on_fit_end")

    calls: list[str] = []
    trainer = quiet_trainer(tmp_path, 1, [_Named(calls, "first"), _Named(calls, "second")])
    trainer.fit(_Module(calls), datamodule=_Data(calls))
    mine = [c for c in calls if c.startswith(("first", "second"))]
    assert mine == [
        "first.setup",
        "second.setup",
        "first.on_train_end",
        "second.on_train_end",
        "first.on_fit_end",
        "second.on_fit_end",
    ]
    assert "trainer.callbacks" in HOOK_ORDER and "AuditCanaries" in HOOK_ORDER


def test_the_cli_lists_the_export_after_the_accounting(tmp_path, monkeypatch):
    """HOOK_ORDER 3: PrivacyAccounting.on_fit_end hands the report over before ExportModel's
    exports it, because lit-dp lists the privacy: callback before the export: one (and
    ExportModel.setup refuses the other order: tests/callbacks/test_export.py)."""
    from shipped_configs import TINY

    from lit_dp.cli import LitDPCLI

    monkeypatch.chdir(tmp_path)
    kinds = [type(cb) for cb in LitDPCLI(args=["--config", TINY], run=False).trainer.callbacks]
    assert kinds.index(PrivacyAccounting) < kinds.index(ExportModel)
    assert "ExportModel" in HOOK_ORDER and "export:" in HOOK_ORDER
