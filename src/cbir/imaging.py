"""Decoded pixels as the models, thumbnails and figures expect them: upright 8-bit RGB."""

from __future__ import annotations

from PIL import Image, ImageOps

# Greyscale modes with more than 8 bits a sample (16-bit PNG opens as I;16, older Pillow gave I).
DEEP_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
DEEP_GREY_SCALE = 1 / 257  # 65535 -> 255


def to_rgb(im: Image.Image, size: int) -> Image.Image:
    """Upright RGB, decoded at reduced scale when the file allows (JPEG draft) and `size` suffices.

    Pillow's own `convert("RGB")` clips 16-bit greyscale at 255, so such a photo comes out almost
    white; it is scaled by its real bit depth instead.
    """
    im.draft("RGB", (size, size))
    im = ImageOps.exif_transpose(im)
    if im.mode in DEEP_GREY_MODES:
        im = im.convert("I").point(lambda v: v * DEEP_GREY_SCALE).convert("L")
    return im.convert("RGB")
