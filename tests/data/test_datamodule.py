"""DataModules: encoding/labels, collation, Poisson batches, privacy units, JSONL, resume."""

from __future__ import annotations

import json

import pytest
import torch

from lit_dp.data import DPDataModule, JSONLDataModule, SyntheticDataModule
from lit_dp.data.datamodule import collate_rows, encode_record
from lit_dp.models import tiny_tokenizer

BATCH_KEYS = {"input_ids", "attention_mask", "labels", "sample_rate", "step"}


@pytest.fixture
def tok():
    return tiny_tokenizer()


@pytest.fixture
def plain_tok():
    t = tiny_tokenizer()
    t.chat_template = None
    return t


class ListDataModule(DPDataModule):
    """In-memory records, for tests."""

    def __init__(self, train, validation=(), test=(), **kw):
        kw.setdefault("tokenizer", tiny_tokenizer())
        kw.setdefault("sampling_seed", 0)
        super().__init__(**kw)
        self.records = {"train": list(train), "validation": list(validation), "test": list(test)}

    def load_records(self):
        return {k: list(v) for k, v in self.records.items()}


def qa(i, user=None):
    r = {"prompt": f"question {i}?", "response": f"answer {i}."}
    if user is not None:
        r["user"] = user
    return r


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# --- encoding and collation ----------------------------------------------------------------
def test_chat_template_labels_decode_to_assistant_part(tok):
    ids, labels = encode_record(tok, {"prompt": "Hello there", "response": "General Kenobi"},
                                loss_on="response")
    assert len(ids) == len(labels)
    n_masked = sum(lab == -100 for lab in labels)
    assert n_masked > 0
    assert all(lab == -100 for lab in labels[:n_masked])  # masked prefix, then labeled
    assert labels[n_masked:] == ids[n_masked:]
    assert tok.decode(ids[n_masked:]) == "General Kenobi<|eos|>"
    assert "Hello there" in tok.decode(ids[:n_masked])


def test_no_template_labels_response_and_eos(plain_tok):
    ids, labels = encode_record(plain_tok, {"prompt": "abc", "response": "xyz"}, loss_on="response")
    assert plain_tok.decode(ids) == "abc\nxyz<|eos|>"
    assert ids[-1] == plain_tok.eos_token_id
    assert labels[:4] == [-100] * 4  # "abc\n", one byte per token
    assert labels[4:] == ids[4:]
    assert plain_tok.decode(labels[4:]) == "xyz<|eos|>"


def test_loss_on_all_labels_everything(plain_tok):
    ids, labels = encode_record(plain_tok, {"prompt": "abc", "response": "xyz"}, loss_on="all")
    assert labels == ids


@pytest.mark.parametrize("loss_on", ["response", "all"])
def test_text_record_loss_on_all_tokens(tok, loss_on):
    ids, labels = encode_record(tok, {"text": "plain text"}, loss_on=loss_on)
    assert labels == ids
    assert tok.decode(ids) == "plain text<|eos|>"


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


# --- sample rate and arguments -------------------------------------------------------------
def test_sample_rate_from_expected_batch_size():
    dm = ListDataModule([qa(i) for i in range(40)], expected_batch_size=4)
    dm.setup("fit")
    assert dm.num_units == 40
    assert dm.schedule.rate(0) == pytest.approx(0.1, abs=1e-12)
    assert dm.schedule_description()["sample_rate"] == pytest.approx(0.1, abs=1e-12)


def test_explicit_sample_rate():
    dm = ListDataModule([qa(i) for i in range(10)], expected_batch_size=None, sample_rate=0.3)
    dm.setup("fit")
    assert dm.schedule.rate(0) == 0.3


def test_linear_schedule_end_rate():
    dm = ListDataModule([qa(i) for i in range(20)], expected_batch_size=2, schedule="linear",
                        final_expected_batch_size=10, ramp_steps=4)
    dm.setup("fit")
    assert dm.schedule.rates(5) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5], abs=1e-12)


def test_expected_batch_size_above_n_raises():
    dm = ListDataModule([qa(i) for i in range(5)], expected_batch_size=6)
    with pytest.raises(ValueError, match="expected_batch_size"):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"expected_batch_size": None, "sample_rate": None}, "exactly one"),
        ({"expected_batch_size": 4, "sample_rate": 0.1}, "exactly one"),
        ({"expected_batch_size": 0}, "expected_batch_size"),
        ({"expected_batch_size": None, "sample_rate": 1.5}, "sample_rate"),
        ({"max_length": 1}, "max_length"),
        ({"privacy_unit": "user"}, "privacy_unit"),
        ({"schedule": "linear"}, "final_expected_batch_size"),
        ({"eval_batch_size": 0}, "eval_batch_size"),
    ],
    ids=["neither", "both", "ebs-zero", "rate-gt-1", "max-length", "privacy-unit",
         "linear-no-final", "eval-bs"],
)
def test_bad_args(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ListDataModule([qa(0)], **kwargs)


def test_empty_training_set_raises():
    with pytest.raises(ValueError, match="training set is empty"):
        ListDataModule([]).setup("fit")


def test_max_length_too_small_names_record():
    recs = [{"prompt": "a", "response": "b"}, {"prompt": "a" * 50, "response": "b"}]
    dm = ListDataModule(recs, expected_batch_size=1, max_length=40)
    with pytest.raises(ValueError, match=r"train record 1 .*max_length=40"):
        dm.setup("fit")


def test_truncate_counts_in_report():
    recs = [{"prompt": "a", "response": "b"}, {"prompt": "a" * 50, "response": "b"},
            {"text": "z" * 40}]
    dm = ListDataModule(recs, expected_batch_size=1, max_length=40, truncate=True)
    dm.setup("fit")
    rep = dm.data_report()
    assert rep["truncated"] == 2
    assert rep["max_length"] == 40 and rep["num_records"] == 3 and rep["num_units"] == 3
    assert all(len(ids) <= 40 and len(lab) == len(ids) for ids, lab in dm.encoded["train"])


# --- training batches ----------------------------------------------------------------------
def test_train_batches_keys_and_steps():
    dm = ListDataModule([qa(i) for i in range(30)], expected_batch_size=6)
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == 5  # ceil(1 / q)
    for t, b in enumerate(batches):
        assert set(b) == BATCH_KEYS
        assert b["step"] == t and b["sample_rate"] == pytest.approx(0.2, abs=1e-12)
        assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
        assert b["input_ids"].shape[0] == b["attention_mask"].sum(1).gt(0).sum()


def test_empty_train_batch():
    dm = ListDataModule([qa(i) for i in range(3)], expected_batch_size=None, sample_rate=1e-6)
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.poisson_sampler.steps_per_epoch = 3
    for b in loader:
        assert b["input_ids"].shape == (0, 1) and b["labels"].shape == (0, 1)


def test_group_units():
    users = ["u0", "u1", "u0", "u2", "u1", "u0"]
    recs = [qa(i, user=u) for i, u in enumerate(users)]
    dm = ListDataModule(recs, expected_batch_size=None, sample_rate=0.5, privacy_unit="group")
    dm.setup("fit")
    assert dm.num_units == 3
    rep = dm.data_report()
    assert rep["privacy_unit"] == "group" and rep["group_key"] == "user" and rep["num_records"] == 6
    sizes = [3, 2, 1]  # records per unit, in first-seen order u0, u1, u2
    loader = dm.train_dataloader()
    loader.poisson_sampler.steps_per_epoch = 20
    seen = set()
    for b in loader:
        assert set(b) == BATCH_KEYS | {"unit_ids"}
        uids = b["unit_ids"].tolist()
        assert len(uids) == b["input_ids"].shape[0]
        present = list(dict.fromkeys(uids))
        seen.update(present)
        for u in present:  # all records of a sampled group, contiguous
            assert uids.count(u) == sizes[u]
            first = uids.index(u)
            assert uids[first:first + sizes[u]] == [u] * sizes[u]
    assert seen == {0, 1, 2}


def test_group_privacy_needs_group_key():
    dm = ListDataModule([qa(0, user="a"), qa(1)], expected_batch_size=1, privacy_unit="group")
    with pytest.raises(ValueError, match=r"record 1 .*'user'"):
        dm.setup("fit")


def test_example_units_have_no_unit_ids():
    dm = ListDataModule([qa(i, user="a") for i in range(4)], expected_batch_size=None,
                        sample_rate=1.0)
    dm.setup("fit")
    (b,) = list(dm.train_dataloader())
    assert "unit_ids" not in b and b["input_ids"].shape[0] == 4


def test_loader_state_dict_resume():
    recs = [qa(i) for i in range(20)]
    ref_dm = ListDataModule(recs, expected_batch_size=5, sampling_seed=11)
    ref_dm.setup("fit")
    ref = {b["step"]: b for b in ref_dm.train_dataloader()}  # steps 0..3
    loader = ref_dm.train_dataloader()
    assert loader.state_dict() == {"next_step": 0, "seed": 11}

    dm = ListDataModule(recs, expected_batch_size=5, sampling_seed=999)
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.load_state_dict({"next_step": 2, "seed": 11})
    batches = list(loader)
    assert batches[0]["step"] == 2
    assert [b["step"] for b in batches] == [2, 3, 4, 5]
    for b in batches[:2]:
        for key in ("input_ids", "labels", "attention_mask"):
            assert torch.equal(b[key], ref[b["step"]][key])
    assert loader.state_dict() == {"next_step": 6, "seed": 11}


def test_eval_loaders_have_no_sample_rate():
    dm = ListDataModule([qa(i) for i in range(4)], validation=[qa(i) for i in range(5)],
                        expected_batch_size=1, eval_batch_size=2)
    dm.setup("fit")
    val = list(dm.val_dataloader())
    assert [b["input_ids"].shape[0] for b in val] == [2, 2, 1]
    for b in val:
        assert set(b) == {"input_ids", "attention_mask", "labels"}
    assert dm.test_dataloader() == []


# --- synthetic -----------------------------------------------------------------------------
def test_synthetic_datamodule_with_canaries():
    dm = SyntheticDataModule(dataset="records", num_train=30, num_val=4, num_test=3,
                             num_canaries=2, canary_repetitions=3, tokenizer=tiny_tokenizer(),
                             expected_batch_size=4, sampling_seed=0)
    dm.setup("fit")
    assert dm.num_units == 36 and len(dm.canaries) == 2
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 36, "validation": 4, "test": 3}
    assert dm.data_report()["dataset"] == "synthetic:records"
    planted = [r for r in dm.splits["train"] if r["user"].startswith("canary-")]
    assert len(planted) == 6


def test_synthetic_group_units_are_users():
    dm = SyntheticDataModule(dataset="emails", num_train=40, num_val=0, num_test=0,
                             tokenizer=tiny_tokenizer(), expected_batch_size=2,
                             privacy_unit="group", max_length=512)
    dm.setup("fit")
    assert dm.num_units == len({r["user"] for r in dm.splits["train"]}) > 1


# --- JSONL ---------------------------------------------------------------------------------
def jsonl_dm(path, **kw):
    kw.setdefault("tokenizer", tiny_tokenizer())
    kw.setdefault("expected_batch_size", 1)
    kw.setdefault("sampling_seed", 0)
    return JSONLDataModule(train_path=path, **kw)


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        jsonl_dm(str(tmp_path / "nope.jsonl")).setup("fit")


def test_jsonl_empty_file(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n  \n")
    with pytest.raises(ValueError, match="empty"):
        jsonl_dm(str(p)).setup("fit")


def test_jsonl_invalid_json(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", [qa(0), "{not json"])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2 is not valid JSON"):
        jsonl_dm(p).setup("fit")


def test_jsonl_record_missing_field(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [qa(0), qa(1), {"prompt": "only a prompt"}])
    with pytest.raises(ValueError, match=r"d\.jsonl:3 is missing string field 'response'"):
        jsonl_dm(p).setup("fit")


def test_jsonl_record_without_any_field(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"foo": 1}])
    with pytest.raises(ValueError, match=r"d\.jsonl:1 has neither 'prompt'/'response' nor 'text'"):
        jsonl_dm(p).setup("fit")


def test_jsonl_custom_fields_and_text(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"q": "a", "a": "b"}, {"body": "free text"}])
    dm = jsonl_dm(p, prompt_field="q", response_field="a", text_field="body", val_fraction=0.0)
    dm.setup("fit")
    assert dm.splits["train"] == [{"prompt": "a", "response": "b"}, {"text": "free text"}]


def test_jsonl_group_without_group_key(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [qa(0, user="a"), qa(1)])
    with pytest.raises(ValueError, match=r"d\.jsonl:2 is missing group_key field 'user'"):
        jsonl_dm(p, privacy_unit="group", val_fraction=0.0).setup("fit")


def test_jsonl_val_fraction_split_disjoint(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [qa(i) for i in range(20)])
    dm = jsonl_dm(p, val_fraction=0.25, split_seed=3)
    dm.setup("fit")
    train, val = dm.splits["train"], dm.splits["validation"]
    assert len(train) == 15 and len(val) == 5
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in val)
    assert sorted(r["prompt"] for r in train + val) == sorted(qa(i)["prompt"] for i in range(20))


def test_jsonl_val_fraction_holds_out_whole_groups(tmp_path):
    rows = [qa(i, user=f"u{i % 5}") for i in range(20)]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    dm = jsonl_dm(p, val_fraction=0.4, privacy_unit="group")
    dm.setup("fit")
    train_users = {r["user"] for r in dm.splits["train"]}
    val_users = {r["user"] for r in dm.splits["validation"]}
    assert len(val_users) == 2 and len(train_users) == 3
    assert train_users.isdisjoint(val_users)
    assert len(dm.splits["validation"]) == 8 and dm.num_units == 3


def test_jsonl_val_path_and_bad_fraction(tmp_path):
    tr = write_jsonl(tmp_path / "t.jsonl", [qa(i) for i in range(4)])
    va = write_jsonl(tmp_path / "v.jsonl", [qa(9)])
    dm = jsonl_dm(tr, val_path=va)
    dm.setup("fit")
    assert len(dm.splits["train"]) == 4 and dm.splits["validation"] == [qa(9)]
    with pytest.raises(ValueError, match="val_fraction"):
        jsonl_dm(tr, val_fraction=1.0)


def test_jsonl_unhashable_group_key(tmp_path):
    rows = [{**qa(i), "user": ["org", i % 2]} for i in range(4)]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    dm = jsonl_dm(p, privacy_unit="group", val_fraction=0.0)
    dm.setup("fit")
    assert dm.num_units == 2
