"""DataModules (synthetic emails/records, user JSONL) and the synthetic generators."""

from lit_dp.data.datamodule import DPDataModule, SyntheticDataModule
from lit_dp.data.jsonl import JSONLDataModule

__all__ = ["DPDataModule", "JSONLDataModule", "SyntheticDataModule"]
