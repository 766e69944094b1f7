"""Image bytes -> the model's input, with every failure a client error that names the image.

Size limits are checked on the header, before any pixels are decoded (decompression bombs).
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from service.errors import ClientError

# Formats whose Image.open reads the header only. Some plugins decode while opening (ICO loads its embedded
# PNG at full size), which would get round the pixel limit below, so they are not accepted.
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "PPM")


def limit_pixels(max_pixels: int) -> None:
    """Pillow's own bomb guard, as a second line behind ours: it warns past the limit (an error below)."""
    Image.MAX_IMAGE_PIXELS = max_pixels


class ImageRejected(ClientError):
    def __init__(self, message: str, status: int = 400, reason: str = "undecodable_image"):
        super().__init__(message, status, reason)


def decode_image(blob: bytes, label: str, *, mode: str, size: tuple[int, int], max_pixels: int,
                 policy: str = "resize") -> np.ndarray:
    """bytes -> float32 [C, H, W] in [0,1], in colour `mode` ("L"/"RGB") and `size` (width, height)."""
    if not blob:
        raise ImageRejected(f"{label} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(blob), formats=FORMATS)  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRejected(f"{label} is too large to decode", 413, "too_many_pixels") from None
    except Exception as e:
        raise ImageRejected(f"{label} is not a readable image in a supported format ({', '.join(FORMATS)}): "
                            f"{type(e).__name__}: {e}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageRejected(f"{label} has {w}x{h} pixels, over the limit of {max_pixels}", 413, "too_many_pixels")
    if policy == "reject" and (w, h) != size:
        raise ImageRejected(f"{label} is {w}x{h}; this service takes {size[0]}x{size[1]} images only "
                            "(resize policy 'reject')", 400, "wrong_size")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()  # decodes; truncated or corrupt data fails here
        img = img.convert(mode)
    except Image.DecompressionBombWarning:
        raise ImageRejected(f"{label} is too large to decode", 413, "too_many_pixels") from None
    except Exception as e:
        raise ImageRejected(f"{label} cannot be decoded ({type(e).__name__}: {e})") from None
    if img.size != size:
        img = img.resize(size, Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
