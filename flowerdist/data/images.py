"""Decoding one image file: the only place that opens images, so training, checks and predict
accept and refuse exactly the same files."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")

#: Images with more pixels are refused as decompression bombs (a 9000x7000 photo still passes).
MAX_PIXELS = 64_000_000


#: Pillow modes holding more than 8 bits per pixel, and the largest value of each.
_WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def shown(name: str | Path) -> str:
    """A file name fit for one log line: quoted and escaped when it holds a newline or another control character."""
    name = str(name)
    return name if name.isprintable() else repr(name)


def load_rgb(path: Path) -> Image.Image:
    """The image as 8-bit RGB.

    16-bit (and 32-bit int or float) greyscale is scaled to 8 bits first: Pillow's own conversion
    clips it, which turns a 16-bit photo almost white.
    """
    with Image.open(path) as img:
        if img.mode in _WIDE_MODES:
            values = np.asarray(img, dtype=np.float64)
            top = _WIDE_MODES[img.mode]
            if img.mode == "I" and values.max(initial=0) <= 255:
                top = 255  # 8-bit data stored as 32-bit ints (some PNG/TIFF writers)
            scaled = np.clip(values * (255.0 / top), 0, 255).round().astype(np.uint8)
            return Image.fromarray(scaled, "L").convert("RGB")
        return img.convert("RGB")


def check_image(path: Path) -> tuple[str, str]:
    """Decode `path` fully once: ("ok" | "convert" | "skip", mode or the reason it is skipped)."""
    try:
        if path.stat().st_size == 0:
            return "skip", "empty file"
        if not os.access(path, os.R_OK):
            return "skip", "cannot read (permission denied)"
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    return "skip", f"too large ({w}x{h} px, decompression-bomb guard)"
                mode = img.mode
                img.load()
    except UnidentifiedImageError:
        return "skip", "not an image"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return "skip", "too large (decompression-bomb guard)"
    except PermissionError:
        return "skip", "cannot read (permission denied)"
    except (OSError, SyntaxError, ValueError) as err:
        return "skip", f"truncated or corrupt ({str(err).splitlines()[0][:60]})"
    return ("ok", mode) if mode == "RGB" else ("convert", mode)
