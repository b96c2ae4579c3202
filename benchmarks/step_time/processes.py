"""compare.py's child processes: one (model, shape) timed in its own process, so that running
out of memory costs that shape only, and peak memory measured in a fresh process per method.

The children run compare.py itself (``python -m benchmarks.step_time.compare --shape-child`` or
``--single``, from the repository root) and report one line of JSON on stdout.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from typing import Any

from benchmarks.common import ROOT
from benchmarks.step_time.methods import _why, time_methods

SCRIPT = [sys.executable, "-m", "benchmarks.step_time.compare"]  # run with cwd=ROOT


def time_shape(
    model_name: str,
    batch_size: int,
    seq_len: int,
    methods: list[str],
    *,
    warmup: int,
    repeats: int,
    threads: int,
) -> list[dict[str, Any]]:
    """``time_methods`` in a child process, so that running out of memory at one shape costs
    that shape only. If the child dies, the shape is retried with non-private and fast alone and
    the other methods' rows say why they have no numbers."""
    cmd = [
        *SCRIPT,
        "--shape-child",
        "--models",
        model_name,
        "--shapes",
        f"{batch_size}x{seq_len}",
        "--warmup",
        str(warmup),
        "--repeats",
        str(repeats),
        "--threads",
        str(threads),
        "--methods",
    ]

    def child(names: list[str]) -> tuple[list[dict[str, Any]] | None, int]:
        proc = subprocess.run([*cmd, ",".join(names)], capture_output=True, text=True, cwd=ROOT)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("ROWS ")), None)
        return (None if line is None else json.loads(line[len("ROWS ") :])), proc.returncode

    rows, code = child(methods)
    if rows is not None:
        return rows
    why = (
        f"not run: the process timing all methods at this shape died (exit {code}"
        f"{', killed: out of memory' if code == -9 else ''})"
    )
    print(
        f"# {model_name} {batch_size}x{seq_len}: {why}; retrying non-private and fast alone",
        file=sys.stderr,
        flush=True,
    )
    core = [m for m in methods if m in ("nonprivate", "fast")]
    rows = (child(core)[0] or []) if core != methods and core else []
    done = {r["method"] for r in rows}
    empty = dict(
        model=model_name,
        seq_len=seq_len,
        batch_size=batch_size,
        step_s=None,
        tokens_per_s=None,
        ratio_vs_nonprivate=None,
        min_s=None,
        min_ratio_vs_nonprivate=None,
        peak_mem_mb=None,
        mem_ratio_vs_nonprivate=None,
    )
    rows += [{**empty, "method": m, "note": why} for m in methods if m not in done]
    return sorted(rows, key=lambda r: methods.index(r["method"]))


def _peak_rss_mb() -> float:
    """Peak RSS of this process in MiB.

    VmHWM of /proc/self/status, not getrusage's ru_maxrss: Linux carries ru_maxrss across
    fork + execve, so a child started by a big parent would report the parent's peak. VmHWM
    belongs to the address space that execve created, so it starts fresh.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def single(
    model_name: str, batch_size: int, seq_len: int, method: str, warmup: int, repeats: int
) -> None:
    """Child process for --memory: run one method, print its peak RSS as one JSON line."""
    note = ""
    step_s = None
    try:
        rows = time_methods(
            model_name, batch_size, seq_len, [method], warmup=warmup, repeats=repeats
        )
        step_s, note = rows[0]["step_s"], rows[0]["note"]
    except Exception as exc:
        note = _why(exc)
    peak_mb = _peak_rss_mb()
    print("SINGLE " + json.dumps(dict(peak_mem_mb=peak_mb, step_s=step_s, note=note)), flush=True)


def measure_memory(rows: list[dict[str, Any]], warmup: int, repeats: int) -> None:
    """Fill peak_mem_mb of each row from a fresh subprocess per method."""
    for r in rows:
        cmd = [
            *SCRIPT,
            "--single",
            r["method"],
            "--models",
            r["model"],
            "--shapes",
            f"{r['batch_size']}x{r['seq_len']}",
            "--warmup",
            str(warmup),
            "--repeats",
            str(repeats),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("SINGLE ")), None)
        if line is None:
            r["note"] = (r["note"] + " | memory run failed: " + proc.stderr[-200:]).strip(" |")
            continue
        child = json.loads(line[len("SINGLE ") :])
        # a method that did not run measured only the process around it: no figure
        r["peak_mem_mb"] = child["peak_mem_mb"] if child["step_s"] is not None else None
    by_key: dict[tuple, float] = {
        (r["model"], r["batch_size"], r["seq_len"]): r["peak_mem_mb"]
        for r in rows
        if r["method"] == "nonprivate" and r["peak_mem_mb"]
    }
    for r in rows:
        ref = by_key.get((r["model"], r["batch_size"], r["seq_len"]))
        if ref and r["peak_mem_mb"]:
            r["mem_ratio_vs_nonprivate"] = r["peak_mem_mb"] / ref
