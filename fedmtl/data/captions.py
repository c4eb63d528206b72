"""English captions of the bundled digits, built from image statistics rather than the label."""

from __future__ import annotations

import numpy as np

from fedmtl.data.digits import DIGIT_NAMES

# Each statistic is cut at its terciles over the whole dataset; each bin has several wordings.
TERCILE_PHRASES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "ink": (
        ("written in faint ink", "lightly drawn", "made of thin, sparse strokes"),
        ("drawn with a moderate amount of ink", "of ordinary stroke weight", "evenly inked"),
        ("drawn in heavy ink", "boldly written", "made of thick, dense strokes"),
    ),
    "aspect": (
        ("narrow", "slim and tall", "much taller than it is wide"),
        ("of regular width", "moderately proportioned", "neither wide nor narrow"),
        ("wide", "broad and squat", "almost as wide as it is tall"),
    ),
    "shear": (
        ("leaning to the right", "tilted forward", "slanted like italics"),
        ("roughly upright", "standing nearly straight", "only slightly tilted"),
        ("leaning to the left", "tilted backwards", "slanted against the usual direction"),
    ),
    "vertical_balance": (
        ("top-heavy", "with most of its ink near the top", "fuller in the upper half"),
        ("balanced top to bottom", "evenly weighted vertically", "with ink spread top to bottom"),
        ("bottom-heavy", "with most of its ink near the bottom", "fuller in the lower half"),
    ),
    "horizontal_balance": (
        ("weighted to the left", "with more ink on its left side", "fuller on the left"),
        (
            "centred left to right",
            "horizontally balanced",
            "symmetric in its ink from side to side",
        ),
        ("weighted to the right", "with more ink on its right side", "fuller on the right"),
    ),
}
HOLE_PHRASES = (
    ("with no closed loop", "made of open strokes only", "without any enclosed hole"),
    ("with a single closed loop", "enclosing a single hole", "containing a loop"),
    ("with a pair of closed loops", "enclosing a couple of holes", "containing a pair of loops"),
)
PIECE_PHRASES = (
    ("drawn in a single continuous stroke", "made of a single connected piece"),
    ("broken into separate pieces", "drawn in disconnected parts"),
)
FRAMES = (
    "A handwritten digit, {body}.",
    "A scanned numeral, {body}.",
    "A small grayscale figure {body}.",
    "Pen-drawn character: {body}.",
    "An image of a single handwritten symbol, {body}.",
)
PAIR_HINTS = ("It could be a {a} or a {b}.", "Looks like a {a} or maybe a {b}.")
SINGLE_HINTS = ("Someone read it as a {a}.", "It might be a {a}.")
PARITY_HINTS = ("Probably an {p} number.", "A reader guessed it is {p}.")


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _hint(digit: int, rng: np.random.Generator) -> str:
    """A label hint that names the digit only some of the time, and sometimes wrongly."""
    other = int(rng.choice([d for d in range(10) if d != digit]))
    choice = rng.random()
    if choice < 0.4:  # a pair hides which of the two it is
        first, second = (digit, other) if rng.random() < 0.5 else (other, digit)
        template = PAIR_HINTS[rng.integers(len(PAIR_HINTS))]
        return template.format(a=DIGIT_NAMES[first], b=DIGIT_NAMES[second])
    if choice < 0.7:
        guess = digit if rng.random() < 0.7 else other
        return SINGLE_HINTS[rng.integers(len(SINGLE_HINTS))].format(a=DIGIT_NAMES[guess])
    parity = "even" if digit % 2 == 0 else "odd"
    return PARITY_HINTS[rng.integers(len(PARITY_HINTS))].format(p=parity)


def make_captions(
    stats: dict[str, np.ndarray],
    digits: np.ndarray,
    *,
    seed: int = 0,
    hint_probability: float = 0.3,
) -> list[str]:
    """One caption per image, describing quantised shape statistics in varied wording.

    Parameters
    ----------
    stats : dict of str to ndarray
        Per-image statistics (``ink``, ``aspect``, ``shear``, ``vertical_balance``,
        ``horizontal_balance``, ``holes``, ``pieces``), as built by :mod:`fedmtl.data.digits`.
    digits : ndarray
        Labels, used only for the optional hint sentence.
    seed : int
        Seed of the wording choices (same seed, same captions).
    hint_probability : float
        Chance that a caption ends with a hint about the label (a pair of digit names, one
        possibly wrong name, or the parity).

    Returns
    -------
    list of str
    """
    if not 0.0 <= hint_probability <= 1.0:
        raise ValueError(f"hint_probability must lie in [0, 1], got {hint_probability}")
    rng = np.random.default_rng(seed)
    bins = {
        name: np.searchsorted(np.quantile(stats[name], [1 / 3, 2 / 3]), stats[name], side="right")
        for name in TERCILE_PHRASES
    }
    captions = []
    for i, digit in enumerate(digits):
        choices = [TERCILE_PHRASES[name][bins[name][i]] for name in TERCILE_PHRASES]
        choices.append(HOLE_PHRASES[min(int(stats["holes"][i]), 2)])
        pieces = int(stats["pieces"][i])
        choices.append(PIECE_PHRASES[0] if pieces <= 1 else PIECE_PHRASES[1])
        picked = rng.permutation(len(choices))[: rng.integers(3, len(choices) + 1)]
        body = [choices[j][rng.integers(len(choices[j]))] for j in picked]
        caption = FRAMES[rng.integers(len(FRAMES))].format(body=_join(body))
        if rng.random() < hint_probability:
            caption += " " + _hint(int(digit), rng)
        captions.append(caption)
    return captions
