"""Run the service in a child process on a free loopback port, for the demo, the tests and the benchmarks."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Running:
    proc: subprocess.Popen
    url: str


@contextmanager
def running(model: Path, *args: str, env: dict | None = None, timeout: float = 60, quiet: bool = False
            ) -> Iterator[Running]:
    """`python -m service --model MODEL ARGS...` on 127.0.0.1; yields once /v2/health/ready answers 200, and
    stops the process on the way out, whatever happened."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "service", "--model", str(model), "--host", "127.0.0.1",
                             "--port", str(port), *args], cwd=REPO, env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL if quiet else subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    try:
        while True:
            if proc.poll() is not None:
                output = proc.stdout.read().strip() if proc.stdout else ""
                raise RuntimeError(f"the service exited with {proc.returncode}: {output}")
            try:
                with urllib.request.urlopen(url + "/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.time() > deadline:
                raise RuntimeError(f"the service did not become ready within {timeout:.0f} s")
            time.sleep(0.1)
        yield Running(proc, url)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
