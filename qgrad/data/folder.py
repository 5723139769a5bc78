"""Image-folder datasets (ImageNet's layout), decoded from disk batch by batch.

A dataset root holds one folder per split, ``train/`` and ``val/``, and in each split one folder per class::

    root/train/n01440764/n01440764_10026.JPEG
    root/train/n01443537/...
    root/val/n01440764/ILSVRC2012_val_00000293.JPEG

This is ``torchvision.datasets.ImageFolder``'s layout and its conventions: classes are the sorted names of the
class folders (label ``i`` is the ``i``-th), every class folder is walked recursively (symbolic links
followed), files are kept by extension (case-insensitive) and taken in sorted order. Two differences keep
stray files out: hidden names (a leading ".") are skipped, folders and files alike, and a symbolic link back
to a class folder or above it is not walked. The validation split uses the training split's labels, so it may
hold a subset of the classes. Images are decoded with Pillow and converted to RGB; torchvision is not needed.

Preprocessing is the usual ImageNet recipe, on the decoded image:

* training: a random crop of 8%-100% of the image's area with aspect ratio in [3/4, 4/3] (10 tries, then a
  central crop of the largest allowed shape), resized to ``image_size x image_size`` (bilinear), mirrored
  with probability 1/2;
* evaluation: the shorter side resized to ``resize_size`` (default ``image_size * 256 / 224``, rounded;
  bilinear), then the central ``image_size x image_size`` window.

Batches reach the device as uint8 and are normalized there with ImageNet's per-channel mean
(0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) of pixel values in [0, 1].
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from qgrad.data.loader import EpochLoader, _check_int, batch_spans, check_batching, epoch_generator

__all__ = [
    "FolderDataset",
    "FolderLoader",
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "center_crop_box",
    "default_workers",
    "find_images",
    "load_imagenet",
    "random_resized_crop_box",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRAIN_DIR, VAL_DIR = "train", "val"
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_HOW = (
    f"give the folder that holds '{TRAIN_DIR}/' and '{VAL_DIR}/', each with one sub-folder of images per "
    "class (the layout of torchvision's ImageFolder)"
)

Sample = Tuple[str, int]  # (file path, label)
logger = logging.getLogger(__name__)


def find_images(split_dir: Path, class_to_idx: Optional[dict] = None) -> Tuple[List[str], List[Sample]]:
    """The classes and ``(path, label)`` samples of one split folder, in ImageFolder's order.

    Args:
        split_dir: a folder with one sub-folder per class.
        class_to_idx: labels to use (the training split's); ``None`` numbers the sorted class folders.

    Returns:
        The split's class names (sorted) and its samples, class by class in label order, each class's files
        in the sorted order of a recursive walk.

    Raises:
        FileNotFoundError: no class folders, a class folder without images, or a class that
            ``class_to_idx`` does not know.
    """
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir} does not exist; {_HOW}")
    with os.scandir(split_dir) as scan:
        listed = list(scan)
    entries = [e for e in listed if not e.name.startswith(".")]
    hidden = sorted(e.name for e in listed if e.name.startswith(".") and e.is_dir())
    if hidden:  # .ipynb_checkpoints, .Trash-1000, ...: taken as classes, they would shift every label
        skipped = ", ".join(hidden)
        warnings.warn(f"{split_dir}: hidden folders are not classes, skipped {skipped}", stacklevel=3)
    classes = sorted(e.name for e in entries if e.is_dir())
    if not classes:
        loose = sum(e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) for e in entries)
        hint = f" (it holds {loose} images directly: sort them into one folder per class)" if loose else ""
        raise FileNotFoundError(f"{split_dir} has no class folders{hint}; {_HOW}")
    if class_to_idx is None:
        class_to_idx = {name: i for i, name in enumerate(classes)}
    unknown = [name for name in classes if name not in class_to_idx]
    if unknown:
        raise FileNotFoundError(
            f"{split_dir} has {len(unknown)} classes that the training split lacks: {', '.join(unknown[:5])}"
        )
    samples: List[Sample] = []
    empty = []
    for name in sorted(classes, key=class_to_idx.__getitem__):
        found = _images_under(str(split_dir / name))
        if not found:
            empty.append(name)
        samples += [(path, class_to_idx[name]) for path in found]
    if empty:
        raise FileNotFoundError(
            f"{split_dir}: {len(empty)} class folders hold no image ({', '.join(empty[:5])}); "
            f"images end in {', '.join(IMAGE_EXTENSIONS)}"
        )
    return classes, samples


def _images_under(folder: str) -> List[str]:
    """The image files under ``folder``, recursively: folder by folder in sorted order of their paths, each
    folder's files sorted.

    Symbolic links are followed, but a folder is walked once, and a link back to ``folder`` or above it is
    not walked (it would list other classes' images under this one). Hidden names (a leading ".": macOS's
    ``._*`` files, ``.ipynb_checkpoints``) are skipped.
    """
    top = os.path.realpath(folder)
    seen, listed = set(), []
    for current, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(current)
        if real in seen or (current != folder and (top + os.sep).startswith(real + os.sep)):
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        images = [f for f in files if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
        listed.append((current, sorted(images)))
    return [os.path.join(current, file) for current, images in sorted(listed) for file in images]


def random_resized_crop_box(
    width: int, height: int, rng: np.random.Generator
) -> Tuple[int, int, int, int]:
    """The training crop ``(left, top, crop_width, crop_height)`` of a ``width x height`` image.

    Up to 10 draws of an area fraction uniform in ``CROP_SCALE`` and a log-uniform aspect ratio
    (width / height) in ``CROP_RATIO``; the first whose rounded shape fits the image is placed uniformly at
    random. If none fits, the largest central crop whose aspect ratio is clamped into ``CROP_RATIO``.
    """
    area = width * height
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif ratio > CROP_RATIO[1]:
        w, h = int(round(height * CROP_RATIO[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def center_crop_box(width: int, height: int, size: int) -> Tuple[int, int, int, int]:
    """The central ``size x size`` window ``(left, top, size, size)`` of a ``width x height`` image."""
    return int(round((width - size) / 2.0)), int(round((height - size) / 2.0)), size, size


def _shorter_side_to(width: int, height: int, size: int) -> Tuple[int, int]:
    """The ``(width, height)`` with the shorter side ``size`` and the aspect ratio kept (longer side
    floored)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def _open_rgb(path: str):
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise OSError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc


def _to_tensor(image) -> Tensor:
    """A PIL RGB image -> uint8 ``(H, W, 3)``, its own memory order (the loader permutes whole batches on the
    device)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8))


def train_image(path: str, image_size: int, rng: np.random.Generator) -> Tensor:
    """The training view of one image: random resized crop and flip, uint8 ``(image_size, image_size, 3)``."""
    from PIL import Image

    image = _open_rgb(path)
    left, top, w, h = random_resized_crop_box(image.width, image.height, rng)
    box = (left, top, left + w, top + h)
    image = image.resize((image_size, image_size), Image.Resampling.BILINEAR, box=box)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _to_tensor(image)


def eval_image(path: str, image_size: int, resize_size: int) -> Tensor:
    """The evaluation view of one image: shorter side to ``resize_size``, then the central window, uint8
    ``(image_size, image_size, 3)``."""
    from PIL import Image

    image = _open_rgb(path)
    image = image.resize(_shorter_side_to(image.width, image.height, resize_size), Image.Resampling.BILINEAR)
    left, top, w, h = center_crop_box(image.width, image.height, image_size)
    return _to_tensor(image.crop((left, top, left + w, top + h)))


class _SampleTable:
    """``(path, label)`` pairs packed into three numpy arrays.

    Worker processes share the arrays with the main process page by page. A list of Python tuples would be
    copied into every worker bit by bit instead, as reading an object updates its reference count (1.28
    million ImageNet samples take about 200 MB as tuples, about 80 MB here).
    """

    def __init__(self, samples: Sequence[Sample]):
        encoded = [os.fsencode(path) for path, _ in samples]
        self.ends = np.cumsum([len(b) for b in encoded], dtype=np.int64)
        self.chars = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.labels = np.array([label for _, label in samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Sample:
        start = int(self.ends[index - 1]) if index else 0
        return os.fsdecode(self.chars[start : self.ends[index]].tobytes()), int(self.labels[index])


class _EpochImages(torch.utils.data.Dataset):
    """The decoded samples of one epoch; sample ``i``'s random crop and flip come from ``(seed, epoch, i)``,
    so they do not depend on the batch size, the order, or which worker decodes it."""

    def __init__(self, samples, image_size, resize_size, augment, seed, epoch):
        self.samples, self.image_size, self.resize_size = samples, image_size, resize_size
        self.augment, self.seed, self.epoch = augment, seed, epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[Tensor, int]:
        path, label = self.samples[index]
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            return train_image(path, self.image_size, rng), label
        return eval_image(path, self.image_size, self.resize_size), label


def default_workers() -> int:
    """Decoding processes per loader: the usable CPU cores shared among the training processes of this
    machine (torchrun's ``LOCAL_WORLD_SIZE``), at least 1 and at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, cores // local_processes))


class FolderLoader(EpochLoader):
    """Iterate over ``(inputs, targets)`` batches of an image folder, decoded by worker processes.

    Each ``iter()`` is one epoch: a ``torch.utils.data.DataLoader`` over the epoch's samples whose workers
    decode and crop (see :mod:`qgrad.data.folder`); batches move to ``device`` as uint8 and are normalized
    there. Yields float32 inputs ``(B, 3, image_size, image_size)`` in ``memory_format`` and int64 targets
    ``(B,)``.

    The order (``shuffle``), the batching over processes (``rank``, ``world_size``), ``drop_last`` and
    :meth:`set_epoch` behave as in :class:`qgrad.data.DeviceLoader`; the permutation of epoch ``e`` comes from
    the same ``(seed, e)`` generator. Every random choice of a sample is a function of ``(seed, epoch, sample
    index)``, so the batches are the same for any number of ``workers``.

    Args:
        samples: ``(path, label)`` pairs (see :func:`find_images`); the loader keeps a packed copy.
        batch_size: samples per batch (of all processes together), int >= 1.
        image_size: side of the square inputs, int >= 8.
        resize_size: evaluation only: the shorter side before the central crop, int >= ``image_size``.
        augment: training views (random resized crop and flip) instead of evaluation views.
        workers: decoding processes, int >= 0 (0 decodes in the calling process); ``None``: see
            :func:`default_workers`.
        Others: as in :class:`qgrad.data.DeviceLoader`.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        batch_size: int,
        image_size: int = 224,
        resize_size: Optional[int] = None,
        shuffle: bool = False,
        augment: bool = False,
        seed: int = 0,
        device: Optional[Union[str, torch.device]] = None,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        memory_format: torch.memory_format = torch.contiguous_format,
        workers: Optional[int] = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        if len(samples) == 0:
            raise ValueError("samples is empty; a loader needs at least one image")
        batch_size, rank, world_size = check_batching(
            len(samples), batch_size, drop_last, rank, world_size, memory_format, 4
        )
        image_size, resize_size = _check_sizes(image_size, resize_size)
        seed = _check_int("seed", seed, 0, 2**63)
        workers = default_workers() if workers is None else _check_int("workers", workers, 0)
        for name, value in (("shuffle", shuffle), ("augment", augment)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 entries each and std > 0, got {mean!r} and {std!r}")
        self.samples = _SampleTable(samples)
        self.batch_size, self.image_size, self.resize_size = batch_size, image_size, resize_size
        self.shuffle, self.augment, self.seed = shuffle, augment, seed
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.memory_format, self.workers = memory_format, workers
        # (v / 255 - mean) / std == (v - 255 mean) / (255 std): one subtract and one divide on the uint8 batch
        self._shift = torch.tensor([255.0 * m for m in mean], device=self.device).view(1, 3, 1, 1)
        self._scale = torch.tensor([255.0 * s for s in std], device=self.device).view(1, 3, 1, 1)

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor]]:
        epoch, first = self._start_epoch()
        n = self.num_samples
        order = torch.randperm(n, generator=epoch_generator(self.seed, epoch)) if self.shuffle else None
        spans = list(batch_spans(n, self.batch_size, self.drop_last, self.rank, self.world_size))[first:]
        batches = [
            list(range(start, stop)) if order is None else order[start:stop].tolist() for start, stop in spans
        ]
        images = _EpochImages(self.samples, self.image_size, self.resize_size, self.augment, self.seed, epoch)
        loader = torch.utils.data.DataLoader(
            images,
            batch_sampler=batches,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
        )
        return self._batches(loader)

    def _batches(self, loader) -> Iterator[Tuple[Tensor, Tensor]]:
        try:
            yield from self._normalized(loader)
        except OSError as exc:
            # raised again from a worker process: its message holds the worker's whole traceback; keep the
            # last line, which names the file
            text = str(exc).strip()
            if "Original Traceback" not in text:
                raise
            raise OSError(text.splitlines()[-1].split(": ", 1)[-1]) from None

    def _normalized(self, loader) -> Iterator[Tuple[Tensor, Tensor]]:
        for images, labels in loader:
            # (B, H, W, 3) -> (B, 3, H, W) as a view: channels-last strides, kept by the float copy
            x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
            x = x.float().sub_(self._shift).div_(self._scale)
            yield x.contiguous(memory_format=self.memory_format), labels.to(self.device, non_blocking=True)


def _check_sizes(image_size, resize_size) -> Tuple[int, int]:
    image_size = _check_int("image_size", image_size, 8)
    if resize_size is None:
        resize_size = int(round(image_size * 256 / 224))
    resize_size = _check_int("resize_size", resize_size, image_size)
    return image_size, resize_size


@dataclass
class FolderDataset:
    """A labelled image dataset on disk in ImageFolder's layout (see :mod:`qgrad.data.folder`).

    Attributes:
        name: dataset name (``"imagenet"``).
        root: the folder holding ``train/`` and ``val/``.
        classes: class names (folder names) in label order.
        train_samples, test_samples: ``(path, label)`` pairs of ``train/`` and ``val/``.
        image_size: side of the square inputs (training crops and evaluation windows).
        resize_size: shorter side of an image before its central evaluation window.
        mean, std: the normalization (ImageNet's), per channel, on the [0, 1] pixel scale.
    """

    name: str
    root: Path
    classes: Tuple[str, ...]
    train_samples: List[Sample]
    test_samples: List[Sample]
    image_size: int = 224
    resize_size: Optional[int] = None
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD

    in_channels = 3  # images are converted to RGB

    def __post_init__(self) -> None:
        self.image_size, self.resize_size = _check_sizes(self.image_size, self.resize_size)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_train(self) -> int:
        return len(self.train_samples)

    @property
    def num_test(self) -> int:
        return len(self.test_samples)

    def loader(self, split: str, batch_size: int, augment: bool = False, **options) -> FolderLoader:
        """A :class:`FolderLoader` over ``split`` (``"train"`` or ``"test"``, the ``val/`` folder).

        ``augment`` gives training views; ``options`` (``shuffle``, ``seed``, ``device``, ``drop_last``,
        ``rank``, ``world_size``, ``memory_format``, ``workers``) go to the loader.
        """
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return FolderLoader(
            self.train_samples if split == "train" else self.test_samples,
            batch_size,
            image_size=self.image_size,
            resize_size=self.resize_size,
            augment=augment,
            mean=self.mean,
            std=self.std,
            **options,
        )


def load_imagenet(
    root: Union[str, Path], image_size: int = 224, resize_size: Optional[int] = None
) -> FolderDataset:
    """ImageNet, or any dataset in its layout, from ``root/train`` and ``root/val`` (see
    :mod:`qgrad.data.folder`).

    Only the file names are read here (a walk over the folders); images are decoded by the loaders.

    Args:
        root: the folder holding ``train/`` and ``val/`` (one sub-folder per class in each).
        image_size: side of the square training crops and evaluation windows, int >= 8 (224 for ImageNet).
        resize_size: shorter side before the central evaluation window; default ``image_size * 256 / 224``.

    Raises:
        FileNotFoundError: ``root`` or a split is missing, a split has no class folders (for instance a
            validation folder with all its images at the top), a class folder holds no image, or ``val/``
            has a class that ``train/`` lacks.
        ImportError: Pillow is not installed.
    """
    try:
        import PIL  # noqa: F401
    except ImportError as exc:
        raise ImportError("reading image folders needs Pillow: pip install pillow") from exc
    root = Path(root).expanduser().absolute()  # the samples' paths stay valid after a change of directory
    if not root.is_dir():
        raise FileNotFoundError(f"image folder root {root} does not exist; {_HOW}")
    if not (root / TRAIN_DIR).is_dir() and root.name in (TRAIN_DIR, VAL_DIR):
        raise FileNotFoundError(
            f"{root} looks like a split folder; give the folder that holds it, {root.parent}"
        )
    logger.info("listing the images of %s (for ImageNet this can take a minute)", root)
    classes, train = find_images(root / TRAIN_DIR)
    _, test = find_images(root / VAL_DIR, {name: i for i, name in enumerate(classes)})
    return FolderDataset(
        name="imagenet",
        root=root,
        classes=tuple(classes),
        train_samples=train,
        test_samples=test,
        image_size=image_size,
        resize_size=resize_size,
    )
