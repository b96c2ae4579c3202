"""Argument checks of the DataModules, run when one is built (before any record is read).

Each refusal is a ``ValueError`` that names the field it refuses (``data.<name>=<value>``) and
what it must be. The batch schedules check their own fields (``lit_dp.data.batch_schedule``).
"""

from __future__ import annotations

from typing import Any

from lit_dp.data.batch_schedule import BatchSchedule


def check_number(
    name: str,
    value: Any,
    *,
    allow_none: bool = True,
    integer: bool = False,
    minimum: float = 0.0,
    strict: bool = True,
) -> None:
    """Refuse ``data.<name>`` unless it is a number above ``minimum``, or None with ``allow_none``.

    The number must be an integer with ``integer``; it may equal ``minimum`` without ``strict``.
    Booleans and NaN are refused.
    """
    if value is None and allow_none:
        return
    bad = value is None or isinstance(value, bool) or not isinstance(value, int | float)
    bad = bad or (integer and not isinstance(value, int))
    if bad or not (value > minimum if strict else value >= minimum) or value != value:
        kind = "an integer" if integer else "a number"
        raise ValueError(
            f"data.{name}={value!r} must be {kind} {'>' if strict else '>='} {minimum:g}"
        )


def check_common_args(
    *,
    tokenizer: Any,
    max_length: Any,
    batch_schedule: Any,
    steps_per_epoch: Any,
    sampling_seed: Any,
    privacy_unit: Any,
    group_key: Any,
    eval_batch_size: Any,
    loss_on: Any,
    truncate: Any,
    num_workers: Any,
) -> None:
    """The checks of ``DPDataModule``'s arguments (see its docstring), in argument order."""
    if isinstance(tokenizer, str) and not tokenizer.strip():
        raise ValueError("data.tokenizer is empty; give a model source or a tokenizer object")
    if tokenizer is None or (not isinstance(tokenizer, str) and not callable(tokenizer)):
        raise ValueError(
            f"data.tokenizer={tokenizer!r} must be a tokenizer or a model source string"
        )
    check_number("max_length", max_length, allow_none=False, integer=True, minimum=2, strict=False)
    if batch_schedule is not None and not isinstance(batch_schedule, BatchSchedule):
        raise ValueError(
            f"data.batch_schedule={batch_schedule!r} must be a batch schedule, e.g. "
            "lit_dp.data.ConstantBatchSize(expected_batch_size=16) or "
            "ConstantSampleRate(sample_rate=0.01)"
        )
    check_number("steps_per_epoch", steps_per_epoch, integer=True, minimum=1, strict=False)
    if sampling_seed is not None and (
        isinstance(sampling_seed, bool) or not isinstance(sampling_seed, int)
    ):
        raise ValueError(f"data.sampling_seed={sampling_seed!r} must be an integer or null")
    if privacy_unit not in ("example", "group"):
        raise ValueError(f"data.privacy_unit={privacy_unit!r} must be 'example' or 'group'")
    if privacy_unit == "group" and not group_key:
        raise ValueError(
            "data.privacy_unit=group needs data.group_key (the record field "
            "naming the user/group, e.g. group_key: user)"
        )
    check_number(
        "eval_batch_size",
        eval_batch_size,
        allow_none=False,
        integer=True,
        minimum=1,
        strict=False,
    )
    if loss_on not in ("response", "all"):
        raise ValueError(f"data.loss_on={loss_on!r} must be 'response' or 'all'")
    if not isinstance(truncate, bool):
        raise ValueError(f"data.truncate={truncate!r} must be true or false")
    check_number("num_workers", num_workers, allow_none=False, integer=True, strict=False)


def check_synthetic_args(
    *,
    dataset: Any,
    num_train: Any,
    num_val: Any,
    num_test: Any,
    num_users: Any,
    num_canaries: Any,
    canary_repetitions: Any,
) -> None:
    """The checks of ``SyntheticDataModule``'s own arguments (see its docstring)."""
    if dataset not in ("emails", "records"):
        raise ValueError(f"data.dataset={dataset!r} must be 'emails' or 'records'")
    if isinstance(num_train, bool) or not isinstance(num_train, int) or num_train < 1:
        raise ValueError(f"data.num_train={num_train!r}: the training set is empty; use >= 1")
    check_number("num_val", num_val, allow_none=False, integer=True, strict=False)
    check_number("num_test", num_test, allow_none=False, integer=True, strict=False)
    check_number("num_users", num_users, integer=True, minimum=1, strict=False)
    check_number("num_canaries", num_canaries, allow_none=False, integer=True, strict=False)
    check_number(
        "canary_repetitions",
        canary_repetitions,
        allow_none=False,
        integer=True,
        minimum=1,
        strict=False,
    )
