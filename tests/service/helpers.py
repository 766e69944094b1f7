"""Encoding images as a client would, and reading the served model directly for reference answers."""
from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import onnxruntime as ort
from PIL import Image

from training.data import load_dataset


def digits_test_images(n: int = 8) -> np.ndarray:
    """uint8 [n, 8, 8] test digits."""
    return load_dataset("digits").test.images[:n, 0].numpy()


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, "PNG")
    return buf.getvalue()


def b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode()


def files(blobs: list[bytes], content_type: str = "image/png") -> list:
    return [("files", (f"img{i}.png", b, content_type)) for i, b in enumerate(blobs)]


def reference_probabilities(model_path, images_uint8: np.ndarray) -> np.ndarray:
    """What the ONNX model itself says about [n, H, W] grey images, for comparison with the service."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    x = (images_uint8.astype(np.float32) / 255.0)[:, None]
    return session.run(["probabilities"], {"image": x})[0]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but carries almost no data: a decompression-bomb probe."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
