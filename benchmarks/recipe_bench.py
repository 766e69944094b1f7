#!/usr/bin/env python
"""What one training step of each teacher recipe costs, on the same batch, as a ratio: InI's double
backpropagation and PCGrad, LTD's PGD inside the step, against an AST step and a plain (base) step.

Rounds alternate between the recipes after a warm-up, so drift on the machine hits all alike; each figure is the
median step time, with the spread over rounds.

    python benchmarks/recipe_bench.py [--arch resnet20 --size 32 --channels 3 --batch 128] [--rounds 5 --steps 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from training.config import make_config  # noqa: E402
from training.data import Batch  # noqa: E402
from training.models import create_model  # noqa: E402
from training.teachers import TEACHERS, Context  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--recipes", default="base,ast,ini,ltd")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="steps per recipe per round")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    c, s, n = args.channels, args.size, args.batch
    preset = "cifar10-resnet18" if c == 3 else "digits"
    cfg = make_config(preset, arch=args.arch, ood="noise", pgd_steps=10)

    def net():
        return create_model(args.arch, 10, c, s)

    x, pair = torch.rand(n, c, s, s), torch.rand(n, c, s, s)
    batch = Batch(x, torch.randint(0, 10, (n,)), torch.arange(n), pair=pair)
    base, shadow = net().eval(), net().eval()
    recipes = args.recipes.split(",")
    models = {r: net() for r in recipes}
    opts = {r: torch.optim.SGD(models[r].parameters(), lr=0.01, momentum=0.9) for r in recipes}

    def step(r: str) -> float:
        recipe, model, opt = TEACHERS[r], models[r], opts[r]
        model.train()
        t0 = time.perf_counter()
        loss, _, _ = recipe.loss(model, batch, Context(cfg, top_k=2, base=base, shadow=shadow))
        if not recipe.manual_backward:
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        return time.perf_counter() - t0

    for r in recipes:  # warm-up
        step(r)
    times = {r: [] for r in recipes}
    for _ in range(args.rounds):
        for r in recipes:
            times[r].append(statistics.median(step(r) for _ in range(args.steps)))
    med = {r: statistics.median(v) for r, v in times.items()}
    print(f"{args.arch}, batch {n} of {c}x{s}x{s}, {torch.get_num_threads()} threads; median step over "
          f"{args.rounds} rounds of {args.steps}")
    for r in recipes:
        vs_ast = f"{med[r] / med['ast']:.2f}x an AST step" if "ast" in med else ""
        vs_base = f"{med[r] / med['base']:.2f}x a base step" if "base" in med else ""
        spread = f"rounds {min(times[r]) * 1000:.0f}-{max(times[r]) * 1000:.0f} ms"
        print(f"  {r:6} {med[r] * 1000:8.1f} ms   {vs_ast:>18}   {vs_base:>18}   ({spread})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
