"""CPU threads: the cores other jobs leave free (torch's default of every core made runs 5-9x
slower next to another job), ``--threads`` and ``OMP_NUM_THREADS`` override it."""

from __future__ import annotations

import pytest
import torch
from shipped_configs import TINY

from lit_dp.cli import LitDPCLI
from lit_dp.threads import available_cores, choose_num_threads


@pytest.mark.parametrize(
    ("cores", "load", "processes", "threads"),
    [
        (2, 0.0, 1, 2),  # idle machine: every core
        (2, 0.3, 1, 2),  # noise in the load average is not a busy core
        (2, 1.0, 1, 1),  # another job on one of two cores: one thread, not two fighting it
        (2, 5.0, 1, 1),  # overloaded: still one
        (16, 3.2, 1, 13),
        (16, 0.0, 4, 4),  # a 4-process CPU run shares the cores
        (16, 8.0, 4, 2),
        (1, 0.0, 2, 1),  # never below one
    ],
)
def test_threads_are_the_free_cores(cores, load, processes, threads):
    assert choose_num_threads(cores=cores, load_average=load, processes=processes) == threads


def test_available_cores_is_the_affinity_at_most():
    import os

    assert 1 <= available_cores() <= len(os.sched_getaffinity(0))


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_cli_sets_torch_threads(keep_threads, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    LitDPCLI(args=["--config", TINY, "--threads", "1"], run=False)
    assert torch.get_num_threads() == 1
    # Without --threads: what choose_num_threads gives for a busy machine.
    monkeypatch.setattr("lit_dp.threads.available_cores", lambda: 2)
    monkeypatch.setattr("os.getloadavg", lambda: (1.0, 1.0, 1.0))
    torch.set_num_threads(2)
    LitDPCLI(args=["--config", TINY], run=False)
    assert torch.get_num_threads() == 1
    monkeypatch.setattr("os.getloadavg", lambda: (0.0, 0.0, 0.0))
    LitDPCLI(args=["--config", TINY], run=False)
    assert torch.get_num_threads() == 2
    # OMP_NUM_THREADS is the user's choice: left as it is.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr("os.getloadavg", lambda: (1.0, 1.0, 1.0))
    torch.set_num_threads(2)
    LitDPCLI(args=["--config", TINY], run=False)
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="threads=0 must be >= 1"):
        LitDPCLI(args=["--config", TINY, "--threads", "0"], run=False)
