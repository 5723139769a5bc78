"""Images per second of the image-folder loader (ImageNet's layout): decoding, cropping and normalizing.

A penalized ImageNet step on a GPU needs its batch decoded in time: compare the rate here with the steps per
second of ``test_penalty_step.py`` times the batch size. The folder is written once per pytest run: 256 JPEGs of
500 x 375 pixels (about ImageNet's median size), quality 90, in 4 class folders. Each case runs one epoch of
the loader (batch 64, ``image_size`` 224, on the CPU) with training views (random resized crop and flip) or
evaluation views (resize to 256, central crop), decoded in the calling process (``workers=0``) or by worker
processes. ``extra_info`` has ``images_per_s`` of the median epoch and the machine's usable cores.

    pytest benchmarks/test_folder_loader.py --benchmark-only
"""
import os

import numpy as np
import pytest

from qgrad.data import load_imagenet

Image = pytest.importorskip("PIL.Image")

IMAGES, CLASSES, BATCH = 256, 4, 64


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    # smooth random images (noise upsampled) compress like photographs, unlike raw noise
    for split in ("train", "val"):
        for i in range(IMAGES):
            small = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
            image = Image.fromarray(small).resize((500, 375), Image.Resampling.BICUBIC)
            path = root / split / f"c{i % CLASSES}" / f"{i}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path, quality=90)
    return root


def _cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("split", ["train", "test"])
def test_folder_loader_epoch(benchmark, folder, split, workers):
    data = load_imagenet(folder, image_size=224)
    loader = data.loader(split, BATCH, shuffle=split == "train", augment=split == "train", workers=workers)

    def epoch():
        for x, _ in loader:
            assert x.shape[1:] == (3, 224, 224)

    benchmark.pedantic(epoch, rounds=3, warmup_rounds=1)
    benchmark.extra_info["images_per_s"] = IMAGES / benchmark.stats.stats.median
    benchmark.extra_info["usable_cores"] = _cores()
