"""Provenance shared by the benchmark scripts: the commit and machine their numbers came from."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the repository: lit_dp/ and benchmarks/
RESULTS = ROOT / "benchmarks" / "results"  # every study's results file lives here
# The code a study's results depend on: the results files change while a study runs, the
# READMEs do not change a number.
CODE_PATHS = ("lit_dp", "benchmarks", ":(exclude)benchmarks/results", ":(exclude)benchmarks/*.md")


def git_commit(*paths: str) -> str:
    """HEAD of this checkout, with "-dirty" when ``paths`` (default: lit_dp and benchmarks)
    have uncommitted changes; "unknown" outside a git checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", *(paths or ("lit_dp", "benchmarks"))],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty.strip() else "")


def provenance(*paths: str) -> dict[str, Any]:
    """Commit, date, machine and library versions, for a results file."""
    import torch

    return {
        "commit": git_commit(*paths),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
