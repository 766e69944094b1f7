"""Data-parallel training: torchrun with 2 CPU processes (gloo) equals one process with the same global batch."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

from conftest import REPO
from service.process import free_port
from training import distributed
from training.data import DeviceLoader

# Batches of 45 from 256 images: every batch, and the last one of 31, splits unevenly over 2 ranks (23/22, 16/15),
# so the per-rank loss weighting is exercised; crop_pad=1 (the digits default) exercises the shared augmentation.
ARGS = ["--dataset", "digits", "--limit-train", "256", "--limit-test", "200", "--epochs", "2", "--base-epochs", "2",
        "--batch-size", "45", "--pgd-steps", "3", "--eval-batch-size", "64", "--no-progress"]


def _torchrun(nproc: int, *args: str, cwd) -> subprocess.CompletedProcess:
    # `python -m torch.distributed.run` is the torchrun command; --standalone picks a free rendezvous port.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "training" / "train_ast.py"), *args, "--distributed"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _train(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "training" / "train_ast.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    single = _train(*ARGS, "--out", str(root / "one"), "--cache-dir", str(root / "cache-one"), cwd=root)
    assert single.returncode == 0, single.stderr[-3000:]
    two = _torchrun(2, *ARGS, "--out", str(root / "two"), "--cache-dir", str(root / "cache-two"), cwd=root)
    assert two.returncode == 0, two.stderr[-3000:]
    return root, single, two


def _checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.parametrize("stage", ["base", "."])
def test_two_gloo_processes_under_torchrun_train_the_same_weights_as_one_process(runs, stage):
    root, _, _ = runs
    one, two = _checkpoint(root / "one" / stage / "checkpoint.pt"), _checkpoint(root / "two" / stage / "checkpoint.pt")
    assert one["model"].keys() == two["model"].keys()
    for name, a in one["model"].items():  # weights and BatchNorm running statistics alike
        assert torch.allclose(a.float(), two["model"][name].float(), rtol=1e-4, atol=1e-5), name
    tracked = [k for k in one["model"] if k.endswith("num_batches_tracked")]
    assert tracked and all(one["model"][k] == two["model"][k] == 2 * 6 for k in tracked)  # 2 epochs of 6 steps
    for a, b in zip(one["history"], two["history"], strict=True):
        assert a["train_accuracy"] == b["train_accuracy"] and a["test_accuracy"] == b["test_accuracy"]
        for key in ("loss", "ce"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key


def test_the_ranks_split_pgd_and_merge_it_into_the_images_one_process_makes(runs):
    root, _, _ = runs
    (one,), (two,) = (list((root / c / "adversarial").glob("adv-*.pt")) for c in ("cache-one", "cache-two"))
    one, two = torch.load(one), torch.load(two)
    assert one.shape == two.shape == (256, 1, 8, 8)
    # The two bases differ by float rounding only, so PGD's sign steps agree on (nearly) every pixel.
    assert (one.float() - two.float()).abs().gt(1e-3).float().mean() < 1e-3


def test_rank_0_alone_writes_logs_checkpoints_exports_and_the_summary(runs):
    root, _, two = runs
    summary = json.loads(two.stdout)  # exactly one JSON document: the other rank printed nothing
    assert summary["teacher"] == "ast" and summary["verification"]["batch_16"]["max_abs_diff"] < 1e-5
    for stage, epochs in (("base", 2), (".", 2)):
        assert len((root / "two" / stage / "log.jsonl").read_text().splitlines()) == epochs
    card = json.loads((root / "two" / "model.json").read_text())
    assert card["training"] == json.loads((root / "one" / "model.json").read_text())["training"]
    assert not [p for p in (root / "two").rglob("*") if ".tmp" in p.name]


def test_a_batch_too_small_to_split_over_the_processes_is_refused_with_the_option_to_change(tmp_path):
    args = [a if a != "45" else "51" for a in ARGS]  # 256 = 5 x 51 + 1: the last batch has one image for 2 ranks
    r = _torchrun(2, *args, "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode != 0
    assert "2 processes need at least 2 images in every batch" in r.stderr and "--batch-size" in r.stderr
    # The workers exit with the one-line error; torchrun itself then reports the failed workers its own way.
    assert "[rank0]: Traceback" not in r.stderr and "[rank1]: Traceback" not in r.stderr


RANKS_SCRIPT = """
import json, sys
import torch
from training import distributed
from training.loop import accuracy

distributed.setup("cpu")
out = {"rank": distributed.rank()}
# One test image for two ranks: rank 1's share is empty and still joins the sum.
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
out["accuracy"] = accuracy(model, torch.zeros(1, 1, 2, 2), torch.tensor([model(torch.zeros(1, 1, 2, 2)).argmax()]),
                           "cpu", sharded=True)
out["written"] = distributed.main_only(lambda: "ok")
def fail():
    raise OSError("disk full")
try:
    distributed.main_only(fail)
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
distributed.teardown()
with open(f"{sys.argv[1]}/rank-{out['rank']}.json", "w") as f:  # not stdout: the ranks' lines would interleave
    json.dump(out, f)
"""


def test_a_failure_on_rank_0_alone_stops_every_rank_with_its_reason_and_empty_shares_still_count(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tmp_path)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{i}.json").read_text()) for i in range(2)]
    assert [o["accuracy"] for o in ranks] == [1.0, 1.0]
    assert [o["written"] for o in ranks] == ["ok", None]
    assert ranks[0]["error"] == "OSError: disk full"  # rank 0 raises its own error ...
    assert ranks[1]["error"] == "PeerFailed: rank 0 failed (OSError: disk full); rank 1 stops too"  # ... rank 1 too


def test_distributed_without_torchrun_is_a_cli_error_naming_torchrun(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in distributed.LAUNCH_VARIABLES}
    r = subprocess.run([sys.executable, str(REPO / "training" / "train_ast.py"), *ARGS, "--out",
                        str(tmp_path / "run"), "--distributed"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert "torchrun --nproc_per_node" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("world", [2, 3])
def test_the_ranks_shards_of_a_batch_are_the_single_process_batch_augmented_alike(world):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (100, 3, 8, 8), dtype=torch.uint8, generator=g)
    pair = torch.randint(0, 256, (100, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.arange(100)
    kw = dict(pair=pair, crop_pad=2, flip=True, seed=4)
    whole = list(DeviceLoader(images, labels, 32, **kw).epoch(3))
    shards = [list(DeviceLoader(images, labels, 32, shard=(r, world), **kw).epoch(3)) for r in range(world)]
    for i, batch in enumerate(whole):
        parts = [s[i] for s in shards]
        for field in ("x", "y", "index", "pair"):
            assert torch.equal(torch.cat([getattr(p, field) for p in parts]), getattr(batch, field)), field
        assert max(len(p.y) for p in parts) - min(len(p.y) for p in parts) <= 1


def test_a_shard_outside_the_world_is_refused():
    with pytest.raises(ValueError, match="rank"):
        DeviceLoader(torch.zeros(4, 1, 2, 2), torch.zeros(4), 2, shard=(2, 2))


@pytest.fixture
def one_rank_group():
    """A real gloo process group of one, so the synced code paths run in this process."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("shape,momentum", [((6, 4, 5, 5), 0.1), ((7, 4), None)])
def test_synced_batchnorm_matches_batchnorm_outputs_gradients_and_running_statistics(one_rank_group, shape,
                                                                                     momentum):
    torch.manual_seed(0)
    bn = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(4, momentum=momentum)
    nn.init.normal_(bn.weight), nn.init.normal_(bn.bias)
    reference = type(bn)(4, momentum=momentum)
    reference.load_state_dict(bn.state_dict())
    synced = distributed.sync_batchnorm(nn.Sequential(bn))[0]
    assert isinstance(synced, distributed.SyncBatchNorm) and synced.weight is bn.weight
    x = (torch.randn(shape) * 3 + 5).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    for _ in range(3):
        y, y_ref = synced(x), reference(x_ref)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        (y * torch.arange(y.numel()).view_as(y)).sum().backward()
        (y_ref * torch.arange(y.numel()).view_as(y)).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bn.weight.grad, reference.weight.grad, rtol=1e-4, atol=1e-4)
    for name in ("running_mean", "running_var", "num_batches_tracked"):  # shared with the plain module
        torch.testing.assert_close(getattr(bn, name), getattr(reference, name), rtol=1e-5, atol=1e-6)
    synced.eval()
    torch.testing.assert_close(synced(x), reference.eval()(x_ref), rtol=1e-5, atol=1e-5)


def test_cat_ranks_and_shards_in_one_process_are_the_identity():
    t = torch.arange(10)
    assert distributed.shard(10) == slice(0, 10) and torch.equal(distributed.cat_ranks(t), t)
    assert [distributed.share(10, r, 3) for r in range(3)] == [slice(0, 4), slice(4, 7), slice(7, 10)]
