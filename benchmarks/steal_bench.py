#!/usr/bin/env python
"""Is the attacker the bottleneck? Its querying speed against the service's own maximum, in one run.

One service (`python -m service`, its defaults) on serve_bench's model (an untrained CIFAR-shaped ResNet-18,
cached under runs/.cache/bench/). In alternating rounds, at the same images per request and concurrency:
  (a) serve_bench's lean load generator (pre-built multipart bodies): the service's max images/s;
  (b) the attacker's own querying (clients.steal.query_victim: PNG encoding, the typed async client, JSON
      answers parsed into arrays) on fresh images.
Prints both and the ratio (target: attacker >= 0.9x the service's max).

    python benchmarks/steal_bench.py [--images-per-request 16] [--concurrency 4] [--rounds 2] [--seconds 6]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import numpy as np  # noqa: E402
import serve_bench  # noqa: E402
import torch  # noqa: E402

from clients.client import AsyncAstguardClient  # noqa: E402
from clients.attack.victim import query_victim  # noqa: E402
from service.process import running  # noqa: E402


async def attacker_round(url: str, images: torch.Tensor, per_request: int, concurrency: int) -> float:
    probs = np.full((len(images), 10), np.nan, np.float32)
    async with AsyncAstguardClient(url, concurrency=concurrency, batch_size=per_request) as client:
        _, seconds = await query_victim(client, images, probs, images_per_request=per_request,
                                        concurrency=concurrency, progress=False)
    assert not np.isnan(probs).any()
    return len(images) / seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images-per-request", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=6.0, help="length of each service-max round")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    bench_args = SimpleNamespace(model=None, weights=None, arch=args.arch, seed=args.seed, timeout=60.0,
                                 client="httpx")
    onnx_path, _, card = serve_bench.ensure_model(bench_args)
    c, h, w = card.input.channels, card.input.height, card.input.width
    k, conc = args.images_per_request, args.concurrency
    pngs, _ = serve_bench.make_pngs(64, c, h, w, seed=1)
    bodies, content_type = serve_bench.build_bodies(pngs, k, 8)
    lean, attacker = [], []
    with running(onnx_path, "--log-level", "warning", "--budget-db",
                 str(serve_bench.CACHE / "steal-bench-budgets.sqlite"), quiet=True) as r:
        server = SimpleNamespace(base=r.url, port=int(r.url.rsplit(":", 1)[1]), proc=r.proc, metrics=False)
        for i in range(args.rounds):
            seg = asyncio.run(serve_bench.drive(server, bodies, content_type, conc, k, bench_args,
                                                seconds=args.seconds, warmup=1.0, requests=None))
            lean.append(len(seg["latencies"]) * k / seg["wall"])
            # As many images as the service answers in a round, so both arms run about as long.
            n = max(k * conc * 4, int(lean[-1] * args.seconds) // k * k)
            images = torch.randint(0, 256, (n, c, h, w), generator=torch.Generator().manual_seed(i),
                                   dtype=torch.uint8)
            attacker.append(asyncio.run(attacker_round(r.url, images, k, conc)))
            print(f"round {i + 1}: service max {lean[-1]:7.1f} img/s   attacker {attacker[-1]:7.1f} img/s", flush=True)
    lean_m, att_m = statistics.median(lean), statistics.median(attacker)
    print(f"\n{args.arch}, {k} images per request, concurrency {conc}, {args.rounds} rounds (median)")
    print(f"  service max (lean load generator)  {lean_m:8.1f} img/s")
    print(f"  attacker (clients.steal)           {att_m:8.1f} img/s")
    print(f"  ratio attacker / service max: {att_m / lean_m:.2f}x  (target >= 0.9x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
