"""Audit canaries for language models: random-token rows, fair-coin inclusion, per-canary losses.

Two kinds (Panda et al. 2025 compare both for LLM audits):
- ``random_tokens``: every token drawn uniformly from the tokenizer's ordinary (non-special)
  tokens, loss on every token: a sequence no pretraining corpus or private record contains, so
  the trained model comes to predict it better mainly by training on it.
- ``new_tokens``: a random ordinary-token prefix followed by a secret of ``new`` tokens, ids of
  embedding rows the tokenizer never produces (Qwen2.5 has 271 such rows), loss on the secret
  only. Nothing but the canaries ever trains those rows up, which makes membership far easier
  to see while each canary has new tokens of its own (m x secret length <= unused rows); a model
  without unused rows cannot have them.
Each canary is included
in the training set independently with probability 1/2; both the tokens and the bits come from
OS entropy (``secrets``), never from a seed a user could set or a log could hold.

The membership score of a canary is its loss under the starting weights minus its loss under the
trained (exported) weights: how much training lowered it. Subtracting the starting loss removes
each canary's own difficulty, which does not depend on whether it was trained on.
"""

from __future__ import annotations

import secrets
from typing import Any

import torch

from lit_dp.data.encoding import Row, collate_rows

CANARY_KINDS = ("random_tokens", "new_tokens")


def ordinary_token_ids(tokenizer: Any, *, vocab_limit: int | None = None) -> list[int]:
    """Token ids of ``tokenizer`` that are not special tokens (and < ``vocab_limit``)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    size = len(tokenizer)
    if vocab_limit is not None:
        size = min(size, vocab_limit)
    return [i for i in range(size) if i not in special]


def random_token_canaries(
    *, num_canaries: int, canary_length: int, token_ids: list[int]
) -> list[Row]:
    """``num_canaries`` rows of ``canary_length`` tokens drawn uniformly from ``token_ids``.

    Labels equal the ids: the loss is taken on every token (the first one predicts nothing after
    the shift, as in every row).
    """
    if len(token_ids) < 2:
        raise ValueError("audit: the tokenizer has fewer than 2 ordinary tokens to draw from")
    rng = secrets.SystemRandom()
    rows: list[Row] = []
    for _ in range(num_canaries):
        ids = [token_ids[rng.randrange(len(token_ids))] for _ in range(canary_length)]
        rows.append((ids, list(ids)))
    return rows


def unused_token_ids(tokenizer: Any, *, num_embeddings: int) -> list[int]:
    """Ids of embedding rows beyond the tokenizer's vocabulary (never produced by it)."""
    return list(range(len(tokenizer), num_embeddings))


def secret_length(canary_length: int) -> int:
    """New tokens at the end of a ``new_tokens`` canary: an eighth of it, at least one."""
    return max(1, canary_length // 8)


def new_token_canaries(
    *, num_canaries: int, canary_length: int, token_ids: list[int], new_ids: list[int]
) -> list[Row]:
    """Rows of a random ``token_ids`` prefix and a secret drawn from ``new_ids``.

    The secret is the last ``secret_length(canary_length)`` tokens; the loss is taken on it only
    (the prefix's labels are -100), so the score is how much better the model predicts the new
    tokens after that prefix.
    """
    if not new_ids:
        raise ValueError(
            "audit.kind=new_tokens needs embedding rows that the tokenizer never produces, and "
            "this model has none (its embedding matrix is exactly the tokenizer's size); use "
            "audit.kind: random_tokens"
        )
    if len(token_ids) < 2:
        raise ValueError("audit: the tokenizer has fewer than 2 ordinary tokens to draw from")
    rng = secrets.SystemRandom()
    secret = secret_length(canary_length)
    # New tokens are dealt from a shuffled pool, reshuffled when it runs out: no canary shares a
    # new token with another while m x secret <= len(new_ids). A shared one would be trained by
    # an included canary and lower an excluded canary's loss too.
    pool: list[int] = []
    rows: list[Row] = []
    for _ in range(num_canaries):
        prefix = [token_ids[rng.randrange(len(token_ids))] for _ in range(canary_length - secret)]
        tail = []
        for _ in range(secret):
            if not pool:
                pool = list(new_ids)
                rng.shuffle(pool)
            tail.append(pool.pop())
        rows.append((prefix + tail, [-100] * len(prefix) + tail))
    return rows


def fair_coins(n: int) -> list[bool]:
    """``n`` independent fair bits from OS entropy."""
    return [bool(secrets.randbits(1)) for _ in range(n)]


@torch.no_grad()
def row_losses(
    model: Any, rows: list[Row], *, pad_id: int, device: Any, batch_size: int = 64
) -> list[float]:
    """Mean next-token cross-entropy (nats) of each row under ``model`` (its weights as they are).

    Returns one float per row, in order; the model is put back in its training mode.
    """
    was_training = model.training
    model.eval()
    out: list[float] = []
    try:
        for start in range(0, len(rows), batch_size):
            batch = collate_rows(rows[start : start + batch_size], pad_id)
            input_ids = batch["input_ids"].to(device)  # (B, T)
            logits = model(
                input_ids=input_ids, attention_mask=batch["attention_mask"].to(device)
            ).logits  # (B, T, V)
            labels = batch["labels"][:, 1:].to(device)  # (B, T-1)
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="none"
            )  # (B, T-1)
            counts = (labels != -100).sum(dim=1).clamp(min=1)
            out.extend((nll.sum(dim=1) / counts).tolist())
    finally:
        model.train(was_training)
    return out
