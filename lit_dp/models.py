"""Model loading and conversion: the only module that imports transformers and peft.

Sections: tiny random models (tests, ``tiny.yaml``), BitNet b1.58 conversion (online ternary
quantization-aware training through transformers' ``AutoBitLinear``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.integrations.bitnet import AutoBitLinear

# Module types whose weight gradient is grad_out^T * (quantized input); see bitlinear_input.
BITLINEAR_TYPES: tuple[type[nn.Module], ...] = (AutoBitLinear,)

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
    kwargs.update(tie_word_embeddings=arch == "qwen2", pad_token_id=0, bos_token_id=1, eos_token_id=2)
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


def _ternary_weights(weight: torch.Tensor) -> torch.Tensor:
    """BitNet b1.58 weight quantizer: round(W / mean|W|) clamped to {-1, 0, 1}, times mean|W|."""
    w = weight.float()
    scale = 1.0 / w.abs().mean().clamp(min=1e-5)
    return ((w * scale).round().clamp(-1, 1) / scale).to(weight.dtype)


def _int8_activations(x: torch.Tensor) -> torch.Tensor:
    """BitNet b1.58 activation quantizer: symmetric 8 bit, absmax scale per token (last dim)."""
    xf = x.float()
    scale = 127.0 / xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return ((xf * scale).round().clamp(-128, 127) / scale).to(x.dtype)


class BitLinearQAT(AutoBitLinear):
    """``AutoBitLinear`` in online mode with the quantizers run eagerly.

    Same arithmetic and straight-through estimator as transformers' online AutoBitLinear; its
    quantizers are ``torch.compile``-decorated, which costs ~20 s per new shape on a CPU, so this
    subclass applies them as ``x + (q(x) - x).detach()`` instead (identical forward values and
    identity gradients).
    """

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """The activation that multiplies the weight in the forward pass (and in its gradient)."""
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        return x + (_int8_activations(x) - x).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w_q = w + (_ternary_weights(w) - w).detach()
        return F.linear(self.quantized_input(x), w_q, self.bias)


def bitlinear_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Activation multiplying an AutoBitLinear's weight gradient, for per-example clipping.

    With online quantization the weight gradient of ``F.linear(q(x), q(W))`` under the STE is
    ``grad_out^T q(x)``: the quantized (and, if configured, RMS-normalized) activation.
    """
    if isinstance(module, BitLinearQAT):
        return module.quantized_input(x)
    if module.rms_norm is not None:  # transformers' own AutoBitLinear
        x = module.rms_norm(x)
    return _int8_activations(x) if module.online_quant else x


def convert_to_bitnet(model: nn.Module, *, skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Swap every ``nn.Linear`` (except modules whose name ends with an entry of ``skip``) for
    transformers' ``AutoBitLinear`` with online quantization, copying the weights in place.

    The copied full-precision weights become the latent weights of quantization-aware training:
    the forward pass uses ternary weights (absmean scaling) and 8-bit per-token activations;
    gradients reach the latent weights through a straight-through estimator.
    """
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or isinstance(module, AutoBitLinear):
            continue
        if any(name == s or name.endswith("." + s) for s in skip):
            continue
        new = BitLinearQAT(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            device=module.weight.device,
            dtype=module.weight.dtype,
            online_quant=True,
        )
        new.weight = module.weight
        if module.bias is not None:
            new.bias = module.bias
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
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
