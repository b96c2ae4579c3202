"""DataModule training batches: keys, steps and epoch length, empty batches, privacy units
(examples, whole groups), eval loaders, DDP shards of one global draw, and checkpoint -> resume
through a real Lightning Trainer (setup, arguments and reports: test_datamodule_setup.py;
encoding: test_encoding.py; JSONL: test_jsonl.py)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from datamodule_helpers import ListDataModule, fake_trainer, qa, rows_of
from lightning.pytorch.callbacks import ModelCheckpoint
from module_helpers import quiet_trainer

from lit_dp.data import ConstantBatchSize, ConstantSampleRate

BATCH_KEYS = {"input_ids", "attention_mask", "labels", "sample_rate", "step"}


# --- training batches ----------------------------------------------------------------------
def test_train_batches_keys_steps_and_epoch_length():
    dm = ListDataModule([qa(i) for i in range(30)], batch_schedule=ConstantBatchSize(6))
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.batch_sampler is dm._sampler
    batches = list(loader)
    assert len(batches) == len(loader) == 5  # one expected pass: ceil(1 / q)
    for t, b in enumerate(batches):
        assert set(b) == BATCH_KEYS
        assert b["step"] == t and b["sample_rate"] == pytest.approx(0.2, abs=1e-12)
        assert isinstance(b["step"], int) and isinstance(b["sample_rate"], float)
        assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
        assert b["input_ids"].shape[0] == b["attention_mask"].sum(1).gt(0).sum()
    # The next epoch continues the global step.
    assert [b["step"] for b in loader] == [5, 6, 7, 8, 9]
    dm = ListDataModule(
        [qa(i) for i in range(30)], batch_schedule=ConstantBatchSize(6), steps_per_epoch=3
    )
    dm.setup("fit")
    assert len(dm.train_dataloader()) == 3


@pytest.mark.parametrize("unit", ["example", "group"])
def test_empty_train_batch(unit):
    recs = [qa(i, user=f"u{i}") for i in range(3)]
    dm = ListDataModule(
        recs,
        batch_schedule=ConstantSampleRate(1e-6),
        steps_per_epoch=3,
        privacy_unit=unit,
        group_key="user",
    )
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert [b["step"] for b in batches] == [0, 1, 2]  # empty batches are still steps
    for b in batches:
        for key in ("input_ids", "attention_mask", "labels"):
            assert b[key].shape == (0, 1) and b[key].dtype == torch.long
        assert b["sample_rate"] == 1e-6
        if unit == "group":
            assert b["unit_ids"].shape == (0,) and b["unit_ids"].dtype == torch.long


def test_group_units_sample_whole_groups():
    users = ["u0", "u1", "u0", "u2", "u1", "u0"]
    recs = [qa(i, user=u) for i, u in enumerate(users)]
    dm = ListDataModule(
        recs,
        batch_schedule=ConstantSampleRate(0.5),
        privacy_unit="group",
        group_key="user",
        steps_per_epoch=20,
    )
    dm.setup("fit")
    assert dm.num_units == 3
    rep = dm.data_report()
    assert rep["privacy_unit"] == "group" and rep["group_key"] == "user"
    assert rep["operator_side"]["num_records"] == 6 and "num_records" not in rep
    members = {0: [0, 2, 5], 1: [1, 4], 2: [3]}  # unit id (first-seen order) -> record indices
    encoded = dm.encoded["train"]
    seen = set()
    for b in dm.train_dataloader():
        assert set(b) == BATCH_KEYS | {"unit_ids"}
        uids = b["unit_ids"].tolist()
        assert len(uids) == b["input_ids"].shape[0]
        present = list(dict.fromkeys(uids))
        seen.update(present)
        for u in present:  # all records of a sampled group, contiguous
            first = uids.index(u)
            assert (
                uids[first : first + len(members[u])]
                == [u] * len(members[u])
                == [x for x in uids if x == u]
            )
            got = [
                b["input_ids"][first + k][: len(encoded[r][0])].tolist()
                for k, r in enumerate(members[u])
            ]
            assert got == [encoded[r][0] for r in members[u]]
    assert seen == {0, 1, 2}


def test_num_units_example_vs_group():
    recs = [qa(i, user=f"u{i % 4}") for i in range(10)]
    ex = ListDataModule(recs, batch_schedule=ConstantBatchSize(1))
    grp = ListDataModule(
        recs, batch_schedule=ConstantBatchSize(1), privacy_unit="group", group_key="user"
    )
    ex.setup("fit")
    grp.setup("fit")
    assert (ex.num_units, grp.num_units) == (10, 4)
    assert grp.schedule.rate(0) == 0.25  # q = expected batch / number of GROUPS


def test_group_record_without_group_field_raises():
    dm = ListDataModule(
        [qa(0, user="a"), qa(1)],
        batch_schedule=ConstantBatchSize(1),
        privacy_unit="group",
        group_key="user",
    )
    with pytest.raises(ValueError, match=r"record 1 has no group_key field 'user'"):
        dm.setup("fit")


def test_example_units_have_no_unit_ids():
    dm = ListDataModule([qa(i, user="a") for i in range(4)], batch_schedule=ConstantSampleRate(1.0))
    dm.setup("fit")
    (b,) = list(dm.train_dataloader())
    assert "unit_ids" not in b and b["input_ids"].shape[0] == 4


def test_eval_loaders_are_sequential_without_sample_rate():
    dm = ListDataModule(
        [qa(i) for i in range(4)],
        validation=[qa(i) for i in range(5)],
        batch_schedule=ConstantBatchSize(1),
        eval_batch_size=2,
    )
    dm.setup("fit")
    val = list(dm.val_dataloader())
    assert [b["input_ids"].shape[0] for b in val] == [2, 2, 1]
    for b in val:
        assert set(b) == {"input_ids", "attention_mask", "labels"}
    assert torch.equal(
        val[0]["input_ids"][0, : len(dm.encoded["validation"][0][0])],
        torch.tensor(dm.encoded["validation"][0][0]),
    )
    assert dm.test_dataloader() == []


# --- DDP shards and resume -----------------------------------------------------------------
def test_ddp_ranks_shard_one_global_draw_with_rank0_seed():
    recs = [qa(i) for i in range(40)]
    single = ListDataModule(
        recs, batch_schedule=ConstantSampleRate(0.3), sampling_seed=1234, steps_per_epoch=4
    )
    single.setup("fit")
    ref = list(single.train_dataloader())
    shards = []
    for rank in range(2):
        dm = ListDataModule(
            recs, batch_schedule=ConstantSampleRate(0.3), sampling_seed=None, steps_per_epoch=4
        )
        dm.trainer = fake_trainer(rank=rank, world=2, seed_from_rank0=1234)
        dm.setup("fit")
        assert dm.sampling_seed == 1234  # every rank takes rank 0's seed
        shards.append(list(dm.train_dataloader()))
    for t, b in enumerate(ref):
        r0, r1 = shards[0][t], shards[1][t]
        assert r0["step"] == r1["step"] == t and r0["sample_rate"] == r1["sample_rate"] == 0.3
        assert set(rows_of(r0)).isdisjoint(rows_of(r1))
        assert sorted(rows_of(r0) + rows_of(r1)) == rows_of(b)


def test_distributed_sampler_is_refused():
    dm = ListDataModule([qa(i) for i in range(4)], batch_schedule=ConstantBatchSize(1))
    dm.trainer = fake_trainer(world=2, distributed_sampler=True)
    dm.setup("fit")
    with pytest.raises(ValueError, match="use_distributed_sampler=False"):
        dm.train_dataloader()


def test_state_dict_resume_without_trainer():
    recs = [qa(i) for i in range(20)]
    ref_dm = ListDataModule(
        recs, batch_schedule=ConstantBatchSize(5), sampling_seed=11, steps_per_epoch=6
    )
    ref_dm.setup("fit")
    ref = list(ref_dm.train_dataloader())
    run = ListDataModule(
        recs, batch_schedule=ConstantBatchSize(5), sampling_seed=11, steps_per_epoch=6
    )
    run.setup("fit")
    it = iter(run.train_dataloader())
    for _ in range(2):
        next(it)
    state = run.state_dict()
    assert state == {"sampling_seed": 11, "next_step": 2}

    dm = ListDataModule(
        recs, batch_schedule=ConstantBatchSize(5), sampling_seed=999, steps_per_epoch=6
    )
    dm.load_state_dict(state)  # Lightning: after setup, before train_dataloader
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert [b["step"] for b in batches] == [2, 3, 4, 5, 6, 7]
    for b, r in zip(batches, ref[2:], strict=False):
        for key in ("input_ids", "labels", "attention_mask"):
            assert torch.equal(b[key], r[key])


def test_worker_prefetch_does_not_shift_resume():
    """A DataLoader worker prefetches batches ahead; the step comes from the trainer's counter."""
    recs = [qa(i) for i in range(30)]
    ref_dm = ListDataModule(
        recs, batch_schedule=ConstantBatchSize(6), sampling_seed=4, steps_per_epoch=8
    )
    ref_dm.setup("fit")
    ref = list(ref_dm.train_dataloader())

    dm = ListDataModule(
        recs, batch_schedule=ConstantBatchSize(6), sampling_seed=4, steps_per_epoch=8, num_workers=1
    )
    dm.trainer = trainer = fake_trainer()
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    got = []
    for _ in range(3):
        got.append(next(it))  # the worker has already fetched batches beyond these
        trainer.global_step += 1
    assert dm._sampler.next_step > 3
    state = dm.state_dict()
    assert state == {"sampling_seed": 4, "next_step": 3}
    del it

    resumed = ListDataModule(
        recs, batch_schedule=ConstantBatchSize(6), sampling_seed=None, steps_per_epoch=8
    )
    resumed.trainer = fake_trainer(step=3)  # Lightning restores global_step from the checkpoint
    resumed.setup("fit")
    resumed.load_state_dict(state)
    got += list(resumed.train_dataloader())[:5]
    assert [b["step"] for b in got] == list(range(8))
    for b, r in zip(got, ref, strict=True):
        assert b["sample_rate"] == r["sample_rate"] and torch.equal(b["input_ids"], r["input_ids"])


class _Recorder(L.LightningModule):
    """Records each training batch's step and rows; a one-parameter loss so steps happen."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        assert batch["step"] == self.global_step  # the batch of step t is drawn for step t
        self.seen.append((batch["step"], rows_of(batch)))
        return (self.w - 1).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, max_steps, seed, ckpt_path=None, every=None):
    dm = ListDataModule(
        [qa(i) for i in range(24)],
        batch_schedule=ConstantBatchSize(4),
        sampling_seed=seed,
        steps_per_epoch=4,
        num_workers=1,
    )
    module = _Recorder()
    cbs = (
        [ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=every, save_top_k=-1)]
        if every
        else []
    )
    trainer = quiet_trainer(tmp_path, max_steps, cbs, limit_val_batches=0)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module.seen


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_crash_resume_draws_the_uninterrupted_batches(tmp_path):
    full = _fit(tmp_path / "a", 7, seed=5)
    assert [s for s, _ in full] == list(range(7))  # across an epoch boundary (4 per epoch)
    _fit(tmp_path / "b", 3, seed=5, every=3)  # "crash" mid-epoch after the step-3 checkpoint
    ckpt = next((tmp_path / "b").glob("*step=3*.ckpt"))
    assert torch.load(ckpt, weights_only=False)["ListDataModule"] == {
        "sampling_seed": 5,
        "next_step": 3,
    }
    resumed = _fit(tmp_path / "c", 7, seed=None, ckpt_path=str(ckpt))  # seed from the checkpoint
    assert resumed == full[3:]
