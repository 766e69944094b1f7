"""training.files: writes that several processes may make at once (evaluate --jobs, racing train_ast runs)."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from training.files import save_atomic, savez_atomic, write_atomic

REPO = Path(__file__).resolve().parents[2]

WRITER = """
import sys, numpy as np
from training.files import savez_atomic
print("ready", flush=True)
sys.stdin.readline()  # a barrier: every writer has imported and waits here until the test says go
for i in range(300):
    savez_atomic(sys.argv[1], x=np.full(10_000, int(sys.argv[2]), np.int64))
"""


def test_processes_writing_one_file_at_once_all_succeed_and_leave_one_whole_file(tmp_path):
    # A shared temporary name (what data.py once used) fails here: one writer renames the other's file away.
    path = tmp_path / "cache.npz"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(k)], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(3)]
    assert [p.stdout.readline().strip() for p in procs] == ["ready"] * 3
    for p in procs:  # all three start writing together
        p.stdin.write("go\n")
        p.stdin.flush()
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    x = np.load(path)["x"]
    assert len(set(x.tolist())) == 1 and x[0] in (0, 1, 2)
    assert [f.name for f in tmp_path.iterdir()] == ["cache.npz"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "w.pt"
    save_atomic({"a": torch.ones(2)}, path)

    def broken(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, broken)
    assert torch.equal(torch.load(path)["a"], torch.ones(2))
    assert [f.name for f in tmp_path.iterdir()] == ["w.pt"]


def test_savez_atomic_keeps_the_name_it_was_given(tmp_path):
    savez_atomic(tmp_path / "a.npz", y=np.arange(3))
    assert np.array_equal(np.load(tmp_path / "a.npz")["y"], np.arange(3))
    assert [f.name for f in tmp_path.iterdir()] == ["a.npz"]
