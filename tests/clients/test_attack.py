"""The attacker library (clients/attack): one victim interface for a live service and an in-process ONNX model, query
plans, and answers that are bought once."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from clients.attack.answers import TransferSet, buy_cached, digest
from clients.attack.queries import NOISE, plan_queries
from clients.attack.victim import OnnxVictim, answers, open_endpoint
from conftest import serve
from training.data import Split, balanced_subset, load_dataset


@pytest.fixture(scope="module")
def test_images() -> torch.Tensor:
    return load_dataset("digits").test.images[:40]


@pytest.mark.parametrize("defense, params", [("none", {}), ("topk", {"k": 2})])
def test_the_in_process_victim_answers_as_the_served_model_does(digits_run, tmp_path, test_images, defense, params):
    model = digits_run[0] / "model.onnx"
    local = OnnxVictim(model, defense=defense, params=params)
    ours = answers(local, test_images)
    args = ["--output-defense", defense, "--defense-k", "2", "--budget-db", str(tmp_path / "b.sqlite")]
    with serve(model, *args) as server:
        async def go():
            async with open_endpoint(server.url, images_per_request=8, concurrency=2) as victim:
                probs = np.full((len(test_images), 10), np.nan, np.float32)
                stop, _ = await victim.answer(test_images, probs)
                return probs, stop, victim
        theirs, stop, remote = asyncio.run(go())
    assert stop == "plan complete" and remote.card == local.card
    assert remote.defense == local.defense  # name, parameters and summary, as /v1/model reports them
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


def test_answers_are_bought_once_and_a_partial_set_is_completed(digits_run, tmp_path, test_images):
    path = tmp_path / "answers.npz"
    with serve(digits_run[0] / "model.onnx", "--budget-db", str(tmp_path / "b.sqlite")) as server:
        def served() -> float:
            return server.metric("astguard_images_served_total", key="anonymous")

        async def buy(images, tag):
            async with open_endpoint(server.url, images_per_request=8, concurrency=2) as victim:
                return await buy_cached(victim, images, path, tag)

        first = asyncio.run(buy(test_images, "digits:test"))
        assert served() == 40 and not np.isnan(first).any()
        again = asyncio.run(buy(test_images, "digits:test"))
        assert served() == 40 and np.array_equal(again, first)  # nothing asked twice
        z = dict(np.load(path))
        z["probs"][5:9] = np.nan  # as if the budget had run out there
        np.savez(path, **z)
        completed = asyncio.run(buy(test_images, "digits:test"))
        assert served() == 44 and np.allclose(completed, first, atol=1e-6)
        asyncio.run(buy(test_images[:10], digest(test_images[:10])))  # other images: another tag, bought afresh
        assert served() == 54


def test_a_balanced_plan_takes_a_class_balanced_subset_of_the_split_in_hand():
    data = load_dataset("digits")
    images, labels = plan_queries(data.train, 200, channels=1, size=(8, 8), seed=3, balanced=True)
    idx = balanced_subset(data.train.labels, 200, 3)
    assert torch.equal(images, data.train.images[idx]) and torch.equal(labels, data.train.labels[idx])
    assert torch.bincount(labels).tolist() == [20] * 10


def test_a_plan_larger_than_its_source_cycles_it_with_augmented_repeats():
    source = Split(load_dataset("digits").test.images[:50], torch.arange(50) % 10)
    images, labels = plan_queries(source, 120, channels=1, size=(8, 8), seed=0)
    assert images.shape == (120, 1, 8, 8) and len(labels) == 120
    firsts = images[:50]
    assert sorted(source.images.view(50, -1).sum(1).tolist()) == sorted(firsts.view(50, -1).sum(1).tolist())
    changed = (images[50:].float() - source.images[torch.arange(70) % 50].float()).abs().sum((1, 2, 3)) > 0
    assert changed.float().mean() > 0.5  # most repeats are shifted crops, not copies


def test_a_plan_converts_images_to_the_victims_input_and_noise_needs_no_data():
    source = Split(torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8), torch.arange(4))
    images, _ = plan_queries(source, 4, channels=1, size=(8, 8), seed=0)
    assert images.shape == (4, 1, 8, 8) and images.dtype == torch.uint8
    noise, labels = plan_queries(NOISE, 6, channels=3, size=(32, 32), seed=0)
    assert noise.shape == (6, 3, 32, 32) and labels is None


def test_a_transfer_set_keeps_its_plan_answers_and_labels_on_disk(tmp_path):
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    t = TransferSet.planned(images, torch.arange(5), 10, {"queries": "digits:train"})
    t.probs[:3] = np.eye(10, dtype=np.float32)[:3]
    t.save(tmp_path / "transfer.npz")
    back = TransferSet.load(tmp_path / "transfer.npz")
    assert back.meta == t.meta and back.answered.tolist() == [True, True, True, False, False]
    x, p, y = back.bought()
    assert torch.equal(x, images[:3]) and y.tolist() == [0, 1, 2] and p.shape == (3, 10)
