"""The datasets a cache is made from: CIFAR-100, ImageNet-style folders and the built-in digits."""

from kdcache.dataset.datasets import (
    DATASETS,
    ArrayDataset,
    FolderDataset,
    ImageDataset,
    Normalization,
    build_dataset,
    test_split,
)

__all__ = ["DATASETS", "ArrayDataset", "FolderDataset", "ImageDataset", "Normalization", "build_dataset", "test_split"]
