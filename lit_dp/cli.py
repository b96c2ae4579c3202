"""``lit-dp fit|validate|test --config configs/X.yaml``: the only place components are wired.

The three DP callbacks are always present (config sections ``ema:``, ``clip_lr:``,
``privacy:``); the tokenizer follows the model source; Lightning's DistributedSampler is off
(batches are Poisson-sampled); ``ddp`` runs lit_dp's DDP strategy, which exchanges clipped sums
only; strategies without a DP implementation are refused instead of run without privacy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.strategies import StrategyRegistry

from lit_dp.callbacks.accounting import PrivacyAccounting
from lit_dp.callbacks.clip_lr import ClipDrivenLR
from lit_dp.callbacks.ema import EMAWeights
from lit_dp.data.datamodule import DPDataModule
from lit_dp.distributed import DPDDPStrategy
from lit_dp.module import DPCausalLM

if "dp_ddp" not in StrategyRegistry:
    StrategyRegistry.register("dp_ddp", DPDDPStrategy, description="DDP exchanging clipped sums only")
    StrategyRegistry.register(
        "dp_ddp_spawn", DPDDPStrategy, description="dp_ddp, spawned", start_method="spawn"
    )

# Strategy names a user may write, and what lit_dp runs for them.
_STRATEGY_MAP = {"auto": "auto", "single_device": "auto", "ddp": "dp_ddp", "dp_ddp": "dp_ddp",
                 "ddp_spawn": "dp_ddp_spawn", "dp_ddp_spawn": "dp_ddp_spawn"}


def check_trainer_config(trainer_cfg) -> None:
    """Refuse trainer settings that would break the DP step or its accounting."""
    strategy = trainer_cfg.get("strategy", "auto")
    if not isinstance(strategy, str) or strategy not in _STRATEGY_MAP:
        name = strategy if isinstance(strategy, str) else type(strategy).__name__
        raise ValueError(
            f"trainer.strategy={name!r} is not supported by lit_dp yet (FSDP and DeepSpeed have no "
            f"DP implementation here); use one of {sorted(_STRATEGY_MAP)}"
        )
    trainer_cfg["strategy"] = _STRATEGY_MAP[strategy]
    if trainer_cfg.get("accumulate_grad_batches", 1) != 1:
        raise ValueError(
            "trainer.accumulate_grad_batches must be 1: lit_dp accumulates physical micro-batches "
            "inside one logical Poisson batch (model.max_physical_batch_size)"
        )
    if trainer_cfg.get("gradient_clip_val") not in (None, 0, 0.0):
        raise ValueError("trainer.gradient_clip_val must be unset: lit_dp clips per privacy unit")
    if trainer_cfg.get("use_distributed_sampler", False):
        raise ValueError("trainer.use_distributed_sampler must be false: batches are Poisson-sampled")


class LitDPCLI(LightningCLI):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"default_env": False})
        super().__init__(DPCausalLM, DPDataModule, *args, subclass_mode_data=True, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(EMAWeights, "ema")
        parser.add_lightning_class_args(ClipDrivenLR, "clip_lr")
        parser.add_lightning_class_args(PrivacyAccounting, "privacy")
        parser.link_arguments("model.model", "data.init_args.tokenizer")
        parser.link_arguments("model.target_clip_rate", "clip_lr.target_clip_rate")
        parser.set_defaults(
            {
                "trainer.use_distributed_sampler": False,
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": "lit_dp"},
                },
            }
        )

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        check_trainer_config(cfg["trainer"])

    def after_fit(self) -> None:
        log_dir = Path(self.trainer.log_dir or ".")  # a collective under DDP: all ranks ask
        if self.trainer.global_rank == 0:
            print(run_summary(self.trainer, self.model, log_dir))


def run_summary(trainer, model: DPCausalLM, log_dir: Path) -> str:
    """The lines a person reads at the end of a run: epsilon, losses before/after, files."""
    acct = next((cb for cb in trainer.callbacks if isinstance(cb, PrivacyAccounting)), None)
    lines = ["", "=" * 72, "lit_dp run summary"]
    report_path = log_dir / (acct.report_name if acct else "privacy_report.json")
    if report_path.exists():
        report = json.loads(report_path.read_text())
        if report["private"]:
            eps = report["epsilon"]
            eps_s = "inf" if eps is None else f"{eps:.4f}"
            lines.append(
                f"privacy: epsilon = {eps_s} at delta = {report['delta']:.3g} "
                f"({report['privacy_unit']}-level, {report['steps']} steps, "
                f"noise_multiplier = {report['noise_multiplier']})"
            )
            if report.get("accountant") == "pld" and report.get("epsilon_rdp") is not None:
                lines.append(f"accountant: PLD (RDP, looser, would bound the same steps at epsilon = "
                             f"{report['epsilon_rdp']:.4f})")
            lines.append(f"covers: {report['covers']}")
        else:
            lines.append("privacy: NONE (private: false, non-private baseline)")
        lines.append(f"stopped: {report['stop_reason']}")
        lines.append(f"privacy report: {report_path}")
    hist = model.val_history
    if hist:
        before, after = hist[0], hist[-1]
        lines.append(
            f"validation loss: before = {before['loss_ema']:.4f} (step {before['step']}), "
            f"after = {after['loss_ema']:.4f} EMA / {after['loss_raw']:.4f} raw (step {after['step']})"
        )
        if math.isfinite(after["loss_ema"]):
            lines.append(f"validation perplexity after (EMA): {math.exp(after['loss_ema']):.2f}")
    export = getattr(model, "export_path", None)
    if export:
        lines.append(f"exported EMA model: {export}")
    lines.append("=" * 72)
    return "\n".join(lines)


def main(args: list[str] | None = None) -> None:
    import sys

    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["generate"]:
        from lit_dp.generate import main as generate_main

        generate_main(argv[1:])
        return
    if argv[:1] == ["plan"]:  # parses the config like fit, builds no model, trains nothing
        from lit_dp.plan import main as plan_main

        plan_main(argv[1:])
        return
    LitDPCLI(args=args)


if __name__ == "__main__":
    main()
