"""ONNX export, verified in onnxruntime against PyTorch, and the model card (astguard.card) the service reads.

The graph takes `image`: float32 [N, C, H, W] pixels in [0,1] (normalisation is inside), and returns
`probabilities` [N, classes] (softmax) and `logits` [N, classes]. One file, no external data.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from astguard.card import (COLOR_MODES, INPUT_NAME, OUTPUT_NAMES, PROBABILITIES, DatasetInfo, InputSpec,
                           ModelCard, OutputSpec, TeacherInfo, sha256_file, write_card)

OPSET = 18


class ExportError(RuntimeError):
    """The exported graph is invalid or disagrees with the PyTorch model."""


class _WithProbabilities(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor):
        logits = self.model(image)
        return torch.softmax(logits, dim=1), logits


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
        got = session.run([PROBABILITIES], {INPUT_NAME: x.numpy()})[0]
        diff = float(np.abs(got - ref).max())
        agree = float((got.argmax(1) == ref.argmax(1)).mean())
        if got.shape != ref.shape or diff > atol or agree < 1.0:
            raise ExportError(f"onnxruntime disagrees with PyTorch on {name}: max |dp| {diff:.2e} "
                              f"(tolerance {atol:.0e}), argmax agreement {agree:.4f}")
        report[name] = {"max_abs_diff": diff, "argmax_agreement": agree}
    return report


def export_verified(model: nn.Module, out_dir: str | Path, sample: torch.Tensor, *, name: str, version: str,
                    class_names: list[str], teacher: TeacherInfo, dataset: DatasetInfo, accuracy: dict[str, float],
                    training: dict, robustness: dict | None = None) -> ModelCard:
    """Write out_dir/model.onnx and out_dir/model.json; return the card (with sha256 and verification)."""
    out_dir = Path(out_dir)
    onnx_path = export_onnx(model, out_dir / "model.onnx", sample.shape[1], sample.shape[2])
    verification = verify_onnx(model, onnx_path, sample)
    n = len(class_names)
    card = ModelCard(
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        name=name, version=version, class_names=tuple(class_names), teacher=teacher, dataset=dataset,
        accuracy=accuracy, training=training, robustness=robustness or {}, file=onnx_path.name,
        sha256=sha256_file(onnx_path),
        input=InputSpec((-1, *sample.shape[1:4]), color_mode=COLOR_MODES[sample.shape[1]]),
        outputs=tuple(OutputSpec(o, (-1, n)) for o in OUTPUT_NAMES), opset=OPSET, verification=verification,
        software={"torch": torch.__version__, "onnx": _version("onnx"), "onnxruntime": _version("onnxruntime")})
    write_card(card, out_dir / "model.json")
    return card


def _version(module: str) -> str:
    import importlib

    return getattr(importlib.import_module(module), "__version__", "unknown")
