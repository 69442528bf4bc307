"""Decoding one image file: the only place that opens images, so training, checks and predict
accept and refuse exactly the same files."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")

#: Images with more pixels are refused as decompression bombs (a 9000x7000 photo still passes).
MAX_PIXELS = 64_000_000


def load_rgb(path: Path) -> Image.Image:
    """The image as 8-bit RGB."""
    with Image.open(path) as img:
        return img.convert("RGB")


def check_image(path: Path) -> tuple[str, str]:
    """Decode `path` fully once: ("ok" | "convert" | "skip", mode or the reason it is skipped)."""
    try:
        if path.stat().st_size == 0:
            return "skip", "empty file"
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
    except (OSError, SyntaxError, ValueError) as err:
        return "skip", f"truncated or corrupt ({str(err).splitlines()[0][:60]})"
    return ("ok", mode) if mode == "RGB" else ("convert", mode)
