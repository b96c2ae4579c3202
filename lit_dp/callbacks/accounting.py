"""Privacy accounting: records (q_t, sigma_t) for every step taken and enforces the budget.

It also writes ``<log_dir>/privacy_report.json``.

Every epsilon this callback logs, enforces or reports comes from the chosen accountant
(``privacy.accountant``): ``PLDAccountant`` (default; privacy loss distributions, tested against
Opacus' PRV accountant) or ``RDPAccountant`` (tested against dp-accounting and pinned values),
composed over the steps actually taken. The RDP epsilon is always reported beside it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_dp.export import OPERATOR_SIDE_KEY
from lit_dp.privacy.accountant import RDPAccountant
from lit_dp.privacy.budget import ACCOUNTANTS, calibrate_noise_multiplier, make_accountant
from lit_dp.privacy.noise_mechanism import IndependentGaussian, NoiseMechanism

if TYPE_CHECKING:
    from lit_dp.data.datamodule import DPDataModule
    from lit_dp.module import DPCausalLM

_OPERATOR_SIDE_NOTE = (
    "operator_side counts {} (exact, not privatized: at group level num_records / num_units is "
    "how many records users hold): in the run directory's report only, never exported"
)
# A delta above this lets a mechanism release some unit's data in the clear with a probability
# that is no longer negligible (delta is roughly that probability, per unit).
MAX_DEFAULT_DELTA = 1e-5


def default_delta(num_units: int) -> float:
    """The default delta: min(1e-5, 1 / N^1.1).

    1/N^1.1 alone is strictly below 1/N but large for small N (0.0022 at N = 256, 0.065 for 12
    users: a real chance of a full leak).
    """
    return min(MAX_DEFAULT_DELTA, 1.0 / num_units**1.1)


def check_delta(delta: float, num_units: int) -> None:
    """Delta must lie in (0, 1/N): a larger delta allows releasing one unit in the clear.

    An explicit delta above 1e-5 is allowed (a user may need it for a comparison) with a warning.
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"privacy.delta={delta} must be in (0, 1)")
    if delta >= 1.0 / num_units:
        raise ValueError(
            f"privacy.delta={delta:g} must be below 1/N = {1.0 / num_units:g} for N={num_units} "
            f"privacy units; leave it unset for the default min(1e-5, 1/N^1.1) = "
            f"{default_delta(num_units):.3g}"
        )
    if delta > MAX_DEFAULT_DELTA:
        rank_zero_warn(
            f"privacy.delta={delta:g} is above 1e-5: with probability up to about delta the "
            f"guarantee fails for a unit (N={num_units}); leave privacy.delta unset for the "
            f"default min(1e-5, 1/N^1.1) = {default_delta(num_units):.3g} unless you need this "
            "value"
        )


def _datamodule(trainer: L.Trainer) -> DPDataModule | None:
    """The trainer's DataModule (None without one).

    Lightning attaches ``trainer.datamodule`` at run time. This callback expects a lit_dp
    DataModule: ``setup`` refuses one without ``num_units``.
    """
    return cast("DPDataModule | None", getattr(trainer, "datamodule", None))


def _mechanism(pl_module: L.LightningModule) -> NoiseMechanism:
    """The module's noise mechanism: what a step adds to the ledger (independent by default)."""
    mech = getattr(pl_module, "noise_mechanism", None)
    return mech if isinstance(mech, NoiseMechanism) else IndependentGaussian()


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
        if target_epsilon is not None and not (
            target_epsilon > 0 and math.isfinite(target_epsilon)
        ):
            raise ValueError(
                f"privacy.target_epsilon={target_epsilon} must be a positive number or null"
            )
        if delta is not None and not 0.0 < delta < 1.0:
            raise ValueError(
                f"privacy.delta={delta} must be in (0, 1) or null for min(1e-5, 1/N^1.1)"
            )
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
        self.num_units: int | None = None
        self.last_report: dict[str, Any] | None = None  # rank 0: the report last written

    # --- planning, before any step -----------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        module = cast("DPCausalLM", pl_module)  # the hook is typed for any LightningModule
        dm = _datamodule(trainer)
        if dm is None or not hasattr(dm, "num_units"):
            raise ValueError("lit_dp needs a lit_dp DataModule (it defines the privacy units)")
        self.num_units = int(dm.num_units)
        if self.num_units < 1:
            raise ValueError("data: the training set is empty; add records or fix the path")
        if not module.private:
            return
        if self.target_epsilon is not None:
            _refuse_minimum_length(trainer, self.target_epsilon)
        self.delta = self.delta_arg if self.delta_arg is not None else default_delta(self.num_units)
        check_delta(self.delta, self.num_units)
        steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        sigma = module.noise_multiplier
        if sigma == "auto":
            calibrated = self.calibrate(
                schedule=dm.schedule, steps=steps, delta=self.delta, mechanism=_mechanism(module)
            )
            self.calibrated_noise_multiplier = calibrated
            module.set_noise_multiplier(calibrated)
            rank_zero_info(
                f"lit_dp: calibrated noise_multiplier={calibrated:.4f} for "
                f"epsilon={self.target_epsilon} ({self.accountant_name.upper()} accountant)"
            )
        elif self.target_epsilon is not None:
            schedule = dm.schedule
            if schedule is None:
                raise RuntimeError(
                    "PrivacyAccounting.setup: the DataModule has no sample-rate schedule yet; "
                    "its setup('fit') sets it and must run before this callback's"
                )
            rate = _mechanism(module).accounted_rate(
                step=0, sample_rate=schedule.rate(0), rate_of=schedule.rate
            )
            first = make_accountant(self.accountant_name).peek_epsilon(
                delta=self.delta, noise_multiplier=float(sigma), sample_rate=float(rate or 0.0)
            )
            if first > self.target_epsilon:
                raise ValueError(
                    f"privacy.target_epsilon={self.target_epsilon} is unreachable: one step at "
                    f"noise_multiplier={sigma} already costs epsilon={first:.3g}; raise "
                    "model.noise_multiplier or use noise_multiplier: auto"
                )

    def calibrate(
        self,
        *,
        schedule: Any,
        steps: int | None,
        delta: float,
        accountant: str | None = None,
        mechanism: NoiseMechanism | None = None,
    ) -> float:
        """Sigma for ``model.noise_multiplier: auto``.

        ``steps`` steps of ``schedule`` (a SampleRateSchedule) at this sigma cost ``target_epsilon``
        under ``accountant`` (default: this run's), composed as ``mechanism`` accounts them
        (default independent noise: one step per step; banded MF: one round per b steps).

        Raises:
            ValueError: naming the config fields: no target or no max_steps, or a target that
                no sigma reaches.
        """
        if self.target_epsilon is None or steps is None:
            raise ValueError(
                "model.noise_multiplier=auto needs privacy.target_epsilon and trainer.max_steps "
                "(the planned number of steps); set both or give a number"
            )
        mech = IndependentGaussian() if mechanism is None else mechanism
        rates = mech.round_sample_rates(schedule.rate, steps)
        try:
            return calibrate_noise_multiplier(
                target_epsilon=self.target_epsilon,
                delta=delta,
                sample_rate=rates,
                steps=len(rates),
                accountant=accountant or self.accountant_name,  # type: ignore[arg-type]
            )
        except ValueError as err:
            raise ValueError(
                f"privacy.target_epsilon is unreachable in {steps} steps: {err}"
            ) from err

    # --- per step ----------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not pl_module.private or self.target_epsilon is None:
            return
        rate = _mechanism(pl_module).accounted_rate(
            step=trainer.global_step,
            sample_rate=float(batch["sample_rate"]),
            rate_of=lambda t: _rate_of(trainer)(t),
        )
        if rate is None:  # within a banded-MF round: charged at its start
            return
        eps_next = self.accountant.peek_epsilon(
            delta=self._delta(),
            noise_multiplier=float(pl_module.noise_multiplier),
            sample_rate=rate,
        )
        if eps_next > self.target_epsilon * (1 + 1e-9):
            self.stop_reason = (
                f"budget: step {trainer.global_step} would reach epsilon={eps_next:.4f} > "
                f"target_epsilon={self.target_epsilon}"
            )
            pl_module.request_stop(self.stop_reason)
            trainer.should_stop = True
            self.write_report(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = getattr(pl_module, "last_record", None)
        if record is None or not record.private:
            return
        rate = _mechanism(pl_module).accounted_rate(
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
                "privacy/epsilon", self.epsilon(), on_step=True, on_epoch=False, rank_zero_only=True
            )

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.stop_reason is None:
            self.stop_reason = f"completed: {trainer.global_step} steps (trainer limits reached)"
        self.write_report(trainer, pl_module)
        hand_over = getattr(pl_module, "set_privacy_report", None)
        if hand_over is not None:  # the module's export keeps the report's public part
            hand_over(self.last_report)

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
    def state_dict(self) -> dict[str, Any]:
        return {
            "accountant_name": self.accountant_name,
            "accountant": self.accountant.state_dict(),
            "stop_reason": self.stop_reason,
            "calibrated_noise_multiplier": self.calibrated_noise_multiplier,
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
        self.calibrated_noise_multiplier = state_dict.get("calibrated_noise_multiplier")

    # --- report ------------------------------------------------------------------------------
    def report(self, trainer: L.Trainer, pl_module: DPCausalLM) -> dict[str, Any]:
        dm = _datamodule(trainer)
        data = dict(dm.data_report()) if dm is not None and hasattr(dm, "data_report") else {}
        mech = pl_module.privacy_description()
        # Exact data-dependent counts: this run directory's report only (export drops them).
        operator_side = {
            **data.pop(OPERATOR_SIDE_KEY, {}),
            "num_nonfinite_zeroed": int(getattr(pl_module, "num_nonfinite_total", 0)),
        }
        private = bool(pl_module.private)
        bands = _mechanism(pl_module).bands  # > 1: the ledger counts rounds of bands steps
        eps, eps_rdp, order = float("inf"), float("inf"), None
        if private and self.accountant.total_steps > 0:
            delta = self._delta()
            eps = self.accountant.get_epsilon(delta)
            eps_rdp, order = self.rdp.get_privacy_spent(delta=delta)
        elif private:
            eps = eps_rdp = 0.0
        history = [list(h) for h in self.accountant.history]
        rates = sorted({h[1] for h in self.accountant.history})
        sigmas = sorted({h[0] for h in self.accountant.history})
        return {
            "private": private,
            "epsilon": eps if math.isfinite(eps) else None,
            "epsilon_is_infinite": not math.isfinite(eps),
            "epsilon_rdp": eps_rdp if math.isfinite(eps_rdp) else None,
            **(
                {"epsilon_pld": eps if math.isfinite(eps) else None}
                if self.accountant_name == "pld"
                else {}
            ),
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "best_rdp_order": order,
            "steps": int(self.accountant.total_steps)
            if private and bands == 1
            else int(trainer.global_step),
            **({"rounds": int(self.accountant.total_steps)} if bands > 1 else {}),
            "noise_multiplier": sigmas[0] if len(sigmas) == 1 else sigmas,
            "calibrated_noise_multiplier": self.calibrated_noise_multiplier,
            "sample_rate": rates[0]
            if len(rates) == 1
            else {
                "schedule": dm.schedule_description()
                if dm is not None and hasattr(dm, "schedule_description")
                else None,
                "distinct_rates": rates,
            },
            "ledger": history,
            "num_units": self.num_units,
            "privacy_unit": data.get("privacy_unit", "example"),
            "accountant": self.accountant_name,
            "accountant_description": ACCOUNTANTS[self.accountant_name],
            "clipping": mech["clipping"],
            "mechanism": mech,
            "covers": mech["covers"],
            "not_covered": [
                *mech["not_covered"],
                _OPERATOR_SIDE_NOTE.format(sorted(operator_side)),
            ],
            "data": data,
            OPERATOR_SIDE_KEY: operator_side,
            "stop_reason": self.stop_reason,
        }

    def write_report(self, trainer: L.Trainer, pl_module: DPCausalLM) -> Path:
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
