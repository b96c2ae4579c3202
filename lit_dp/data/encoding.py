"""Records -> token rows -> padded batches: tokenization (chat template aware) and collation.

A row is (token ids, labels) of one record, labels -100 where no loss is taken. A training
batch is built from the rows of the sampled privacy units (``UnitDataset.__getitems__`` receives
the sampler's ``PoissonBatch``) and collated by ``PoissonCollate``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from lit_dp.privacy.sampling import PoissonBatch

Row = tuple[list[int], list[int]]  # (token ids, labels), same length


def _texts(tokenizer: Any, record: dict[str, Any]) -> tuple[str, int, bool]:
    """(full text, char offset where the loss starts, append eos) of one record."""
    if "text" in record:
        return record["text"], 0, True
    prompt, response = record["prompt"], record["response"]
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": response}], tokenize=False
        )
        if full.startswith(head):
            return full, len(head), False
        at = full.rfind(response) if response else -1
        if at >= 0:  # the template rewrites the prompt turn: the response still starts here
            return full, at, False
    return prompt + "\n" + response, len(prompt) + 1, True  # no (usable) chat template


def encode_records(tokenizer: Any, records: list[dict[str, Any]], *, loss_on: str) -> list[Row]:
    r"""Token ids and labels (-100 = no loss) of each record, tokenized in one batched call.

    prompt/response records use the tokenizer's chat template when it has one (user = prompt,
    assistant = response): the labels are exactly the tokens after the prompt turn rendered with
    ``add_generation_prompt=True`` (checked to be a token prefix; else located by character
    offsets). Without a template: ``prompt + "\n" + response + eos``. ``text`` records take the
    loss on every token (+ eos). ``loss_on="all"`` labels every token of every record.
    """
    if not records:
        return []
    parts = [_texts(tokenizer, r) for r in records]
    fast = bool(getattr(tokenizer, "is_fast", False))
    enc = tokenizer([p[0] for p in parts], add_special_tokens=False, return_offsets_mapping=fast)
    heads = tokenizer([p[0][: p[1]] for p in parts], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    rows = []
    for i, (_, boundary, add_eos) in enumerate(parts):
        ids, head = list(enc["input_ids"][i]), heads[i]
        if ids[: len(head)] == head:
            n_prompt = len(head)
        elif fast:  # a merge across the boundary: tokens that start in the prompt are masked
            n_prompt = sum(1 for start, _ in enc["offset_mapping"][i] if start < boundary)
        else:
            n_prompt = next(
                (k for k, (a, b) in enumerate(zip(ids, head, strict=False)) if a != b),
                min(len(ids), len(head)),
            )
        if add_eos and eos is not None:
            ids.append(eos)
        labels = list(ids) if loss_on == "all" else [-100] * n_prompt + ids[n_prompt:]
        rows.append((ids, labels))
    return rows


def encode_record(tokenizer: Any, record: dict[str, Any], *, loss_on: str) -> Row:
    """:func:`encode_records` of one record."""
    return encode_records(tokenizer, [record], loss_on=loss_on)[0]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 hex of the tokenizer's backend (or vocab), class, chat template and eos/pad ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = (
        backend.to_str()
        if backend is not None
        else json.dumps(sorted(tokenizer.get_vocab().items()))
    )
    extra = [
        type(tokenizer).__name__,
        str(getattr(tokenizer, "chat_template", None)),
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    ]
    return hashlib.sha256((body + json.dumps(extra)).encode()).hexdigest()


# --- collation ---------------------------------------------------------------------------------
def collate_rows(rows: list[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows into input_ids / attention_mask / labels, each (B, T) int64.

    B = 0 gives (0, 1).
    """
    length = max((len(ids) for ids, _ in rows), default=1)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[i, : len(lab)] = torch.tensor(lab, dtype=torch.long)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


@dataclass
class SampledRows:
    """What the unit dataset returns for one PoissonBatch: its rows and their unit ids."""

    rows: list[Row]
    unit_ids: list[int]
    step: int
    sample_rate: float


class UnitDataset(Dataset):
    """Privacy units of the training set; unit u = the rows ``units[u]`` (one, or a group's)."""

    def __init__(self, encoded: list[Row], units: list[list[int]]) -> None:
        self.encoded, self.units = encoded, units

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, unit: int) -> list[Row]:
        return [self.encoded[r] for r in self.units[unit]]

    def __getitems__(self, batch: PoissonBatch) -> SampledRows:
        # The DataLoader fetcher passes the batch sampler's whole PoissonBatch here, so the
        # step and q_t travel with the rows (also through worker processes).
        rows, unit_ids = [], []
        for u in batch:
            for r in self.units[u]:
                rows.append(self.encoded[r])
                unit_ids.append(u)
        return SampledRows(rows, unit_ids, batch.step, batch.sample_rate)


@dataclass
class PoissonCollate:
    """Collate of training batches: padded tensors + sample_rate, step (+ unit_ids)."""

    pad_id: int
    grouped: bool

    def __call__(self, sampled: SampledRows) -> dict[str, Any]:
        out: dict[str, Any] = collate_rows(sampled.rows, self.pad_id)
        if self.grouped:
            out["unit_ids"] = torch.tensor(sampled.unit_ids, dtype=torch.long)
        out["sample_rate"] = float(sampled.sample_rate)
        out["step"] = int(sampled.step)
        return out
