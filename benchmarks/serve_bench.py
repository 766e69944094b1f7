#!/usr/bin/env python
"""Throughput and latency of the astguard service over HTTP, against raw onnxruntime and a naive baseline.

In one run, on one model (by default an untrained CIFAR-shaped ResNet-18, exported once and cached under
runs/.cache/bench/):
  (0) raw onnxruntime in this process, with the server's session options and intra-op thread count, at the
      request batch size and at batch 1: the ceiling;
  (1) the real service (`python -m service`, micro-batching on, its defaults) driven over loopback by an async
      httpx client sending PNG images as multipart `files` to POST /predict:
        - "batch"  scenario: --images-per-request images per request (16) at --concurrency (4);
        - "single" scenario: 1 image per request at --single-concurrency (16);
  (2) the same service started with --no-micro-batching, "single" scenario;
  (3) a naive FastAPI + PyTorch eager server on the same weights (benchmarks/naive_torch_server.py), both
      scenarios.
and prints the ratios: service/raw onnxruntime (batch), micro-batching on/off (single), service/naive (both).

The client runs in this process and shares the machine's CPUs with the server: its CPU use (and that of any
other process on the machine) is measured and printed with every run. The client is kept lean: the multipart
bodies are built once, by hand, and POSTed as raw `content=`.

Run from the repository root:
    python benchmarks/serve_bench.py [--model PATH/model.onnx] [--seconds 8 | --requests N] [--warmup 2]
        [--concurrency 4] [--images-per-request 16] [--single-concurrency 16] [--max-batch-size 64]
        [--max-wait-ms 2] [--no-naive] [--json PATH]
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import resource
import secrets
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runs as a plain script, installed package or not

import numpy as np  # noqa: E402

CACHE = REPO / "runs" / ".cache" / "bench"
TARGETS = {"service_vs_ort_batch": 0.8, "micro_vs_nomicro_single": 1.3, "service_vs_naive_batch": 1.0,
           "service_vs_naive_single": 1.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", type=Path, default=None,
                   help="an existing export (model.onnx with model.json beside it); default: a cached untrained "
                        "resnet18 under runs/.cache/bench/")
    p.add_argument("--weights", type=Path, default=None,
                   help="torch weights for the naive baseline when --model is given (default: model.pt or "
                        "checkpoint.pt beside the model; the naive baseline is skipped when there is none)")
    p.add_argument("--arch", default="resnet18", help="architecture of the generated model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per load run")
    p.add_argument("--requests", type=int, default=None, help="measure this many requests instead of --seconds")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring, per run")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight, batch scenario")
    p.add_argument("--images-per-request", type=int, default=16, help="images per request, batch scenario")
    p.add_argument("--single-concurrency", type=int, default=16, help="requests in flight, single-image scenario")
    p.add_argument("--max-batch-size", type=int, default=None, help="passed to the service (default: its own)")
    p.add_argument("--max-wait-ms", type=float, default=None, help="passed to the service (default: its own)")
    p.add_argument("--server-args", default="", help="extra options for both service runs, e.g. "
                                                      "\"--intra-op-threads 1\"")
    p.add_argument("--ort-seconds", type=float, default=3.0, help="seconds per raw onnxruntime measurement")
    p.add_argument("--no-naive", action="store_true", help="skip the naive PyTorch baseline")
    p.add_argument("--naive-torch-threads", type=int, default=None,
                   help="torch.set_num_threads in the naive server (default: torch's own)")
    p.add_argument("--distinct-bodies", type=int, default=8, help="distinct request bodies cycled by the client")
    p.add_argument("--timeout", type=float, default=60.0, help="client timeout per request, seconds")
    p.add_argument("--json", type=Path, default=None, help="also write every figure here")
    return p.parse_args(argv)


# ---------------------------------------------------------------- CPU accounting

TICK = os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0, 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])  # guest time is already inside user
    return (total - idle) / TICK, total / TICK


def process_cpu(pid: int) -> float:
    """user + system CPU seconds of a process and its threads (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def background_load(seconds: float = 1.0) -> float:
    """CPUs kept busy by everything on the machine over `seconds` while this script sleeps."""
    b0, _ = machine_cpu()
    time.sleep(seconds)
    b1, _ = machine_cpu()
    return (b1 - b0) / seconds


# ---------------------------------------------------------------- the model

def ensure_model(args) -> tuple[Path, Path | None, dict]:
    """(model.onnx, torch weights for the naive baseline or None, card)."""
    if args.model is not None:
        onnx_path = args.model.resolve()
        card_path = next((p for p in (onnx_path.with_suffix(".json"), onnx_path.parent / "model.json")
                          if p.is_file()), None)
        if not onnx_path.is_file() or card_path is None:
            raise SystemExit(f"serve_bench: {onnx_path} needs to exist with its model card model.json beside it")
        card = json.loads(card_path.read_text())
        weights = args.weights
        if weights is None:
            for cand in (onnx_path.parent / "model.pt", onnx_path.parent / "checkpoint.pt"):
                if cand.is_file():
                    weights = cand
                    break
        return onnx_path, weights, card

    from training.export import sha256_file

    out = CACHE / f"{args.arch}-c10-seed{args.seed}"
    onnx_path, card_path, weights = out / "model.onnx", out / "model.json", out / "model.pt"
    if onnx_path.is_file() and card_path.is_file() and weights.is_file():
        card = json.loads(card_path.read_text())
        if card.get("sha256") == sha256_file(onnx_path):
            print(f"model: reusing {onnx_path.relative_to(REPO)}", flush=True)
            return onnx_path, weights, card
    import torch

    from training.export import export_verified
    from training.models import create_model

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    model = create_model(args.arch, 10).eval()  # untrained weights: fine for throughput
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    card = {"name": f"bench-{args.arch}", "version": "1", "class_names": classes,
            "teacher": {"type": "base", "summary": "untrained weights, for throughput benchmarks only",
                        "hyperparameters": {}},
            "dataset": {"name": "synthetic", "spec": None, "num_classes": 10, "mean": [0.0] * 3, "std": [1.0] * 3},
            "training": {"arch": args.arch, "seed": args.seed, "epochs": 0}}
    card = export_verified(model, out, sample=torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
                           card=card)
    torch.save({"arch": args.arch, "num_classes": 10, "in_channels": 3, "image_size": 32,
                "state_dict": model.state_dict()}, weights)
    print(f"model: exported {onnx_path.relative_to(REPO)} in {time.perf_counter() - t0:.1f}s", flush=True)
    return onnx_path, weights, card


def naive_weight_args(weights: Path, card: dict) -> list[str]:
    """Extra naive-server options for a training checkpoint.pt (serve_bench's own model.pt needs none)."""
    if weights.name == "model.pt":
        return []
    arch = (card.get("training") or {}).get("arch")
    _, c, h, _ = card["input"]["shape"]
    return ["--arch", str(arch), "--num-classes", str(len(card["class_names"])), "--in-channels", str(c),
            "--image-size", str(h)]


# ---------------------------------------------------------------- request bodies

def make_pngs(n: int, channels: int, height: int, width: int, seed: int) -> tuple[list[bytes], np.ndarray]:
    """n smooth random images as PNG bytes (about the size of CIFAR PNGs), and the same images as float32 NCHW."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    blobs, arrays = [], []
    for _ in range(n):
        coarse = rng.integers(0, 256, (height // 4, width // 4, channels), dtype=np.uint8)
        img = np.kron(coarse, np.ones((4, 4, 1), np.uint8)).astype(np.int16)
        img = np.clip(img + rng.integers(-24, 25, img.shape), 0, 255).astype(np.uint8)
        pil = Image.fromarray(img[..., 0] if channels == 1 else img, "L" if channels == 1 else "RGB")
        buf = io.BytesIO()
        pil.save(buf, format="PNG")
        blobs.append(buf.getvalue())
        arrays.append(img.astype(np.float32).transpose(2, 0, 1) / 255.0)
    return blobs, np.stack(arrays)


def multipart_body(pngs: list[bytes], boundary: str) -> bytes:
    parts = []
    for i, png in enumerate(pngs):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="img{i}.png"\r\n'
                     f"Content-Type: image/png\r\n\r\n".encode() + png + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


def build_bodies(pngs: list[bytes], per_request: int, distinct: int) -> tuple[list[bytes], str]:
    boundary = "astguardbench" + secrets.token_hex(8)
    bodies = []
    for k in range(distinct):
        chosen = [pngs[(k * per_request + j) % len(pngs)] for j in range(per_request)]
        bodies.append(multipart_body(chosen, boundary))
    return bodies, f"multipart/form-data; boundary={boundary}"


# ---------------------------------------------------------------- raw onnxruntime

def raw_ort(onnx_path: Path, images: np.ndarray, batch: int, threads: int, seconds: float) -> dict:
    """The service's session options (runtime.OnnxModel), in this process, one call after another."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = np.ascontiguousarray(np.resize(images, (batch,) + images.shape[1:]), np.float32)
    for _ in range(3):
        session.run(["probabilities"], {name: x})
    calls, times = 0, []
    c0 = self_cpu()
    t0 = time.perf_counter()
    while True:
        s = time.perf_counter()
        session.run(["probabilities"], {name: x})
        e = time.perf_counter()
        times.append(e - s)
        calls += 1
        if e - t0 >= seconds and calls >= 3:
            break
    wall = time.perf_counter() - t0
    cpu = self_cpu() - c0
    del session
    return {"batch": batch, "intra_op_threads": threads, "calls": calls, "images_per_s": calls * batch / wall,
            "ms_per_call_median": 1000 * statistics.median(times), "cpu_cores_used": cpu / wall}


# ---------------------------------------------------------------- servers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess on a free loopback port; stopped with SIGINT (then SIGKILL) at the end."""

    def __init__(self, label: str, cmd_tail: list[str], health_path: str, env: dict | None = None):
        self.label, self.port = label, free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, *cmd_tail, "--host", "127.0.0.1", "--port", str(self.port)]
        self.health_path, self.env = health_path, env
        self.log_path = CACHE / "logs" / f"{label}.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        import httpx

        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"serve_bench: {self.label} exited with {self.proc.returncode} before it was ready:\n"
                                 + self.log_tail())
            try:
                if httpx.get(self.base + self.health_path, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise SystemExit(f"serve_bench: {self.label} not ready after 180 s:\n" + self.log_tail())
            time.sleep(0.1)
        self.startup_s = time.perf_counter() - t0
        print(f"  [{self.label}] ready on port {self.port} in {self.startup_s:.1f}s "
              f"(pid {self.proc.pid}; log {self.log_path.relative_to(REPO)})", flush=True)
        return self

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def service_env(args) -> dict:
    """This environment minus any ASTGUARD_* settings (the runs measure the defaults and the options given),
    with the budget database under the cache instead of the working directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASTGUARD_")}
    dropped = sorted(set(os.environ) - set(env))
    if dropped:
        print(f"note: not passing {', '.join(dropped)} to the service", flush=True)
    env["ASTGUARD_BUDGET_DB"] = str(CACHE / "budgets.sqlite")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def service_cmd(args, onnx_path: Path, micro: bool) -> list[str]:
    cmd = ["-m", "service", "--model", str(onnx_path), "--log-level", "warning"]
    if not micro:
        cmd.append("--no-micro-batching")
    if args.max_batch_size is not None:
        cmd += ["--max-batch-size", str(args.max_batch_size)]
    if args.max_wait_ms is not None:
        cmd += ["--max-wait-ms", str(args.max_wait_ms)]
    return cmd + shlex.split(args.server_args)


# ---------------------------------------------------------------- the load generator

def parse_metrics(text: str) -> dict:
    wanted = ("astguard_batch_images_sum", "astguard_batch_images_count", "astguard_compute_seconds_sum",
              "astguard_queue_seconds_sum", "astguard_queue_seconds_count")
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            out[name] = float(value)
    return out


async def drive(server: Server, bodies: list[bytes], content_type: str, concurrency: int, per_request: int,
                args, scrape_metrics: bool) -> dict:
    """Closed loop: `concurrency` workers, each sending its next request when the last one is answered.
    Throughput counts the requests completed inside the measured window; latency is theirs too."""
    import httpx

    url = server.base + "/predict"
    headers = {"content-type": content_type}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    window = {"start": float("inf"), "end": float("inf")}
    latencies: list[float] = []
    errors: list[str] = []
    checked = []
    stop = asyncio.Event()
    enough = asyncio.Event()

    async with httpx.AsyncClient(limits=limits, timeout=args.timeout) as client, \
            httpx.AsyncClient(timeout=args.timeout) as side:
        async def worker(i: int):
            k = i
            while not stop.is_set():
                body = bodies[k % len(bodies)]
                k += concurrency
                t0 = time.perf_counter()
                ok, problem = True, None
                try:
                    r = await client.post(url, content=body, headers=headers)
                    if r.status_code != 200:
                        ok, problem = False, f"HTTP {r.status_code}: {r.text[:200]}"
                    elif not checked:
                        checked.append(True)
                        n = len(r.json()["predictions"])
                        if n != per_request:
                            ok, problem = False, f"{n} predictions for {per_request} images"
                except Exception as e:  # noqa: BLE001 - every failure is counted, and a sample is shown
                    ok, problem = False, f"{type(e).__name__}: {e}"
                t1 = time.perf_counter()
                if window["start"] <= t1 <= window["end"]:
                    if ok:
                        latencies.append(t1 - t0)
                        if args.requests and len(latencies) >= args.requests:
                            window["end"] = t1
                            enough.set()
                    else:
                        errors.append(problem)
                elif not ok and t1 < window["start"]:
                    errors.append(f"(warm-up) {problem}")

        def snapshot() -> dict:
            busy, _ = machine_cpu()
            return {"t": time.perf_counter(), "client": self_cpu(), "server": process_cpu(server.proc.pid),
                    "machine": busy, "metrics": {}}

        async def scrape(snap: dict) -> None:
            # The server's own counters, over a connection of their own: the load's connections are all busy,
            # and a scrape queued behind them would wait long for a free one.
            if scrape_metrics:
                try:
                    snap["metrics"] = parse_metrics((await side.get(server.base + "/metrics")).text)
                except httpx.HTTPError:
                    pass

        tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
        await asyncio.sleep(args.warmup)
        s0 = snapshot()
        window["start"] = s0["t"]  # requests completed from here on are measured
        await scrape(s0)
        if args.requests:
            try:
                await asyncio.wait_for(enough.wait(), timeout=max(600.0, args.timeout))
            except asyncio.TimeoutError:
                pass
        else:
            await asyncio.sleep(max(0.0, s0["t"] + args.seconds - time.perf_counter()))
        s1 = snapshot()
        window["end"] = min(window["end"], s1["t"])
        await scrape(s1)
        stop.set()
        await asyncio.gather(*tasks)

    wall = window["end"] - window["start"]
    wall_cpu = s1["t"] - s0["t"]
    n = len(latencies)
    lat_ms = np.array(latencies) * 1000 if n else np.array([float("nan")])
    client_cores = (s1["client"] - s0["client"]) / wall_cpu
    server_cores = (s1["server"] - s0["server"]) / wall_cpu
    machine_cores = (s1["machine"] - s0["machine"]) / wall_cpu
    result = {
        "concurrency": concurrency, "images_per_request": per_request, "seconds": wall, "requests": n,
        "images_per_s": n * per_request / wall, "requests_per_s": n / wall,
        "latency_ms": {"p50": float(np.percentile(lat_ms, 50)), "p99": float(np.percentile(lat_ms, 99)),
                       "mean": float(lat_ms.mean())},
        "errors": len([e for e in errors if not e.startswith("(warm-up)")]),
        "warmup_errors": len([e for e in errors if e.startswith("(warm-up)")]),
        "error_samples": sorted(set(errors))[:3],
        "cpu_cores": {"server": server_cores, "client": client_cores,
                      "other": max(0.0, machine_cores - server_cores - client_cores)},
        "server_cpu_ms_per_request": 1000 * (s1["server"] - s0["server"]) / max(n, 1),
        "client_cpu_ms_per_request": 1000 * (s1["client"] - s0["client"]) / max(n, 1),
    }
    m0, m1 = s0["metrics"], s1["metrics"]
    if m0 and m1:
        calls = m1["astguard_batch_images_count"] - m0["astguard_batch_images_count"]
        q = m1["astguard_queue_seconds_count"] - m0["astguard_queue_seconds_count"]
        if calls > 0:
            compute = m1["astguard_compute_seconds_sum"] - m0["astguard_compute_seconds_sum"]
            result["server_model"] = {
                "onnxruntime_calls": int(calls),
                "mean_images_per_call": (m1["astguard_batch_images_sum"] - m0["astguard_batch_images_sum"]) / calls,
                "compute_busy_fraction": compute / wall_cpu,
                "compute_ms_per_call": 1000 * compute / calls,
                "queue_ms_mean": 1000 * (m1["astguard_queue_seconds_sum"] - m0["astguard_queue_seconds_sum"])
                / max(q, 1)}
    return result


def show(label: str, r: dict) -> None:
    c = r["cpu_cores"]
    line = (f"  {label:<44} {r['images_per_s']:8.1f} img/s  {r['requests_per_s']:7.1f} req/s  "
            f"p50 {r['latency_ms']['p50']:7.1f} ms  p99 {r['latency_ms']['p99']:7.1f} ms  errors {r['errors']}")
    print(line)
    extra = (f"      cpu cores: server {c['server']:.2f}, client {c['client']:.2f}, other processes {c['other']:.2f}"
             f"  | cpu ms/request: server {r['server_cpu_ms_per_request']:.2f}, "
             f"client {r['client_cpu_ms_per_request']:.2f}")
    if "server_model" in r:
        m = r["server_model"]
        extra += (f"\n      onnxruntime: {m['onnxruntime_calls']} calls, {m['mean_images_per_call']:.1f} img/call, "
                  f"{m['compute_ms_per_call']:.1f} ms/call, busy {100 * m['compute_busy_fraction']:.0f}% of wall, "
                  f"queue wait {m['queue_ms_mean']:.1f} ms")
    print(extra)
    for e in r["error_samples"]:
        print(f"      error sample: {e}")
    sys.stdout.flush()


def run_load(server: Server, label: str, bodies, ctype, concurrency, per_request, args, results: dict,
             key: str, scrape_metrics: bool) -> dict:
    r = asyncio.run(drive(server, bodies, ctype, concurrency, per_request, args, scrape_metrics))
    r["server"] = server.label
    results["load"][key] = r
    show(label, r)
    return r


# ---------------------------------------------------------------- main

def ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or not b.get("images_per_s"):
        return None
    return a["images_per_s"] / b["images_per_s"]


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    CACHE.mkdir(parents=True, exist_ok=True)
    from service.config import cpu_limit

    threads = cpu_limit()
    ipr = args.images_per_request
    results: dict = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "machine": {"cpus": os.cpu_count(), "cpu_limit": threads, "python": platform.python_version(),
                                 "platform": platform.platform()},
                     "ort": {}, "load": {}}
    import onnxruntime
    results["machine"]["onnxruntime"] = onnxruntime.__version__

    onnx_path, weights, card = ensure_model(args)
    _, channels, height, width = card["input"]["shape"]
    results["model"] = {"path": str(onnx_path), "name": card.get("name"), "sha256": card.get("sha256"),
                        "input": card["input"]["shape"], "naive_weights": str(weights) if weights else None}

    pngs, arrays = make_pngs(64, channels, height, width, args.seed)
    batch_bodies, ctype = build_bodies(pngs, ipr, args.distinct_bodies)
    single_bodies, ctype1 = build_bodies(pngs, 1, max(args.distinct_bodies, 16))
    print(f"requests: {ipr}-image bodies of ~{len(batch_bodies[0]) / 1024:.1f} KiB, 1-image bodies of "
          f"~{len(single_bodies[0]) / 1024:.1f} KiB (PNG {channels}x{height}x{width})")

    idle = background_load(1.0)
    results["machine"]["busy_cpus_before_start"] = idle
    print(f"machine: {os.cpu_count()} CPUs (server default intra-op threads: {threads}); "
          f"{idle:.2f} CPUs busy before start")
    if idle > 0.25:
        print(f"WARNING: other processes keep {idle:.2f} of {os.cpu_count()} CPUs busy: every figure below is "
              "lowered by them; compare only figures taken at the same time", flush=True)
    print("NOTE: the load generator runs in this process on the same CPUs as the server; its CPU use is printed "
          "per run ('client').", flush=True)

    # (0) raw onnxruntime
    print(f"\n[raw onnxruntime in-process, {threads} intra-op threads, server session options]", flush=True)
    for b in sorted({ipr, 1}, reverse=True):
        r = raw_ort(onnx_path, arrays, b, threads, args.ort_seconds)
        results["ort"][f"batch_{b}"] = r
        print(f"  batch {b:<3} {r['images_per_s']:8.1f} img/s  {r['ms_per_call_median']:7.2f} ms/call (median)  "
              f"cpu cores {r['cpu_cores_used']:.2f}", flush=True)

    env = service_env(args)
    batch_label = f"{ipr} img/request, c={args.concurrency}"
    single_label = f"1 img/request, c={args.single_concurrency}"

    # (1) the service, micro-batching on
    print("\n[service, micro-batching on]", flush=True)
    with Server("service-micro", service_cmd(args, onnx_path, True), "/v2/health/ready", env) as srv:
        run_load(srv, f"service {batch_label}", batch_bodies, ctype, args.concurrency, ipr, args, results,
                 "service_batch", True)
        run_load(srv, f"service {single_label}", single_bodies, ctype1, args.single_concurrency, 1, args, results,
                 "service_single", True)

    # (2) the service, micro-batching off
    print("\n[service, --no-micro-batching]", flush=True)
    with Server("service-nomicro", service_cmd(args, onnx_path, False), "/v2/health/ready", env) as srv:
        run_load(srv, f"service no-micro {single_label}", single_bodies, ctype1, args.single_concurrency, 1, args,
                 results, "service_nomicro_single", True)

    # (3) the naive baseline
    if args.no_naive:
        print("\n[naive baseline skipped: --no-naive]")
    elif weights is None:
        print(f"\n[naive baseline skipped: no torch weights for {onnx_path} (give --weights)]")
    else:
        print("\n[naive FastAPI + PyTorch eager baseline]", flush=True)
        cmd = [str(REPO / "benchmarks" / "naive_torch_server.py"), "--weights", str(weights),
               *naive_weight_args(weights, card)]
        if args.naive_torch_threads:
            cmd += ["--torch-threads", str(args.naive_torch_threads)]
        with Server("naive-torch", cmd, "/health", env) as srv:
            run_load(srv, f"naive {batch_label}", batch_bodies, ctype, args.concurrency, ipr, args, results,
                     "naive_batch", False)
            run_load(srv, f"naive {single_label}", single_bodies, ctype1, args.single_concurrency, 1, args,
                     results, "naive_single", False)

    load, ort = results["load"], results["ort"]
    ratios = {
        "service_vs_ort_batch": ratio(load.get("service_batch"), ort.get(f"batch_{ipr}")),
        "micro_vs_nomicro_single": ratio(load.get("service_single"), load.get("service_nomicro_single")),
        "service_vs_naive_batch": ratio(load.get("service_batch"), load.get("naive_batch")),
        "service_vs_naive_single": ratio(load.get("service_single"), load.get("naive_single")),
    }
    results["ratios"] = ratios
    results["targets"] = TARGETS
    wall = time.perf_counter() - t_start
    results["wall_seconds"] = wall

    def fig(key: str, src: dict) -> str:
        return f"{src[key]['images_per_s']:.1f}" if key in src else "n/a"

    def verdict(name: str) -> str:
        r, t = ratios[name], TARGETS[name]
        if r is None:
            return "n/a"
        ok = r >= t if name == "micro_vs_nomicro_single" or name == "service_vs_ort_batch" else r > t
        return f"{r:.2f}x  (target {'>=' if name in ('service_vs_ort_batch', 'micro_vs_nomicro_single') else '>'} " \
               f"{t:g}x: {'met' if ok else 'MISSED'})"

    print("\n" + "=" * 100)
    print("SUMMARY (images/s; the client shares the CPUs with the server, see 'cpu cores' above)")
    print(f"  {ipr}-image requests, c={args.concurrency}: service {fig('service_batch', load)} img/s vs raw "
          f"onnxruntime batch {ipr} {fig(f'batch_{ipr}', ort)} img/s")
    print(f"      ratio service / raw onnxruntime      = {verdict('service_vs_ort_batch')}")
    print(f"  1-image requests, c={args.single_concurrency}: micro-batching {fig('service_single', load)} img/s vs "
          f"--no-micro-batching {fig('service_nomicro_single', load)} img/s")
    print(f"      ratio micro / no-micro               = {verdict('micro_vs_nomicro_single')}")
    print(f"  service vs naive torch, {ipr}-image c={args.concurrency}: {fig('service_batch', load)} vs "
          f"{fig('naive_batch', load)} img/s")
    print(f"      ratio service / naive                = {verdict('service_vs_naive_batch')}")
    print(f"  service vs naive torch, 1-image c={args.single_concurrency}: {fig('service_single', load)} vs "
          f"{fig('naive_single', load)} img/s")
    print(f"      ratio service / naive                = {verdict('service_vs_naive_single')}")
    errs = sum(r["errors"] for r in load.values())
    print(f"  errors in measured windows: {errs}; wall time {wall:.0f}s")
    print("=" * 100, flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
