#!/usr/bin/env python
"""Extraction detection, measured through the real service: for each detector, how many queries each attack of the
suite sends before its key is flagged, how many benign keys are flagged, and what the detector adds to a request.

For every detector (knn calibrated first on benign streams of the training split, `python -m
evaluation.calibrate_detector`), one service (`python -m service`, API keys, the detector under policy `log`):
- attacks, each as its own key, in requests of 16 images, /v1/usage read after every request:
  `random` (natural queries from the training split, as astguard-steal plans them), `noise`, `smoothing` (3 crops
  of each image, in the attack's order) and `jbda` (the queries the jbda attack asks, captured in order from a run
  against the model in-process);
- benign traffic: `--benign-keys` keys, each sending `--benign` test images one at a time in a random order (a
  split smaller than that is cycled, each repeat a fresh crop, as a new photo would be);
- latency: the benign requests' mean time against the same traffic with detection off, as a ratio.

    python benchmarks/detect_bench.py [--model runs/x/model.onnx --dataset digits] [--budget 2000] [--redis]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from astguard.card import verified_card  # noqa: E402
from clients.attack.answers import TransferSet  # noqa: E402
from clients.attack.attacks import Setting, run_attack, smoothed_answers  # noqa: E402
from clients.attack.queries import NOISE, plan_queries  # noqa: E402
from clients.attack.student import StudentSpec  # noqa: E402
from clients.attack.victim import OnnxVictim, answers  # noqa: E402
from clients.client import encode_png  # noqa: E402
from evaluation.calibrate_detector import CalibrateConfig, benign_stream, calibrate  # noqa: E402
from service.process import free_port, running  # noqa: E402
from training.data import load_split  # noqa: E402


def attack_streams(model: Path, dataset: str, budget: int, work: Path) -> dict[str, torch.Tensor]:
    """The queries each attack sends, in order (uint8 [n, C, H, W])."""
    card = verified_card(model)
    c, h, w = card.input.channels, card.input.height, card.input.width
    natural, labels = plan_queries(f"{dataset}:train", budget, channels=c, size=(h, w), seed=1,
                                   cache_dir=work / ".cache")
    noise, _ = plan_queries(NOISE, budget, channels=c, size=(h, w), seed=2)
    victim = OnnxVictim(model)
    transfer = TransferSet(natural, labels, answers(victim, natural), {})
    asked: dict[str, list[torch.Tensor]] = {"smoothing": [], "jbda": []}

    def recorder(name):
        def ask(images, probs):
            asked[name].append(images.clone())
            return asyncio.run(victim.answer(images, probs))
        return ask

    spec = StudentSpec("digits_cnn" if h <= 16 else "cnn5", epochs=2)
    for name in ("smoothing", "jbda"):
        s = Setting(victim.card, victim.defense, recorder(name), transfer, None, None, spec, work / name,
                    torch.device("cpu"), reuse=False)
        if name == "smoothing":
            smoothed_answers(s, 3)
        else:
            run_attack("jbda", s)
    # jbda starts from the seed it already bought with the shared random queries: those come first.
    seed_size = max(1, budget // 16)
    return {"random": natural, "noise": noise, "smoothing": torch.cat(asked["smoothing"]),
            "jbda": torch.cat([natural[:seed_size], *asked["jbda"]])}


def send(client: httpx.Client, key: str, images: torch.Tensor, per_request: int) -> tuple[int | None, float]:
    """The images as `key`, in requests of `per_request`; the queries sent when /v1/usage first says flagged (None:
    never), and the mean seconds per request."""
    headers = {"Authorization": f"Bearer {key}"}
    flagged_at, seconds, n = None, 0.0, 0
    for i in range(0, len(images), per_request):
        blobs = [encode_png(x.numpy()) for x in images[i:i + per_request]]
        t0 = time.perf_counter()
        r = client.post("/predict", files=[("files", (f"{j}.png", b, "image/png")) for j, b in enumerate(blobs)],
                        headers=headers)
        seconds += time.perf_counter() - t0
        n += 1
        r.raise_for_status()
        if flagged_at is None and client.get("/v1/usage", headers=headers).json().get("extraction", {}).get("flagged"):
            flagged_at = i + len(blobs)
    return flagged_at, seconds / max(1, n)


def measure(model: Path, dataset: str, detector: str, threshold: float, streams: dict, benign: list[torch.Tensor],
            work: Path, backend: list[str]) -> dict:
    keys = [f"attack-{n}" for n in streams] + [f"benign-{i}" for i in range(len(benign))]
    db = work / f"detect-{detector}.sqlite"
    db.unlink(missing_ok=True)
    args = ["--api-keys", ",".join(keys), "--detector", detector, "--detector-threshold", str(threshold),
            "--detection-db", str(db), "--log-level", "warning", *backend,
            "--redis-prefix", f"astguard-bench-{detector}-{time.time_ns()}:"]  # every run starts with no state
    out = {"detector": detector, "attacks": {}, "benign_flagged": 0, "benign_keys": len(benign)}
    with running(model, *args, quiet=True) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        for name, images in streams.items():
            at, _ = send(client, f"attack-{name}", images, 16)
            out["attacks"][name] = {"flagged_after": at, "queries": len(images)}
        seconds = []
        for i, images in enumerate(benign):
            at, s = send(client, f"benign-{i}", images, 1)
            out["benign_flagged"] += at is not None
            seconds.append(s)
        out["seconds_per_image"] = float(np.mean(seconds))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=REPO / "runs" / "demo" / "digits-ast" / "model.onnx",
                   help="the served model (default: the demo's AST teacher; python -m evaluation.demo makes it)")
    p.add_argument("--dataset", default="digits", help="the data set: its train split is the thieves' and the "
                                                       "calibration's, its test split the benign users'")
    p.add_argument("--detectors", default="prada,knn")
    p.add_argument("--budget", type=int, default=2000, help="queries per attack")
    p.add_argument("--benign", type=int, default=2000, help="queries per benign key")
    p.add_argument("--benign-keys", type=int, default=3)
    p.add_argument("--redis", action="store_true", help="also measure the Redis store (a local redis-server)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    if not args.model.exists():
        raise SystemExit(f"detect_bench: no model at {args.model}; run python -m evaluation.demo first, or --model")
    work = Path(tempfile.mkdtemp(prefix="detect-bench-"))
    card = verified_card(args.model)
    c, h, w = card.input.channels, card.input.height, card.input.width
    print(f"model {card.name} ({c}x{h}x{w}); attack streams...", flush=True)
    streams = attack_streams(args.model, args.dataset, args.budget, work)
    _, test = load_split(f"{args.dataset}:test", "data", work / ".cache")
    benign = [benign_stream(test, args.benign, channels=c, size=(h, w), seed=1000 + i)
              for i in range(args.benign_keys)]
    calibration = calibrate(CalibrateConfig(model=args.model, dataset=f"{args.dataset}:train", keys=3,
                                            queries=min(args.benign, 2000)))
    print(f"knn threshold (0.1th percentile of benign training-split streams): {calibration['threshold']:.4g}")
    backends = [("sqlite", [])]
    redis_proc = None
    if args.redis and shutil.which("redis-server"):
        port = free_port()
        redis_proc = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
                                      stdout=subprocess.DEVNULL)
        import redis
        client = redis.Redis(port=port)
        for _ in range(200):  # until the server answers
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        backends.append(("redis", ["--budget-backend", "redis", "--redis-url", f"redis://127.0.0.1:{port}/0"]))
    results = {"model": card.name, "dataset": args.dataset, "threshold": calibration["threshold"], "runs": []}
    try:
        for backend, extra in backends:
            off = measure(args.model, args.dataset, "none", 0.0, {}, benign, work, extra)
            for detector in args.detectors.split(","):
                r = measure(args.model, args.dataset, detector, calibration["threshold"], streams, benign, work, extra)
                r["backend"], r["latency_ratio"] = backend, r["seconds_per_image"] / off["seconds_per_image"]
                results["runs"].append(r)
                print(f"\n[{backend}] {detector}: latency x{r['latency_ratio']:.2f} per 1-image request "
                      f"({r['seconds_per_image'] * 1000:.2f} ms vs {off['seconds_per_image'] * 1000:.2f} ms off); "
                      f"benign keys flagged {r['benign_flagged']}/{r['benign_keys']} ({args.benign} queries each)")
                for name, a in r["attacks"].items():
                    at = a["flagged_after"]
                    print(f"    {name:10} flagged after {at if at is not None else 'never'} of {a['queries']} queries")
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
