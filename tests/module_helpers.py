"""Builders shared by the DPCausalLM tests (test_module.py, test_dp_step.py, test_evaluation.py):
a synthetic DataModule, a tiny module from flat settings, a quiet CPU trainer (alone or with
the library's callbacks), and a snapshot of the trainable weights."""

from __future__ import annotations

import functools

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_dp.callbacks.accounting import PrivacyAccounting
from lit_dp.callbacks.clip_lr import ClipDrivenLR
from lit_dp.callbacks.ema import EMAWeights
from lit_dp.data import ConstantBatchSize, SyntheticDataModule
from lit_dp.models import tiny_tokenizer
from lit_dp.module import DPCausalLM
from lit_dp.optim import DPAdamW
from lit_dp.privacy.clipping import FixedClip, HistoryPercentile, PrivateQuantile


def make_dm(num_train=32, expected=8.0, seed=1, **kw):
    return SyntheticDataModule(
        tokenizer=tiny_tokenizer(),
        num_train=num_train,
        num_val=4,
        num_test=4,
        max_length=512,
        batch_schedule=ConstantBatchSize(expected),
        sampling_seed=seed,
        **kw,
    )


def make_module(**kw):
    args = dict(
        model="tiny-qwen2",
        noise_multiplier=1.0,
        clipping="fixed",
        max_grad_norm=1.0,
        noise_seed=123,
        eval_before_fit=False,
        lr=1e-2,
        max_physical_batch_size=4,
    )
    args.update(kw)
    return DPCausalLM(**components(args))


_CLIP_FIELDS = {
    "fixed": (FixedClip, ()),
    "private_quantile": (
        PrivateQuantile,
        ("target_clip_rate", "learning_rate", "count_noise_divisor", "min_clip", "max_clip"),
    ),
    "history_percentile": (
        HistoryPercentile,
        ("target_clip_rate", "history_size", "min_clip", "max_clip"),
    ),
}


def components(args: dict) -> dict:
    """Flat test settings -> DPCausalLM's components: the clip-bound estimator (``clipping`` kind,
    ``max_grad_norm`` as its C or C_0, its own fields) and the optimizer callable (``optimizer``
    "adamw" -> DPAdamW, "sgd" -> torch.optim.SGD, with ``lr`` and their own fields)."""
    args = dict(args)
    kind, c = args.pop("clipping"), args.pop("max_grad_norm", 1.0)
    cls, fields = _CLIP_FIELDS[kind]
    own = {f: args.pop(f) for f in fields if f in args}
    args["clipping"] = cls(c) if kind == "fixed" else cls(initial_clip=c, **own)
    name, lr = args.pop("optimizer", "adamw"), args.pop("lr", 5e-4)
    opt_fields = (
        ("momentum", "weight_decay")
        if name == "sgd"
        else ("betas", "eps", "weight_decay", "noise_correction", "variance_floor")
    )
    opt_kw = {f: args.pop(f) for f in opt_fields if f in args}
    args["optimizer"] = functools.partial(
        torch.optim.SGD if name == "sgd" else DPAdamW, lr=lr, **opt_kw
    )
    return args


def quiet_trainer(root, max_steps, callbacks=(), **overrides):
    """A one-device CPU trainer that prints and logs nothing and runs no sanity validation.

    Checkpointing is on exactly when ``callbacks`` holds a ModelCheckpoint; ``overrides`` are
    further ``L.Trainer`` arguments (they win over these)."""
    kw = {
        "max_steps": max_steps,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "use_distributed_sampler": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": root,
        "callbacks": list(callbacks),
        "enable_checkpointing": any(isinstance(c, ModelCheckpoint) for c in callbacks),
    }
    return L.Trainer(**{**kw, **overrides})


def make_trainer(tmp_path, max_steps, callbacks=(), target_epsilon=None, accountant="pld", **kw):
    """``quiet_trainer`` with the library's callbacks (EMA 0.9, clip-driven lr, accounting)."""
    accounting = PrivacyAccounting(target_epsilon=target_epsilon, accountant=accountant)
    cbs = [EMAWeights(decay=0.9), ClipDrivenLR(), accounting, *callbacks]
    return quiet_trainer(tmp_path, max_steps, cbs, limit_val_batches=0, **kw)


def trainable(module):
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}


class Crash(Exception):
    """The process "dies" here (a crash-and-resume test's stand-in for a kill)."""


class CrashAt(L.Callback):
    """Raise Crash before optimizer step ``step``: the run's checkpoints up to it are on disk."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Crash(f"crash before step {self.step}")


def json_keys(obj) -> set[str]:
    """Every dict key of a JSON document, at any depth (what a report carries, wherever)."""
    if isinstance(obj, dict):
        return set(obj) | {k for v in obj.values() for k in json_keys(v)}
    if isinstance(obj, list):
        return {k for v in obj for k in json_keys(v)}
    return set()
