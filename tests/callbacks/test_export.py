"""ExportModel: at the end of fit, rank 0 writes the module's evaluation (EMA) weights, with the
privacy report handed over in memory (its shareable part, whatever file name the run directory's
copy has); ``dirpath: null`` writes nothing; a module without the export's members, or the export
listed before the accounting that writes its report, is refused at setup."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from module_helpers import make_dm, make_module, make_trainer, trainable
from safetensors.torch import load_file

from lit_dp.callbacks.accounting import PrivacyAccounting
from lit_dp.callbacks.clip_lr import ClipDrivenLR
from lit_dp.callbacks.ema import EMAWeights
from lit_dp.callbacks.export import ExportModel
from lit_dp.cli import run_summary


class _Trainer:
    """What ExportModel reads of a trainer: its rank, callbacks and log_dir (asks counted)."""

    def __init__(self, rank, log_dir, callbacks=()):
        self.global_rank, self._log_dir, self.callbacks = rank, log_dir, list(callbacks)
        self.asked = 0

    @property
    def log_dir(self):
        self.asked += 1  # a collective under DDP: every rank must ask
        return str(self._log_dir)


def test_export_writes_the_ema_weights_to_the_log_dir(tmp_path):
    dm, module = make_dm(), make_module(lr=5e-2)
    export, ema = ExportModel(), EMAWeights(decay=0.5)
    trainer = make_trainer(tmp_path, max_steps=4, callbacks=[export])
    trainer.callbacks[:] = [ema if isinstance(c, EMAWeights) else c for c in trainer.callbacks]
    trainer.fit(module, datamodule=dm)
    assert export.export_path == tmp_path / "export"  # auto: <log_dir>/export (no logger: root)
    saved = load_file(tmp_path / "export" / "model.safetensors")
    raw = trainable(module)  # the swap restored the raw weights after the export
    assert set(ema.shadow) <= set(saved)
    for name, shadow in ema.shadow.items():
        torch.testing.assert_close(saved[name], shadow.to(saved[name].dtype), rtol=0, atol=0)
    assert any(not torch.equal(saved[n], raw[n]) for n in raw), "EMA and raw weights differ"
    summary = run_summary(trainer, module, tmp_path)  # what lit-dp fit prints at the end
    assert f"exported EMA model: {tmp_path / 'export'}" in summary.splitlines()


def test_export_receives_the_report_in_memory_under_any_report_name(tmp_path):
    dm = make_dm()
    module = make_module()
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.callbacks[:] = [
        EMAWeights(decay=0.9),
        ClipDrivenLR(),
        PrivacyAccounting(target_epsilon=None, report_name="audit.json"),
        ExportModel(dirpath=str(tmp_path / "export")),
    ]
    trainer.fit(module, datamodule=dm)
    assert not (tmp_path / "privacy_report.json").exists()
    run_report = json.loads((tmp_path / "audit.json").read_text())
    exported = json.loads((tmp_path / "export" / "privacy_report.json").read_text())
    assert module.privacy_report == run_report
    # The export keeps the report minus its operator-side counts (see lit_dp.export).
    assert set(exported) == set(run_report) - {"operator_side"}
    assert exported["epsilon"] == run_report["epsilon"] > 0
    assert exported["ledger"] == run_report["ledger"]


def test_dirpath_null_exports_nothing(tmp_path):
    export = ExportModel(dirpath=None)
    trainer = make_trainer(tmp_path, max_steps=1, callbacks=[export])
    trainer.fit(make_module(), datamodule=make_dm())
    assert (tmp_path / "privacy_report.json").exists()  # the run reached its end
    assert export.export_path is None
    assert not (tmp_path / "export").exists() and not list(tmp_path.rglob("*.safetensors"))
    assert "exported EMA model:" not in run_summary(trainer, trainer.lightning_module, tmp_path)


def test_only_global_rank_zero_writes_and_every_rank_asks_for_log_dir(tmp_path):
    module, export = make_module(), ExportModel()
    other = _Trainer(1, tmp_path)
    export.on_fit_end(other, module)  # type: ignore[arg-type]
    assert other.asked == 1 and export.export_path is None and not list(tmp_path.iterdir())
    zero = _Trainer(0, tmp_path)
    export.on_fit_end(zero, module)  # type: ignore[arg-type]
    assert zero.asked == 1 and export.export_path == tmp_path / "export"
    assert (tmp_path / "export" / "model.safetensors").is_file()


def test_an_export_listed_before_the_accounting_is_refused(tmp_path):
    export, accounting = ExportModel(), PrivacyAccounting()
    module = make_module()
    with pytest.raises(ValueError, match=r"ExportModel is listed before PrivacyAccounting"):
        export.setup(_Trainer(0, tmp_path, [export, accounting]), module, "fit")  # type: ignore[arg-type]
    export.setup(_Trainer(0, tmp_path, [accounting, export]), module, "fit")  # type: ignore[arg-type]


def test_a_module_without_the_export_members_is_refused_naming_them(tmp_path):
    plain = L.LightningModule()
    with pytest.raises(TypeError, match=r"ExportModel needs .*lacks \['evaluation_weights', "):
        ExportModel().setup(_Trainer(0, tmp_path), plain, "fit")  # type: ignore[arg-type]
    ExportModel(dirpath=None).setup(_Trainer(0, tmp_path), plain, "fit")  # type: ignore[arg-type]
