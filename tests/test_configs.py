"""The shipped configs: every leaf field has a comment (with a test of that check itself), and
every config parses through the CLI."""

from __future__ import annotations

import pytest
import yaml
from shipped_configs import CONFIGS

from lit_dp.callbacks.clip_lr import ClipDrivenLR
from lit_dp.callbacks.ema import EMAWeights
from lit_dp.cli import LitDPCLI
from lit_dp.privacy.clipping import default_clip_estimator


def _leaves(node, path=""):
    """(key node, value node, dotted name) of every leaf of a composed YAML node tree: a mapping
    key whose value is a scalar or a sequence of scalars. Other values are walked into."""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            name = f"{path}.{key.value}" if path else str(key.value)
            scalars = isinstance(value, yaml.SequenceNode) and all(
                isinstance(item, yaml.ScalarNode) for item in value.value
            )
            if isinstance(value, yaml.ScalarNode) or scalars:
                yield key, value, name
            else:
                yield from _leaves(value, name)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _leaves(item, f"{path}[{i}]")


def uncommented_leaves(text: str) -> list[tuple[int, str]]:
    """(1-based line, dotted name) of every leaf key of the YAML ``text`` without a comment.

    A leaf is commented by a '#' comment on its line after the value (after the key when the
    value starts on a later line), or by comment-only lines directly above it. The file's header
    comment does not count as the comment of the first field below it."""
    lines = text.splitlines()
    header = 0
    while header < len(lines) and lines[header].lstrip().startswith("#"):
        header += 1
    missing = []
    for key, value, name in _leaves(yaml.compose(text)):
        row = key.start_mark.line
        end = value.end_mark.column if value.end_mark.line == row else key.end_mark.column
        above = lines[row - 1].lstrip() if row > header else ""
        if "#" not in lines[row][end:] and not above.startswith("#"):
            missing.append((row + 1, name))
    return missing


def test_comment_check_finds_uncommented_leaves():
    """uncommented_leaves flags a leaf without a comment (inline or on the lines above), accepts
    either kind, ignores section keys, and does not let the file header comment a field."""
    text = (
        "# header\n"
        "first: 1\n"
        "trainer:\n"
        "  devices: 1  # how many\n"
        "  # a comment above\n"
        "  # spanning two lines\n"
        "  precision: bf16-true\n"
        "  accelerator: cpu\n"
        "  url: 'a#b'\n"
        "  plugins: [a, b]\n"
        "  ids:  # a sequence of scalars\n"
        "    - 1\n"
        "  callbacks:\n"
        "    - class_path: X  # a mapping inside a sequence\n"
        "      init_args:\n"
        "        decay: 0.9\n"
    )
    assert uncommented_leaves(text) == [
        (2, "first"),
        (8, "trainer.accelerator"),
        (9, "trainer.url"),
        (10, "trainer.plugins"),
        (16, "trainer.callbacks[0].init_args.decay"),
    ]


def test_every_config_is_commented():
    """Every leaf field of every shipped config says what it does: the configs are the
    documentation users copy from, so an uncommented field is a field nobody explained."""
    assert CONFIGS, "no configs found"
    missing = []
    for cfg in CONFIGS:
        text = cfg.read_text()
        assert text.startswith("#"), f"{cfg.name} needs a header comment"
        missing += [f"{cfg.name}:{line}:{key}" for line, key in uncommented_leaves(text)]
    assert not missing, "config fields without a comment:\n" + "\n".join(missing)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exc:
        LitDPCLI(args=["fit", "--config", str(config), "--print_config"])
    assert exc.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model:" in printed and "privacy:" in printed


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_configs_ship_the_recommended_recipe(config):
    """The configs and the code defaults give the same recipe (the utility study's best), so a
    user who copies a config and one who leaves a field out train the same way."""
    cfg = yaml.safe_load(config.read_text())
    assert cfg["ema"]["decay"] == EMAWeights().decay
    assert cfg["clip_lr"]["adaptive"] is ClipDrivenLR().adaptive is False
    opt = cfg["model"]["optimizer"]
    assert opt["class_path"] == "lit_dp.optim.DPAdamW"
    assert opt["init_args"].get("noise_correction", False) is False
    if not cfg["model"].get("private", True):
        return
    clipping, default = cfg["model"]["clipping"], default_clip_estimator()
    assert clipping["class_path"] == f"lit_dp.privacy.clipping.{type(default).__name__}"
    assert clipping["init_args"] == default.describe()["parameters"]
