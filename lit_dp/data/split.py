"""The held-out validation split of a training file, decided for each privacy unit alone.

A unit is held out iff

    HMAC-SHA256(key = str(split_seed), msg = unit key)[:8], read as a big-endian integer / 2^64,

is below ``val_fraction``. The unit key is ``"group:" + json(group value)`` at user level and
``"example:" + json(record)`` at example level (the record as read: {prompt, response} or
{text}; JSON with sorted keys, no spaces, non-ASCII kept as is).

Why per unit: shuffling the list of units and cutting it moves other units between the splits
whenever one unit is added or removed (the list length changes), so a file and that file plus
one record would give training sets that differ in many units, and the per-unit epsilon would
not describe the file the user holds. Here adding or removing a unit changes that unit's split
only. Identical records have the same key, so every copy lands in the same split (a record never
trains while its copy is scored as held-out data); each copy is still its own unit.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

__all__ = ["split_point", "split_units", "unit_split_key"]


def unit_split_key(record: dict[str, Any], group_key: str | None) -> bytes:
    """The bytes a unit's split is decided from: its group value, or the whole record."""
    if group_key is not None:
        kind, value = "group", record[group_key]
    else:
        kind, value = "example", record
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return f"{kind}:{text}".encode()


def split_point(key: bytes, *, split_seed: int) -> float:
    """The unit's point in [0, 1): the first 8 bytes of HMAC-SHA256(str(split_seed), key)."""
    digest = hmac.new(str(int(split_seed)).encode(), key, hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_units(
    records: list[dict[str, Any]],
    *,
    group_key: str | None,
    split_seed: int,
    val_fraction: float,
) -> set[int]:
    """Indices of the records held out for validation (whole units; see the module docstring).

    Args:
        records: the training file's records, in file order.
        group_key: the record field naming the unit at user level; None at example level.
        split_seed: the HMAC key (as its decimal string).
        val_fraction: a unit is held out iff its point is below this, in [0, 1).
    """
    held: set[int] = set()
    points: dict[bytes, float] = {}  # unit key -> point: each unit hashed once
    for i, rec in enumerate(records):
        key = unit_split_key(rec, group_key)
        if key not in points:
            points[key] = split_point(key, split_seed=split_seed)
        if points[key] < val_fraction:
            held.add(i)
    return held
