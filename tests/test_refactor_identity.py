"""The privacy plan refactor changes no outcome: three seeded 4-step fits (tests/four_step_run.py)
give bit-identical weights, clip bound, sigma, ledgers and epsilon on this checkout and on the
lit_dp of the last commit before it, extracted with ``git archive`` and run in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
# The last main commit merged into the privacy plan refactor (main without the refactor).
BEFORE = "8ae8a5e3407c0960e3d0ab9c0048047fd97562d7"
SCRIPT = Path(__file__).with_name("four_step_run.py")


def _extract_before(dest: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed: cannot extract the pre-refactor lit_dp")
    archive = dest / "before.tar"
    done = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(archive), BEFORE, "lit_dp"],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:  # e.g. a source tree without the history
        pytest.skip(f"commit {BEFORE[:8]} is not available: {done.stderr.strip()}")
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")


def _run(pythonpath: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(out)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


@pytest.mark.slow
def test_four_step_runs_are_bit_identical_to_the_code_before_the_refactor(tmp_path):
    before_dir = tmp_path / "before"
    before_dir.mkdir()
    _extract_before(before_dir)
    before = _run(before_dir, tmp_path / "before.pt")
    after = _run(ROOT, tmp_path / "after.pt")
    assert before.keys() == after.keys()
    for run in before:
        old, new = before[run], after[run]
        assert old["weights"].keys() == new["weights"].keys(), run
        for name, w in old["weights"].items():
            assert torch.equal(w, new["weights"][name]), f"{run}: weight {name} differs"
        for key in ("clip_bound", "noise_multiplier", "ledger", "rdp_ledger", "epsilon"):
            assert old[key].shape == new[key].shape, f"{run}: {key} shape"
            assert torch.equal(old[key], new[key]), f"{run}: {key} {old[key]} != {new[key]}"
        assert int(old["global_step"]) == int(new["global_step"]), run
    # The runs exercise what they claim: the quantile moved C, the budget stopped a run early.
    assert float(after["pld-auto-quantile"]["clip_bound"]) != 1.0
    assert int(after["rdp-fixed-budget-stop"]["global_step"]) < 4
