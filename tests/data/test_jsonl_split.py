"""The held-out validation split of a JSONL file (val_path: null): each privacy unit's split is
decided from that unit alone, so a file and the same file plus one unit give training sets that
differ by exactly that unit (the neighbouring relation epsilon is stated for)."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import warnings
from collections import Counter

import pytest

from lit_dp.data import ConstantBatchSize, JSONLDataModule
from lit_dp.models import tiny_tokenizer


def qa(i, user=None):
    r = {"prompt": f"question {i}?", "response": f"answer {i}."}
    if user is not None:
        r["user"] = user
    return r


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def jsonl_dm(path, **kw):
    kw.setdefault("tokenizer", tiny_tokenizer())
    kw.setdefault("batch_schedule", ConstantBatchSize(1))
    kw.setdefault("sampling_seed", 0)
    return JSONLDataModule(train_path=path, **kw)


def point(message: str, seed: int) -> float:
    """The documented rule, written out independently: HMAC-SHA256 keyed with the decimal seed,
    first 8 bytes as a big-endian integer / 2^64."""
    digest = hmac.new(str(seed).encode(), message.encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def canonical(record):
    """A prompt/response record as the split keys it: sorted keys, no spaces, UTF-8 kept."""
    fields = {"prompt": record["prompt"], "response": record["response"]}
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def as_multiset(records):
    return Counter(json.dumps(r, sort_keys=True) for r in records)


def fitted(path, **kw):
    dm = jsonl_dm(path, **kw)
    dm.setup("fit")
    return dm


def test_one_added_record_changes_only_its_own_split(tmp_path):
    """Example level: 500 records, then the same file with one new record in the middle (and k
    records moved to the end: file order plays no part). The two training sets are neighbours:
    they differ by exactly that record when it is trained on, and not at all when it is held
    out (both cases occur among the new records tried)."""
    rows = [qa(i) for i in range(500)]
    base = fitted(write_jsonl(tmp_path / "a.jsonl", rows), val_fraction=0.3, split_seed=5)
    placed = {"train": 0, "validation": 0}
    for k in range(8):
        new = {"prompt": f"a record added later, number {k}?", "response": "it moves nothing."}
        grown = fitted(
            write_jsonl(
                tmp_path / f"b{k}.jsonl", [*rows[:200], new, *rows[200 + k :], *rows[200 : 200 + k]]
            ),
            val_fraction=0.3,
            split_seed=5,
        )
        diff = {
            split: (
                as_multiset(grown.splits[split]) - as_multiset(base.splits[split]),
                as_multiset(base.splits[split]) - as_multiset(grown.splits[split]),
            )
            for split in ("train", "validation")
        }
        side = "train" if diff["train"][0] else "validation"
        other = "validation" if side == "train" else "train"
        assert diff[side] == (as_multiset([new]), Counter())  # exactly the new record
        assert diff[other] == (Counter(), Counter())  # nothing else moved
        assert grown.num_units - base.num_units == (side == "train")
        placed[side] += 1
    assert placed["train"] and placed["validation"]


def test_one_added_user_changes_only_that_users_split(tmp_path):
    """Group level: 150 users of 3 records, then the same file plus a new user's 4 records
    spread through it. The training sets differ by that user's records or not at all, in both
    directions of the split (the new user once held out, once trained on)."""
    rows = [qa(i, user=f"u{i % 150}") for i in range(450)]
    placed = {"train": 0, "validation": 0}
    for newcomer in ("newcomer-a", "newcomer-b", "newcomer-c", "newcomer-d", "newcomer-e"):
        theirs = [qa(f"{newcomer}-{k}", user=newcomer) for k in range(4)]
        grown_rows = list(rows)
        for k, rec in enumerate(theirs):  # records of one user need not be adjacent
            grown_rows.insert(100 * k + 7, rec)
        kw = dict(val_fraction=0.3, split_seed=11, privacy_unit="group", group_key="user")
        base = fitted(write_jsonl(tmp_path / "a.jsonl", rows), **kw)
        grown = fitted(write_jsonl(tmp_path / f"{newcomer}.jsonl", grown_rows), **kw)
        added = as_multiset(theirs)
        for split in ("train", "validation"):
            before, after = as_multiset(base.splits[split]), as_multiset(grown.splits[split])
            assert not before - after
            assert after - before in (Counter(), added)
        if as_multiset(grown.splits["train"]) - as_multiset(base.splits["train"]):
            placed["train"] += 1
            assert grown.num_units == base.num_units + 1
        else:
            placed["validation"] += 1
            assert grown.num_units == base.num_units
    assert placed["train"] and placed["validation"]  # both cases were exercised


@pytest.mark.parametrize(
    ("privacy_unit", "num_records", "records_per_unit"),
    [("example", 20000, 1), ("group", 12000, 3)],
    ids=["example", "group"],
)
def test_held_out_fraction_is_near_val_fraction(
    tmp_path, privacy_unit, num_records, records_per_unit
):
    """Each unit is held out with probability val_fraction: on many units the held-out share
    is within 5 binomial standard deviations of it."""
    num_units = num_records // records_per_unit
    rows = [qa(i, user=f"u{i % num_units}") for i in range(num_records)]
    kw = {"group_key": "user"} if privacy_unit == "group" else {}
    dm = jsonl_dm(
        write_jsonl(tmp_path / "d.jsonl", rows),
        val_fraction=0.1,
        split_seed=3,
        privacy_unit=privacy_unit,
        **kw,
    )
    splits = dm.load_records()
    n_train, _ = dm.units_and_schedule()
    held = num_units - n_train
    tolerance = 5 * math.sqrt(0.1 * 0.9 / num_units)
    assert abs(held / num_units - 0.1) < tolerance
    assert len(splits["validation"]) == held * records_per_unit


def test_the_split_is_the_documented_keyed_hash(tmp_path):
    """A user can recompute which records were held out: HMAC-SHA256 keyed with the decimal
    split seed over "example:" + the record's canonical JSON (or "group:" + the group value),
    first 8 bytes / 2^64 < val_fraction."""

    rows = [qa(i, user=f"ü{i % 7}") for i in range(60)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    dm = fitted(path, val_fraction=0.3, split_seed=42)
    want = [r for r in rows if point("example:" + canonical(r), 42) < 0.3]
    assert [r["prompt"] for r in dm.splits["validation"]] == [r["prompt"] for r in want]
    assert 0 < len(want) < len(rows)
    group = fitted(path, val_fraction=0.3, split_seed=42, privacy_unit="group", group_key="user")
    held_users = {f"ü{u}" for u in range(7) if point(f'group:"ü{u}"', 42) < 0.3}
    assert {r["user"] for r in group.splits["validation"]} == held_users
    assert {r["user"] for r in group.splits["train"]}.isdisjoint(held_users)


def test_identical_records_share_their_split(tmp_path):
    """Copies of one record are separate units but have the same key: every copy is held out
    or every copy is trained on, never one of each."""
    rows = [qa(i) for i in range(40)]
    dup = {"prompt": "the same question?", "response": "the same answer."}
    for at in (3, 17, 30):
        rows.insert(at, dup)
    key = json.dumps(dup, sort_keys=True)
    sides = set()
    for seed in range(12):
        dm = fitted(write_jsonl(tmp_path / "d.jsonl", rows), val_fraction=0.5, split_seed=seed)
        copies = {split: as_multiset(dm.splits[split])[key] for split in ("train", "validation")}
        assert sorted(copies.values()) == [0, 3]
        sides.add("train" if copies["train"] else "validation")
        if copies["train"]:
            assert dm.num_units == len(dm.splits["train"])  # each copy is its own unit
    assert sides == {"train", "validation"}


def test_split_seed_changes_the_split(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [qa(i) for i in range(200)])
    a = fitted(path, val_fraction=0.2, split_seed=0).splits["validation"]
    b = fitted(path, val_fraction=0.2, split_seed=1).splits["validation"]
    assert a and b and a != b


def test_tiny_file_without_held_out_unit_warns_and_all_held_out_is_refused(tmp_path):
    """With a keyed hash a tiny file may hold out no unit (a warning: no validation set) or,
    at a large fraction, every unit (an error naming val_fraction and the fixes)."""
    rows = [qa(i) for i in range(3)]
    path = write_jsonl(tmp_path / "tiny.jsonl", rows)
    held = {
        seed: sum(point("example:" + canonical(r), seed) < 0.5 for r in rows) for seed in range(64)
    }
    none_held = next(seed for seed, n in held.items() if n == 0)
    all_held = next(seed for seed, n in held.items() if n == 3)
    with pytest.warns(UserWarning, match=r"data.val_fraction=0.5 held out none .* data.val_path"):
        dm = fitted(path, val_fraction=0.5, split_seed=none_held)
    assert dm.splits["validation"] == [] and dm.num_units == 3
    with pytest.raises(ValueError, match=r"data.val_fraction=0.5: every privacy unit .*val_path"):
        fitted(path, val_fraction=0.5, split_seed=all_held)
    with warnings.catch_warnings():  # a split that holds out some units says nothing
        warnings.simplefilter("error")
        some = next(seed for seed, n in held.items() if 0 < n < 3)
        dm = fitted(path, val_fraction=0.5, split_seed=some)
        assert len(dm.splits["validation"]) == held[some]
