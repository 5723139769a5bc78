"""Image classification datasets by name: CIFAR-10 from its python batches and scikit-learn's digits, held
in memory, and ImageNet (any folder in its layout), read from disk.

CIFAR-10 and digits load as an :class:`ArrayDataset` of normalized float32 ``N x C x H x W`` CPU tensors,
ImageNet as a :class:`qgrad.data.FolderDataset` of file names. Both kinds make their batches with the same
``loader(split, batch_size, ...)`` call. Nothing is ever downloaded: CIFAR-10 and ImageNet must already be on
disk, digits ships with scikit-learn.
"""

from __future__ import annotations

import math
import numbers
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from qgrad.data.folder import FolderDataset, load_imagenet
from qgrad.data.loader import DeviceLoader

__all__ = ["ArrayDataset", "load", "load_cifar10", "load_digits", "names"]

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
_CIFAR10_HOW = (
    "download the 'CIFAR-10 python version' archive (cifar-10-python.tar.gz, "
    "https://www.cs.toronto.edu/~kriz/cifar.html), extract it, and pass the extracted "
    f"'{CIFAR10_FOLDER}' folder or the folder that contains it"
)


@dataclass
class ArrayDataset:
    """A labelled image dataset held in memory, already split and normalized.

    Attributes:
        name: dataset name (``"cifar10"``, ``"digits"``, ...).
        train_x, test_x: float32 tensors ``(N, C, H, W)``, normalized per channel as
            ``(v - mean[c]) / std[c]`` where ``v`` is the pixel value scaled to [0, 1].
        train_y, test_y: int64 tensors ``(N,)`` with labels in ``[0, num_classes)``.
        num_classes: number of classes.
        in_channels: ``C``.
        crop_padding: the dataset's default random-crop padding for training (0 = no crop).
        flip: whether random horizontal flips are a valid training augmentation for this dataset.
        mean, std: the per-channel statistics (length ``C``, on the [0, 1] pixel scale) used for the
            normalization, computed from the training split; ``None`` if the tensors are not normalized.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    in_channels: int
    crop_padding: int = 0
    flip: bool = False
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
                raise ValueError(
                    f"{split}_x must be a floating-point tensor of shape (N, C, H, W), got {_describe(x)}"
                )
            if not isinstance(y, Tensor) or y.dim() != 1 or y.dtype != torch.int64:
                raise ValueError(f"{split}_y must be an int64 tensor of shape (N,), got {_describe(y)}")
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"{split}_x has {x.shape[0]} samples but {split}_y has {y.shape[0]} labels")
            if x.shape[1] != self.in_channels:
                raise ValueError(f"{split}_x has {x.shape[1]} channels but in_channels is {self.in_channels}")
        if self.train_x.shape[2:] != self.test_x.shape[2:]:
            raise ValueError(
                f"train and test images differ in size: {tuple(self.train_x.shape[2:])} vs "
                f"{tuple(self.test_x.shape[2:])}"
            )
        for stat in ("mean", "std"):
            value = getattr(self, stat)
            if value is not None and len(value) != self.in_channels:
                raise ValueError(
                    f"{stat} must have one entry per channel ({self.in_channels}), got {value!r}"
                )

    @property
    def num_train(self) -> int:
        return self.train_x.shape[0]

    @property
    def num_test(self) -> int:
        return self.test_x.shape[0]

    def loader(
        self, split: str, batch_size: int, augment: bool = False, workers: Optional[int] = None, **options
    ) -> DeviceLoader:
        """A :class:`qgrad.data.DeviceLoader` over ``split`` (``"train"`` or ``"test"``).

        ``augment`` applies the dataset's random crop (``crop_padding``) and flips (``flip``); ``options``
        (``shuffle``, ``seed``, ``device``, ``drop_last``, ``rank``, ``world_size``, ``memory_format``) go to
        the loader. ``workers`` is there for the calls that also serve a :class:`qgrad.data.FolderDataset`
        and must stay ``None``: the data is already in memory.
        """
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if workers is not None:
            raise ValueError(f"workers applies to image folders; dataset {self.name!r} is held in memory")
        x, y = (self.train_x, self.train_y) if split == "train" else (self.test_x, self.test_y)
        crop, flip = (self.crop_padding, self.flip) if augment else (0, False)
        return DeviceLoader(x, y, batch_size, crop_padding=crop, flip=flip, **options)

    def denormalize(self, x: Tensor) -> Tensor:
        """Undo the normalization: ``x * std[c] + mean[c]``, pixel values on the [0, 1] scale.

        ``x`` is ``(N, C, H, W)`` or ``(C, H, W)``; returns a new tensor of the same shape.
        """
        if self.mean is None or self.std is None:
            raise ValueError(f"dataset {self.name!r} records no mean/std, so it cannot be denormalized")
        shape = (-1, 1, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return x * std + mean


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__}"


def _channel_stats(images: np.ndarray, max_value: int) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation of uint8 ``images`` ``(N, C, H, W)`` divided by
    ``max_value``.

    Computed exactly from a 256-bin histogram per channel instead of a float copy of the data (the CIFAR-10
    training set would need 1.2 GB in float64). A constant channel gets std 1, so normalizing never divides
    by 0.
    """
    values = np.arange(256, dtype=np.float64) / max_value
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = np.bincount(images[:, c].ravel(), minlength=256).astype(np.float64)
        total = counts.sum()
        mean = float((counts * values).sum() / total)
        std = math.sqrt(float((counts * (values - mean) ** 2).sum() / total))
        means.append(mean)
        stds.append(std if std > 0 else 1.0)
    return tuple(means), tuple(stds)


def _normalize(images: np.ndarray, max_value: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 ``(N, C, H, W)`` -> float32 ``(v / max_value - mean[c]) / std[c]``, computed in place on one
    copy."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32)
    shape = (1, -1, 1, 1)
    x.div_(max_value)
    x.sub_(torch.tensor(mean, dtype=torch.float32).view(shape))
    x.div_(torch.tensor(std, dtype=torch.float32).view(shape))
    return x


def _cifar10_dir(root: Union[str, Path]) -> Path:
    root = Path(root).expanduser()
    if root.is_file():
        hint = "extract it (tar xzf) and give" if root.name.endswith((".tar.gz", ".tgz")) else "give"
        raise FileNotFoundError(f"CIFAR-10: {root} is a file; {hint} the folder of the python batches")
    if not root.is_dir():
        raise FileNotFoundError(f"CIFAR-10 directory {root} does not exist; {_CIFAR10_HOW}")
    expected = CIFAR10_TRAIN_FILES + (CIFAR10_TEST_FILE,)
    nested = root / CIFAR10_FOLDER
    # root is the batches folder itself when it holds any batch file, else its parent if the folder is inside
    directory = nested if nested.is_dir() and not any((root / f).exists() for f in expected) else root
    missing = [f for f in expected if not (directory / f).is_file()]
    if missing:
        found = sorted(p.name for p in directory.iterdir() if p.name.endswith((".tar.gz", ".tgz", ".bin")))
        seen = ""
        if found:
            seen = f" (it holds {', '.join(found[:3])}: the archive or the binary version, not the batches)"
        raise FileNotFoundError(
            f"CIFAR-10 files missing in {directory}{seen}: {', '.join(missing)}; {_CIFAR10_HOW}"
        )
    return directory


def _read_cifar10_batch(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """One python batch -> uint8 images ``(N, 3, 32, 32)`` and int64 labels ``(N,)``."""
    with open(path, "rb") as f:
        try:
            batch = pickle.load(f, encoding="bytes")
        except (
            Exception
        ) as exc:  # a damaged pickle can raise almost anything (EOFError, UnpicklingError, ...)
            raise ValueError(
                f"{path} is not a readable CIFAR-10 python batch ({type(exc).__name__}: {exc}); "
                f"re-extract it from the original archive"
            ) from exc
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(map(repr, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(
            f"{path} is not a CIFAR-10 python batch: expected a dict with b'data' and b'labels', got {keys}"
        )
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{path}: b'data' must be a uint8 array of shape (N, 3072), got {data.dtype} {data.shape}"
        )
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{path}: b'labels' must be {data.shape[0]} integers, got {labels.dtype} {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels must lie in [0, 9], got [{labels.min()}, {labels.max()}]")
    # each row is channel-major: 1024 red values, then green, then blue, each a row-major 32x32 image
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar10(root: Union[str, Path]) -> ArrayDataset:
    """CIFAR-10 from the python batches of the official archive (50,000 train / 10,000 test 3x32x32 images).

    Args:
        root: the extracted ``cifar-10-batches-py`` folder (``data_batch_1`` ... ``data_batch_5``,
            ``test_batch``) or the folder containing it.

    Pixels are scaled to [0, 1] and normalized per channel with the training set's mean and std; default
    augmentation is a 4-pixel random crop and horizontal flips. The batches are pickles: load only files from
    the official archive (unpickling untrusted files can run arbitrary code).

    Raises:
        FileNotFoundError: ``root`` or any batch file is missing (the message lists every missing file).
        ValueError: a batch file is damaged or not in the CIFAR-10 python format.
    """
    directory = _cifar10_dir(root)
    train = [_read_cifar10_batch(directory / f) for f in CIFAR10_TRAIN_FILES]
    train_images = np.concatenate([images for images, _ in train])
    train_labels = np.concatenate([labels for _, labels in train])
    del train
    test_images, test_labels = _read_cifar10_batch(directory / CIFAR10_TEST_FILE)
    mean, std = _channel_stats(train_images, 255)
    return ArrayDataset(
        name="cifar10",
        train_x=_normalize(train_images, 255, mean, std),
        train_y=torch.from_numpy(train_labels),
        test_x=_normalize(test_images, 255, mean, std),
        test_y=torch.from_numpy(test_labels),
        num_classes=10,
        in_channels=3,
        crop_padding=4,
        flip=True,
        mean=mean,
        std=std,
    )


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> ArrayDataset:
    """scikit-learn's bundled handwritten digits (1,797 images, 1x8x8, 10 classes), split train/test.

    Args:
        test_fraction: share of the images in the test split, in (0, 1); the test split gets
            ``ceil(test_fraction * 1797)`` images and both splits need at least one image per class.
        seed: int in [0, 2**32) seeding the stratified split (class proportions equal in both splits).

    Pixels (integers 0..16) are scaled to [0, 1] and normalized with the training split's mean and std. Both
    splits are in the original order of the scikit-learn data. Default augmentation: a 1-pixel random crop and
    no flips (a mirrored digit is a different symbol or none).
    """
    from sklearn.datasets import load_digits as sklearn_load_digits
    from sklearn.model_selection import train_test_split

    if (
        isinstance(test_fraction, bool)
        or not isinstance(test_fraction, numbers.Real)
        or not 0.0 < test_fraction < 1.0
    ):
        raise ValueError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    bunch = sklearn_load_digits()
    images = bunch.images.astype(np.uint8)[:, None]  # (1797, 1, 8, 8), integer values 0..16
    labels = bunch.target.astype(np.int64)
    num_classes = 10
    n_test = math.ceil(test_fraction * len(labels))  # how scikit-learn rounds a fractional test_size
    if not num_classes <= n_test <= len(labels) - num_classes:
        raise ValueError(
            f"test_fraction={test_fraction} gives {n_test} test and {len(labels) - n_test} train images; "
            f"both splits need at least {num_classes} (one per class)"
        )
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=n_test, stratify=labels, random_state=int(seed)
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    mean, std = _channel_stats(images[train_idx], 16)
    return ArrayDataset(
        name="digits",
        train_x=_normalize(images[train_idx], 16, mean, std),
        train_y=torch.from_numpy(labels[train_idx]),
        test_x=_normalize(images[test_idx], 16, mean, std),
        test_y=torch.from_numpy(labels[test_idx]),
        num_classes=num_classes,
        in_channels=1,
        crop_padding=1,
        flip=False,
        mean=mean,
        std=std,
    )


_LOADERS = ("cifar10", "digits", "imagenet")
# What the root of each dataset that needs one must hold, and how to get it
_ROOT_HINTS = {
    "cifar10": f"the folder with the python batches; {_CIFAR10_HOW}",
    "imagenet": "the folder that holds train/ and val/, with one sub-folder of images per class in each",
}


def check_root(name: str, root, argument: str = "root") -> None:
    """Raise ``ValueError`` when dataset ``name`` reads files and no ``root`` folder is given; the message
    calls the folder ``argument`` (the command line passes its flag) and says what it must hold."""
    if name in _ROOT_HINTS and root is None:
        raise ValueError(f"dataset {name!r} needs {argument} ({_ROOT_HINTS[name]})")


def names() -> List[str]:
    """The dataset names :func:`load` accepts."""
    return list(_LOADERS)


def load(
    name: str, root: Optional[Union[str, Path]] = None, image_size: Optional[int] = None
) -> Union[ArrayDataset, FolderDataset]:
    """Load a dataset by name.

    Args:
        name: ``"cifar10"`` (see :func:`load_cifar10`), ``"digits"`` (bundled with scikit-learn; default split
            of :func:`load_digits`) or ``"imagenet"`` (see :func:`qgrad.data.load_imagenet`).
        root: the dataset's folder; required for ``"cifar10"`` and ``"imagenet"``, refused for ``"digits"``.
        image_size: ``"imagenet"`` only: side of the input crops (``None``: 224). The in-memory datasets
            have fixed sizes and refuse it.
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(names())}")
    check_root(name, root)
    if name != "imagenet" and image_size is not None:
        raise ValueError(
            f"image_size applies to image folders; dataset {name!r} has a fixed image size, "
            f"got {image_size!r}"
        )
    if name == "cifar10":
        return load_cifar10(root)
    if name == "digits":
        if root is not None:
            raise ValueError(
                f"dataset 'digits' is bundled with scikit-learn and takes no root, got root={root!r}"
            )
        return load_digits()
    return load_imagenet(root, image_size=224 if image_size is None else image_size)
