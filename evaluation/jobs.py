"""evaluate --jobs N: the evaluation's independent jobs (Evaluation.waves) in N spawned worker processes.

The waves depend only on earlier ones: the base networks, the other teacher networks (which share their base),
then every seed's student groups (with a race, the later seeds' attack suites in a wave of their own). Each worker
keeps the data and networks it loaded for its next job; results land in the work directory's caches, where the
parent's sequential pass reads them back.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace

import torch

from evaluation.config import EvalConfig
from training.loop import RunError

_WORKER = None  # this worker process's Evaluation


def _start_worker(make, cfg: EvalConfig, devices: list[str], threads: int, counter) -> None:
    """`make(cfg)` builds the worker's Evaluation (the class is passed in, so this module stays below it)."""
    global _WORKER
    with counter.get_lock():  # worker i takes device i (round robin): one GPU each while there are enough
        i, counter.value = counter.value, counter.value + 1
    # Each worker's own output goes to its log; what the parent shows is one line per finished job.
    log = cfg.work_dir / "logs" / f"worker-{i}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1), os.dup2(fd, 2)
    torch.set_num_threads(threads)
    _WORKER = make(replace(cfg, device=devices[i % len(devices)], progress=False))


def _run_job(seed: int, name: str, threads: int | None = None) -> tuple[dict, dict]:
    ev = _WORKER
    if threads:  # a wave of fewer jobs than workers: each job takes its share of every core
        torch.set_num_threads(threads)
    ev.trained, ev.seconds = {k: 0 for k in ev.trained}, {k: 0.0 for k in ev.seconds}
    ev.run_job(seed, name)
    return ev.trained, ev.seconds


def worker_devices(device: torch.device, requested: str) -> list[str]:
    """Where --jobs workers run: every visible GPU when the device is CUDA and not one named GPU, else `device`."""
    if device.type == "cuda" and requested in ("auto", "cuda"):
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [str(device)]


def fan_out(ev, jobs: int) -> None:
    """Run the evaluation's independent jobs (Evaluation.waves) in `jobs` processes; their results land in the
    work directory's caches, where the sequential pass that follows reads them back."""
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked; spawn is the same on every platform
    devices = worker_devices(ev.device, ev.eval_cfg.device)
    cores = torch.get_num_threads()
    threads = max(1, cores // jobs) if ev.device.type == "cpu" else cores
    waves = ev.waves()
    total, done = sum(len(w) for w in waves), 0
    print(f"evaluate: {total} jobs in {jobs} processes on {', '.join(devices)}"
          + (f", {threads} threads each" if ev.device.type == "cpu" else "")
          + f"; their logs in {ev.work / 'logs'}", file=sys.stderr)
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_start_worker,
                             initargs=(type(ev), ev.eval_cfg, devices, threads, ctx.Value("i", 0))) as pool:
        for wave in waves:
            # On the CPU, the cores are shared among the jobs that run at once: a wave of one job (the base) gets
            # them all instead of a worker's share.
            share = max(1, cores // min(jobs, len(wave))) if ev.device.type == "cpu" else None
            futures = {pool.submit(_run_job, seed, name, share): (seed, name) for seed, name in wave}
            try:
                for f in as_completed(futures):
                    trained, seconds = f.result()
                    done += 1
                    for k, v in trained.items():
                        ev.trained[k] += v
                    for k, v in seconds.items():
                        ev.seconds[k] += v
                    seed, name = futures[f]
                    print(f"evaluate: [{done}/{total}] seed {seed} {name} done", file=sys.stderr)
            except BrokenProcessPool:
                raise RunError("an evaluation worker process died (out of memory?); run again to continue from "
                               "what finished, or with fewer --jobs") from None
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
