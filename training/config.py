"""One training configuration, and the paper's presets as named data.

Each field's `help` is its command-line documentation. A preset is a dict of overrides; command-line values
override the preset. The defaults are the `digits` preset (digits is the default data set); use a preset
for CIFAR. The base model and the defended teacher share the optimisation settings (as in the paper).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from astguard.cli import option as _f


@dataclass(frozen=True)
class Config:
    # data
    dataset: str = _f("digits", "data set: digits, cifar10, cifar100, or an ImageFolder directory/.zip")
    data_root: str = _f("data", "where cifar10/cifar100 live in torchvision's format (downloaded if missing)")
    limit_train: int | None = _f(None, "train on a class-balanced subset of this many images")
    limit_test: int | None = _f(None, "evaluate on a class-balanced subset of this many test images")
    # model and optimisation
    arch: str = _f("digits_cnn", "architecture (registry key)")
    teacher: str = _f("ast", "teacher recipe (registry key)")
    epochs: int = _f(15, "epochs for the defended teacher")
    base_epochs: int | None = _f(None, "epochs for the base model (default: --epochs)")
    batch_size: int = _f(64, "batch size")
    lr: float = _f(0.05, "SGD learning rate")
    base_lr: float | None = _f(None, "SGD learning rate for the base model (default: --lr; with --init-from-base, "
                                     "--lr is then the fine-tuning's)")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(5e-4, "SGD weight decay")
    schedule: str = _f("cosine", "learning-rate schedule", choices=("cosine", "step"))
    milestones: tuple[int, ...] = _f((), "epochs at which the step schedule multiplies the rate by --gamma")
    gamma: float = _f(0.1, "step schedule factor")
    crop_pad: int = _f(1, "random-crop padding in pixels (0: no crop)")
    flip: bool = _f(False, "random horizontal flips")
    # AST / STT
    alpha: float = _f(0.05, "weight a of the divergence term (1-a weighs cross-entropy)")
    temperature: float = _f(6.0, "softmax temperature T of the divergence term")
    sparse_ratio: float = _f(0.2, "share of classes the sparse target keeps, in (0,1]: k = ratio x classes")
    top_k: int | None = _f(None, "keep exactly this many logits (overrides --sparse-ratio)")
    divergence: str = _f("epd-code", "divergence (registry key): epd-paper (as printed), epd-code (as released), kl")
    # Nasty Teacher
    nt_weight: float = _f(0.004, "Nasty Teacher weight w of the KL-to-base term")
    nt_temperature: float = _f(4.0, "Nasty Teacher temperature")
    nt_direction: str = _f("authors", "Nasty Teacher KL direction: authors (KL(f || base), as their code) or reverse "
                                      "(KL(base || f))", choices=("authors", "reverse"))
    # InI (Guo et al. 2023): defaults of the authors' run.sh
    ood: str | None = _f(None, "InI: out-of-distribution images (a data set spec, digits, or noise), resized to the "
                               "model's input")
    ini_gamma: float = _f(0.3, "InI: weight of the OOD distance d(V(u), S(u))")
    ini_delta: float = _f(1.0, "InI: weight of the gradient cosine cos(grad_S KL(S(x)||V(x)), grad_S CE(S(x), y))")
    ini_epsilon: float = _f(1000.0, "InI: weight of the OOD gradient norm mean|grad_S KL(S(u)||V(u))|")
    ini_beta: float = _f(0.0, "InI: weight of the in-distribution push -d(V(x), S(x))")
    ini_pcgrad: bool = _f(True, "InI: PCGrad between the terms (else their sum, gradients clipped to norm 10)")
    # LTD (Chen & Lee): adversarial training on a low-temperature teacher's soft labels
    ltd_teacher_temperature: float = _f(0.5, "LTD: temperature of the base teacher's soft labels")
    ltd_student_temperature: float = _f(1.0, "LTD: the student's fixed temperature")
    ltd_clean_weight: float = _f(0.0, "LTD: weight of the same term on the clean image")
    ltd_eps: float = _f(0.1, "LTD: PGD L-inf radius of the adversarial training, in [0,1] pixels (the CIFAR "
                             "presets: 8/255)")
    ltd_step: float = _f(0.025, "LTD: PGD step size (the CIFAR presets: 2/255)")
    ltd_steps: int = _f(10, "LTD: PGD steps per training batch")
    # PGD for the adversarial training set
    pgd_eps: float = _f(0.3, "PGD L-inf radius in [0,1] pixels")
    pgd_step: float = _f(0.01, "PGD step size")
    pgd_steps: int = _f(40, "PGD steps")
    pgd_random_start: bool = _f(False, "start PGD from a random point in the eps-ball")
    # run
    seed: int = _f(0, "seed for initialisation, batches and augmentation")
    eval_batch_size: int = _f(512, "batch size for evaluation and PGD")
    precision: str = _f("fp32", "training arithmetic: fp32, or bf16 autocast (the CPU's AVX-512 BF16 or a GPU's)",
                        choices=("fp32", "bf16"))
    channels_last: bool = _f(False, "train in the channels_last memory format (faster convolutions on CPU and GPU)")
    test_every: int = _f(1, "score the test set every N epochs and after the last (0: after the last only)")
    robust_images: int | None = _f(None, "measure the card's robust accuracy on a class-balanced subset of this many "
                                         "test images (default: all)")
    init_from_base: bool = _f(False, "start the defended teacher from the base model's weights (a fine-tuning, for "
                                     "reduced-cost scales) instead of a fresh initialisation")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return d


# 32x32 RGB: LTD's adversarial training at the usual CIFAR radius (digits, the defaults: 0.1, about 1.6 of its 17
# grey levels, as training/robustness.py measures them).
_RGB32 = dict(ltd_eps=8 / 255, ltd_step=2 / 255)

PRESETS: dict[str, dict] = {
    # Small and CPU-friendly: 8x8 grey digits, so a 1-pixel crop and no flip (a flipped digit is another digit).
    "digits": dict(dataset="digits", arch="digits_cnn", epochs=15, batch_size=64, lr=0.05, schedule="cosine",
                    crop_pad=1, flip=False, alpha=0.05, temperature=6.0, sparse_ratio=0.2),
    # The paper's settings (released params.json: batch 128, step schedules). Nasty Teacher's w is the NT authors'
    # CIFAR-10 params.json (0.04); the AST paper's text prints 0.004.
    "cifar10-resnet18": dict(dataset="cifar10", arch="resnet18", epochs=160, batch_size=128, lr=0.1,
                              schedule="step", milestones=(80, 120), gamma=0.1, crop_pad=4, flip=True,
                              alpha=0.05, temperature=6.0, top_k=2, nt_weight=0.04, nt_temperature=4.0, **_RGB32),
    # InI's own settings (the authors' run.sh): SGD lr 0.1, momentum 0.5, weight decay 1e-3, 150 epochs, x0.1 every
    # 50. Their OOD set, TinyImageNet, is not on this machine: upscaled digits stand in (`--ood` overrides).
    "cifar10-ini": dict(dataset="cifar10", arch="resnet18", teacher="ini", epochs=150, batch_size=128, lr=0.1,
                        momentum=0.5, weight_decay=1e-3, schedule="step", milestones=(50, 100), gamma=0.1, crop_pad=4,
                        flip=True, ood="digits", **_RGB32),
    "cifar100-resnet18": dict(dataset="cifar100", arch="resnet18", epochs=200, batch_size=128, lr=0.1,
                               schedule="step", milestones=(60, 120, 160), gamma=0.2, crop_pad=4, flip=True,
                               alpha=0.035, temperature=30.0, top_k=7, nt_weight=0.005, nt_temperature=20.0, **_RGB32),
    "cifar100-resnet50": dict(dataset="cifar100", arch="resnet50", epochs=200, batch_size=128, lr=0.1,
                               schedule="step", milestones=(60, 120, 160), gamma=0.2, crop_pad=4, flip=True,
                               alpha=0.03, temperature=30.0, top_k=7, nt_weight=0.005, nt_temperature=20.0, **_RGB32),
}


def make_config(preset: str | None = None, **overrides) -> Config:
    """Defaults <- preset <- overrides (None values in overrides are ignored)."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    cfg = replace(Config(), **PRESETS.get(preset, {})) if preset else Config()
    names = {f.name for f in fields(Config)}
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"unknown config fields: {sorted(unknown)}")
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def lr_at(cfg: Config, epoch: float, epochs: int) -> float:
    """Learning rate at a fractional epoch: cosine to 0 over `epochs`, or steps at the milestones."""
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(epoch / epochs, 1.0)))
    return cfg.lr * cfg.gamma ** sum(int(epoch) >= m for m in cfg.milestones)


def validate(cfg: Config) -> None:
    """Reject settings that cannot work, with a message naming the option."""
    from training.losses import DIVERGENCES
    from training.models import MODELS
    from training.teachers import TEACHERS

    checks = [
        (cfg.arch in MODELS, f"unknown --arch {cfg.arch!r}; known: {', '.join(sorted(MODELS))}"),
        (cfg.teacher in TEACHERS, f"unknown --teacher {cfg.teacher!r}; known: {', '.join(TEACHERS)}"),
        (cfg.teacher not in TEACHERS or not TEACHERS[cfg.teacher].needs_ood or cfg.ood,
         f"--teacher {cfg.teacher} needs --ood SPEC: out-of-distribution images (an ImageFolder directory or zip, "
         "digits, or noise)"),
        (cfg.ltd_teacher_temperature > 0 and cfg.ltd_student_temperature > 0, "LTD temperatures must be positive"),
        (cfg.divergence in DIVERGENCES, f"unknown --divergence {cfg.divergence!r}; known: {', '.join(DIVERGENCES)}"),
        (0 < cfg.sparse_ratio <= 1, f"--sparse-ratio must be in (0, 1], got {cfg.sparse_ratio}"),
        (cfg.top_k is None or cfg.top_k >= 1, f"--top-k must be at least 1, got {cfg.top_k}"),
        (0 <= cfg.alpha <= 1, f"--alpha must be in [0, 1], got {cfg.alpha}"),
        (cfg.temperature > 0 and cfg.nt_temperature > 0, "temperatures must be positive"),
        (cfg.epochs >= 1 and (cfg.base_epochs or 1) >= 1, "epochs must be at least 1"),
        (cfg.batch_size >= 1 and cfg.eval_batch_size >= 1, "batch sizes must be at least 1"),
        (cfg.lr > 0, f"--lr must be positive, got {cfg.lr}"),
        (cfg.base_lr is None or cfg.base_lr > 0, f"--base-lr must be positive, got {cfg.base_lr}"),
        (cfg.crop_pad >= 0, f"--crop-pad must be >= 0, got {cfg.crop_pad}"),
        (cfg.pgd_eps >= 0 and cfg.pgd_step >= 0 and cfg.pgd_steps >= 0, "PGD settings must be >= 0"),
        (cfg.limit_train is None or cfg.limit_train >= 1, f"--limit-train must be positive, got {cfg.limit_train}"),
        (cfg.limit_test is None or cfg.limit_test >= 1, f"--limit-test must be positive, got {cfg.limit_test}"),
        (cfg.test_every >= 0, f"--test-every must be >= 0, got {cfg.test_every}"),
        (cfg.robust_images is None or cfg.robust_images >= 1,
         f"--robust-images must be positive, got {cfg.robust_images}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
