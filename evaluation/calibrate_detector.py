"""Calibrate an extraction detector on benign traffic: the `knn` threshold is the 0.1st percentile of its score
over benign users' streams, so that a benign key's score falls below it about once in a thousand checks.

    python -m evaluation.calibrate_detector --model runs/digits-ast/model.onnx --dataset digits:train \\
        [--keys 5 --queries 2000] [--env-file deploy/detection.env]

A benign stream is what a user of the model would send: the split's images one at a time in a random order, a new
random crop on every repeat (a split smaller than the stream is cycled; a real user does not send the same photo
twice). It prints the setting (`ASTGUARD_DETECTOR_THRESHOLD=...`) and, with --env-file, appends it there.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from astguard.card import CardError, verified_card
from astguard.cli import Parser, add_options, from_args, option
from service.detection import bind_detector
from service.runtime import OnnxModel
from training.data import DataError, Split, batch_crop_flip, convert_images, load_split

PERCENTILE = 0.1


def benign_stream(split: Split, n: int, *, channels: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    """uint8 [n, C, H, W]: the split's images in a random order, cycled, every repeat a fresh random crop."""
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(split.labels), generator=g) for _ in range(-(-n // len(split.labels)))])[:n]
    images = convert_images(split.images[order], channels, size)
    repeat = torch.arange(n) >= len(split.labels)
    if repeat.any():
        (cropped,) = batch_crop_flip([images], max(1, size[0] // 8), False, g)
        images = torch.where(repeat[:, None, None, None], cropped, images)
    return images


def knn_scores(stream: np.ndarray, labels: np.ndarray, **params) -> np.ndarray:
    """Every score the knn detector gives a key sending `stream` one image at a time (float32 [n, D] in [0,1])."""
    detect, _ = bind_detector("knn", **{"k": 50, "window": 50, "buffer": 1000, **params, "threshold": 0.0})
    state, scores = {}, []
    for i in range(len(stream)):
        state, verdict = detect(state, stream[i:i + 1], labels[i:i + 1])
        if verdict.score is not None:
            scores.append(verdict.score)
    return np.asarray(scores)


@dataclass(frozen=True)
class CalibrateConfig:
    model: Path = option(help="the served ONNX model (its card gives the input shape)")
    dataset: str = option("digits:train", "benign images: a data set spec (keep the test split for measuring the false "
                                          "positives)")
    keys: int = option(5, "benign users simulated")
    queries: int = option(2000, "queries per benign user")
    k: int = option(50, "knn: K")
    window: int = option(50, "knn: window")
    buffer: int = option(1000, "knn: buffer")
    seed: int = option(0, "seed of the streams")
    data_root: str = option("data", "where cifar10/cifar100 live")
    env_file: Path | None = option(None, "append ASTGUARD_DETECTOR_THRESHOLD=... here")


def calibrate(cfg: CalibrateConfig) -> dict:
    card = verified_card(cfg.model)
    model = OnnxModel(cfg.model, device="cpu")
    _, split = load_split(cfg.dataset, cfg.data_root, Path(cfg.model).parent / ".cache" / "data",
                          default_split="test")
    c, h, w = card.input.channels, card.input.height, card.input.width
    scores = []
    for key in range(cfg.keys):
        stream = benign_stream(split, cfg.queries, channels=c, size=(h, w), seed=cfg.seed * 1000 + key)
        x = stream.float().div(255).numpy()
        labels = model.predict(x)[0].argmax(1)
        scores.append(knn_scores(x.reshape(len(x), -1), labels, k=cfg.k, window=cfg.window, buffer=cfg.buffer))
    every = np.concatenate(scores)
    threshold = float(np.percentile(every, PERCENTILE))
    return {"threshold": threshold, "scores": len(every), "keys": cfg.keys, "median": float(np.median(every))}


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m evaluation.calibrate_detector", description=__doc__.split("\n\n")[0])
    add_options(p, CalibrateConfig)
    cfg = from_args(CalibrateConfig, p.parse_args(argv))
    try:
        result = calibrate(cfg)
    except (CardError, DataError, ValueError) as e:
        print(f"calibrate_detector: error: {e}", file=sys.stderr)
        return 2
    line = f"ASTGUARD_DETECTOR_THRESHOLD={result['threshold']:.6g}"
    print(f"# knn: the {PERCENTILE}th percentile of {result['scores']} benign scores ({result['keys']} keys; median "
          f"{result['median']:.4g})\n{line}")
    if cfg.env_file:
        with open(cfg.env_file, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
