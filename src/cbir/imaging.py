"""Decoded pixels as the models, thumbnails and figures expect them: upright 8-bit RGB."""

from __future__ import annotations

import os

from PIL import Image, ImageOps

# Greyscale modes with more than 8 bits a sample (16-bit PNG opens as I;16, older Pillow gave I).
DEEP_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
DEEP_GREY_SCALE = 1 / 257  # 65535 -> 255
# Decoding beyond this many pixels (after JPEG draft reduction) is refused: a 490 KB PNG of
# 12000x14000 pixels would take 2 GB and half a minute. Override with CBIR_MAX_PIXELS.
DEFAULT_MAX_PIXELS = 64_000_000


class ImageTooLargeError(ValueError):
    """An image whose decoded size is above the pixel limit; the message gives both."""


def max_pixels() -> int:
    return int(os.environ.get("CBIR_MAX_PIXELS", DEFAULT_MAX_PIXELS))


def to_rgb(im: Image.Image, size: int) -> Image.Image:
    """Upright RGB, decoded at reduced scale when the file allows (JPEG draft) and `size` suffices.

    Pillow's own `convert("RGB")` clips 16-bit greyscale at 255, so such a photo comes out almost
    white; it is scaled by its real bit depth instead. Formats without draft decoding are refused
    above `max_pixels()` rather than decoded in full.
    """
    im.draft("RGB", (size, size))
    limit = max_pixels()
    if im.width * im.height > limit:
        raise ImageTooLargeError(
            f"{im.width}x{im.height} pixels is above the limit of {limit:,} (set CBIR_MAX_PIXELS to allow it)"
        )
    im = ImageOps.exif_transpose(im)
    if im.mode in DEEP_GREY_MODES:
        im = im.convert("I").point(lambda v: v * DEEP_GREY_SCALE).convert("L")
    return im.convert("RGB")
