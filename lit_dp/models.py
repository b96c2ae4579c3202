"""Model loading: the one entry point for models.

With lit_dp.bitnet and lit_dp.lora, the only modules importing transformers/peft.

Sections: tiny random models (tests, ``tiny.yaml``); the tiny tokenizer; loading by source name
(:func:`resolve_source`, :func:`load_model`, :func:`load_tokenizer`). BitNet b1.58 conversion
(online ternary quantization-aware training through transformers' ``AutoBitLinear``) lives in
``lit_dp.bitnet``, LoRA (:func:`apply_lora`, :func:`merge_lora`) in ``lit_dp.lora``; both are
re-exported here. Export and generation live in ``lit_dp.export``, which this module does not
import (loading a model never loads the export code). Importing this module imports
``lit_dp.bitnet``, which registers the BitNet layers' per-example rule with the fast clipping
engine.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

# Re-exported: callers use lit_dp.models as the one entry point ("x as x" marks a re-export).
# lit_dp.bitnet also registers the BitNet layers with the fast clipping engine on import.
from lit_dp.bitnet import BITLINEAR_TYPES as BITLINEAR_TYPES
from lit_dp.bitnet import BitLinearQAT as BitLinearQAT
from lit_dp.bitnet import bitlinear_input as bitlinear_input
from lit_dp.bitnet import convert_to_bitnet as convert_to_bitnet
from lit_dp.bitnet import has_bitnet_qat as has_bitnet_qat
from lit_dp.lora import DEFAULT_LORA_TARGETS as DEFAULT_LORA_TARGETS
from lit_dp.lora import apply_lora as apply_lora
from lit_dp.lora import is_lora as is_lora
from lit_dp.lora import merge_lora as merge_lora
from lit_dp.sources import BITNET_QAT_FLAG as BITNET_QAT_FLAG
from lit_dp.sources import EMBEDDED_GGUF, offline_error, publish_once, resolve_dtype
from lit_dp.sources import EMBEDDED_SOURCE as EMBEDDED_SOURCE
from lit_dp.sources import LORA_ADAPTER_DIR as LORA_ADAPTER_DIR
from lit_dp.sources import TINY_SOURCES as TINY_SOURCES
from lit_dp.sources import ModelSource as ModelSource
from lit_dp.sources import default_cache_dir as default_cache_dir
from lit_dp.sources import embedded_gguf_dir as embedded_gguf_dir
from lit_dp.sources import resolve_source as resolve_source

# Tiny shapes: small enough that a per-example loop runs in milliseconds, big enough to have
# grouped-query attention (4 query heads over 2 key/value heads) and a real MLP.
_TINY_SHAPES = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def tiny_config(arch: str = "qwen2", **overrides: object) -> PretrainedConfig:
    """Config of a tiny random causal LM of architecture ``arch`` ("qwen2", "llama", "bitnet")."""
    from transformers import BitNetConfig, LlamaConfig, Qwen2Config

    classes = {"qwen2": Qwen2Config, "llama": LlamaConfig, "bitnet": BitNetConfig}
    if arch not in classes:
        raise ValueError(f"arch={arch!r} is not one of {sorted(classes)}")
    kwargs: dict[str, object] = dict(_TINY_SHAPES)
    kwargs.update(
        tie_word_embeddings=arch == "qwen2", pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    kwargs.update(overrides)
    return classes[arch](**kwargs)


def build_tiny_model(arch: str = "qwen2", *, seed: int = 0, **overrides: object) -> nn.Module:
    """A randomly initialised tiny causal LM (fp32, eval-mode dropout is irrelevant: none is used).

    ``arch="bitnet"`` builds transformers' BitNet architecture and converts its Linear layers to
    ``AutoBitLinear`` with online ternary quantization (see :func:`convert_to_bitnet`).
    """
    config = tiny_config(arch, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if arch == "bitnet":
        convert_to_bitnet(model)
    return model


# A tiny byte-level tokenizer for the tiny random models: 256 byte tokens + 3 specials, with a
# chat template, so the tiny configs run the same data path (prompt/response masking) as real ones.
TINY_SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>")
_TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)


def tiny_tokenizer():
    """A byte-level tokenizer (vocab 259: pad=0, bos=1, eos=2, then the 256 bytes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIAL_TOKENS)}
    vocab.update({c: i + len(TINY_SPECIAL_TOKENS) for i, c in enumerate(sorted(byte_chars))})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=TINY_SPECIAL_TOKENS[0],
        bos_token=TINY_SPECIAL_TOKENS[1],
        eos_token=TINY_SPECIAL_TOKENS[2],
    )
    tok.chat_template = _TINY_CHAT_TEMPLATE
    return tok


def _from_gguf(directory: str, gguf_file: str, dtype: torch.dtype) -> Any:
    """Load (dequantize) a GGUF checkpoint into a plain dense transformers model."""
    kwargs: dict[str, object] = {}
    with contextlib.suppress(ImportError):  # transformers >= 5: ask for a dense model explicitly
        from transformers.utils.quantization_config import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=gguf_file, dtype=dtype, **kwargs
    )
    # The weights are dense now; the GGUF quantizer left on the model blocks save_pretrained.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    packed = [n for n, m in model.named_modules() if "gguf" in type(m).__name__.lower()]
    if packed:
        raise RuntimeError(f"GGUF layers were not dequantized: {packed[:3]}")
    return model


def _ensure_embedded_cache(cache_dir: str | None) -> Path:
    """Convert the embedded GGUF once into a save_pretrained directory (model + tokenizer).

    The directory is shared safely by concurrent processes (see
    :func:`lit_dp.sources.publish_once`).
    """
    from transformers import AutoTokenizer

    gguf = embedded_gguf_dir() / EMBEDDED_GGUF

    def write(tmp: Path) -> None:
        _from_gguf(str(gguf.parent), gguf.name, torch.float32).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)

    final = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return publish_once(final, {"gguf_file": gguf.name, "gguf_size": gguf.stat().st_size}, write)


def _bitnet_config_without_quantizer(directory: str) -> PretrainedConfig | None:
    """For a BitNet directory with ``quantization_config``: the config without it.

    It first checks that the weights are the bf16/fp32 latent (master) weights, not the packed
    2-bit inference checkpoint (uint8 weights + weight_scale), which cannot be trained.
    """
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory)
    if config.model_type != "bitnet" or getattr(config, "quantization_config", None) is None:
        return None
    for file in Path(directory).glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for key in list(f.keys()):  # safe_open is not iterable
                if key.endswith("weight_scale") or f.get_slice(key).get_dtype() in ("U8", "I8"):
                    raise ValueError(
                        f"{directory!r} holds packed ternary BitNet weights ({key}); QAT needs the "
                        "latent master weights, e.g. microsoft/bitnet-b1.58-2B-4T-bf16"
                    )
    del config.quantization_config  # load plain nn.Linear layers holding the latent weights
    return config


def _hub_snapshot(source: str, src: ModelSource, cache_dir: str | None) -> ModelSource:
    """The local Hugging Face cache snapshot of hub id ``src``, as a directory/gguf source.

    Looked up without any network call (transformers' from_pretrained probes the hub for
    adapter_config.json even with local_files_only=True, retrying for ~20 s when offline).
    """
    from huggingface_hub import try_to_load_from_cache

    filename = src.gguf_file or "config.json"
    path = try_to_load_from_cache(src.location, filename, cache_dir=cache_dir)
    if not isinstance(path, str):  # None (never cached) or a "known missing" sentinel
        raise offline_error(source, FileNotFoundError(f"{filename} of {src.location!r} not cached"))
    return ModelSource(
        "gguf" if src.gguf_file else "directory", str(Path(path).parent), src.gguf_file
    )


def load_model(
    source: str,
    *,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    bitnet: bool = False,
    cache_dir: str | None = None,
) -> nn.Module:
    """Load a causal LM for DP training (``config.use_cache = False``).

    Args:
        source: a built-in name ("tiny-qwen2", "tiny-llama", "tiny-bitnet": random tiny models
            with vocab 259 matching :func:`tiny_tokenizer`; "smollm2-135m-instruct": the embedded
            default, converted once from its GGUF into ``cache_dir``), a save_pretrained
            directory, a .gguf file, or a hub id present in the local Hugging Face cache (never
            downloaded). See :func:`resolve_source`.
        gguf_file: name of the .gguf file inside a directory or hub repo.
        dtype: "auto" (float32 on CPU, bfloat16 on CUDA), "float32", "bfloat16", "float16".
        device: where the model is moved.
        bitnet: convert every Linear except lm_head to ternary QAT (:func:`convert_to_bitnet`).
            Always done for the BitNet architecture (model_type "bitnet", e.g. the
            BitNet-b1.58-2B bf16 master weights: their ``quantization_config`` is dropped, the
            latent weights load into plain Linear layers, which then become BitLinearQAT with
            online quantization) and for exports flagged ``lit_dp_bitnet_qat``.
        cache_dir: for the embedded model, its conversion cache (default
            :func:`default_cache_dir`); for a hub id, the Hugging Face hub cache to read
            (default: HF's own, ``$HF_HUB_CACHE``).
    """
    src = resolve_source(source, gguf_file=gguf_file)
    if src.kind == "hub":
        src = _hub_snapshot(source, src, cache_dir)
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device)
    model: Any  # a transformers PreTrainedModel
    if src.kind == "tiny":
        vocab = len(tiny_tokenizer())
        model = build_tiny_model(src.location, vocab_size=vocab).to(torch_dtype)
    elif src.kind == "embedded":
        directory = _ensure_embedded_cache(cache_dir)
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch_dtype)
    elif src.kind == "gguf":
        assert src.gguf_file is not None
        model = _from_gguf(src.location, src.gguf_file, torch_dtype)
    elif src.kind == "directory":
        config = _bitnet_config_without_quantizer(src.location)
        extra = {"config": config} if config is not None else {}
        model = AutoModelForCausalLM.from_pretrained(src.location, dtype=torch_dtype, **extra)
    else:
        raise AssertionError(src)
    config = model.config
    if bitnet or config.model_type == "bitnet" or getattr(config, BITNET_QAT_FLAG, False):
        convert_to_bitnet(model)
    eos = getattr(config, "eos_token_id", None)
    if getattr(config, "pad_token_id", None) is None and eos is not None:
        config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    config.use_cache = False  # training: no KV cache (generate() turns it on per call)
    model = model.to(device)
    if src.kind == "directory" and (Path(src.location) / LORA_ADAPTER_DIR).is_dir():
        from peft import PeftModel  # an export whose LoRA could not be merged (BitNet QAT)

        model = PeftModel.from_pretrained(model, str(Path(src.location) / LORA_ADAPTER_DIR))
    return model


def load_tokenizer(source: str, *, gguf_file: str | None = None, cache_dir: str | None = None):
    """The tokenizer of ``source`` (same resolution as :func:`load_model`), with a pad token.

    A missing pad token becomes eos (or bos/unk); pad positions are masked by attention_mask and
    labels=-100, so any existing token works. Only without any of them is "<|pad|>" added (then
    call ``model.resize_token_embeddings(len(tokenizer))``).
    """
    from transformers import AutoTokenizer

    src = resolve_source(source, gguf_file=gguf_file)
    if src.kind == "hub":
        src = _hub_snapshot(source, src, cache_dir)
    if src.kind == "tiny":
        return tiny_tokenizer()
    if src.kind == "embedded":
        tok = AutoTokenizer.from_pretrained(str(_ensure_embedded_cache(cache_dir)))
    else:  # "gguf" or "directory" (hub ids resolved to their local snapshot above)
        tok = AutoTokenizer.from_pretrained(src.location, gguf_file=src.gguf_file)
    if tok.pad_token is None:
        existing = tok.eos_token or tok.bos_token or tok.unk_token
        if existing is not None:
            tok.pad_token = existing
        else:
            tok.add_special_tokens({"pad_token": "<|pad|>"})
    return tok


def parameter_summary(model: nn.Module) -> dict[str, int | float]:
    """Parameter counts for logs (a tied weight counts once): total, trainable, fraction."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "total": total,
        "trainable": trainable,
        "trainable_fraction": trainable / total if total else 0.0,
    }


def disable_progress_bars() -> None:
    """Turn off transformers' progress bars (weight loading, shard writing).

    The CLI's output is the run's own.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
