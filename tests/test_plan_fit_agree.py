"""``lit-dp plan`` prints the privacy plan fit builds: on every shipped config the plan of
``make_plan`` equals the one ``PrivacyAccounting.setup`` builds and applies for fit (sigma, delta,
N, schedule, steps, accountant), and so do their epsilon per step and budget-stop step; on the
tiny config an actual fit's sigma, delta, epsilon after every step and stopping step equal the
plan's (the per-step epsilon of fit read from its accountant, an independent composition)."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
from lightning.pytorch.cli import instantiate_class
from module_helpers import make_dm, make_module, quiet_trainer
from shipped_configs import CONFIGS

from lit_dp.callbacks.accounting import PrivacyAccounting
from lit_dp.callbacks.resume import ResumeGuard
from lit_dp.plan import _instantiate, make_plan, read_config
from lit_dp.privacy.clipping import default_clip_estimator
from lit_dp.privacy.noise_mechanism import IndependentGaussian

PRIVATE = [c for c in CONFIGS if "private: false" not in c.read_text()]


class _Module:
    """The DPModule members setup reads and calls, without a model (the configs' models are
    not all on this machine)."""

    def __init__(self, noise_multiplier: Any, clip: Any, noise_mechanism: Any) -> None:
        self.private = True
        self.clip = clip
        self.noise_mechanism = noise_mechanism
        self.noise_multiplier = None if noise_multiplier == "auto" else float(noise_multiplier)
        self.last_record = None
        self.num_nonfinite_total = 0
        self.model = None
        self.applied: list[Any] = []
        self.hparams: dict[str, Any] = {}

    def apply_privacy_plan(self, plan):
        self.applied.append(plan)
        self.noise_multiplier = plan.noise_multiplier

    def request_stop(self, reason): ...
    def privacy_description(self): ...
    def set_privacy_report(self, report): ...
    def use_evaluation_weights(self, swap): ...
    def reseed_noise_for_fork(self): ...


@pytest.mark.parametrize("config", PRIVATE, ids=[c.name for c in PRIVATE])
def test_plan_and_fit_setup_build_the_same_plan(config, monkeypatch):
    cfg = read_config(["--config", str(config)])
    view = make_plan(cfg)
    # fit's setup on the same config: the DataModule with its N and schedule, the module's sigma
    # and clip-bound estimator, the privacy section, trainer.max_steps.
    monkeypatch.setattr(ResumeGuard, "setup", lambda *a, **k: None)  # fingerprints: not here
    dm = _instantiate(cfg.data.as_dict())
    dm.num_units, dm.schedule = dm.units_and_schedule()
    clipping = cfg.model.clipping
    clip = (
        default_clip_estimator() if clipping is None else instantiate_class((), clipping.as_dict())
    )
    mechanism = cfg.model.get("noise_mechanism")  # banded MF in bandmf.yaml
    module = _Module(
        cfg.model.noise_multiplier,
        clip,
        IndependentGaussian() if mechanism is None else _instantiate(mechanism.as_dict()),
    )
    trainer = type("T", (), {"datamodule": dm, "max_steps": cfg.trainer.max_steps,
                             "min_steps": None, "min_epochs": None})()  # fmt: skip
    accounting = PrivacyAccounting(**cfg.privacy.as_dict())
    accounting.setup(trainer, module, "fit")  # type: ignore[arg-type]
    fit_plan = accounting.plan
    assert module.applied == [fit_plan] and module.noise_multiplier == fit_plan.noise_multiplier
    assert view.privacy == fit_plan  # sigma, delta, N, schedule, steps, accountant, clip fields
    # The noise mechanism's accounting event (banded MF's rounds) is in both; None = DP-SGD.
    assert fit_plan.mechanism == module.noise_mechanism.event()
    assert (fit_plan.mechanism is not None) == (config.name == "bandmf.yaml")
    steps = fit_plan.steps
    assert steps is not None
    assert view.sigma == fit_plan.noise_multiplier and view.delta == accounting.delta
    assert view.epsilon[fit_plan.accountant] == fit_plan.epsilon_after(steps)
    assert view.budget_steps == fit_plan.budget_stop_step()
    k = min(steps, 20)
    assert view.privacy.epsilon_curve(k) == fit_plan.epsilon_curve(k)


class _EpsilonPerStep(L.Callback):
    def __init__(self, accounting):
        self.accounting, self.epsilons = accounting, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.last_record is not None:
            self.epsilons.append(self.accounting.epsilon())


@pytest.mark.parametrize(
    ("noise_multiplier", "target", "accountant"),
    [
        pytest.param("auto", 6.0, "pld", id="calibrated-pld"),
        pytest.param(1.0, 3.0, "rdp", id="fixed-rdp-budget-stop"),
    ],
)
def test_a_fit_takes_the_steps_and_epsilons_of_its_plan(
    noise_multiplier, target, accountant, tmp_path
):
    accounting = PrivacyAccounting(target_epsilon=target, accountant=accountant)
    per_step = _EpsilonPerStep(accounting)
    module = make_module(noise_multiplier=noise_multiplier)
    trainer = quiet_trainer(tmp_path, 5, [accounting, per_step], limit_val_batches=0)
    trainer.fit(module, datamodule=make_dm(num_train=64, expected=8.0))
    plan = accounting.plan
    assert plan is not None and module.privacy_plan is plan
    assert module.noise_multiplier == plan.noise_multiplier
    assert accounting.delta == plan.delta
    stop = plan.budget_stop_step()
    taken = 5 if stop is None else stop
    assert trainer.global_step == taken
    assert per_step.epsilons == plan.epsilon_curve(taken)  # step by step, bit for bit
    assert (stop is not None) == (accountant == "rdp")
