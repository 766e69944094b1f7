"""Jacobian-based dataset augmentation (Papernot et al., AsiaCCS 2017): a thief with very little natural data.

It starts from a small seed set (the first images of the shared transfer set, already answered) and grows it for
a few rounds: each round trains a student on everything answered so far, then asks the victim about
x + lambda * sign(grad_x CE(student(x), victim's top-1)) for every x of the set, clipped to [0, 1]. So the set
doubles each round; the seed is sized for the budget to hold every round. The final student trains on all of it.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clients.attack.attacks import Setting, Stolen, register_attack
from clients.attack.student import distill_student


def jacobian_step(student: nn.Module, images: Tensor, labels: Tensor, lam: float, device: torch.device,
                  batch_size: int = 256) -> Tensor:
    """uint8 images moved by lam (in [0, 1] pixels) along the sign of the input gradient of the student's loss on
    the victim's labels, rounded back to uint8."""
    student.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = (images[i:i + batch_size].float() / 255).to(device).requires_grad_(True)
        loss = F.cross_entropy(student(x), labels[i:i + batch_size].to(device))
        (grad,) = torch.autograd.grad(loss, x)
        out.append(((x.detach() + lam * grad.sign()).clamp(0, 1) * 255).round().to(torch.uint8).cpu())
    return torch.cat(out)


def jbda(setting: Setting, rounds: int = 4, lam: float = 0.1, round_epochs: int | None = None,
         mode: str = "soft") -> Stolen:
    images, probs, _ = setting.bought()
    seed_size = max(1, min(len(images), setting.budget // 2 ** rounds))
    x, p = images[:seed_size], probs[:seed_size]
    short = replace(setting.spec, epochs=round_epochs or max(1, setting.spec.epochs // 4))
    bought = 0
    for r in range(rounds):
        student, _ = distill_student(short, x, p, None, setting.fallback_test(x, p), setting.out / f"round-{r}",
                                     mode=mode, temperature=setting.temperature, device=setting.device,
                                     progress=setting.progress)
        grown = jacobian_step(student, x, p.argmax(1), lam, setting.device)
        own, n = setting.own_answers("jbda", grown, None, {"round": r, "lambda": lam, "seed_size": seed_size,
                                                          "seed": setting.seed}, folder=f"round-{r}")
        bought += n
        new_x, new_p, _ = own.bought()
        if len(new_x) == 0:  # the budget ran out
            break
        x, p = torch.cat([x, new_x]), torch.cat([p, new_p])
    student, _ = distill_student(setting.spec, x, p, None, setting.fallback_test(x, p), setting.out / "student",
                                 mode=mode, temperature=setting.temperature, device=setting.device,
                                 progress=setting.progress)
    return Stolen(student, bought, {"seed_size": seed_size, "final_size": len(x), "rounds": rounds})


register_attack("jbda", jbda,
                summary="Papernot et al. 2017: a small seed set grown by Jacobian steps, asking the victim each round",
                assumes="a few natural images (the seed: budget / 2^rounds of them)",
                cost="its own queries for every round after the seed: under the budget", rounds=4, lam=0.1,
                round_epochs=None, mode="soft")
