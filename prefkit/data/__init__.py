"""Data stage: load → validate → format → tokenize → collate."""

from prefkit.data.collate import PairCollator
from prefkit.data.load import bundled_sample_path, load_rows
from prefkit.data.spec import DataSpec
from prefkit.data.tokenize import prepare_dataset, prepare_if_raw, split_train_eval
from prefkit.data.types import PairBatch, SkipReport

__all__ = [
    "DataSpec",
    "PairBatch",
    "PairCollator",
    "SkipReport",
    "bundled_sample_path",
    "load_rows",
    "prepare_dataset",
    "prepare_if_raw",
    "split_train_eval",
]
