"""Data sets as in-memory uint8 tensors, their loaders, and the per-data-set facts."""

from bdbench.data import official  # noqa: F401  (registers the loaders of official on-disk formats)
from bdbench.data.dataset import Dataset
from bdbench.data.facts import FACTS, DatasetFacts
from bdbench.data.loaders import DATASETS, dataset_label, load_dataset

__all__ = ["DATASETS", "FACTS", "Dataset", "DatasetFacts", "dataset_label", "load_dataset"]
