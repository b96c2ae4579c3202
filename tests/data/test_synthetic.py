"""Synthetic generators: determinism, splits, record shape, users and styles, canaries."""

from __future__ import annotations

import re
from collections import defaultdict

import pytest

from lit_dp.data.synthetic import (
    CANARY_PREFIX,
    CANARY_PROMPT,
    QUESTIONS,
    generate,
    make_splits,
    plant_canaries,
)

DATASETS = ["emails", "records"]


@pytest.mark.parametrize("dataset", DATASETS)
def test_deterministic_per_seed(dataset):
    assert generate(dataset, num_records=20, seed=3) == generate(dataset, num_records=20, seed=3)
    assert generate(dataset, num_records=20, seed=3) != generate(dataset, num_records=20, seed=4)


@pytest.mark.parametrize("dataset", DATASETS)
def test_records_have_fields_and_distinct_prompts(dataset):
    recs = generate(dataset, num_records=300, seed=0)
    assert len(recs) == 300
    for r in recs:
        assert set(r) == {"prompt", "response", "user"}
        assert all(isinstance(v, str) and v for v in r.values())
    assert len({r["prompt"] for r in recs}) == 300
    # Short enough for the byte-level tiny config (max_length 512, chat template included).
    assert max(len(r["prompt"]) + len(r["response"]) for r in recs) < 450


def test_emails_are_varied_and_carry_details():
    recs = generate("emails", num_records=400, seed=1)
    subjects = {re.search(r"Subject: (.*)", r["prompt"]).group(1).split()[0] for r in recs}
    assert len(subjects) >= 10  # many templates, not a handful
    assert any(re.search(r"\d{3}", r["prompt"]) for r in recs)  # phone numbers, amounts, codes
    for r in recs:
        assert r["prompt"].startswith("From: ") and "\nSubject: " in r["prompt"]
        owner_first = r["user"].split()[0]
        assert f"To: {r['user']}" in r["prompt"] and owner_first in r["prompt"]


def test_each_mailbox_owner_has_a_consistent_style():
    recs = generate("emails", num_records=200, seed=0)
    by_user = defaultdict(list)
    for r in recs:
        by_user[r["user"]].append(r["response"])
    assert len(by_user) == 25  # default: about 8 emails per owner
    styles = set()
    for replies in by_user.values():
        closings = {reply.rsplit("\n", 1)[-1] for reply in replies}  # the sign-off's last line
        assert len(closings) == 1
        styles.add(next(iter(closings)))
    assert len(styles) > 5  # owners differ from each other


def test_records_answer_about_the_person_in_the_question():
    recs = generate("records", num_records=120, seed=2)
    assert len({r["user"] for r in recs}) == 30  # default: about 4 facts per person
    for r in recs:
        assert r["user"] in r["prompt"] and r["user"] in r["response"]
    account = [r for r in recs if "account number" in r["prompt"]]
    assert account and all(re.search(r"\b\d{9}\b", r["response"]) for r in account)


def test_num_users():
    assert len({r["user"] for r in generate("emails", num_records=50, seed=0, num_users=3)}) == 3
    assert len({r["user"] for r in generate("records", num_records=50, seed=0, num_users=10)}) == 10
    with pytest.raises(ValueError, match="num_users"):
        generate("records", num_records=50, seed=0, num_users=5)  # 5 people x 7 facts < 50
    with pytest.raises(ValueError, match="num_users"):
        generate("emails", num_records=5, seed=0, num_users=0)
    assert len(QUESTIONS) == 7


@pytest.mark.parametrize("dataset", DATASETS)
def test_make_splits_sizes_and_disjoint(dataset):
    s = make_splits(dataset, num_train=40, num_val=10, num_test=7, seed=1)
    assert {k: len(v) for k, v in s.items()} == {"train": 40, "validation": 10, "test": 7}
    prompts = [{r["prompt"] for r in s[k]} for k in ("train", "validation", "test")]
    assert sum(len(p) for p in prompts) == 57  # distinct within and across splits
    assert prompts[0].isdisjoint(prompts[1]) and prompts[0].isdisjoint(prompts[2])
    assert prompts[1].isdisjoint(prompts[2])
    assert s == make_splits(dataset, num_train=40, num_val=10, num_test=7, seed=1)
    assert s != make_splits(dataset, num_train=40, num_val=10, num_test=7, seed=2)


def test_bad_args():
    with pytest.raises(ValueError, match="dataset"):
        generate("nope", num_records=1, seed=0)
    with pytest.raises(ValueError, match="num_records"):
        generate("emails", num_records=-1, seed=0)
    with pytest.raises(ValueError, match="num_val"):
        make_splits("emails", num_train=1, num_val=-1, num_test=0, seed=0)


@pytest.mark.parametrize(("num", "reps"), [(3, 1), (2, 4)], ids=["3x1", "2x4"])
def test_canaries_planted(num, reps):
    base = generate("records", num_records=25, seed=0)
    out, canaries = plant_canaries(base, num_canaries=num, repetitions=reps, seed=2)
    assert len(out) == len(base) + num * reps
    assert base == generate("records", num_records=25, seed=0)  # input not mutated
    assert len(canaries) == num
    assert len({c["secret"] for c in canaries}) == num
    for i, c in enumerate(canaries):
        assert set(c) == {"secret", "prefix", "text", "prompt", "repetitions", "user", "num_digits"}
        assert re.fullmatch(r"\d{9}", c["secret"]) and c["num_digits"] == 9
        assert c["prefix"] == CANARY_PREFIX and c["prompt"] == CANARY_PROMPT
        assert c["text"] == CANARY_PREFIX + c["secret"] + "."
        assert c["repetitions"] == reps
        assert c["user"] == f"canary-{i}"
        copies = [r for r in out if r["response"] == c["text"]]
        assert len(copies) == reps
        assert all(
            r == {"prompt": c["prompt"], "response": c["text"], "user": c["user"]} for r in copies
        )
    planted = [r for r in out if any(c["secret"] in r["response"] for c in canaries)]
    assert len(planted) == num * reps
    # Original records keep their order.
    assert [r for r in out if not r["user"].startswith("canary-")] == base
    assert plant_canaries(base, num_canaries=num, repetitions=reps, seed=2) == (out, canaries)


def test_canary_template_and_digits():
    out, (c,) = plant_canaries(
        [],
        num_canaries=1,
        repetitions=2,
        seed=0,
        template="The vault code of Ana is {secret}, keep it.",
        num_digits=6,
    )
    assert c["prefix"] == "The vault code of Ana is "
    assert re.fullmatch(r"\d{6}", c["secret"])
    assert c["text"] == f"The vault code of Ana is {c['secret']}, keep it."
    assert [r["response"] for r in out] == [c["text"]] * 2


def test_canaries_bad_args():
    with pytest.raises(ValueError, match="repetitions"):
        plant_canaries([], num_canaries=1, repetitions=0, seed=0)
    with pytest.raises(ValueError, match="num_canaries"):
        plant_canaries([], num_canaries=-1, repetitions=1, seed=0)
    with pytest.raises(ValueError, match="template"):
        plant_canaries([], num_canaries=1, repetitions=1, seed=0, template="no slot")
    with pytest.raises(ValueError, match="num_digits"):
        plant_canaries([], num_canaries=20, repetitions=1, seed=0, num_digits=1)
