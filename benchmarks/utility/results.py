"""study1.py's results file: creating it or checking that it holds the same study, appending
finished runs, and the claims by which several processes share one study.

Every write happens under the file's lock and replaces the file atomically
(``benchmarks.common.results``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import CODE_PATHS, git_commit, provenance
from benchmarks.common.results import (
    claim_alive,
    claims_path,
    load_results,
    new_claim,
    results_lock,
    write_atomic,
)
from benchmarks.utility.plan import Recipe, RunSpec, plan, record_key, spec_key


def claim_next(
    path: Path, recipe: Recipe, args: argparse.Namespace
) -> tuple[RunSpec | None, list[RunSpec], int]:
    """Under the file lock: the first runnable spec that no live process has claimed, claimed
    for this process (so several processes can share one study). Returns (spec or None, every
    selected spec still to run, how many claims other processes hold)."""
    with results_lock(path):
        runs = load_results(path)["runs"]
        done = {record_key(r) for r in runs}
        claims = load_results(claims_path(path))
        claims = {k: c for k, c in claims.items() if k not in done and claim_alive(c)}
        todo = [s for s in plan(recipe, runs) if selected(s, args) and spec_key(s) not in done]
        ready = [s for s in todo if s.lr is not None and spec_key(s) not in claims]
        others = len(claims)
        if ready:
            claims[spec_key(ready[0])] = new_claim()
        write_atomic(claims_path(path), claims)
    return (ready[0] if ready else None), todo, others


def append_runs(path: Path, records: list[dict[str, Any]]) -> int:
    """Append ``records`` whose keys are not in the file yet (under the lock); returns how many."""
    with results_lock(path):
        data = load_results(path)
        have = {record_key(r) for r in data["runs"]}
        new = [r for r in records if record_key(r) not in have]
        data["runs"].extend(new)
        write_atomic(path, data)
    return len(new)


def check_or_create(
    path: Path,
    recipe: Recipe,
    make: Callable[[], dict[str, Any]],
    *,
    allow_mixed: bool,
    fingerprints: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Create the results file (``make()`` gives its setup), or check that it holds the same
    study from the same commit and the same pretrained organisms (``fingerprints``: model name
    -> hash of its weights; a rebuilt organism need not be bit-identical to the first build)."""
    commit = git_commit(*CODE_PATHS)
    with results_lock(path):
        data = load_results(path)
        if not data:
            data = {
                "_meta": {
                    "provenance": provenance(*CODE_PATHS),
                    "recipe": recipe.name,
                    "study": recipe.identity(),
                },
                "setup": make(),
                "runs": [],
            }
            write_atomic(path, data)
            return data
        if data["_meta"]["study"] != recipe.identity():
            raise SystemExit(
                f"{path} holds a different study (recipe or organism config "
                "changed); use another --out, or move the file away to start over"
            )
        for name, digest in (fingerprints or {}).items():
            recorded = data["setup"]["models"].get(name, {}).get("weights_sha256")
            if recorded is not None and recorded != digest:
                raise SystemExit(
                    f"{path} was started with another {name} organism (weights sha256 "
                    f"{recorded[:12]}..., the cached one is {digest[:12]}...): pretraining is not "
                    "bit-reproducible across machines and thread counts. Use another --out, or "
                    "restore the organism the file was made with"
                )
        first = data["_meta"]["provenance"]["commit"]
        if commit != first:
            if not allow_mixed:
                raise SystemExit(
                    f"{path} was started at commit {first}, this checkout is {commit}; results "
                    "must come from one commit (check it out, or pass --allow-mixed-commits to "
                    "append anyway: each run records its commit)"
                )
            mixed = data["_meta"].setdefault("mixed_commits", [first])
            if commit not in mixed:
                mixed.append(commit)
                write_atomic(path, data)
    return data


def selected(spec: RunSpec, args: argparse.Namespace) -> bool:
    """Whether ``spec`` passes the --phase, --only and --model selections in ``args``."""
    return (
        (not args.phase or spec.phase in args.phase)
        and (not args.only or spec.variant in args.only)
        and (not args.model or spec.model in args.model)
    )
