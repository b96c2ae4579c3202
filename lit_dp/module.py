"""DPCausalLM: a Hugging Face causal LM trained with DP-Adam-AC under manual optimization.

The DP mechanism is written once, in ``lit_dp.privacy.mechanism.privatize``; ``_dp_step`` calls it
and hands the private gradient to the optimizer. Callbacks read the ``DPStepRecord`` it leaves in
``last_record``; nothing else about the step leaks out. Validation, test and the before/after losses
live in the base class, ``lit_dp.evaluation.CausalLMEvaluation``; the export of the trained model
is a callback's (``lit_dp.callbacks.export.ExportModel``).
"""

from __future__ import annotations

import math
from typing import Any, Literal, cast

import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.core.optimizer import LightningOptimizer

from lit_dp import distributed, models
from lit_dp.evaluation import CausalLMEvaluation
from lit_dp.optim import DPAdamW
from lit_dp.privacy.bandmf import group_sample_rate
from lit_dp.privacy.clipping import (
    ClipBoundEstimator,
    FixedClip,
    check_smallest_batch,
    default_clip_estimator,
)
from lit_dp.privacy.collectives import (
    all_reduce_sum_,
    broadcast_bytes,
    broadcast_int,
    is_distributed,
)
from lit_dp.privacy.mechanism import privatize, split_micro_batches
from lit_dp.privacy.noise import (
    NoiseGenerator,
    describe_noise_sampler,
    generator_state,
    load_generator_state,
    make_generator,
)
from lit_dp.privacy.noise_mechanism import IndependentGaussian, NoiseMechanism
from lit_dp.privacy.per_sample import ENGINES, per_example_losses
from lit_dp.privacy.plan import PrivacyPlan
from lit_dp.privacy.secure_noise import SecureNoiseGenerator
from lit_dp.step_record import DPStepRecord


class DPCausalLM(CausalLMEvaluation):
    """Causal LM fine-tuning with DP-Adam-AC (or the non-private baseline with ``private: false``).

    The clip-bound estimator and the optimizer are components: each is built from its own class
    (in a config, ``class_path`` and ``init_args``) and validates its own fields.

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
        clipping: the clip-bound estimator (``lit_dp.privacy.clipping``): ``FixedClip``
            (default), ``PrivateQuantile`` (adaptive, Andrew et al. 2021, covered by epsilon),
            or ``HistoryPercentile`` (the paper's rule; uses raw norms: NOT covered by epsilon).
            None builds a fresh ``default_clip_estimator()``, ``FixedClip(1.0)``.
        noise_mechanism: the noise (``lit_dp.privacy.noise_mechanism``): null =
            ``IndependentGaussian`` (DP-SGD's fresh noise every step), or ``BandedMF``
            (correlated noise over ``bands`` steps with cyclic sampling, DP-BandMF).
        optimizer: a callable taking the trainable parameters and returning the optimizer, e.g.
            ``DPAdamW`` (default: ``lit_dp.optim.DPAdamW`` with its defaults) or
            ``torch.optim.SGD`` (the DP-SGD baseline); both receive the same clipped, noised,
            averaged gradient. DP-AdamBC is ``DPAdamW(noise_correction=True)``.
        engine: per-unit clipping engine: "fast" (book-keeping ghost clipping), "vmap", "loop".
        max_physical_batch_size: rows per forward/backward; bounds memory, not the math.
        noise_seed: seed of the noise generator; null draws it from OS entropy (recommended;
            a fixed seed is for tests and reproducibility studies only).
        secure_noise: draw the noise in secure mode (``lit_dp.privacy.secure_noise``): a
            ChaCha20 keystream keyed from OS entropy (a CSPRNG), Gaussians made in float64 as
            the sum of two Box-Muller samples (against floating-point attacks), rounded once
            to fp32. Same noise distribution and accounting; slower (CPU draws). False (the
            default, fast mode): torch's generator, statistically sound but not cryptographic.
            With a fixed noise_seed the key is derived from it and a warning says the noise is
            then not secret.
        diagnostics: also log raw (non-private) per-unit norm statistics; named in the report.
        eval_before_fit: evaluate once before the first step (the "before" loss).
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
        clipping: ClipBoundEstimator | None = None,
        noise_mechanism: NoiseMechanism | None = None,
        optimizer: OptimizerCallable | None = None,
        engine: Literal["fast", "vmap", "loop"] = "fast",
        max_physical_batch_size: int = 16,
        noise_seed: int | None = None,
        secure_noise: bool = False,
        diagnostics: bool = False,
        eval_before_fit: bool = True,
    ) -> None:
        super().__init__()  # the evaluation state (metrics, history, evaluation weights)
        self._validate(locals())
        # The components are described in the privacy report, not pickled into hparams.
        self.save_hyperparameters(ignore=["clipping", "noise_mechanism", "optimizer"])
        self.private = private
        # sigma: a float once a privacy plan is applied (setup); None until then for "auto".
        self.noise_multiplier: float | None = (
            (None if noise_multiplier == "auto" else float(noise_multiplier)) if private else 0.0
        )
        self.privacy_plan: PrivacyPlan | None = None
        self.engine = engine
        self.max_physical_batch_size = max_physical_batch_size
        self.diagnostics = diagnostics
        self.model: Any = models.load_model(model, dtype=dtype, bitnet=bitnet)
        self.model.train()  # from_pretrained returns eval mode; our models have no dropout
        if lora_rank > 0:
            self.model = models.apply_lora(
                self.model, rank=lora_rank, alpha=lora_alpha, target_modules=lora_target_modules
            )
        clip = default_clip_estimator() if clipping is None else clipping
        if not private:  # the non-private step never clips: nothing adaptive to describe or save
            clip = FixedClip(max_grad_norm=clip.max_grad_norm)
        self.clip: ClipBoundEstimator = clip
        self.noise_mechanism: NoiseMechanism = (
            noise_mechanism if private and noise_mechanism is not None else IndependentGaussian()
        )
        self._optimizer_factory: OptimizerCallable = DPAdamW if optimizer is None else optimizer
        self.automatic_optimization = False
        self.last_record: DPStepRecord | None = None
        self._stop_reason: str | None = None
        self._noise_generator: NoiseGenerator | None = None
        self._pending_generator_state: torch.Tensor | dict | None = None
        self._fork = False  # set by reseed_noise_for_fork
        self._num_units: int | None = None
        self.num_nonfinite_total = 0
        self.noise_correction = (
            False  # DP-AdamBC: set from the optimizer configure_optimizers builds
        )

    # --- configuration -----------------------------------------------------------------------
    @staticmethod
    def _validate(args: dict[str, Any]) -> None:
        sigma = args["noise_multiplier"]
        if sigma != "auto" and not (
            isinstance(sigma, int | float) and sigma >= 0 and math.isfinite(sigma)
        ):
            raise ValueError(f"model.noise_multiplier={sigma!r} must be a number >= 0 or 'auto'")
        if args["clipping"] is not None and not isinstance(args["clipping"], ClipBoundEstimator):
            raise TypeError(
                f"model.clipping={args['clipping']!r} must be a clip-bound estimator, e.g. "
                "lit_dp.privacy.clipping.PrivateQuantile(...) or FixedClip(max_grad_norm=1.0)"
            )
        mech = args["noise_mechanism"]
        if mech is not None and not isinstance(mech, NoiseMechanism):
            raise TypeError(
                f"model.noise_mechanism={mech!r} must be a noise mechanism, e.g. "
                "lit_dp.privacy.noise_mechanism.BandedMF(bands=4), or null (independent noise)"
            )
        if args["optimizer"] is not None and not callable(args["optimizer"]):
            raise TypeError(
                f"model.optimizer={args['optimizer']!r} must be a callable taking the parameters, "
                "e.g. lit_dp.optim.DPAdamW or functools.partial(torch.optim.SGD, lr=0.05)"
            )
        if args["engine"] not in ENGINES:
            raise ValueError(f"model.engine={args['engine']!r} must be one of {ENGINES}")
        if args["max_physical_batch_size"] < 1:
            raise ValueError("model.max_physical_batch_size must be >= 1")
        if args["lora_rank"] < 0:
            raise ValueError("model.lora_rank must be >= 0 (0 = train all weights)")
        if not isinstance(args["secure_noise"], bool):
            raise TypeError(f"model.secure_noise={args['secure_noise']!r} must be true or false")

    def apply_privacy_plan(self, plan: PrivacyPlan) -> None:
        """Take sigma from the run's privacy plan (PrivacyAccounting.setup; a fork's again).

        The plan's sigma is a float: calibrated for ``noise_multiplier: auto``, else the given one.
        """
        self.privacy_plan = plan
        self.noise_multiplier = float(plan.noise_multiplier)

    def _sigma(self) -> float:
        if self.noise_multiplier is None:
            raise RuntimeError(
                "model.noise_multiplier=auto needs the PrivacyAccounting callback (privacy: "
                "section) to calibrate it; give a number or run through the lit-dp CLI"
            )
        return self.noise_multiplier

    def request_stop(self, reason: str) -> None:
        """Stop before the next step (budget enforcement); the reason goes into the report."""
        self._stop_reason = reason

    def configure_optimizers(self):
        # Lightning may call this more than once: it builds the optimizer, never wraps the model.
        params = [p for p in self.model.parameters() if p.requires_grad]
        try:
            opt = self._optimizer_factory(params)
        except ValueError as err:  # the optimizer names its argument; say where it is set
            raise ValueError(f"model.optimizer.init_args: {err}") from err
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(
                f"model.optimizer built {type(opt).__name__}, not a torch.optim.Optimizer"
            )
        if not self.private:  # no noise to correct: DP-AdamBC's correction is plain AdamW
            for group in opt.param_groups:
                if group.get("noise_correction"):
                    group["noise_correction"] = False
        # Read once here, not every step: whether each step must hand the optimizer its noise std.
        self.noise_correction = any(g.get("noise_correction", False) for g in opt.param_groups)
        self._built_optimizer = opt  # the report describes the optimizer that was built
        return opt

    def _optimizer(self) -> LightningOptimizer:
        opt = self.optimizers()
        if isinstance(opt, list):
            raise RuntimeError(f"DPCausalLM trains with one optimizer, got {len(opt)}")
        return opt

    def setup(self, stage: str) -> None:
        dm = self._datamodule()
        if self._trainer is not None:  # before Lightning's own DDP could wrap the model
            distributed.check_dp_strategy(self.trainer)
        if dm is not None and hasattr(dm, "num_units"):
            self._num_units = int(dm.num_units)
        # PrivacyAccounting.setup ran before this hook and applied the plan (HOOK_ORDER).
        if stage == "fit" and self.private and self.noise_multiplier is None:
            raise ValueError(
                "model.noise_multiplier=auto needs the PrivacyAccounting callback (privacy: "
                "section) to calibrate it; give a number or run through the lit-dp CLI"
            )
        self.model.config.use_cache = False  # a Hugging Face model (lit_dp.models.load_model)
        if stage == "fit" and self.noise_mechanism.bands > 1:
            # Banded MF's accounting needs its participation rule: cyclic Poisson sampling.
            if dm is None or not hasattr(dm, "set_participation"):
                raise ValueError(
                    "model.noise_mechanism with bands > 1 needs a lit_dp DataModule (it samples "
                    "the units cyclically in bands groups)"
                )
            dm.set_participation(bands=self.noise_mechanism.bands)
            schedule = getattr(dm, "schedule", None)
            if schedule is not None:  # b q_t <= 1 at the schedule's extremes (ValueError)
                for t in {0, schedule.ramp_steps}:
                    group_sample_rate(schedule.rate(t), self.noise_mechanism.bands)
        if stage == "fit" and self.private and dm is not None and getattr(dm, "schedule", None):
            # Fail before the first step if the mechanism cannot be built at some step of the
            # plan (e.g. private quantile clipping with too small an expected batch for its
            # count noise, which a decreasing batch ramp may reach only late).
            max_steps = self.trainer.max_steps if self._trainer is not None else -1
            check_smallest_batch(
                self.clip,
                noise_multiplier=self._sigma(),
                schedule=dm.schedule,
                num_units=int(self._num_units or 0),
                num_steps=max_steps if max_steps and max_steps > 0 else None,
            )

    def _generator(self) -> NoiseGenerator:
        if self._noise_generator is None:
            seed = None if self._fork else self.hparams["noise_seed"]  # a fork: OS entropy
            gen: NoiseGenerator
            if self.hparams.get("secure_noise", False):
                key = SecureNoiseGenerator.create(seed).key
                gen = SecureNoiseGenerator(broadcast_bytes(key, self.device))  # rank 0's key
            else:
                gen, seed = make_generator(seed, device=self.device)
                seed = broadcast_int(seed, self.device)  # identical noise on every rank
                gen.manual_seed(seed)
            if self._pending_generator_state is not None:
                load_generator_state(gen, self._pending_generator_state)
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
        self.log(
            "train/loss",
            record.loss,
            on_step=True,
            on_epoch=False,
            prog_bar=True,
            batch_size=max(1, record.batch_size),
        )
        self.log("train/batch_size", float(record.batch_size), on_step=True, on_epoch=False)
        if self.private:
            self.log("privacy/clip_bound", record.max_grad_norm, on_step=True, on_epoch=False)
            if record.clip_rate is not None:
                self.log("privacy/clip_rate", record.clip_rate, on_step=True, on_epoch=False)

    def _dp_step(self, batch: dict[str, Any]) -> DPStepRecord:
        if self._num_units is None:
            raise RuntimeError(
                "DPCausalLM needs a lit_dp DataModule (num_units) to train privately"
            )
        sample_rate = float(batch["sample_rate"])
        expected = sample_rate * self._num_units
        sigma = self._sigma()
        # 1-6. Clip, sum (across ranks), noise, divide by q * N, update C: lit_dp.privacy.mechanism.
        step = privatize(
            self.model,
            batch,
            clip=self.clip,
            noise_multiplier=sigma,
            expected_batch_size=expected,
            generator=self._generator(),
            engine=self.engine,
            max_rows=self.max_physical_batch_size,
            noise=self.noise_mechanism,
        )
        # 7. The optimizer step (lr set by ClipDrivenLR): post-processing of the private gradient.
        for n, p in self.model.named_parameters():
            if p.requires_grad:
                p.grad = step.grads[n].to(p.dtype)
        opt = self._optimizer()
        if self.noise_correction:
            cast(DPAdamW, opt.optimizer).set_noise_std(step.noise_std)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if self.diagnostics and step.norms.numel():
            finite = step.norms[torch.isfinite(step.norms)]
            self.log("diagnostics/raw_norm_median", finite.median() if finite.numel() else math.nan)
            self.log(
                "diagnostics/raw_clip_fraction", (step.norms > step.max_grad_norm).float().mean()
            )
        return DPStepRecord(
            step=self.global_step - 1,
            private=True,
            sample_rate=sample_rate,
            noise_multiplier=sigma,
            grad_noise_multiplier=step.grad_noise_multiplier,
            max_grad_norm=step.max_grad_norm,
            expected_batch_size=expected,
            clip_rate=step.clip_rate,
            batch_size=step.batch_size,
            loss=self._mean_loss(step.losses),
            num_nonfinite=step.num_nonfinite,
        )

    def _nonprivate_step(self, batch: dict[str, Any]) -> DPStepRecord:
        rows = int(batch["input_ids"].shape[0])
        opt = self._optimizer()
        losses = []
        for micro in split_micro_batches(batch, self.max_physical_batch_size):
            logits = self.model(
                input_ids=micro["input_ids"], attention_mask=micro["attention_mask"]
            ).logits
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
            step=self.global_step - 1,
            private=False,
            sample_rate=float(batch.get("sample_rate", 1.0)),
            noise_multiplier=0.0,
            grad_noise_multiplier=0.0,
            max_grad_norm=math.inf,
            expected_batch_size=float(rows),
            clip_rate=None,
            batch_size=rows,
            loss=self._mean_loss(losses_t),
            num_nonfinite=0,
        )

    @staticmethod
    def _mean_loss(losses: torch.Tensor) -> float:
        finite = losses[torch.isfinite(losses)]
        return float(finite.mean()) if finite.numel() else math.nan

    # --- privacy description (for the report) and checkpoints --------------------------------
    def privacy_description(self) -> dict[str, Any]:
        clip = self.clip.describe()
        if not self.private:  # the baseline never clips: nothing is bounded, nothing covered
            clip = {
                **clip,
                "name": "none",
                "parameters": {},
                "max_grad_norm": None,
                "covered_by_dp": False,
                "note": "private: false: gradients are not clipped",
            }
        not_covered = [
            "train/loss and train/batch_size logs (raw, operator-side)",
            "validation/test metrics (computed on held-out data without noise)",
            "checkpoints (hold the noise and sampler generator states and any correlated-noise "
            "buffers; keep them private)",
        ]
        if self.diagnostics:
            not_covered.append(
                "diagnostics/* logs: raw per-unit norm statistics (diagnostics: true)"
            )
        if not self.private:
            covers = "nothing: private=false (non-private baseline)"
        elif not self.clip.covered_by_dp:
            covers = (
                "nothing: the clip bound is a percentile of raw per-unit norms "
                "(history_percentile), so epsilon is not a guarantee for the weights"
            )
            not_covered.append("clip bound C_t and privacy/clip_rate (raw norm history)")
        else:
            covers = (
                "model weights and everything derived from them (EMA weights, exported "
                "model, generations, privatized clip rate and clip bound) for add/remove of "
                "one privacy unit"
            )
        return {
            "clipping": clip,
            "engine": self.engine,
            "noise_multiplier_accounted": self.noise_multiplier,
            "noise_sampler": describe_noise_sampler(
                secure=self.hparams.get("secure_noise", False),
                seed_fixed=self.hparams["noise_seed"] is not None,
            ),
            **describe_optimizer(self._optimizer_factory, getattr(self, "_built_optimizer", None)),
            "noise_correction": self.noise_correction,
            "covers": covers,
            "not_covered": not_covered,
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lit_dp"] = {
            "clip": self.clip.state_dict(),
            "noise_multiplier": self.noise_multiplier,
            "noise_generator": generator_state(self._generator()) if self.private else None,
            "noise_mechanism": self.noise_mechanism.state_dict(),  # noise buffers: private
            "num_nonfinite_total": self.num_nonfinite_total,
            "val_history": self.val_history,
        }

    def reseed_noise_for_fork(self) -> None:
        """Drop the restored noise generator state: a fork draws fresh noise from OS entropy.

        Called by PrivacyAccounting after the checkpoint is restored, for ``lit-dp fit --fork``:
        the parent's continuation and the fork must never share a noise draw.
        """
        self._fork = True
        self._pending_generator_state = None
        self._noise_generator = None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["lit_dp"]
        self.clip.load_state_dict(state["clip"])
        self.noise_multiplier = state["noise_multiplier"]
        self._pending_generator_state = state["noise_generator"]
        self._noise_generator = None
        self.noise_mechanism.load_state_dict(state.get("noise_mechanism", {}))
        self.num_nonfinite_total = state["num_nonfinite_total"]
        self.val_history = state["val_history"]


def describe_optimizer(factory: Any, built: torch.optim.Optimizer | None) -> dict[str, Any]:
    """``optimizer`` (the class path) and ``optimizer_hyperparameters`` (its scalar defaults).

    Read from the built optimizer; before it is built, from the factory (a class, or a
    ``functools.partial`` of one, as jsonargparse and Python callers give it).
    """
    if built is not None:
        cls, params = type(built), dict(built.defaults)
    else:
        parts = [factory, *getattr(factory, "args", ()), getattr(factory, "func", None)]
        cls = next((c for c in parts if isinstance(c, type)), type(factory))
        params = dict(getattr(factory, "keywords", {}) or {})
    scalars = (bool, int, float, str)
    hyper = {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in params.items()
        if isinstance(v, scalars)
        or (isinstance(v, tuple) and all(isinstance(x, scalars) for x in v))
    }
    return {"optimizer": f"{cls.__module__}.{cls.__qualname__}", "optimizer_hyperparameters": hyper}
