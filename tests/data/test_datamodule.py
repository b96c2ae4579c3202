"""DataModules: encoding/labels, collation, Poisson batches, privacy units, cache, DDP shards
and checkpoint -> resume through a real Lightning Trainer (JSONL: test_jsonl.py)."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_dp.data import (
    ConstantBatchSize,
    ConstantSampleRate,
    DPDataModule,
    LinearBatchSizeRamp,
    LinearSampleRateRamp,
    SyntheticDataModule,
)
from lit_dp.data.encoding import collate_rows, encode_record, encode_records
from lit_dp.models import tiny_tokenizer

BATCH_KEYS = {"input_ids", "attention_mask", "labels", "sample_rate", "step"}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def plain_tok():
    t = tiny_tokenizer()
    t.chat_template = None
    return t


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


# --- encoding and collation --------------------------------------------------------------
def test_chat_template_labels_are_exactly_the_assistant_part(tok):
    rec = {"prompt": "Hello there", "response": "General Kenobi"}
    ids, labels = encode_record(tok, rec, loss_on="response")
    assert len(ids) == len(labels)
    n_masked = sum(lab == -100 for lab in labels)
    assert all(lab == -100 for lab in labels[:n_masked])  # masked prefix, then labeled
    assert labels[n_masked:] == ids[n_masked:]
    assert tok.decode(ids[n_masked:]) == "General Kenobi<|eos|>"  # the end-of-turn is labeled
    # Reference: the prompt turn with the generation prompt is exactly the masked part.
    head = tok.apply_chat_template(
        [{"role": "user", "content": "Hello there"}], tokenize=False, add_generation_prompt=True
    )
    assert tok.decode(ids[:n_masked]) == head == "<|bos|>user\nHello there<|eos|><|bos|>assistant\n"


def test_template_that_rewrites_the_prompt_falls_back_to_the_response_offset():
    t = tiny_tokenizer()
    t.chat_template = "{{ messages|length }}" + t.chat_template  # head is not a prefix of full
    ids, labels = encode_record(t, {"prompt": "say hi", "response": "hi"}, loss_on="response")
    assert t.decode(ids).startswith("2<|bos|>user")
    assert t.decode([x for x in labels if x != -100]) == "hi<|eos|>"
    assert labels[-3:] == ids[-3:] and all(x == -100 for x in labels[:-3])


def test_no_template_labels_response_and_eos(plain_tok):
    ids, labels = encode_record(plain_tok, {"prompt": "abc", "response": "xyz"}, loss_on="response")
    assert plain_tok.decode(ids) == "abc\nxyz<|eos|>"
    assert ids[-1] == plain_tok.eos_token_id
    assert labels[:4] == [-100] * 4  # "abc\n", one byte per token
    assert labels[4:] == ids[4:]
    assert plain_tok.decode(labels[4:]) == "xyz<|eos|>"


def test_loss_on_all_labels_everything(tok, plain_tok):
    for t in (tok, plain_tok):
        ids, labels = encode_record(t, {"prompt": "abc", "response": "xyz"}, loss_on="all")
        assert labels == ids


@pytest.mark.parametrize("loss_on", ["response", "all"])
def test_text_record_loss_on_all_tokens(tok, loss_on):
    ids, labels = encode_record(tok, {"text": "plain text"}, loss_on=loss_on)
    assert labels == ids
    assert tok.decode(ids) == "plain text<|eos|>"


def test_batched_encoding_equals_one_by_one(tok):
    recs = [qa(1), {"text": "t"}, {"prompt": "p" * 30, "response": ""}, qa(22)]
    assert encode_records(tok, recs, loss_on="response") == [
        encode_record(tok, r, loss_on="response") for r in recs
    ]


def test_collate_right_pads():
    out = collate_rows([([5, 6, 7], [-100, 6, 7]), ([8], [8])], pad_id=0)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    assert all(v.shape == (2, 3) and v.dtype == torch.long for v in out.values())
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_collate_empty_batch():
    out = collate_rows([], pad_id=0)
    for v in out.values():
        assert v.shape == (0, 1) and v.dtype == torch.long


def test_train_batch_padding_and_masking_with_template(tok):
    recs = [{"prompt": "p" * (i + 1), "response": "r" * (3 - i)} for i in range(3)]
    dm = ListDataModule(recs, tokenizer=tok, batch_schedule=ConstantSampleRate(1.0))
    dm.setup("fit")
    (b,) = list(dm.train_dataloader())
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    for ids, lab, m, rec in zip(
        b["input_ids"], b["labels"], b["attention_mask"], recs, strict=True
    ):
        n = int(m.sum())
        assert (ids[n:] == tok.pad_token_id).all() and (lab[n:] == -100).all()  # right padding
        assert tok.decode(lab[lab != -100]) == rec["response"] + "<|eos|>"  # prompt tokens masked


# --- sample rate, schedule and arguments ---------------------------------------------------
def test_sample_rate_from_expected_batch_size():
    dm = ListDataModule([qa(i) for i in range(40)], batch_schedule=ConstantBatchSize(4))
    dm.setup("fit")
    assert dm.num_units == 40
    assert dm.schedule.rate(0) == pytest.approx(0.1, abs=1e-12)
    assert dm.schedule_description() == {"kind": "constant", "sample_rate": pytest.approx(0.1)}


def test_default_expected_batch_size_is_16():
    dm = ListDataModule([qa(i) for i in range(64)])
    dm.setup("fit")
    assert dm.schedule.rate(0) == 0.25


def test_explicit_sample_rate():
    dm = ListDataModule([qa(i) for i in range(10)], batch_schedule=ConstantSampleRate(0.3))
    dm.setup("fit")
    assert dm.schedule.rate(0) == 0.3


def test_linear_schedules():
    dm = ListDataModule(
        [qa(i) for i in range(20)],
        batch_schedule=LinearBatchSizeRamp(start=2, end=10, ramp_steps=4),
    )
    dm.setup("fit")
    assert dm.schedule.rates(5) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5], abs=1e-12)
    dm = ListDataModule(
        [qa(i) for i in range(20)],
        batch_schedule=LinearSampleRateRamp(start_rate=0.4, end_rate=0.2, ramp_steps=2),
    )
    dm.setup("fit")
    assert dm.schedule.rates(3) == pytest.approx([0.4, 0.3, 0.2], abs=1e-12)
    batches = list(dm.train_dataloader())
    assert [b["sample_rate"] for b in batches[:3]] == pytest.approx([0.4, 0.3, 0.2], abs=1e-12)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"batch_schedule": ConstantBatchSize(4)}, id="example-constant"),
        pytest.param({"batch_schedule": ConstantBatchSize(2), "privacy_unit": "group", "group_key": "user"}, id="group"),
        pytest.param({"batch_schedule": LinearSampleRateRamp(start_rate=0.4, end_rate=0.2, ramp_steps=2)},
                     id="linear-rates"),
    ],
)  # fmt: skip
def test_units_and_schedule_without_a_tokenizer_equal_setup(kwargs):
    # What `lit-dp plan` reads: N and q from the records alone; a tokenizer that cannot load
    # proves nothing is tokenized.
    recs = [qa(i, user=f"u{i % 7}") for i in range(40)]
    planned = ListDataModule(recs, tokenizer="./no/such/tokenizer", **kwargs).units_and_schedule()
    dm = ListDataModule(recs, **kwargs)
    dm.setup("fit")
    assert planned == (dm.num_units, dm.schedule) == dm.units_and_schedule()
    assert planned[0] == (7 if kwargs.get("privacy_unit") == "group" else 40)


@pytest.mark.parametrize("field", ["expected_batch_size", "end"])
def test_expected_batch_size_above_n_raises(field):
    kw = {
        "batch_schedule": ConstantBatchSize(6)
        if field == "expected_batch_size"
        else LinearBatchSizeRamp(start=2, end=6, ramp_steps=2)
    }
    dm = ListDataModule([qa(i) for i in range(5)], **kw)
    with pytest.raises(ValueError, match=rf"{field}=6 exceeds the 5 privacy units"):
        dm.setup("fit")


# The batch schedules validate their own fields: tests/data/test_batch_schedule.py.
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"batch_schedule": 16}, "batch_schedule"),
        ({"max_length": 1}, "max_length"),
        ({"privacy_unit": "user"}, "privacy_unit"),
        ({"privacy_unit": "group"}, "group_key"),
        ({"steps_per_epoch": 0}, "steps_per_epoch"),
        ({"sampling_seed": 1.5}, "sampling_seed"),
        ({"eval_batch_size": 0}, "eval_batch_size"),
        ({"loss_on": "prompt"}, "loss_on"),
        ({"truncate": "yes"}, "truncate"),
        ({"num_workers": -1}, "num_workers"),
        ({"tokenizer": ""}, "tokenizer"),
        ({"tokenizer": 3}, "tokenizer"),
    ],
    ids=[
        "not-a-schedule",
        "max-length",
        "privacy-unit",
        "group-no-key",
        "steps-per-epoch",
        "float-seed",
        "eval-bs",
        "loss-on",
        "truncate",
        "workers",
        "empty-tokenizer",
        "bad-tokenizer",
    ],
)
def test_bad_args_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ListDataModule([qa(0)], **kwargs)


def test_empty_training_set_raises():
    with pytest.raises(ValueError, match="training set is empty"):
        ListDataModule([]).setup("fit")


def test_too_long_record_names_index_and_max_length():
    recs = [{"prompt": "a", "response": "b"}, {"prompt": "a" * 50, "response": "b"}]
    dm = ListDataModule(recs, batch_schedule=ConstantBatchSize(1), max_length=40)
    with pytest.raises(ValueError, match=r"train record 1 has \d+ tokens > data.max_length=40"):
        dm.setup("fit")


def test_truncate_counts_in_report():
    recs = [
        {"prompt": "a", "response": "b"},
        {"prompt": "a" * 50, "response": "b"},
        {"text": "z" * 40},
    ]
    dm = ListDataModule(recs, batch_schedule=ConstantBatchSize(1), max_length=40, truncate=True)
    with pytest.warns(UserWarning, match="1 of 3 training records have no token to learn"):
        dm.setup("fit")
    rep = dm.data_report()
    counts = rep["operator_side"]  # exact data-dependent counts: never exported
    assert counts["truncated"] == 2
    assert rep["max_length"] == 40 and counts["num_records"] == 3 and rep["num_units"] == 3
    assert counts["records_without_labels"] == 1  # the cut prompt lost its whole response
    assert rep["privacy_unit"] == "example" and rep["group_key"] is None
    assert all(len(ids) <= 40 and len(lab) == len(ids) for ids, lab in dm.encoded["train"])


def test_truncation_that_leaves_nothing_to_learn_is_refused():
    recs = [{"prompt": "a" * 50, "response": "b"}, {"prompt": "c" * 60, "response": "d"}]
    dm = ListDataModule(recs, batch_schedule=ConstantBatchSize(1), max_length=40, truncate=True)
    with pytest.raises(ValueError, match=r"none of the 2 training records.*data\.max_length"):
        dm.setup("fit")


def test_tokenizer_source_string_is_loaded_lazily(monkeypatch):
    calls = []

    def fake_load(source):
        calls.append(source)
        return tiny_tokenizer()

    monkeypatch.setattr("lit_dp.models.load_tokenizer", fake_load)
    dm = ListDataModule(
        [qa(i) for i in range(4)], tokenizer="tiny-qwen2", batch_schedule=ConstantBatchSize(1)
    )
    assert calls == [] and dm.tokenizer is None
    dm.setup("fit")
    assert calls == ["tiny-qwen2"] and dm.tokenizer is not None


def test_disk_cache_is_reused_and_keyed_by_max_length(tmp_path, monkeypatch):
    recs = [qa(i) for i in range(6)]
    first = ListDataModule(recs, cache_dir=str(tmp_path), batch_schedule=ConstantBatchSize(1))
    first.setup("fit")
    assert len(list(tmp_path.glob("tokens-*.json"))) == 1

    def boom(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr("lit_dp.data.datamodule.encode_records", boom)
    again = ListDataModule(recs, cache_dir=str(tmp_path), batch_schedule=ConstantBatchSize(1))
    again.setup("fit")
    assert again.encoded == first.encoded
    with pytest.raises(AssertionError, match="tokenized again"):
        ListDataModule(
            recs, cache_dir=str(tmp_path), batch_schedule=ConstantBatchSize(1), max_length=64
        ).setup("fit")


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
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=bool(every),
        callbacks=cbs,
        default_root_dir=tmp_path,
    )
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


# --- synthetic -----------------------------------------------------------------------------
def test_synthetic_datamodule_with_canaries():
    dm = SyntheticDataModule(
        dataset="records",
        num_train=30,
        num_val=4,
        num_test=3,
        num_canaries=2,
        canary_repetitions=3,
        tokenizer=tiny_tokenizer(),
        batch_schedule=ConstantBatchSize(4),
        sampling_seed=0,
    )
    dm.setup("fit")
    assert dm.num_units == 36 and len(dm.canaries) == 2
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 36, "validation": 4, "test": 3}
    rep = dm.data_report()
    assert rep["dataset"] == "synthetic:records"
    assert rep["canaries"] == {"num_canaries": 2, "repetitions": 3}
    planted = [r for r in dm.splits["train"] if r["user"].startswith("canary-")]
    assert len(planted) == 6


def test_synthetic_group_units_are_users():
    dm = SyntheticDataModule(
        dataset="emails",
        num_train=40,
        num_val=0,
        num_test=0,
        tokenizer=tiny_tokenizer(),
        batch_schedule=ConstantBatchSize(2),
        privacy_unit="group",
        max_length=512,
    )
    dm.setup("fit")
    assert dm.num_units == len({r["user"] for r in dm.splits["train"]}) > 1
    assert dm.data_report()["group_key"] == "user"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"dataset": "news"}, "dataset"),
        ({"num_train": 0}, "empty"),
        ({"num_val": -1}, "num_val"),
        ({"num_canaries": -1}, "num_canaries"),
        ({"canary_repetitions": 0}, "canary_repetitions"),
        ({"num_users": 0}, "num_users"),
    ],
    ids=["dataset", "num-train", "num-val", "canaries", "repetitions", "users"],
)
def test_synthetic_bad_args(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SyntheticDataModule(tokenizer=tiny_tokenizer(), **kwargs)
