"""Data sets as in-memory uint8 tensors, their loaders, and batch augmentation."""

from bdbench.data.dataset import Dataset
from bdbench.data.loaders import DATASETS, load_dataset

__all__ = ["DATASETS", "Dataset", "load_dataset"]
