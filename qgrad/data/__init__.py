"""Datasets held in memory (:class:`ArrayDataset`) and a loader that batches and augments them on the device.

>>> data = load("digits")
>>> loader = DeviceLoader(data.train_x, data.train_y, batch_size=128, shuffle=True,
...                       crop_padding=data.crop_padding, flip=data.flip, seed=0)
>>> for inputs, targets in loader: ...
"""

from qgrad.data.datasets import ArrayDataset, load, load_cifar10, load_digits, names
from qgrad.data.loader import DeviceLoader, random_crop_flip

__all__ = ["ArrayDataset", "DeviceLoader", "load", "load_cifar10", "load_digits", "names", "random_crop_flip"]
