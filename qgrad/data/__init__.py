"""Datasets by name and their loaders.

In memory (:class:`ArrayDataset`: CIFAR-10, digits), batched and augmented on the device by
:class:`DeviceLoader`; on disk (:class:`FolderDataset`: ImageNet's folder layout), decoded by worker processes
of :class:`FolderLoader`. Both kinds make loaders with the same call:

>>> data = load("digits")
>>> loader = data.loader("train", batch_size=128, shuffle=True, augment=True, seed=0)
>>> for inputs, targets in loader: ...
"""

from qgrad.data.datasets import ArrayDataset, load, load_cifar10, load_digits, names
from qgrad.data.folder import FolderDataset, FolderLoader, load_imagenet
from qgrad.data.loader import DeviceLoader, random_crop_flip

__all__ = [
    "ArrayDataset",
    "DeviceLoader",
    "FolderDataset",
    "FolderLoader",
    "load",
    "load_cifar10",
    "load_digits",
    "load_imagenet",
    "names",
    "random_crop_flip",
]
