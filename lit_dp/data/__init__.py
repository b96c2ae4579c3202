"""DataModules (synthetic emails/records, user JSONL) and the synthetic generators."""

from lit_dp.data.datamodule import DPDataModule, SyntheticDataModule
from lit_dp.data.jsonl import JSONLDataModule, read_jsonl
from lit_dp.data.synthetic import generate, make_splits, plant_canaries

__all__ = [
    "DPDataModule",
    "JSONLDataModule",
    "SyntheticDataModule",
    "generate",
    "make_splits",
    "plant_canaries",
    "read_jsonl",
]
