"""qgrad.data's image-folder reader (ImageNet's layout) on folders of real image files the tests write."""

import os
import zlib

import numpy as np
import pytest
import torch

import qgrad.data as data
from qgrad.data import FolderLoader, load_imagenet
from qgrad.data.folder import (
    CROP_RATIO,
    CROP_SCALE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    eval_image,
    random_resized_crop_box,
    train_image,
)

Image = pytest.importorskip("PIL.Image")  # a test dependency ([test] extra): without it nothing here can run


def pixels(seed, width, height):
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def save(path, array, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path)
    return path


# train/: three classes, written out of order, with a nested folder, mixed-case extensions, other image
# modes and a file that is not an image; val/: two of the classes
TRAIN = {
    "n02_cat": ["b.png", "a.PNG", "sub/c.bmp"],
    "n01_dog": ["z.jpg", "y.JPEG"],
    "n03_fox": ["gray.png", "rgba.png"],
}
VAL = {"n03_fox": ["v1.png"], "n01_dog": ["v2.png", "v3.png"]}


def write_tree(root, size=(20, 12)):
    """Write TRAIN and VAL under root, each image random pixels seeded by its path."""
    for split, spec in (("train", TRAIN), ("val", VAL)):
        for name, files in spec.items():
            for file in files:
                array = pixels(zlib.crc32(f"{split}/{name}/{file}".encode()), *size)
                mode = {"gray.png": "L", "rgba.png": "RGBA"}.get(file, "RGB")
                save(root / split / name / file, array, mode)
    (root / "train" / "n02_cat" / "notes.txt").write_text("not an image")


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "imagenet"
    write_tree(root)
    return root


# ----------------------------------------------------------------------------- file discovery


def test_classes_labels_and_order_follow_imagefolder(tree):
    root = tree
    ds = load_imagenet(root, image_size=8)
    assert ds.classes == ("n01_dog", "n02_cat", "n03_fox")
    assert (ds.num_classes, ds.in_channels, ds.num_train, ds.num_test) == (3, 3, 7, 3)
    rel = [(os.path.relpath(p, root), label) for p, label in ds.train_samples]
    assert rel == [
        ("train/n01_dog/y.JPEG", 0),
        ("train/n01_dog/z.jpg", 0),
        ("train/n02_cat/a.PNG", 1),
        ("train/n02_cat/b.png", 1),
        ("train/n02_cat/sub/c.bmp", 1),
        ("train/n03_fox/gray.png", 2),
        ("train/n03_fox/rgba.png", 2),
    ]
    # val/ lacks n02_cat: its labels are the training split's, not renumbered
    assert [(os.path.basename(p), label) for p, label in ds.test_samples] == [
        ("v2.png", 0), ("v3.png", 0), ("v1.png", 2)
    ]


def test_matches_torchvision_imagefolder_where_installed(tree):
    datasets = pytest.importorskip("torchvision.datasets")
    root = tree
    ours = load_imagenet(root, image_size=8)
    theirs = datasets.ImageFolder(str(root / "train"))
    assert list(ours.classes) == theirs.classes
    assert ours.train_samples == [(p, label) for p, label in theirs.samples]


def test_load_by_name_and_defaults(tree, monkeypatch):
    root = tree
    ds = data.load("imagenet", root=root)
    assert (ds.name, ds.image_size, ds.resize_size) == ("imagenet", 224, 256)
    assert data.load("imagenet", root=root, image_size=32).resize_size == 37  # round(32 * 256 / 224)
    monkeypatch.chdir(root.parent)
    relative = load_imagenet(root.name, image_size=8)
    monkeypatch.chdir(root / "train")  # the paths were made absolute: still found from elsewhere
    assert relative.root == root and len(list(relative.loader("test", 4, workers=0))) == 1


def test_missing_or_misplaced_folders_are_named(tmp_path, tree):
    root = tree
    with pytest.raises(FileNotFoundError, match="does not exist.*train/.*val/"):
        load_imagenet(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"imagenet/train looks like a split folder; give .*t$"):
        load_imagenet(root / "train")  # one level too deep
    flat = tmp_path / "flat"
    save(flat / "train" / "a" / "x.png", pixels(0, 9, 9))
    for i in range(3):  # the validation images as distributed: all in one folder
        save(flat / "val" / f"ILSVRC2012_val_{i}.JPEG", pixels(i, 9, 9))
    with pytest.raises(FileNotFoundError, match=r"val has no class folders \(it holds 3 images directly"):
        load_imagenet(flat)
    (flat / "val" / "b").mkdir()
    save(flat / "val" / "b" / "y.png", pixels(0, 9, 9))
    with pytest.raises(FileNotFoundError, match="1 classes that the training split lacks: b"):
        load_imagenet(flat)
    (root / "train" / "n04_empty").mkdir()
    (root / "train" / "n04_empty" / "readme.txt").write_text("")
    with pytest.raises(FileNotFoundError, match="1 class folders hold no image.*n04_empty"):
        load_imagenet(root)


@pytest.mark.parametrize("kwargs, match", [
    (dict(image_size=7), "image_size must be an int >= 8, got 7"),
    (dict(image_size=32.0), "image_size"),
    (dict(image_size=32, resize_size=31), "resize_size must be an int >= 32, got 31"),
])
def test_bad_sizes(tree, kwargs, match):
    root = tree
    with pytest.raises(ValueError, match=match):
        load_imagenet(root, **kwargs)


# ----------------------------------------------------------------------------- the views


def test_eval_view_is_the_central_window_of_the_resized_image(tmp_path):
    # the shorter side already has resize_size: the resize keeps every pixel, the window is a plain slice
    array = pixels(1, 12, 20)  # width 12, height 20
    path = save(tmp_path / "im.png", array)
    view = eval_image(str(path), image_size=8, resize_size=12)
    top, left = round((20 - 8) / 2), round((12 - 8) / 2)
    expected = torch.from_numpy(array[top : top + 8, left : left + 8])
    assert view.dtype == torch.uint8 and torch.equal(view, expected)
    # a real resize: the shorter side becomes resize_size, the longer keeps the aspect ratio (floored)
    big = eval_image(str(path), image_size=16, resize_size=18)
    assert big.shape == (16, 16, 3)
    resized = np.array(Image.fromarray(array).resize((18, 30), Image.Resampling.BILINEAR))
    top, left = round((30 - 16) / 2), round((18 - 16) / 2)
    assert torch.equal(big, torch.from_numpy(resized[top : top + 16, left : left + 16]))


class FixedRng:
    """Stands in for numpy's Generator with chosen draws."""

    def __init__(self, uniform, flip_draw):
        self._uniform, self.flip_draw = list(uniform), flip_draw

    def uniform(self, lo, hi):
        return self._uniform.pop(0)

    def integers(self, lo, hi):
        return lo

    def random(self):
        return self.flip_draw


@pytest.mark.parametrize("flip_draw", [0.2, 0.7])
def test_train_view_whole_image_and_flip(tmp_path, flip_draw):
    array = pixels(2, 16, 16)
    path = save(tmp_path / "im.png", array)
    # area fraction 1 and aspect ratio exp(0) = 1: the crop is the whole image, resized to its own size
    view = train_image(str(path), 16, FixedRng([1.0, 0.0], flip_draw))
    expected = torch.from_numpy(array)
    assert torch.equal(view, expected.flip(1) if flip_draw < 0.5 else expected)


def test_random_resized_crop_boxes_stay_in_bounds():
    rng = np.random.default_rng(0)
    for width, height in [(64, 48), (13, 200), (300, 7), (8, 8)]:
        for _ in range(200):
            left, top, w, h = random_resized_crop_box(width, height, rng)
            assert 0 <= left and left + w <= width and 0 <= top and top + h <= height and w > 0 and h > 0
    # in a roomy image every first draw fits: the area and aspect ratio are the drawn ones, up to rounding
    for _ in range(200):
        left, top, w, h = random_resized_crop_box(400, 400, rng)
        assert CROP_SCALE[0] * 0.9 <= w * h / 400**2 <= CROP_SCALE[1]
        assert CROP_RATIO[0] * 0.9 <= w / h <= CROP_RATIO[1] * 1.1


def test_random_resized_crop_falls_back_to_a_central_crop():
    # 300 x 7: no draw of area >= 8% with aspect ratio <= 4/3 fits 7 rows, so the fallback runs
    left, top, w, h = random_resized_crop_box(300, 7, np.random.default_rng(0))
    assert (h, w) == (7, round(7 * CROP_RATIO[1])) and (left, top) == ((300 - w) // 2, 0)
    left, top, w, h = random_resized_crop_box(7, 300, np.random.default_rng(0))
    assert (w, h) == (7, round(7 / CROP_RATIO[0])) and (left, top) == (0, (300 - h) // 2)


def test_grayscale_and_rgba_images_become_rgb(tree):
    root = tree
    ds = load_imagenet(root, image_size=12, resize_size=12)
    x, y = next(iter(ds.loader("train", 7, workers=0)))  # evaluation views of the training images
    assert x.shape == (7, 3, 12, 12) and y.tolist() == [0, 0, 1, 1, 1, 2, 2]
    gray = x[5] * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    assert torch.allclose(gray[0], gray[1], atol=1e-6) and torch.allclose(gray[1], gray[2], atol=1e-6)


# ----------------------------------------------------------------------------- the loader


def test_batches_are_normalized_uint8_views(tree):
    root = tree
    ds = load_imagenet(root, image_size=8, resize_size=12)
    loader = ds.loader("test", 2, workers=0)
    batches = list(loader)
    assert [tuple(x.shape) for x, _ in batches] == [(2, 3, 8, 8), (1, 3, 8, 8)] and len(loader) == 2
    x = torch.cat([b[0] for b in batches])
    raw = torch.stack([eval_image(p, 8, 12) for p, _ in ds.test_samples]).permute(0, 3, 1, 2).double() / 255
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x.double(), (raw - mean) / std, rtol=0, atol=1e-5)
    assert torch.cat([b[1] for b in batches]).tolist() == [0, 0, 2]


def collect(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))


def test_augmented_epochs_are_reproducible_and_independent_of_workers(tree):
    root = tree
    ds = load_imagenet(root, image_size=8)
    kwargs = dict(shuffle=True, augment=True, seed=3)
    first = collect(ds.loader("train", 3, workers=0, **kwargs))
    again = ds.loader("train", 3, workers=2, **kwargs)
    assert same(collect(again), first)
    second = collect(again)  # the next epoch: a new order and new crops
    assert not same(second, first)
    again.set_epoch(1)
    assert same(collect(again), second)
    again.set_epoch(1, first_batch=1)  # the rest of epoch 1 after its first batch
    assert same(collect(again), second[1:])
    assert not same(collect(ds.loader("train", 3, workers=0, **{**kwargs, "seed": 4})), first)
    # a sample's view does not depend on the batch it lands in: its draws come from (seed, epoch, index)
    one = torch.cat([x for x, _ in collect(ds.loader("train", 7, workers=0, **kwargs))])
    assert torch.equal(one, torch.cat([x for x, _ in first]))
    order = torch.randperm(7, generator=data.loader.epoch_generator(3, 0)).tolist()
    views = torch.stack(
        [train_image(ds.train_samples[i][0], 8, np.random.default_rng([3, 0, i])) for i in order]
    ).permute(0, 3, 1, 2)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(one, (views / 255 - mean) / std, rtol=0, atol=1e-5)


def test_processes_split_each_batch(tree):
    root = tree
    ds = load_imagenet(root, image_size=8)
    kwargs = dict(shuffle=True, augment=True, seed=0, drop_last=True, workers=0)
    single = collect(ds.loader("train", 4, **kwargs))
    parts = [collect(ds.loader("train", 4, rank=r, world_size=2, **kwargs)) for r in range(2)]
    assert len(single) == 1 and all(len(p) == 1 for p in parts)  # 7 images, the partial batch dropped
    assert torch.equal(torch.cat([parts[0][0][0], parts[1][0][0]]), single[0][0])
    assert torch.equal(torch.cat([parts[0][0][1], parts[1][0][1]]), single[0][1])


def test_channels_last_batches(tree):
    root = tree
    ds = load_imagenet(root, image_size=8)
    plain = collect(ds.loader("test", 3, workers=0))
    last = collect(ds.loader("test", 3, workers=0, memory_format=torch.channels_last))
    assert plain[0][0].is_contiguous() and last[0][0].is_contiguous(memory_format=torch.channels_last)
    assert same(plain, last)


def test_loader_argument_errors(tree):
    root = tree
    ds = load_imagenet(root, image_size=8)
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        ds.loader("val", 4)
    with pytest.raises(ValueError, match="workers must be an int >= 0"):
        ds.loader("train", 4, workers=-1)
    with pytest.raises(ValueError, match="drop_last=True: every epoch would be empty"):
        ds.loader("train", 8, drop_last=True)
    with pytest.raises(ValueError, match="samples is empty"):
        FolderLoader([], 4)


def test_an_unreadable_image_is_named(tree):
    root = tree
    bad = root / "val" / "n01_dog" / "v2.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    ds = load_imagenet(root, image_size=8)
    for workers in (0, 1):  # in the calling process, or in a worker: the same one-line message
        with pytest.raises(OSError, match=r"^cannot read image \S*v2\.png: \w+") as info:
            list(ds.loader("test", 4, workers=workers))
        assert "\n" not in str(info.value)


def test_decoding_takes_the_image_size_into_account(tmp_path):
    # images smaller than the crop are upsampled, never refused
    save(tmp_path / "train" / "a" / "tiny.png", pixels(0, 3, 5))
    save(tmp_path / "val" / "a" / "tiny.png", pixels(1, 5, 3))
    ds = load_imagenet(tmp_path, image_size=8)
    for split, augment in (("train", True), ("test", False)):
        (x, y), = list(ds.loader(split, 1, augment=augment, workers=0))
        assert x.shape == (1, 3, 8, 8) and torch.isfinite(x).all() and y.tolist() == [0]
    assert ds.resize_size == 9  # round(8 * 256 / 224)


def test_sample_table_round_trips_paths():
    from qgrad.data.folder import _SampleTable

    samples = [("/a/b.png", 0), ("/données/ç é.JPEG", 3), ("", 1), ("/x/" + "y" * 300 + ".png", 2)]
    table = _SampleTable(samples)
    assert len(table) == 4 and [table[i] for i in range(4)] == samples


def test_hidden_entries_and_link_loops_are_skipped(tree):
    root = tree
    before = load_imagenet(root, image_size=8).train_samples
    save(root / "train" / ".ipynb_checkpoints" / "x.png", pixels(5, 9, 9))  # would become class 0
    save(root / "train" / "n02_cat" / ".ipynb_checkpoints" / "b-checkpoint.png", pixels(6, 9, 9))
    (root / "train" / "n02_cat" / "._b.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (root / "train" / "n01_dog" / "up").symlink_to("..")  # train/: would list every class under n01_dog
    (root / "train" / "n01_dog" / "self").symlink_to(".")
    with pytest.warns(UserWarning, match=r"hidden folders are not classes, skipped \.ipynb_checkpoints"):
        ds = load_imagenet(root, image_size=8)
    assert ds.classes == ("n01_dog", "n02_cat", "n03_fox") and ds.train_samples == before


def test_linked_folders_are_followed(tree, tmp_path):
    root = tree
    elsewhere = tmp_path / "more_foxes"
    save(elsewhere / "m.png", pixels(7, 9, 9))
    (root / "train" / "n03_fox" / "more").symlink_to(elsewhere)
    ds = load_imagenet(root, image_size=8)
    assert ds.train_samples[-1] == (str(root / "train" / "n03_fox" / "more" / "m.png"), 2)
    assert len(ds.train_samples) == 8


def test_default_workers_share_the_cores_among_local_processes(monkeypatch):
    from qgrad.data.folder import default_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers() == 8
    for local, expected in (("2", 8), ("4", 4), ("8", 2), ("32", 1)):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
        assert default_workers() == expected
