"""Datasets: training rows (JSONL / TSV), BEIR retrieval folders, STS pairs, raw text and the built-in datasets
(stdlib and installed-package docstrings). sources.py resolves a data argument (a built-in dataset's name or a
path) to its reader."""

from bidir_core.datasets.installed import (
    INSTALLED_DOCSTRINGS,
    installed_counts,
    installed_dev,
    installed_train,
)
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
    "INSTALLED_DOCSTRINGS",
    "STDLIB_DOCSTRINGS",
    "RetrievalDataset",
    "StsPair",
    "TrainingExample",
    "builtin_counts",
    "installed_counts",
    "installed_dev",
    "installed_train",
    "load_retrieval",
    "read_sts",
    "read_texts",
    "read_training_examples",
    "stdlib_counts",
    "stdlib_dev",
    "stdlib_train",
]
