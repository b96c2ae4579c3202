"""DataModule setup: the sample-rate schedule and N, argument checks, records -> tokens
(empty training set, too long records, truncation, lazy tokenizer loading, disk cache), the data
report, and the synthetic DataModule (training batches and resume: test_datamodule.py)."""

from __future__ import annotations

import pytest
from datamodule_helpers import ListDataModule, qa

from lit_dp.data import (
    ConstantBatchSize,
    ConstantSampleRate,
    LinearBatchSizeRamp,
    LinearSampleRateRamp,
    SyntheticDataModule,
)
from lit_dp.models import tiny_tokenizer


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
        pytest.param(
            {"batch_schedule": ConstantBatchSize(2), "privacy_unit": "group", "group_key": "user"},
            id="group",
        ),
        pytest.param(
            {"batch_schedule": LinearSampleRateRamp(start_rate=0.4, end_rate=0.2, ramp_steps=2)},
            id="linear-rates",
        ),
    ],
)
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


# --- records -> tokens: empty set, truncation, tokenizer, cache ----------------------------
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
