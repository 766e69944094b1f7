"""Architectures in the registry: shapes, small inputs, normalisation, and parameter counts."""
from __future__ import annotations

import pytest
import torch

from training.models import MODELS, create_model, list_models

torch.manual_seed(0)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_maps_a_batch_to_logits(name):
    model = create_model(name, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["digits_cnn", "resnet20", "cnn5"])
def test_models_accept_single_channel_8x8_input(name):
    model = create_model(name, num_classes=10, in_channels=1, image_size=8).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, 8, 8))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_small_models_get_a_gradient_for_every_parameter_in_train_mode():
    for name in ["cnn5", "digits_cnn", "resnet20"]:
        model = create_model(name, num_classes=3).train()
        model(torch.rand(2, 3, 32, 32)).sum().backward()
        assert all(p.grad is not None for p in model.parameters())


def test_cnn5_rejects_images_smaller_than_8_pixels():
    with pytest.raises(ValueError, match="image_size >= 8"):
        create_model("cnn5", num_classes=10, image_size=7)


def test_cnn5_sizes_its_classifier_for_non_multiple_of_8_images():
    model = create_model("cnn5", num_classes=4, in_channels=1, image_size=28).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 28, 28)).shape == (2, 4)


def test_create_model_rejects_an_unknown_name_listing_the_known_ones():
    with pytest.raises(ValueError) as err:
        create_model("vgg99", num_classes=10)
    message = str(err.value)
    assert "vgg99" in message
    for name in list_models():
        assert name in message


def test_normalisation_is_part_of_the_model():
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    model = create_model("resnet20", num_classes=5, mean=mean, std=std).eval()
    x = torch.rand(2, 3, 32, 32)
    expected_input = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.body(expected_input))


def test_shufflenetv2_downsamples_32_pixels_to_4_before_pooling():
    body = create_model("shufflenetv2", num_classes=10).body.eval()
    with torch.no_grad():
        features = body.head(body.stages(body.stem(torch.rand(1, 3, 32, 32))))
    assert features.shape == (1, 1024, 4, 4)


@pytest.mark.parametrize("name, expected", [
    ("resnet18", 11.17e6), ("resnet50", 23.52e6), ("resnet20", 0.27e6), ("resnet32", 0.46e6),
    ("shufflenetv2", 1.26e6),
])
def test_parameter_counts_match_the_published_architectures(name, expected):
    count = _params(MODELS[name](num_classes=10))
    assert abs(count - expected) / expected < 0.05, f"{name}: {count:,} parameters"
