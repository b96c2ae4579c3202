"""``lit-dp``: the command dispatcher.

``fit``, ``validate`` and ``test`` go to the LightningCLI (``lit_dp.cli``); ``plan`` prints a
run's privacy cost from its config without building a model (``lit_dp.plan``); ``generate``
samples an exported model (``lit_dp.generate``). Kept apart from ``lit_dp.cli`` because ``plan``
reads configs with the CLI's own parser.

A bad flag or config value ends in one line on stderr naming the field and the fix (exit status
2 for a flag the parser refuses, 1 for a value refused while the run is built); ``--debug`` (or
``LIT_DP_DEBUG=1``) shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

# Every command, with the line ``lit-dp --help`` gives it.
COMMANDS = {
    "fit": "train with differential privacy (or the non-private baseline), then print epsilon, "
    "write the privacy report and export the model",
    "plan": "print what a config will cost in privacy (N, sample rate, noise, epsilon) "
    "without training or loading the model",
    "generate": "write an exported model's responses to a JSONL file of prompts",
    "validate": "validation loss of a model or a checkpoint (--ckpt_path); no training",
    "test": "test loss of a model or a checkpoint (--ckpt_path); no training",
}

USAGE = f"""usage: lit-dp <command> [options]

Differentially private fine-tuning of small causal language models.

commands:
{chr(10).join(f"  {name:<9} {line}" for name, line in COMMANDS.items())}

Run `lit-dp <command> --help` for a command's options, e.g.
  lit-dp plan --config configs/quickstart.yaml
  lit-dp fit --config configs/quickstart.yaml
Add --debug (or set LIT_DP_DEBUG=1) to see the full traceback of an error."""


def _debug(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("LIT_DP_DEBUG", "") not in ("", "0")


def main(args: list[str] | None = None) -> None:
    """Run ``lit-dp <command> ...`` with ``args`` (default: the process's arguments)."""
    from lit_dp.cli_errors import closest

    argv = list(sys.argv[1:] if args is None else args)
    debug = _debug(argv)
    argv = [a for a in argv if a != "--debug"]
    command = argv[0] if argv else None
    if command in (None, "-h", "--help"):
        print(USAGE)
        return
    if command not in COMMANDS:
        guess = closest(str(command), COMMANDS)
        hint = f"did you mean '{guess}'? " if guess else ""
        print(
            f"lit-dp: unknown command {command!r}; {hint}(commands: {', '.join(COMMANDS)}; "
            "lit-dp --help describes them)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    try:
        _run(command, argv)
    except KeyboardInterrupt:  # before training started (fit handles its own Ctrl-C)
        print(f"lit-dp {command}: interrupted (Ctrl-C)", file=sys.stderr)
        raise SystemExit(130) from None
    except (ValueError, TypeError, OSError, argparse.ArgumentError) as err:
        if debug:
            raise
        from lit_dp.cli_errors import CommandLineError, one_line

        usage = isinstance(err, CommandLineError | argparse.ArgumentError)
        message = str(err) if isinstance(err, CommandLineError) else one_line(err)
        hint = f"lit-dp {command} --help lists the options" if usage else "--debug shows why"
        print(
            f"lit-dp {command}: error: {message} ({hint})",
            file=sys.stderr,
        )
        raise SystemExit(2 if usage else 1) from None


def _run(command: str, argv: list[str]) -> None:
    if command == "generate":
        from lit_dp.generate import main as generate_main

        generate_main(argv[1:])
        return
    if command == "plan":  # parses the config like fit, builds no model, trains nothing
        from lit_dp.plan import main as plan_main

        plan_main(argv[1:])
        return
    from lit_dp.cli import LitDPCLI

    try:
        with warnings.catch_warnings():
            # LightningCLI warns when sys.argv and args are both given; `lit-dp` passes its own.
            warnings.filterwarnings("ignore", message=".*args parameter is intended")
            LitDPCLI(args=argv)
    finally:
        close_process_group()


def close_process_group() -> None:
    """End a multi-process run's process group while every rank is still alive.

    Left to interpreter shutdown, the gloo group's threads can be torn down after the objects they
    use, and the process aborts ("terminate called without an active exception") after a run that
    finished: the barrier lets every rank finish its last collective, then the group is destroyed.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
