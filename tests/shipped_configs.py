"""The configs shipped in configs/, for the tests that parse, plan or run them."""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
TINY = str(CONFIG_DIR / "tiny.yaml")
