"""Every setting of the service, read from ASTGUARD_* environment variables (or given on the command line)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.defenses import DEFENSES


def cpu_limit() -> int:
    """CPUs this process may use: the container's CPU quota when there is one, else the affinity mask."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            return max(1, int(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ASTGUARD_", extra="ignore")

    # model and server
    model: Path = Field(Path("model.onnx"), description="the ONNX file; its model card (model.json) lies beside it")
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, description="port to bind")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDAExecutionProvider when onnxruntime offers it, else CPU")
    log_level: str = Field("info", description="uvicorn log level")

    # output defense
    output_defense: str = Field("none", description="the output defense (registry key): " + ", ".join(DEFENSES))
    defense_k: int = Field(1, ge=1, description="topk: how many probabilities to keep")
    defense_decimals: int = Field(2, ge=0, le=8, description="round: decimal places")
    defense_beta: float = Field(0.3, ge=0, description="reverse_sigmoid, dcp: perturbation strength beta")
    defense_gamma: float = Field(0.5, gt=0, description="reverse_sigmoid, dcp: sigmoid slope gamma")
    defense_tau: float = Field(0.9, ge=0, le=1, description="dcp: perturb answers whose top-1 is below this; "
                                                             "misinformation: the top-1 below which answers blend")
    defense_nu: float = Field(100.0, gt=0, description="misinformation: the slope of the blending sigmoid")
    misinformation_model: Path | None = Field(
        None, description="misinformation: the misinformation model's ONNX file (astguard-train --teacher "
                          "misinformation), with its card beside it")

    # images
    resize_policy: Literal["resize", "reject"] = Field(
        "resize", description="resize: bilinear to the model's input size; reject: 400 if the size differs")
    max_images_per_request: int = Field(64, ge=1, description="more images in one request: 413")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="larger request bodies: 413")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="width x height above this: 413, before decoding")
    max_request_pixels: int = Field(64 * 1024 * 1024, ge=1, description="pixels decoded for one request, all its "
                                    "images together (after JPEG draft reduction): above this, 413 before decoding")
    max_concurrent_decodes: int = Field(default_factory=lambda: cpu_limit(), ge=1,
                                        description="requests decoding images at once; the rest wait their turn")
    header_timeout_s: float = Field(10.0, gt=0, le=300, description="a request's headers must arrive within this: "
                                                                    "408 and the connection closed")
    body_timeout_s: float = Field(30.0, gt=0, le=600, description="a request's whole body must arrive within this "
                                                                  "of its headers: 408")
    max_connections: int = Field(512, ge=1, description="open connections beyond this get 503 and are closed")

    # access control and accounting
    api_keys: str = Field("", description="comma-separated API keys; none configured = open service")
    api_keys_file: Path | None = Field(None, description="file with one API key per line (# comments)")
    budget_images: int | None = Field(None, ge=0, description="images each key may ask for per budget period")
    budget_period_s: int = Field(86400, ge=1, description="length of a budget period in seconds")
    budget_backend: Literal["sqlite", "redis"] = Field(
        "sqlite", description="where budgets and rate limits live: sqlite (one host) or redis (shared by replicas)")
    budget_db: Path = Field(Path("astguard-budgets.sqlite"), description="SQLite file that keeps the budgets")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="redis backend: the server")
    redis_prefix: str = Field("astguard:", description="redis backend: prefix of every key astguard writes")
    rate_limit_per_s: float | None = Field(None, gt=0, description="requests per second per key (token bucket)")
    rate_limit_burst: int = Field(10, ge=1, description="token bucket size")

    # extraction detection
    detector: str = Field("none", description="extraction detector per API key (registry key): none, prada, knn")
    detection_policy: Literal["log", "degrade", "block"] = Field(
        "log", description="what a flagged key gets: log (metrics and log only), degrade (the degraded defense's "
                           "answers from then on), block (403 from then on)")
    degraded_defense: str = Field("label_only", description="degrade: the output defense a flagged key gets")
    detection_db: Path = Field(Path("astguard-detection.sqlite"),
                               description="SQLite file of the detectors' per-key state (the sqlite budget backend)")
    detector_delta: float = Field(0.9, gt=0, le=1, description="prada: flag when Shapiro-Wilk W falls below this")
    detector_check_every: int = Field(10, ge=1, description="prada: test the distances every this many queries")
    detector_min_distances: int = Field(100, ge=3, description="prada: test once more distances than this remain")
    detector_set_cap: int = Field(100, ge=1, description="prada: queries kept per class in a key's growing set")
    detector_distances_cap: int = Field(2000, ge=10, description="prada: distances kept per key")
    detector_k: int = Field(50, ge=1, description="knn: the K nearest earlier queries")
    detector_window: int = Field(50, ge=1, description="knn: queries the score averages over")
    detector_buffer: int = Field(1000, ge=2, description="knn: earlier queries kept per key")
    detector_threshold: float = Field(0.0, ge=0, description="knn: flag below this score (calibrate: python -m "
                                                             "evaluation.calibrate_detector); 0 never flags")
    admin_keys: str = Field("", description="comma-separated admin keys: GET /v1/usage/all lists every key, "
                                            "POST /v1/usage/{key_id}/clear clears a flag")
    usage_shows_detection: bool = Field(True, description="GET /v1/usage tells a key its own score and flag")

    # performance
    intra_op_threads: int = Field(default_factory=cpu_limit, ge=1, description="onnxruntime intra-op threads")
    inference_workers: int = Field(1, ge=1, description="concurrent onnxruntime calls on the shared session")
    micro_batching: bool = Field(True, description="coalesce concurrent requests into one onnxruntime call")
    max_batch_size: int = Field(64, ge=1, description="micro-batching: at most this many images per call")
    max_wait_ms: float = Field(2.0, ge=0, description="micro-batching: wait at most this long for more images")
