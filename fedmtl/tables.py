"""Tables that fit the terminal they are printed on (80 columns included) without cutting names.

Rich shrinks a too-wide table by truncating cells with ``…``, client and task names included.
The tables here are built at print time for the console's width instead: they drop a column
into a legend, or split their columns over several tables, so every name stays whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from rich import box
from rich.console import Console, ConsoleOptions, RenderableType
from rich.measure import Measurement
from rich.table import Table

# A rule under the header only: four fewer columns of borders than rich's default box.
COMPACT: dict[str, Any] = {"box": box.SIMPLE_HEAD}


def natural_width(console: Console, options: ConsoleOptions, table: Table) -> int:
    """Columns ``table`` needs to show every cell on one line."""
    wide = options.update(width=10_000, max_width=10_000)
    return Measurement.get(console, wide, table).maximum


class FittedTables:
    """Renderable whose tables are chosen for the width they are printed at.

    Parameters
    ----------
    build : callable
        ``build(console, options) → list of renderables`` for ``options.max_width``.
    """

    def __init__(self, build: Callable[[Console, ConsoleOptions], list[RenderableType]]) -> None:
        self.build = build

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Any]:
        """Build for this console's width and yield the result."""
        yield from self.build(console, options)

    def tables(self, width: int = 80) -> list[RenderableType]:
        """The renderables printed at ``width`` columns (for tests and plain-text logs)."""
        console = Console(width=width, color_system=None)
        return self.build(console, console.options)
