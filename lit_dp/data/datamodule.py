"""LightningDataModules for DP fine-tuning: synthetic data and the user's own JSONL.

Training batches are Poisson-sampled (``PoissonBatchSampler``), one per optimizer step, and
carry their step's global sample rate. Lightning's DistributedSampler is never used: under DDP
each rank keeps its shard of the same global draw.
"""

from __future__ import annotations

import json
import functools
import secrets
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lit_dp.privacy.sampling import PoissonBatch, PoissonBatchSampler, SampleRateSchedule


def encode_record(tokenizer, record: dict[str, str], *, loss_on: str) -> tuple[list[int], list[int]]:
    """Token ids and labels of one record (labels -100 where no loss is taken).

    prompt/response records use the tokenizer's chat template when it has one (user = prompt,
    assistant = response; the loss covers exactly the assistant part), else
    ``prompt + "\\n" + response + eos``. ``text`` records take the loss on every token.
    """
    if "text" in record:
        ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = [*ids, tokenizer.eos_token_id]
        return ids, list(ids)
    prompt, response = record["prompt"], record["response"]
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": response}], tokenize=False
        )
        if not full_text.startswith(prompt_text):  # template reorders: fall back to plain text
            prompt_text, full_text = prompt + "\n", prompt + "\n" + response
    else:
        prompt_text, full_text = prompt + "\n", prompt + "\n" + response
    ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    n_prompt = len(prompt_ids) if ids[: len(prompt_ids)] == prompt_ids else _common_prefix(ids, prompt_ids)
    if not getattr(tokenizer, "chat_template", None) and tokenizer.eos_token_id is not None:
        ids = [*ids, tokenizer.eos_token_id]
    labels = list(ids) if loss_on == "all" else [-100] * n_prompt + ids[n_prompt:]
    return ids, labels


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def collate_rows(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows into input_ids / attention_mask / labels (B, T); B = 0 gives (0, 1)."""
    length = max((len(ids) for ids, _ in rows), default=1)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


class _UnitBatches(Dataset):
    """Maps a PoissonBatch of unit indices to one collated batch (all rows of each unit)."""

    def __init__(self, encoded, units: list[list[int]], pad_id: int, grouped: bool) -> None:
        self.encoded, self.units, self.pad_id, self.grouped = encoded, units, pad_id, grouped

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, batch: PoissonBatch) -> dict[str, Any]:
        rows, unit_ids = [], []
        for u in batch:
            for r in self.units[u]:
                rows.append(self.encoded[r])
                unit_ids.append(u)
        out: dict[str, Any] = collate_rows(rows, self.pad_id)
        if self.grouped:
            out["unit_ids"] = torch.tensor(unit_ids, dtype=torch.long)
        out["sample_rate"] = float(batch.sample_rate)
        out["step"] = int(batch.step)
        return out


def _identity(x):
    return x


class PoissonDataLoader(DataLoader):
    """DataLoader over Poisson batches, resumable by Lightning (state = step of the next batch).

    The batch for optimizer step t is a pure function of (sampling seed, t); each epoch's
    iteration starts at the trainer's global step, so prefetching cannot shift a resumed run.
    """

    def __init__(self, dataset: _UnitBatches, sampler: PoissonBatchSampler, step_source, **kw) -> None:
        super().__init__(dataset, sampler=sampler, batch_size=None, collate_fn=_identity, **kw)
        self.poisson_sampler, self.step_source = sampler, step_source
        self._resume_step: int | None = None

    def __iter__(self):
        # Lightning restores loader state before its loops, so the first iteration after a
        # resume starts at the checkpointed step; later epochs start at the trainer's step.
        if self._resume_step is not None:
            self.poisson_sampler.next_step, self._resume_step = self._resume_step, None
        else:
            self.poisson_sampler.next_step = self.step_source()
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        return {"next_step": self.step_source(), "seed": self.poisson_sampler.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.poisson_sampler.seed = int(state["seed"])
        self._resume_step = int(state["next_step"])


class DPDataModule(L.LightningDataModule):
    """Common base: tokenization, Poisson training batches, privacy units.

    Args:
        tokenizer: a tokenizer object or a model source string (the CLI links it to model.model).
        max_length: longest record in tokens.
        expected_batch_size: expected Poisson batch size q * N (exactly one of this and
            sample_rate).
        sample_rate: q, each unit's inclusion probability per step.
        schedule: "constant" or "linear" (q ramps to the final rate over ramp_steps).
        final_expected_batch_size: expected batch size at the end of a linear ramp.
        ramp_steps: steps of the linear ramp.
        sampling_seed: Poisson sampling seed; null draws one from OS entropy (checkpointed).
        privacy_unit: "example" (one record) or "group" (all records sharing group_key).
        group_key: record field naming the group (user) for privacy_unit: group.
        eval_batch_size: validation/test batch size.
        loss_on: "response" (prompt tokens masked) or "all".
        truncate: truncate records longer than max_length (counted in the report) instead of
            raising.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        tokenizer: Any = "smollm2-135m-instruct",
        max_length: int = 256,
        expected_batch_size: float | None = 16.0,
        sample_rate: float | None = None,
        schedule: Literal["constant", "linear"] = "constant",
        final_expected_batch_size: float | None = None,
        ramp_steps: int = 0,
        sampling_seed: int | None = None,
        privacy_unit: Literal["example", "group"] = "example",
        group_key: str = "user",
        eval_batch_size: int = 16,
        loss_on: Literal["response", "all"] = "response",
        truncate: bool = False,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if (expected_batch_size is None) == (sample_rate is None):
            raise ValueError("data: set exactly one of expected_batch_size and sample_rate")
        if expected_batch_size is not None and expected_batch_size <= 0:
            raise ValueError(f"data.expected_batch_size={expected_batch_size} must be > 0")
        if sample_rate is not None and not 0 < sample_rate <= 1:
            raise ValueError(f"data.sample_rate={sample_rate} must be in (0, 1]")
        if max_length < 2:
            raise ValueError(f"data.max_length={max_length} must be >= 2")
        if privacy_unit not in ("example", "group"):
            raise ValueError(f"data.privacy_unit={privacy_unit!r} must be 'example' or 'group'")
        if schedule == "linear" and (final_expected_batch_size is None or ramp_steps < 1):
            raise ValueError("data.schedule=linear needs final_expected_batch_size and ramp_steps >= 1")
        if eval_batch_size < 1:
            raise ValueError("data.eval_batch_size must be >= 1")
        self._tokenizer_arg = tokenizer
        self.tokenizer = None if isinstance(tokenizer, str) else tokenizer
        self.max_length, self.truncate, self.loss_on = max_length, truncate, loss_on
        self.expected_batch_size, self.sample_rate_arg = expected_batch_size, sample_rate
        self.schedule_kind, self.final_expected_batch_size, self.ramp_steps = schedule, final_expected_batch_size, ramp_steps
        self.sampling_seed = sampling_seed if sampling_seed is not None else secrets.randbits(62)
        self.privacy_unit, self.group_key = privacy_unit, group_key
        self.eval_batch_size, self.num_workers = eval_batch_size, num_workers
        self.splits: dict[str, list[dict]] = {}
        self.encoded: dict[str, list[tuple[list[int], list[int]]]] = {}
        self.num_truncated = 0
        self.num_units = 0
        self.schedule: SampleRateSchedule | None = None
        self._units: list[list[int]] = []

    # --- subclasses provide records ----------------------------------------------------------
    def load_records(self) -> dict[str, list[dict]]:
        raise NotImplementedError

    def dataset_name(self) -> str:
        return type(self).__name__

    # --- setup -------------------------------------------------------------------------------
    def _get_tokenizer(self):
        if self.tokenizer is None:
            from lit_dp.models import load_tokenizer

            self.tokenizer = load_tokenizer(self._tokenizer_arg)
        return self.tokenizer

    def _encode_split(self, name: str, records: list[dict]) -> list[tuple[list[int], list[int]]]:
        tok = self._get_tokenizer()
        out = []
        for i, rec in enumerate(records):
            ids, labels = encode_record(tok, rec, loss_on=self.loss_on)
            if len(ids) > self.max_length:
                if not self.truncate:
                    raise ValueError(
                        f"data: {name} record {i} has {len(ids)} tokens > data.max_length="
                        f"{self.max_length}; raise max_length or set data.truncate: true"
                    )
                ids, labels = ids[: self.max_length], labels[: self.max_length]
                self.num_truncated += 1
            out.append((ids, labels))
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.encoded:
            return
        self.splits = self.load_records()
        if not self.splits.get("train"):
            raise ValueError("data: the training set is empty; add records or fix the path")
        self.num_truncated = 0
        self.encoded = {k: self._encode_split(k, v) for k, v in self.splits.items()}
        train = self.splits["train"]
        if self.privacy_unit == "group":
            groups: dict[Any, list[int]] = {}
            for i, rec in enumerate(train):
                if self.group_key not in rec:
                    raise ValueError(f"data: train record {i} has no group_key field {self.group_key!r}")
                key = rec[self.group_key]
                if isinstance(key, (list, dict)):  # JSON arrays/objects are not hashable
                    key = json.dumps(key, sort_keys=True)
                groups.setdefault(key, []).append(i)
            self._units = list(groups.values())
        else:
            self._units = [[i] for i in range(len(train))]
        self.num_units = len(self._units)
        n = self.num_units
        if self.sample_rate_arg is not None:
            q0 = self.sample_rate_arg
        else:
            q0 = float(self.expected_batch_size) / n
        if q0 > 1:
            raise ValueError(
                f"data.expected_batch_size={self.expected_batch_size} exceeds the {n} privacy units; "
                "lower it (sample rate q = expected_batch_size / N must be <= 1)"
            )
        end = None if self.final_expected_batch_size is None else min(1.0, self.final_expected_batch_size / n)
        self.schedule = SampleRateSchedule(self.schedule_kind, q0, end, self.ramp_steps)

    # --- loaders -----------------------------------------------------------------------------
    def _pad_id(self) -> int:
        tok = self._get_tokenizer()
        return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        rank = trainer.global_rank if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        sampler = PoissonBatchSampler(self.num_units, self.schedule, seed=self.sampling_seed,
                                      rank=rank, world_size=world)
        dataset = _UnitBatches(self.encoded["train"], self._units, self._pad_id(),
                               grouped=self.privacy_unit == "group")
        step_source = (lambda: trainer.global_step) if trainer is not None else (lambda: sampler.next_step)
        return PoissonDataLoader(dataset, sampler, step_source, num_workers=self.num_workers)

    def _eval_loader(self, split: str) -> DataLoader | None:
        rows = self.encoded.get(split)
        if not rows:
            return None
        collate = functools.partial(collate_rows, pad_id=self._pad_id())  # picklable for workers
        return DataLoader(rows, batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=collate, num_workers=self.num_workers)

    def val_dataloader(self):
        return self._eval_loader("validation") or []

    def test_dataloader(self):
        return self._eval_loader("test") or []

    # --- reporting and state -----------------------------------------------------------------
    def data_report(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset_name(), "privacy_unit": self.privacy_unit,
            "group_key": self.group_key if self.privacy_unit == "group" else None,
            "num_units": self.num_units, "num_records": len(self.splits.get("train", [])),
            "truncated": self.num_truncated, "max_length": self.max_length,
        }

    def schedule_description(self) -> dict[str, Any]:
        return self.schedule.describe() if self.schedule else {}

    def state_dict(self) -> dict[str, Any]:
        return {"sampling_seed": self.sampling_seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sampling_seed = int(state_dict["sampling_seed"])


class SyntheticDataModule(DPDataModule):
    """The synthetic ``emails`` or ``records`` dataset (PAPER.md), optionally with canaries.

    Args:
        dataset: "emails" (mailbox replies) or "records" (private registry Q&A).
        num_train: training records (before canaries).
        num_val: validation records.
        num_test: test records.
        data_seed: seed of the generator (the data, not the sampling).
        num_canaries: random secrets planted in the training split (exposure audits).
        canary_repetitions: copies of each canary in the training split.
        **kwargs: the common arguments of DPDataModule.
    """

    def __init__(
        self,
        dataset: Literal["emails", "records"] = "emails",
        num_train: int = 512,
        num_val: int = 64,
        num_test: int = 64,
        data_seed: int = 0,
        num_canaries: int = 0,
        canary_repetitions: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if dataset not in ("emails", "records"):
            raise ValueError(f"data.dataset={dataset!r} must be 'emails' or 'records'")
        if num_train < 1:
            raise ValueError(f"data.num_train={num_train}: the training set is empty; use >= 1")
        if num_val < 0 or num_test < 0:
            raise ValueError("data.num_val and data.num_test must be >= 0")
        self.dataset, self.num_train, self.num_val, self.num_test = dataset, num_train, num_val, num_test
        self.data_seed, self.num_canaries, self.canary_repetitions = data_seed, num_canaries, canary_repetitions
        self.canaries: list[dict] = []

    def dataset_name(self) -> str:
        return f"synthetic:{self.dataset}"

    def load_records(self) -> dict[str, list[dict]]:
        from lit_dp.data.synthetic import make_splits, plant_canaries

        splits = make_splits(self.dataset, num_train=self.num_train, num_val=self.num_val,
                             num_test=self.num_test, seed=self.data_seed)
        if self.num_canaries:
            splits["train"], self.canaries = plant_canaries(
                splits["train"], num_canaries=self.num_canaries,
                repetitions=self.canary_repetitions, seed=self.data_seed,
            )
        return splits
