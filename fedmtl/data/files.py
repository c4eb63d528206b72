"""File helpers shared by the on-disk loaders: split lists, extension lookup, image decoding."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg")


def read_id_list(path: Path) -> list[str]:
    """Sample ids of a split file, one per line (blank lines skipped; first column only)."""
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def find_file(directory: Path, stem: str, extensions: Sequence[str]) -> Path | None:
    """The first ``directory/stem + ext`` that exists, or None."""
    for extension in extensions:
        candidate = directory / f"{stem}{extension}"
        if candidate.is_file():
            return candidate
    return None


def read_rgb(path: Path) -> np.ndarray:
    """Decode an image file as ``uint8 [H, W, 3]`` (grayscale and palette images converted)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def read_png(path: Path) -> np.ndarray:
    """Decode a PNG with its stored values kept (palette indices stay class ids)."""
    with Image.open(path) as image:
        return np.asarray(image)
