"""JSONLDataModule: errors that name the file and line, custom fields, group keys, validation
splits, and files written on Windows."""

from __future__ import annotations

import json

import pytest

from lit_dp.data import ConstantBatchSize, JSONLDataModule
from lit_dp.models import tiny_tokenizer


def qa(i, user=None):
    r = {"prompt": f"question {i}?", "response": f"answer {i}."}
    if user is not None:
        r["user"] = user
    return r


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def jsonl_dm(path, **kw):
    kw.setdefault("tokenizer", tiny_tokenizer())
    kw.setdefault("batch_schedule", ConstantBatchSize(1))
    kw.setdefault("sampling_seed", 0)
    return JSONLDataModule(train_path=path, **kw)


def test_jsonl_missing_file_fails_at_init(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match=r"data.train_path: file '.*nope\.jsonl' does not exist"):
        jsonl_dm(missing)
    ok = write_jsonl(tmp_path / "t.jsonl", [qa(0)])
    with pytest.raises(ValueError, match=r"data.val_path: .*nope\.jsonl"):
        jsonl_dm(ok, val_path=missing)


def test_jsonl_empty_file(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n  \n")
    with pytest.raises(ValueError, match=r"empty\.jsonl' is empty"):
        jsonl_dm(str(p)).setup("fit")


def test_jsonl_invalid_json(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", [qa(0), "{not json"])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2 is not valid JSON"):
        jsonl_dm(p).setup("fit")


def test_jsonl_line_not_an_object(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [qa(0), "[1, 2]"])
    with pytest.raises(ValueError, match=r"d\.jsonl:2 must be a JSON object"):
        jsonl_dm(p).setup("fit")


def test_jsonl_record_missing_field(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [qa(0), qa(1), {"prompt": "only a prompt", "id": 3}])
    with pytest.raises(
        ValueError,
        match=r"d\.jsonl:3 is missing string field 'response' "
        r"\(fields present: \['id', 'prompt'\]\)",
    ):
        jsonl_dm(p).setup("fit")


def test_jsonl_record_non_string_field(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": 5}])
    with pytest.raises(ValueError, match=r"d\.jsonl:1 has a non-string string field 'response'"):
        jsonl_dm(p).setup("fit")


def test_jsonl_record_without_any_field(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"foo": 1}])
    with pytest.raises(
        ValueError,
        match=r"d\.jsonl:1 has neither 'prompt'/'response' nor 'text' "
        r"\(fields present: \['foo'\]\)",
    ):
        jsonl_dm(p).setup("fit")


def test_jsonl_custom_fields_and_text(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"q": "a", "a": "b"}, {"body": "free text"}])
    dm = jsonl_dm(p, prompt_field="q", response_field="a", text_field="body", val_fraction=0.0)
    dm.setup("fit")
    assert dm.splits["train"] == [{"prompt": "a", "response": "b"}, {"text": "free text"}]
    assert dm.data_report()["dataset"] == f"jsonl:{p}"
    with pytest.raises(ValueError, match="must differ"):
        jsonl_dm(p, prompt_field="x", response_field="x")


def test_jsonl_group_without_group_key(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [qa(0, user="a")])
    with pytest.raises(ValueError, match=r"privacy_unit=group needs data.group_key"):
        jsonl_dm(p, privacy_unit="group")


def test_jsonl_group_record_missing_key(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [qa(0, user="a"), qa(1)])
    with pytest.raises(ValueError, match=r"d\.jsonl:2 is missing group_key field 'user'"):
        jsonl_dm(p, privacy_unit="group", group_key="user", val_fraction=0.0).setup("fit")


def test_jsonl_val_fraction_split_disjoint(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [qa(i) for i in range(20)])
    dm = jsonl_dm(p, val_fraction=0.25, split_seed=3)
    dm.setup("fit")
    train, val = dm.splits["train"], dm.splits["validation"]
    # Each record is held out alone by a keyed hash (tests/data/test_jsonl_split.py): about 25 %.
    assert train and val and len(train) + len(val) == 20
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in val)
    assert sorted(r["prompt"] for r in train + val) == sorted(qa(i)["prompt"] for i in range(20))


def test_jsonl_val_fraction_holds_out_whole_groups(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [qa(i, user=f"u{i % 5}") for i in range(20)])
    dm = jsonl_dm(p, val_fraction=0.4, privacy_unit="group", group_key="user")
    dm.setup("fit")
    train_users = {r["user"] for r in dm.splits["train"]}
    val_users = {r["user"] for r in dm.splits["validation"]}
    assert val_users and train_users and len(val_users) + len(train_users) == 5
    assert train_users.isdisjoint(val_users)
    assert len(dm.splits["validation"]) == 4 * len(val_users)
    assert dm.num_units == len(train_users)


def test_jsonl_val_and_test_paths_and_bad_fraction(tmp_path):
    tr = write_jsonl(tmp_path / "t.jsonl", [qa(i) for i in range(4)])
    va = write_jsonl(tmp_path / "v.jsonl", [qa(9)])
    te = write_jsonl(tmp_path / "e.jsonl", [{"text": "x"}, {"text": "y"}])
    dm = jsonl_dm(tr, val_path=va, test_path=te)
    dm.setup("fit")
    assert len(dm.splits["train"]) == 4 and dm.splits["validation"] == [qa(9)]
    assert [b["input_ids"].shape[0] for b in dm.test_dataloader()] == [2]
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="val_fraction"):
            jsonl_dm(tr, val_fraction=bad)


def test_jsonl_too_long_record_names_file_and_line(tmp_path):
    rows = [qa(0), "", {"prompt": "x" * 100, "response": "y"}, qa(1)]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(
        ValueError, match=r"train record 1 \(d\.jsonl:3\) has \d+ tokens > data.max_length=64"
    ):
        jsonl_dm(p, max_length=64, val_fraction=0.0).setup("fit")
    v = write_jsonl(tmp_path / "v.jsonl", [qa(2), {"text": "z" * 100}])
    with pytest.raises(ValueError, match=r"validation record 1 \(v\.jsonl:2\)"):
        jsonl_dm(write_jsonl(tmp_path / "t.jsonl", [qa(0)]), val_path=v, max_length=64).setup("fit")


def test_jsonl_unhashable_group_key(tmp_path):
    rows = [{**qa(i), "user": ["org", i % 2]} for i in range(4)]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    dm = jsonl_dm(p, privacy_unit="group", group_key="user", val_fraction=0.0)
    dm.setup("fit")
    assert dm.num_units == 2


@pytest.mark.parametrize(
    ("bom", "newline"),
    [(True, "\r\n"), (False, "\r\n"), (True, "\n"), (False, "\r")],
    ids=["bom-crlf", "crlf", "bom-lf", "cr"],
)
def test_jsonl_written_on_windows_reads_like_lf(tmp_path, bom, newline):
    """A byte-order mark and CRLF (or CR) line ends change nothing: same records, same line
    numbers as the LF file; U+2028 inside a string is not a line end."""
    records = [qa(0, user="a"), {"text": "line\u2028separator", "user": "b"}, qa(2, user="a")]
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    lf = tmp_path / "lf.jsonl"
    lf.write_bytes(("\n".join(lines[:2]) + "\n\n" + lines[2] + "\n").encode())
    win = tmp_path / "win.jsonl"
    text = newline.join(lines[:2]) + newline * 2 + lines[2] + newline
    win.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    from lit_dp.data.jsonl import read_jsonl

    got_lines, want_lines = [], []
    got = read_jsonl(win, group_key="user", line_numbers=got_lines)
    assert got == read_jsonl(lf, group_key="user", line_numbers=want_lines)
    assert got_lines == want_lines == [1, 2, 4]
    assert got[1]["text"] == "line\u2028separator" and got[0]["prompt"] == "question 0?"
    dm = jsonl_dm(str(win), val_fraction=0.0, privacy_unit="group", group_key="user")
    dm.setup("fit")
    assert dm.num_units == 2
