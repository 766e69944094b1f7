"""The served model: an ONNX file checked against its model card, one shared onnxruntime session."""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np


class StartupError(RuntimeError):
    """The service cannot start; the message says why, in one line."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_card(onnx_path: Path) -> dict:
    """The model card beside the file (model.json, or <stem>.json), after checking the file's sha256."""
    if not onnx_path.is_file():
        raise StartupError(f"model file {onnx_path} does not exist")
    candidates = [onnx_path.with_suffix(".json"), onnx_path.parent / "model.json"]
    card_path = next((p for p in candidates if p.is_file()), None)
    if card_path is None:
        raise StartupError(f"no model card beside {onnx_path} (looked for {', '.join(map(str, candidates))}); "
                           "export the model with astguard-train")
    try:
        card = json.loads(card_path.read_text())
        for key in ("name", "version", "sha256", "input", "class_names"):
            card[key]
        shape = card["input"]["shape"]
        if len(shape) != 4:
            raise ValueError("input shape must be [N, C, H, W]")
    except (ValueError, KeyError, TypeError) as e:
        raise StartupError(f"model card {card_path} is not valid: missing or bad {e}") from None
    actual = sha256_file(onnx_path)
    if actual != card["sha256"]:
        raise StartupError(f"{onnx_path} does not match its model card {card_path}: sha256 {actual[:12]}... "
                           f"!= {str(card['sha256'])[:12]}...; the file was changed or the card belongs to another")
    return card


def installed_runtimes() -> list[str]:
    found = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.version(dist)
            found.append(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


def choose_providers(device: str, available: list[str]) -> list:
    """CUDA first when asked for (or on auto, when present), always with the CPU as the fallback. `cuda:N` names
    the GPU (the evaluation's --jobs workers each use their own)."""
    kind, _, index = device.partition(":")
    if kind in ("auto", "cuda") and "CUDAExecutionProvider" in available:
        cuda = ("CUDAExecutionProvider", {"device_id": int(index)}) if index else "CUDAExecutionProvider"
        return [cuda, "CPUExecutionProvider"]
    if kind == "cuda":
        raise StartupError("ASTGUARD_DEVICE=cuda but onnxruntime offers no CUDAExecutionProvider "
                           f"(available: {', '.join(available)}); install astguard[gpu] on a GPU host")
    return ["CPUExecutionProvider"]


@dataclass
class Timing:
    queue_s: float
    compute_s: float


class OnnxModel:
    """One onnxruntime session shared by every request (InferenceSession.run is thread-safe)."""

    def __init__(self, path: Path, *, device: str = "auto", intra_op_threads: int = 1):
        import onnxruntime as ort

        if len(installed_runtimes()) > 1:
            warnings.warn("both onnxruntime and onnxruntime-gpu are installed; they overwrite each other's files: "
                          "uninstall both and install one", RuntimeWarning, stacklevel=2)
        self.path = Path(path)
        self.card = load_card(self.path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle intra-op threads would busy-wait on the cores the event loop needs: measured +17% to +31% images/s
        # with another process busy beside the server, neutral on an idle machine (benchmarks/serve_bench.py).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = choose_providers(device, ort.get_available_providers())
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as e:
            raise StartupError(f"onnxruntime cannot load {self.path}: {str(e).splitlines()[0]}") from None
        inputs, outputs = self.session.get_inputs(), [o.name for o in self.session.get_outputs()]
        if len(inputs) != 1 or "probabilities" not in outputs:
            raise StartupError(f"{self.path} is not an astguard export: it needs one input and a "
                               f"'probabilities' output (has inputs {[i.name for i in inputs]}, outputs {outputs})")
        self.input_name = inputs[0].name
        _, self.channels, self.height, self.width = self.card["input"]["shape"]
        self.color_mode = self.card["input"].get("color_mode", "RGB" if self.channels == 3 else "L")
        self.class_names = list(self.card["class_names"])
        self.provider = self.session.get_providers()[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def predict(self, images: np.ndarray, submitted: float | None = None) -> tuple[np.ndarray, Timing]:
        """float32 [N, C, H, W] in [0,1] -> probabilities [N, classes], and the time spent queued and computing."""
        start = time.perf_counter()
        probs = self.session.run(["probabilities"], {self.input_name: np.ascontiguousarray(images, np.float32)})[0]
        end = time.perf_counter()
        return probs, Timing(start - (submitted or start), end - start)

    def warm_up(self) -> None:
        self.predict(np.zeros((1, self.channels, self.height, self.width), np.float32))
