import torch
import torch.nn.functional as F

from training.data import load_dataset, to_float
from training.models import create_model
from training.pgd import PGDConfig, adversarial_set, pgd_linf


def _trained_digits_model():
    torch.manual_seed(0)
    data = load_dataset("digits")
    model = create_model("digits_cnn", 10, 1, 8, data.mean, data.std)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = to_float(data.train.images), data.train.labels
    for _ in range(3):
        for i in range(0, len(y), 64):
            opt.zero_grad()
            F.cross_entropy(model(x[i:i + 64]), y[i:i + 64]).backward()
            opt.step()
    return model.eval(), data


def test_pgd_stays_in_the_eps_ball_and_in_pixel_range_and_raises_the_loss():
    model, data = _trained_digits_model()
    x, y = to_float(data.test.images[:128]), data.test.labels[:128]
    for random_start in (False, True):
        adv = pgd_linf(model, x, y, eps=0.1, step=0.01, steps=10, random_start=random_start,
                       generator=torch.Generator().manual_seed(0))
        assert (adv - x).abs().max() <= 0.1 + 1e-6
        assert adv.min() >= 0 and adv.max() <= 1
        with torch.no_grad():
            clean_loss = F.cross_entropy(model(x), y, reduction="none")
            adv_loss = F.cross_entropy(model(adv), y, reduction="none")
        assert adv_loss.mean() > clean_loss.mean() + 1.0
        assert (adv_loss >= clean_loss - 1e-4).float().mean() > 0.95


def test_pgd_computes_no_weight_gradients():
    model, data = _trained_digits_model()
    model.zero_grad(set_to_none=True)
    pgd_linf(model, to_float(data.test.images[:8]), data.test.labels[:8], eps=0.3, step=0.01, steps=3)
    assert all(p.grad is None for p in model.parameters())


def test_adversarial_set_is_aligned_with_the_images_and_cached_by_model_and_settings(tmp_path):
    model, data = _trained_digits_model()
    images, labels = data.train.images[:100], data.train.labels[:100]
    cfg = PGDConfig(eps=0.3, step=0.05, steps=4)
    adv = adversarial_set(model, images, labels, cfg, cache_dir=tmp_path, batch_size=32, progress=False)
    assert adv.shape == images.shape and adv.dtype == torch.float16
    # Aligned: image i's adversarial copy is within eps of image i (float16 rounding aside), not of another image.
    dist = (adv.float() - to_float(images)).abs().amax(dim=(1, 2, 3))
    assert dist.max() <= 0.3 + 1e-3
    assert (adv.float()[1:] - to_float(images)[:-1]).abs().amax(dim=(1, 2, 3)).min() > 0.3
    assert len(list(tmp_path.glob("adv-*.pt"))) == 1
    again = adversarial_set(model, images, labels, cfg, cache_dir=tmp_path, batch_size=32, progress=False)
    assert torch.equal(adv, again)
    adversarial_set(model, images, labels, PGDConfig(eps=0.1, step=0.05, steps=4), cache_dir=tmp_path,
                    batch_size=32, progress=False)
    assert len(list(tmp_path.glob("adv-*.pt"))) == 2
