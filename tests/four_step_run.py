"""A seeded 4-step fit whose outcome a refactor of the privacy code must not change.

Run as ``python tests/four_step_run.py OUT.pt`` with PYTHONPATH pointing at the lit_dp to test:
``tests/test_refactor_identity.py`` runs it once on a copy of lit_dp taken from a commit before
the refactor and once on this checkout, and compares the saved tensors bit for bit. It uses only
constructor arguments and members that exist on both sides (DPCausalLM, SyntheticDataModule,
PrivacyAccounting, the clip-bound estimators), nothing from tests/.

Three runs: PLD calibration of ``noise_multiplier: auto`` with private quantile clipping (the
clip bound moves, Theorem 1 raises the gradient noise); a fixed sigma under RDP whose budget stops
the run after a few steps (peek and stop); a fixed sigma under PLD with a linear batch ramp.
"""

from __future__ import annotations

import functools
import sys
import tempfile
from typing import Any

import lightning as L
import torch

from lit_dp.callbacks.accounting import PrivacyAccounting
from lit_dp.data import ConstantBatchSize, LinearBatchSizeRamp, SyntheticDataModule
from lit_dp.models import tiny_tokenizer
from lit_dp.module import DPCausalLM
from lit_dp.optim import DPAdamW
from lit_dp.privacy.clipping import FixedClip, PrivateQuantile

RUNS: dict[str, dict[str, Any]] = {
    "pld-auto-quantile": {
        "sigma": "auto", "accountant": "pld", "target": 4.0, "quantile": True, "ramp": False,
    },
    "rdp-fixed-budget-stop": {
        "sigma": 1.0, "accountant": "rdp", "target": 3.0, "quantile": False, "ramp": False,
    },
    "pld-fixed-ramp": {
        "sigma": 0.9, "accountant": "pld", "target": None, "quantile": False, "ramp": True,
    },
}  # fmt: skip


def _run(spec: dict[str, Any], root: str) -> dict[str, Any]:
    L.seed_everything(0, verbose=False)
    ramp = LinearBatchSizeRamp(4.0, 12.0, ramp_steps=3)
    schedule = ramp if spec["ramp"] else ConstantBatchSize(8.0)
    dm = SyntheticDataModule(
        tokenizer=tiny_tokenizer(), num_train=64, num_val=4, num_test=4, max_length=512,
        batch_schedule=schedule, sampling_seed=5,
    )  # fmt: skip
    clip = (
        PrivateQuantile(initial_clip=1.0, count_noise_divisor=4.0)
        if spec["quantile"]
        else FixedClip(1.0)
    )
    module = DPCausalLM(
        model="tiny-qwen2", noise_multiplier=spec["sigma"], clipping=clip,
        optimizer=functools.partial(DPAdamW, lr=1e-2), noise_seed=123, eval_before_fit=False,
        max_physical_batch_size=4,
    )  # fmt: skip
    accounting = PrivacyAccounting(target_epsilon=spec["target"], accountant=spec["accountant"])
    trainer = L.Trainer(
        max_steps=4, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
        default_root_dir=root, callbacks=[accounting], enable_checkpointing=False,
        limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    weights = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    ledger = [list(map(float, run)) for run in accounting.accountant.state_dict()["history"]]
    rdp_ledger = [list(map(float, run)) for run in accounting.rdp.state_dict()["history"]]
    return {
        "weights": weights,
        "clip_bound": torch.tensor(float(module.clip.max_grad_norm), dtype=torch.float64),
        "noise_multiplier": torch.tensor(float(module.noise_multiplier), dtype=torch.float64),
        "ledger": torch.tensor(ledger, dtype=torch.float64),
        "rdp_ledger": torch.tensor(rdp_ledger, dtype=torch.float64),
        "epsilon": torch.tensor(float(accounting.epsilon()), dtype=torch.float64),
        "global_step": torch.tensor(int(trainer.global_step)),
    }


def main(out: str) -> None:
    results = {}
    for name, spec in RUNS.items():
        with tempfile.TemporaryDirectory() as root:
            results[name] = _run(spec, root)
    torch.save(results, out)


if __name__ == "__main__":
    main(sys.argv[1])
