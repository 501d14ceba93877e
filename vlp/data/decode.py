"""Reduced-scale JPEG decoding: decode no more pixels than the resize after it needs.

libjpeg can decode a JPEG at 1/2, 1/4 or 1/8 of its size in the DCT domain (PIL's
`Image.draft`), several times faster than a full decode followed by a downscale. The resize
that follows then starts from an image whose sides are still at least what it needs, so the
output keeps its shape; its pixels differ slightly from those of a full decode (the DCT
scaling is a box filter of its own, and libjpeg skips the chroma upsampling). Other formats
decode as they are.

`images.fast_decode` says where it is used: `train` (the default: training reads reduced,
evaluation and serving exactly as the model's processor would), `always`, or `never`.
"""

from __future__ import annotations

from PIL import ExifTags, Image

from vlp.errors import ConfigError

FAST_DECODE_MODES = ("train", "always", "never")
_SCALES = (8, 4, 2)  # libjpeg's DCT scalings, largest first
_SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that turn the image a quarter


def fast_decode(mode: str, training: bool) -> bool:
    """Whether `images.fast_decode` = `mode` decodes reduced on a training (or evaluation) path."""
    if mode not in FAST_DECODE_MODES:
        raise ConfigError(f"images.fast_decode: {mode!r} is not one of {FAST_DECODE_MODES}")
    return mode == "always" or (mode == "train" and training)


def upright_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image once turned upright by its EXIF orientation.

    Read from the header: the pixels need not be decoded.
    """
    w, h = img.size
    # the tag ImageOps.exif_transpose reads
    return (h, w) if img.getexif().get(ExifTags.Base.Orientation) in _SWAPS_SIDES else (w, h)


def reduce_jpeg(img: Image.Image, max_scale: float) -> int:
    """Have `img` (opened, not yet loaded) decode at 1/k of its size; return k (1: full size).

    k is the largest of libjpeg's scalings (8, 4, 2) that is at most `max_scale`: the caller
    passes how much smaller than the file every side may get (e.g. the shorter side over the
    side the resize needs), so no side ends below what the resize needs. Images that are not
    JPEG, already loaded, or for which `max_scale` < 2 are left as they are.
    """
    if img.format != "JPEG" or max_scale < 2:
        return 1
    w, h = img.size
    k = next(k for k in _SCALES if k <= max_scale)
    # draft picks the largest scaling that keeps each side >= the size asked: w // k and
    # h // k give exactly 1/k. It returns None (and changes nothing) once the image is loaded.
    drafted = img.draft(img.mode, (w // k, h // k))
    return 1 if drafted is None else round(w / drafted[1][2])
