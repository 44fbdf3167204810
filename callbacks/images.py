"""Image encoding for the metric writers: CLU's image arrays as uint8 pixels and PNG bytes.

Kept apart from the writers so that each writer only decides where an image goes, not how its
pixels are encoded. PNG encoding uses Pillow.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

__all__ = ["encode_png", "to_uint8_nhwc"]


def to_uint8_nhwc(images: Any) -> np.ndarray:
    """Images in CLU's convention as uint8 pixels.

    Args:
        images: `[N, H, W, C]` or `[H, W, C]` with `C` in 1, 3 or 4; uint8, or floats in [0, 1]
            (clipped to that range; NaN becomes 0).

    Returns:
        `[N, H, W, C]` uint8 array (floats scaled by 255 and rounded).
    """
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"images must be [N, H, W, C] or [H, W, C] with C in 1/3/4, got {arr.shape}"
        )
    if arr.dtype != np.uint8:
        scaled = np.clip(np.nan_to_num(arr.astype(np.float64)), 0.0, 1.0) * 255.0 + 0.5
        arr = scaled.astype(np.uint8)
    return arr


def encode_png(image: np.ndarray) -> bytes:
    """One image as PNG bytes.

    Args:
        image: `[H, W, C]` uint8 array, `C` = 1 (grey), 3 (RGB) or 4 (RGBA).

    Returns:
        The PNG file's bytes.
    """
    from PIL import Image

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"expected an [H, W, C] uint8 image with C in 1/3/4, got {image.dtype} {image.shape}"
        )
    pixels = image[..., 0] if image.shape[-1] == 1 else image
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()
