"""One registry type for everything looked up by name.

Task kinds, dataset kinds, encoder families, client algorithms and strategies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TypeVar

T = TypeVar("T", bound=type)


class Registry(Mapping[str, T]):
    """Classes registered under unique names, read like a dict.

    Parameters
    ----------
    kind : str
        What the names are, for error messages (``"task kind"``, ``"algorithm"``, ...).
    attribute : str, optional
        Class attribute :meth:`register` sets to the registered name (``kind``, ``name``).
    allowed : iterable of str, optional
        The only names that may be registered (e.g. the algorithm names the experiment schema
        accepts), so a registration that the schema would never reach fails at import.
    """

    def __init__(
        self, kind: str, *, attribute: str | None = None, allowed: Iterable[str] | None = None
    ) -> None:
        self.kind = kind
        self.attribute = attribute
        self.allowed = None if allowed is None else tuple(allowed)
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator registering ``cls`` under ``name``.

        Raises
        ------
        ValueError
            If ``name`` is taken, or not one of the ``allowed`` names.
        """

        def decorator(cls: T) -> T:
            self.add(name, cls)
            return cls

        return decorator

    def add(self, name: str, cls: T) -> None:
        """Register ``cls`` under ``name`` (see :meth:`register`)."""
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        if self.allowed is not None and name not in self.allowed:
            raise ValueError(f"{self.kind} {name!r} is not one of {list(self.allowed)}")
        if self.attribute is not None:
            setattr(cls, self.attribute, name)
        self._items[name] = cls

    def __getitem__(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {sorted(self._items)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._items)})"
