import torch
from torch import nn

from training.config import make_config
from training.data import DeviceLoader, load_dataset
from training.models import create_model
from training.teachers import TEACHERS, Context


class Recorder(nn.Module):
    """Wraps a model and records, per call, the input, the mode and whether gradients were on."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x):
        self.calls.append((x.detach().clone(), self.training, torch.is_grad_enabled()))
        return self.model(x)


def test_ast_step_pairs_each_clean_image_with_its_own_adversarial_image_under_the_same_augmentation():
    data = load_dataset("digits")
    images = data.train.images[:256]
    # A stand-in "adversarial" set that is a known function of each image: half its intensity. Zero padding
    # keeps the relation, so pairing (same image, same crop, same flip) is checkable pixel by pixel.
    pair = images.half() / 255 * 0.5
    loader = DeviceLoader(images, data.train.labels[:256], 32, pair=pair, crop_pad=2, flip=True, seed=3)
    model = Recorder(create_model("digits_cnn", 10, 1, 8))
    cfg = make_config("digits")
    for batch in loader.epoch(1):
        model.calls.clear()
        loss, terms, logits = TEACHERS["ast"].loss(model, batch, Context(cfg, top_k=2))
        (target_in, target_training, target_grad), (clean_in, clean_training, clean_grad) = model.calls
        assert not target_training and not target_grad  # the target: eval mode, no gradient
        assert clean_training and clean_grad
        assert torch.allclose(target_in, clean_in * 0.5, atol=1e-3)
        assert torch.isfinite(loss) and set(terms) == {"divergence", "ce"}


def test_the_pairing_check_above_would_catch_misaligned_batches():
    # The released code's defect: a shuffled clean loader zipped with an unshuffled adversarial loader.
    data = load_dataset("digits")
    images = data.train.images[:256]
    clean = next(DeviceLoader(images, data.train.labels[:256], 32, shuffle=True, seed=3).epoch(0)).x
    adv = next(DeviceLoader(images.half() / 255 * 0.5, data.train.labels[:256], 32, shuffle=False).epoch(0)).x
    assert not torch.allclose(adv, clean * 0.5, atol=1e-3)


def test_stt_targets_the_base_models_answer_on_the_clean_image():
    data = load_dataset("digits")
    base = Recorder(create_model("digits_cnn", 10, 1, 8)).eval()
    model = create_model("digits_cnn", 10, 1, 8)
    batch = next(DeviceLoader(data.train.images[:64], data.train.labels[:64], 64).epoch(0))
    TEACHERS["stt"].loss(model, batch, Context(make_config("digits"), top_k=2, base=base))
    ((seen, _, grad),) = base.calls
    assert torch.equal(seen, batch.x) and not grad


def test_every_recipe_declares_only_real_config_fields():
    names = set(make_config().to_dict())
    for recipe in TEACHERS.values():
        assert set(recipe.params) <= names, recipe.name
