"""Synthetic generators: determinism, splits, record shape, canaries."""

from __future__ import annotations

import re

import pytest

from lit_dp.data.synthetic import CANARY_PREFIX, generate, make_splits, plant_canaries

DATASETS = ["emails", "records"]


@pytest.mark.parametrize("dataset", DATASETS)
def test_deterministic_per_seed(dataset):
    assert generate(dataset, num_records=20, seed=3) == generate(dataset, num_records=20, seed=3)
    assert generate(dataset, num_records=20, seed=3) != generate(dataset, num_records=20, seed=4)


@pytest.mark.parametrize("dataset", DATASETS)
def test_records_have_fields(dataset):
    recs = generate(dataset, num_records=30, seed=0)
    assert len(recs) == 30
    for r in recs:
        assert set(r) == {"prompt", "response", "user"}
        assert all(isinstance(v, str) and v for v in r.values())


def test_emails_have_several_users():
    users = {r["user"] for r in generate("emails", num_records=100, seed=0)}
    assert len(users) >= 3


@pytest.mark.parametrize("dataset", DATASETS)
def test_make_splits_sizes_and_disjoint(dataset):
    s = make_splits(dataset, num_train=40, num_val=10, num_test=7, seed=1)
    assert {k: len(v) for k, v in s.items()} == {"train": 40, "validation": 10, "test": 7}
    prompts = [{r["prompt"] for r in s[k]} for k in ("train", "validation", "test")]
    assert sum(len(p) for p in prompts) == 57  # distinct within and across splits
    assert prompts[0].isdisjoint(prompts[1]) and prompts[0].isdisjoint(prompts[2])
    assert prompts[1].isdisjoint(prompts[2])
    assert s == make_splits(dataset, num_train=40, num_val=10, num_test=7, seed=1)


def test_generate_bad_args():
    with pytest.raises(ValueError, match="dataset"):
        generate("nope", num_records=1, seed=0)
    with pytest.raises(ValueError, match="num_records"):
        generate("emails", num_records=-1, seed=0)


@pytest.mark.parametrize(("num", "reps"), [(3, 1), (2, 4)], ids=["3x1", "2x4"])
def test_canaries_planted(num, reps):
    base = generate("records", num_records=25, seed=0)
    out, canaries = plant_canaries(base, num_canaries=num, repetitions=reps, seed=2)
    assert len(out) == len(base) + num * reps
    assert base == generate("records", num_records=25, seed=0)  # input not mutated
    assert len(canaries) == num
    for i, c in enumerate(canaries):
        assert set(c) == {"secret", "prefix", "text", "repetitions", "user"}
        assert re.fullmatch(r"\d{9}", c["secret"])
        assert c["prefix"] == CANARY_PREFIX
        assert c["text"] == CANARY_PREFIX + c["secret"] + "."
        assert c["repetitions"] == reps
        assert c["user"] == f"canary-{i}"
        copies = [r for r in out if r["response"] == c["text"]]
        assert len(copies) == reps
        assert all(r["user"] == c["user"] for r in copies)
    planted = [r for r in out if any(c["secret"] in r["response"] for c in canaries)]
    assert len(planted) == num * reps
    # Original records keep their order.
    assert [r for r in out if not r["user"].startswith("canary-")] == base
    assert plant_canaries(base, num_canaries=num, repetitions=reps, seed=2) == (out, canaries)


def test_canaries_bad_args():
    with pytest.raises(ValueError, match="repetitions"):
        plant_canaries([], num_canaries=1, repetitions=0, seed=0)
    with pytest.raises(ValueError, match="num_canaries"):
        plant_canaries([], num_canaries=-1, repetitions=1, seed=0)
