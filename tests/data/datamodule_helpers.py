"""Shared by the DataModule tests: an in-memory DataModule, records, batch rows and a stand-in
trainer."""

from __future__ import annotations

from types import SimpleNamespace

from lit_dp.data import DPDataModule
from lit_dp.models import tiny_tokenizer


class ListDataModule(DPDataModule):
    """In-memory records, for tests."""

    def __init__(self, train, validation=(), test=(), **kw):
        kw.setdefault("tokenizer", tiny_tokenizer())
        kw.setdefault("sampling_seed", 0)
        kw.setdefault("max_length", 128)
        super().__init__(**kw)
        self.records = {"train": list(train), "validation": list(validation), "test": list(test)}

    def load_records(self):
        return {k: list(v) for k, v in self.records.items()}


def qa(i, user=None):
    r = {"prompt": f"question {i}?", "response": f"answer {i}."}
    if user is not None:
        r["user"] = user
    return r


def rows_of(batch):
    """The rows of a batch as token tuples without padding (order-free comparisons)."""
    return sorted(
        tuple(ids[m.bool()].tolist())
        for ids, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    )


def fake_trainer(*, step=0, rank=0, world=1, seed_from_rank0=None, distributed_sampler=False):
    return SimpleNamespace(
        global_step=step,
        global_rank=rank,
        world_size=world,
        _accelerator_connector=SimpleNamespace(use_distributed_sampler=distributed_sampler),
        strategy=SimpleNamespace(
            broadcast=lambda obj, src=0: seed_from_rank0 if seed_from_rank0 is not None else obj
        ),
    )
