"""qgrad.data: the CIFAR-10 reader on files in the real format, the digits split, DeviceLoader."""

import collections
import pickle

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import qgrad.data as data
from qgrad.data import ArrayDataset, DeviceLoader, random_crop_flip

# ---------------------------------------------------------------- CIFAR-10 reader


def write_cifar(directory, n_train=6, n_test=4, seed=0):
    """The CIFAR-10 python layout: pickled dicts with bytes keys, b'data' uint8 (N, 3072) channel-major."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else n_train
        rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": rows,
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        with open(directory / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        written[name] = (rows, labels)
    with open(directory / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"airplane"] * 10, b"num_vis": 3072}, f, protocol=2)
    return written


def train_rows(written):
    rows = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    return rows, labels


def test_cifar_pixel_layout_and_labels(tmp_path):
    written = write_cifar(tmp_path)
    ds = data.load_cifar10(tmp_path)
    rows, labels = train_rows(written)
    assert ds.train_x.shape == (30, 3, 32, 32) and ds.train_x.dtype == torch.float32
    assert ds.test_x.shape == (4, 3, 32, 32)
    assert ds.train_y.dtype == torch.int64 and ds.train_y.tolist() == labels
    assert ds.test_y.tolist() == written["test_batch"][1]
    assert (ds.name, ds.num_classes, ds.in_channels, ds.crop_padding, ds.flip) == ("cifar10", 10, 3, 4, True)

    pixels = (ds.denormalize(ds.train_x) * 255).double()
    # single known pixels: row index c*1024 + h*32 + w (1024 red, then green, then blue; each row-major 32x32)
    for n, ch, h, w in [(0, 0, 0, 0), (7, 1, 3, 30), (29, 2, 31, 5), (13, 2, 17, 0)]:
        assert abs(pixels[n, ch, h, w].item() - rows[n, ch * 1024 + h * 32 + w]) < 1e-3
    expected = torch.from_numpy(rows.astype(np.float64)).view(30, 3, 32, 32)
    torch.testing.assert_close(pixels, expected, rtol=0, atol=1e-3)
    test_pixels = (ds.denormalize(ds.test_x) * 255).double()
    torch.testing.assert_close(
        test_pixels,
        torch.from_numpy(written["test_batch"][0].astype(np.float64)).view(4, 3, 32, 32),
        rtol=0,
        atol=1e-3,
    )


def test_cifar_normalization_uses_train_statistics(tmp_path):
    written = write_cifar(tmp_path)
    ds = data.load_cifar10(tmp_path)
    rows, _ = train_rows(written)
    images = rows.reshape(-1, 3, 32, 32).astype(np.float64) / 255
    np.testing.assert_allclose(ds.mean, images.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(ds.std, images.std(axis=(0, 2, 3)), rtol=1e-12)
    torch.testing.assert_close(
        ds.train_x.double().mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-5
    )
    torch.testing.assert_close(
        ds.train_x.double().std(dim=(0, 2, 3), unbiased=False),
        torch.ones(3, dtype=torch.float64),
        rtol=0,
        atol=1e-5,
    )


def test_cifar_parent_layout(tmp_path):
    written = write_cifar(tmp_path / "cifar-10-batches-py")
    for root in (tmp_path, str(tmp_path)):
        ds = data.load("cifar10", root=root)
        assert ds.test_y.tolist() == written["test_batch"][1]


def test_cifar_missing_directory(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="CIFAR-10 python version") as info:
        data.load_cifar10(missing)
    assert str(missing) in str(info.value)


def test_cifar_archive_or_binary_version_instead_of_the_batches(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"\x1f\x8b")
    with pytest.raises(FileNotFoundError, match="is a file; extract it"):
        data.load_cifar10(archive)
    with pytest.raises(FileNotFoundError, match=r"holds cifar-10-python.tar.gz: the archive"):
        data.load_cifar10(tmp_path)


def test_cifar_missing_files_lists_each(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    (folder / "data_batch_2").unlink()
    (folder / "test_batch").unlink()
    with pytest.raises(FileNotFoundError) as info:
        data.load_cifar10(tmp_path)
    message = str(info.value)
    assert str(folder) in message and "data_batch_2" in message and "test_batch" in message
    assert "data_batch_1" not in message and "CIFAR-10 python version" in message
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="data_batch_1, data_batch_2, data_batch_3"):
        data.load_cifar10(empty)


def test_cifar_corrupt_file(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "data_batch_3"
    path.write_bytes(path.read_bytes()[:100])  # truncated pickle
    with pytest.raises(ValueError, match="data_batch_3"):
        data.load_cifar10(tmp_path)
    path.write_bytes(b"this is not a pickle")
    with pytest.raises(ValueError, match="data_batch_3"):
        data.load_cifar10(tmp_path)


def test_cifar_wrong_content(tmp_path):
    write_cifar(tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"test_batch.*\(N, 3072\)"):
        data.load_cifar10(tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({"data": 1}, f)
    with pytest.raises(ValueError, match="test_batch.*b'labels'"):
        data.load_cifar10(tmp_path)


def test_load_dispatch_errors(tmp_path):
    with pytest.raises(ValueError, match="'cifar10' needs root"):
        data.load("cifar10")
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*cifar10, digits"):
        data.load("mnist")
    with pytest.raises(ValueError, match="takes no root"):
        data.load("digits", root=tmp_path)
    with pytest.raises(ValueError, match="'imagenet' needs root"):
        data.load("imagenet")
    with pytest.raises(ValueError, match="image_size applies to image folders"):
        data.load("digits", image_size=32)
    assert data.names() == ["cifar10", "digits", "imagenet"]


def test_array_dataset_validation():
    x, y = torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.int64)
    ArrayDataset("t", x, y, x, y, num_classes=2, in_channels=1)
    with pytest.raises(ValueError, match="train_y has 3 labels"):
        ArrayDataset("t", x, y[:3], x, y, num_classes=2, in_channels=1)
    with pytest.raises(ValueError, match="in_channels is 3"):
        ArrayDataset("t", x, y, x, y, num_classes=2, in_channels=3)
    with pytest.raises(ValueError, match="test_y must be an int64"):
        ArrayDataset("t", x, y, x, y.float(), num_classes=2, in_channels=1)
    with pytest.raises(ValueError, match="no mean/std"):
        ArrayDataset("t", x, y, x, y, num_classes=2, in_channels=1).denormalize(x)


# ---------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def sklearn_digits():
    from sklearn.datasets import load_digits

    return load_digits()


def test_digits_shapes_and_content(sklearn_digits):
    ds = data.load_digits()
    assert ds.train_x.shape == (1437, 1, 8, 8) and ds.test_x.shape == (360, 1, 8, 8)
    assert (ds.name, ds.num_classes, ds.in_channels, ds.crop_padding, ds.flip) == ("digits", 10, 1, 1, False)
    # normalized with the train split's statistics
    assert abs(ds.train_x.double().mean().item()) < 1e-6
    assert abs(ds.train_x.double().std(unbiased=False).item() - 1) < 1e-6

    # the two splits together are exactly scikit-learn's images (0..16) and labels, each used once
    def keys(x, y):
        raw = ds.denormalize(x) * 16
        assert torch.allclose(raw, raw.round(), atol=1e-4)  # test split uses the same statistics
        ints = raw.round().to(torch.uint8).numpy().reshape(len(y), -1)
        return [(int(label), row.tobytes()) for row, label in zip(ints, y)]

    got = collections.Counter(keys(ds.train_x, ds.train_y) + keys(ds.test_x, ds.test_y))
    ref = sklearn_digits.images.astype(np.uint8).reshape(1797, -1)
    assert got == collections.Counter((int(t), r.tobytes()) for r, t in zip(ref, sklearn_digits.target))


@pytest.mark.parametrize("fraction", [0.2, 0.5])
def test_digits_stratified(sklearn_digits, fraction):
    ds = data.load_digits(test_fraction=fraction, seed=3)
    total = np.bincount(sklearn_digits.target, minlength=10)
    test = np.bincount(ds.test_y.numpy(), minlength=10)
    assert len(ds.test_y) == int(np.ceil(fraction * 1797))
    assert np.all(np.abs(test - fraction * total) <= 1)
    np.testing.assert_array_equal(test + np.bincount(ds.train_y.numpy(), minlength=10), total)


def test_digits_deterministic():
    a, b, c = data.load_digits(seed=1), data.load_digits(seed=1), data.load_digits(seed=2)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.test_y, c.test_y)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(test_fraction=0.0), r"test_fraction must be a number in \(0, 1\)"),
        (dict(test_fraction=1.0), "test_fraction"),
        (dict(test_fraction=0.001), "at least 10"),
        (dict(seed=-1), "seed must be an int"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_digits_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.load_digits(**kwargs)


# ---------------------------------------------------------------- DeviceLoader


def naive_crop_flip(image, top, left, flip, padding):
    """One sample, written the obvious way."""
    padded = F.pad(image, (padding,) * 4)
    h, w = image.shape[-2:]
    window = padded[:, top : top + h, left : left + w]
    return window.flip(-1) if flip else window


def collect(loader):
    batches = list(loader)
    return (
        torch.cat([b[0] for b in batches]),
        torch.cat([b[1] for b in batches]),
        [len(b[1]) for b in batches],
    )


def make_data(n=37, shape=(2, 5, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.arange(n)


@pytest.mark.parametrize("padding", [0, 1, 3])
def test_random_crop_flip_matches_naive(padding):
    x, _ = make_data(n=20, shape=(3, 5, 7))
    g = torch.Generator().manual_seed(1)
    top = torch.randint(0, 2 * padding + 1, (20,), generator=g)
    left = torch.randint(0, 2 * padding + 1, (20,), generator=g)
    flip = torch.rand(20, generator=g) < 0.5
    out = random_crop_flip(x, top, left, flip, padding)
    ref = torch.stack(
        [naive_crop_flip(x[i], top[i].item(), left[i].item(), bool(flip[i]), padding) for i in range(20)]
    )
    assert out.shape == x.shape and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_loader_crop_is_a_shifted_window():
    p = 2
    x, y = make_data(n=600)  # 50 (offset, flip) states: all appear with probability > 0.999
    loader = DeviceLoader(x, y, batch_size=64, shuffle=True, crop_padding=p, flip=True, seed=5)
    xs, ys, _ = collect(loader)
    assert xs.shape == x.shape
    seen = set()
    for out, i in zip(xs, ys.tolist()):
        matches = [
            (top, left, flip)
            for top in range(2 * p + 1)
            for left in range(2 * p + 1)
            for flip in (False, True)
            if torch.equal(out, naive_crop_flip(x[i], top, left, flip, p))
        ]
        assert len(matches) == 1, f"sample {i}: {len(matches)} matching windows"
        seen.add(matches[0])
    assert len(seen) == (2 * p + 1) ** 2 * 2  # every offset and both flip states occur


def test_loader_flip_only():
    x, y = make_data(n=64)
    xs, ys, _ = collect(DeviceLoader(x, y, batch_size=10, flip=True, seed=0))
    assert torch.equal(ys, y)  # no shuffle: stored order
    flipped = [torch.equal(a, b.flip(-1)) for a, b in zip(xs, x)]
    kept = [torch.equal(a, b) for a, b in zip(xs, x)]
    assert all(f != k for f, k in zip(flipped, kept))
    assert 10 < sum(flipped) < 54


def test_loader_plain_batches_pair_inputs_with_targets():
    x, y = make_data(n=37)
    loader = DeviceLoader(x, y, batch_size=8, shuffle=True, seed=0)
    assert len(loader) == 5
    for xb, yb in loader:
        assert xb.device == x.device and torch.equal(xb, x[yb])
    xs, ys, sizes = collect(loader)
    assert sizes == [8, 8, 8, 8, 5]
    assert sorted(ys.tolist()) == list(range(37)) and ys.tolist() != list(range(37))
    xs, ys, sizes = collect(DeviceLoader(x, y, batch_size=8))
    assert torch.equal(xs, x) and torch.equal(ys, y)


def test_loader_drop_last():
    x, y = make_data(n=37)
    loader = DeviceLoader(x, y, batch_size=8, shuffle=True, drop_last=True, seed=0)
    assert len(loader) == 4
    _, ys, sizes = collect(loader)
    assert sizes == [8] * 4 and len(set(ys.tolist())) == 32
    with pytest.raises(ValueError, match="batch_size 40 exceeds the 37 samples and drop_last=True"):
        DeviceLoader(x, y, batch_size=40, drop_last=True)  # every epoch would be empty
    assert len(DeviceLoader(x, y, batch_size=37, drop_last=True)) == 1
    assert len(DeviceLoader(x, y, batch_size=40)) == 1


def test_loader_determinism_and_epochs():
    x, y = make_data(n=50)
    kwargs = dict(batch_size=16, shuffle=True, crop_padding=1, flip=True, seed=7)
    a, b = DeviceLoader(x, y, **kwargs), DeviceLoader(x, y, **kwargs)
    epochs_a = [collect(a) for _ in range(3)]
    epochs_b = [collect(b) for _ in range(3)]
    for (xa, ya, _), (xb, yb, _) in zip(epochs_a, epochs_b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(epochs_a[0][1], epochs_a[1][1])  # a new iter() is a new epoch
    other = collect(DeviceLoader(x, y, **{**kwargs, "seed": 8}))
    assert not torch.equal(other[1], epochs_a[0][1])
    # resume: set_epoch(2) replays the third epoch, and the next iter() continues with epoch 3
    c = DeviceLoader(x, y, **kwargs)
    c.set_epoch(2)
    xc, yc, _ = collect(c)
    assert torch.equal(xc, epochs_a[2][0]) and torch.equal(yc, epochs_a[2][1])
    a.set_epoch(0)
    assert torch.equal(collect(a)[1], epochs_a[0][1])
    d = DeviceLoader(x, y, **kwargs)
    d.set_epoch(3)
    assert torch.equal(collect(c)[0], collect(d)[0])


@pytest.mark.parametrize("rank, world_size", [(0, 1), (1, 2)])
def test_set_epoch_from_a_batch_yields_the_rest_of_that_epoch(rank, world_size):
    x, y = make_data(n=50)
    kwargs = dict(batch_size=8, shuffle=True, crop_padding=1, flip=True, seed=5, drop_last=True)
    loader = DeviceLoader(x, y, rank=rank, world_size=world_size, **kwargs)
    epochs = [[(xb.clone(), yb.clone()) for xb, yb in loader] for _ in range(2)]
    assert len(epochs[0]) == len(loader) == 6
    for first in (0, 1, 5, 6):
        loader.set_epoch(0, first_batch=first)
        rest = [(xb.clone(), yb.clone()) for xb, yb in loader]
        assert len(rest) == 6 - first
        assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(rest, epochs[0][first:]))
        # the next epoch is whole
        following = list(loader)
        assert len(following) == 6 and torch.equal(following[0][0], epochs[1][0][0])
    for bad in (-1, 7, 1.0, True):
        with pytest.raises(ValueError, match="first_batch must be an int in"):
            loader.set_epoch(1, first_batch=bad)


def test_loader_draws_do_not_depend_on_batch_size():
    x, y = make_data(n=50)
    kwargs = dict(shuffle=True, crop_padding=2, flip=True, seed=3)
    small = collect(DeviceLoader(x, y, batch_size=7, **kwargs))
    large = collect(DeviceLoader(x, y, batch_size=50, **kwargs))
    assert torch.equal(small[0], large[0]) and torch.equal(small[1], large[1])


@pytest.mark.parametrize("world_size", [2, 3])
def test_loader_parts_of_processes_make_up_the_single_process_batches(world_size):
    x, y = make_data(n=50)
    kwargs = dict(batch_size=12, shuffle=True, crop_padding=2, flip=True, seed=5, drop_last=True)
    single = DeviceLoader(x, y, **kwargs)
    parts = [DeviceLoader(x, y, rank=r, world_size=world_size, **kwargs) for r in range(world_size)]
    for epoch in range(2):  # a second epoch draws anew, in every process alike
        whole = list(single)
        pieces = [list(p) for p in parts]
        assert all(len(p) == len(single) == 4 for p in parts)
        for i, (xb, yb) in enumerate(whole):
            assert all(piece[i][0].shape[0] == 12 // world_size for piece in pieces)
            assert torch.equal(torch.cat([piece[i][0] for piece in pieces]), xb)
            assert torch.equal(torch.cat([piece[i][1] for piece in pieces]), yb)


def test_loader_channels_last_batches_hold_the_same_values():
    x, y = make_data(n=20)
    kwargs = dict(batch_size=8, shuffle=True, crop_padding=2, flip=True, seed=2)
    plain = list(DeviceLoader(x, y, **kwargs))
    last = list(DeviceLoader(x, y, memory_format=torch.channels_last, **kwargs))
    for (xa, ya), (xb, yb) in zip(plain, last):
        assert xb.is_contiguous(memory_format=torch.channels_last) and not xb.is_contiguous()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rank=2, world_size=2), r"rank must be an int in \[0, 2\), got 2"),
        (dict(world_size=0), "world_size must be an int >= 1"),
        (dict(world_size=3), "divisible by 3 and drop_last=True, got batch_size=4, drop_last=True"),
        (dict(world_size=2, drop_last=False), "drop_last=True, got batch_size=4, drop_last=False"),
    ],
)
def test_loader_bad_process_arguments(kwargs, match):
    x, y = make_data(n=10)
    with pytest.raises(ValueError, match=match):
        DeviceLoader(x, y, **{"batch_size": 4, "drop_last": True, **kwargs})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_loader_on_cuda_matches_cpu():
    x, y = make_data(n=50)
    kwargs = dict(batch_size=16, shuffle=True, crop_padding=2, flip=True, seed=3)
    cpu = collect(DeviceLoader(x, y, **kwargs))
    loader = DeviceLoader(x, y, device="cuda", **kwargs)
    assert loader.x.is_cuda
    gpu = collect(loader)
    assert gpu[0].is_cuda and gpu[1].is_cuda
    assert torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(batch_size=0), "batch_size must be an int >= 1, got 0"),
        (dict(batch_size=2.0), "batch_size"),
        (dict(batch_size=True), "batch_size"),
        (dict(crop_padding=-1), "crop_padding must be an int >= 0"),
        (dict(seed=-3), "seed must be an int"),
        (dict(shuffle=1), "shuffle must be a bool"),
        (dict(flip="yes"), "flip must be a bool"),
        (dict(memory_format="channels_last"), "memory_format must be torch.contiguous_format"),
        (dict(memory_format=torch.channels_last_3d), "needs 5-d inputs"),
    ],
)
def test_loader_bad_arguments(kwargs, match):
    x, y = make_data(n=10)
    with pytest.raises(ValueError, match=match):
        DeviceLoader(x, y, **{"batch_size": 4, **kwargs})


def test_loader_bad_data():
    x, y = make_data(n=10)
    with pytest.raises(ValueError, match="same number of samples, got 10 and 9"):
        DeviceLoader(x, y[:9], batch_size=4)
    with pytest.raises(ValueError, match="at least one sample"):
        DeviceLoader(x[:0], y[:0], batch_size=4)
    with pytest.raises(ValueError, match=r"need floating-point images \(N, C, H, W\)"):
        DeviceLoader(x.flatten(1), y, batch_size=4, crop_padding=1)
    with pytest.raises(TypeError, match="must be tensors"):
        DeviceLoader(x.numpy(), y, batch_size=4)
    loader = DeviceLoader(x, y, batch_size=4, shuffle=True)
    loader.set_epoch(4)
    with pytest.raises(ValueError, match="epoch must be an int >= 0"):
        loader.set_epoch(-1)
    assert loader._next_epoch == 4  # the failed call changed nothing
