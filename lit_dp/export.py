"""Export a trained model as a Hugging Face directory, and generate text with it.

This file only calls methods of the model and tokenizer; it asks ``lit_dp.lora`` and
``lit_dp.bitnet`` what kind of model it holds. Both functions are re-exported by
``lit_dp.models``.

Export layout (``out_dir``):
- ``config.json``, ``model.safetensors``, ``generation_config.json``: ``from_pretrained(out_dir)``.
- tokenizer files (when a tokenizer is given).
- ``privacy_report.json`` (when a report is given): what epsilon covers and public
  configuration only. Seeds and generator states are dropped (whether a seed was fixed is kept),
  local file paths in dataset names too, a clip bound derived from raw norms
  (HistoryPercentile's ``max_grad_norm``), and the report's
  ``operator_side`` section (exact data-dependent counts such as num_records, truncated,
  records_without_labels, num_nonfinite_zeroed), which stays in the run directory's report.
- ``README.md`` (with the report): a model card in Hugging Face's format (YAML front matter)
  stating the privacy guarantee and the training recipe (``lit_dp.model_card``).
- LoRA is merged into the weights (on a copy; the training model is not touched), except over
  BitNet QAT layers: merging into latent weights that are re-quantized to ternary is not the
  trained function, so the adapter is saved unmerged in ``lora_adapter/`` beside the base.
- BitNet QAT: the saved weights are the latent full-precision weights (module names unchanged:
  BitLinearQAT subclasses nn.Linear) and ``config.lit_dp_bitnet_qat = true``. A plain
  ``from_pretrained`` then gives full-precision Linear layers; call
  ``lit_dp.models.convert_to_bitnet(model)`` to get the trained ternary forward, or load with
  ``lit_dp.models.load_model(out_dir)``, which does it (and attaches ``lora_adapter/``).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_dp.bitnet import has_bitnet_qat
from lit_dp.lora import is_lora
from lit_dp.report import shareable
from lit_dp.sources import BITNET_QAT_FLAG, LORA_ADAPTER_DIR

PRIVACY_REPORT_FILE = "privacy_report.json"
MODEL_CARD_FILE = "README.md"


def _save_base(model: Any, out: Path, *, bitnet_qat: bool) -> None:
    """save_pretrained with inference config values, restoring the training model's config."""
    config = model.config
    missing = object()
    saved = {k: getattr(config, k, missing) for k in ("use_cache", BITNET_QAT_FLAG)}
    try:
        config.use_cache = True  # training loads set it False; generation wants the KV cache
        if bitnet_qat:
            setattr(config, BITNET_QAT_FLAG, True)
        model.save_pretrained(out)  # safetensors
    finally:
        for key, value in saved.items():
            if value is missing:
                if hasattr(config, key):
                    delattr(config, key)
            else:
                setattr(config, key, value)


def export_model(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    privacy_report: dict | None = None,
    base_model: str | None = None,
) -> Path:
    """Write ``model`` (+ ``tokenizer``, + ``privacy_report`` and its model card) as a HF directory.

    See the module docstring for the layout. ``base_model`` (the model source trained from) is
    named in the model card. Returns ``out_dir`` as a Path. Never mutates ``model``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale_files = (out / LORA_ADAPTER_DIR, out / PRIVACY_REPORT_FILE, out / MODEL_CARD_FILE)
    for stale in stale_files:  # from an earlier export
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    qat = has_bitnet_qat(model)
    base: Any = model  # a transformers PreTrainedModel or a peft PeftModel
    if is_lora(model):
        work: Any = copy.deepcopy(
            model
        )  # merging and unloading mutate; the training model must not
        if qat:
            work.save_pretrained(out / LORA_ADAPTER_DIR)  # PeftModel: adapter weights only
            base = work.unload()
        else:
            base = work.merge_and_unload()
    _save_base(base, out, bitnet_qat=qat)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if privacy_report is not None:
        from lit_dp.model_card import REQUIRED_FIELDS, model_card

        public = shareable(privacy_report)
        text = json.dumps(public, indent=2, sort_keys=True, default=str)
        (out / PRIVACY_REPORT_FILE).write_text(text + "\n")
        if public.keys() >= REQUIRED_FIELDS:  # a run's report (not a hand-made partial one)
            card = model_card(json.loads(text), base_model=base_model, bitnet_qat=qat)
            (out / MODEL_CARD_FILE).write_text(card)
    return out


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
) -> list[str]:
    """Complete each prompt; returns only the new text (special tokens removed).

    Prompts are wrapped as one user turn of the tokenizer's chat template when it has one.
    Batched with left padding, so every row's next token follows its own last prompt token.
    Sampling (``do_sample=True``) draws from the global torch generator.
    """
    if not prompts:
        return []
    chat = bool(getattr(tokenizer, "chat_template", None))
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        if chat
        else p
        for p in prompts
    ]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:  # a chat template writes its own bos: no second one
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    input_ids = enc["input_ids"].to(device)  # (B, T) left-padded
    attention_mask = enc["attention_mask"].to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
            )  # (B, T + new)
    finally:
        model.train(was_training)
    return tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)
