"""A study's results file: read, replaced atomically under its lock, and shared between processes
through a claims file beside it.

Several processes can run one study: each claims the next run under the lock, so no two train
the same run, and a claim whose process is gone (same host) is offered again. The lock, the
claims and the temporary files sit beside the results file as ``.<name>.lock``,
``.<name>.claims.json`` and ``.<name>.<pid>.tmp``.
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any


def load_results(path: Path) -> dict[str, Any]:
    """The JSON in ``path``, or {} while there is no such file."""
    return json.loads(path.read_text()) if path.exists() else {}


def write_atomic(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` with ``data`` in one rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float) + "\n")
    os.replace(tmp, path)


def results_lock(path: Path) -> AbstractContextManager[Any]:
    """The inter-process lock of the results file ``path`` (held for every read-modify-write)."""
    from lit_dp.sources import file_lock

    path.parent.mkdir(parents=True, exist_ok=True)
    return file_lock(path.with_name(f".{path.name}.lock"))


def claims_path(path: Path) -> Path:
    """The claims file of the results file ``path``: run key -> the claim of the process on it."""
    return path.with_name(f".{path.name}.claims.json")


def new_claim() -> dict[str, Any]:
    """This process's claim on a run: its pid, host and the time."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def claim_alive(claim: dict[str, Any]) -> bool:
    """Whether the process holding a claim still runs (claims from another host are kept)."""
    if claim["host"] != socket.gethostname():
        return True
    try:
        os.kill(claim["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def release_claim(path: Path, key: str) -> None:
    """Drop the claim on run ``key`` of the results file ``path`` (after the run, or its crash)."""
    with results_lock(path):
        claims = load_results(claims_path(path))
        if claims.pop(key, None) is not None:
            write_atomic(claims_path(path), claims)
