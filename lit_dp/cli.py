"""``lit-dp fit|validate|test --config configs/X.yaml``: the only place components are wired.

The three DP callbacks and the audit, export and checkpoint callbacks are always present (config
sections ``ema:``, ``clip_lr:``, ``audit:`` (off unless audit.num_canaries > 0), ``privacy:``,
``export:`` (``dirpath: null`` = no export), ``checkpoint:``); the tokenizer follows the model
source; Lightning's DistributedSampler is off (batches are Poisson-sampled); ``ddp``, and any run on
several devices or nodes, runs lit_dp's DDP strategy, which exchanges clipped sums only;
strategies without a DP implementation, and fp16 mixed precision (its GradScaler would rescale
the privatized gradient), are refused instead of run without privacy.

Runs are written to ``<save_dir>/lit_dp/version_N`` (save_dir = ``trainer.default_root_dir``
when given, else ``runs``), with ``checkpoints/last.ckpt`` saved at every validation and at the
end; ``--ckpt_path last`` resumes the newest run in its own directory.
"""

from __future__ import annotations

import logging
import math
import re
import shlex
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.utilities import rank_zero_info

from lit_dp.callbacks.accounting import PrivacyAccounting
from lit_dp.callbacks.audit import AuditCanaries
from lit_dp.callbacks.clip_lr import ClipDrivenLR
from lit_dp.callbacks.console import ValidationLines, is_terminal, progress_bar
from lit_dp.callbacks.ema import EMAWeights
from lit_dp.callbacks.export import ExportModel
from lit_dp.callbacks.interrupts import GracefulInterrupt
from lit_dp.checkpoint import LAST_CHECKPOINT, DPModelCheckpoint, find_last_checkpoint
from lit_dp.cli_errors import CommandLineError, explain_parse_error
from lit_dp.data.datamodule import DPDataModule
from lit_dp.distributed import DPDDPStrategy
from lit_dp.module import DPCausalLM
from lit_dp.report import section_summary_lines, summary_lines
from lit_dp.threads import set_torch_threads

if "dp_ddp" not in StrategyRegistry:
    StrategyRegistry.register(
        "dp_ddp", DPDDPStrategy, description="DDP exchanging clipped sums only"
    )
    StrategyRegistry.register(
        "dp_ddp_spawn", DPDDPStrategy, description="dp_ddp, spawned", start_method="spawn"
    )

# Strategy names a user may write, and what lit_dp runs for them.
_STRATEGY_MAP = {
    "auto": "auto",
    "single_device": "auto",
    "ddp": "dp_ddp",
    "dp_ddp": "dp_ddp",
    "ddp_spawn": "dp_ddp_spawn",
    "dp_ddp_spawn": "dp_ddp_spawn",
}


# trainer.precision values that run Lightning's GradScaler (fp16 mixed precision).
_FP16_MIXED = {"16", "16-mixed"}


def _devices_per_node(accelerator: Any, devices: Any) -> int | None:
    """How many processes per node Lightning starts for ``trainer.devices``.

    None: unknown, left to Lightning to validate.
    """
    if isinstance(devices, list | tuple):
        return len(devices)
    text = str(devices).strip()
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    if text in ("auto", "-1"):  # every device of the accelerator
        import torch

        name = accelerator if isinstance(accelerator, str) else "auto"
        if name in ("auto", "gpu", "cuda") and torch.cuda.is_available():
            return torch.cuda.device_count()
        return 1
    try:
        return int(text)
    except ValueError:
        return None


def check_trainer_config(trainer_cfg) -> None:
    """Refuse trainer settings that would break the DP step or its accounting.

    Also map strategy names to the DP implementations (every multi-process run to ``dp_ddp``).
    """
    strategy = trainer_cfg.get("strategy", "auto")
    if not isinstance(strategy, str) or strategy not in _STRATEGY_MAP:
        name = strategy if isinstance(strategy, str) else type(strategy).__name__
        raise ValueError(
            f"trainer.strategy={name!r} is not supported by lit_dp yet (FSDP and DeepSpeed have no "
            f"DP implementation here); use one of {sorted(_STRATEGY_MAP)}"
        )
    strategy = _STRATEGY_MAP[strategy]
    per_node = _devices_per_node(
        trainer_cfg.get("accelerator", "auto"), trainer_cfg.get("devices", "auto")
    )
    nodes = trainer_cfg.get("num_nodes") or 1
    if strategy == "auto" and (nodes > 1 or (per_node or 1) > 1):
        # Lightning's "auto" would pick its own DDP, which all-reduces raw gradients.
        strategy = "dp_ddp"
    trainer_cfg["strategy"] = strategy
    if str(trainer_cfg.get("precision")) in _FP16_MIXED:
        raise ValueError(
            f"trainer.precision={trainer_cfg.get('precision')!r} (fp16 mixed precision) is "
            "refused: its GradScaler would unscale the already privatized gradient and skip "
            "steps on overflow. Use trainer.precision: bf16-mixed (needs no scaler) or 32-true"
        )
    if trainer_cfg.get("accumulate_grad_batches", 1) != 1:
        raise ValueError(
            "trainer.accumulate_grad_batches must be 1: lit_dp accumulates physical micro-batches "
            "inside one logical Poisson batch (model.max_physical_batch_size)"
        )
    if trainer_cfg.get("gradient_clip_val") not in (None, 0, 0.0):
        raise ValueError("trainer.gradient_clip_val must be unset: lit_dp clips per privacy unit")
    if trainer_cfg.get("use_distributed_sampler", False):
        raise ValueError(
            "trainer.use_distributed_sampler must be false: batches are Poisson-sampled"
        )


_DEFAULT_SAVE_DIR = "runs"
_LOGGER_CLASS = "lightning.pytorch.loggers.TensorBoardLogger"


def follow_default_root_dir(trainer_cfg) -> None:
    """The default logger's save_dir follows ``trainer.default_root_dir`` when it is given.

    This is Lightning's convention; the run, its report and checkpoints then live under it. An
    explicitly configured save_dir other than the default ``runs`` is kept.
    """
    root, logger = trainer_cfg.get("default_root_dir"), trainer_cfg.get("logger")
    init = getattr(logger, "init_args", None)
    if root is not None and init is not None and init.get("save_dir") == _DEFAULT_SAVE_DIR:
        init["save_dir"] = str(root)


def resolve_last_checkpoint(cfg, *, continue_run: bool = True) -> str:
    """``ckpt_path: last``: the ``last.ckpt`` of the newest run (or of the logger version given).

    The run then continues in its own directory (the logger's version is set to it, unless
    ``continue_run`` is false: a fork writes a new run). Lightning's own lookup searches the new
    run's empty directory and silently starts from scratch; this refuses instead. A checkpoint of
    another run (other config or data) is refused at setup, naming what changed
    (lit_dp.fingerprint).
    """
    trainer_cfg = cfg["trainer"]
    root = Path(trainer_cfg.get("default_root_dir") or ".")
    dirpath = cfg.get("checkpoint", {}).get("dirpath")
    logger = trainer_cfg.get("logger")
    logger = logger[0] if isinstance(logger, list) and logger else logger  # log_dir: the first
    init = getattr(logger, "init_args", None)
    path: Path | None
    if dirpath is not None:
        path = Path(dirpath) / LAST_CHECKPOINT
        where = str(path)
    elif init is not None and init.get("save_dir") is not None:
        runs = Path(init["save_dir"]) / str(init.get("name") or "")
        version = init.get("version")
        if version is not None:  # the user named the run to resume
            name = version if isinstance(version, str) else f"version_{version}"
            path = runs / name / "checkpoints" / LAST_CHECKPOINT
            where = str(path)
            if not continue_run:  # a fork never writes into the run it forks
                init["version"] = None
        else:
            path = find_last_checkpoint(runs)
            where = str(runs / "*" / "checkpoints" / LAST_CHECKPOINT)
            if path is not None and continue_run:
                name = path.parent.parent.name
                match = re.fullmatch(r"version_(\d+)", name)
                init["version"] = int(match.group(1)) if match else name
    elif logger is True:  # Lightning's default logger: <root>/lightning_logs/version_N
        path = find_last_checkpoint(root / "lightning_logs")
        where = str(root / "lightning_logs" / "*" / "checkpoints" / LAST_CHECKPOINT)
    else:  # no logger: Lightning saves under default_root_dir
        path = root / "checkpoints" / LAST_CHECKPOINT
        where = str(path)
    if path is None or not path.is_file():
        raise ValueError(
            f"ckpt_path=last: no checkpoint found at {where}; start the run without --ckpt_path "
            "(checkpoints are saved at every validation and at the end), or give a checkpoint path"
        )
    return str(path)


class LitDPCLI(LightningCLI):
    """The ``lit-dp`` LightningCLI: DPCausalLM, a DPDataModule subclass, and the DP callbacks."""

    def __init__(self, **kwargs: Any) -> None:
        quiet_third_party_output()
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # Parse errors are raised (and explained in one line by parse_arguments), not printed
        # with the whole usage text.
        kwargs.setdefault("parser_kwargs", {"default_env": False, "exit_on_error": False})
        # No top-level --optimizer/--lr_scheduler: they would replace the DP optimizer and the
        # lr schedule (model.optimizer and clip_lr are the options; cli_errors says so).
        kwargs.setdefault("auto_configure_optimizers", False)
        args = kwargs.get("args")
        self.command_line = list(sys.argv[1:] if args is None else args)  # the resume command
        super().__init__(DPCausalLM, DPDataModule, subclass_mode_data=True, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # No predict: DPCausalLM has no predict_step (lit-dp generate samples an export).
        commands = LightningCLI.subcommands()
        commands.pop("predict", None)
        return commands

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:  # one line naming the flag, with "did you mean"
            raise CommandLineError(explain_parse_error(err, parser, args)) from err

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(EMAWeights, "ema")
        parser.add_lightning_class_args(ClipDrivenLR, "clip_lr")
        parser.add_lightning_class_args(AuditCanaries, "audit")  # before privacy: adds to N
        parser.add_lightning_class_args(PrivacyAccounting, "privacy")
        parser.add_lightning_class_args(ExportModel, "export")  # after privacy: needs its report
        parser.add_lightning_class_args(DPModelCheckpoint, "checkpoint")
        parser.link_arguments("model.model", "data.init_args.tokenizer")
        parser.add_argument(
            "--fork",
            action="store_true",
            help="with --ckpt_path (fit): continue the checkpoint's weights as a new run with "
            "fresh noise; its epsilon includes the checkpoint's steps",
        )
        parser.add_argument(
            "--threads",
            type=int | None,
            default=None,
            help="CPU threads per process; null: the cores other jobs leave free (lit_dp.threads)",
        )
        parser.set_defaults(
            {
                "trainer.use_distributed_sampler": False,
                "trainer.enable_model_summary": False,  # a table of parameter counts per module
                "trainer.logger": {
                    "class_path": _LOGGER_CLASS,
                    "init_args": {"save_dir": _DEFAULT_SAVE_DIR, "name": "lit_dp"},
                },
            }
        )

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        check_trainer_config(cfg["trainer"])
        follow_default_root_dir(cfg["trainer"])
        if cfg.get("fork") and (self.subcommand != "fit" or not cfg.get("ckpt_path")):
            raise ValueError("--fork needs `lit-dp fit` and --ckpt_path: the checkpoint to fork")
        trainer_cfg = cfg["trainer"]
        on_cpu = trainer_cfg.get("accelerator") == "cpu" or not torch.cuda.is_available()
        per_node = _devices_per_node(trainer_cfg.get("accelerator"), trainer_cfg.get("devices"))
        note = set_torch_threads(cfg.get("threads"), processes=(per_node or 1) if on_cpu else 1)
        if note:
            rank_zero_info(note)
        if self.subcommand == "fit" and cfg.get("ckpt_path") == "last":
            cfg["ckpt_path"] = resolve_last_checkpoint(cfg, continue_run=not cfg.get("fork"))

    def before_fit(self) -> None:
        # The checkpoint must be of this run (or forked explicitly): checked here, before
        # Lightning writes anything into the run directory (lit_dp.callbacks.resume).
        cfg = self.config[self.subcommand]
        for callback in getattr(self.trainer, "callbacks", []):
            if isinstance(callback, PrivacyAccounting):
                callback.resume_from(cfg.get("ckpt_path"), fork=bool(cfg.get("fork")))
                if cfg.get("ckpt_path"):
                    self.datamodule.setup("fit")  # the fingerprint hashes the units
                    callback.resume.setup(self.trainer, self.model, self.datamodule, callback)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        # trainer.enable_checkpointing: false turns the always-present checkpoint callback off
        # (Lightning refuses a ModelCheckpoint callback together with that flag).
        if config.get("enable_checkpointing") is False:
            callbacks = [cb for cb in callbacks if not isinstance(cb, DPModelCheckpoint)]
        extra: list = [GracefulInterrupt()]
        # A bar in a terminal; with the output redirected, a line per validation instead.
        if not is_terminal():
            config["enable_progress_bar"] = False
        if config.get("enable_progress_bar") is False:
            extra.append(ValidationLines())
        elif not any(isinstance(cb, ProgressBar) for cb in callbacks):
            extra.append(progress_bar())
        return super()._instantiate_trainer(config, [*callbacks, *extra])

    def after_fit(self) -> None:
        log_dir = Path(self.trainer.log_dir or ".")  # a collective under DDP: all ranks ask
        if self.trainer.global_rank == 0:
            print(run_summary(self.trainer, self.model, log_dir))

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except (SystemExit, KeyboardInterrupt):  # Lightning ends a signalled run with SystemExit
            callbacks = getattr(self.trainer, "callbacks", [])
            hook = next((cb for cb in callbacks if isinstance(cb, GracefulInterrupt)), None)
            if subcommand != "fit" or hook is None or hook.signal_name is None:
                raise
            if self.trainer.global_rank == 0:
                log_dir = Path(self.trainer.default_root_dir)
                print(run_summary(self.trainer, self.model, log_dir, self.command_line), flush=True)
            raise SystemExit(hook.exit_code) from None


# Lightning's info lines that are not about the run (advertising, absent accelerators, and
# seed_everything's seed, which seeds the model's initialization but reads as if it seeded the
# noise).
_NOISE = re.compile(
    r"💡 Tip:|(GPU|TPU|HPU) available: False|LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES|"
    r"^Seed set to \d+$"
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _NOISE.search(record.getMessage())


def quiet_third_party_output() -> None:
    """Keep the run's output to what is about the run.

    Drop Lightning's tips and accelerator-availability lines, third-party deprecation and future
    warnings, and the transformers progress bars. lit_dp's own warnings and Lightning's warnings
    about the user's configuration stay.
    """
    from lightning.fabric.utilities.rank_zero import LightningDeprecationWarning

    for name in (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric.utilities.rank_zero",
        "lightning.fabric.utilities.seed",
    ):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in log.filters):
            log.addFilter(_DropNoise())
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
        warnings.filterwarnings("default", category=category, module=r"lit_dp(\.|$)")
    warnings.filterwarnings("default", category=LightningDeprecationWarning)  # about the config
    from lit_dp.models import disable_progress_bars

    disable_progress_bars()


def run_summary(
    trainer, model: DPCausalLM, log_dir: Path, command_line: list[str] | None = None
) -> str:
    """The lines a person reads at the end of a run: epsilon, losses before/after, files.

    An interrupted run ends with its last checkpoint and the command (``command_line`` with
    ``--ckpt_path last``) that resumes it.
    """
    acct = next((cb for cb in trainer.callbacks if isinstance(cb, PrivacyAccounting)), None)
    lines = ["", "=" * 72, "lit_dp run summary"]
    report = model.privacy_report  # handed over in memory by PrivacyAccounting at the end of fit
    if report is None and acct is not None:  # interrupted: the report written at the interrupt
        report = acct.last_report
    if report is not None:
        report_path = getattr(acct, "report_path", log_dir / "privacy_report.json")
        lines += summary_lines(report, report_path, section_summary_lines(trainer.callbacks))
    hist = model.val_history
    if hist:
        before, after = hist[0], hist[-1]
        lines.append(
            f"validation loss: before = {before['loss_ema']:.4f} (step {before['step']}), "
            f"after = {after['loss_ema']:.4f} EMA / {after['loss_raw']:.4f} raw (step "
            f"{after['step']})"
        )
        if math.isfinite(after["loss_ema"]):
            lines.append(f"validation perplexity after (EMA): {math.exp(after['loss_ema']):.2f}")
    exporter = next((cb for cb in trainer.callbacks if isinstance(cb, ExportModel)), None)
    export = exporter.export_path if exporter is not None else None
    if export:
        lines.append(f"exported EMA model: {export}")
    if report is not None and report.get("interrupted"):
        lines += resume_hint(trainer, command_line or [])
    else:
        last = getattr(trainer.checkpoint_callback, "last_model_path", "")
        if last:
            lines.append(f"checkpoint: {last} (--ckpt_path last resumes from it)")
    lines.append("=" * 72)
    return "\n".join(lines)


def resume_hint(trainer, command_line: list[str]) -> list[str]:
    """What an interrupted run prints last: its checkpoint and the command that resumes it."""
    last = getattr(trainer.checkpoint_callback, "last_model_path", "") or ""
    last = last or trainer.ckpt_path or ""  # none saved since the checkpoint it resumed from
    if not last or not Path(last).is_file():
        return [
            "no checkpoint was saved before the interrupt (one is saved at every validation): "
            "rerun the same command to start over"
        ]
    args, skip = [], False
    for arg in command_line:  # the same command, with --ckpt_path last
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            args.append(arg)
    command = shlex.join(["lit-dp", *args, "--ckpt_path", "last"])
    return [f"last checkpoint: {last}", f"resume with: {command}"]
