"""Ctrl-C and SIGTERM end a run at a step boundary, with a report, a summary and a failing status.

Lightning ends a run on SIGTERM after the current step but exits 0 without a report (so
``lit-dp fit && lit-dp generate`` carried on), and on Ctrl-C stops wherever the interrupt lands
and exits 1. Here the first Ctrl-C asks for the same stop as SIGTERM (after the step in progress,
on every rank at the same step: Lightning broadcasts rank 0's flag under DDP); a second Ctrl-C
stops at once. ``PrivacyAccounting`` then writes the report marked "interrupted" and the CLI
prints the summary so far and exits 130 (SIGINT) or 143 (SIGTERM), the shell's convention.
"""

from __future__ import annotations

import functools
import signal
import sys
import threading
from typing import Any

import lightning as L

# The shell's exit status of a process ended by the signal: 128 + its number.
EXIT_CODES = {"SIGINT": 128 + signal.SIGINT, "SIGTERM": 128 + signal.SIGTERM}


class GracefulInterrupt(L.Callback):
    """Turns Ctrl-C into a stop after the current step and remembers which signal ended the run.

    ``signal_name`` is "SIGINT" or "SIGTERM" once one arrived during fit (None otherwise);
    ``immediate`` is True when a second Ctrl-C stopped the run inside a step.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.immediate = False
        self._previous: dict[int, Any] = {}

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.signal_name or "SIGINT"]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        self.signal_name, self.immediate = None, False
        # Lightning has set its SIGTERM handler (after on_fit_start); this one runs before it.
        for signum, handler in (
            (signal.SIGINT, self._on_sigint),
            (signal.SIGTERM, self._on_sigterm),
        ):
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, functools.partial(handler, trainer))

    def _on_sigint(self, trainer: L.Trainer, signum: int, frame: Any) -> None:
        if self.signal_name is not None:  # the second Ctrl-C: stop inside the step
            self.immediate = True
            raise KeyboardInterrupt
        self.signal_name = "SIGINT"
        if trainer.is_global_zero:
            print(
                "\nlit_dp: Ctrl-C: stopping after the current step (Ctrl-C again stops at once)",
                file=sys.stderr,
                flush=True,
            )
        # Lightning's own stop-after-this-step flag, which it synchronizes across ranks.
        trainer._signal_connector.received_sigterm = True

    def _on_sigterm(self, trainer: L.Trainer, signum: int, frame: Any) -> None:
        self.signal_name = self.signal_name or "SIGTERM"
        previous = self._previous.get(signal.SIGTERM)
        if callable(previous):  # Lightning's handler: stop after this step
            previous(signum, frame)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()  # Lightning calls no teardown hook after an exception

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def interruption(trainer: L.Trainer, exception: BaseException) -> str | None:
    """The report's stop reason for a run ended by a signal (None for any other exception)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    callbacks = getattr(trainer, "callbacks", [])
    hook = next((cb for cb in callbacks if isinstance(cb, GracefulInterrupt)), None)
    name = hook.signal_name if hook is not None else None
    if name is None and isinstance(exception, KeyboardInterrupt):
        name = "SIGINT"
    elif name is None and isinstance(exception, SIGTERMException):
        name = "SIGTERM"
    if name is None or not isinstance(exception, KeyboardInterrupt | SystemExit):
        return None
    where = (
        f"inside step {trainer.global_step} (a second Ctrl-C; epsilon counts the steps in the "
        "ledger, and nothing after the last checkpoint was saved or exported)"
        if isinstance(exception, KeyboardInterrupt)
        else f"after step {trainer.global_step}"
    )
    return f"interrupted: {name} {where}; resume from the last checkpoint with --ckpt_path last"
