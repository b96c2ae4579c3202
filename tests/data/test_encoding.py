"""Records -> token rows -> padded batches: chat-template labels, loss_on, batched encoding,
collation, and the padding and masking of a DataModule's training batch."""

from __future__ import annotations

import pytest
import torch
from datamodule_helpers import ListDataModule, qa

from lit_dp.data import ConstantSampleRate
from lit_dp.data.encoding import collate_rows, encode_record, encode_records
from lit_dp.models import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def plain_tok():
    t = tiny_tokenizer()
    t.chat_template = None
    return t


# --- encoding and collation --------------------------------------------------------------
def test_chat_template_labels_are_exactly_the_assistant_part(tok):
    rec = {"prompt": "Hello there", "response": "General Kenobi"}
    ids, labels = encode_record(tok, rec, loss_on="response")
    assert len(ids) == len(labels)
    n_masked = sum(lab == -100 for lab in labels)
    assert all(lab == -100 for lab in labels[:n_masked])  # masked prefix, then labeled
    assert labels[n_masked:] == ids[n_masked:]
    assert tok.decode(ids[n_masked:]) == "General Kenobi<|eos|>"  # the end-of-turn is labeled
    # Reference: the prompt turn with the generation prompt is exactly the masked part.
    head = tok.apply_chat_template(
        [{"role": "user", "content": "Hello there"}], tokenize=False, add_generation_prompt=True
    )
    assert tok.decode(ids[:n_masked]) == head == "<|bos|>user\nHello there<|eos|><|bos|>assistant\n"


def test_template_that_rewrites_the_prompt_falls_back_to_the_response_offset():
    t = tiny_tokenizer()
    t.chat_template = "{{ messages|length }}" + t.chat_template  # head is not a prefix of full
    ids, labels = encode_record(t, {"prompt": "say hi", "response": "hi"}, loss_on="response")
    assert t.decode(ids).startswith("2<|bos|>user")
    assert t.decode([x for x in labels if x != -100]) == "hi<|eos|>"
    assert labels[-3:] == ids[-3:] and all(x == -100 for x in labels[:-3])


def test_no_template_labels_response_and_eos(plain_tok):
    ids, labels = encode_record(plain_tok, {"prompt": "abc", "response": "xyz"}, loss_on="response")
    assert plain_tok.decode(ids) == "abc\nxyz<|eos|>"
    assert ids[-1] == plain_tok.eos_token_id
    assert labels[:4] == [-100] * 4  # "abc\n", one byte per token
    assert labels[4:] == ids[4:]
    assert plain_tok.decode(labels[4:]) == "xyz<|eos|>"


def test_loss_on_all_labels_everything(tok, plain_tok):
    for t in (tok, plain_tok):
        ids, labels = encode_record(t, {"prompt": "abc", "response": "xyz"}, loss_on="all")
        assert labels == ids


@pytest.mark.parametrize("loss_on", ["response", "all"])
def test_text_record_loss_on_all_tokens(tok, loss_on):
    ids, labels = encode_record(tok, {"text": "plain text"}, loss_on=loss_on)
    assert labels == ids
    assert tok.decode(ids) == "plain text<|eos|>"


def test_batched_encoding_equals_one_by_one(tok):
    recs = [qa(1), {"text": "t"}, {"prompt": "p" * 30, "response": ""}, qa(22)]
    assert encode_records(tok, recs, loss_on="response") == [
        encode_record(tok, r, loss_on="response") for r in recs
    ]


def test_collate_right_pads():
    out = collate_rows([([5, 6, 7], [-100, 6, 7]), ([8], [8])], pad_id=0)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    assert all(v.shape == (2, 3) and v.dtype == torch.long for v in out.values())
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_collate_empty_batch():
    out = collate_rows([], pad_id=0)
    for v in out.values():
        assert v.shape == (0, 1) and v.dtype == torch.long


def test_train_batch_padding_and_masking_with_template(tok):
    recs = [{"prompt": "p" * (i + 1), "response": "r" * (3 - i)} for i in range(3)]
    dm = ListDataModule(recs, tokenizer=tok, batch_schedule=ConstantSampleRate(1.0))
    dm.setup("fit")
    (b,) = list(dm.train_dataloader())
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    for ids, lab, m, rec in zip(
        b["input_ids"], b["labels"], b["attention_mask"], recs, strict=True
    ):
        n = int(m.sum())
        assert (ids[n:] == tok.pad_token_id).all() and (lab[n:] == -100).all()  # right padding
        assert tok.decode(lab[lab != -100]) == rec["response"] + "<|eos|>"  # prompt tokens masked
