"""Which images a thief sends: drawn from any data set it has (a spec or a split in hand), or noise, converted to
the victim's colour mode and input size as the server would convert them."""
from __future__ import annotations

from pathlib import Path

import torch

from training.data import Split, balanced_subset, batch_crop_flip, load_split
from training.data import convert_images as fit_to_victim  # the thief converts as the server would

NOISE = "noise"  # uniform random pixels: a thief with no data at all


def plan_queries(source: str | Split, budget: int, *, channels: int, size: tuple[int, int], seed: int,
                 augment: bool = False, flip: bool = False, balanced: bool = False, data_root: str = "data",
                 cache_dir: Path | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The images to send (uint8 [budget, C, H, W]) and their true labels when the source has them.

    `source` is a data set spec (`digits:train`, an ImageFolder zip...), NOISE, or a Split the thief holds.
    In random order; `balanced` takes a class-balanced subset instead when the source has at least `budget`
    images (the evaluation's held-out query sets). A source smaller than the budget is cycled; repeats are always
    augmented (a random crop, and flips with `flip`), so most repeats differ from the original (an unshifted
    crop, 1 in (2*pad+1)^2, does not); `augment` crops every image.
    """
    g = torch.Generator().manual_seed(seed)
    if isinstance(source, str) and source == NOISE:
        return torch.randint(0, 256, (budget, channels, *size), generator=g, dtype=torch.uint8), None
    split = source if isinstance(source, Split) else load_split(source, data_root, cache_dir, default_split="train")[1]
    n = len(split.labels)
    if balanced and budget <= n:
        order = balanced_subset(split.labels, budget, seed)
    else:
        order = torch.cat([torch.randperm(n, generator=g) for _ in range(-(-budget // n))])[:budget]
    images = fit_to_victim(split.images[order], channels, size)
    repeat = torch.arange(budget) >= n
    if augment or repeat.any():
        pad = max(1, size[0] // 8)
        (augmented,) = batch_crop_flip([images], pad, flip, g)
        images = torch.where((repeat | augment)[:, None, None, None], augmented, images)
    return images, split.labels[order]
