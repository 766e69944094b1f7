"""The served model: an ONNX file checked against its model card, one shared onnxruntime session."""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from astguard.card import PROBABILITIES, CardError, ModelCard, verified_card


class StartupError(RuntimeError):
    """The service cannot start; the message says why, in one line."""


def load_card(onnx_path: Path) -> ModelCard:
    """The model card beside the file (model.json, or <stem>.json), after checking the file's sha256."""
    try:
        return verified_card(onnx_path)
    except CardError as e:
        raise StartupError(str(e)) from None


def session_options(intra_op_threads: int):
    """The service's onnxruntime session options: one place, so benchmarks compare the same configuration."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle intra-op threads would busy-wait on the cores the event loop needs: measured +17% to +31% images/s
    # with another process busy beside the server, neutral on an idle machine (benchmarks/serve_bench.py).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


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
        providers = choose_providers(device, ort.get_available_providers())
        try:
            self.session = ort.InferenceSession(str(self.path), session_options(intra_op_threads),
                                                providers=providers)
        except Exception as e:
            raise StartupError(f"onnxruntime cannot load {self.path}: {str(e).splitlines()[0]}") from None
        if device.partition(":")[0] == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            # onnxruntime-gpu lists CUDA even where its libraries or the GPU are missing, then runs on the CPU.
            raise StartupError("ASTGUARD_DEVICE=cuda but onnxruntime could not start CUDAExecutionProvider (it runs "
                               f"on {self.session.get_providers()[0]}); check the GPU and the CUDA/cuDNN libraries")
        inputs, outputs = self.session.get_inputs(), [o.name for o in self.session.get_outputs()]
        if len(inputs) != 1 or PROBABILITIES not in outputs:
            raise StartupError(f"{self.path} is not an astguard export: it needs one input and a "
                               f"{PROBABILITIES!r} output (has inputs {[i.name for i in inputs]}, outputs {outputs})")
        self.input_name = inputs[0].name
        spec = self.card.input
        self.channels, self.height, self.width, self.color_mode = spec.channels, spec.height, spec.width, \
            spec.color_mode
        self.class_names = list(self.card.class_names)
        self.provider = self.session.get_providers()[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def predict(self, images: np.ndarray, submitted: float | None = None) -> tuple[np.ndarray, Timing]:
        """float32 [N, C, H, W] in [0,1] -> probabilities [N, classes], and the time spent queued and computing."""
        start = time.perf_counter()
        probs = self.session.run([PROBABILITIES], {self.input_name: np.ascontiguousarray(images, np.float32)})[0]
        end = time.perf_counter()
        return probs, Timing(start - (submitted or start), end - start)

    def warm_up(self) -> None:
        self.predict(np.zeros((1, self.channels, self.height, self.width), np.float32))
