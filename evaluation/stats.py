"""Statistics of a teacher's answers (the paper's Table 3) and of results over seeds.

All in nats, on probabilities p (rows of a [N, C] tensor), with 0 log 0 = 0 so that classes a sparse answer
zeroed count as nothing:
- entropy(p) = -sum_i p_i log p_i, per image;
- per-class entropy: the mean entropy of the answers to the images of each true class;
- within-class KL: for each true class c, the mean over its images of KL(p || p_bar_c), with p_bar_c the mean
  answer to that class: how much a teacher's answers to one class disagree with each other;
- `describe` summarises a per-class vector as mean, variance (population), min and max, as in Table 3;
- `over_seeds` summarises one result over seeds: mean, std and the 95% t interval of the mean.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def entropy(probs: Tensor) -> Tensor:
    p = probs.double()
    return -torch.special.xlogy(p, p).sum(1)


def _per_class(values: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    counts = torch.bincount(labels, minlength=num_classes).double()
    sums = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, values.double())
    present = counts > 0
    return (sums[present] / counts[present])


def class_entropy(probs: Tensor, labels: Tensor) -> Tensor:
    """Mean entropy of the answers per true class (classes with no image left out)."""
    return _per_class(entropy(probs), labels, probs.shape[1])


def within_class_kl(probs: Tensor, labels: Tensor) -> Tensor:
    """Per true class: the mean of KL(p || mean answer of the class) over its images."""
    p = probs.double()
    c = p.shape[1]
    counts = torch.bincount(labels, minlength=c).double().clamp_min(1)
    mean = torch.zeros(c, c, dtype=torch.float64).index_add_(0, labels, p) / counts[:, None]
    q = mean[labels]  # each image's class mean; q > 0 wherever p > 0, so every term is finite
    kl = (torch.special.xlogy(p, p) - torch.special.xlogy(p, q)).sum(1)
    return _per_class(kl, labels, c)


def describe(values: Tensor) -> dict[str, float]:
    v = values.double()
    return {"mean": v.mean().item(), "var": v.var(unbiased=False).item(), "min": v.min().item(),
            "max": v.max().item()}


def answer_statistics(probs: Tensor, labels: Tensor) -> dict[str, dict[str, float]]:
    return {"entropy": describe(class_entropy(probs, labels)),
            "within_class_kl": describe(within_class_kl(probs, labels))}


def entropy_histogram(probs: Tensor, bins: int = 30) -> dict:
    """Counts of per-image entropies over [0, log C] in `bins` equal bins."""
    top = math.log(probs.shape[1])
    counts = torch.histc(entropy(probs).float().clamp(0, top), bins=bins, min=0.0, max=top)
    return {"edges": [top * i / bins for i in range(bins + 1)], "counts": [int(c) for c in counts]}


# Student's t, 97.5% quantile, by degrees of freedom (1..30); beyond, the Cornish-Fisher expansion around the
# normal's quantile (within 1e-4 of the exact value from 31 on).
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423)


def t975(df: int) -> float:
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963985
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def over_seeds(values: list[float], difference: bool = False) -> dict:
    """Mean and sample standard deviation (0 for one seed) of a result over seeds, with the values, and the
    half-width of the mean's 95% confidence interval, t(0.975, n-1) * std / sqrt(n) (None for one seed: no
    interval can be given). For a `difference` taken seed by seed (a paired comparison) this is the paired t
    interval, and `significant` says whether it excludes 0 (None for one seed, and for values that do not vary at
    all: one measurement repeated, e.g. the teachers' difference when --teacher-seed trains them once)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    ci = t975(n - 1) * std / math.sqrt(n) if n > 1 else None
    out = {"mean": mean, "std": std, "ci95": ci, "values": list(values)}
    if difference:
        out["significant"] = None if ci is None or std == 0 else abs(mean) > ci
    return out
