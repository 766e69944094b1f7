"""ONNX export, verified in onnxruntime against PyTorch, and the JSON model card the service reads.

The graph takes `image`: float32 [N, C, H, W] pixels in [0,1] (normalisation is inside), and returns
`probabilities` [N, classes] (softmax) and `logits` [N, classes]. One file, no external data.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

INPUT_NAME = "image"
OUTPUT_NAMES = ("probabilities", "logits")
OPSET = 18
CARD_VERSION = 1


class ExportError(RuntimeError):
    """The exported graph is invalid or disagrees with the PyTorch model."""


class _WithProbabilities(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor):
        logits = self.model(image)
        return torch.softmax(logits, dim=1), logits


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_onnx(model: nn.Module, path: str | Path, in_channels: int, image_size: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = _WithProbabilities(model).cpu().eval()
    example = torch.rand(2, in_channels, image_size, image_size)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapped, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}}, opset_version=OPSET,
            external_data=False, verbose=False)
        program.save(str(path), external_data=False)
    return path


def verify_onnx(model: nn.Module, path: str | Path, images: torch.Tensor, *, atol: float = 1e-4) -> dict:
    """Check the graph, then compare onnxruntime with PyTorch on batch 1 and on the whole `images` batch."""
    import onnx

    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("verifying the export needs onnxruntime: install astguard[serve] (or [gpu])") from None

    try:
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    except Exception as e:
        raise ExportError(f"onnx.checker rejected {path}: {e}") from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = model.cpu().eval()
    report = {}
    for name, x in (("batch_1", images[:1]), (f"batch_{len(images)}", images)):
        x = x.float().cpu()
        with torch.no_grad():
            ref = torch.softmax(model(x), 1).numpy()
        got = session.run([OUTPUT_NAMES[0]], {INPUT_NAME: x.numpy()})[0]
        diff = float(np.abs(got - ref).max())
        agree = float((got.argmax(1) == ref.argmax(1)).mean())
        if got.shape != ref.shape or diff > atol or agree < 1.0:
            raise ExportError(f"onnxruntime disagrees with PyTorch on {name}: max |dp| {diff:.2e} "
                              f"(tolerance {atol:.0e}), argmax agreement {agree:.4f}")
        report[name] = {"max_abs_diff": diff, "argmax_agreement": agree}
    return report


def export_verified(model: nn.Module, out_dir: str | Path, sample: torch.Tensor, card: dict) -> dict:
    """Write out_dir/model.onnx and out_dir/model.json; return the card (with sha256 and verification)."""
    out_dir = Path(out_dir)
    onnx_path = export_onnx(model, out_dir / "model.onnx", sample.shape[1], sample.shape[2])
    verification = verify_onnx(model, onnx_path, sample)
    n_classes = len(card["class_names"])
    card = {
        "card_version": CARD_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **card,
        "file": onnx_path.name,
        "sha256": sha256_file(onnx_path),
        "input": {"name": INPUT_NAME, "shape": [-1, sample.shape[1], sample.shape[2], sample.shape[3]],
                  "dtype": "float32", "layout": "NCHW", "color_mode": "L" if sample.shape[1] == 1 else "RGB",
                  "value_range": [0.0, 1.0]},
        "outputs": [{"name": OUTPUT_NAMES[0], "shape": [-1, n_classes], "dtype": "float32"},
                    {"name": OUTPUT_NAMES[1], "shape": [-1, n_classes], "dtype": "float32"}],
        "opset": OPSET,
        "verification": verification,
        "software": {"torch": torch.__version__, "onnx": _version("onnx"), "onnxruntime": _version("onnxruntime")},
    }
    (out_dir / "model.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def _version(module: str) -> str:
    import importlib

    return getattr(importlib.import_module(module), "__version__", "unknown")
