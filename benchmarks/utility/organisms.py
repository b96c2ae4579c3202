"""Model organisms of the utility study: small pretrained decoders that a DP run can fine-tune.

An organism is a causal LM that already works before any private data is seen:
- a byte-level BPE tokenizer trained with ``tokenizers`` on *public* text (the ``emails``
  generator under a public seed; the private ``records`` data never reaches it), with pad/bos/eos
  tokens and a chat template;
- a Llama-style decoder pretrained non-privately on the same public emails (loss on every
  token of the chat-formatted email and reply);
- its BitNet b1.58 twin: the same decoder with every Linear but lm_head converted to ternary QAT
  *before* pretraining, so that it learns with ternary weights from the first step.

A ``base`` organism (the GPU recipe) starts from an existing checkpoint and its tokenizer instead,
and continues pretraining on the public emails (for the BitNet twin: QAT healing after the
ternary conversion).

Organisms are written with ``lit_dp.export.export_model`` (BitNet twins carry the QAT flag, so
``DPCausalLM(model=<dir>)`` re-applies the ternary layers) and cached in
``$LIT_DP_CACHE/utility/<name>-<hash of the config>`` (default ``~/.cache/lit_dp``): a changed
config is a new directory, and a missing one is rebuilt from scratch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lit_dp.data.encoding import Row, collate_rows, encode_records
from lit_dp.data.synthetic import make_splits
from lit_dp.export import export_model
from lit_dp.models import convert_to_bitnet, load_model, load_tokenizer
from lit_dp.sources import publish_once

ORGANISM_VERSION = 1  # bump when the build procedure changes: every cached organism is rebuilt
INFO_FILE = "organism.json"
SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class OrganismConfig:
    """Everything that determines an organism (its cache key hashes all of it).

    Shape fields are ignored when ``base`` is set (the base checkpoint fixes the shape).
    ``public_seed`` must differ from the private data's seed; the generators of the two datasets
    are seeded by ("emails", seed) and ("records", seed), so their texts are disjoint anyway.
    """

    name: str
    bitnet: bool = False
    base: str | None = None
    vocab_size: int = 2048
    hidden_size: int = 256
    intermediate_size: int = 576
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_positions: int = 256
    public_seed: int = 20251
    num_public: int = 6000
    num_public_val: int = 200
    max_length: int = 192
    steps: int = 600
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "version": ORGANISM_VERSION}, sort_keys=True)
        return f"{self.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def cache_root(override: str | Path | None = None) -> Path:
    if override is not None:
        return Path(override).expanduser()
    root = os.environ.get("LIT_DP_CACHE") or "~/.cache/lit_dp"
    return Path(root).expanduser() / "utility"


def organism_dir(cfg: OrganismConfig, root: Path) -> Path:
    return root / cfg.key()


def organism_fingerprint(path: Path) -> str:
    """sha256 of the organism's weight files (what the study's results depend on)."""
    import hashlib

    digest = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def organism_info(path: Path) -> dict[str, Any]:
    """The build record of a cached organism (config, sizes, pretraining losses, time)."""
    return json.loads((path / INFO_FILE).read_text())


# --- tokenizer ---------------------------------------------------------------------------------
def _chat_turns(records: list[dict[str, str]]) -> list[str]:
    # The role lines exactly as the chat template renders them, without the special tokens
    # (added tokens are matched before pre-tokenization, so merges never span them).
    return [t for r in records for t in (f"user\n{r['prompt']}", f"assistant\n{r['response']}")]


def train_tokenizer(records: list[dict[str, str]], *, vocab_size: int):
    """A byte-level BPE tokenizer (pad=0, bos=1, eos=2) trained on ``records``' chat turns."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(_chat_turns(records), trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=SPECIAL_TOKENS[0],
        bos_token=SPECIAL_TOKENS[1],
        eos_token=SPECIAL_TOKENS[2],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


# --- model -------------------------------------------------------------------------------------
def fresh_decoder(cfg: OrganismConfig, tok: Any) -> torch.nn.Module:
    """A randomly initialised Llama-style decoder (GQA, RMSNorm, SwiGLU, tied embeddings)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


@torch.no_grad()
def mean_token_nll(
    model: torch.nn.Module,
    rows: list[Row],
    *,
    pad_id: int,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> float:
    """Token-mean next-token NLL (nats) over every labelled token of ``rows``: the quantity
    DPCausalLM reports as its validation loss."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate_rows(rows[i : i + batch_size], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        total += float(
            torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
        )
        count += int((labels != -100).sum())
    model.train(was_training)
    return total / count if count else math.nan


def _lr_factor(step: int, cfg: OrganismConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def pretrain(
    model: torch.nn.Module,
    tok: Any,
    train: list[Row],
    val: list[Row],
    cfg: OrganismConfig,
    *,
    device: torch.device,
    log: Callable[[str], None],
) -> list[dict]:
    """Non-private AdamW on ``train`` (uniform minibatches, gradient-norm clip 1), in place.

    Returns the validation curve [{step, loss}] (every ``steps // 6`` steps and at the end).
    """
    pad = int(tok.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    curve = [{"step": 0, "loss": mean_token_nll(model, val, pad_id=pad, device=device)}]
    every = max(1, cfg.steps // 6)
    model.train()
    start = time.time()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, cfg)
        idx = torch.randint(len(train), (cfg.batch_size,), generator=gen).tolist()
        batch = {k: v.to(device) for k, v in collate_rows([train[i] for i in idx], pad).items()}
        with autocast:
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=-100,
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % every == 0 or step + 1 == cfg.steps:
            curve.append(
                {"step": step + 1, "loss": mean_token_nll(model, val, pad_id=pad, device=device)}
            )
            log(
                f"  [{cfg.name}] pretrain step {step + 1}/{cfg.steps}: train {loss.item():.3f}, "
                f"public val {curve[-1]['loss']:.3f} ({time.time() - start:.0f} s)"
            )
    return curve


def _truncate(rows: list[Row], max_length: int) -> list[Row]:
    return [(ids[:max_length], labels[:max_length]) for ids, labels in rows]


def _write_organism(
    cfg: OrganismConfig, out: Path, *, device: torch.device, log: Callable[[str], None]
) -> None:
    start, cpu_start = time.time(), time.process_time()
    splits = make_splits(
        "emails",
        num_train=cfg.num_public,
        num_val=cfg.num_public_val,
        num_test=0,
        seed=cfg.public_seed,
    )
    if cfg.base is None:
        tok = train_tokenizer(splits["train"], vocab_size=cfg.vocab_size)
        model = fresh_decoder(cfg, tok)
    else:
        tok = load_tokenizer(cfg.base)
        model = load_model(cfg.base, dtype="float32")
    if cfg.bitnet:
        convert_to_bitnet(model)  # before pretraining: ternary QAT from the first step
    model.config.use_cache = False
    model.to(device)
    train = _truncate(encode_records(tok, splits["train"], loss_on="all"), cfg.max_length)
    val = _truncate(encode_records(tok, splits["validation"], loss_on="all"), cfg.max_length)
    curve = pretrain(model, tok, train, val, cfg, device=device, log=log)
    export_model(model.to("cpu"), tok, out)
    info = {
        "config": asdict(cfg),
        "key": cfg.key(),
        "version": ORGANISM_VERSION,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tok),
        "public_val_loss": curve[-1]["loss"],
        "pretrain_curve": curve,
        "public_tokens_per_record": sum(len(r[0]) for r in train) / max(1, len(train)),
        "pretrain_seconds": round(time.time() - start, 1),
        "device": str(device),
        "pretrain_cpu_seconds": round(time.process_time() - cpu_start, 1),
        "torch_threads": torch.get_num_threads(),
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=1))


def build_organism(
    cfg: OrganismConfig,
    root: Path,
    *,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] = print,
) -> Path:
    """The organism's directory, built (tokenizer, pretraining, export) unless already cached.

    Concurrent callers are safe: one builds while the others wait (``publish_once``).
    """
    final = organism_dir(cfg, root)
    device = torch.device(device)

    def write(tmp: Path) -> None:
        log(f"building organism {cfg.key()} (pretraining {cfg.steps} steps on {device}) ...")
        _write_organism(cfg, tmp, device=device, log=log)

    with torch.random.fork_rng(devices=[]):  # pretraining must not shift the study's seeds
        return publish_once(final, {"key": cfg.key(), "config": asdict(cfg)}, write)
