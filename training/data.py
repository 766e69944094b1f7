"""Data sets as uint8 tensors, and a device-resident batch loader.

A data set spec is `NAME` or `NAME:SPLIT` (split `train` or `test`). NAME is `digits` (scikit-learn's
load_digits, embedded), `cifar10` / `cifar100` (torchvision's format under a data root), or the path of an
ImageFolder tree, a directory or a .zip holding `train/<class>/*` and `test/<class>/*`.
Every source decodes once into uint8 arrays cached as .npz, so a second run starts in seconds.
"""
from __future__ import annotations

import hashlib
import io
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from training.distributed import share
from training.files import savez_atomic

SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
NAMED = ("digits", "cifar10", "cifar100")
CACHE_VERSION = 1


class DataError(ValueError):
    """A data set that cannot be found, read or parsed; the message names the problem."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    split: str | None = None

    def __str__(self) -> str:
        return f"{self.name}:{self.split}" if self.split else self.name


def parse_spec(spec: str, default_split: str | None = None) -> DatasetSpec:
    """`digits`, `cifar10:test`, `../shared/data/cifar10-jpeg.zip:train` -> DatasetSpec."""
    spec = spec.strip()
    if not spec:
        raise DataError("empty data set spec; use NAME or NAME:SPLIT, e.g. digits:train")
    name, sep, split = spec.rpartition(":")
    if not sep or "/" in split or "\\" in split:
        name, split = spec, default_split
    elif split not in SPLITS:
        raise DataError(f"unknown split {split!r} in {spec!r}; use one of {', '.join(SPLITS)}")
    if name not in NAMED and not _looks_like_path(name):
        raise DataError(f"unknown data set {name!r}: use one of {', '.join(NAMED)} "
                        "or the path of an ImageFolder directory or .zip")
    return DatasetSpec(name, split)


def _looks_like_path(name: str) -> bool:
    return os.sep in name or "/" in name or name.endswith(".zip") or os.path.exists(name)


class Split(NamedTuple):
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    classes: list[str]
    mean: tuple[float, ...]  # per channel, of the train split in [0,1]; the model normalises with these
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> int:
        h, w = self.train.images.shape[2:]
        if h != w:
            raise DataError(f"{self.name}: images are {h}x{w}; the models take square images, resize them first")
        return h

    @property
    def color_mode(self) -> str:
        return "L" if self.in_channels == 1 else "RGB"

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")
        return getattr(self, name)

    def limit_train(self, n: int | None, seed: int = 0) -> "Dataset":
        """A class-balanced subset of n training images (same seed, same subset); test is kept whole."""
        if n is None or n >= len(self.train.labels):
            return self
        if n < self.num_classes:
            raise DataError(f"--limit-train {n} is smaller than the number of classes ({self.num_classes})")
        idx = balanced_subset(self.train.labels, n, seed)
        return Dataset(self.name, Split(self.train.images[idx], self.train.labels[idx]), self.test,
                       self.classes, self.mean, self.std)

    def held_out(self, n: int | None, seed: int = 0) -> Split:
        """The training images that limit_train(n, seed) leaves out, in order (empty when it keeps them all)."""
        keep = torch.zeros(len(self.train.labels), dtype=torch.bool)
        if n is None or n >= len(keep):
            keep[:] = True
        else:
            keep[balanced_subset(self.train.labels, n, seed)] = True
        return Split(self.train.images[~keep], self.train.labels[~keep])

    def limit_test(self, n: int | None) -> "Dataset":
        """Evaluate on a class-balanced subset of n test images: the same subset whatever the training seed."""
        if n is None or n >= len(self.test.labels):
            return self
        if n < self.num_classes:
            raise DataError(f"--limit-test {n} is smaller than the number of classes ({self.num_classes})")
        idx = balanced_subset(self.test.labels, n, 0)
        return Dataset(self.name, self.train, Split(self.test.images[idx], self.test.labels[idx]),
                       self.classes, self.mean, self.std)


def balanced_subset(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Indices of n items, as equal per class as the classes allow, in ascending order."""
    g = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    per_class = [torch.nonzero(labels == c).flatten() for c in classes]
    per_class = [ix[torch.randperm(len(ix), generator=g)] for ix in per_class]
    quota = [n // len(classes) + (1 if i < n % len(classes) else 0) for i in range(len(classes))]
    # Classes smaller than their quota hand the rest to the others, round-robin.
    taken = [min(q, len(ix)) for q, ix in zip(quota, per_class)]
    spare = n - sum(taken)
    while spare > 0:
        grew = False
        for i, ix in enumerate(per_class):
            if spare and taken[i] < len(ix):
                taken[i] += 1
                spare -= 1
                grew = True
        if not grew:
            break
    return torch.cat([ix[:t] for ix, t in zip(per_class, taken)]).sort().values


# ---------------------------------------------------------------- sources: each returns numpy arrays

def _load_digits(_: Path) -> tuple:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    # load_digits holds 0..16 intensities; scale to uint8 so every source speaks the same pixel format.
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 1, 8, 8)
    labels = d.target.astype(np.int64)
    tr, te = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0)
    tr, te = np.sort(tr), np.sort(te)
    return images[tr], labels[tr], images[te], labels[te], [str(c) for c in d.target_names]


def _load_cifar(num_classes: int):
    def load(root: Path) -> tuple:
        import torchvision

        cls = torchvision.datasets.CIFAR10 if num_classes == 10 else torchvision.datasets.CIFAR100
        out = []
        for train in (True, False):
            try:
                ds = cls(str(root), train=train, download=False)
            except RuntimeError:
                try:
                    ds = cls(str(root), train=train, download=True)
                except Exception as e:  # no network, proxy refusal, partial file...
                    raise DataError(
                        f"CIFAR-{num_classes} is not under {root} and could not be downloaded ({type(e).__name__}: "
                        f"{e}). Put torchvision's extracted CIFAR-{num_classes} folder there (--data-root), "
                        "or give an ImageFolder zip such as ../shared/data/cifar10-jpeg.zip") from None
            out += [np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)), np.asarray(ds.targets, dtype=np.int64)]
        return (*out, list(ds.classes))

    return load


def _load_image_folder(path: Path) -> tuple:
    """ImageFolder layout in a directory or zip: [prefix/]train/<class>/<file>, [prefix/]test/<class>/<file>."""
    if not path.exists():
        raise DataError(f"data set {str(path)!r} does not exist")
    if path.is_file() and not zipfile.is_zipfile(path):
        raise DataError(f"{path} is neither a directory nor a zip file")
    entries: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    if path.is_dir():
        names = [p.relative_to(path).as_posix() for p in sorted(path.rglob("*")) if p.is_file()]
        read = lambda n: (path / n).read_bytes()  # noqa: E731
    else:
        zf = zipfile.ZipFile(path)
        names = sorted(i.filename for i in zf.infolist() if not i.is_dir())
        read = zf.read
    for n in names:
        parts = n.split("/")
        if len(parts) < 3 or parts[-3] not in SPLITS or any(p.startswith((".", "__MACOSX")) for p in parts):
            continue
        if n.lower().endswith(IMAGE_EXTENSIONS):
            entries[parts[-3]].append((n, parts[-2]))
    if not entries["train"] or not entries["test"]:
        raise DataError(f"no images in {path} under train/<class>/ and test/<class>/ "
                        f"(found {len(entries['train'])} train, {len(entries['test'])} test)")
    classes = sorted({c for _, c in entries["train"]})
    unknown = sorted({c for _, c in entries["test"]} - set(classes))
    if unknown:
        raise DataError(f"{path}: test classes {unknown} have no training images")
    index = {c: i for i, c in enumerate(classes)}

    first = _decode(read(entries["train"][0][0]), entries["train"][0][0], None, None)
    mode, size = first.mode, first.size
    out = []
    for split in SPLITS:
        blobs = [(read(n), n) for n, _ in entries[split]]  # sequential reads: a ZipFile handle is not thread-safe
        # Pillow releases the GIL while decoding, so threads use every core.
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            imgs = list(pool.map(lambda b: np.asarray(_decode(b[0], b[1], mode, size)), blobs))
        arr = np.stack(imgs)
        arr = arr.reshape(len(arr), 1, *arr.shape[1:]) if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)
        out += [np.ascontiguousarray(arr), np.asarray([index[c] for _, c in entries[split]], dtype=np.int64)]
    return (*out, classes)


def _decode(blob: bytes, name: str, mode: str | None, size: tuple[int, int] | None):
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(blob))
        img.load()
    except Exception as e:
        raise DataError(f"cannot decode image {name}: {e}") from None
    if mode is None:  # the first image sets the colour mode of the whole set
        return img.convert("L" if img.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB")
    img = img.convert(mode)
    return img if img.size == size else img.resize(size, Image.BILINEAR)


_SOURCES = {"digits": _load_digits, "cifar10": _load_cifar(10), "cifar100": _load_cifar(100)}


# ---------------------------------------------------------------- loading with a cache

def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0,1] of uint8 images, from 256-bin histograms: exact, and about 30x
    faster than a float copy of the data (0.3 s instead of 10 s on CIFAR-10's training set)."""
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1).long(), minlength=256).double()
        n = counts.sum()
        mean = (counts * values).sum() / n
        var = (counts * (values - mean) ** 2).sum() / (n - 1)
        means.append(round(mean.item(), 4))
        stds.append(round(max(var.sqrt().item(), 1e-3), 4))
    return tuple(means), tuple(stds)


def _cache_key(name: str, data_root: Path) -> str:
    if name in _SOURCES:
        where = "" if name == "digits" else str(data_root.resolve())
        return f"{name}-{hashlib.sha1(where.encode()).hexdigest()[:10]}"
    p = Path(name).resolve()
    # A directory's own mtime does not change when a file deep inside it does: stamp every file.
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    stamp = "|".join(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files) + f"|{CACHE_VERSION}"
    return f"{p.stem}-{hashlib.sha1(stamp.encode()).hexdigest()[:10]}"


def load_dataset(name: str, data_root: str | Path = "data", cache_dir: str | Path | None = None) -> Dataset:
    """Both splits of a data set by name (a spec's split part is ignored here: see parse_spec)."""
    name = parse_spec(name).name
    data_root = Path(data_root)
    if name not in _SOURCES and not Path(name).exists():
        raise DataError(f"data set {name!r} does not exist")
    cache = Path(cache_dir) / f"{_cache_key(name, data_root)}.npz" if cache_dir else None
    if cache is not None and cache.exists():
        z = np.load(cache, allow_pickle=False)
        arrays = (z["train_x"], z["train_y"], z["test_x"], z["test_y"], [str(c) for c in z["classes"]])
    else:
        source = _SOURCES.get(name, _load_image_folder)
        arrays = source(data_root if name in _SOURCES else Path(name))
        if cache is not None:
            savez_atomic(cache, train_x=arrays[0], train_y=arrays[1], test_x=arrays[2], test_y=arrays[3],
                         classes=np.asarray(arrays[4]))
    train_x, train_y, test_x, test_y, classes = arrays
    x = torch.from_numpy(train_x)
    mean, std = channel_stats(x)
    label = name if name in _SOURCES else Path(name).name
    return Dataset(label, Split(x, torch.from_numpy(train_y)),
                   Split(torch.from_numpy(test_x), torch.from_numpy(test_y)), list(classes), mean, std)


def load_split(spec: str, data_root: str | Path = "data", cache_dir: str | Path | None = None,
               default_split: str = "train") -> tuple[Dataset, Split]:
    """The data set and the one split a spec names (`digits:test`), for the attacker and the evaluation."""
    s = parse_spec(spec, default_split)
    ds = load_dataset(s.name, data_root, cache_dir)
    return ds, ds.split(s.split or default_split)


def convert_images(images: torch.Tensor, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [N, C, H, W] -> another colour mode (grey: ITU-R 601 luma, as Pillow's "L") and size (bilinear), as
    the service converts what it is sent: a thief's queries, a teacher's out-of-distribution images."""
    x = images.float()
    if x.shape[1] != channels:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True) if channels == 1 \
            else x.expand(-1, 3, -1, -1)
    if tuple(x.shape[2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------- device-resident loader

class Batch(NamedTuple):
    x: torch.Tensor       # float32 [B, C, H, W] in [0,1], augmented
    y: torch.Tensor       # the aligned targets: int64 labels (or float soft labels)
    index: torch.Tensor   # positions in the loader's images, for checks and bookkeeping
    pair: torch.Tensor | None = None    # the paired images (e.g. adversarial), with the *same* crop and flip as x
    target: torch.Tensor | None = None  # other per-image targets (e.g. a teacher's probabilities), not augmented


def to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


class CropFlip(NamedTuple):
    """One batch's augmentation draws: crop offsets (or None) and the rows to flip, as CPU tensors."""
    dy: torch.Tensor | None
    dx: torch.Tensor | None
    flip: torch.Tensor | None  # bool per row

    def rows(self, keep: slice) -> "CropFlip":
        return CropFlip(*(t[keep] if t is not None else None for t in self))


def draw_crop_flip(b: int, pad: int, flip: bool, generator: torch.Generator) -> CropFlip:
    # Random numbers come from a CPU generator so the batches are the same on every device.
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator) if pad else None
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator) if pad else None
    return CropFlip(dy, dx, torch.rand(b, generator=generator) < 0.5 if flip else None)


def apply_crop_flip(tensors: list[torch.Tensor], pad: int, draws: CropFlip) -> list[torch.Tensor]:
    """Random crop after zero-padding by `pad`, and horizontal flip, as drawn: the same for every tensor."""
    b, c, h, w = tensors[0].shape
    device = tensors[0].device
    fresh = False
    if draws.dy is not None:
        dy, dx, bi = draws.dy.to(device), draws.dx.to(device), torch.arange(b, device=device)
        # unfold views every h x w window of the padded batch as [b, c, dy, dx, h, w]: picking one window per
        # image takes three length-b indices instead of four per-pixel index tensors (about 10x faster on CPU).
        tensors = [F.pad(t, (pad, pad, pad, pad)).unfold(2, h, 1).unfold(3, w, 1)[bi, :, dy, dx] for t in tensors]
        fresh = True
    if draws.flip is not None:
        chosen = torch.nonzero(draws.flip).flatten().to(device)
        tensors = [t if fresh else t.clone() for t in tensors]  # never write into the caller's tensors
        for t in tensors:
            # In place on the chosen images only: torch.where with a [b,1,1,1] mask is several times slower on CPU.
            t.index_copy_(0, chosen, t.index_select(0, chosen).flip(3))
    return tensors


def batch_crop_flip(tensors: list[torch.Tensor], pad: int, flip: bool, generator: torch.Generator
                    ) -> list[torch.Tensor]:
    """Random crop after zero-padding by `pad`, and random horizontal flip: one draw, applied to every tensor."""
    return apply_crop_flip(tensors, pad, draw_crop_flip(len(tensors[0]), pad, flip, generator))


def standard_layout(t: torch.Tensor | None) -> torch.Tensor | None:
    """The tensor with plain row-major strides. A size-1 channel axis lets two stride patterns both count as
    contiguous (e.g. (64, 1, 8, 1) and (64, 64, 8, 1)); the crop keeps the pattern it is given, and convolutions
    can read one of them as channels-last and round differently. One layout keeps runs bit-reproducible."""
    if t is None:
        return None
    standard, step = [], 1
    for size in reversed(t.shape):
        standard.append(step)
        step *= size
    return t if list(t.stride()) == standard[::-1] else t.clone(memory_format=torch.contiguous_format)


class DeviceLoader:
    """Shuffled, augmented batches from tensors that already live on the device: no workers, no copies per item.

    `pair` (e.g. the adversarial images) is indexed and augmented exactly like `images`, so each clean image
    meets its own adversarial image; `target` is indexed alike and left as it is. Batches depend only on
    (seed, epoch): a resumed run sees the same ones. With `shard=(rank, world)` each batch is this rank's
    contiguous share of the batch a single process would see, augmented alike (training.distributed).
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, batch_size: int, *,
                 pair: torch.Tensor | None = None, target: torch.Tensor | None = None, shuffle: bool = True,
                 crop_pad: int = 0, flip: bool = False, drop_last: bool = False, seed: int = 0,
                 shard: tuple[int, int] = (0, 1)):
        if (len(images) != len(targets) or (pair is not None and pair.shape != images.shape)
                or (target is not None and len(target) != len(images))):
            raise ValueError("images, targets, pair and target must be aligned")
        self.images, self.targets, self.pair, self.target = images, targets, standard_layout(pair), target
        self.images = standard_layout(images)
        self.batch_size, self.shuffle, self.crop_pad, self.flip = batch_size, shuffle, crop_pad, flip
        self.drop_last, self.seed = drop_last, seed
        self.rank, self.world = shard
        if not 0 <= self.rank < self.world:
            raise ValueError(f"shard {shard} is not (rank, world) with 0 <= rank < world")

    def __len__(self) -> int:
        n = len(self.images)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        n = len(self.images)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        order = order.to(self.images.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            draws = draw_crop_flip(len(idx), self.crop_pad, self.flip, g) if self.crop_pad or self.flip else None
            if self.world > 1:  # this rank's rows; the draws are made for the whole batch, so they line up
                keep = share(len(idx), self.rank, self.world)
                idx, draws = idx[keep], draws.rows(keep) if draws is not None else None
            xs = [self.images[idx]] + ([self.pair[idx]] if self.pair is not None else [])
            if draws is not None:
                xs = apply_crop_flip(xs, self.crop_pad, draws)
            yield Batch(to_float(xs[0]), self.targets[idx], idx, to_float(xs[1]) if len(xs) > 1 else None,
                        self.target[idx] if self.target is not None else None)

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)


def iterate_in_order(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Float [0,1] batches of `images` in order, for evaluation and attacks."""
    for i in range(0, len(images), batch_size):
        yield to_float(images[i:i + batch_size])
