"""What lit_dp's callbacks read and call on the LightningModule, and the hook order they rely on.

The callbacks never reach into the module by name (``getattr``/``hasattr``): they take it as a
typed protocol that ``DPCausalLM`` satisfies. PrivacyAccounting needs all of ``DPModule`` and
refuses a module without it, naming the members it lacks (``dp_module``); the optional glue
(EMA, clip-driven LR) reads only the small protocols it needs (``TrainedModel``, ``StepSource``,
``ClipSource``, ``EvaluationWeights``) and leaves a module without them alone; the report reads
``ReportSource`` (``lit_dp.report``); the export reads ``ExportSource`` (``export_source``) and
the DataModule's tokenizer (``TokenizerSource``). A module without a noise mechanism
(``NoiseSource``) adds independent Gaussian noise (``noise_mechanism``).

HOOK_ORDER states the one ordering of Lightning's hooks that lit_dp relies on;
tests/callbacks/test_contract.py checks that Lightning still calls them in this order.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

from lit_dp.privacy.clipping import ClipBoundEstimator
from lit_dp.privacy.noise_mechanism import IndependentGaussian, NoiseMechanism
from lit_dp.privacy.plan import PrivacyPlan
from lit_dp.report import ReportSource
from lit_dp.step_record import DPStepRecord

__all__ = [
    "HOOK_ORDER",
    "ClipSource",
    "DPModule",
    "EvaluationWeights",
    "ExportSource",
    "NoiseSource",
    "ReportSource",
    "StepSource",
    "TokenizerSource",
    "TrainedModel",
    "dp_module",
    "export_source",
    "noise_mechanism",
    "report_source",
]

HOOK_ORDER = """\
For one hook name, Lightning calls the DataModule's hook (setup only), then every callback's in the
order of trainer.callbacks, then the LightningModule's; on_train_end comes before on_fit_end.
lit_dp relies on it three times:
1. setup("fit"): the DataModule sets N and the rate schedule; AuditCanaries.setup (listed before
   PrivacyAccounting: lit-dp's audit: section comes before privacy:) adds its included canaries,
   so N and the schedule grow; PrivacyAccounting.setup builds the privacy plan from them and
   applies it (apply_privacy_plan: sigma becomes a float); then DPCausalLM.setup refuses a private
   run whose sigma is still unset.
2. on_train_batch_start: PrivacyAccounting peeks at the next step's epsilon and, past the budget,
   calls request_stop; then DPCausalLM.on_train_batch_start returns -1, so no step is taken.
3. on_train_end, then on_fit_end: AuditCanaries.on_train_end scores the canaries on the trained
   weights; PrivacyAccounting.on_fit_end writes the report (with the audit section) and hands it
   over (set_privacy_report); then ExportModel.on_fit_end (listed after PrivacyAccounting:
   lit-dp's export: section comes after privacy:, and ExportModel.setup refuses the other order)
   exports the evaluation weights with the report's shareable part.
"""


@runtime_checkable
class StepSource(Protocol):
    """A module that leaves each step's record (clip-driven LR reads the privatized clip rate)."""

    last_record: DPStepRecord | None  # the step just taken (None: no step this batch)


@runtime_checkable
class TrainedModel(Protocol):
    """A module whose ``model`` the EMA averages after each recorded step."""

    model: Any
    last_record: DPStepRecord | None


@runtime_checkable
class ClipSource(Protocol):
    """A module with a clip-bound estimator (clip-driven LR steers toward its target)."""

    clip: ClipBoundEstimator


@runtime_checkable
class NoiseSource(Protocol):
    """A module with its own noise mechanism (banded MF's correlated noise, or independent)."""

    noise_mechanism: NoiseMechanism


def noise_mechanism(pl_module: Any) -> NoiseMechanism:
    """The module's noise mechanism: what its steps add to the ledger and the report names.

    A module without one (``NoiseSource``) adds independent Gaussian noise, DP-SGD's.
    """
    if isinstance(pl_module, NoiseSource) and isinstance(pl_module.noise_mechanism, NoiseMechanism):
        return pl_module.noise_mechanism
    return IndependentGaussian()


@runtime_checkable
class EvaluationWeights(Protocol):
    """A module that evaluates (and is exported) inside a weight swap (EMA installs it)."""

    def use_evaluation_weights(
        self, swap: Callable[[], AbstractContextManager[None]] | None
    ) -> None:
        """Install the context that swaps the evaluation (EMA) weights in."""
        ...


@runtime_checkable
class ExportSource(Protocol):
    """A module whose evaluation weights the export writes, with the run's privacy report."""

    model: Any
    privacy_report: dict[str, Any] | None  # handed over at the end of fit (HOOK_ORDER 3)
    hparams: Any  # "model": the model source trained from, named in the model card

    def evaluation_weights(self) -> AbstractContextManager[None]:
        """Context in which ``model`` holds the weights to export (EMA's when installed)."""
        ...


@runtime_checkable
class TokenizerSource(Protocol):
    """A DataModule with a tokenizer (exported beside the model)."""

    tokenizer: Any


@runtime_checkable
class DPModule(Protocol):
    """The members of ``DPCausalLM`` that lit_dp's callbacks use."""

    private: bool
    clip: ClipBoundEstimator
    noise_multiplier: float | None  # None only before the plan is applied ("auto")
    hparams: Any
    last_record: DPStepRecord | None  # the step just taken (None: no step this batch)
    num_nonfinite_total: int
    model: Any

    def apply_privacy_plan(self, plan: PrivacyPlan) -> None:
        """Take the plan's sigma (HOOK_ORDER 1)."""
        ...

    def request_stop(self, reason: str) -> None:
        """Take no further step (HOOK_ORDER 2)."""
        ...

    def privacy_description(self) -> dict[str, Any]:
        """The mechanism, clipping and what epsilon covers, for the report."""
        ...

    def set_privacy_report(self, report: dict[str, Any] | None) -> None:
        """The report whose shareable part the export writes (HOOK_ORDER 3)."""
        ...

    def use_evaluation_weights(
        self, swap: Callable[[], AbstractContextManager[None]] | None
    ) -> None:
        """Install the context that swaps the evaluation (EMA) weights in."""
        ...

    def reseed_noise_for_fork(self) -> None:
        """Drop the restored noise generator state (``lit-dp fit --fork``)."""
        ...


def dp_module(pl_module: Any, *, caller: str) -> DPModule:
    """``pl_module`` as a ``DPModule``; TypeError naming what it lacks and who needs it."""
    if isinstance(pl_module, DPModule):
        return pl_module
    raise _lacks(pl_module, DPModule, _METHODS, caller)


def report_source(pl_module: Any, *, caller: str) -> ReportSource:
    """``pl_module`` as a ``ReportSource``; TypeError naming what it lacks."""
    if isinstance(pl_module, ReportSource):
        return pl_module
    raise _lacks(pl_module, ReportSource, ("privacy_description",), caller)


def export_source(pl_module: Any, *, caller: str) -> ExportSource:
    """``pl_module`` as an ``ExportSource``; TypeError naming what it lacks."""
    if isinstance(pl_module, ExportSource):
        return pl_module
    raise _lacks(pl_module, ExportSource, ("evaluation_weights",), caller)


def _lacks(pl_module: Any, protocol: type, methods: tuple[str, ...], caller: str) -> TypeError:
    missing = sorted(
        name
        for name in (*protocol.__annotations__, *methods)
        if not hasattr(pl_module, name)  # the check isinstance made, spelled out for the message
    )
    return TypeError(
        f"{caller} needs a lit_dp.DPCausalLM (or a module with the same privacy members); "
        f"{type(pl_module).__name__} lacks {missing}"
    )


_METHODS = (
    "apply_privacy_plan",
    "request_stop",
    "privacy_description",
    "set_privacy_report",
    "use_evaluation_weights",
    "reseed_noise_for_fork",
)
