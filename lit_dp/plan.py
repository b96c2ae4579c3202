"""``lit-dp plan --config X.yaml``: what a run will cost in privacy, before any training.

The config is parsed exactly as ``fit`` parses it (``LitDPCLI``'s parser: the same defaults,
links, overrides and trainer checks), but only the DataModule is built, and only its records
are read: N privacy units and the sample-rate schedule need neither the model nor its tokenizer,
so the plan works for configs whose model directory is not on this machine. The plan printed is
the ``lit_dp.privacy.plan.PrivacyPlan`` that fit builds (``PrivacyPlan.create``, the one
constructor fit's accounting callback also calls, from the same privacy section, N, schedule,
steps, sigma, clip-bound estimator and noise mechanism), so its sigma,
delta, epsilon and budget-stop step are the ones the run will write into
``privacy_report.json``; the same plan under the other accountant is printed beside it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from lightning.pytorch.cli import instantiate_class

from lit_dp.cli import LitDPCLI
from lit_dp.privacy.accountant import ACCOUNTANTS
from lit_dp.privacy.allocation import (
    DEFAULT_MIN_STEPS,
    SMALLEST_BATCH,
    Allocation,
    allocations,
    candidate_batch_sizes,
    recommend,
)
from lit_dp.privacy.bandmf import inverse_coefficients, suggest_bands
from lit_dp.privacy.clipping import (
    default_clip_estimator,
)
from lit_dp.privacy.noise_mechanism import IndependentGaussian, NoiseMechanism
from lit_dp.privacy.plan import PrivacyPlan as RunPlan
from lit_dp.privacy.sampling import SampleRateSchedule


class _ParseOnlyCLI(LitDPCLI):
    """LitDPCLI that parses and checks the config, and instantiates nothing."""

    def instantiate_classes(self) -> None:
        pass

    def _set_seed(self) -> None:
        pass  # planning draws nothing at random (and should not log "Seed set")


@dataclass
class PlanView:
    """Everything ``lit-dp plan`` prints; per-accountant values are keyed "pld" / "rdp".

    ``privacy`` is the run's ``lit_dp.privacy.plan.PrivacyPlan``, the object fit builds in
    ``PrivacyAccounting.setup`` from the same config (None for a non-private run); the noise
    figures are its answers.
    """

    private: bool
    num_units: int
    privacy_unit: str
    dataset: str
    schedule: SampleRateSchedule
    steps: int | None
    target_epsilon: float | None = None
    accountant: str = "pld"
    privacy: RunPlan | None = None
    noise_multiplier: dict[str, float] = field(default_factory=dict)
    epsilon: dict[str, float] = field(default_factory=dict)
    epsilon_rdp_of_run: float | None = None  # the report's epsilon_rdp (RDP at the PLD sigma)
    budget_steps: int | None = None  # fixed sigma over budget: steps taken before the stop
    max_grad_norm: float = 1.0
    clipping: str = "FixedClip"  # the clip-bound estimator's class
    clip_covered_by_dp: bool = True  # False: C_t from raw norms, epsilon covers nothing
    mechanism: NoiseMechanism = field(default_factory=IndependentGaussian)  # model.noise_mechanism
    suggested_bands: int | None = None  # b ~ epsilon sqrt(n) / k (McKenna 2025)
    compute: float | None = None  # example-gradients, sum_t E[B_t] over the planned steps
    allocations: list[Allocation] = field(default_factory=list)  # E[B] x steps at this compute
    recommended: Allocation | None = None  # the rule's choice among them
    min_steps: int = DEFAULT_MIN_STEPS
    batch_override: bool = False  # the config's batch schedule is ConstantBatchSize
    # banded MF: independent noise at the same E[B], steps and epsilon (None: b = 1 or no steps)
    independent: RunPlan | None = None
    independent_error: str | None = None  # why that plan could not be made

    @property
    def delta(self) -> float | None:
        return None if self.privacy is None else self.privacy.delta

    @property
    def delta_is_default(self) -> bool:
        return self.privacy is None or self.privacy.delta_is_default

    @property
    def calibrated(self) -> bool:
        return self.privacy is not None and self.privacy.calibrated

    @property
    def sigma(self) -> float | None:
        """The run's accounted noise multiplier (its accountant's)."""
        return None if self.privacy is None else self.privacy.noise_multiplier

    def expected_batch_size(self, step: int) -> float:
        return self.schedule.rate(step) * self.num_units

    def count_noise_std(self, step: int = 0) -> float | None:
        """Private quantile: std of the count noise at ``step``, E[B_t] / divisor (in units)."""
        return None if self.privacy is None else self.privacy.count_noise_std(step)

    def count_noise_share(self, step: int = 0) -> float | None:
        """Share of the accounted noise precision 1 / sigma^2 that pays for the count."""
        return None if self.privacy is None else self.privacy.count_noise_share(step)

    def grad_noise_multiplier(self, step: int = 0) -> float | None:
        """The gradient's noise multiplier: sigma, raised to pay for a private quantile count."""
        return None if self.privacy is None else self.privacy.grad_noise_multiplier(step)

    def noise_std(self, step: int = 0) -> float | None:
        """Per-step fresh noise std on the averaged gradient, z_grad * C_0 * ||c|| / E[B_t].

        ||c|| is the noise mechanism's sensitivity (1 for independent noise).
        """
        return None if self.privacy is None else self.privacy.noise_std(step)

    def settled_factor(self) -> float:
        """Norm of the last row of C^-1 over the planned steps (1 for b = 1).

        The released noise at step t is sigma C ||c|| (C^-1 z)_t: its std grows from 1x at
        step 0 to this factor at the last step.
        """
        if self.mechanism.bands == 1 or not self.steps:
            return 1.0
        inverse = inverse_coefficients(self.mechanism.coefficients, self.steps)
        return math.sqrt(math.fsum(x * x for x in inverse))


def read_config(args: list[str]) -> Any:
    """The parsed, checked config (a jsonargparse Namespace) of ``fit --config ...`` args."""
    with warnings.catch_warnings():
        # LightningCLI warns when sys.argv and args are both given; `lit-dp plan` gives its own.
        warnings.filterwarnings("ignore", message=".*args parameter is intended")
        return _ParseOnlyCLI(args=args, run=False).config


def _instantiate(spec: Any) -> Any:
    """Build a ``{"class_path", "init_args"}`` entry as the CLI does.

    Nested entries first (a DataModule's batch_schedule), other values as they are.
    """
    if isinstance(spec, dict) and "class_path" in spec:
        init_args = {k: _instantiate(v) for k, v in (spec.get("init_args") or {}).items()}
        return instantiate_class((), {"class_path": spec["class_path"], "init_args": init_args})
    return spec


def make_plan(
    config: Any, *, compute: float | None = None, min_steps: int = DEFAULT_MIN_STEPS
) -> PlanView:
    """The run's privacy plan as fit builds it, and the same plan under the other accountant.

    With planned steps, also the compute allocations at the run's example-gradients (or
    ``compute``) and the one ``lit_dp.privacy.allocation.recommend`` picks (``min_steps``).

    Raises:
        ValueError: the errors ``fit`` raises before training for the same config (bad delta,
            unreachable budget, a batch too small for the private quantile's count noise).
    """
    model, trainer_cfg = config.model, config.trainer
    privacy = config.privacy  # checked by RunPlan.create, as fit's setup checks it
    dm = _instantiate(config.data.as_dict())  # with its batch_schedule component
    num_units, schedule = dm.units_and_schedule()
    # The clip-bound estimator as fit builds it (validates its fields the same way).
    clip = (
        default_clip_estimator()
        if model.clipping is None
        else instantiate_class((), model.clipping.as_dict())
    )
    max_steps = trainer_cfg.max_steps
    mech_cfg = model.get("noise_mechanism")
    mechanism = IndependentGaussian() if mech_cfg is None else _instantiate(mech_cfg.as_dict())
    view = PlanView(
        private=bool(model.private),
        num_units=num_units,
        privacy_unit=dm.privacy_unit,
        dataset=dm.dataset_name(),
        schedule=schedule,
        steps=max_steps if max_steps and max_steps > 0 else None,
        target_epsilon=privacy.target_epsilon,
        accountant=privacy.accountant,
        max_grad_norm=float(clip.max_grad_norm),
        clipping=type(clip).__name__,
        clip_covered_by_dp=bool(clip.covered_by_dp),
        mechanism=mechanism if model.private else IndependentGaussian(),
    )
    if not view.private:
        return view
    noise_multiplier: float | Literal["auto"] = (
        "auto" if model.noise_multiplier == "auto" else float(model.noise_multiplier)
    )
    plans = {
        name: RunPlan.create(
            num_units=num_units,
            schedule=schedule,
            steps=view.steps,
            noise_multiplier=noise_multiplier,
            target_epsilon=privacy.target_epsilon,
            delta=privacy.delta,
            accountant=name,  # type: ignore[arg-type]
            clip=clip,
            mechanism=view.mechanism.event(),
        )
        for name in sorted(ACCOUNTANTS, key=lambda n: n != view.accountant)  # the run's first
    }
    run = view.privacy = plans[view.accountant]
    if view.steps is not None:
        for name, plan in plans.items():
            view.noise_multiplier[name] = plan.noise_multiplier
            view.epsilon[name] = plan.epsilon_after(view.steps)
        view.budget_steps = run.budget_stop_step()
        if view.accountant == "pld":  # the report's epsilon_rdp: RDP of this run's own sigma
            view.epsilon_rdp_of_run = run.epsilon_after(view.steps, accountant="rdp")
        target = view.target_epsilon
        view.suggested_bands = _suggested_bands(view, target or view.epsilon[view.accountant])
        view.compute = compute or num_units * sum(schedule.rates(view.steps))
        view.min_steps = min_steps
        own = [view.expected_batch_size(0)] if schedule.kind == "constant" and not compute else []
        view.allocations = allocations(
            num_units=num_units,
            compute=view.compute,
            target_epsilon=target or view.epsilon[view.accountant],
            delta=run.delta,
            accountant=run.accountant,
            clip=clip,
            mechanism=view.mechanism.event(),
            batch_sizes=candidate_batch_sizes(num_units, view.compute, extra=own),
        )
        view.recommended = recommend(view.allocations, min_steps)
        if view.mechanism.bands > 1:
            view.independent, view.independent_error = _independent_plan(view, run, clip, target)
        batch_class = (config.data.init_args.get("batch_schedule") or {}).get("class_path", "")
        view.batch_override = batch_class.endswith("ConstantBatchSize")
    # The check fit makes before its first step (ValueError: batch too small for a private
    # quantile's count at the smallest expected batch of the planned steps).
    run.check_batches(clip)
    return view


def _independent_plan(
    view: PlanView, run: RunPlan, clip: Any, target: float | None
) -> tuple[RunPlan | None, str | None]:
    """Independent noise calibrated to the banded run's epsilon, same schedule and steps.

    (None, the reason) where ``PrivacyPlan.create`` refuses it.
    """
    try:
        plan = RunPlan.create(
            num_units=view.num_units,
            schedule=view.schedule,
            steps=view.steps,
            noise_multiplier="auto",
            target_epsilon=target or view.epsilon[view.accountant],
            delta=run.delta,
            accountant=run.accountant,
            clip=clip,
            mechanism=IndependentGaussian().event(),
        )
    except ValueError as err:
        return None, str(err).split("\n", 1)[0]
    return plan, None


def _suggested_bands(view: PlanView, epsilon: float) -> int:
    """The rule b ~ epsilon sqrt(n) / k (k = sum_t q_t epochs) within b q_t <= 1 and b <= n."""
    steps = int(view.steps or 0)
    rates = view.schedule.rates(steps)
    most = min(steps, int(1.0 / max(rates)) + 1) if rates else 1
    while most > 1 and most * max(rates) > 1.0:
        most -= 1
    return suggest_bands(epsilon=epsilon, steps=steps, epochs=sum(rates), max_bands=most)


def _rate_line(plan: PlanView) -> tuple[str, str]:
    s = plan.schedule
    if s.kind == "constant":
        return f"{plan.expected_batch_size(0):g}", f"{s.rate(0):.6g} (constant)"
    end = s.rate(s.ramp_steps)
    return (
        f"{plan.expected_batch_size(0):g} -> {end * plan.num_units:g}",
        f"{s.rate(0):.6g} -> {end:.6g} (linear over {s.ramp_steps} steps)",
    )


def format_plan(plan: PlanView, source: str = "") -> str:
    """The aligned table ``lit-dp plan`` prints.

    One label column, then one value (or one per accountant, the run's own first).
    """
    rows: list[tuple[str, list[str]]] = []
    batch, rate = _rate_line(plan)
    steps = f"{plan.steps} (trainer.max_steps)" if plan.steps else "unset (trainer.max_steps)"
    rows += [
        ("data", [f"{plan.dataset}, {plan.privacy_unit}-level privacy units"]),
        ("privacy units N", [f"{plan.num_units}"]),
        ("expected batch size E[B]", [batch]),
        ("sample rate q = E[B] / N", [rate]),
        ("steps", [steps]),
    ]
    if not plan.private:
        rows.append(("privacy", ["NONE (model.private: false): epsilon = infinity"]))
        return _table(rows, source)
    if not plan.clip_covered_by_dp:  # first, before any epsilon is printed
        rows.insert(
            0,
            (
                "NOT COVERED",
                [
                    f"model.clipping {plan.clipping} sets the clip bound from raw per-unit "
                    "norms: the epsilon below does NOT cover the weights (use FixedClip or "
                    "PrivateQuantile for a private run)"
                ],
            ),
        )
    origin = f" (privacy.delta unset: the default for N = {plan.num_units})"
    rows.append(("delta", [f"{plan.delta:.4g}{origin if plan.delta_is_default else ''}"]))
    target = "none (no budget stop)" if plan.target_epsilon is None else f"{plan.target_epsilon:g}"
    rows.append(("target epsilon", [target]))
    mech, b = plan.mechanism, plan.mechanism.bands
    if b > 1:
        coeffs = ", ".join(f"{c:.4g}" for c in mech.coefficients)
        rows += [
            ("noise mechanism", [f"banded MF, b = {b} bands: correlated noise, cyclic sampling "
                                 f"of {b} groups at rate b q = {b * plan.schedule.rate(0):.6g}"]),
            ("coefficients c", [f"{coeffs} ({mech.describe().get('coefficients_source')})"]),
            ("sensitivity ||c||", [f"{mech.sensitivity:.6g} (noise std sigma x C x ||c||)"]),
        ]  # fmt: skip
        if plan.steps:
            rows.append(("accounted rounds", [f"{math.ceil(plan.steps / b)} of {b} steps"]))
    else:
        rows.append(("noise mechanism", ["independent Gaussian (DP-SGD), b = 1"]))
    if plan.suggested_bands is not None:
        rows.append(
            (
                "suggested bands",
                [f"b = {plan.suggested_bands} (b ~ epsilon sqrt(n) / epochs, McKenna 2025; "
                 "a starting point: tune b with b = 1, independent noise, among the choices; "
                 "model.noise_mechanism: lit_dp.privacy.noise_mechanism.BandedMF)"],
            )
        )  # fmt: skip
    if plan.noise_multiplier:
        names = [plan.accountant, *(n for n in ACCOUNTANTS if n != plan.accountant)]
        how = "calibrated to the target" if plan.calibrated else "model.noise_multiplier"
        rows += [
            ("accountant", [n.upper() + (" (this run)" if n == plan.accountant else "")
                            for n in names]),
            ("noise_multiplier sigma", [*(f"{plan.noise_multiplier[n]:.6g}" for n in names), how]),
            (f"epsilon after {plan.steps} steps", [f"{plan.epsilon[n]:.4f}" for n in names]),
        ]  # fmt: skip
        if plan.epsilon_rdp_of_run is not None:
            rows.append(
                (
                    "RDP epsilon of this run",
                    [
                        f"{plan.epsilon_rdp_of_run:.4f} (the "
                        "report's epsilon_rdp: RDP at the PLD sigma, a cross-check)"
                    ],
                )
            )
        if plan.budget_steps is not None:
            rows.append(
                (
                    "budget stop",
                    [
                        f"after {plan.budget_steps} of {plan.steps} steps "
                        f"({plan.accountant.upper()} epsilon would pass the target)"
                    ],
                )
            )
    elif plan.steps is None:
        rows.append(("epsilon", ["grows with every step until the budget stop (no max_steps)"]))
    share, count_std = plan.count_noise_share(0), plan.count_noise_std(0)
    z = plan.grad_noise_multiplier(0)
    if share is not None and count_std is not None:
        rows += [
            ("quantile count noise std",
             [f"{count_std:.4g} units = E[B] / count_noise_divisor (step 0)"]),
            ("count noise share", [f"{100 * share:.2f} % of the accounted noise "
                                   "= (sigma / (2 count std))^2"]),
        ]  # fmt: skip
    if z is not None:
        raised = " (sigma raised to pay for the count)" if share else ""
        rows += [
            ("gradient noise multiplier", [f"{z:.6g}{raised}"]),
            ("noise std, averaged gradient",
             [f"{plan.noise_std(0):.4g} per coordinate = {z:.4g} x C_0 {plan.max_grad_norm:g}"
              + (f" x ||c|| {mech.sensitivity:.4g}" if b > 1 else "")
              + f" / E[B] {plan.expected_batch_size(0):g} (step 0)"]),
        ]  # fmt: skip
        rows += _banded_noise_rows(plan)
        if plan.schedule.kind == "linear":
            end = plan.schedule.ramp_steps
            if plan.steps is not None and plan.steps <= end:  # the run ends inside the ramp
                end = plan.steps - 1
            rows.append(
                (
                    "",
                    [
                        f"{plan.noise_std(end):.4g} "
                        + (
                            f"from step {end} on"
                            if end == plan.schedule.ramp_steps
                            else f"at step {end}, the last"
                        )
                        + f" (E[B] {plan.expected_batch_size(end):g})"
                    ],
                )
            )
    rows += _allocation_rows(plan)
    return _table(rows, source)


def _banded_noise_rows(plan: PlanView) -> list[tuple[str, list[str]]]:
    """Banded MF: the released noise by the last step, against independent noise.

    Independent noise is taken at the same E[B], steps and epsilon; the ratio is what Adam's
    per-coordinate scaling sees, hence the learning-rate hint.
    """
    std, ind = plan.noise_std(0), plan.independent
    if plan.mechanism.bands == 1 or std is None or not plan.steps:
        return []
    factor = plan.settled_factor()
    rows = [
        ("released noise std", [f"{std * factor:.4g} per coordinate by step {plan.steps} "
                                f"(x {factor:.4g}: the rows of C^-1 grow to that norm)"]),
    ]  # fmt: skip
    ind_std = None if ind is None else ind.noise_std(0)
    if ind is not None and ind_std:
        rows.append(
            (
                "against independent noise",
                [f"{std * factor / ind_std:.3g} x the std of independent noise at this E[B], "
                 f"steps and epsilon (sigma {ind.noise_multiplier:.4g}): Adam scales its steps "
                 "by the noise it sees, so tune the learning rate upward from independent "
                 "noise's by about this factor (lit_dp's utility study 2 found so; "
                 "benchmarks/README.md section 7)"],
            )
        )  # fmt: skip
    elif plan.independent_error:
        rows.append(("against independent noise", [f"not computed: {plan.independent_error}"]))
    return rows


def _allocation_rows(plan: PlanView) -> list[tuple[str, list[str]]]:
    """The compute-allocation table: each E[B] x steps at the run's compute, the rule's pick."""
    rec, compute = plan.recommended, plan.compute
    if compute is None or not plan.allocations:
        return []
    own = plan.expected_batch_size(0) if plan.schedule.kind == "constant" else None
    ratio = "sigma / E[B]" if plan.mechanism.bands == 1 else "sigma ||c|| / E[B]"
    rows: list[tuple[str, list[str]]] = [
        ("compute", [f"{compute:,.0f} example-gradients = E[B] x steps "
                     f"({compute / plan.num_units:.3g} epochs)"]),
        ("same compute, same epsilon", [f"{'E[B]':>8}{'steps':>8}{'sigma':>10}{ratio:>20}"]),
    ]  # fmt: skip
    for a in plan.allocations:
        if a.plan is None:
            body = f"{a.expected_batch_size:>8g}{a.steps:>8}  not possible: {a.error}"
        else:
            body = (
                f"{a.expected_batch_size:>8g}{a.steps:>8}{a.noise_multiplier:>10.4f}"
                f"{a.noise_batch_ratio:>20.3e}"
            )
        marks = [m for m, hit in (("this run", a.expected_batch_size == own and a.steps ==
                                   plan.steps), ("recommended", a is rec)) if hit]  # fmt: skip
        rows.append(("", [body + (f"   <- {', '.join(marks)}" if marks else "")]))
    if rec is None:
        rows.append(
            (
                "recommended allocation",
                [f"none: no E[B] >= {SMALLEST_BATCH} leaves {plan.min_steps} steps at this "
                 f"compute (the rule needs >= {plan.min_steps * SMALLEST_BATCH:,} "
                 "example-gradients; it was measured on longer runs)"],
            )
        )  # fmt: skip
        return rows
    rows.append(
        (
            "recommended allocation",
            [f"E[B] {rec.expected_batch_size:g} x {rec.steps} steps, {ratio} "
             f"{rec.noise_batch_ratio:.3e} (the largest E[B] that leaves >= {plan.min_steps} "
             "steps: at fixed compute and epsilon a larger batch lowers the noise per step "
             "sigma / E[B], McKenna et al. 2025)"],
        )
    )  # fmt: skip
    if plan.batch_override:
        flag = "--data.init_args.batch_schedule.init_args.expected_batch_size"
        rows.append(("", [f"{flag} {rec.expected_batch_size:g} --trainer.max_steps {rec.steps}"]))
    return rows


def _table(rows: list[tuple[str, list[str]]], title: str) -> str:
    label = max(len(k) for k, _ in rows) + 2
    multi = [cells for _, cells in rows if len(cells) > 1]
    col = max((len(c) for cells in multi for c in cells[:-1]), default=0) + 3
    lines = [f"lit-dp plan: {title}"] if title else []
    for key, cells in rows:
        body = "".join(c.ljust(col) for c in cells[:-1]) + cells[-1]
        lines.append("  " + key.ljust(label) + body)
    return "\n".join(lines)


PLAN_HELP = f"""usage: lit-dp plan --config X.yaml [--section.field value ...]

Print what a run of this config will cost in privacy, before any training: the number of
privacy units N (counted from the records), the expected batch size and sample rate, the steps,
delta, the noise multiplier (calibrated to privacy.target_epsilon, or the one given) and the
epsilon it gives under the PLD and RDP accountants, and where a budget stop would end the run.
It reads the config exactly as `lit-dp fit` does, with the same overrides and the same errors,
but loads neither the model nor its tokenizer, so it takes seconds.

With planned steps, it also lists the ways to spend the same compute (example-gradients,
E[B] x steps) at the same epsilon: each expected batch size E[B] with its steps, sigma and noise
per step sigma / E[B], and recommends one: the largest E[B] that leaves at least --min-steps
steps (larger batches and fewer steps lower the noise per step at fixed compute and epsilon).

options:
  --config X.yaml         the config of the run (several: later ones override earlier ones)
  --section.field value   any field fit accepts, e.g. --privacy.target_epsilon 4
                          --trainer.max_steps 100 --model.noise_multiplier 0.8
                          (lit-dp fit --help lists them all)
  --compute G             example-gradients to allocate (default: the run's E[B] x steps)
  --min-steps S           the fewest steps the recommendation keeps (default: {DEFAULT_MIN_STEPS})
  -h, --help              show this help"""


def _pop_option(argv: list[str], name: str, kind: type) -> tuple[list[str], Any]:
    """``argv`` without ``name value`` (or ``name=value``), and the value (None if absent).

    Raises:
        ValueError: the value is missing, not a number of ``kind``, or not positive.
    """
    rest, value = [], None
    it = iter(argv)
    for arg in it:
        if arg == name or arg.startswith(name + "="):
            text = arg.split("=", 1)[1] if "=" in arg else next(it, None)
            try:
                value = kind(text)
            except (TypeError, ValueError):
                value = None
            if value is None or not value > 0:
                raise ValueError(f"{name} needs a positive {kind.__name__}, got {text!r}")
        else:
            rest.append(arg)
    return rest, value


def main(argv: list[str]) -> None:
    """``lit-dp plan --config X.yaml [--section.field value ...]``: print the privacy plan."""
    if not argv or argv[0] in ("-h", "--help") or "--help" in argv:
        print(PLAN_HELP)
        return
    argv, compute = _pop_option(argv, "--compute", float)
    argv, min_steps = _pop_option(argv, "--min-steps", int)
    config = read_config(argv)
    sources = [str(path) for path in (config.get("config") or []) if path is not None]
    view = make_plan(config, compute=compute, min_steps=min_steps or DEFAULT_MIN_STEPS)
    print(format_plan(view, ", ".join(sources)))
    canaries = int((config.get("audit") or {}).get("num_canaries") or 0)
    if canaries:  # drawn at fit: N grows by the included ones, which no plan can know yet
        print(
            f"  audit: {canaries} canaries, each joins N with probability 1/2 at fit (about "
            f"{canaries // 2} units more): fit's N, q and calibrated sigma differ from this plan"
        )
