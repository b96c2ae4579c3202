"""The step of each method compare.py compares, and their round-robin timing.

Models (the tiny Qwen2 and BitNet decoders, SmolLM2-135M), ragged batches, one full optimizer
step per method (non-private, lit_dp's fast and vmap engines, Opacus hooks and ghost clipping),
and ``time_methods``: median step seconds of every method on one (model, shape).
"""

from __future__ import annotations

import copy
import gc
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

METHODS = ("nonprivate", "fast", "vmap", "opacus_hooks", "opacus_ghost")
MODELS = ("qwen2-5m", "bitnet-5m", "smollm2-135m")
SIGMA = 1.0
CLIP = 1.0
LR = 1e-4

_TINY = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=4096,
    max_position_embeddings=2048,
)


# --- models and batches ---------------------------------------------------------------------
def build_model(name: str) -> torch.nn.Module:
    from lit_dp.models import build_tiny_model, load_model

    if name == "qwen2-5m":
        model = build_tiny_model("qwen2", **_TINY)
    elif name == "bitnet-5m":
        model = build_tiny_model("bitnet", **_TINY)
    elif name == "smollm2-135m":
        model = load_model("smollm2-135m-instruct", dtype="float32")
    else:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    model.config.use_cache = False
    return model.train()


def make_batch(vocab: int, batch_size: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch_size, seq_len), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    # Ragged rows: the last quarter of each row past a random cut is padding.
    for b in range(batch_size):
        cut = int(torch.randint(seq_len * 3 // 4, seq_len + 1, (1,), generator=g))
        mask[b, cut:] = 0
        labels[b, cut:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# --- one training step per method ----------------------------------------------------------
def _loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from lit_dp.privacy.per_sample import per_example_losses

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return per_example_losses(logits, batch["labels"])  # (B,) fp32


def training_max_rows() -> int:
    """Rows per physical micro-batch that training uses by default (DPCausalLM's default)."""
    import inspect

    from lit_dp.module import DPCausalLM

    return int(inspect.signature(DPCausalLM).parameters["max_physical_batch_size"].default)


def make_step(
    method: str, model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> Callable[[], None]:
    """A closure doing one full optimizer step of ``method`` on ``model`` (modified in place)."""
    rows = int(batch["input_ids"].shape[0])
    if method == "nonprivate":
        opt = torch.optim.AdamW(model.parameters(), lr=LR, foreach=False)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            _loss(model, batch).mean().backward()
            opt.step()

        return step
    if method in ("fast", "vmap", "fast_secure"):
        # Training's own step: lit_dp.privacy.privatize (micro-batches of the module's default
        # size, clipped sums, noise, division by the expected batch size, the private-quantile
        # clip-bound update) and then the DPAdamW step, as DPCausalLM._dp_step runs them.
        # fast_secure: the fast engine with model.secure_noise's generator (secure_noise.py).
        from lit_dp.optim import DPAdamW
        from lit_dp.privacy.clipping import PrivateQuantile
        from lit_dp.privacy.mechanism import privatize
        from lit_dp.privacy.noise import NoiseGenerator, make_generator
        from lit_dp.privacy.secure_noise import SecureNoiseGenerator

        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        opt = DPAdamW(params.values(), lr=LR)
        gen: NoiseGenerator = (
            SecureNoiseGenerator.create() if method == "fast_secure" else make_generator(0)[0]
        )
        engine = "fast" if method == "fast_secure" else method
        # The count noise std E[B] / divisor must exceed sigma / 2: the default divisor (20) holds
        # down to E[B] = 11 at sigma 1; smaller benchmark batches use divisor E[B] (std 1).
        divisor = 20.0 if rows / 20.0 > SIGMA / 2 else float(rows)
        clip = PrivateQuantile(initial_clip=CLIP, target_clip_rate=0.2, count_noise_divisor=divisor)
        max_rows = training_max_rows()

        def step() -> None:
            out = privatize(
                model,
                batch,
                clip=clip,
                noise_multiplier=SIGMA,
                expected_batch_size=rows,
                generator=gen,
                engine=engine,
                max_rows=max_rows,
            )
            for n, p in params.items():
                p.grad = out.grads[n].to(p.dtype)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step
    if method == "opacus_hooks":
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        opt = DPOptimizer(
            torch.optim.AdamW(gsm.parameters(), lr=LR, foreach=False),
            noise_multiplier=SIGMA,
            max_grad_norm=CLIP,
            expected_batch_size=rows,
            loss_reduction="mean",
        )

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            _loss(gsm, batch).mean().backward()
            opt.step()

        return step
    if method == "opacus_ghost":
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

        gsm = GradSampleModuleFastGradientClipping(
            model,
            batch_first=True,
            loss_reduction="mean",
            max_grad_norm=CLIP,
            use_ghost_clipping=True,
        )
        opt = DPOptimizerFastGradientClipping(
            torch.optim.AdamW(gsm.parameters(), lr=LR, foreach=False),
            noise_multiplier=SIGMA,
            max_grad_norm=CLIP,
            expected_batch_size=rows,
            loss_reduction="mean",
        )

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            per_row = _loss(gsm, batch)
            DPTensorFastGradientClipping(gsm, opt, per_row, "mean").backward()
            opt.step()

        return step
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def _why(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")
    return text[:160]


# --- timing ---------------------------------------------------------------------------------
def time_methods(
    model_name: str,
    batch_size: int,
    seq_len: int,
    methods: list[str],
    *,
    warmup: int,
    repeats: int,
    base: torch.nn.Module | None = None,
) -> list[dict[str, Any]]:
    """Median step seconds of each method, timed round-robin after warm-up."""
    base = base if base is not None else build_model(model_name)
    batch = make_batch(base.config.vocab_size, batch_size, seq_len)
    steps: dict[str, Callable[[], None]] = {}
    notes: dict[str, str] = {}
    for m in methods:
        too_big = _exceeds_memory(m, base, batch_size)
        if too_big:
            notes[m] = too_big
            continue
        try:
            fn = make_step(m, copy.deepcopy(base), batch)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(warmup):
                    fn()
            steps[m] = fn
        except Exception as exc:
            notes[m] = _why(exc)
        gc.collect()
    times: dict[str, list[float]] = {m: [] for m in steps}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(repeats):
            for m, fn in steps.items():
                t0 = time.perf_counter()
                fn()
                times[m].append(time.perf_counter() - t0)
    ref = statistics.median(times["nonprivate"]) if times.get("nonprivate") else None
    ref_min = min(times["nonprivate"]) if times.get("nonprivate") else None
    rows = []
    for m in methods:
        step_s = statistics.median(times[m]) if m in times else None
        min_s = min(times[m]) if m in times else None
        rows.append(
            dict(
                model=model_name,
                seq_len=seq_len,
                batch_size=batch_size,
                method=m,
                step_s=step_s,
                tokens_per_s=(batch_size * seq_len / step_s) if step_s else None,
                ratio_vs_nonprivate=(step_s / ref) if (step_s and ref) else None,
                min_s=min_s,
                min_ratio_vs_nonprivate=(min_s / ref_min) if (min_s and ref_min) else None,
                peak_mem_mb=None,
                mem_ratio_vs_nonprivate=None,
                note=notes.get(m, ""),
            )
        )
    return rows


def _exceeds_memory(method: str, model: torch.nn.Module, batch_size: int) -> str | None:
    """Why ``method`` is not run here, if its per-sample gradients (B x params x 4 bytes, held
    by Opacus hooks) would take over half of the memory still available."""
    if method != "opacus_hooks":
        return None
    need = batch_size * sum(p.numel() for p in model.parameters() if p.requires_grad) * 4
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(x.split()[1]) * 1024 for x in f if x.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None
    if need <= avail / 2:
        return None
    return (
        f"not run: its per-sample gradients need {need / 2**30:.1f} GiB (B x params x 4 bytes) "
        f"of {avail / 2**30:.1f} GiB available"
    )
