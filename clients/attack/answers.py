"""Buying a victim's answers: every answer is paid for, so each is kept on disk whatever happens, and a rerun asks
only for what is missing."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clients.attack.victim import Victim
from training.files import savez_atomic


@dataclass
class TransferSet:
    """The thief's queries and what the victim answered: what a student is distilled from."""
    images: torch.Tensor  # uint8 [B, C, H, W]: the plan
    labels: torch.Tensor | None  # true labels, when the thief knows them
    probs: np.ndarray  # float32 [B, classes]; NaN rows are unanswered
    meta: dict  # what the plan was made from (victim, data, budget, seed): a resume must match it

    @classmethod
    def planned(cls, images: torch.Tensor, labels: torch.Tensor | None, classes: int, meta: dict) -> "TransferSet":
        return cls(images, labels, np.full((len(images), classes), np.nan, np.float32), meta)

    @property
    def answered(self) -> np.ndarray:
        return ~np.isnan(self.probs).any(1)

    def bought(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(images, probabilities, labels or None) of the answered queries."""
        keep = torch.from_numpy(self.answered)
        labels = self.labels[keep] if self.labels is not None else None
        return self.images[keep], torch.from_numpy(self.probs[self.answered]), labels

    def save(self, path: Path) -> None:
        savez_atomic(path, images=self.images.numpy(), probs=self.probs,
                     labels=self.labels.numpy() if self.labels is not None else np.zeros(0, np.int64),
                     meta=np.asarray(json.dumps(self.meta)))

    @classmethod
    def load(cls, path: Path) -> "TransferSet":
        z = np.load(path, allow_pickle=False)
        labels = torch.from_numpy(z["labels"]) if len(z["labels"]) else None
        return cls(torch.from_numpy(z["images"]), labels, z["probs"], json.loads(str(z["meta"])))


async def buy(victim: Victim, transfer: TransferSet, path: Path, *, progress: bool = False) -> tuple[str, float]:
    """Ask the victim for the transfer set's unanswered queries; the set is saved to `path` whatever happens
    (a server that dies mid-way raises, with the answers so far on disk). Returns (why it stopped, seconds)."""
    try:
        return await victim.answer(transfer.images, transfer.probs, progress=progress)
    finally:
        transfer.save(path)


async def buy_cached(victim: Victim, images: torch.Tensor, path: Path, tag: str, *, progress: bool = False
                     ) -> np.ndarray:
    """The victim's answers for `images`, kept in `path` for this victim (its sha256) and `tag` (which images:
    a data set spec, or a digest). A partial set is completed, not bought again; NaN rows remain where the victim
    stopped (its budget ran out). The file is written only when something was bought, atomically."""
    probs = np.full((len(images), victim.card.num_classes), np.nan, np.float32)
    if path.exists():
        z = np.load(path, allow_pickle=False)
        if str(z["sha256"]) == victim.card.sha256 and str(z["spec"]) == tag and z["probs"].shape == probs.shape:
            probs = z["probs"]
    if np.isnan(probs).any():
        try:
            await victim.answer(images, probs, progress=progress)
        finally:  # kept whatever happened: they were paid for
            savez_atomic(path, probs=probs, sha256=np.asarray(victim.card.sha256), spec=np.asarray(tag))
    return probs


def digest(images: torch.Tensor) -> str:
    """Which images, not just how many: the tag of an image set's cached answers."""
    return hashlib.sha256(images.numpy().tobytes()).hexdigest()[:12]
