"""Files that more than one process may make: atomic writes, and a lock so that one process makes a thing while
the others wait for it and then read it (evaluate --jobs runs teachers that share a base and a PGD set)."""
from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from training import distributed

try:
    import fcntl
except ImportError:  # not POSIX: no locks, so run one job at a time there
    fcntl = None


def write_atomic(path: Path, write) -> None:
    """`write(tmp)` then rename onto `path`, so readers never see a half-written file. The temporary name is
    this process's own (two processes making the same file do not share it) and keeps `path`'s suffix, since
    np.savez adds '.npz' to a name without it. The folder is made if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_atomic(obj, path: Path) -> None:
    """torch.save, atomically."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def savez_atomic(path: Path, **arrays) -> None:
    """np.savez, atomically."""
    write_atomic(path, lambda tmp: np.savez(tmp, **arrays))


def run_lock(path: Path):
    """exclusive(path) between separate runs (evaluate --jobs workers, two commands on one directory). None
    within one torchrun job: its ranks move together, and a lock one rank held would leave the others waiting in
    a collective."""
    return nullcontext() if distributed.active() else exclusive(path)


@contextmanager
def exclusive(path: Path):
    """Hold an exclusive lock on the file `path` (created if missing) for the block. The lock goes with the
    process: a killed holder frees it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)
