"""Figure crops: a region of the decoded page image -> JPEG bytes with a content-addressed name.

PIL is imported by the caller's first use only (importing the code location must stay cheap).
The name is the SHA-256 of the JPEG bytes, so the same crop of the same page always gets the same
name, is stored once (``vlm/<doc_id>/images/<sha256>.jpg``) and is linked as ``images/<sha256>.jpg``,
as MinerU links its figures.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

JPEG_QUALITY = 90


def decode_page(png: bytes) -> Image.Image:
    """The page PNG decoded once, as RGB (what MinerU crops and sends)."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as opened:
        opened.load()  # the pixels are in memory once loaded: the image outlives its file object
        return opened if opened.mode == "RGB" else opened.convert("RGB")  # convert() would copy an RGB page


def pixel_box(bbox: Sequence[float], width: int, height: int) -> tuple[int, int, int, int] | None:
    """A 0..1 box in pixels of a ``width`` x ``height`` image, clamped; None when it holds no pixel."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    left, top = max(0, math.floor(x1 * width)), max(0, math.floor(y1 * height))
    right, bottom = min(width, math.ceil(x2 * width)), min(height, math.ceil(y2 * height))
    if right - left < 1 or bottom - top < 1:
        return None
    return left, top, right, bottom


def crop_jpeg(image: Image.Image, bbox: Sequence[float]) -> bytes | None:
    """JPEG bytes of ``image`` cropped at the 0..1 ``bbox``; None for an empty region."""
    box = pixel_box(bbox, image.width, image.height)
    if box is None:
        return None
    crop = image.crop(box)
    if crop.mode != "RGB":
        crop = crop.convert("RGB")
    buffer = io.BytesIO()
    # Fixed encoder settings: the same pixels always give the same bytes, hence the same name.
    crop.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False, subsampling=0)
    return buffer.getvalue()


def image_name(jpeg: bytes) -> str:
    """``images/<sha256>.jpg``: the crop's path in the Markdown, the content list and under ``vlm/<doc_id>/``."""
    return f"images/{hashlib.sha256(jpeg).hexdigest()}.jpg"
