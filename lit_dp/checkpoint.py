"""Checkpoints of a DP run: written atomically, and found again by ``ckpt_path: last``.

They are saved at every validation and at the end of training as ``last.ckpt`` in the run's log
directory.

A DP run that crashes after hours must resume exactly: every checkpoint holds the accountant
ledger, the clip state, the noise and sampler generator states and the EMA weights (the module
and callbacks put them there). This file only decides when and how the file is written.

Atomic: the checkpoint is written to a temporary file in the same directory, flushed and
fsynced, then renamed over the old one (``os.replace``, atomic on POSIX and Windows), and the
directory is fsynced. A process killed at any moment leaves either the previous checkpoint or
the new one, never a truncated file. (Lightning's own writer stages the bytes in the system
temp directory and moves them with ``shutil.move``, which copies, non-atomically, when that
directory is on another file system, and it never fsyncs.)
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

LAST_CHECKPOINT = "last.ckpt"


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path`` (module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # 0600 (mkstemp's mode): a checkpoint holds the noise generator state; keep it private.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform (e.g. Windows).
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer with :func:`atomic_torch_save` for local paths.

    Remote URLs keep Lightning's fsspec writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, path)


class DPModelCheckpoint(ModelCheckpoint):
    """Saves ``last.ckpt`` after every validation and when training ends, atomically.

    Training may end by the budget stop, max_steps or any other end.

    An "epoch" of Poisson batches is an arbitrary number of steps, so no save is tied to it.
    Installs :class:`AtomicCheckpointIO` on the strategy unless a custom checkpoint IO is set.

    Args:
        dirpath: directory of the checkpoints; null = ``<log_dir>/checkpoints`` of the run's
            logger (which follows ``trainer.default_root_dir``).
        every_n_train_steps: also save every n optimizer steps (null = at validation and end only).
        save_top_k: also keep step-numbered checkpoints ``step=N.ckpt``: 0 = none (``last.ckpt``
            only), k = the k most recent, -1 = all of them.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_train_steps: int | None = None,
        save_top_k: int = 0,
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            filename="{step}",
            save_last=True,
            save_top_k=save_top_k,
            every_n_train_steps=every_n_train_steps,
            enable_version_counter=False,
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if trainer.is_global_zero and self.dirpath is not None and "://" not in str(self.dirpath):
            # Temp files of a process killed mid-save (as large as a checkpoint each).
            for stale in Path(self.dirpath).glob(f".*{self.FILE_EXTENSION}.*.tmp"):
                stale.unlink(missing_ok=True)

    def _save_now(self, trainer: L.Trainer) -> None:
        if self._should_skip_saving_checkpoint(trainer):  # not fitting, or this step is saved
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)  # no-op with save_top_k=0
        self._save_last_checkpoint(trainer, candidates)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Runs after the other callbacks' on_train_batch_end (Lightning puts checkpoint
        # callbacks last), so the accountant and EMA already hold this step.
        every = self._every_n_train_steps
        if every >= 1 and trainer.global_step % every == 0:
            self._save_now(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        return None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_now(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_now(trainer)


def find_last_checkpoint(runs_dir: str | Path) -> Path | None:
    """The newest ``<runs_dir>/<version>/checkpoints/last.ckpt``, or None.

    Newest is the latest modification time; ties go to the higher version number. ``runs_dir`` is
    a logger's ``<save_dir>/<name>``, e.g. ``runs/lit_dp``.
    """
    found = list(Path(runs_dir).glob(f"*/checkpoints/{LAST_CHECKPOINT}"))
    if not found:
        return None

    def order(path: Path) -> tuple[float, int]:
        match = re.fullmatch(r"version_(\d+)", path.parent.parent.name)
        return path.stat().st_mtime, int(match.group(1)) if match else -1

    return max(found, key=order)
