"""The user's own data: JSONL files of prompt/response (or text) records."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from lit_dp.data.datamodule import DPDataModule


def read_jsonl(path: str | Path, *, prompt_field: str, response_field: str, text_field: str,
               group_key: str | None) -> list[dict[str, Any]]:
    """Records of one JSONL file, normalized to {prompt, response} or {text} (+ group key).

    Raises ValueError naming the file, line and field for anything that cannot be trained on.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"data: file {str(p)!r} does not exist; check the path")
    records = []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"data: {p}:{lineno} is not valid JSON ({err.msg})") from err
            if not isinstance(obj, dict):
                raise ValueError(f"data: {p}:{lineno} must be a JSON object")
            if prompt_field in obj or response_field in obj:
                for field in (prompt_field, response_field):
                    if not isinstance(obj.get(field), str):
                        raise ValueError(
                            f"data: {p}:{lineno} is missing string field {field!r} "
                            f"(fields present: {sorted(obj)})"
                        )
                rec: dict[str, Any] = {"prompt": obj[prompt_field], "response": obj[response_field]}
            elif isinstance(obj.get(text_field), str):
                rec = {"text": obj[text_field]}
            else:
                raise ValueError(
                    f"data: {p}:{lineno} has neither {prompt_field!r}/{response_field!r} nor "
                    f"{text_field!r} (fields present: {sorted(obj)})"
                )
            if group_key is not None:
                if group_key not in obj:
                    raise ValueError(f"data: {p}:{lineno} is missing group_key field {group_key!r}")
                rec[group_key] = obj[group_key]
            records.append(rec)
    if not records:
        raise ValueError(f"data: file {str(p)!r} is empty; it needs at least one JSON record")
    return records


class JSONLDataModule(DPDataModule):
    """JSONL training data; one JSON object per line.

    Args:
        train_path: training records (``prompt``/``response`` or ``text`` per line).
        val_path: validation records; null splits val_fraction off the training file.
        test_path: test records (optional).
        val_fraction: fraction of the training file held out when val_path is null.
        prompt_field: JSON field holding the prompt.
        response_field: JSON field holding the response (the loss is taken on it).
        text_field: JSON field of plain-text records (loss on all tokens).
        split_seed: seed of the held-out split.
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
        split_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={val_fraction} must be in [0, 1)")
        self.train_path, self.val_path, self.test_path = train_path, val_path, test_path
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.fields = {"prompt_field": prompt_field, "response_field": response_field,
                       "text_field": text_field}

    def dataset_name(self) -> str:
        return f"jsonl:{self.train_path}"

    def load_records(self) -> dict[str, list[dict]]:
        key = self.group_key if self.privacy_unit == "group" else None
        read = lambda path: read_jsonl(path, group_key=key, **self.fields)  # noqa: E731
        train = read(self.train_path)
        if self.val_path is not None:
            val = read(self.val_path)
        else:
            # Hold out whole units, so no unit's records land in both splits.
            units: dict[Any, list[int]] = {}
            for i, rec in enumerate(train):
                unit = json.dumps(rec[key], sort_keys=True) if key is not None else i
                units.setdefault(unit, []).append(i)
            order = list(units.values())
            random.Random(self.split_seed).shuffle(order)
            n_val = int(len(order) * self.val_fraction)
            held = {i for unit_rows in order[:n_val] for i in unit_rows}
            val = [train[i] for i in sorted(held)]
            train = [train[i] for i in range(len(train)) if i not in held]
        test = read(self.test_path) if self.test_path is not None else []
        return {"train": train, "validation": val, "test": test}
