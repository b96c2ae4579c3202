"""One line for a bad command line or config: the field, what is wrong, and the fix.

jsonargparse reports a bad value inside a union dump (``Does not validate against any of the
Union subtypes ... Given value: Namespace(...)``) and an unknown flag with the whole usage text;
Python adds a traceback to every error raised while the run is built. ``one_line`` digs the
message that names the field out of the exception chain, and ``unknown_option`` turns a guessed
flag into "did you mean" with the closest valid flag, or names the key that replaces a moved one
(``MOVED_OPTIONS``).
"""

from __future__ import annotations

import difflib
import itertools
import re
from collections.abc import Iterable
from typing import Any


class CommandLineError(ValueError):
    """A bad flag or config value, explained in one line."""


# Top-level LightningCLI options lit_dp does not offer, and what replaces them: each would replace
# the DP optimizer (or its learning-rate schedule) by a plain one.
REFUSED_OPTIONS = {
    "optimizer": (
        "--optimizer would replace the DP optimizer; set it as model.optimizer, e.g. "
        "--model.optimizer torch.optim.SGD --model.optimizer.lr 0.05 (config: model: optimizer:)"
    ),
    "lr_scheduler": (
        "--lr_scheduler would replace lit_dp's learning-rate schedule; set clip_lr.schedule "
        "(constant or cosine, with clip_lr.warmup_steps) instead"
    ),
}

# Keys that lit_dp reads from another section, and where (an older config may still hold them).
MOVED_OPTIONS = {
    "model.export_dir": (
        "export.dirpath (the export is its own config section, export:, run by the ExportModel "
        "callback): auto = <log_dir>/export, a directory, or null = no export, e.g. "
        "--export.dirpath null"
    ),
}


def moved(key: str) -> str | None:
    """``<key> moved to <new key> ...`` for a key of ``MOVED_OPTIONS`` (None for any other)."""
    key = key.split("=", 1)[0].lstrip("-")
    return f"{key} moved to {MOVED_OPTIONS[key]}" if key in MOVED_OPTIONS else None


# jsonargparse's lines that describe its own union matching, not the user's value.
_DUMP_LINE = re.compile(
    r"^\s*(- )?(Does not validate|Subtypes:|Errors:|Given value|Expected a <class 'NoneType'>)"
)
_PARSER_KEY = re.compile(r'^Parser key "([^"]+)":\s*')
_NOT_ACCEPTED = re.compile(r"Option '([^']+)' is not accepted|NestedArg\(key='([^']+)'")
_CLASS_PATH = re.compile(r"Problem with given class_path '([^']+)'")
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (.*)", re.IGNORECASE)
_NOT_EXPECTED = re.compile(
    r"Key \"?'?([\w.]+)'?\"? is not expected|"
    r"(?:Group '([\w.]+)' )?does not accept option '([\w.]+)'"
)


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and its causes, outermost first."""
    out: list[BaseException] = []
    while err is not None and err not in out:
        out.append(err)
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return out


def _clean(message: str) -> str:
    """The message's own lines, without jsonargparse's union dump, joined into one line."""
    lines = [ln.strip() for ln in message.splitlines()]
    kept = [ln.removeprefix("- ").strip() for ln in lines if ln and not _DUMP_LINE.match(ln)]
    return "; ".join(kept)


def one_line(err: BaseException) -> str:
    """The most specific message in ``err``'s chain, as one line naming the field.

    lit_dp's own messages start with the field (``data.train_path: file ... does not exist``);
    a jsonargparse type error is prefixed with its key (``model.engine: Expected ...``).
    """
    chain = _chain(err)
    key = next((m.group(1) for e in chain if (m := _PARSER_KEY.match(str(e)))), None)
    # The outermost message that is not jsonargparse's own wrapping of another error (lit_dp
    # may wrap an error to add the field, e.g. model.optimizer.init_args).
    for exc in chain:
        text = _PARSER_KEY.sub("", str(exc)).strip()
        if not text or text.startswith(("Does not validate", "Problem with given class_path")):
            continue
        text = _clean(text)
        if key and not text.startswith(key.split(".")[0]):
            text = f"{key}: {text}"
        return text
    return _clean(str(err)) or type(err).__name__


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to ``name`` (None when nothing is close)."""
    pool = sorted(set(candidates))
    pool = [c for c in pool if not c.endswith(".help")]
    match = difflib.get_close_matches(name, pool, n=1, cutoff=0.7)
    if match:
        return match[0]
    # A flag given without its section (``--lr`` for ``--model.optimizer.init_args.lr``).
    tail = [c for c in pool if c.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1].lstrip("-")]
    return tail[0] if len(tail) == 1 else None


def _option_strings(parser: Any) -> set[str]:
    """Every long option of ``parser`` and of its subcommand parsers."""
    out: set[str] = set()
    for action in getattr(parser, "_actions", []):
        out.update(s for s in action.option_strings if s.startswith("--"))
        for sub in (getattr(action, "choices", None) or {}).values():
            if hasattr(sub, "_actions"):
                out |= _option_strings(sub)
    return out


def _class_options(class_path: str, prefix: str) -> set[str]:
    """The flags of the class ``class_path``, long and short (``--<prefix>.[init_args.]<name>``)."""
    from jsonargparse import ArgumentParser
    from jsonargparse._util import import_object

    parser = ArgumentParser(exit_on_error=False)
    try:
        parser.add_class_arguments(import_object(class_path))
    except Exception:
        return set()
    names = [s[2:] for s in _option_strings(parser) if s != "--help"]
    return {f"--{prefix}.{mid}{name}" for name in names for mid in ("init_args.", "")}


def _class_path_of(key: str, argv: list[str]) -> str | None:
    """The class_path given for ``key`` on the command line or in a ``--config`` file."""
    import yaml

    for flag, value in itertools.pairwise(argv):
        if flag == f"--{key}" and not value.startswith("-"):
            return value
    for flag, value in itertools.pairwise(argv):
        if flag != "--config":
            continue
        try:
            node: Any = yaml.safe_load(open(value, encoding="utf-8"))  # noqa: SIM115
        except (OSError, yaml.YAMLError):
            continue
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get("class_path"), str):
            return node["class_path"]
    return None


def unknown_option(flag: str, candidates: Iterable[str]) -> str:
    """``unknown option --x; did you mean --y?`` (or the replacement of a refused option)."""
    name = flag.split("=", 1)[0]
    if hint := moved(name):
        return hint
    bare = name.lstrip("-").split(".", 1)[0]
    if bare in REFUSED_OPTIONS:
        return f"{name} is not a lit_dp option: {REFUSED_OPTIONS[bare]}"
    guess = closest(name, candidates)
    hint = f"; did you mean {guess}?" if guess else ""
    return f"unknown option {name}{hint}"


def explain_parse_error(err: BaseException, parser: Any, args: list[str] | None) -> str:
    """One line for a jsonargparse parse error of ``args``."""
    message = str(err)
    argv = list(args or [])
    if m := _UNRECOGNIZED.search(message):
        flags = [a for a in m.group(1).split() if a.startswith("--")]
        if flags:
            return unknown_option(flags[0], _option_strings(parser))
    chain = _chain(err)
    bad = next(
        (m.group(1) or m.group(2) for e in chain if (m := _NOT_ACCEPTED.search(str(e)))), None
    )
    if bad is not None:
        key = next((m.group(1) for e in chain if (m := _PARSER_KEY.match(str(e)))), "")
        given = next(
            (a for a in argv if a.startswith("--") and a.split("=")[0].endswith(bad)), None
        )
        flag = given or f"--{key}.init_args.{bad}"
        cls = next((m.group(1) for e in chain if (m := _CLASS_PATH.search(str(e)))), None)
        cls = cls or _class_path_of(key, argv)
        options = _class_options(cls, key) if cls and key else set()
        # The user may have written --data.x for --data.init_args.x: suggest the long form.
        return unknown_option(flag, options | _option_strings(parser))
    if m := _NOT_EXPECTED.search(message):  # a key of a config file
        key = m.group(1) or ".".join(part for part in m.group(2, 3) if part)
        if hint := moved(key):
            return f"config key {hint}"
        section = key.split(".", 1)[0]
        if section in REFUSED_OPTIONS:
            return (
                f"the config section {section}: is not a lit_dp option: {REFUSED_OPTIONS[section]}"
            )
        guess = closest(f"--{key}", _option_strings(parser))
        return f"unknown config key {key}" + (f"; did you mean {guess[2:]}?" if guess else "")
    return one_line(err)
