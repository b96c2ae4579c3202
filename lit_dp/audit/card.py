"""The audit's lines for a model card, from the shareable report's ``audit`` section.

The export's model card (``lit_dp.model_card``, ``export/README.md``) calls
``audit_card_lines(report)`` with the exported ``privacy_report.json``; it needs nothing from
the operator side.
"""

from __future__ import annotations

from typing import Any


def audit_card_lines(report: dict[str, Any]) -> list[str]:
    """Markdown lines stating the run's empirical audit ([] when the run had none)."""
    audit = report.get("audit")
    if not audit:
        return []
    bound = audit.get("epsilon_lower_bound")
    if bound is None:
        return [f"- Empirical audit: {audit['num_canaries']} canaries planted; no bound computed."]
    eps = report.get("epsilon")
    against = f" (accounted epsilon: {eps:.3g})" if isinstance(eps, int | float) else ""
    return [
        f"- Empirical audit ({audit['method']}): epsilon lower bound {bound:.3f} at "
        f"{audit['confidence']:.0%} confidence, delta {audit['delta']:.3g}{against}, from "
        f"{audit['num_canaries']} {audit['kind']} canaries each trained on with probability 1/2.",
        "  A lower bound is evidence of at least this much leakage; the accounted epsilon is the "
        "upper bound the mechanism guarantees.",
    ]
