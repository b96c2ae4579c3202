"""``lit-dp``: the command dispatcher.

``fit``, ``validate`` and ``test`` go to the LightningCLI (``lit_dp.cli``); ``plan`` prints a
run's privacy cost from its config without building a model (``lit_dp.plan``); ``generate``
samples an exported model (``lit_dp.generate``). Kept apart from ``lit_dp.cli`` because ``plan``
reads configs with the CLI's own parser.
"""

from __future__ import annotations

import sys


def main(args: list[str] | None = None) -> None:
    """Run ``lit-dp <command> ...`` with ``args`` (default: the process's arguments)."""
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["generate"]:
        from lit_dp.generate import main as generate_main

        generate_main(argv[1:])
        return
    if argv[:1] == ["plan"]:  # parses the config like fit, builds no model, trains nothing
        from lit_dp.plan import main as plan_main

        plan_main(argv[1:])
        return
    from lit_dp.cli import LitDPCLI

    try:
        LitDPCLI(args=args)
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
