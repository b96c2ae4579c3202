"""The model card (``README.md``) of an export: its privacy statement and training recipe.

Hugging Face's convention: YAML front matter (library, tags, the base model when it is a hub
id) and a Markdown body. Everything in it comes from the export's shareable privacy report
(``lit_dp.export`` removed seeds, generator states, operator-side counts and local paths
before), so the card states nothing the report does not.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from lit_dp.audit.card import audit_card_lines

# A hub id "org/name": the only base model named in the front matter (a local path is not).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# The report fields the card states: a report written by lit_dp's PrivacyAccounting has them all.
REQUIRED_FIELDS = frozenset(
    [
        "private",
        "epsilon",
        "delta",
        "privacy_unit",
        "num_units",
        "steps",
        "noise_multiplier",
        "sample_rate",
        "accountant",
        "accountant_description",
        "covers",
        "not_covered",
        "clipping",
        "mechanism",
        "data",
        "stop_reason",
    ]
)


def _base_name(base_model: str | None) -> str | None:
    """The base model as the card may name it: a hub id or built-in name, or a file's name."""
    if not base_model:
        return None
    if _HUB_ID.match(base_model) and not Path(base_model).exists():
        return base_model
    return Path(base_model).name  # a local directory or .gguf file: its name, not its path


def _number(value: Any, digits: int = 4) -> str:
    return "infinite" if value is None else f"{value:.{digits}g}"


def _rate(report: dict[str, Any]) -> str:
    rates = report["sample_rate"]["distinct_rates"]
    if not rates:
        return "no step taken"
    if len(rates) == 1:
        return f"{rates[0]:.6g} per step"
    return f"{min(rates):.6g} to {max(rates):.6g} over the steps (a schedule)"


def _component(spec: Any) -> str:
    """``Class (a=1, b=2)`` of a ``{"class_path", "init_args"}`` entry."""
    if not isinstance(spec, dict) or "class_path" not in spec:
        return str(spec)
    args = ", ".join(f"{k}={v}" for k, v in (spec.get("init_args") or {}).items())
    return f"{spec['class_path'].rsplit('.', 1)[-1]} ({args})" if args else spec["class_path"]


def _privacy(report: dict[str, Any]) -> list[str]:
    if not report["private"]:
        return [
            "**Not differentially private.** This model was trained with `private: false` (the "
            "non-private baseline): no clipping, no noise, no privacy guarantee. Do not release "
            "it where the training data must stay private.",
        ]
    unit = report["privacy_unit"]
    group_key = report["data"].get("group_key")
    neighbour = (
        f"all records of one user (records sharing the field `{group_key}`)"
        if unit == "group"
        else "one training example"
    )
    seeds = [
        name
        for name, key in (("noise", "noise_seed_fixed"), ("sampling", "sampling_seed_fixed"))
        if report.get(key)
    ]
    return [
        f"This model is **({_number(report['epsilon'])}, {report['delta']:.3g})-differentially "
        f"private** with respect to adding or removing {neighbour} ({unit}-level privacy).",
        "",
        "| | |",
        "|---|---|",
        f"| epsilon | {_number(report['epsilon'])} ({report['accountant'].upper()} accountant; "
        f"RDP would bound the same steps at {_number(report.get('epsilon_rdp'))}) |",
        f"| delta | {report['delta']:.3g} |",
        f"| privacy unit | {unit} |",
        f"| privacy units N | {report['num_units']} (treated as public) |",
        f"| steps | {report['steps']} |",
        f"| noise multiplier | {report['noise_multiplier']:.6g} |",
        f"| sample rate | {_rate(report)} (Poisson sampling) |",
        f"| accountant | {report['accountant_description']} |",
        f"| fixed seeds | {', '.join(seeds) + ' (see covers)' if seeds else 'none (OS entropy)'} |",
        "",
        f"**Covered by epsilon:** {report['covers']}.",
        "",
        "**Not covered:**",
        "",
        *(f"- {item}" for item in report["not_covered"]),
    ]


def _audit(report: dict[str, Any]) -> list[str]:
    """The card's audit section when the run was audited (``audit:``), else nothing."""
    lines = audit_card_lines(report)
    return ["## Empirical privacy audit", "", *lines, ""] if lines else []


def model_card(
    report: dict[str, Any], *, base_model: str | None = None, bitnet_qat: bool = False
) -> str:
    """The card's text, from the shareable (scrubbed) privacy report of the export.

    Args:
        report: the export's ``privacy_report.json`` content.
        base_model: the model source trained from (a hub id, a built-in name or a local path;
            only a hub id goes into the front matter, only a path's last part into the text).
        bitnet_qat: the export holds BitNet QAT latent weights (load with lit_dp's loader).
    """
    base = _base_name(base_model)
    front: dict[str, Any] = {
        "library_name": "transformers",
        "tags": ["lit-dp", "differential-privacy" if report["private"] else "non-private"],
    }
    if base and _HUB_ID.match(base):
        front["base_model"] = base
    data, mech = report["data"], report["mechanism"]
    hyper = ", ".join(f"{k}={v}" for k, v in mech.get("optimizer_hyperparameters", {}).items())
    clip = report["clipping"]
    clip_text = (
        f"{clip['name']} (max_grad_norm {clip['max_grad_norm']:.4g} per privacy unit)"
        if clip.get("max_grad_norm") is not None
        else f"{clip['name']}"
    )
    title = "Fine-tuned with differential privacy" if report["private"] else "Non-private baseline"
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {title} (lit_dp)",
        "",
        f"Fine-tuned from `{base or 'a causal language model'}` with lit_dp "
        "(per-unit gradient clipping, Gaussian noise, a privacy accountant over every step).",
        "",
        "## Privacy",
        "",
        *_privacy(report),
        "",
        *_audit(report),
        "## Data",
        "",
        f"- dataset: {data.get('dataset')} ({data.get('num_units')} privacy units, "
        f"{report['privacy_unit']}-level)",
        f"- loss on: {data.get('loss_on')}; max_length {data.get('max_length')} tokens",
        "",
        "## Training recipe",
        "",
        f"- optimizer: `{mech.get('optimizer')}`" + (f" ({hyper})" if hyper else ""),
        f"- steps: {report['steps']}; stopped: {report['stop_reason']}",
        f"- batch: {_component(data.get('batch_schedule'))}, Poisson-sampled",
        f"- clipping: {clip_text}",
        f"- noise multiplier: {report['noise_multiplier']:.6g}",
        "",
        "## Use",
        "",
        "```python",
        "from lit_dp.models import generate, load_model, load_tokenizer",
        "",
        'model, tokenizer = load_model("<this directory>"), load_tokenizer("<this directory>")',
        'print(generate(model, tokenizer, ["Hello"]))',
        "```",
        "",
        "BitNet QAT weights: load with lit_dp's `load_model` (plain `from_pretrained` gives a "
        "full-precision model that is not the trained one)."
        if bitnet_qat
        else "Generation is post-processing of the weights: it costs no privacy budget.",
        "",
        "`privacy_report.json` beside this card holds the full report.",
        "",
    ]
    return "\n".join(lines)
