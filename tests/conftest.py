"""Shared fixtures: tiny seeded random causal LMs and padded batches. No downloads."""

from __future__ import annotations

import pytest
import torch

from lit_dp.models import build_tiny_model

# (id, arch, overrides): every layer type the clipping engines must cover.
TINY_MODELS = [
    ("qwen2-tied", "qwen2", {"tie_word_embeddings": True}),
    ("qwen2-untied", "qwen2", {"tie_word_embeddings": False}),
    ("llama", "llama", {}),
    ("bitnet", "bitnet", {}),
]


@pytest.fixture(params=TINY_MODELS, ids=[m[0] for m in TINY_MODELS])
def tiny_model(request):
    _, arch, overrides = request.param
    return build_tiny_model(arch, seed=0, **overrides)


def make_batch(
    batch_size: int = 4,
    seq_len: int = 12,
    vocab_size: int = 128,
    *,
    seed: int = 0,
    empty_label_row: bool = True,
) -> dict[str, torch.Tensor]:
    """A right-padded batch with variable lengths, masked prompt tokens and (optionally) one row
    without any label token. Token ids avoid 0 (pad), 1 (bos), 2 (eos)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab_size, (batch_size, seq_len), generator=g)
    attention_mask = torch.zeros(batch_size, seq_len, dtype=torch.long)
    labels = torch.full((batch_size, seq_len), -100, dtype=torch.long)
    for i in range(batch_size):
        length = seq_len - (i * 3) % (seq_len // 2)  # variable lengths, right padding
        prompt = 1 + i % 3  # masked prompt tokens
        attention_mask[i, :length] = 1
        labels[i, prompt:length] = input_ids[i, prompt:length]
        input_ids[i, length:] = 0
    if empty_label_row:
        labels[-1] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.fixture
def batch():
    return make_batch()


@pytest.fixture
def restore_threads():
    """Puts torch's thread count back after a test that sets it (benchmark entry points)."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
