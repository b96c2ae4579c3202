"""Resume and fork, for PrivacyAccounting: a checkpoint continues its own run, or forks explicitly.

A resume restores the checkpoint's noise generator and sampling seed, so the resumed run draws
what the uninterrupted run would have drawn. That is only safe when it is the same run: the
checkpoint's fingerprint (lit_dp.fingerprint) must equal this run's, or the resume is refused
before anything is written (the refusal names what changed).

A fork (``lit-dp fit --fork --ckpt_path X``) is the explicit way to continue a checkpoint's
weights as a different run (other data, more steps, another budget): its noise generator and
sampling seed are drawn afresh from OS entropy, the ledger keeps the checkpoint's steps (the
fork's epsilon includes them, and ``noise_multiplier: auto`` is calibrated so that those steps
and the fork's planned ones together spend the target), and the report names the checkpoint
(``fork_of``: its path, fingerprint and steps). A private run never resumes or forks a
non-private checkpoint.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from lit_dp.callbacks.contract import noise_mechanism
from lit_dp.fingerprint import (
    FINGERPRINT_KEY,
    read_checkpoint_run,
    refuse_resume,
    run_fingerprint,
    short_id,
)
from lit_dp.privacy.plan import PrivacyPlan

_SAMPLING_SEED_BITS = 62  # as DPDataModule draws it


class ResumeGuard:
    """This run's fingerprint, the checkpoint it resumes or forks, and the fork's plan."""

    def __init__(self) -> None:
        self.path: str | None = None  # the checkpoint named before fit (resume_from)
        self.fork = False
        self.fingerprint: dict[str, Any] | None = None
        self.parent: dict[str, Any] | None = None  # read_checkpoint_run of a fork's checkpoint
        self.fork_plan: PrivacyPlan | None = None  # the fork's own plan, applied after loading
        self._fingerprinted: tuple[int, ...] = ()

    def setup(self, trainer: Any, module: Any, datamodule: Any, accounting: Any) -> None:
        """Fingerprint this run; refuse a resume of another run before anything is written."""
        key = (id(trainer), id(module), id(datamodule))
        if self.fingerprint is None or key != self._fingerprinted:  # the CLI checks before fit
            self.fingerprint = run_fingerprint(trainer, module, datamodule, accounting)
            self._fingerprinted = key
        self.parent = None
        if self.path is None:
            return
        if not Path(self.path).is_file():  # "best", "hpc", a URL: checked once loaded
            if self.fork:
                raise ValueError(f"--fork needs a checkpoint file; {self.path} is none")
            return
        run = read_checkpoint_run(self.path)
        if not self.fork:
            refuse_resume(
                run["fingerprint"],
                self.fingerprint,
                checkpoint=self.path,
                checkpoint_step=run["global_step"],
            )
            return
        bands = noise_mechanism(module).bands
        if bands > 1:
            # A fork draws a fresh sampling seed, hence new cyclic groups: a unit could take part
            # again less than b steps after its last step, which banded MF's accounting excludes.
            raise ValueError(
                f"--fork of {self.path}: refused for model.noise_mechanism bands={bands}: a fork "
                "draws new sampling groups, so a unit could take part twice within "
                f"{bands} steps, which the banded-MF accounting does not allow; resume the "
                "checkpoint as the same run (without --fork) or start a new run"
            )
        saved = (run["fingerprint"] or {}).get("values", {}).get("privacy", {})
        history = ((run["accounting"] or {}).get("accountant") or {}).get("history", [])
        accounted = sum(int(n) for _, _, n in history)
        if saved.get("private", module.private) != module.private or (
            module.private and accounted != run["global_step"]
        ):
            raise ValueError(
                f"--fork of {self.path}: refused, model.private is "
                f"{saved.get('private', 'unrecorded')} in the checkpoint (its weights took "
                f"{run['global_step']} steps, its privacy ledger holds {accounted}) and "
                f"{module.private} in this run; a private run never continues non-private "
                "weights (start it from the model source instead)"
            )
        max_steps = trainer.max_steps
        if max_steps is not None and 0 <= max_steps <= run["global_step"]:
            raise ValueError(
                f"--fork of {self.path}: trainer.max_steps={max_steps} leaves no step after the "
                f"checkpoint's {run['global_step']}; set trainer.max_steps above it (the fork's "
                "steps are counted on from the checkpoint's)"
            )
        self.parent = run

    def fork_error(
        self, steps: int | None, target_epsilon: float | None
    ) -> Callable[[ValueError], ValueError]:
        """How a fork's calibration failure is reported: naming the checkpoint and its steps."""
        assert self.parent is not None
        start = self.parent["global_step"]
        path = self.path

        def rewrite(err: ValueError) -> ValueError:
            last = "?" if steps is None else steps - 1
            return ValueError(
                f"--fork of {path}: privacy.target_epsilon={target_epsilon} "
                f"cannot cover the checkpoint's {start} steps and steps {start}..{last}: "
                f"{err}. Raise privacy.target_epsilon, or plan a new run from the start"
            )

        return rewrite

    def check_loaded(self, trainer: Any, checkpoint: dict[str, Any]) -> None:
        """A resume loaded without ``resume_from`` (Trainer.fit(ckpt_path=...)) is checked too."""
        if self.fork or self.fingerprint is None:
            return
        refuse_resume(
            checkpoint.get(FINGERPRINT_KEY),
            self.fingerprint,
            checkpoint=trainer.ckpt_path or self.path or "?",
            checkpoint_step=int(checkpoint.get("global_step", 0)),
        )

    def apply_fork(self, trainer: Any, module: Any, datamodule: Any) -> dict[str, Any]:
        """After the parent's state is restored: fresh noise and sampling, the fork's sigma.

        Returns:
            the report's ``fork_of`` entry (without the parent's own ``fork_of``).
        """
        assert self.parent is not None
        module.reseed_noise_for_fork()
        if module.private and self.fork_plan is not None:  # the checkpoint restored its sigma
            module.apply_privacy_plan(self.fork_plan)
        seed = int(trainer.strategy.broadcast(secrets.randbits(_SAMPLING_SEED_BITS), src=0))
        state = datamodule.state_dict()
        datamodule.load_state_dict({**state, "sampling_seed": seed})
        saved = self.parent["fingerprint"]
        entry = {
            "checkpoint": str(self.path),
            "fingerprint": short_id(saved) if saved is not None else None,
            "steps": self.parent["global_step"],
        }
        rank_zero_info(
            f"lit_dp: fork of {entry['checkpoint']} (fingerprint {entry['fingerprint']}, "
            f"{entry['steps']} steps): fresh noise and sampling seeds from OS entropy (configured "
            "seeds are not used); the privacy ledger keeps the checkpoint's steps"
        )
        return entry
