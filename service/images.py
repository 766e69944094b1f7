"""Image bytes -> the model's input, with every failure a client error that names the image.

Size limits are checked on the header, before any pixels are decoded (decompression bombs).
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

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


# EXIF orientations that swap width and height (the upright image is transposed).
_TRANSPOSED = (5, 6, 7, 8)
# 16-bit integer modes, scaled by 1/65535 (Pillow's convert("L") would clip them at 255).
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def open_image(blob: bytes, label: str, *, mode: str, size: tuple[int, int], max_pixels: int,
               policy: str = "resize") -> Image.Image:
    """The image's header only: checked against the pixel limit and the resize policy, and, for a JPEG, set to
    decode at the smallest power-of-two reduction still at least the model's input size (Pillow's draft mode).
    `decoded_pixels(img)` is then what decoding it will cost."""
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
    upright = (h, w) if _orientation(img, header_only=True) in _TRANSPOSED else (w, h)
    if policy == "reject" and upright != size:
        raise ImageRejected(f"{label} is {upright[0]}x{upright[1]}; this service takes {size[0]}x{size[1]} images "
                            "only (resize policy 'reject')", 400, "wrong_size")
    if img.format == "JPEG" and img.mode in ("L", "RGB", "CMYK", "YCbCr"):
        target = (size[1], size[0]) if upright != (w, h) else size
        img.draft("L" if img.mode == "L" else "RGB", target)  # DCT scaling: 1/2, 1/4 or 1/8 of the work
    return img


def decoded_pixels(img: Image.Image) -> int:
    return img.size[0] * img.size[1]


def _orientation(img: Image.Image, header_only: bool = False) -> int:
    """The EXIF orientation (1: upright). Before decoding, only what the header holds: Pillow's PNG getexif()
    would decode the whole image to look for an eXIf chunk after the pixels."""
    try:
        if header_only and img.format == "PNG" and "exif" not in img.info:
            return 1
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block: no orientation, as a viewer would show it
        return 1


def decode_opened(img: Image.Image, label: str, *, mode: str, size: tuple[int, int]) -> np.ndarray:
    """An opened image -> float32 [C, H, W] in [0,1], in colour `mode` ("L"/"RGB") and `size` (width, height):
    upright by its EXIF orientation; 16-bit grey scaled (not clipped); float images taken when in [0, 1]."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()  # decodes; truncated or corrupt data fails here
        if _orientation(img) != 1:
            img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombWarning:
        raise ImageRejected(f"{label} is too large to decode", 413, "too_many_pixels") from None
    except Exception as e:
        raise ImageRejected(f"{label} cannot be decoded ({type(e).__name__}: {e})") from None
    if img.mode in _SIXTEEN_BIT or img.mode in ("I", "F"):
        return _wide(img, label, mode, size)
    try:
        img = img.convert(mode)
    except Exception as e:
        raise ImageRejected(f"{label} has colour mode {img.mode}, which cannot be converted to {mode} "
                            f"({type(e).__name__}: {e})", 400, "unsupported_mode") from None
    if img.size != size:
        img = img.resize(size, Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _wide(img: Image.Image, label: str, mode: str, size: tuple[int, int]) -> np.ndarray:
    """A one-channel 16-bit, 32-bit integer or float image, scaled to [0,1] in float and resized in float."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode in _SIXTEEN_BIT:
        arr = arr / 65535.0
    elif img.mode == "I":  # 32-bit integers: taken as 16-bit samples, the only ones images carry in practice
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ImageRejected(f"{label} is a 32-bit integer image with values outside 0..65535; send 8- or 16-bit "
                                "images", 400, "unsupported_mode")
        arr = arr / 65535.0
    else:  # "F"
        if not np.all(np.isfinite(arr)) or (arr.size and (arr.min() < 0 or arr.max() > 1)):
            lo, hi = (float(np.nanmin(arr)), float(np.nanmax(arr))) if arr.size else (0.0, 0.0)
            raise ImageRejected(f"{label} is a float image with values outside [0, 1] (from {lo:g} to {hi:g}, or "
                                "not finite); send floats in [0, 1], or 8- or 16-bit images", 400, "unsupported_mode")
    plane = Image.fromarray(arr.astype(np.float32), mode="F")
    if plane.size != size:
        plane = plane.resize(size, Image.BILINEAR)
    out = np.clip(np.asarray(plane, dtype=np.float32), 0.0, 1.0)[None]
    return np.repeat(out, 3, axis=0) if mode == "RGB" else out


def decode_image(blob: bytes, label: str, *, mode: str, size: tuple[int, int], max_pixels: int,
                 policy: str = "resize") -> np.ndarray:
    """bytes -> float32 [C, H, W] in [0,1], in colour `mode` ("L"/"RGB") and `size` (width, height)."""
    img = open_image(blob, label, mode=mode, size=size, max_pixels=max_pixels, policy=policy)
    return decode_opened(img, label, mode=mode, size=size)
