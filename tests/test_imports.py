"""lit_dp's import graph: no cycles anywhere, a privacy core without model libraries, every
module importable alone.

The static checks read the sources with ``ast`` (imports inside functions and under
TYPE_CHECKING count too); the runtime checks run in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import lit_dp

PACKAGE = Path(lit_dp.__file__).parent
PRIVACY = PACKAGE / "privacy"
MODEL_LIBRARIES = ("transformers", "peft", "lightning")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file, as absolute dotted names
    (``from a import b`` gives ``a.b`` where that is a lit_dp module, else ``a``)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if _is_module(full) else base)
    return out


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _graph(root: Path) -> dict[str, set[str]]:
    """Module under ``root`` -> the lit_dp modules it imports."""
    return {
        _module_name(p): {m for m in _imports(p) if m.split(".")[0] == "lit_dp"}
        for p in sorted(root.rglob("*.py"))
    }


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    """The check below can fail: it finds a planted cycle."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_privacy_core_has_no_import_cycle():
    graph = _graph(PRIVACY)
    assert "lit_dp.privacy.engine.recorder" in graph and "lit_dp.privacy.per_sample" in graph
    assert _cycle(graph) is None


def test_package_has_no_import_cycle():
    """Nowhere in lit_dp (imports inside functions count): e.g. export asks lit_dp.lora and
    lit_dp.bitnet about a model instead of importing the loaders that re-export it, and the
    command dispatcher, not the CLI, imports ``plan`` and ``generate``."""
    graph = _graph(PACKAGE)
    assert {"lit_dp.export", "lit_dp.models", "lit_dp.cli", "lit_dp.plan"} <= set(graph)
    assert _cycle(graph) is None


def test_privacy_core_imports_nothing_outside_itself_and_no_model_library():
    """The privacy core is plain torch: BitNet's rule is registered from lit_dp.bitnet."""
    for path in sorted(PRIVACY.rglob("*.py")):
        for module in _imports(path):
            top = module.split(".")[0]
            assert top not in MODEL_LIBRARIES, (path.name, module)
            assert top != "lit_dp" or module.startswith("lit_dp.privacy"), (path.name, module)


def _fresh_python(code: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_per_sample_loads_no_model_library():
    _fresh_python(
        "import sys\n"
        "import lit_dp.privacy.per_sample\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {MODEL_LIBRARIES!r})\n"
        "assert not loaded, loaded\n"
        "import lit_dp.bitnet  # the model side: it registers the BitNet rule\n"
        "from lit_dp.privacy.per_sample import layer_kind\n"
        "from transformers.integrations.bitnet import AutoBitLinear\n"
        "assert layer_kind(AutoBitLinear(4, 4, online_quant=True)) == 'bitlinear'\n"
    )


@pytest.mark.parametrize("package", ["lit_dp.privacy", "lit_dp"])
def test_every_module_imports_alone(package):
    """Each module imports first in a clean slate of lit_dp modules (a cycle that only works in
    one import order would fail here)."""
    root = PACKAGE.parent.joinpath(*package.split("."))
    names = [_module_name(p) for p in sorted(root.rglob("*.py")) if p.name != "__main__.py"]
    _fresh_python(
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m.split('.')[0] == 'lit_dp']:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
    )


def test_public_names_resolve():
    """``lit_dp`` loads its public names on first use; each one resolves."""
    for name in lit_dp.__all__:
        assert getattr(lit_dp, name).__name__ == name
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = lit_dp.no_such_name


# The layers below the CLI: what they import must not reach up into the export, the callbacks or
# the command line (the privacy report's vocabulary lives in lit_dp.report for that reason).
LOWER_LAYERS = [
    *sorted((PACKAGE / "data").rglob("*.py")),
    *sorted(PRIVACY.rglob("*.py")),
    *(PACKAGE / name for name in ("models.py", "bitnet.py", "lora.py", "sources.py")),
]
UPPER = ("lit_dp.export", "lit_dp.callbacks", "lit_dp.cli", "lit_dp.cli_errors", "lit_dp.commands")


def _reaches_up(module: str) -> bool:
    return any(module == top or module.startswith(top + ".") for top in UPPER)


def test_layer_check_finds_an_upward_import():
    """The check below can fail: these names count as upward, lit_dp.report does not."""
    assert _reaches_up("lit_dp.export") and _reaches_up("lit_dp.callbacks.accounting")
    assert _reaches_up("lit_dp.cli") and not _reaches_up("lit_dp.report")


@pytest.mark.parametrize("path", LOWER_LAYERS, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_data_privacy_and_model_loading_import_nothing_from_export_callbacks_or_cli(path):
    """Transitively: every lit_dp module the file reaches, directly or through others."""
    graph = _graph(PACKAGE)
    seen, todo = set(), [_module_name(path)]
    while todo:
        name = todo.pop()
        for module in graph.get(name, ()):
            assert not _reaches_up(module), f"{_module_name(path)} reaches {module} via {name}"
            if module not in seen:
                seen.add(module)
                todo.append(module)
