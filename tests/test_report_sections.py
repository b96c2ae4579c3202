"""Report sections of other callbacks (lit_dp.report.ReportSection): collected in callback
order, merged into the assembled report, never over one of the report's own fields, and their
summary lines printed before the report's path."""

from __future__ import annotations

import pytest
from module_helpers import make_module

from lit_dp.privacy.accountant import make_accountant
from lit_dp.report import (
    ReportSection,
    assemble,
    report_sections,
    section_summary_lines,
    shareable,
    summary_lines,
)


class _Section:
    def __init__(self, name, line):
        self.name, self.line = name, line

    def privacy_report_section(self):
        return {self.name: {"value": 1, "operator_side": {"secret": 2}}} if self.line else {}

    def summary_line(self):
        return self.line


def _assemble(sections):
    accountant = make_accountant("rdp")
    return assemble(
        module=make_module(private=False),
        dm=None,
        global_step=0,
        accountant=accountant,
        accountant_name="rdp",
        rdp=accountant,
        delta=None,
        target_epsilon=None,
        calibrated_noise_multiplier=None,
        num_units=10,
        stop_reason="done",
        fork_of=None,
        sections=sections,
    )


def test_sections_are_collected_from_section_callbacks_only():
    callbacks = [_Section("a", "a: 1"), object(), _Section("off", None), _Section("b", "b: 2")]
    assert isinstance(callbacks[0], ReportSection) and not isinstance(object(), ReportSection)
    assert list(report_sections(callbacks)) == ["a", "b"]
    assert section_summary_lines(callbacks) == ["a: 1", "b: 2"]


def test_a_section_is_merged_and_its_operator_side_is_not_shared():
    report = _assemble(report_sections([_Section("audit", "audit: x")]))
    assert report["audit"] == {"value": 1, "operator_side": {"secret": 2}}
    assert shareable(report)["audit"] == {"value": 1}
    assert _assemble(None).keys() == report.keys() - {"audit"}


def test_a_section_named_like_a_report_field_is_refused():
    with pytest.raises(ValueError, match=r"\['epsilon'\] are named like the report's own"):
        _assemble({"epsilon": 0.0})


def test_section_lines_come_between_the_stop_and_the_report_path():
    report = _assemble(None)
    lines = summary_lines(report, "r.json", ["audit: x"])
    assert lines[-3:] == ["stopped: done", "audit: x", "privacy report: r.json"]
    assert summary_lines(report, "r.json")[-2:] == ["stopped: done", "privacy report: r.json"]
