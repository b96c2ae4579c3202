"""DPCausalLM: a Hugging Face causal LM trained with DP-Adam-AC under manual optimization.

The DP step is written once, in ``_dp_step``, as numbered steps. Callbacks read the
``DPStepRecord`` it leaves in ``last_record``; nothing else about the step leaks out.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torchmetrics.aggregation import MeanMetric

from lit_dp import distributed, models
from lit_dp.distributed import all_gather_norms, all_reduce_sum_, broadcast_int, is_distributed
from lit_dp.optim import DPAdamW
from lit_dp.privacy.clipping import make_clip_estimator
from lit_dp.privacy.noise import add_noise_, make_generator
from lit_dp.privacy.per_sample import ENGINES, per_example_clip, per_example_losses
from lit_dp.step_record import DPStepRecord

_MODEL_KEYS = ("input_ids", "attention_mask", "labels")


def split_micro_batches(batch: dict[str, Any], max_rows: int) -> list[dict[str, torch.Tensor]]:
    """Physical micro-batches of at most ``max_rows`` rows that never split a privacy unit.

    Rows of one unit (``unit_ids``) are contiguous; a unit larger than ``max_rows`` goes alone.
    """
    rows = batch["input_ids"].shape[0]
    unit_ids = batch.get("unit_ids")
    if unit_ids is None:
        bounds = [*list(range(0, rows, max_rows)), rows]
    else:
        starts = [0] + [i for i in range(1, rows) if unit_ids[i] != unit_ids[i - 1]] + [rows]
        bounds = [0]
        for unit_start, unit_end in itertools.pairwise(starts):
            # Close the current micro-batch before a unit that would overflow it.
            if unit_end - bounds[-1] > max_rows and unit_start > bounds[-1]:
                bounds.append(unit_start)
        bounds.append(rows)
    keys = [*_MODEL_KEYS, "unit_ids"] if unit_ids is not None else list(_MODEL_KEYS)
    return [{k: batch[k][a:b] for k in keys} for a, b in itertools.pairwise(bounds)]


class DPCausalLM(L.LightningModule):
    """Causal LM fine-tuning with DP-Adam-AC (or the non-private baseline with ``private: false``).

    Args:
        model: model source: "smollm2-135m-instruct" (embedded default), "tiny-qwen2",
            "tiny-llama", "tiny-bitnet", a local directory, a .gguf file, or a hub id available
            offline in the local cache.
        dtype: "auto" (fp32 on CPU, bf16 on GPU), "float32", "bfloat16".
        bitnet: swap Linear layers for BitNet b1.58 ternary QAT layers (AutoBitLinear, online).
        lora_rank: LoRA rank; 0 trains all weights.
        lora_alpha: LoRA scaling numerator (scale = alpha / rank).
        lora_target_modules: module names LoRA adapts (null = attention and MLP projections).
        private: false runs the same loop without clipping, noise or accounting (baseline).
        noise_multiplier: sigma, noise std in units of the clip bound; "auto" calibrates it to
            privacy.target_epsilon over trainer.max_steps.
        clipping: "private_quantile" (default; Andrew et al. 2021, covered by epsilon),
            "fixed", or "history_percentile" (the paper's; uses raw norms: NOT covered).
        max_grad_norm: C, the clip bound per privacy unit (initial value for adaptive modes).
        target_clip_rate: rho*, the fraction of units the adaptive bound aims to clip.
        clip_learning_rate: eta of the private quantile's geometric update.
        count_noise_divisor: private quantile count noise std = expected batch size / divisor.
        history_size: H, the history buffer length of "history_percentile".
        min_clip: lower clamp of adaptive C.
        max_clip: upper clamp of adaptive C.
        engine: per-unit clipping engine: "fast" (book-keeping ghost clipping), "vmap", "loop".
        max_physical_batch_size: rows per forward/backward; bounds memory, not the math.
        lr: base learning rate of DPAdamW (times schedule and clip-driven multiplier).
        betas: Adam betas.
        eps: Adam epsilon.
        weight_decay: decoupled weight decay.
        noise_correction: DP-AdamBC second-moment noise-variance correction.
        variance_floor: lower bound of the noise-corrected second moment (DP-AdamBC's gamma);
            a coordinate whose corrected moment is at the floor steps by lr * m / sqrt(floor).
        optimizer: "adamw" (DPAdamW, the paper's) or "sgd" (DP-SGD with ``momentum``), the
            baseline; both receive the same clipped, noised, averaged gradient.
        momentum: SGD momentum (optimizer="sgd" only).
        noise_seed: seed of the noise generator; null draws it from OS entropy (recommended;
            a fixed seed is for tests and reproducibility studies only).
        diagnostics: also log raw (non-private) per-unit norm statistics; named in the report.
        eval_before_fit: evaluate once before the first step (the "before" loss).
        export_dir: where the EMA model is exported at the end of fit ("auto" =
            <log_dir>/export, null = no export).
    """

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        dtype: str = "auto",
        bitnet: bool = False,
        lora_rank: int = 0,
        lora_alpha: float = 16.0,
        lora_target_modules: list[str] | None = None,
        private: bool = True,
        noise_multiplier: float | Literal["auto"] = "auto",
        clipping: Literal["private_quantile", "fixed", "history_percentile"] = "private_quantile",
        max_grad_norm: float = 1.0,
        target_clip_rate: float = 0.2,
        clip_learning_rate: float = 0.2,
        count_noise_divisor: float = 20.0,
        history_size: int = 1000,
        min_clip: float = 0.01,
        max_clip: float = 100.0,
        engine: Literal["fast", "vmap", "loop"] = "fast",
        max_physical_batch_size: int = 16,
        lr: float = 5e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        noise_correction: bool = False,
        variance_floor: float = 1e-8,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        momentum: float = 0.0,
        noise_seed: int | None = None,
        diagnostics: bool = False,
        eval_before_fit: bool = True,
        export_dir: str | None = "auto",
    ) -> None:
        super().__init__()
        self._validate(locals())
        self.save_hyperparameters()
        self.private = private
        self.noise_multiplier: float | str = noise_multiplier if private else 0.0
        self.engine = engine
        self.max_physical_batch_size = max_physical_batch_size
        self.diagnostics = diagnostics
        self.model = models.load_model(model, dtype=dtype, bitnet=bitnet)
        self.model.train()  # from_pretrained returns eval mode; our models have no dropout
        if lora_rank > 0:
            self.model = models.apply_lora(
                self.model, rank=lora_rank, alpha=lora_alpha, target_modules=lora_target_modules
            )
        clip_kind = clipping if private else "fixed"  # the non-private step never clips
        self.clip = make_clip_estimator(
            clip_kind,
            **self._clip_kwargs(clip_kind, max_grad_norm, target_clip_rate, clip_learning_rate,
                                count_noise_divisor, history_size, min_clip, max_clip),
        )
        self.automatic_optimization = False
        self.last_record: DPStepRecord | None = None
        self._stop_reason: str | None = None
        self._noise_generator: torch.Generator | None = None
        self._pending_generator_state: torch.Tensor | None = None
        self._num_units: int | None = None
        self.num_nonfinite_total = 0
        self.val_history: list[dict[str, float]] = []
        self._evaluation_weights: Callable[[], AbstractContextManager[None]] | None = None
        self.privacy_report: dict[str, Any] | None = None
        self.val_loss_ema, self.val_loss_raw = MeanMetric(), MeanMetric()
        from torchmetrics.text import Perplexity

        self.val_perplexity = Perplexity(ignore_index=-100)

    # --- configuration -----------------------------------------------------------------------
    @staticmethod
    def _validate(args: dict[str, Any]) -> None:
        sigma = args["noise_multiplier"]
        if sigma != "auto" and not (isinstance(sigma, int | float) and sigma >= 0 and math.isfinite(sigma)):
            raise ValueError(f"model.noise_multiplier={sigma!r} must be a number >= 0 or 'auto'")
        if not (args["max_grad_norm"] > 0 and math.isfinite(args["max_grad_norm"])):
            raise ValueError(f"model.max_grad_norm={args['max_grad_norm']} must be a positive number")
        if args["engine"] not in ENGINES:
            raise ValueError(f"model.engine={args['engine']!r} must be one of {ENGINES}")
        if args["max_physical_batch_size"] < 1:
            raise ValueError("model.max_physical_batch_size must be >= 1")
        if args["lora_rank"] < 0:
            raise ValueError("model.lora_rank must be >= 0 (0 = train all weights)")
        if args["lr"] < 0:
            raise ValueError(f"model.lr={args['lr']} must be >= 0")
        if args["optimizer"] not in ("adamw", "sgd"):
            raise ValueError(f"model.optimizer={args['optimizer']!r} must be 'adamw' or 'sgd'")
        if args["optimizer"] == "sgd" and args["noise_correction"]:
            raise ValueError(
                "model.noise_correction corrects Adam's second moment; set it to false with "
                "model.optimizer=sgd"
            )
        if args["optimizer"] != "sgd" and args["momentum"] != 0.0:
            raise ValueError("model.momentum is used by optimizer=sgd only; leave it at 0.0")
        if not 0.0 <= args["momentum"] < 1.0:
            raise ValueError(f"model.momentum={args['momentum']} must be in [0, 1)")

    @staticmethod
    def _clip_kwargs(kind, c, rho, eta, divisor, history, cmin, cmax) -> dict[str, Any]:
        if kind == "fixed":
            return {"max_grad_norm": c}
        common = {"initial_clip": c, "target_clip_rate": rho, "min_clip": cmin, "max_clip": cmax}
        if kind == "private_quantile":
            return {**common, "learning_rate": eta, "count_noise_divisor": divisor}
        return {**common, "history_size": history}

    def set_noise_multiplier(self, value: float) -> None:
        """Set sigma (called by PrivacyAccounting after calibrating ``noise_multiplier: auto``)."""
        self.noise_multiplier = float(value)

    def request_stop(self, reason: str) -> None:
        """Stop before the next step (budget enforcement); the reason goes into the report."""
        self._stop_reason = reason

    def configure_optimizers(self):
        # Lightning may call this more than once: it only builds the optimizer, never wraps the model.
        params = [p for p in self.model.parameters() if p.requires_grad]
        hp = self.hparams
        if hp.optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
            )
        return DPAdamW(
            params, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps,
            weight_decay=hp.weight_decay, noise_correction=hp.noise_correction and self.private,
            variance_floor=hp.variance_floor,
        )

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if self._trainer is not None:  # before Lightning's own DDP could wrap the model
            distributed.check_dp_strategy(self.trainer)
        if dm is not None and hasattr(dm, "num_units"):
            self._num_units = int(dm.num_units)
        if stage == "fit" and self.private and self.noise_multiplier == "auto":
            raise ValueError(
                "model.noise_multiplier=auto needs the PrivacyAccounting callback (privacy: section) "
                "to calibrate it; give a number or run through the lit-dp CLI"
            )
        self.model.config.use_cache = False
        if stage == "fit" and self.private and dm is not None and getattr(dm, "schedule", None):
            # Fail before the first step if the mechanism cannot be built (e.g. private
            # quantile clipping with too small an expected batch for its count noise).
            self.clip.grad_noise_multiplier(
                noise_multiplier=float(self.noise_multiplier),
                expected_batch_size=dm.schedule.rate(0) * self._num_units,
            )

    def _generator(self) -> torch.Generator:
        if self._noise_generator is None:
            seed = self.hparams.noise_seed
            gen, seed = make_generator(seed, device=self.device)
            seed = broadcast_int(seed, self.device)  # identical noise on every rank
            gen.manual_seed(seed)
            if self._pending_generator_state is not None:
                gen.set_state(self._pending_generator_state)
                self._pending_generator_state = None
            self._noise_generator = gen
        return self._noise_generator

    # --- training ----------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        self.last_record = None
        return -1 if self._stop_reason is not None else None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        record = self._dp_step(batch) if self.private else self._nonprivate_step(batch)
        self.last_record = record
        self.num_nonfinite_total += record.num_nonfinite
        self.log("train/loss", record.loss, on_step=True, on_epoch=False, prog_bar=True,
                 batch_size=max(1, record.batch_size))
        self.log("train/batch_size", float(record.batch_size), on_step=True, on_epoch=False)
        if self.private:
            self.log("privacy/clip_bound", record.max_grad_norm, on_step=True, on_epoch=False)
            if record.clip_rate is not None:
                self.log("privacy/clip_rate", record.clip_rate, on_step=True, on_epoch=False)

    def _dp_step(self, batch: dict[str, Any]) -> DPStepRecord:
        if self._num_units is None:
            raise RuntimeError("DPCausalLM needs a lit_dp DataModule (num_units) to train privately")
        sample_rate = float(batch["sample_rate"])
        expected = sample_rate * self._num_units
        sigma = float(self.noise_multiplier)
        c = float(self.clip.max_grad_norm)
        grad_sigma = self.clip.grad_noise_multiplier(noise_multiplier=sigma, expected_batch_size=expected)
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}

        # 1-3. Per-unit gradients clipped to C and summed over physical micro-batches (fp32).
        sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        norms, losses, nonfinite = [], [], 0
        for micro in split_micro_batches(batch, self.max_physical_batch_size):
            out = per_example_clip(self.model, micro, max_grad_norm=c, engine=self.engine)
            torch._foreach_add_([sums[n] for n in out.grads], list(out.grads.values()))
            norms.append(out.norms)
            losses.append(out.losses)
            nonfinite += out.num_nonfinite
        norms_t = torch.cat(norms) if norms else torch.zeros(0, device=self.device)
        losses_t = torch.cat(losses) if losses else torch.zeros(0, device=self.device)
        # ... and across ranks: clipped sums only, never raw gradients.
        stats = torch.tensor([float(norms_t.numel()), float(nonfinite)], device=self.device)
        all_reduce_sum_([*sums.values(), stats])
        all_norms = all_gather_norms(norms_t)

        # 4. One Gaussian draw of std grad_sigma * C per coordinate (identical on every rank).
        generator = self._generator()
        add_noise_(sums, noise_multiplier=grad_sigma, max_grad_norm=c, generator=generator)

        # 5. Divide by the expected batch size q * N, never the realized one.
        for n, p in params.items():
            p.grad = (sums[n] / expected).to(p.dtype)

        # 6. DPAdamW step (lr set by ClipDrivenLR), then the clip bound from privatized counts.
        opt = self.optimizers()
        if self.hparams.noise_correction:
            opt.optimizer.set_noise_std(grad_sigma * c / expected)
        opt.step()
        opt.zero_grad(set_to_none=True)
        clip_rate = self.clip.update(norms=all_norms, expected_batch_size=expected, generator=generator)
        if self.diagnostics and all_norms.numel():
            finite = all_norms[torch.isfinite(all_norms)]
            self.log("diagnostics/raw_norm_median", finite.median() if finite.numel() else math.nan)
            self.log("diagnostics/raw_clip_fraction", (all_norms > c).float().mean())
        return DPStepRecord(
            step=self.global_step - 1, private=True, sample_rate=sample_rate,
            noise_multiplier=sigma, grad_noise_multiplier=grad_sigma, max_grad_norm=c,
            expected_batch_size=expected, clip_rate=clip_rate, batch_size=int(stats[0].item()),
            loss=self._mean_loss(losses_t), num_nonfinite=int(stats[1].item()),
        )

    def _nonprivate_step(self, batch: dict[str, Any]) -> DPStepRecord:
        rows = int(batch["input_ids"].shape[0])
        opt = self.optimizers()
        losses = []
        for micro in split_micro_batches(batch, self.max_physical_batch_size):
            logits = self.model(input_ids=micro["input_ids"], attention_mask=micro["attention_mask"]).logits
            per_row = per_example_losses(logits, micro["labels"])
            has_labels = (micro["labels"][:, 1:] != -100).any(dim=1)
            self.manual_backward(torch.where(has_labels, per_row, 0.0).sum() / max(1, rows))
            losses.append(per_row.detach())
        if is_distributed():
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            all_reduce_sum_(grads)
            for g in grads:
                g /= torch.distributed.get_world_size()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses_t = torch.cat(losses) if losses else torch.zeros(0)
        return DPStepRecord(
            step=self.global_step - 1, private=False, sample_rate=float(batch.get("sample_rate", 1.0)),
            noise_multiplier=0.0, grad_noise_multiplier=0.0, max_grad_norm=math.inf,
            expected_batch_size=float(rows), clip_rate=None, batch_size=rows,
            loss=self._mean_loss(losses_t), num_nonfinite=0,
        )

    @staticmethod
    def _mean_loss(losses: torch.Tensor) -> float:
        finite = losses[torch.isfinite(losses)]
        return float(finite.mean()) if finite.numel() else math.nan

    # --- evaluation --------------------------------------------------------------------------
    def use_evaluation_weights(
        self, swap: Callable[[], AbstractContextManager[None]] | None
    ) -> None:
        """Evaluate and export with the weights that ``swap()`` loads in for the duration of its
        context (and restores on exit); None = the raw weights. The EMA callback installs its
        swap at setup, so this module never looks the callback up."""
        self._evaluation_weights = swap

    def evaluation_weights(self) -> AbstractContextManager[None]:
        """Context in which ``self.model`` holds the weights that are evaluated and exported."""
        swap = self._evaluation_weights
        return swap() if swap is not None else contextlib.nullcontext()

    def set_privacy_report(self, report: dict[str, Any] | None) -> None:
        """The run's privacy report, handed over in memory by the accounting callback at the end
        of fit; the export keeps its public part (see ``lit_dp.export``)."""
        self.privacy_report = report

    def _eval_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        token_nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
            ignore_index=-100, reduction="sum",
        )
        return token_nll, logits, int((labels != -100).sum())

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        nll_raw, logits, tokens = self._eval_loss(batch)
        nll = nll_raw
        if self._evaluation_weights is not None:  # val/loss and perplexity: evaluation weights
            with self.evaluation_weights():
                nll, logits, _ = self._eval_loss(batch)
        if tokens == 0:
            return
        self.val_loss_raw.update(nll_raw / tokens, weight=tokens)
        self.val_loss_ema.update(nll / tokens, weight=tokens)
        self.val_perplexity.update(logits[:, :-1].float(), batch["labels"][:, 1:])

    def on_validation_epoch_end(self) -> None:
        if self.val_loss_ema.update_count == 0:
            return
        ema_loss, raw_loss = self.val_loss_ema.compute(), self.val_loss_raw.compute()
        ppl = self.val_perplexity.compute()
        for metric in (self.val_loss_ema, self.val_loss_raw, self.val_perplexity):
            metric.reset()
        if self.trainer.sanity_checking:
            return
        self.log_dict({"val/loss": ema_loss, "val/loss_raw": raw_loss, "val/perplexity": ppl})
        self.val_history.append(
            {"step": int(self.global_step), "loss_ema": float(ema_loss), "loss_raw": float(raw_loss)}
        )

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        nll, _, tokens = self._eval_loss(batch)
        if tokens:
            self.log("test/loss", nll / tokens, batch_size=tokens)

    @torch.no_grad()
    def _evaluate(self) -> float:
        """Token-mean validation loss of the current weights over the whole validation set."""
        dm = self.trainer.datamodule
        loader = dm.val_dataloader() if dm is not None else None
        if loader is None:
            return math.nan
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        for batch in loader:
            batch = self.transfer_batch_to_device(batch, self.device, 0)
            nll, _, tokens = self._eval_loss(batch)
            total, count = total + float(nll), count + tokens
        self.model.train(was_training)
        return total / count if count else math.nan

    def on_train_start(self) -> None:
        # The "before" loss: at step 0 the EMA weights equal the raw weights.
        if self.hparams.eval_before_fit and self.global_step == 0:
            loss = self._evaluate()
            self.val_history.append({"step": 0, "loss_ema": loss, "loss_raw": loss})

    def on_train_end(self) -> None:
        # The "after" loss, whatever the trainer's validation interval: EMA and raw weights.
        if not self.hparams.eval_before_fit:
            return
        raw = self._evaluate()
        ema_loss = raw
        if self._evaluation_weights is not None:
            with self.evaluation_weights():
                ema_loss = self._evaluate()
        self.val_history.append({"step": int(self.global_step), "loss_ema": ema_loss, "loss_raw": raw})

    # --- end of fit: export the EMA model ----------------------------------------------------
    def on_fit_end(self) -> None:
        log_dir = Path(self.trainer.log_dir or ".")  # a collective under DDP: all ranks ask
        if self.hparams.export_dir is None or self.trainer.global_rank != 0:
            return
        out = log_dir / "export" if self.hparams.export_dir == "auto" else Path(self.hparams.export_dir)
        tokenizer = getattr(self.trainer.datamodule, "tokenizer", None)
        with self.evaluation_weights():  # export_model keeps the report's public part only
            self.export_path = models.export_model(
                self.model, tokenizer, out, privacy_report=self.privacy_report
            )

    # --- privacy description (for the report) and checkpoints --------------------------------
    def privacy_description(self) -> dict[str, Any]:
        clip = self.clip.describe()
        not_covered = [
            "train/loss and train/batch_size logs (raw, operator-side)",
            "validation/test metrics (computed on held-out data without noise)",
            "checkpoints (hold noise and sampler generator states; keep them private)",
        ]
        if self.diagnostics:
            not_covered.append("diagnostics/* logs: raw per-unit norm statistics (diagnostics: true)")
        if not self.private:
            covers = "nothing: private=false (non-private baseline)"
        elif not self.clip.covered_by_dp:
            covers = ("nothing: the clip bound is a percentile of raw per-unit norms "
                      "(history_percentile), so epsilon is not a guarantee for the weights")
            not_covered.append("clip bound C_t and privacy/clip_rate (raw norm history)")
        else:
            covers = ("model weights and everything derived from them (EMA weights, exported "
                      "model, generations, privatized clip rate and clip bound) for add/remove of "
                      "one privacy unit")
        return {
            "clipping": clip,
            "engine": self.engine,
            "noise_multiplier_accounted": self.noise_multiplier,
            "optimizer": self.hparams.optimizer,
            "noise_correction": bool(self.hparams.noise_correction),
            "covers": covers,
            "not_covered": not_covered,
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lit_dp"] = {
            "clip": self.clip.state_dict(),
            "noise_multiplier": self.noise_multiplier,
            "noise_generator": self._generator().get_state() if self.private else None,
            "num_nonfinite_total": self.num_nonfinite_total,
            "val_history": self.val_history,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["lit_dp"]
        self.clip.load_state_dict(state["clip"])
        self.noise_multiplier = state["noise_multiplier"]
        self._pending_generator_state = state["noise_generator"]
        self._noise_generator = None
        self.num_nonfinite_total = state["num_nonfinite_total"]
        self.val_history = state["val_history"]
