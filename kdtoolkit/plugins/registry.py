"""A small generic registry: one instance per component kind (backbones, losses, ...)."""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from kdtoolkit.errors import KdError, suggestion

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps lower_snake_case names to components and remembers which plugin gave each.

    >>> losses = Registry("loss")
    >>> @losses.register("my_loss")
    ... class MyLoss: ...
    >>> losses.get("my_loss") is MyLoss
    True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind  # in messages: "unknown <kind> 'name'"
        self._items: dict[str, T] = {}
        self._owners: dict[str, str] = {}
        self._current_owner = "python"

    @contextlib.contextmanager
    def owned_by(self, plugin: str) -> Iterator[None]:
        """Attribute registrations made inside the block to ``plugin``."""
        previous, self._current_owner = self._current_owner, plugin
        try:
            yield
        finally:
            self._current_owner = previous

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; without ``obj``, return a decorator."""
        if obj is None:

            def decorator(item: T) -> T:
                self._add(name, item)
                return item

            return decorator
        self._add(name, obj)
        return obj

    def _add(self, name: str, obj: T) -> None:
        if not name or name != name.lower() or not name.replace("_", "").isalnum():
            raise KdError(f"{self.kind} name {name!r} must be lower_snake_case")
        if name in self._items:
            raise KdError(
                f"{self.kind} {name!r} is registered twice: by plugin "
                f"{self._owners[name]!r} and by plugin {self._current_owner!r}; "
                f"disable one with KD_DISABLE_PLUGINS"
            )
        self._items[name] = obj
        self._owners[name] = self._current_owner

    def get(self, name: str) -> T:
        """The component called ``name``; an error listing close matches if there is none."""
        try:
            return self._items[name]
        except KeyError:
            raise KdError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        return (
            f"unknown {self.kind} {name!r}{suggestion(name, self._items)}; "
            f"run `kd plugins` to list the registered ones"
        )

    def owner(self, name: str) -> str:
        """Name of the plugin that registered ``name``."""
        return self._owners[name]

    def list(self, pattern: str = "*") -> list[str]:
        """Sorted names matching a glob ``pattern`` (like ``timm.list_models``)."""
        return sorted(n for n in self._items if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.list()})"
