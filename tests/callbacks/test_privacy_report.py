"""What the privacy report says epsilon does not cover, as a user's fit writes it: validation
records held out of the private training file, N treated as public, and HistoryPercentile (a
warning before training; the shareable export drops its clip bound, derived from raw norms)."""

from __future__ import annotations

import json

import pytest
from module_helpers import make_dm, make_module, make_trainer

from lit_dp.callbacks.export import ExportModel
from lit_dp.data import ConstantBatchSize, JSONLDataModule
from lit_dp.export import export_model
from lit_dp.models import load_model, tiny_tokenizer
from lit_dp.privacy.clipping import FixedClip, HistoryPercentile


def _jsonl(tmp_path, **kw):
    path = tmp_path / "mail.jsonl"
    rows = [{"prompt": f"question {i}?", "response": f"answer {i}."} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return JSONLDataModule(
        train_path=str(path),
        tokenizer=tiny_tokenizer(),
        batch_schedule=ConstantBatchSize(8.0),
        sampling_seed=0,
        max_length=128,
        **kw,
    )


def _fit_report(tmp_path, dm, module=None, callbacks=()):
    trainer = make_trainer(tmp_path, max_steps=1, callbacks=callbacks)
    trainer.fit(module or make_module(), datamodule=dm)
    return json.loads((tmp_path / "privacy_report.json").read_text())


def test_report_names_held_out_validation_and_public_n(tmp_path):
    report = _fit_report(tmp_path / "split", _jsonl(tmp_path, val_fraction=0.25, split_seed=1))
    held = [item for item in report["not_covered"] if "validation" in item and "private" in item]
    assert len(held) == 1 and "mail.jsonl" not in held[0] and "not covered by epsilon" in held[0]
    public_n = [item for item in report["not_covered"] if item.startswith("num_units, N")]
    assert len(public_n) == 1 and "treated as public" in public_n[0]
    # With a separate validation file nothing of the training file is scored in the clear.
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"prompt": "a?", "response": "b."}) + "\n")
    report = _fit_report(tmp_path / "file", _jsonl(tmp_path, val_path=str(val)))
    assert not [item for item in report["not_covered"] if "private training file" in item]
    assert public_n[0] in report["not_covered"]


def test_history_percentile_is_announced_at_fit_and_its_bound_is_not_exported(tmp_path):
    module = make_module(clipping="history_percentile")
    export = [ExportModel(dirpath=str(tmp_path / "export"))]
    with pytest.warns(UserWarning, match=r"HistoryPercentile .*epsilon does NOT cover"):
        report = _fit_report(tmp_path, make_dm(num_train=32, expected=8.0), module, export)
    # The run directory's (operator-side) report keeps the raw-norm bound ...
    assert report["clipping"]["max_grad_norm"] == module.clip.max_grad_norm
    assert report["mechanism"]["clipping"]["max_grad_norm"] == module.clip.max_grad_norm
    # ... the shareable export drops it, and keeps the estimator's public configuration.
    exported = json.loads((tmp_path / "export" / "privacy_report.json").read_text())
    for clipping in (exported["clipping"], exported["mechanism"]["clipping"]):
        assert "max_grad_norm" not in clipping
        assert clipping["parameters"] == report["clipping"]["parameters"]
        assert clipping["covered_by_dp"] is False
    assert exported["not_covered"] == report["not_covered"]


def test_export_keeps_a_covered_clip_bound(tmp_path):
    """Only a bound that epsilon does not cover is dropped; FixedClip's C is public config."""
    report = {"clipping": FixedClip(0.5).describe(), "other": HistoryPercentile(0.7).describe()}
    out = export_model(load_model("tiny-qwen2"), None, tmp_path, privacy_report=report)
    exported = json.loads((out / "privacy_report.json").read_text())
    assert exported["clipping"]["max_grad_norm"] == 0.5
    assert "max_grad_norm" not in exported["other"]
    assert exported["other"]["parameters"]["initial_clip"] == 0.7
