"""The one image decoder of graftkd: PIL, with a pixel budget and a stated rule for every pixel mode.

Rule: a file is decoded by PIL alone (no second decoder is ever tried on a file PIL refuses); its
header size must be within the pixel budget before anything is decoded; a PNG must pass the CRC of
every chunk; 8-bit modes are converted to RGB by PIL (alpha dropped, palettes and greys expanded);
16-bit images (``I;16*``, and ``I``, which PIL uses for 16-bit PNGs) are scaled ``round(v * 255 /
65535)``; float images (``F``) must lie in [0, 1] and are scaled ``round(v * 255)``; anything else is
refused with a one-line reason.

This module imports only the standard library, numpy and PIL, so it also runs as the verification
worker (``python pixels.py --serve``): a native decoder that crashes there ends the worker, and the
file it was decoding is marked bad, instead of ending graftkd.
"""
from __future__ import annotations

import json
import struct
import sys
import warnings
import zlib
from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:
    import numpy as np

#: the suffixes of image files graftkd reads (training, scanning and ``predict`` alike)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp"})

#: the default pixel budget (``data.max_pixels``): PIL's own decompression-bomb limit
DEFAULT_MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)

_EIGHT_BIT = {"1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "LA", "La", "PA", "CMYK", "YCbCr", "LAB", "HSV"}


class Refused(Exception):
    """The file is not decoded; the message is the one-line reason."""


def check_png_crc(data: bytes) -> None:
    """Refuse a PNG whose chunks do not parse or fail their CRC (PIL does not check IDAT's)."""
    pos = 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        end = pos + 8 + length
        if end + 4 > len(data):
            raise Refused(f"PNG chunk {kind!r} at byte {pos} runs past the end of the file (truncated)")
        (crc,) = struct.unpack(">I", data[end:end + 4])
        if zlib.crc32(data[pos + 4:end]) & 0xFFFFFFFF != crc:
            raise Refused(f"PNG chunk {kind.decode('latin-1')!r} at byte {pos} fails its CRC (the file is damaged)")
        if kind == b"IEND":
            return
        pos = end + 4
    raise Refused("PNG without an IEND chunk (truncated)")


def _open(data: bytes, max_pixels: int) -> Image.Image:
    import io

    if data[:8] == b"\x89PNG\r\n\x1a\n":
        check_png_crc(data)
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels  # a budget raised by data.max_pixels raises PIL's bomb limit with it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the budget below is the check
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise Refused(f"over the pixel budget of {max_pixels} (data.max_pixels): {_reason(e)}") from None
    except Exception as e:  # noqa: BLE001  PIL raises many types on a foreign file
        raise Refused(_reason(e)) from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise Refused("image has zero size")
    if w * h > max_pixels:
        raise Refused(f"{w} x {h} = {w * h} pixels is over the pixel budget of {max_pixels} "
                      f"(data.max_pixels; a decompression bomb?)")
    return im


def _reason(e: BaseException) -> str:
    import re

    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", text)[:200]


def to_rgb8(im: Image.Image) -> np.ndarray:
    """HxWx3 uint8 of a PIL image, by the rule of the module docstring."""
    import numpy as np  # imported on use: the verification worker starts faster without it

    mode = im.mode
    if mode in _EIGHT_BIT:
        return np.array(im.convert("RGB"))
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise Refused(f"{mode} image with values outside 0..65535 (min {a.min()}, max {a.max()})")
        grey = ((a * 255 + 32767) // 65535).astype(np.uint8)
    elif mode == "F":
        a = np.asarray(im).astype(np.float64)
        if a.size and (not np.isfinite(a).all() or a.min() < 0 or a.max() > 1):
            raise Refused("float image with values outside [0, 1] (graftkd scales float images from [0, 1])")
        grey = np.rint(a * 255).astype(np.uint8)
    else:
        raise Refused(f"unsupported pixel mode {mode!r}")
    return np.repeat(grey[:, :, None], 3, axis=2)


def _decoded(data: bytes, max_pixels: int, convert: bool) -> tuple[tuple[int, int], np.ndarray | None]:
    """((width, height), HxWx3 uint8 RGB) of an image file's bytes. ``convert=False`` decodes every
    pixel and checks the rule but skips converting 8-bit modes, which cannot fail (array None)."""
    if not data:
        raise Refused("empty file (0 bytes)")
    im = _open(data, max_pixels)
    try:
        im.load()
        arr = None if not convert and im.mode in _EIGHT_BIT else to_rgb8(im)
        return im.size, arr
    except Refused:
        raise
    except Exception as e:  # noqa: BLE001  truncated data, decoder errors
        raise Refused(_reason(e)) from None
    finally:
        im.close()


def decode_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """HxWx3 uint8 RGB of an image file's bytes; ``Refused`` with a one-line reason."""
    import numpy as np

    arr = _decoded(data, max_pixels, convert=True)[1]
    assert arr is not None
    return np.ascontiguousarray(arr)


def verify(path: str, max_pixels: int) -> list[int] | str:
    """[width, height] of a fully decoded file, or the reason it is refused."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return f"cannot read the file ({e.strerror or e})"
    try:
        (w, h), _ = _decoded(data, max_pixels, convert=False)
    except Refused as e:
        return str(e)
    return [int(w), int(h)]


def serve() -> None:
    """Worker loop: a JSON ``[path, max_pixels]`` per line in, a JSON result per line out."""
    Image.MAX_IMAGE_PIXELS = None  # this process checks only graftkd's budget (from the header, before decoding)
    for line in sys.stdin:
        path, max_pixels = json.loads(line)
        result: Any = verify(path, int(max_pixels))
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve()
