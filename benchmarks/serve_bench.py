#!/usr/bin/env python
"""Throughput and latency of the astguard service over HTTP, against raw onnxruntime and a naive baseline.

In one run, on one model (by default an untrained CIFAR-shaped ResNet-18, exported once and cached under
runs/.cache/bench/), three servers are started on free loopback ports and driven in turn:
  (0) raw onnxruntime in this process, with the service's session options and intra-op thread count (all CPUs
      available), at the request batch size and at batch 1: the ceiling;
  (1) the real service (`python -m service`, micro-batching on, its defaults), POST /predict with PNG images as
      multipart `files`:
        - "batch"  scenario: --images-per-request images per request (16) at --concurrency (4);
        - "single" scenario: 1 image per request at --single-concurrency (16);
  (2) the same service started with --no-micro-batching, "single" scenario;
  (3) a naive FastAPI + PyTorch eager server on the same weights (benchmarks/naive_torch_server.py), both
      scenarios.
It prints the ratios: service / raw onnxruntime (batch), micro-batching on / off (single), service / naive
(both). The scenarios take turns (--rounds), so that drift on the machine hits them alike.

The load generator is closed-loop (each of `concurrency` workers sends its next request when its last one is
answered) and runs in this process, on the same CPUs as the servers: its CPU use, and that of any other process
on the machine, is measured and printed per scenario. It is kept lean: the multipart bodies are built once, by
hand, and POSTed as raw bytes (`--client httpx`, the default: httpx.AsyncClient, about 1 ms of CPU per request;
`--client raw`: pre-built HTTP/1.1 requests on asyncio streams, about 0.1 ms).

Run from the repository root (about 90 s with the defaults on 2 CPUs, plus about 10 s for the first export):
    python benchmarks/serve_bench.py [--model PATH/model.onnx] [--seconds 9 | --requests N] [--rounds 3]
        [--concurrency 4] [--images-per-request 16] [--single-concurrency 16] [--client httpx|raw]
        [--max-batch-size N] [--max-wait-ms MS] [--server-args "..."] [--no-naive] [--json PATH]
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import resource
import secrets
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runs as a plain script, installed package or not

import numpy as np  # noqa: E402

from astguard.card import PROBABILITIES, CardError, DatasetInfo, ModelCard, TeacherInfo, verified_card  # noqa: E402
from service.process import free_port  # noqa: E402

CACHE = REPO / "runs" / ".cache" / "bench"
TARGETS = {"service_vs_ort_batch": (">=", 0.8), "micro_vs_nomicro_single": (">=", 1.3),
           "service_vs_naive_batch": (">", 1.0), "service_vs_naive_single": (">", 1.0)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", type=Path, default=None,
                   help="an existing export (model.onnx with model.json beside it); default: a cached untrained "
                        "resnet18 under runs/.cache/bench/")
    p.add_argument("--weights", type=Path, default=None,
                   help="torch weights for the naive baseline when --model is given (default: model.pt or "
                        "checkpoint.pt beside the model; the naive baseline is skipped when there is none)")
    p.add_argument("--arch", default="resnet18",
                   help="architecture of the generated model: one taking 3x32x32 images (resnet18, resnet20 ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seconds", type=float, default=9.0,
                   help="measured seconds per scenario, split over the rounds")
    p.add_argument("--requests", type=int, default=None,
                   help="measure this many requests per scenario (split over the rounds) instead of --seconds")
    p.add_argument("--rounds", type=int, default=3,
                   help="the scenarios take turns this many times, so that drift on the machine hits all alike")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load before a scenario's "
                                                              "first round")
    p.add_argument("--round-warmup", type=float, default=1.0, help="the same before its later rounds")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight, batch scenario")
    p.add_argument("--images-per-request", type=int, default=16, help="images per request, batch scenario")
    p.add_argument("--single-concurrency", type=int, default=16, help="requests in flight, single-image scenario")
    p.add_argument("--max-batch-size", type=int, default=None, help="passed to the service (default: its own)")
    p.add_argument("--max-wait-ms", type=float, default=None, help="passed to the service (default: its own)")
    p.add_argument("--server-args", default="", help="extra options for both service runs, e.g. "
                                                      "\"--intra-op-threads 1\"")
    p.add_argument("--ort-seconds", type=float, default=4.5,
                   help="seconds per raw onnxruntime batch size, split over the rounds")
    p.add_argument("--no-naive", action="store_true", help="skip the naive PyTorch baseline")
    p.add_argument("--naive-torch-threads", type=int, default=None,
                   help="torch.set_num_threads in the naive server (default: torch's own)")
    p.add_argument("--client", choices=("httpx", "raw"), default="httpx",
                   help="httpx: httpx.AsyncClient posting pre-built multipart bytes (default); raw: a minimal "
                        "asyncio HTTP/1.1 keep-alive client writing pre-built requests (far less client CPU)")
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

def ensure_model(args) -> tuple[Path, Path | None, ModelCard]:
    """(model.onnx, torch weights for the naive baseline or None, card)."""
    if args.model is not None:
        onnx_path = args.model.resolve()
        try:
            card = verified_card(onnx_path)
        except CardError as e:
            raise SystemExit(f"serve_bench: {e}") from None
        weights = args.weights
        if weights is None:
            for cand in (onnx_path.parent / "model.pt", onnx_path.parent / "checkpoint.pt"):
                if cand.is_file():
                    weights = cand
                    break
        return onnx_path, weights, card

    out = CACHE / f"{args.arch}-c10-seed{args.seed}"
    onnx_path, weights = out / "model.onnx", out / "model.pt"
    if weights.is_file():
        try:
            card = verified_card(onnx_path)
            print(f"model: reusing {onnx_path.relative_to(REPO)}", flush=True)
            return onnx_path, weights, card
        except CardError:
            pass  # missing or stale: export again
    import torch

    from training.export import export_verified
    from training.models import create_model

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    model = create_model(args.arch, 10).eval()  # untrained weights: fine for throughput
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    card = export_verified(
        model, out, sample=torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
        name=f"bench-{args.arch}", version="1", class_names=classes,
        teacher=TeacherInfo("base", "untrained weights, for throughput benchmarks only"),
        dataset=DatasetInfo("synthetic", "", 0, 0, 10, (0.0,) * 3, (1.0,) * 3), accuracy={},
        training={"arch": args.arch, "seed": args.seed, "epochs": 0})
    torch.save({"arch": args.arch, "num_classes": 10, "in_channels": 3, "image_size": 32,
                "state_dict": model.state_dict()}, weights)
    print(f"model: exported {onnx_path.relative_to(REPO)} in {time.perf_counter() - t0:.1f}s", flush=True)
    return onnx_path, weights, card


def naive_weight_args(weights: Path, card: ModelCard) -> list[str]:
    """Extra naive-server options for a training checkpoint.pt (serve_bench's own model.pt needs none)."""
    if weights.name == "model.pt":
        return []
    return ["--arch", str(card.training.get("arch")), "--num-classes", str(card.num_classes), "--in-channels",
            str(card.input.channels), "--image-size", str(card.input.height)]


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

class OrtBench:
    """Raw onnxruntime in this process with the service's session options (service.runtime.OnnxModel): one call
    after another on a ready input array, nothing else."""

    def __init__(self, onnx_path: Path, images: np.ndarray, threads: int):
        import onnxruntime as ort

        from service.runtime import session_options

        self.session = ort.InferenceSession(str(onnx_path), session_options(threads),
                                            providers=["CPUExecutionProvider"])
        self.name, self.images = self.session.get_inputs()[0].name, images

    def measure(self, batch: int, seconds: float) -> dict:
        x = np.ascontiguousarray(np.resize(self.images, (batch,) + self.images.shape[1:]), np.float32)
        for _ in range(3):
            self.session.run([PROBABILITIES], {self.name: x})
        times = []
        m0, c0, t0 = machine_cpu()[0], self_cpu(), time.perf_counter()
        while True:
            s = time.perf_counter()
            self.session.run([PROBABILITIES], {self.name: x})
            e = time.perf_counter()
            times.append(e - s)
            if e - t0 >= seconds and len(times) >= 3:
                break
        wall, cpu = time.perf_counter() - t0, self_cpu() - c0
        return {"wall": wall, "cpu": cpu, "other": max(0.0, machine_cpu()[0] - m0 - cpu), "images": batch * len(times),
                "times": times}

    @staticmethod
    def summarize(parts: list[dict], batch: int, threads: int) -> dict:
        wall = sum(p["wall"] for p in parts)
        times = [t for p in parts for t in p["times"]]
        return {"batch": batch, "intra_op_threads": threads, "calls": len(times),
                "images_per_s": sum(p["images"] for p in parts) / wall,
                "images_per_s_by_round": [p["images"] / p["wall"] for p in parts],
                "ms_per_call_median": 1000 * statistics.median(times),
                "cpu_cores_used": sum(p["cpu"] for p in parts) / wall,
                "other_cpu_cores": sum(p["other"] for p in parts) / wall}

    def close(self) -> None:
        del self.session  # its threads go too: none is left spinning beside the load generator


# ---------------------------------------------------------------- servers

class Server:
    """A server subprocess on a free loopback port; stopped with SIGINT (then SIGKILL) at the end."""

    def __init__(self, label: str, cmd_tail: list[str], health_path: str, env: dict | None = None,
                 metrics: bool = False):
        self.label, self.port, self.metrics = label, free_port(), metrics
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


def server_threads(server_args: str, default: int) -> int:
    """The intra-op thread count the service will use: --intra-op-threads in --server-args, ASTGUARD_* being
    dropped, else its default (the CPUs available, service.config.cpu_limit)."""
    words = shlex.split(server_args)
    for i, w in enumerate(words):
        if w == "--intra-op-threads" and i + 1 < len(words):
            return int(words[i + 1])
        if w.startswith("--intra-op-threads="):
            return int(w.split("=", 1)[1])
    return default


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


class RawConnection:
    """One keep-alive HTTP/1.1 connection that writes pre-built request bytes and reads one response each."""

    def __init__(self, host: str, port: int):
        self.host, self.port, self.reader, self.writer = host, port, None, None

    async def request(self, data: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        try:
            self.writer.write(data)
            head = await self.reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            headers = {}
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            if b"content-length" in headers:
                body = await self.reader.readexactly(int(headers[b"content-length"]))
            elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                chunks = []
                while True:
                    size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    chunks.append(await self.reader.readexactly(size + 2))
                    if size == 0:
                        break
                body = b"".join(c[:-2] for c in chunks)
            else:
                body = await self.reader.read()
            if headers.get(b"connection", b"").lower() == b"close":
                await self.close()
            return status, body
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
            self.reader = self.writer = None


async def drive(server: Server, bodies: list[bytes], content_type: str, concurrency: int, per_request: int,
                args, seconds: float, warmup: float, requests: int | None) -> dict:
    """One measured segment. Closed loop: `concurrency` workers, each sending its next request when its last one
    is answered. The requests completed inside the window count (throughput and latency); returns raw sums."""
    import httpx

    url = server.base + "/predict"
    headers = {"content-type": content_type}
    raw_requests = [f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(b)}\r\n\r\n".encode() + b for b in bodies]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    window = {"start": float("inf"), "end": float("inf")}
    latencies: list[float] = []
    errors: list[str] = []
    checked: list[bool] = []
    stop, enough = asyncio.Event(), asyncio.Event()

    async with httpx.AsyncClient(limits=limits, timeout=args.timeout) as client, \
            httpx.AsyncClient(timeout=args.timeout) as side:
        async def worker(i: int):
            k = i
            conn = RawConnection("127.0.0.1", server.port) if args.client == "raw" else None
            while not stop.is_set():
                j = k % len(bodies)
                k += concurrency
                t0 = time.perf_counter()
                ok, problem = True, None
                try:
                    if conn is not None:
                        status, content = await asyncio.wait_for(conn.request(raw_requests[j]), args.timeout)
                    else:
                        r = await client.post(url, content=bodies[j], headers=headers)
                        status, content = r.status_code, r.content
                    if status != 200:
                        ok, problem = False, f"HTTP {status}: {content[:200].decode(errors='replace')}"
                    elif not checked:  # the first answer is checked in full; the rest by status only
                        checked.append(True)
                        n = len(json.loads(content)["predictions"])
                        if n != per_request:
                            ok, problem = False, f"{n} predictions for {per_request} images"
                except Exception as e:  # noqa: BLE001 - every failure is counted, and a sample is shown
                    ok, problem = False, f"{type(e).__name__}: {e}"
                t1 = time.perf_counter()
                if window["start"] <= t1 <= window["end"]:
                    if ok:
                        latencies.append(t1 - t0)
                    else:
                        errors.append(problem)
                    if requests and len(latencies) + len(errors) >= requests:  # answered, well or not
                        window["end"] = t1
                        enough.set()
                elif not ok and t1 < window["start"]:
                    errors.append(f"(warm-up) {problem}")
            if conn is not None:
                await conn.close()

        def snapshot() -> dict:
            busy, _ = machine_cpu()
            return {"t": time.perf_counter(), "client": self_cpu(), "server": process_cpu(server.proc.pid),
                    "machine": busy, "metrics": {}}

        async def scrape(snap: dict) -> None:
            # The server's own counters, over a connection of their own: the load's connections are all busy,
            # and a scrape queued behind them would wait long for a free one.
            if server.metrics:
                try:
                    snap["metrics"] = parse_metrics((await side.get(server.base + "/metrics")).text)
                except httpx.HTTPError:
                    pass

        tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
        await asyncio.sleep(warmup)
        s0 = snapshot()
        window["start"] = s0["t"]  # requests completed from here on are measured
        await scrape(s0)
        if requests:
            try:
                await asyncio.wait_for(enough.wait(), timeout=max(600.0, args.timeout))
            except asyncio.TimeoutError:
                pass
        else:
            await asyncio.sleep(max(0.0, s0["t"] + seconds - time.perf_counter()))
        s1 = snapshot()
        window["end"] = min(window["end"], s1["t"])
        await scrape(s1)
        stop.set()
        await asyncio.gather(*tasks)

    seg = {"wall": window["end"] - window["start"], "cpu_wall": s1["t"] - s0["t"], "latencies": latencies,
           "errors": errors, **{k: s1[k] - s0[k] for k in ("client", "server", "machine")}}
    m0, m1 = s0["metrics"], s1["metrics"]
    if m0 and m1:
        seg["metrics"] = {k: m1[k] - m0[k] for k in m0 if k in m1}
    return seg


def summarize(segments: list[dict], concurrency: int, per_request: int, server: str) -> dict:
    """The segments of one scenario (one per round) as one figure: totals over totals, pooled latencies."""
    wall = sum(s["wall"] for s in segments)
    cpu_wall = sum(s["cpu_wall"] for s in segments)
    lat = np.array([x for s in segments for x in s["latencies"]]) * 1000
    n = len(lat)
    lat = lat if n else np.array([float("nan")])
    errors = [e for s in segments for e in s["errors"]]
    server_cpu, client_cpu, machine = (sum(s[k] for s in segments) for k in ("server", "client", "machine"))
    r = {
        "server": server, "concurrency": concurrency, "images_per_request": per_request, "rounds": len(segments),
        "seconds": wall, "requests": n, "images_per_s": n * per_request / wall, "requests_per_s": n / wall,
        "images_per_s_by_round": [len(s["latencies"]) * per_request / s["wall"] for s in segments],
        "latency_ms": {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                       "mean": float(lat.mean())},
        "errors": sum(not e.startswith("(warm-up)") for e in errors),
        "warmup_errors": sum(e.startswith("(warm-up)") for e in errors),
        "error_samples": sorted(set(errors))[:3],
        "cpu_cores": {"server": server_cpu / cpu_wall, "client": client_cpu / cpu_wall,
                      "other": max(0.0, (machine - server_cpu - client_cpu) / cpu_wall)},
        "server_cpu_ms_per_request": 1000 * server_cpu / max(n, 1),
        "client_cpu_ms_per_request": 1000 * client_cpu / max(n, 1),
    }
    if all("metrics" in s for s in segments):
        m = {k: sum(s["metrics"].get(k, 0.0) for s in segments) for k in segments[0]["metrics"]}
        calls = m.get("astguard_batch_images_count", 0)
        if calls:
            r["server_model"] = {
                "onnxruntime_calls": int(calls),
                "mean_images_per_call": m["astguard_batch_images_sum"] / calls,
                "compute_ms_per_call": 1000 * m["astguard_compute_seconds_sum"] / calls,
                "compute_busy_fraction": m["astguard_compute_seconds_sum"] / cpu_wall,
                "queue_ms_mean": 1000 * m["astguard_queue_seconds_sum"] / max(m["astguard_queue_seconds_count"], 1)}
    return r


def show(label: str, r: dict) -> None:
    c = r["cpu_cores"]
    rounds = ", ".join(f"{x:.0f}" for x in r["images_per_s_by_round"])
    print(f"  {label:<40} {r['images_per_s']:7.1f} img/s {r['requests_per_s']:7.1f} req/s  "
          f"p50 {r['latency_ms']['p50']:6.1f} ms  p99 {r['latency_ms']['p99']:6.1f} ms  errors {r['errors']}")
    print(f"      by round: {rounds} img/s | cpu cores: server {c['server']:.2f}, client {c['client']:.2f}, other "
          f"{c['other']:.2f} | cpu ms/request: server {r['server_cpu_ms_per_request']:.2f}, "
          f"client {r['client_cpu_ms_per_request']:.2f}")
    if "server_model" in r:
        m = r["server_model"]
        print(f"      onnxruntime: {m['onnxruntime_calls']} calls, {m['mean_images_per_call']:.1f} img/call, "
              f"{m['compute_ms_per_call']:.1f} ms/call, busy {100 * m['compute_busy_fraction']:.0f}% of the time, "
              f"queue wait {m['queue_ms_mean']:.1f} ms")
    for e in r["error_samples"]:
        print(f"      error sample: {e}")


# ---------------------------------------------------------------- main

def ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or not b.get("images_per_s"):
        return None
    return a["images_per_s"] / b["images_per_s"]


def round_ratios(a: dict | None, b: dict | None) -> list[float]:
    """The same ratio within each round (the arms ran minutes apart at most): its spread shows the noise."""
    if not a or not b:
        return []
    return [x / y if y else float("nan") for x, y in zip(a["images_per_s_by_round"], b["images_per_s_by_round"])]


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    CACHE.mkdir(parents=True, exist_ok=True)
    from service.config import cpu_limit

    threads = server_threads(args.server_args, cpu_limit())  # as many intra-op threads as the service uses
    ipr, rounds = args.images_per_request, max(1, args.rounds)
    import onnxruntime

    results: dict = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "machine": {"cpus": os.cpu_count(), "cpu_limit": threads, "python": platform.python_version(),
                                 "onnxruntime": onnxruntime.__version__, "platform": platform.platform()},
                     "ort": {}, "load": {}}

    onnx_path, weights, card = ensure_model(args)
    channels, height, width = card.input.channels, card.input.height, card.input.width
    results["model"] = {"path": str(onnx_path), "name": card.name, "sha256": card.sha256,
                        "input": list(card.input.shape), "naive_weights": str(weights) if weights else None}
    pngs, arrays = make_pngs(64, channels, height, width, args.seed)
    batch_bodies, ctype = build_bodies(pngs, ipr, args.distinct_bodies)
    single_bodies, ctype1 = build_bodies(pngs, 1, max(args.distinct_bodies, 16))
    print(f"requests: {ipr}-image bodies of {len(batch_bodies[0]) / 1024:.1f} KiB, 1-image bodies of "
          f"{len(single_bodies[0]) / 1024:.1f} KiB (PNG {channels}x{height}x{width}); client: {args.client}")

    busy = background_load(1.0)
    results["machine"]["busy_cpus_before_start"] = busy
    print(f"machine: {os.cpu_count()} CPUs (service intra-op threads: {threads}); {busy:.2f} CPUs busy "
          "before start")
    if busy > 0.25:
        print(f"WARNING: other processes keep {busy:.2f} CPUs busy: every figure below is lowered by them "
              "(see 'other' per run)", flush=True)
    print("NOTE: the load generator runs in this process, on the same CPUs as the server: its CPU use is printed "
          "per scenario ('client')", flush=True)

    naive_skip = ("--no-naive" if args.no_naive else
                  None if weights is not None else f"no torch weights for {onnx_path} (give --weights)")
    env = service_env(args)
    with contextlib.ExitStack() as stack:
        print("\n[starting servers]", flush=True)
        micro = stack.enter_context(Server("service-micro", service_cmd(args, onnx_path, True),
                                           "/v2/health/ready", env, metrics=True))
        nomicro = stack.enter_context(Server("service-nomicro", service_cmd(args, onnx_path, False),
                                             "/v2/health/ready", env, metrics=True))
        naive = None
        if naive_skip is None:
            cmd = [str(REPO / "benchmarks" / "naive_torch_server.py"), "--weights", str(weights),
                   *naive_weight_args(weights, card)]
            if args.naive_torch_threads:
                cmd += ["--torch-threads", str(args.naive_torch_threads)]
            naive = stack.enter_context(Server("naive-torch", cmd, "/health", env, metrics=False))

        batch_label = f"{ipr} img/request, c={args.concurrency}"
        single_label = f"1 img/request, c={args.single_concurrency}"
        plan = [("service_batch", f"service {batch_label}", micro, batch_bodies, ctype, args.concurrency, ipr),
                ("service_single", f"service {single_label}", micro, single_bodies, ctype1,
                 args.single_concurrency, 1),
                ("service_nomicro_single", f"no-micro {single_label}", nomicro, single_bodies, ctype1,
                 args.single_concurrency, 1)]
        if naive is not None:
            plan += [("naive_batch", f"naive {batch_label}", naive, batch_bodies, ctype, args.concurrency, ipr),
                     ("naive_single", f"naive {single_label}", naive, single_bodies, ctype1,
                      args.single_concurrency, 1)]
        ort_bench = OrtBench(onnx_path, arrays, threads)
        ort_parts: dict[int, list[dict]] = {b: [] for b in sorted({ipr, 1}, reverse=True)}
        segments: dict[str, list[dict]] = {key: [] for key, *_ in plan}
        per_round = args.requests // rounds if args.requests else None
        # The arms take turns, `rounds` times, so that slow drift on the machine hits them alike.
        for r in range(rounds):
            print(f"\n[round {r + 1}/{rounds}]", flush=True)
            for b, parts in ort_parts.items():
                part = ort_bench.measure(b, args.ort_seconds / rounds)
                parts.append(part)
                print(f"  raw onnxruntime batch {b:<3}{'':14} {part['images'] / part['wall']:7.1f} img/s "
                      f"({1000 * statistics.median(part['times']):.2f} ms/call median; other processes "
                      f"{part['other'] / part['wall']:.2f} CPUs)", flush=True)
            for key, label, srv, bodies, ct, conc, per in plan:
                seg = asyncio.run(drive(srv, bodies, ct, conc, per, args, args.seconds / rounds,
                                        args.warmup if r == 0 else args.round_warmup, per_round))
                segments[key].append(seg)
                n = len(seg["latencies"])
                print(f"  {label:<40} {n * per / seg['wall']:7.1f} img/s  ({n} requests, "
                      f"{sum(not e.startswith('(warm-up)') for e in seg['errors'])} errors)", flush=True)
        ort_bench.close()
        print("\n[stopping servers]", flush=True)

    for b, parts in ort_parts.items():
        results["ort"][f"batch_{b}"] = OrtBench.summarize(parts, b, threads)
    labels = {key: label for key, label, *_ in plan}
    print(f"\n[results over {rounds} round(s)]")
    for b in ort_parts:
        o = results["ort"][f"batch_{b}"]
        print(f"  {'raw onnxruntime batch ' + str(b) + ' (in-process)':<40} {o['images_per_s']:7.1f} img/s "
              f"{o['ms_per_call_median']:7.2f} ms/call (median), {o['intra_op_threads']} intra-op threads, "
              f"{o['cpu_cores_used']:.2f} cpu cores, other processes {o['other_cpu_cores']:.2f}")
    for key, label, srv, _, _, conc, per in plan:
        results["load"][key] = summarize(segments[key], conc, per, srv.label)
        show(labels[key], results["load"][key])
    if naive_skip:
        print(f"  naive baseline skipped: {naive_skip}")
    sys.stdout.flush()

    load, ort = results["load"], results["ort"]
    ratios = {
        "service_vs_ort_batch": ratio(load.get("service_batch"), ort.get(f"batch_{ipr}")),
        "micro_vs_nomicro_single": ratio(load.get("service_single"), load.get("service_nomicro_single")),
        "service_vs_naive_batch": ratio(load.get("service_batch"), load.get("naive_batch")),
        "service_vs_naive_single": ratio(load.get("service_single"), load.get("naive_single")),
        # not a target: what batching gains inside onnxruntime alone, the ceiling of micro/no-micro give or take
        # the per-call overheads that batching also saves
        "ort_batch_vs_batch1": ratio(ort.get(f"batch_{ipr}"), ort.get("batch_1")) if ipr != 1 else None,
    }
    pairs = {"service_vs_ort_batch": (load.get("service_batch"), ort.get(f"batch_{ipr}")),
             "micro_vs_nomicro_single": (load.get("service_single"), load.get("service_nomicro_single")),
             "service_vs_naive_batch": (load.get("service_batch"), load.get("naive_batch")),
             "service_vs_naive_single": (load.get("service_single"), load.get("naive_single"))}
    by_round = {k: round_ratios(*v) for k, v in pairs.items()}
    wall = time.perf_counter() - t_start
    results.update(ratios=ratios, ratios_by_round=by_round, targets={k: {"ratio": v, "op": op} for k, (op, v) in TARGETS.items()},
                   wall_seconds=wall)

    def fig(key: str, src: dict) -> str:
        return f"{src[key]['images_per_s']:.1f}" if key in src else "n/a"

    def verdict(name: str) -> str:
        r, (op, t) = ratios[name], TARGETS[name]
        if r is None:
            return "n/a"
        ok = r >= t if op == ">=" else r > t
        spread = f"; by round {', '.join(f'{x:.2f}' for x in by_round[name])}" if len(by_round[name]) > 1 else ""
        return f"{r:.2f}x  (target {op} {t:g}x: {'met' if ok else 'MISSED'}{spread})"

    client_note = {"httpx": "httpx client", "raw": "raw asyncio client"}[args.client]
    print("\n" + "=" * 100)
    print(f"SUMMARY (images/s, {rounds} round(s) of {args.seconds / rounds:g}s per scenario; the {client_note} "
          f"runs on the same {os.cpu_count()} CPUs as the servers)")
    print(f"  {ipr}-image requests, c={args.concurrency}: service {fig('service_batch', load)} vs raw onnxruntime "
          f"batch {ipr} {fig(f'batch_{ipr}', ort)}")
    print(f"      service / raw onnxruntime     = {verdict('service_vs_ort_batch')}")
    print(f"  1-image requests, c={args.single_concurrency}: micro-batching {fig('service_single', load)} vs "
          f"--no-micro-batching {fig('service_nomicro_single', load)}")
    print(f"      micro / no-micro              = {verdict('micro_vs_nomicro_single')}")
    if ratios["ort_batch_vs_batch1"] is not None:
        print(f"      (for reference, raw onnxruntime batch {ipr} / batch 1 = {ratios['ort_batch_vs_batch1']:.2f}x: "
              "what batching gains inside onnxruntime alone on this model and machine)")
    print(f"  {ipr}-image requests, c={args.concurrency}: service {fig('service_batch', load)} vs naive torch "
          f"{fig('naive_batch', load)}")
    print(f"      service / naive               = {verdict('service_vs_naive_batch')}")
    print(f"  1-image requests, c={args.single_concurrency}: service {fig('service_single', load)} vs naive torch "
          f"{fig('naive_single', load)}")
    print(f"      service / naive               = {verdict('service_vs_naive_single')}")
    print(f"  errors in measured windows: {sum(r['errors'] for r in load.values())}; wall time {wall:.0f}s")
    others = [r["cpu_cores"]["other"] for r in load.values()] + [o["other_cpu_cores"] for o in ort.values()]
    results["max_other_cpus"] = max(others, default=0.0)
    if results["max_other_cpus"] > 0.25:
        print(f"  WARNING: other processes used up to {results['max_other_cpus']:.2f} of {os.cpu_count()} CPUs during "
              "the measurements: these figures are not trustworthy; run again on a quiet machine")
    print("=" * 100, flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
