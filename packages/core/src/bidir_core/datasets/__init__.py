"""Datasets: training rows (JSONL / TSV), BEIR retrieval folders, STS pairs, raw text and the embedded stdlib
dataset. sources.py resolves a data argument (a built-in dataset's name or a path) to its reader."""

from bidir_core.datasets.retrieval import RetrievalDataset
from bidir_core.datasets.sources import (
    builtin_counts,
    load_retrieval,
    read_texts,
    read_training_examples,
)
from bidir_core.datasets.stdlib import STDLIB_DOCSTRINGS, stdlib_counts, stdlib_dev, stdlib_train
from bidir_core.datasets.sts import StsPair, read_sts
from bidir_core.datasets.training import TrainingExample

__all__ = [
    "STDLIB_DOCSTRINGS",
    "RetrievalDataset",
    "StsPair",
    "TrainingExample",
    "builtin_counts",
    "load_retrieval",
    "read_sts",
    "read_texts",
    "read_training_examples",
    "stdlib_counts",
    "stdlib_dev",
    "stdlib_train",
]
