"""The privacy report: assembled once, scrubbed for sharing, printed for a person.

One module owns the report a run writes to ``<log_dir>/privacy_report.json``:

- ``assemble``: the report from the accountant's ledger, the module's description of its
  mechanism, the DataModule's data report, the run's stop reason and the sections other
  callbacks add (``ReportSection``: the audit's ``audit``) (``PrivacyAccounting`` calls it at
  the budget stop, an interrupt and the end of fit);
- ``shareable``: the copy that may travel with a released model (``lit_dp.export`` writes it):
  what epsilon covers and public configuration only. Seeds and generator states are dropped
  (whether a seed was fixed is kept), local file paths, the operator-side counts
  (``OPERATOR_SIDE_KEY``) and a clip bound set from raw norms;
- ``summary_lines``: the report's lines of the run summary ``lit-dp fit`` prints (with the
  sections' own lines, e.g. ``audit:``).

It imports nothing from the CLI, the callbacks or the export code, so the data layer can name
``OPERATOR_SIDE_KEY`` without them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from lit_dp.privacy.accountant import Accountant, describe_accountant
from lit_dp.privacy.noise_mechanism import IndependentGaussian, NoiseMechanism
from lit_dp.privacy.rdp_accountant import RDPAccountant

__all__ = [
    "OPERATOR_SIDE_KEY",
    "SEED_CAVEAT",
    "ReportSection",
    "ReportSource",
    "assemble",
    "fixed_seeds",
    "report_sections",
    "section_summary_lines",
    "shareable",
    "summary_lines",
]

# The report section of exact, unprivatized data counts: operator-side, never exported.
OPERATOR_SIDE_KEY = "operator_side"
_OPERATOR_SIDE_NOTE = (
    "operator_side counts {} (exact, not privatized: at group level num_records / num_units is "
    "how many records users hold): in the run directory's report only, never exported"
)
# N is an input of the accountant (q = E[B] / N) and is printed in every report.
_N_IS_PUBLIC = (
    "num_units, N, the number of privacy units: treated as public (the sample rate q = E[B] / N "
    "states it); epsilon does not hide how many units the training set holds"
)


# What `covers` adds when a private run fixes a seed (a known seed undoes the randomness).
SEED_CAVEAT = (
    "; epsilon holds only as long as nobody learns the fixed {}: a known noise seed lets anyone "
    "subtract the noise, a known sampling seed removes the subsampling the accountant assumes"
)


def fixed_seeds(module: ReportSource, dm: Any) -> list[str]:
    """The config fields of the seeds a run fixed (model.noise_seed, data.sampling_seed).

    ``dm`` is the run's lit_dp DataModule, or None.
    """
    fixed = ["model.noise_seed"] if module.hparams.get("noise_seed") is not None else []
    if getattr(dm, "sampling_seed_fixed", False):  # a DataModule without the flag fixed none
        fixed.append("data.sampling_seed")
    return fixed


@runtime_checkable
class ReportSource(Protocol):
    """What the privacy report reads of the LightningModule (``DPCausalLM``)."""

    private: bool
    num_nonfinite_total: int
    noise_multiplier: float | None
    hparams: Any  # the module's hyperparameters (whether model.noise_seed was fixed)

    def privacy_description(self) -> dict[str, Any]:
        """The mechanism, clipping and what epsilon covers."""
        ...


@runtime_checkable
class ReportSection(Protocol):
    """A callback that adds a section to the privacy report (``AuditCanaries``: ``audit``).

    Its section's ``OPERATOR_SIDE_KEY`` entry stays in the run directory's report (``shareable``
    drops it wherever it is).
    """

    def privacy_report_section(self) -> dict[str, Any]:
        """``{name: section}`` to add to the report ({} when the callback is off)."""
        ...

    def summary_line(self) -> str | None:
        """The section's line of the run summary (None when the callback is off)."""
        ...


def report_sections(callbacks: Iterable[Any]) -> dict[str, Any]:
    """The report sections of the ``ReportSection`` callbacks among ``callbacks``, in order."""
    out: dict[str, Any] = {}
    for callback in callbacks:
        if isinstance(callback, ReportSection):
            out.update(callback.privacy_report_section())
    return out


def section_summary_lines(callbacks: Iterable[Any]) -> list[str]:
    """The run summary's lines of the ``ReportSection`` callbacks that are on."""
    lines = (cb.summary_line() for cb in callbacks if isinstance(cb, ReportSection))
    return [line for line in lines if line]


def _require(delta: float | None) -> float:
    if delta is None:
        raise RuntimeError(
            "PrivacyAccounting: delta is not set yet; setup('fit') of a private run sets it "
            "from privacy.delta or the number of privacy units"
        )
    return delta


# --- assembling --------------------------------------------------------------------------------
def assemble(
    *,
    module: ReportSource,
    dm: Any,
    global_step: int,
    accountant: Accountant,
    accountant_name: str,
    rdp: RDPAccountant,
    delta: float | None,
    target_epsilon: float | None,
    calibrated_noise_multiplier: float | None,
    num_units: int | None,
    stop_reason: str | None,
    fork_of: dict[str, Any] | None,
    sections: dict[str, Any] | None = None,
    noise_mechanism: NoiseMechanism | None = None,
) -> dict[str, Any]:
    """The run's privacy report (plain JSON types; see the module docstring).

    Args:
        module: the trained module.
        dm: the run's lit_dp DataModule (``DPDataModule``), or None.
        global_step: optimizer steps the weights took.
        accountant: the run's accountant (its ledger gives steps, rates and epsilon).
        accountant_name: "pld" or "rdp".
        rdp: the RDP accountant composed over the same ledger (the same object under RDP).
        delta: the run's delta (None before setup: refused for a private report with steps).
        target_epsilon: the budget, or None.
        calibrated_noise_multiplier: sigma when calibrated (``auto``), else None.
        num_units: N.
        stop_reason: why the run stopped (None while it runs).
        fork_of: the checkpoint this run forked, if any.
        sections: the sections other callbacks add (``report_sections``), e.g. ``audit``.
        noise_mechanism: the module's noise mechanism (None: independent Gaussian). The report
            names it (bands, coefficients, sensitivity, participation, accounting); with
            banded MF (b > 1) the ledger holds one entry per round of b steps, so ``steps`` is
            the optimizer steps taken and ``rounds`` the ledger's.

    Raises:
        RuntimeError: a private report over weights that took steps the ledger does not hold.
        ValueError: a section named like one of the report's own fields.
    """
    data = dict(dm.data_report()) if dm is not None and hasattr(dm, "data_report") else {}
    mech = module.privacy_description()
    # Exact data-dependent counts: this run directory's report only (export drops them).
    operator_side = {
        **data.pop(OPERATOR_SIDE_KEY, {}),
        "num_nonfinite_zeroed": int(module.num_nonfinite_total),
    }
    private = bool(module.private)
    noise = IndependentGaussian() if noise_mechanism is None else noise_mechanism
    bands = noise.bands  # > 1: the ledger counts rounds of b steps, charged at their start
    if private and accountant.total_steps < math.ceil(global_step / bands):
        # Never a private report over weights that took steps the ledger does not hold.
        raise RuntimeError(
            f"privacy report refused: the weights took {global_step} steps but the "
            f"privacy ledger holds {accountant.total_steps}"
            + (f" rounds of {bands} steps" if bands > 1 else "")
            + " (a checkpoint of another run "
            "was loaded?); this run's epsilon does not cover its weights"
        )
    eps, eps_rdp, order = float("inf"), float("inf"), None
    if private and accountant.total_steps > 0:
        delta = _require(delta)
        eps = accountant.get_epsilon(delta)
        eps_rdp, order = rdp.get_privacy_spent(delta=delta)
    elif private:
        eps = eps_rdp = 0.0
    history = [list(h) for h in accountant.history]
    rates = sorted({h[1] for h in accountant.history})
    schedule = getattr(dm, "schedule", None)
    if not private and schedule is not None:
        rates = sorted(set(schedule.rates(global_step)))  # sampled, not accounted
    sigma = module.noise_multiplier
    seeds = fixed_seeds(module, dm)
    covers = mech["covers"] + (SEED_CAVEAT.format(" and ".join(seeds)) if private and seeds else "")
    report = {
        "private": private,
        "epsilon": eps if math.isfinite(eps) else None,
        "epsilon_is_infinite": not math.isfinite(eps),
        "epsilon_rdp": eps_rdp if math.isfinite(eps_rdp) else None,
        **(
            {"epsilon_pld": eps if math.isfinite(eps) else None} if accountant_name == "pld" else {}
        ),
        "delta": delta,
        "target_epsilon": target_epsilon,
        "best_rdp_order": order,
        "steps": int(accountant.total_steps) if private and bands == 1 else int(global_step),
        **({"rounds": int(accountant.total_steps)} if bands > 1 else {}),
        # One type per field: sigma a float (0.0 without privacy), the sample rate its
        # schedule and the distinct rates of the steps taken (the ledger has every step).
        "noise_multiplier": float(sigma) if isinstance(sigma, int | float) else 0.0,
        "calibrated_noise_multiplier": calibrated_noise_multiplier,
        "sample_rate": {
            "schedule": dm.schedule_description()
            if dm is not None and hasattr(dm, "schedule_description")
            else None,
            "distinct_rates": rates,
        },
        "ledger": history,
        "num_units": num_units,
        "privacy_unit": data.get("privacy_unit", "example"),
        "accountant": accountant_name,
        "accountant_description": describe_accountant(accountant_name, accountant),
        "clipping": mech["clipping"],
        "mechanism": {**mech, "noise_mechanism": noise.describe()},
        "covers": covers,
        "noise_seed_fixed": "model.noise_seed" in seeds,
        "sampling_seed_fixed": "data.sampling_seed" in seeds,
        "not_covered": [
            *mech["not_covered"],
            *(dm.not_covered() if dm is not None and hasattr(dm, "not_covered") else []),
            _N_IS_PUBLIC,
            _OPERATOR_SIDE_NOTE.format(sorted(operator_side)),
        ],
        "data": data,
        OPERATOR_SIDE_KEY: operator_side,
        "stop_reason": stop_reason,
        "fork_of": fork_of,
        "interrupted": (stop_reason or "").startswith("interrupted"),
    }
    clash = sorted(set(sections or {}) & set(report))
    if clash:  # a section must never overwrite epsilon, delta or the ledger
        raise ValueError(f"report sections {clash} are named like the report's own fields")
    return {**report, **(sections or {})}


# --- scrubbing ---------------------------------------------------------------------------------
# Keys never written next to a released model: knowing the noise draws would undo the privacy.
_SECRET_KEY = re.compile(r"seed|generator|rng", re.IGNORECASE)
# Booleans that say whether a seed was fixed (never its value): the shareable report keeps them.
_PUBLIC_SEED_FLAGS = {"noise_seed_fixed", "sampling_seed_fixed"}


def _public_dataset(name: Any) -> Any:
    """A dataset name without the local path of its file (``jsonl:/home/x/mail.jsonl``)."""
    if isinstance(name, str) and ":" in name and name.split(":", 1)[0] == "jsonl":
        return "jsonl (a local file; its path is not exported)"
    return name


def _public_value(key: Any, value: Any) -> Any:
    """A report value without local paths.

    Dataset names lose their file path; a fork's parent checkpoint keeps only its file name (its
    fingerprint says which run it was).
    """
    if key == "dataset":
        return _public_dataset(value)
    if key == "checkpoint" and isinstance(value, str):
        return Path(value).name
    return _scrub(value)


def _scrub(obj: Any) -> Any:
    """Drop (recursively) every dict entry whose key names a seed or generator state.

    The operator-side counts are dropped too, local file paths (dataset names, a fork's parent
    checkpoint), and the clip
    bound of a clip-bound description that epsilon does not cover (``covered_by_dp: false``:
    HistoryPercentile's C_t is a percentile of raw per-unit norms).
    """
    if isinstance(obj, dict):
        # A bound set from raw norms (HistoryPercentile); the baseline's null bound says nothing.
        derived = obj.get("covered_by_dp") is False and obj.get("max_grad_norm") is not None
        raw = {"max_grad_norm"} if derived else set()
        return {
            k: _public_value(k, v)
            for k, v in obj.items()
            if k != OPERATOR_SIDE_KEY
            and k not in raw
            and (k in _PUBLIC_SEED_FLAGS or not _SECRET_KEY.search(str(k)))
        }
    if isinstance(obj, list | tuple):
        return [_scrub(v) for v in obj]
    return obj


def shareable(report: dict[str, Any]) -> dict[str, Any]:
    """The copy of ``report`` that may leave the operator's machine (module docstring)."""
    return _scrub(report)


# --- printing ----------------------------------------------------------------------------------
def summary_lines(
    report: dict[str, Any], report_path: Path | str, section_lines: Sequence[str] = ()
) -> list[str]:
    """The report's lines of the run summary: epsilon, what it covers, fixed seeds, the stop.

    ``section_lines`` (``section_summary_lines``: the ``audit:`` line) follow the stop.
    """
    lines: list[str] = []
    if report["private"]:
        eps = report["epsilon"]
        eps_s = "inf" if eps is None else f"{eps:.4f}"
        lines.append(
            f"privacy: epsilon = {eps_s} at delta = {report['delta']:.3g} "
            f"({report['privacy_unit']}-level, {report['steps']} steps, "
            f"noise_multiplier = {report['noise_multiplier']})"
        )
        if report.get("accountant") == "pld" and report.get("epsilon_rdp") is not None:
            lines.append(
                f"accountant: PLD (RDP, looser, would bound the same steps at epsilon = "
                f"{report['epsilon_rdp']:.4f})"
            )
        lines.append(f"covers: {report['covers']}")
        seeds = [
            name
            for name, key in (
                ("model.noise_seed", "noise_seed_fixed"),
                ("data.sampling_seed", "sampling_seed_fixed"),
            )
            if report.get(key)
        ]
        if seeds:
            lines.append(
                f"seeds: {' and '.join(seeds)} FIXED: epsilon holds only while the seed stays "
                "secret (for experiments; leave them null for a release)"
            )
    else:
        lines.append("privacy: NONE (private: false, non-private baseline)")
    lines.append(f"stopped: {report['stop_reason']}")
    lines.extend(section_lines)
    lines.append(f"privacy report: {report_path}")
    return lines
