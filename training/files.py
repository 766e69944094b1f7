"""Files that more than one process may make: atomic writes, and a lock so that one process makes a thing while
the others wait for it and then read it (evaluate --jobs runs teachers that share a base and a PGD set)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # not POSIX: no locks, so run one job at a time there
    fcntl = None


def save_atomic(obj, path: Path) -> None:
    """torch.save that readers never see half-written; the temporary name is the writer's own."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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
