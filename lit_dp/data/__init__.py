"""DataModules (synthetic emails/records, user JSONL), batch schedules, synthetic generators."""

from lit_dp.data.batch_schedule import (
    BatchSchedule,
    ConstantBatchSize,
    ConstantSampleRate,
    LinearBatchSizeRamp,
    LinearSampleRateRamp,
)
from lit_dp.data.datamodule import DPDataModule, SyntheticDataModule
from lit_dp.data.jsonl import JSONLDataModule, read_jsonl
from lit_dp.data.synthetic import generate, make_splits, plant_canaries

__all__ = [
    "BatchSchedule",
    "ConstantBatchSize",
    "ConstantSampleRate",
    "DPDataModule",
    "JSONLDataModule",
    "LinearBatchSizeRamp",
    "LinearSampleRateRamp",
    "SyntheticDataModule",
    "generate",
    "make_splits",
    "plant_canaries",
    "read_jsonl",
]
