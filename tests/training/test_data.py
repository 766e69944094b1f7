"""Data sets and the device loader: spec parsing, the sources, the .npz cache, subsets and batch augmentation."""
from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from training.data import (NAMED, SPLITS, DataError, DatasetSpec, DeviceLoader, balanced_subset, batch_crop_flip,
                           load_dataset, load_split, parse_spec)

CIFAR_ZIP = Path(__file__).resolve().parents[2].parent / "shared/data/cifar10-jpeg.zip"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ---------------------------------------------------------------- helpers: tiny ImageFolder trees

def _encode(colour, size=(8, 8), mode="RGB", fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, fmt)
    return buf.getvalue()


def _colours(classes=("dog", "cat", "bird"), n_train=4, n_test=2, prefix="", ext="png") -> dict[str, tuple]:
    """{relative path: RGB colour}; every image a distinct solid colour."""
    out = {}
    for s, split in enumerate(SPLITS):
        for c, cls in enumerate(classes):
            for i in range(n_train if split == "train" else n_test):
                out[f"{prefix}{split}/{cls}/{i:02d}.{ext}"] = (60 * c + 10, 30 * i + 5, 90 + 100 * s)
    return out


def _files(colours: dict[str, tuple], fmt="PNG") -> dict[str, bytes]:
    return {name: _encode(colour, fmt=fmt) for name, colour in colours.items()}


def _write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, blob in files.items():
            zf.writestr(name, blob)
    return path


def _write_dir(root: Path, files: dict[str, bytes]) -> Path:
    for name, blob in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(blob)
    return root


def _expected(colours: dict[str, tuple], split: str, prefix: str = "") -> tuple[np.ndarray, list[str]]:
    """The colours of one split's images in the loader's order (sorted paths), and their class folders."""
    names = sorted(n for n in colours if n.startswith(f"{prefix}{split}/"))
    return np.array([colours[n] for n in names], dtype=np.uint8), [n.split("/")[-2] for n in names]


def _assert_same_dataset(a, b):
    assert a.classes == b.classes
    assert (a.mean, a.std) == (b.mean, b.std)
    for split in SPLITS:
        assert torch.equal(a.split(split).images, b.split(split).images)
        assert torch.equal(a.split(split).labels, b.split(split).labels)


# ---------------------------------------------------------------- spec parsing

def test_a_bare_name_parses_with_no_split():
    assert parse_spec("digits") == DatasetSpec("digits", None)
    assert str(parse_spec("digits")) == "digits"


def test_name_colon_split_parses_into_name_and_split():
    assert parse_spec("digits:test") == DatasetSpec("digits", "test")
    assert parse_spec("cifar10:train") == DatasetSpec("cifar10", "train")
    assert parse_spec("  cifar100:test ") == DatasetSpec("cifar100", "test")
    assert str(parse_spec("cifar10:train")) == "cifar10:train"


def test_a_path_keeps_its_directories_and_splits_at_the_last_colon():
    assert parse_spec("some/dir/data.zip:train") == DatasetSpec("some/dir/data.zip", "train")
    assert parse_spec("../shared/data/cifar10-jpeg.zip:test") == DatasetSpec("../shared/data/cifar10-jpeg.zip", "test")
    assert parse_spec("some/dir/data.zip") == DatasetSpec("some/dir/data.zip", None)


def test_default_split_applies_only_when_the_spec_names_none():
    assert parse_spec("digits", default_split="test") == DatasetSpec("digits", "test")
    assert parse_spec("digits:train", default_split="test") == DatasetSpec("digits", "train")
    assert parse_spec("some/dir/data.zip", default_split="train").split == "train"


def test_an_unknown_split_raises_a_data_error_naming_the_split():
    with pytest.raises(DataError, match=r"unknown split 'val'.*train, test"):
        parse_spec("digits:val")


def test_an_unknown_name_raises_a_data_error_listing_the_known_names():
    with pytest.raises(DataError, match="imagenet") as err:
        parse_spec("imagenet")
    assert all(name in str(err.value) for name in NAMED)
    with pytest.raises(DataError, match="imagenet"):
        parse_spec("imagenet:train")


@pytest.mark.parametrize("spec", ["", "   "])
def test_an_empty_spec_raises_a_data_error(spec):
    with pytest.raises(DataError, match="empty"):
        parse_spec(spec)


# ---------------------------------------------------------------- digits

@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_digits_has_1437_train_and_360_test_images_of_one_8x8_uint8_channel_in_10_classes(digits):
    assert digits.train.images.shape == (1437, 1, 8, 8)
    assert digits.test.images.shape == (360, 1, 8, 8)
    assert digits.train.images.dtype == digits.test.images.dtype == torch.uint8
    assert digits.train.labels.dtype == torch.int64 and digits.train.labels.shape == (1437,)
    assert digits.test.labels.shape == (360,)
    assert digits.classes == [str(i) for i in range(10)]
    assert (digits.num_classes, digits.in_channels, digits.image_size, digits.color_mode) == (10, 1, 8, "L")
    assert digits.name == "digits"


def test_digits_pixels_are_scaled_to_span_0_to_255(digits):
    assert int(digits.train.images.min()) == 0 and int(digits.train.images.max()) == 255
    assert len(digits.train.images.unique()) == 17  # the 17 intensities 0..16, rescaled


def test_digits_test_split_is_stratified_by_class(digits):
    train = torch.bincount(digits.train.labels, minlength=10)
    test = torch.bincount(digits.test.labels, minlength=10)
    share = 360 / 1797
    for c in range(10):
        assert abs(test[c].item() - (train[c] + test[c]).item() * share) <= 1, f"class {c}: {train[c]} / {test[c]}"


def test_digits_split_is_the_same_on_every_load(digits):
    _assert_same_dataset(digits, load_dataset("digits"))


def test_mean_and_std_are_per_channel_floats_of_the_train_split(digits):
    assert len(digits.mean) == len(digits.std) == 1
    assert all(isinstance(v, float) for v in digits.mean + digits.std)
    pixels = digits.train.images.double() / 255
    assert digits.mean[0] == pytest.approx(pixels.mean().item(), abs=1e-4)
    assert digits.std[0] == pytest.approx(pixels.std().item(), abs=1e-4)


def test_load_split_returns_the_split_the_spec_names_or_the_default(digits):
    ds, split = load_split("digits:test")
    assert torch.equal(split.images, digits.test.images) and torch.equal(split.labels, digits.test.labels)
    ds, split = load_split("digits")
    assert torch.equal(split.labels, digits.train.labels)
    ds, split = load_split("digits", default_split="test")
    assert torch.equal(split.labels, digits.test.labels)
    with pytest.raises(DataError, match="val"):
        ds.split("val")


# ---------------------------------------------------------------- ImageFolder: zip and directory

@pytest.mark.parametrize("prefix", ["", "mydata/"])
def test_a_zip_image_folder_sorts_classes_and_labels_each_image_by_its_folder(tmp_path, prefix):
    colours = _colours(prefix=prefix)
    ds = load_dataset(str(_write_zip(tmp_path / "tiny.zip", _files(colours))))
    assert ds.classes == ["bird", "cat", "dog"]
    assert ds.name == "tiny.zip"
    assert ds.train.images.shape == (12, 3, 8, 8) and ds.test.images.shape == (6, 3, 8, 8)
    assert ds.train.images.dtype == torch.uint8 and ds.color_mode == "RGB"
    for split, n in (("train", 4), ("test", 2)):
        want, folders = _expected(colours, split, prefix)
        got = ds.split(split)
        assert [ds.classes[i] for i in got.labels.tolist()] == folders
        assert torch.bincount(got.labels).tolist() == [n, n, n]
        # PNG is lossless: each solid colour comes back exactly, in every pixel.
        assert torch.equal(got.images, torch.from_numpy(want)[:, :, None, None].expand(-1, -1, 8, 8))


def test_a_directory_image_folder_loads_the_same_as_the_zip_of_it(tmp_path):
    files = _files(_colours())
    from_zip = load_dataset(str(_write_zip(tmp_path / "tiny.zip", files)))
    from_dir = load_dataset(str(_write_dir(tmp_path / "tiny", files)))
    _assert_same_dataset(from_zip, from_dir)


def test_hidden_files_macos_metadata_and_non_images_are_ignored(tmp_path):
    colours = _colours()
    files = _files(colours) | {
        "__MACOSX/train/cat/._00.png": b"resource fork, not a png",
        "train/cat/._01.png": b"resource fork, not a png",
        "train/cat/notes.txt": b"not an image",
        "train/readme.png": _encode((1, 2, 3)),  # no class folder
    }
    ds = load_dataset(str(_write_zip(tmp_path / "tiny.zip", files)))
    assert ds.classes == ["bird", "cat", "dog"]
    assert len(ds.train.labels) == 12 and len(ds.test.labels) == 6


def test_jpeg_images_decode_close_to_their_colour(tmp_path):
    colours = _colours(ext="jpg")
    ds = load_dataset(str(_write_zip(tmp_path / "tiny.zip", _files(colours, fmt="JPEG"))))
    want, _ = _expected(colours, "train")
    diff = (ds.train.images.int() - torch.from_numpy(want).int()[:, :, None, None]).abs()
    assert diff.max() <= 4


def test_grayscale_images_give_one_channel_and_later_colour_images_are_converted(tmp_path):
    files = {
        "train/a/0.png": _encode(17, mode="L"),
        "train/a/1.png": _encode(200, mode="L"),
        "train/b/0.png": _encode((90, 90, 90)),  # an RGB grey in a grayscale set
        "test/a/0.png": _encode(33, mode="L"),
        "test/b/0.png": _encode(250, mode="L"),
    }
    ds = load_dataset(str(_write_zip(tmp_path / "gray.zip", files)))
    assert ds.train.images.shape == (3, 1, 8, 8) and ds.test.images.shape == (2, 1, 8, 8)
    assert (ds.in_channels, ds.color_mode) == (1, "L")
    assert ds.train.images[:, 0, 0, 0].tolist() == [17, 200, 90]
    assert ds.test.images[:, 0, 0, 0].tolist() == [33, 250]
    assert len(ds.mean) == len(ds.std) == 1


def test_images_of_other_sizes_are_resized_to_the_first_images_size(tmp_path):
    files = {
        "train/a/0.png": _encode((10, 20, 30), size=(8, 6)),  # the first: sets width 8, height 6
        "train/a/1.png": _encode((40, 50, 60), size=(16, 12)),
        "train/b/0.png": _encode((70, 80, 90), size=(5, 5)),
        "test/a/0.png": _encode((100, 110, 120), size=(32, 32)),
        "test/b/0.png": _encode((130, 140, 150), size=(8, 6)),
    }
    ds = load_dataset(str(_write_zip(tmp_path / "sizes.zip", files)))
    assert ds.train.images.shape == (3, 3, 6, 8) and ds.test.images.shape == (2, 3, 6, 8)
    # A solid colour stays that colour through the bilinear resize.
    colours = [(10, 20, 30), (40, 50, 60), (70, 80, 90)]
    assert torch.equal(ds.train.images, torch.tensor(colours, dtype=torch.uint8)[:, :, None, None].expand(-1, -1, 6, 8))


@pytest.mark.parametrize("bad", ["train/bird/00.png", "train/dog/03.png", "test/cat/01.png"])
def test_a_corrupt_image_raises_a_data_error_naming_the_file(tmp_path, bad):
    files = _files(_colours())
    files[bad] = b"\x89PNG but not really"
    with pytest.raises(DataError, match=f"cannot decode image {bad}"):
        load_dataset(str(_write_zip(tmp_path / "tiny.zip", files)))


def test_a_zip_without_train_and_test_folders_raises_a_data_error(tmp_path):
    files = {f"images/{c}/{i}.png": _encode((i, i, i)) for c in ("a", "b") for i in range(2)}
    with pytest.raises(DataError, match=r"train/<class>/ and test/<class>/.*found 0 train, 0 test"):
        load_dataset(str(_write_zip(tmp_path / "flat.zip", files)))


def test_a_zip_with_train_but_no_test_raises_a_data_error(tmp_path):
    files = _files({n: c for n, c in _colours().items() if n.startswith("train/")})
    with pytest.raises(DataError, match="found 12 train, 0 test"):
        load_dataset(str(_write_zip(tmp_path / "notest.zip", files)))


@pytest.mark.parametrize("missing", ["missing.zip", "missing_dir/"])
def test_a_missing_path_raises_a_data_error(tmp_path, missing):
    path = str(tmp_path / missing)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(path)
    with pytest.raises(DataError, match="does not exist"):
        load_split(path + ":test")


def test_a_file_that_is_not_a_zip_raises_a_data_error(tmp_path):
    path = tmp_path / "fake.zip"
    path.write_bytes(b"plain text")
    with pytest.raises(DataError, match="neither a directory nor a zip"):
        load_dataset(str(path))


def test_a_test_class_absent_from_train_raises_a_data_error(tmp_path):
    files = _files(_colours()) | {"test/horse/00.png": _encode((1, 2, 3))}
    with pytest.raises(DataError, match=r"test classes \['horse'\] have no training images"):
        load_dataset(str(_write_zip(tmp_path / "tiny.zip", files)))


# ---------------------------------------------------------------- the .npz cache

def test_a_cached_load_writes_one_npz_and_loads_equal_tensors_again(tmp_path):
    path = str(_write_zip(tmp_path / "tiny.zip", _files(_colours())))
    cache = tmp_path / "cache"
    first = load_dataset(path, cache_dir=cache)
    written = sorted(p.name for p in cache.iterdir())
    assert len(written) == 1 and written[0].startswith("tiny-") and written[0].endswith(".npz")
    assert ".tmp" not in written[0]
    second = load_dataset(path, cache_dir=cache)
    _assert_same_dataset(first, second)
    _assert_same_dataset(first, load_dataset(path))  # the uncached decode agrees with the cache
    assert sorted(p.name for p in cache.iterdir()) == written


def test_a_second_load_reads_its_arrays_from_the_npz(tmp_path):
    path = str(_write_zip(tmp_path / "tiny.zip", _files(_colours())))
    cache = tmp_path / "cache"
    first = load_dataset(path, cache_dir=cache)
    (npz,) = cache.glob("*.npz")
    # Rewrite the cache with inverted train images: the next load must return exactly these.
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["train_x"] = 255 - arrays["train_x"]
    np.savez(npz, **arrays)
    second = load_dataset(path, cache_dir=cache)
    assert torch.equal(second.train.images, 255 - first.train.images)
    assert torch.equal(second.test.images, first.test.images)
    assert second.classes == first.classes


def test_changing_the_zip_writes_a_new_cache_file(tmp_path):
    colours = _colours()
    zpath = _write_zip(tmp_path / "tiny.zip", _files(colours))
    cache = tmp_path / "cache"
    load_dataset(str(zpath), cache_dir=cache)
    old = {p.name for p in cache.glob("*.npz")}
    colours["train/cat/99.png"] = (1, 2, 3)
    _write_zip(zpath, _files(colours))
    st = zpath.stat()
    os.utime(zpath, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = load_dataset(str(zpath), cache_dir=cache)
    new = {p.name for p in cache.glob("*.npz")}
    assert len(new) == 2 and old < new
    assert len(changed.train.labels) == 13


def test_digits_caches_and_reloads_equal_tensors(tmp_path, digits):
    first = load_dataset("digits", cache_dir=tmp_path)
    assert [p.name.split("-")[0] for p in tmp_path.glob("*.npz")] == ["digits"]
    _assert_same_dataset(first, digits)
    _assert_same_dataset(load_dataset("digits", cache_dir=tmp_path), digits)


# ---------------------------------------------------------------- limit_train and balanced_subset

def test_limit_train_takes_an_equal_number_from_each_class(digits):
    small = digits.limit_train(50)
    assert torch.bincount(small.train.labels, minlength=10).tolist() == [5] * 10
    assert small.train.images.shape == (50, 1, 8, 8)
    uneven = digits.limit_train(53)
    assert sorted(torch.bincount(uneven.train.labels, minlength=10).tolist()) == [5] * 7 + [6] * 3


def test_limit_train_keeps_images_and_labels_aligned(digits):
    small = digits.limit_train(50, seed=3)
    idx = balanced_subset(digits.train.labels, 50, seed=3)
    assert torch.equal(small.train.images, digits.train.images[idx])
    assert torch.equal(small.train.labels, digits.train.labels[idx])


def test_limit_train_with_the_same_seed_picks_the_same_subset(digits):
    a, b = digits.limit_train(50, seed=7), digits.limit_train(50, seed=7)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.train.labels, b.train.labels)


def test_limit_train_with_a_different_seed_picks_a_different_subset(digits):
    a = balanced_subset(digits.train.labels, 50, seed=0)
    b = balanced_subset(digits.train.labels, 50, seed=1)
    assert not torch.equal(a, b)
    assert not torch.equal(digits.limit_train(50, seed=0).train.images, digits.limit_train(50, seed=1).train.images)


def test_limit_train_below_the_number_of_classes_raises_a_data_error(digits):
    with pytest.raises(DataError, match="smaller than the number of classes"):
        digits.limit_train(9)


def test_limit_train_leaves_the_test_split_and_statistics_alone(digits):
    small = digits.limit_train(50)
    assert small.test is digits.test
    assert (small.classes, small.mean, small.std) == (digits.classes, digits.mean, digits.std)


def test_limit_train_of_none_or_at_least_the_whole_set_returns_it_unchanged(digits):
    assert digits.limit_train(None) is digits
    assert digits.limit_train(1437) is digits
    assert digits.limit_train(10**6) is digits


def test_balanced_subset_gives_a_small_class_all_it_has_and_the_rest_to_the_others():
    labels = torch.tensor([0] * 2 + [1] * 20 + [2] * 20)
    idx = balanced_subset(labels, 12, seed=0)
    assert len(idx) == 12 and len(idx.unique()) == 12
    assert torch.equal(idx, idx.sort().values)
    assert torch.bincount(labels[idx]).tolist() == [2, 5, 5]


# ---------------------------------------------------------------- DeviceLoader and batch_crop_flip

N, C, H, W = 70, 3, 6, 6


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (N, C, H, W), dtype=torch.uint8, generator=g)


@pytest.fixture(scope="module")
def targets():
    return torch.arange(N) * 7 % 10


def _batches(loader, epoch=0):
    return list(loader.epoch(epoch))


def _transforms(img: torch.Tensor, pad: int, flip: bool):
    """Every (dy, dx, flipped) candidate output of crop+flip for one uint8 image, as float [0,1]."""
    padded = F.pad(img, (pad, pad, pad, pad))
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy:dy + img.shape[1], dx:dx + img.shape[2]]
            for flipped in ((False, True) if flip else (False,)):
                yield (dy - pad, dx - pad, flipped), (crop.flip(-1) if flipped else crop).float() / 255


def _which_transform(out: torch.Tensor, img: torch.Tensor, pad: int, flip: bool):
    found = [t for t, cand in _transforms(img, pad, flip) if torch.equal(out, cand)]
    assert len(found) == 1, f"expected exactly one matching crop/flip, found {found}"
    return found[0]


def test_the_same_seed_and_epoch_give_identical_batches(images, targets):
    def run():
        loader = DeviceLoader(images, targets, 16, pair=images.flip(0), crop_pad=2, flip=True, seed=5)
        return _batches(loader, epoch=3)
    for a, b in zip(run(), run(), strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.x, b.x)
        assert torch.equal(a.y, b.y) and torch.equal(a.pair, b.pair)


def test_iterating_the_loader_gives_epoch_zero(images, targets):
    loader = DeviceLoader(images, targets, 16, crop_pad=1, flip=True, seed=2)
    for a, b in zip(loader, loader.epoch(0), strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.x, b.x)


def test_a_different_epoch_or_seed_gives_a_different_order(images, targets):
    order = lambda seed, epoch: torch.cat([b.index for b in DeviceLoader(images, targets, 16, seed=seed)  # noqa: E731
                                           .epoch(epoch)])
    assert not torch.equal(order(0, 0), order(0, 1))
    assert not torch.equal(order(0, 0), order(1, 0))


def test_every_index_appears_exactly_once_per_epoch_with_a_short_last_batch(images, targets):
    loader = DeviceLoader(images, targets, 16, crop_pad=1, flip=True)
    assert len(loader) == 5
    batches = _batches(loader, epoch=2)
    assert [len(b.index) for b in batches] == [16, 16, 16, 16, 6]
    assert [b.x.shape for b in batches][-1] == (6, C, H, W)
    assert torch.equal(torch.cat([b.index for b in batches]).sort().values, torch.arange(N))


def test_drop_last_leaves_out_the_short_batch(images, targets):
    loader = DeviceLoader(images, targets, 16, drop_last=True)
    assert len(loader) == 4
    batches = _batches(loader)
    assert [len(b.index) for b in batches] == [16] * 4
    assert len(torch.cat([b.index for b in batches]).unique()) == 64


def test_without_shuffle_batches_come_in_order(images, targets):
    batches = _batches(DeviceLoader(images, targets, 32, shuffle=False))
    assert torch.equal(torch.cat([b.index for b in batches]), torch.arange(N))


def test_labels_stay_aligned_with_the_index(images, targets):
    soft = torch.softmax(torch.randn(N, 10, generator=torch.Generator().manual_seed(1)), dim=1)
    for y in (targets, soft):
        for b in DeviceLoader(images, y, 16, crop_pad=2, flip=True, seed=1).epoch(4):
            assert torch.equal(b.y, y[b.index])


def test_without_crop_or_flip_batches_are_the_images_as_float_in_0_1(images, targets):
    for b in DeviceLoader(images, targets, 16, seed=3).epoch(1):
        assert b.x.dtype == torch.float32 and b.pair is None
        assert torch.equal(b.x, images[b.index].float() / 255)


def test_a_crop_shifts_each_image_within_the_padding(images, targets):
    pad = 2
    shifts = set()
    for b in DeviceLoader(images, targets, 16, crop_pad=pad, seed=4).epoch(0):
        assert b.x.shape[1:] == (C, H, W)
        for out, i in zip(b.x, b.index):
            dy, dx, _ = _which_transform(out, images[i], pad, flip=False)
            shifts.add((dy, dx))
    assert len(shifts) > 5 and any(s != (0, 0) for s in shifts)


def test_a_flip_reverses_the_width_of_some_but_not_all_images():
    g = torch.Generator().manual_seed(9)
    imgs = torch.randint(0, 256, (64, C, H, W), dtype=torch.uint8, generator=g)
    (b,) = DeviceLoader(imgs, torch.zeros(64, dtype=torch.int64), 64, flip=True, seed=6).epoch(0)
    flipped = []
    for out, i in zip(b.x, b.index):
        _, _, f = _which_transform(out, imgs[i], 0, flip=True)
        flipped.append(f)
    assert 0 < sum(flipped) < 64


def test_the_pair_gets_the_same_crop_and_flip_as_the_images(images, targets):
    g = torch.Generator().manual_seed(2)
    other = torch.randint(0, 256, images.shape, dtype=torch.uint8, generator=g)
    pad, seen = 2, set()
    for b in DeviceLoader(images, targets, 16, pair=other, crop_pad=pad, flip=True, seed=8).epoch(0):
        for out, pair_out, i in zip(b.x, b.pair, b.index):
            t = _which_transform(out, images[i], pad, flip=True)
            assert _which_transform(pair_out, other[i], pad, flip=True) == t
            seen.add(t)
    assert len(seen) > 5 and any(flipped for _, _, flipped in seen)


def test_a_float16_copy_as_pair_matches_the_augmented_images(images, targets):
    pair = images.half() / 255
    for b in DeviceLoader(images, targets, 16, pair=pair, crop_pad=2, flip=True, seed=11).epoch(2):
        assert b.pair.dtype == torch.float32
        # float16 holds k/255 to within 0.07/255, so scaled back the pixel values are the same integers.
        assert torch.equal(torch.round(b.pair * 255), torch.round(b.x * 255))
        assert torch.allclose(b.pair, b.x, atol=3e-4, rtol=0)


def test_batch_crop_flip_without_pad_or_flip_returns_the_tensors_unchanged(images):
    out = batch_crop_flip([images, images.float()], 0, False, torch.Generator().manual_seed(0))
    assert torch.equal(out[0], images) and torch.equal(out[1], images.float())


def test_the_loader_rejects_misaligned_targets_or_pair(images, targets):
    with pytest.raises(ValueError, match="aligned"):
        DeviceLoader(images, targets[:-1], 16)
    with pytest.raises(ValueError, match="aligned"):
        DeviceLoader(images, targets, 16, pair=images[:, :1])


# ---------------------------------------------------------------- the real CIFAR-10 (JPEG) zip

def test_the_cifar10_jpeg_zip_loads_50000_train_and_10000_test_images_in_cifar_order(tmp_path):
    if not CIFAR_ZIP.exists():
        pytest.skip("../shared/data/cifar10-jpeg.zip not found: the real CIFAR-10 check needs it")
    ds, test = load_split(f"{CIFAR_ZIP}:test", cache_dir=tmp_path)
    assert ds.name == "cifar10-jpeg.zip"
    assert ds.classes == CIFAR_CLASSES
    assert ds.train.images.shape == (50000, 3, 32, 32) and ds.train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 3, 32, 32)
    assert torch.bincount(ds.train.labels, minlength=10).tolist() == [5000] * 10
    assert torch.bincount(test.labels, minlength=10).tolist() == [1000] * 10
    assert len(ds.mean) == len(ds.std) == 3
    # CIFAR-10's well-known channel statistics, to within the JPEG step.
    assert ds.mean == pytest.approx((0.4914, 0.4822, 0.4465), abs=0.01)
    assert ds.std == pytest.approx((0.2470, 0.2435, 0.2616), abs=0.01)
    assert len(list(tmp_path.glob("cifar10-jpeg-*.npz"))) == 1


def test_batches_have_one_memory_layout_whatever_strides_the_images_came_with():
    # numpy can hand over a size-1 channel axis with stride 1; it still counts as contiguous, but a convolution may
    # read it as channels-last and round differently: cached and fresh loads then trained to different weights.
    odd = torch.from_numpy(np.arange(4 * 64, dtype=np.uint8).reshape(4, 8, 8)[:, None][[0, 1, 2, 3]])
    assert odd.stride() != (64, 64, 8, 1)
    same = odd.clone(memory_format=torch.contiguous_format)
    for pad in (0, 1):
        a = next(DeviceLoader(odd, torch.arange(4), 4, crop_pad=pad, seed=1).epoch(0)).x
        b = next(DeviceLoader(same, torch.arange(4), 4, crop_pad=pad, seed=1).epoch(0)).x
        assert torch.equal(a, b) and a.stride() == b.stride() == (64, 64, 8, 1)


def test_held_out_is_exactly_what_limit_train_leaves_out(digits):
    kept, rest = digits.limit_train(500, seed=4), digits.held_out(500, seed=4)
    assert len(rest.labels) == len(digits.train.labels) - 500
    # Together they are the training split, each image once.
    kept_idx = set(balanced_subset(digits.train.labels, 500, seed=4).tolist())
    others = torch.tensor([i for i in range(len(digits.train.labels)) if i not in kept_idx])
    assert torch.equal(rest.images, digits.train.images[others]) and torch.equal(kept.train.images,
                                                                                  digits.train.images[sorted(kept_idx)])
    assert sorted(torch.cat([kept.train.labels, rest.labels]).tolist()) == sorted(digits.train.labels.tolist())
    assert len(digits.held_out(None).labels) == 0 and len(digits.held_out(10**6).labels) == 0


def test_limit_test_is_balanced_and_the_same_whatever_the_training_seed(digits):
    a = digits.limit_train(500, seed=1).limit_test(100)
    b = digits.limit_train(500, seed=2).limit_test(100)
    assert torch.equal(a.test.images, b.test.images)
    assert torch.bincount(a.test.labels, minlength=10).tolist() == [10] * 10
    assert digits.limit_test(None) is digits
    with pytest.raises(DataError, match="--limit-test 5"):
        digits.limit_test(5)
