"""LightningDataModules for DP fine-tuning: the common base and the synthetic datasets.

Training batches are Poisson-sampled (``PoissonBatchSampler``), one per optimizer step, under
the sampler's resume contract (lit_dp.privacy.sampling): the batch of step t is a function of
(sampling seed, t) and each epoch starts at the trainer's global step. Lightning's
DistributedSampler is never used: under DDP each rank keeps its shard of the same global draw.

A training batch is a dict: ``input_ids``, ``attention_mask``, ``labels`` (B, T) int64, right
padded (labels -100 on padding and, with ``loss_on="response"``, on prompt tokens);
``sample_rate`` (float, the global q_t) and ``step`` (int); with group units also ``unit_ids``
(B,) int64 (rows of one unit are contiguous and share an id). An empty batch has B = 0, T = 1.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader

from lit_dp.data.batch_schedule import BatchSchedule, ConstantBatchSize
from lit_dp.data.checks import check_common_args, check_synthetic_args
from lit_dp.data.encoding import (
    PoissonCollate,
    Row,
    UnitDataset,
    collate_rows,
    encode_records,
    tokenizer_fingerprint,
)
from lit_dp.privacy.cyclic_sampling import CyclicPoissonBatchSampler
from lit_dp.privacy.sampling import PoissonBatchSampler, SampleRateSchedule
from lit_dp.report import OPERATOR_SIDE_KEY

_CACHE_VERSION = 1
_NOT_RESUMABLE = (
    r"You're resuming from a checkpoint that ended before the epoch ended and your dataloader "
    r"is not resumable"
)


class DPDataModule(L.LightningDataModule):
    """Common base: tokenization, Poisson training batches, privacy units, reports, state.

    Subclasses implement ``load_records() -> {"train", "validation", "test"}`` (lists of
    {prompt, response} or {text} dicts, plus the group key for group units).

    Args:
        tokenizer: a tokenizer object, or a model source string loaded with
            ``lit_dp.models.load_tokenizer`` at setup (the CLI links it to model.model).
        max_length: longest training/eval record in tokens (prompt + response + special tokens).
        batch_schedule: how many privacy units a step draws (``lit_dp.data.batch_schedule``):
            ``ConstantBatchSize`` (q = expected_batch_size / N after setup), ``ConstantSampleRate``,
            ``LinearBatchSizeRamp`` or ``LinearSampleRateRamp``; null = a fresh
            ``ConstantBatchSize()`` (expected batch size 16).
        steps_per_epoch: batches per epoch; null = one expected pass over the data
            (ceil(1 / q) for a constant q). Only the epoch length: privacy counts steps.
        sampling_seed: Poisson sampling seed; null draws one from OS entropy (rank 0's under
            DDP). Checkpointed with the next step, so a resumed run draws the same batches.
        privacy_unit: "example" (one record per unit) or "group" (all records sharing
            group_key: user-level DP; the sampler draws groups and a batch holds all their
            records).
        group_key: record field naming the group, required for privacy_unit: group.
        eval_batch_size: validation/test batch size (sequential batches, no sampling).
        loss_on: "response" (prompt tokens masked with -100) or "all".
        truncate: cut records longer than max_length (counted in data_report) instead of
            raising an error.
        cache_dir: directory for a tokenization cache keyed by a hash of the records, the
            tokenizer, max_length, loss_on and truncate; null keeps it in memory only.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        tokenizer: Any = "smollm2-135m-instruct",
        max_length: int = 256,
        batch_schedule: BatchSchedule | None = None,
        steps_per_epoch: int | None = None,
        sampling_seed: int | None = None,
        privacy_unit: Literal["example", "group"] = "example",
        group_key: str | None = None,
        eval_batch_size: int = 16,
        loss_on: Literal["response", "all"] = "response",
        truncate: bool = False,
        cache_dir: str | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_common_args(
            tokenizer=tokenizer,
            max_length=max_length,
            batch_schedule=batch_schedule,
            steps_per_epoch=steps_per_epoch,
            sampling_seed=sampling_seed,
            privacy_unit=privacy_unit,
            group_key=group_key,
            eval_batch_size=eval_batch_size,
            loss_on=loss_on,
            truncate=truncate,
            num_workers=num_workers,
        )
        self._tokenizer_arg = tokenizer
        self.tokenizer = None if isinstance(tokenizer, str) else tokenizer
        self.max_length, self.truncate, self.loss_on = max_length, truncate, loss_on
        # Built per instance: a default shared between DataModules would be one mutable object.
        self.batch_schedule = ConstantBatchSize() if batch_schedule is None else batch_schedule
        self.steps_per_epoch = steps_per_epoch
        self.sampling_seed = sampling_seed if sampling_seed is not None else secrets.randbits(62)
        self.sampling_seed_fixed = sampling_seed is not None  # the report says so (not its value)
        self.privacy_unit, self.group_key = privacy_unit, group_key
        self.eval_batch_size, self.cache_dir, self.num_workers = (
            eval_batch_size,
            cache_dir,
            num_workers,
        )
        self.splits: dict[str, list[dict[str, Any]]] = {}
        self.encoded: dict[str, list[Row]] = {}
        self.num_truncated = 0
        self.num_units = 0
        self.num_added_units = 0  # audit canaries appended by add_training_units
        self.schedule: SampleRateSchedule | None = None
        self._units: list[list[int]] = []
        self._next_step = 0  # restored by load_state_dict before the sampler exists
        self._sampler: PoissonBatchSampler | None = None
        self._seed_synced = False
        self.bands = 1  # cyclic participation groups, set by the noise mechanism (banded MF)

    # --- subclasses provide records --------------------------------------------------------
    def load_records(self) -> dict[str, list[dict[str, Any]]]:
        raise NotImplementedError

    def dataset_name(self) -> str:
        return type(self).__name__

    def record_location(self, split: str, index: int) -> str:
        """How error messages name record ``index`` of ``split``."""
        return f"{split} record {index}"

    def not_covered(self) -> list[str]:
        """Entries this data adds to the privacy report's ``not_covered`` (none by default)."""
        return []

    # --- setup -----------------------------------------------------------------------------
    def _get_tokenizer(self) -> Any:
        if self.tokenizer is None:
            from lit_dp.models import load_tokenizer

            self.tokenizer = load_tokenizer(self._tokenizer_arg)
        return self.tokenizer

    def _attached_trainer(self) -> Any:
        return getattr(self, "trainer", None)

    def _encode_all(self, splits: dict[str, list[dict[str, Any]]]) -> dict[str, list[Row]]:
        """Tokenized splits, from the disk cache when ``cache_dir`` holds them."""
        tok = self._get_tokenizer()
        path = None
        if self.cache_dir is not None:
            key = json.dumps(
                [
                    _CACHE_VERSION,
                    splits,
                    tokenizer_fingerprint(tok),
                    self.max_length,
                    self.loss_on,
                    self.truncate,
                ],
                sort_keys=True,
                default=str,
            )
            path = (
                Path(self.cache_dir).expanduser()
                / f"tokens-{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"
            )
            if path.is_file():
                cached = json.loads(path.read_text())
                self.num_truncated = cached["truncated"]
                return {k: [(ids, lab) for ids, lab in v] for k, v in cached["encoded"].items()}
        self.num_truncated = 0
        encoded = {name: self._encode_split(name, recs, tok) for name, recs in splits.items()}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")  # atomic: ranks may write at once
            tmp.write_text(json.dumps({"truncated": self.num_truncated, "encoded": encoded}))
            os.replace(tmp, path)
        return encoded

    def _encode_split(self, name: str, records: list[dict[str, Any]], tok: Any) -> list[Row]:
        rows = encode_records(tok, records, loss_on=self.loss_on)
        for i, (ids, labels) in enumerate(rows):
            if len(ids) > self.max_length:
                if not self.truncate:
                    raise ValueError(
                        f"data: {self.record_location(name, i)} has {len(ids)} tokens > "
                        f"data.max_length={self.max_length}; raise max_length or set "
                        "data.truncate: true"
                    )
                rows[i] = (ids[: self.max_length], labels[: self.max_length])
                self.num_truncated += 1
        return rows

    def _check_labels(self) -> None:
        """Refuse a training set of only records without a labelled token, warn about some.

        Such records give no gradient (yet are sampled and accounted).
        """
        train = self.encoded["train"]
        empty = sum(all(x == -100 for x in labels) for _, labels in train)
        if empty == len(train):
            raise ValueError(
                f"data: none of the {len(train)} training records has a token to learn (all "
                f"labels masked); with loss_on={self.loss_on!r} the response was cut off or is "
                "empty: raise data.max_length, set data.truncate: false, or use loss_on: all"
            )
        if empty:
            rank_zero_warn(
                f"data: {empty} of {len(train)} training records have no token to learn (response "
                f"cut by data.max_length={self.max_length} or empty); they add no gradient"
            )

    def setup(self, stage: str | None = None) -> None:
        self._sync_seed()
        if self.encoded:
            return
        splits = self.load_records()
        if not splits.get("train"):
            raise ValueError("data: the training set is empty; add records or fix the path")
        self.encoded = self._encode_all(splits)
        self._check_labels()
        self.splits = splits
        self._units = self._make_units(splits["train"])
        self.num_units = len(self._units)
        self.schedule = self._make_schedule(self.num_units)

    def add_training_units(self, rows: list[Row]) -> None:
        """Append ``rows`` to the training set, one privacy unit each (the audit's canaries).

        N and the sample-rate schedule are recomputed, so the added units are Poisson-sampled
        and accounted like every other unit. Call it after ``setup`` and before anything reads N
        (the accounting callback's setup) or builds the training loader.
        """
        if self.schedule is None or self._sampler is not None:
            raise RuntimeError(
                "add_training_units must run after setup('fit') and before the accountant "
                "reads N and the training loader is built"
            )
        start = len(self.encoded["train"])
        self.encoded["train"] = [*self.encoded["train"], *rows]
        self._units = [*self._units, *([start + k] for k in range(len(rows)))]
        self.num_added_units += len(rows)
        self.num_units = len(self._units)
        self.schedule = self._make_schedule(self.num_units)

    def units_and_schedule(self) -> tuple[int, SampleRateSchedule]:
        """(N privacy units, sample-rate schedule) from the records alone, without a tokenizer.

        This is what the accountant needs to plan a run (``lit-dp plan``). Equals ``num_units`` and
        ``schedule`` after ``setup``.
        """
        if self.schedule is not None:
            return self.num_units, self.schedule
        splits = self.load_records()
        if not splits.get("train"):
            raise ValueError("data: the training set is empty; add records or fix the path")
        n = len(self._make_units(splits["train"]))
        return n, self._make_schedule(n)

    def training_units_digest(self) -> str:
        """SHA-256 of the training units in order (their tokenized records): a run's data."""
        from lit_dp.fingerprint import units_digest

        return units_digest(self.encoded["train"], self._units)

    def _make_schedule(self, n: int) -> SampleRateSchedule:
        return self.batch_schedule.sample_rates(n)

    def _make_units(self, train: list[dict[str, Any]]) -> list[list[int]]:
        if self.privacy_unit != "group":
            return [[i] for i in range(len(train))]
        groups: dict[Any, list[int]] = {}
        for i, rec in enumerate(train):
            if self.group_key not in rec:
                raise ValueError(
                    f"data: train record {i} has no group_key field {self.group_key!r} "
                    f"(fields present: {sorted(rec)})"
                )
            key = rec[self.group_key]
            if isinstance(key, list | dict):  # JSON arrays/objects are not hashable
                key = json.dumps(key, sort_keys=True)
            groups.setdefault(key, []).append(i)
        return list(groups.values())

    def _sync_seed(self) -> None:
        # A seed drawn from OS entropy differs per process: every rank takes rank 0's, so all
        # ranks draw the same global Poisson batch.
        trainer = self._attached_trainer()
        if self._seed_synced or trainer is None or trainer.world_size <= 1:
            return
        self.sampling_seed = int(trainer.strategy.broadcast(self.sampling_seed, src=0))
        self._seed_synced = True

    def set_participation(self, *, bands: int) -> None:
        """Sample cyclically in ``bands`` groups (banded MF); 1 = Poisson sampling of all units.

        Called by the model's setup, before ``train_dataloader``.
        """
        if isinstance(bands, bool) or not isinstance(bands, int) or bands < 1:
            raise ValueError(f"bands={bands!r} must be an integer >= 1")
        self.bands = bands

    # --- loaders ---------------------------------------------------------------------------
    def _pad_id(self) -> int:
        tok = self._get_tokenizer()
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad is None:
            raise ValueError(
                "data.tokenizer has neither a pad nor an eos token; set tokenizer.pad_token"
            )
        return int(pad)

    def train_dataloader(self) -> DataLoader:
        if self.schedule is None:
            raise RuntimeError("call setup('fit') before train_dataloader()")
        trainer = self._attached_trainer()
        rank, world, step_source = 0, 1, None
        if trainer is not None:
            step_source = partial(getattr, trainer, "global_step")  # optimizer steps taken
            if trainer.world_size > 1:
                if trainer._accelerator_connector.use_distributed_sampler:
                    raise ValueError(
                        "Trainer(use_distributed_sampler=True) would replace the Poisson "
                        "sampler; set use_distributed_sampler=False (the lit-dp CLI does)"
                    )
                rank, world = trainer.global_rank, trainer.world_size
        cyclic = {"bands": self.bands} if self.bands > 1 else {}
        self._sampler = (CyclicPoissonBatchSampler if cyclic else PoissonBatchSampler)(
            self.num_units,
            self.schedule,
            seed=self.sampling_seed,
            steps_per_epoch=self.steps_per_epoch,
            rank=rank,
            world_size=world,
            step_source=step_source,
            **cyclic,
        )
        self._sampler.next_step = self._next_step
        # Lightning warns on a mid-epoch resume that this loader is "not resumable" because it
        # has no state_dict of its own. It is: the batch of step t is a pure function of (seed, t)
        # with t the trainer's restored global_step, and the seed is this DataModule's
        # checkpointed state (the sampler docstring's resume contract). Only that warning goes.
        warnings.filterwarnings(
            "ignore", message=_NOT_RESUMABLE, category=PossibleUserWarning, append=False
        )
        return DataLoader(
            UnitDataset(self.encoded["train"], self._units),
            batch_sampler=self._sampler,
            # The fetcher hands the collate UnitDataset.__getitems__'s SampledRows, not a list.
            collate_fn=PoissonCollate(self._pad_id(), self.privacy_unit == "group"),  # type: ignore[arg-type]
            num_workers=self.num_workers,
        )

    def _eval_loader(self, split: str) -> DataLoader | list:
        rows = self.encoded.get(split)
        if not rows:
            return []
        return DataLoader(
            rows,  # type: ignore[arg-type]  # a list of rows is a map-style dataset
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=partial(collate_rows, pad_id=self._pad_id()),
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_loader("test")

    # --- reporting and state ---------------------------------------------------------------
    def data_report(self) -> dict[str, Any]:
        """The data part of the privacy report.

        Top level: configuration (the batch schedule as its config entry) and N, the number of
        privacy units (public: the accounted sample rate q = expected batch size / N states it).
        ``operator_side``: exact counts that depend on the data beyond N and that epsilon does
        not cover (at group level, num_records / N is how many records users hold); they stay
        in the run directory's report and are never exported.
        """
        train = self.encoded.get("train", [])
        return {
            "dataset": self.dataset_name(),
            "privacy_unit": self.privacy_unit,
            "group_key": self.group_key if self.privacy_unit == "group" else None,
            "num_units": self.num_units,
            "max_length": self.max_length,
            "loss_on": self.loss_on,
            "batch_schedule": self.batch_schedule.describe(),
            OPERATOR_SIDE_KEY: {
                "num_records": len(train) - self.num_added_units,  # audit canaries: not records
                "num_validation": len(self.encoded.get("validation", [])),
                "num_test": len(self.encoded.get("test", [])),
                "truncated": self.num_truncated,  # records cut to max_length, all splits
                # Rows whose labels are all -100 (e.g. a prompt cut by truncation): no gradient.
                "records_without_labels": sum(all(x == -100 for x in lab) for _, lab in train),
            },
        }

    def schedule_description(self) -> dict[str, Any]:
        return self.schedule.describe() if self.schedule else {}

    def state_dict(self) -> dict[str, Any]:
        step = (
            self._sampler.state_dict()["next_step"]
            if self._sampler is not None
            else self._next_step
        )
        return {"sampling_seed": self.sampling_seed, "next_step": int(step)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sampling_seed = int(state_dict["sampling_seed"])
        self._next_step = int(state_dict.get("next_step", 0))
        self._seed_synced = True  # every rank loads the same checkpointed seed
        if self._sampler is not None:
            self._sampler.load_state_dict(
                {"seed": self.sampling_seed, "next_step": self._next_step}
            )


class SyntheticDataModule(DPDataModule):
    """The synthetic ``emails`` or ``records`` dataset, optionally with canaries.

    Args:
        dataset: "emails" (reply in the mailbox owner's style) or "records" (private registry
            Q&A, answered from memory).
        num_train: training records before canaries.
        num_val: validation records.
        num_test: test records.
        data_seed: seed of the generator and the canaries (the data, not the sampling).
        num_users: mailbox owners (emails) or registry people (records); null = the
            generator's default (about 8 emails per owner, 4 facts per person).
        num_canaries: random secrets planted in the training split (exposure audits; see
            ``canaries`` after setup).
        canary_repetitions: copies of each canary in the training split.
        group_key: record field of the user (for privacy_unit: group).
        **kwargs: the common arguments of DPDataModule.
    """

    def __init__(
        self,
        dataset: Literal["emails", "records"] = "emails",
        num_train: int = 512,
        num_val: int = 64,
        num_test: int = 64,
        data_seed: int = 0,
        num_users: int | None = None,
        num_canaries: int = 0,
        canary_repetitions: int = 1,
        group_key: str | None = "user",
        **kwargs: Any,
    ) -> None:
        super().__init__(group_key=group_key, **kwargs)
        check_synthetic_args(
            dataset=dataset,
            num_train=num_train,
            num_val=num_val,
            num_test=num_test,
            num_users=num_users,
            num_canaries=num_canaries,
            canary_repetitions=canary_repetitions,
        )
        self.dataset, self.num_train, self.num_val, self.num_test = (
            dataset,
            num_train,
            num_val,
            num_test,
        )
        self.data_seed, self.num_users = data_seed, num_users
        self.num_canaries, self.canary_repetitions = num_canaries, canary_repetitions
        self.canaries: list[dict[str, Any]] = []

    def dataset_name(self) -> str:
        return f"synthetic:{self.dataset}"

    def load_records(self) -> dict[str, list[dict[str, Any]]]:
        from lit_dp.data.synthetic import make_splits, plant_canaries

        splits = make_splits(
            self.dataset,
            num_train=self.num_train,
            num_val=self.num_val,
            num_test=self.num_test,
            seed=self.data_seed,
            num_users=self.num_users,
        )
        if self.num_canaries:
            splits["train"], self.canaries = plant_canaries(
                splits["train"],
                num_canaries=self.num_canaries,
                repetitions=self.canary_repetitions,
                seed=self.data_seed,
            )
        return splits

    def data_report(self) -> dict[str, Any]:
        report = super().data_report()
        report["canaries"] = {
            "num_canaries": self.num_canaries,
            "repetitions": self.canary_repetitions,
        }
        return report
