#!/usr/bin/env python
"""The naive baseline for benchmarks/serve_bench.py: a minimal FastAPI + PyTorch eager endpoint.

POST /predict takes multipart `files` (PNG/JPEG... images), decodes each with PIL, runs the torch model once per
request under torch.no_grad() on the event loop (the usual tutorial pattern: no thread pool, no batching across
requests, no ONNX) and returns the softmax probabilities as JSON. GET /health answers 200 once the model is loaded.

    python benchmarks/naive_torch_server.py --weights runs/.cache/bench/<key>/model.pt --port 8001

--weights is a file written by serve_bench.py: {"arch", "num_classes", "in_channels", "image_size",
"state_dict"}, or a training checkpoint.pt ({"model": state_dict}) together with --arch/--num-classes.
Torch keeps its default thread count unless --torch-threads is given.
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from fastapi import FastAPI, File, UploadFile  # noqa: E402
from PIL import Image  # noqa: E402

from astguard.card import PROBABILITIES  # noqa: E402
from training.models import create_model  # noqa: E402


def load_model(weights: Path, arch: str | None, num_classes: int | None, in_channels: int,
               image_size: int) -> tuple[torch.nn.Module, int, int]:
    state = torch.load(weights, map_location="cpu", weights_only=False)
    if "state_dict" in state:  # serve_bench's own format
        arch, num_classes = state["arch"], state["num_classes"]
        in_channels, image_size = state["in_channels"], state["image_size"]
        state_dict = state["state_dict"]
    else:  # a training checkpoint
        if arch is None or num_classes is None:
            raise SystemExit("naive_torch_server: a training checkpoint needs --arch and --num-classes")
        state_dict = state["model"]
    model = create_model(arch, num_classes, in_channels, image_size)
    model.load_state_dict(state_dict)  # mean/std are buffers: restored too
    return model.eval(), image_size, in_channels


def create_app(model: torch.nn.Module, image_size: int, in_channels: int) -> FastAPI:
    app = FastAPI(title="naive torch baseline")
    mode = "L" if in_channels == 1 else "RGB"

    @app.get("/health")
    async def health():
        return {"ok": True}

    @app.post("/predict")
    async def predict(files: list[UploadFile] = File(...)):
        arrays = []
        for f in files:
            img = Image.open(io.BytesIO(await f.read())).convert(mode)
            if img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / 255.0
            arrays.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
        x = torch.from_numpy(np.stack(arrays))
        with torch.no_grad():
            probs = torch.softmax(model(x), dim=1)
        labels = probs.argmax(1).tolist()
        return {"predictions": [{PROBABILITIES: p, "label": y} for p, y in zip(probs.tolist(), labels)]}

    return app


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, required=True)
    p.add_argument("--arch", default=None, help="only for a training checkpoint.pt")
    p.add_argument("--num-classes", type=int, default=None, help="only for a training checkpoint.pt")
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    args = p.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    model, size, channels = load_model(args.weights, args.arch, args.num_classes, args.in_channels,
                                       args.image_size)
    with torch.no_grad():  # the first call is slow (allocations, kernel choice): not the benchmark's business
        model(torch.rand(1, channels, size, size))
    import uvicorn

    uvicorn.run(create_app(model, size, channels), host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
