"""Privacy accounting: records (q_t, sigma_t) for every step taken and enforces the budget.

It also writes ``<log_dir>/privacy_report.json``.

Every epsilon this callback logs, enforces or reports comes from the chosen accountant
(``privacy.accountant``): ``PLDAccountant`` (default; privacy loss distributions, tested against
Opacus' PRV accountant) or ``RDPAccountant`` (tested against dp-accounting and pinned values),
composed over the steps actually taken. The RDP epsilon is always reported beside it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_dp.callbacks.contract import DPModule, dp_module, noise_mechanism, report_source
from lit_dp.callbacks.interrupts import interruption
from lit_dp.callbacks.resume import ResumeGuard
from lit_dp.fingerprint import FINGERPRINT_KEY, to_state
from lit_dp.privacy.accountant import make_accountant
from lit_dp.privacy.noise_mechanism import NoiseMechanism
from lit_dp.privacy.plan import (
    MAX_DEFAULT_DELTA,
    PrivacyPlan,
    check_delta_for_units,
    check_privacy_settings,
    default_delta,
    exceeds_budget,
)
from lit_dp.privacy.rdp_accountant import RDPAccountant
from lit_dp.report import assemble, fixed_seeds, report_sections

__all__ = ["MAX_DEFAULT_DELTA", "PrivacyAccounting", "check_delta", "default_delta"]


def check_delta(delta: float, num_units: int) -> None:
    """The privacy plan's delta check (delta < 1/N; above 1e-5 warned about on rank 0)."""
    check_delta_for_units(delta, num_units, warn=rank_zero_warn)


def _datamodule(trainer: L.Trainer) -> Any:
    """The trainer's DataModule (None without one), attached by Lightning at run time.

    A lit_dp ``DPDataModule``, or any DataModule with its privacy members (``num_units``,
    ``schedule``; the report reads ``data_report`` and the rest where present): ``setup``
    refuses one without ``num_units``.
    """
    return getattr(trainer, "datamodule", None)


def _rate_of(trainer: L.Trainer) -> Any:
    """q_t of any step from the DataModule's schedule (banded MF charges a round at its start)."""
    schedule = getattr(_datamodule(trainer), "schedule", None)
    if schedule is None:
        raise RuntimeError("PrivacyAccounting: the DataModule has no sample-rate schedule")
    return schedule.rate


def _refuse_minimum_length(trainer: L.Trainer, target_epsilon: float) -> None:
    """The budget stop cannot end a run that Lightning must continue.

    With min_steps or min_epochs, Lightning overrides ``should_stop`` until they are met, while
    every batch after the stop is skipped (so no step is ever taken again): the run would never end.
    """
    given = {name: getattr(trainer, name) for name in ("min_steps", "min_epochs")}
    # Lightning sets min_epochs = 1 itself when only min_steps is given; name what the user set.
    if given["min_steps"]:
        given.pop("min_epochs")
    given = {name: value for name, value in given.items() if value}
    if given:
        fields = " and ".join(f"trainer.{name}={value}" for name, value in given.items())
        raise ValueError(
            f"{fields} cannot be combined with the budget stop of privacy.target_epsilon="
            f"{target_epsilon}: Lightning keeps a stopped run going until the minimum is reached, "
            "and no step may be taken past the budget, so the run would never end. Unset "
            f"{' and '.join(f'trainer.{name}' for name in given)} (trainer.max_steps sets the "
            "length), or set privacy.target_epsilon: null"
        )


class PrivacyAccounting(L.Callback):
    """Composes the privacy loss of every step and enforces ``target_epsilon``.

    Args:
        target_epsilon: privacy budget. With ``model.noise_multiplier: auto`` the noise multiplier
            is calibrated before training so that the planned ``trainer.max_steps`` end at this
            epsilon; with a fixed noise multiplier, training stops before the first step that would
            exceed it. ``null`` = no budget (epsilon is still reported).
        delta: target delta; ``null`` = min(1e-5, 1/N^1.1) for N privacy units. Must be below
            1/N; a value above 1e-5 is warned about.
        accountant: "pld" (privacy loss distributions: the tighter epsilon, so less noise for
            the same budget) or "rdp" (Renyi DP). Calibration, the budget stop, the logged
            epsilon and the report's ``epsilon`` use it; the report adds ``epsilon_rdp``.
        log_epsilon_every_n_steps: how often privacy/epsilon is logged to the logger.
        report_name: file name of the JSON report written into the trainer's log_dir.
    """

    def __init__(
        self,
        target_epsilon: float | None = 8.0,
        delta: float | None = None,
        accountant: Literal["pld", "rdp"] = "pld",
        log_epsilon_every_n_steps: int = 1,
        report_name: str = "privacy_report.json",
    ) -> None:
        check_privacy_settings(target_epsilon=target_epsilon, delta=delta)
        if log_epsilon_every_n_steps < 1:
            raise ValueError("privacy.log_epsilon_every_n_steps must be >= 1")
        self.target_epsilon = target_epsilon
        self.delta_arg = delta
        self.delta: float | None = delta
        self.log_every = log_epsilon_every_n_steps
        self.report_name = report_name
        self.accountant_name = accountant
        self.accountant = make_accountant(accountant)  # ValueError naming privacy.accountant
        # The RDP figure beside the chosen one (the same object when RDP is chosen).
        self.rdp = (
            self.accountant if isinstance(self.accountant, RDPAccountant) else RDPAccountant()
        )
        self.stop_reason: str | None = None
        self.calibrated_noise_multiplier: float | None = None
        self.plan: PrivacyPlan | None = None  # the run's privacy plan (setup of a private run)
        self.num_units: int | None = None
        self.last_report: dict[str, Any] | None = None  # rank 0: the report last written
        self.resume = ResumeGuard()  # the run's fingerprint; the checkpoint it resumes or forks
        self.fork_of: dict[str, Any] | None = None  # the report's: the checkpoint forked
        self._fork_entry: dict[str, Any] = {}

    def resume_from(self, ckpt_path: str | None, *, fork: bool = False) -> None:
        """Name the checkpoint the next fit resumes (or forks) before it starts.

        A resume of another run (its fingerprint differs) is then refused at setup, before the
        run writes anything; ``fork=True`` continues the checkpoint's weights as a new run with
        fresh noise (lit_dp.callbacks.resume). ``lit-dp fit --ckpt_path X [--fork]`` calls it.
        """
        if fork and not ckpt_path:
            raise ValueError("--fork needs --ckpt_path: the checkpoint to fork")
        self.resume.path, self.resume.fork = (str(ckpt_path) if ckpt_path else None), fork

    # --- planning, before any step -----------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        module = dp_module(pl_module, caller="PrivacyAccounting")
        dm = _datamodule(trainer)
        if dm is None or not hasattr(dm, "num_units"):
            raise ValueError("lit_dp needs a lit_dp DataModule (it defines the privacy units)")
        self.num_units = int(dm.num_units)
        if self.num_units < 1:
            raise ValueError("data: the training set is empty; add records or fix the path")
        self.resume.setup(trainer, module, dm, self)  # refuses a resume of another run
        if not module.private:
            return
        if not module.clip.covered_by_dp:  # said before training, not only in the report after
            rank_zero_warn(
                f"lit_dp: model.clipping {type(module.clip).__name__} sets the clip bound from "
                "raw per-unit gradient norms, so epsilon does NOT cover the weights of this run "
                "or anything derived from them (the report's covers says nothing); use "
                "FixedClip or PrivateQuantile for a private run"
            )
        seeds = fixed_seeds(module, dm)
        if seeds:
            rank_zero_warn(
                f"{' and '.join(seeds)} fixed: epsilon holds only while the seed stays secret (a "
                "known noise seed lets anyone subtract the noise, a known sampling seed removes "
                "the subsampling amplification). Fine for experiments; leave them null (OS "
                "entropy) for a model you release"
            )
        if self.target_epsilon is not None:
            _refuse_minimum_length(trainer, self.target_epsilon)
        if getattr(dm, "schedule", None) is None:
            raise RuntimeError(
                "PrivacyAccounting.setup: the DataModule has no sample-rate schedule yet; "
                "its setup('fit') sets it and must run before this callback's"
            )
        steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        parent = self.resume.parent  # a fork: the checkpoint's steps are already in the ledger
        taken = (
            ((parent["accounting"] or {}).get("accountant") or {}).get("history", [])
            if parent is not None
            else []
        )
        self.plan = self.make_plan(
            num_units=self.num_units,
            schedule=dm.schedule,
            steps=steps,
            noise_multiplier="auto" if module.noise_multiplier is None else module.noise_multiplier,
            clip=module.clip,
            mechanism=noise_mechanism(module),
            taken=taken,
            first_step=int(parent["global_step"]) if parent is not None else 0,
            fork_error=(
                self.resume.fork_error(steps, self.target_epsilon) if parent is not None else None
            ),
        )
        self.delta = self.plan.delta
        module.apply_privacy_plan(self.plan)  # sigma is a float from here on
        if self.plan.calibrated:
            self.calibrated_noise_multiplier = self.plan.noise_multiplier
            rank_zero_info(
                f"lit_dp: calibrated noise_multiplier={self.plan.noise_multiplier:.4f} for "
                f"epsilon={self.target_epsilon} ({self.accountant_name.upper()} accountant)"
            )
        self.resume.fork_plan = self.plan

    def make_plan(
        self,
        *,
        num_units: int,
        schedule: Any,
        steps: int | None,
        noise_multiplier: float | Literal["auto"],
        clip: Any,
        accountant: Literal["pld", "rdp"] | None = None,
        taken: Any = (),
        first_step: int = 0,
        fork_error: Any = None,
        mechanism: NoiseMechanism | None = None,
    ) -> PrivacyPlan:
        """The privacy plan of a run with this privacy section (fit's setup, ``lit-dp plan``).

        ``accountant`` overrides the section's (``lit-dp plan`` prints both). ``mechanism`` is
        the module's noise mechanism: its accounting event (banded MF: one (sigma, b q) round
        per b steps) is what calibration, the per-step epsilon and the budget stop compose;
        independent noise (None, or b = 1) is one step per step.
        """
        return PrivacyPlan.create(
            num_units=num_units,
            schedule=schedule,
            steps=steps,
            noise_multiplier=noise_multiplier,
            target_epsilon=self.target_epsilon,
            delta=self.delta_arg,
            accountant=accountant or self.accountant_name,
            clip=clip,
            taken=taken,
            first_step=first_step,
            warn=rank_zero_warn,
            fork_error=fork_error,
            mechanism=None if mechanism is None else mechanism.event(),
        )

    # --- per step ----------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        module = dp_module(pl_module, caller="PrivacyAccounting")
        if not module.private or self.target_epsilon is None:
            return
        rate = noise_mechanism(pl_module).accounted_rate(
            step=trainer.global_step,
            sample_rate=float(batch["sample_rate"]),
            rate_of=lambda t: _rate_of(trainer)(t),
        )
        if rate is None:  # within a banded-MF round: charged at its start
            return
        eps_next = self.accountant.peek_epsilon(
            delta=self._delta(),
            noise_multiplier=_sigma(module),
            sample_rate=rate,
        )
        if exceeds_budget(eps_next, self.target_epsilon):
            self.stop_reason = (
                f"budget: step {trainer.global_step} would reach epsilon={eps_next:.4f} > "
                f"target_epsilon={self.target_epsilon}"
            )
            module.request_stop(self.stop_reason)  # the module skips the step (HOOK_ORDER 2)
            trainer.should_stop = True
            self.write_report(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = dp_module(pl_module, caller="PrivacyAccounting").last_record
        if record is None or not record.private:
            return
        rate = noise_mechanism(pl_module).accounted_rate(
            step=record.step,
            sample_rate=record.sample_rate,
            rate_of=lambda t: _rate_of(trainer)(t),
        )
        # The accounted sigma (not the raised gradient multiplier of private quantile clipping).
        if rate is not None:  # None: within a banded-MF round, charged at its start
            self.accountant.step(noise_multiplier=record.noise_multiplier, sample_rate=rate)
            if self.rdp is not self.accountant:
                self.rdp.step(noise_multiplier=record.noise_multiplier, sample_rate=rate)
        if (record.step + 1) % self.log_every == 0:
            pl_module.log(
                "privacy/epsilon",
                self.epsilon(),
                on_step=True,
                on_epoch=False,
                rank_zero_only=True,
                prog_bar=True,  # epsilon beside the loss in the progress bar
            )

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.stop_reason is None:
            self.stop_reason = f"completed: {trainer.global_step} steps (trainer limits reached)"
        self.write_report(trainer, pl_module)
        # ExportModel (listed after this callback: HOOK_ORDER 3) exports its shareable part.
        dp_module(pl_module, caller="PrivacyAccounting").set_privacy_report(self.last_report)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Ctrl-C or SIGTERM: the report of the steps taken, marked interrupted (no export).
        reason = interruption(trainer, exception)
        if reason is None:
            return
        if isinstance(exception, KeyboardInterrupt) and trainer.world_size > 1:
            return  # stopped inside a step: the ranks are not in step to agree on log_dir
        self.stop_reason = reason
        self.write_report(trainer, pl_module)

    def epsilon(self) -> float:
        if self.accountant.total_steps == 0:
            return 0.0
        return float(self.accountant.get_epsilon(self._delta()))

    def _delta(self) -> float:
        """The run's delta, set by ``setup('fit')`` for a private run (or assigned directly)."""
        if self.delta is None:
            raise RuntimeError(
                "PrivacyAccounting: delta is not set yet; setup('fit') of a private run sets it "
                "from privacy.delta or the number of privacy units"
            )
        return self.delta

    # --- state -------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self.resume.fingerprint is not None:  # what a resume of this checkpoint must match
            checkpoint[FINGERPRINT_KEY] = to_state(self.resume.fingerprint)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        # After the module and DataModule restored the checkpoint's state, before the ledger.
        self.resume.check_loaded(trainer, checkpoint)
        if self.resume.parent is not None:  # a fork: fresh noise and sampling, its own sigma
            self._fork_entry = self.resume.apply_fork(trainer, pl_module, _datamodule(trainer))
            for saver in trainer.checkpoint_callbacks:  # the parent's files: not the fork's
                checkpoint.get("callbacks", {}).pop(saver.state_key, None)

    def state_dict(self) -> dict[str, Any]:
        return {
            "accountant_name": self.accountant_name,
            "accountant": self.accountant.state_dict(),
            "stop_reason": self.stop_reason,
            "calibrated_noise_multiplier": self.calibrated_noise_multiplier,
            "fork_of": self.fork_of,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Checkpoints written before the accountant was selectable hold an RDP ledger.
        name = state_dict.get("accountant_name", "rdp")
        if name != self.accountant_name:
            raise ValueError(
                f"the checkpoint's privacy ledger was accounted with privacy.accountant={name!r} "
                f"but this run sets {self.accountant_name!r}; resume with "
                f"privacy.accountant: {name}"
            )
        self.accountant.load_state_dict(state_dict["accountant"])
        if self.rdp is not self.accountant:  # the same ledger, composed with RDP
            history = state_dict["accountant"]["history"]
            self.rdp.load_state_dict(
                {"orders": self.rdp.state_dict()["orders"], "history": history}
            )
        self.stop_reason = state_dict.get("stop_reason")
        self.fork_of = state_dict.get("fork_of")
        if self.resume.parent is not None:  # a fork: a new run on the parent's ledger
            self.stop_reason = None
            self.fork_of = {**self._fork_entry, "fork_of": self.fork_of}
            return  # its own calibrated sigma (setup) stays
        self.calibrated_noise_multiplier = state_dict.get("calibrated_noise_multiplier")

    # --- report ------------------------------------------------------------------------------
    def report(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The run's privacy report so far (``lit_dp.report.assemble``)."""
        return assemble(
            module=report_source(pl_module, caller="PrivacyAccounting.report"),
            dm=_datamodule(trainer),
            global_step=int(trainer.global_step),
            accountant=self.accountant,
            accountant_name=self.accountant_name,
            rdp=self.rdp,
            delta=self.delta,
            target_epsilon=self.target_epsilon,
            calibrated_noise_multiplier=self.calibrated_noise_multiplier,
            num_units=self.num_units,
            stop_reason=self.stop_reason,
            fork_of=self.fork_of,
            sections=report_sections(getattr(trainer, "callbacks", ())),  # e.g. the audit
            noise_mechanism=noise_mechanism(pl_module),
        )

    def write_report(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        # trainer.log_dir is a collective under DDP: every rank asks, rank 0 writes.
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        path = log_dir / self.report_name
        self.report_path = path
        if trainer.global_rank != 0:
            return path
        log_dir.mkdir(parents=True, exist_ok=True)
        # A JSON round trip: the report in memory is exactly what the file holds.
        text = json.dumps(self.report(trainer, pl_module), indent=2, default=str)
        self.last_report = json.loads(text)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        self.report_path = path
        return path


def _sigma(module: DPModule) -> float:
    """The module's sigma; a float once setup applied the plan (HOOK_ORDER 1)."""
    if module.noise_multiplier is None:
        raise RuntimeError("PrivacyAccounting: the privacy plan was not applied (setup('fit'))")
    return module.noise_multiplier
