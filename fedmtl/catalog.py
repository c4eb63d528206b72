"""The names an experiment file may use, in one torch-free place.

``config.py`` validates experiment files against these lists without importing torch, and the
registries (:mod:`fedmtl.models`, :mod:`fedmtl.clients`, :mod:`fedmtl.strategies`) accept only
these names, so the schema and the code that runs it cannot drift apart
(``tests/test_registries.py`` checks that every name has its implementation).
"""

from __future__ import annotations

ALGORITHM_NAMES = (
    "local",
    "fedavg",
    "fedprox",
    "fedper",
    "ditto",
    "fedavg_task",
    "fedamp",
    "matfl",
    "mfed",
    "fedhca2",
    "fedmuscle",
    "pseudolabel",
    "simclr",
    "fedhenn",
    "cofed",
    "fedrcl",
    "feddf",
)

# Algorithms whose clients read the experiment's ``[public]`` dataset (validated up front).
PUBLIC_ALGORITHMS = ("fedmuscle", "pseudolabel", "simclr", "fedhenn", "cofed", "feddf")

# Encoder family → the backbone names it builds (timm model names, or the text encoders).
BACKBONES: dict[str, tuple[str, ...]] = {
    "vit": (
        "vit_tiny_patch16_224",
        "vit_small_patch16_224",
        "vit_base_patch16_224",
        "vit_large_patch16_224",
    ),
    "swin": ("swin_tiny_patch4_window7_224",),
    "resnet": ("resnet18", "resnet50", "resnet101"),
    "bert": ("bert",),
    "distilbert": ("distilbert",),
}
TEXT_FAMILIES = ("bert", "distilbert")
TEXT_BACKBONES = tuple(name for family in TEXT_FAMILIES for name in BACKBONES[family])


def supported_backbones() -> list[str]:
    """Every backbone name an experiment may use, sorted."""
    return sorted(name for names in BACKBONES.values() for name in names)


def backbone_family(backbone: str) -> str:
    """The encoder family that builds ``backbone``.

    Raises
    ------
    ValueError
        If no family builds it; the message lists the supported names.
    """
    for family, names in BACKBONES.items():
        if backbone in names:
            return family
    raise ValueError(f"unknown backbone {backbone!r}; supported: {supported_backbones()}")
