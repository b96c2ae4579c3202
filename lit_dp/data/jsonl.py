"""The user's own data: JSONL files of prompt/response (or text) records."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from lit_dp.data.datamodule import DPDataModule
from lit_dp.data.split import split_units


def _check_file(path: str | Path, field: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"data.{field}: file {str(p)!r} does not exist; check the path")
    return p


def jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a JSONL file as any editor writes it.

    UTF-8 with or without a byte-order mark (Windows tools add one), lines ended by LF, CRLF or CR.
    Only those three end a line (U+2028 inside a JSON string does not); blank lines are skipped.
    """
    with path.open(encoding="utf-8-sig", newline=None) as fh:  # newline=None: any line end
        for lineno, line in enumerate(fh, start=1):
            if line.strip():
                yield lineno, line


def read_jsonl(
    path: str | Path,
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    text_field: str = "text",
    group_key: str | None = None,
    field: str = "train_path",
    line_numbers: list[int] | None = None,
) -> list[dict[str, Any]]:
    """Records of one JSONL file, normalized to {prompt, response} or {text} (+ group key).

    A line with ``prompt_field`` or ``response_field`` must have both as strings; otherwise it
    must have ``text_field``. Files written on Windows (byte-order mark, CRLF) read as any other;
    blank lines are skipped; ``line_numbers``, if given, receives each record's line number.
    Raises ValueError naming the file, line
    and field (and the fields present) for anything that cannot be trained on.
    """
    p = _check_file(path, field)
    records = []
    for lineno, line in jsonl_lines(p):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"data: {p}:{lineno} is not valid JSON ({err.msg}, column {err.colno})"
            ) from err
        if not isinstance(obj, dict):
            raise ValueError(f"data: {p}:{lineno} must be a JSON object, got {type(obj).__name__}")
        where = f"data: {p}:{lineno}"
        if prompt_field in obj or response_field in obj:
            for name in (prompt_field, response_field):
                if not isinstance(obj.get(name), str):
                    what = "is missing" if name not in obj else "has a non-string"
                    raise ValueError(
                        f"{where} {what} string field {name!r} (fields present: "
                        f"{sorted(obj)}); set data.prompt_field/response_field"
                    )
            rec: dict[str, Any] = {"prompt": obj[prompt_field], "response": obj[response_field]}
        elif isinstance(obj.get(text_field), str):
            rec = {"text": obj[text_field]}
        else:
            raise ValueError(
                f"{where} has neither {prompt_field!r}/{response_field!r} nor {text_field!r} "
                f"(fields present: {sorted(obj)}); set data.prompt_field/response_field/text_field"
            )
        if group_key is not None:
            if group_key not in obj:
                raise ValueError(
                    f"{where} is missing group_key field {group_key!r} "
                    f"(fields present: {sorted(obj)})"
                )
            rec[group_key] = obj[group_key]
        records.append(rec)
        if line_numbers is not None:
            line_numbers.append(lineno)
    if not records:
        raise ValueError(
            f"data.{field}: file {str(p)!r} is empty; it needs at least one JSON record"
        )
    return records


class JSONLDataModule(DPDataModule):
    """JSONL training data; one JSON object per line.

    Records are prompt/response (loss on the response) or text (loss on all tokens).

    Args:
        train_path: training records.
        val_path: validation records; null holds out about val_fraction of the training file's
            privacy units (whole groups with privacy_unit: group), each unit decided alone by a
            keyed hash of its key (``lit_dp.data.split``), so adding or removing one unit moves
            no other unit between the splits. Held-out records are private data too: epsilon
            does not cover their logged validation loss.
        test_path: test records (optional).
        val_fraction: expected fraction of the training units held out when val_path is null,
            in [0, 1) (each unit is held out with this probability over split seeds).
        prompt_field: JSON field holding the prompt.
        response_field: JSON field holding the response.
        text_field: JSON field of plain-text records.
        group_key: JSON field naming the user/group; required for privacy_unit: group.
        split_seed: key of the keyed hash that decides the held-out validation split.
        **kwargs: the common arguments of DPDataModule.
    """

    def __init__(
        self,
        train_path: str,
        val_path: str | None = None,
        test_path: str | None = None,
        val_fraction: float = 0.1,
        prompt_field: str = "prompt",
        response_field: str = "response",
        text_field: str = "text",
        group_key: str | None = None,
        split_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(group_key=group_key, **kwargs)
        for name, path in (
            ("train_path", train_path),
            ("val_path", val_path),
            ("test_path", test_path),
        ):
            if path is not None:
                _check_file(path, name)  # fail before any model is loaded
        if isinstance(val_fraction, bool) or not 0.0 <= val_fraction < 1.0:
            raise ValueError(
                f"data.val_fraction={val_fraction!r} must be in [0, 1); 0 = no "
                "validation split, or give data.val_path"
            )
        names = {
            "prompt_field": prompt_field,
            "response_field": response_field,
            "text_field": text_field,
        }
        for name, value in names.items():
            if not isinstance(value, str) or not value:
                raise ValueError(f"data.{name}={value!r} must be a non-empty JSON field name")
        if len(set(names.values())) < 3:
            raise ValueError(
                f"data.prompt_field, response_field and text_field must differ: {names}"
            )
        self.train_path, self.val_path, self.test_path = train_path, val_path, test_path
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.fields = names
        self._where: dict[str, list[str]] = {}  # split -> "file:line" of each record

    def record_location(self, split: str, index: int) -> str:
        where = self._where.get(split)
        return (
            f"{split} record {index} ({where[index]})"
            if where
            else super().record_location(split, index)
        )

    def dataset_name(self) -> str:
        return f"jsonl:{self.train_path}"

    def _read(self, path: str, field: str) -> tuple[list[dict[str, Any]], list[str]]:
        key = self.group_key if self.privacy_unit == "group" else None
        lines: list[int] = []
        records = read_jsonl(path, group_key=key, field=field, line_numbers=lines, **self.fields)
        return records, [f"{Path(path).name}:{n}" for n in lines]

    def load_records(self) -> dict[str, list[dict[str, Any]]]:
        train, train_at = self._read(self.train_path, "train_path")
        val: list[dict[str, Any]] = []
        val_at: list[str] = []
        if self.val_path is not None:
            val, val_at = self._read(self.val_path, "val_path")
        else:
            val, val_at, train, train_at = self._hold_out(train, train_at)
        test, test_at = (
            self._read(self.test_path, "test_path") if self.test_path is not None else ([], [])
        )
        self._where = {"train": train_at, "validation": val_at, "test": test_at}
        return {"train": train, "validation": val, "test": test}

    def _hold_out(
        self, train: list[dict[str, Any]], train_at: list[str]
    ) -> tuple[list[dict[str, Any]], list[str], list[dict[str, Any]], list[str]]:
        """(validation, its locations, training, its locations): whole units held out."""
        key = self.group_key if self.privacy_unit == "group" else None
        held = split_units(
            train, group_key=key, split_seed=self.split_seed, val_fraction=self.val_fraction
        )
        kept = [i for i in range(len(train)) if i not in held]
        if not kept:
            raise ValueError(
                f"data.val_fraction={self.val_fraction}: every privacy unit of "
                f"{self.train_path!r} was held out for validation (each unit is held out by a "
                "keyed hash, so a tiny file can lose all of them); lower data.val_fraction, set "
                "data.val_fraction: 0, or give data.val_path"
            )
        if self.val_fraction > 0 and not held:
            rank_zero_warn(
                f"data.val_fraction={self.val_fraction} held out none of the training file's "
                "privacy units (each unit is held out alone, by a keyed hash, with probability "
                "val_fraction): the run has no validation set; give data.val_path, raise "
                "data.val_fraction, or set it to 0 to silence this"
            )
        rows = sorted(held)
        return (
            [train[i] for i in rows],
            [train_at[i] for i in rows],
            [train[i] for i in kept],
            [train_at[i] for i in kept],
        )

    def not_covered(self) -> list[str]:
        """What the privacy report lists as not covered because of this data's splits."""
        if self.val_path is not None or self.val_fraction == 0:
            return []
        return [
            "validation loss/perplexity logs: the held-out validation records come from the "
            # No path here: the report's covers/not_covered lists go into the shareable copy.
            f"private training file (data.val_fraction={self.val_fraction}), are "
            "scored without noise and are not covered by epsilon, which protects the training "
            "units only"
        ]
