"""Datasets: training rows (JSONL / TSV), BEIR retrieval folders, STS pairs, raw text and the embedded stdlib
dataset."""

from bidir_core.datasets.retrieval import RetrievalDataset, load_retrieval
from bidir_core.datasets.stdlib import stdlib_counts, stdlib_docstrings
from bidir_core.datasets.sts import StsPair, read_sts
from bidir_core.datasets.texts import read_texts
from bidir_core.datasets.training import STDLIB_DOCSTRINGS, TrainingExample, read_training_examples

__all__ = [
    "STDLIB_DOCSTRINGS",
    "RetrievalDataset",
    "StsPair",
    "TrainingExample",
    "load_retrieval",
    "read_sts",
    "read_texts",
    "read_training_examples",
    "stdlib_counts",
    "stdlib_docstrings",
]
