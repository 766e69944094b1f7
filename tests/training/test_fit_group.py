"""Students trained in lockstep on one teacher forward end exactly as if each had been trained alone."""
import pytest
import torch

from training.config import make_config
from training.data import load_dataset
from training.distill import kd_recipe
from training.loop import Member, fit, fit_group
from training.models import create_model
from training.teachers import TEACHERS, Context


def _setup(tmp_path):
    data = load_dataset("digits", cache_dir=tmp_path / "cache").limit_train(200, 0)
    cfg = make_config("digits", epochs=2, batch_size=32)
    torch.manual_seed(123)
    teacher = create_model("digits_cnn", 10, 1, 8, data.mean, data.std).eval()

    def student(arch):
        torch.manual_seed(7)
        return create_model(arch, 10, 1, 8, data.mean, data.std)
    return data, cfg, teacher, student


def test_a_group_sharing_the_teacher_forward_equals_separate_runs(tmp_path):
    data, cfg, teacher, student = _setup(tmp_path)
    # cnn5 has dropout: the group must give each member its own random stream.
    jobs = [("cnn5", kd_recipe(4.0, 0.9)), ("cnn5", kd_recipe(4.0, 0.9, top_k=2)), ("digits_cnn", TEACHERS["base"])]
    calls = []

    @torch.no_grad()
    def prepare(batch):
        calls.append(1)
        return batch._replace(target=teacher(batch.x))

    members = [Member(student(arch), recipe, Context(cfg, 0), tmp_path / f"group{i}")
               for i, (arch, recipe) in enumerate(jobs)]
    fit_group(members, data.train, data.test, epochs=cfg.epochs, device=torch.device("cpu"), prepare=prepare,
              progress=False)
    steps = -(-200 // 32) * cfg.epochs
    assert len(calls) == steps  # one teacher forward per batch for the whole group

    for i, (arch, recipe) in enumerate(jobs):
        alone = student(arch)

        def loss(model, batch, ctx, recipe=recipe):
            with torch.no_grad():
                batch = batch._replace(target=teacher(batch.x))
            return recipe.loss(model, batch, ctx)
        solo = type(recipe)(recipe.name, recipe.summary, loss)
        history = fit(alone, solo, Context(cfg, 0), data.train, data.test, tmp_path / f"alone{i}", epochs=cfg.epochs,
                      device=torch.device("cpu"), progress=False)
        for a, b in zip(alone.state_dict().values(), members[i].model.state_dict().values()):
            assert torch.equal(a, b)
        assert [r["test_accuracy"] for r in history] == [r["test_accuracy"] for r in members[i].history]


def test_a_group_resumes_members_that_stopped_at_different_epochs(tmp_path):
    data, cfg, teacher, student = _setup(tmp_path)

    def prepare(batch):
        with torch.no_grad():
            return batch._replace(target=teacher(batch.x))
    recipe = kd_recipe(4.0, 0.9)
    straight = Member(student("digits_cnn"), recipe, Context(cfg, 0), tmp_path / "straight")
    fit_group([straight], data.train, data.test, epochs=2, device=torch.device("cpu"), prepare=prepare, progress=False)

    # One member ran 1 epoch, the other none; resuming the group finishes both exactly.
    class Stop(Exception):
        pass

    def interrupt(epoch, row):
        raise Stop

    ahead = Member(student("digits_cnn"), recipe, Context(cfg, 0), tmp_path / "ahead", on_epoch_end=interrupt)
    with pytest.raises(Stop):  # interrupted after its first epoch of two
        fit_group([ahead], data.train, data.test, epochs=2, device=torch.device("cpu"), prepare=prepare,
                  progress=False)
    members = [Member(student("digits_cnn"), recipe, Context(cfg, 0), tmp_path / "ahead"),
               Member(student("digits_cnn"), recipe, Context(cfg, 0), tmp_path / "fresh")]
    fit_group(members, data.train, data.test, epochs=2, device=torch.device("cpu"), prepare=prepare, resume=True,
              progress=False)
    for m in members:
        assert [r["epoch"] for r in m.history] == [1, 2]
        for a, b in zip(straight.model.state_dict().values(), m.model.state_dict().values()):
            assert torch.equal(a, b)
