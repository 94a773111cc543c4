"""A small generic registry: one instance per component kind (backbones, losses, ...).

Names come from two places: components registered under a name (``register``) and *resolvers*
(``add_resolver``), fallbacks that turn a whole family of names into components (e.g. the
built-in ``kdtoolkit.builtin.timm`` plugin resolves any timm model name). Both remember the
plugin that added them, so ``kd plugins`` can list them and ``KD_DISABLE_PLUGINS`` removes them.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar, overload

from kdtoolkit.errors import KdError, suggestion

T = TypeVar("T")
D = TypeVar("D")

_MISSING: object = object()


class UnknownComponent(KdError, KeyError):
    """A name that is neither registered nor resolved; one line, with close matches.

    A ``KeyError`` too, so ``registry[name]`` behaves like a mapping lookup.
    """

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Resolver(Generic[T]):
    """A fallback for names nobody registered.

    ``resolve(name)`` returns the component or None when the name is not one of its own;
    ``describe`` says what it resolves (for ``kd plugins``, e.g. "any timm model name");
    ``candidates()`` lists the names it knows, for close matches in error messages;
    ``owner`` is the plugin that added it.
    """

    name: str
    resolve: Callable[[str], T | None]
    describe: str
    candidates: Callable[[], Iterable[str]] | None = None
    owner: str = "python"


class Registry(Generic[T]):
    """Maps lower_snake_case names to components and remembers which plugin gave each.

    It reads like a mapping: ``name in registry``, ``registry[name]``, ``registry.get(name)``,
    ``len`` and iteration. Lookups try the registered names first, then the resolvers in the
    order they were added; ``len``, iteration and ``list`` cover the registered names only.

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
        self._resolvers: list[Resolver[T]] = []
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

    def _check_name(self, name: str, what: str) -> None:
        if not name or name != name.lower() or not name.replace("_", "").isalnum():
            raise KdError(f"{what} name {name!r} must be lower_snake_case")

    def _add(self, name: str, obj: T) -> None:
        self._check_name(name, self.kind)
        if name in self._items:
            raise KdError(
                f"{self.kind} {name!r} is registered twice: by plugin "
                f"{self._owners[name]!r} and by plugin {self._current_owner!r}; "
                f"disable one with KD_DISABLE_PLUGINS"
            )
        self._items[name] = obj
        self._owners[name] = self._current_owner

    def add_resolver(
        self,
        name: str,
        resolve: Callable[[str], T | None],
        describe: str,
        candidates: Callable[[], Iterable[str]] | None = None,
    ) -> Resolver[T]:
        """Add a fallback tried (in order) for names that are not registered; see
        ``Resolver``. ``name`` (lower_snake_case, unique per registry) identifies it."""
        self._check_name(name, f"{self.kind} resolver")
        for other in self._resolvers:
            if other.name == name:
                raise KdError(
                    f"{self.kind} resolver {name!r} is added twice: by plugin {other.owner!r} "
                    f"and by plugin {self._current_owner!r}; disable one with KD_DISABLE_PLUGINS"
                )
        resolver = Resolver(name, resolve, describe, candidates, self._current_owner)
        self._resolvers.append(resolver)
        return resolver

    def resolvers(self) -> list[Resolver[T]]:
        """The resolvers, in the order they are tried."""
        return list(self._resolvers)

    def _lookup(self, name: str) -> tuple[T, str] | None:
        """(component, owning plugin) of ``name``, or None."""
        if name in self._items:
            return self._items[name], self._owners[name]
        if not isinstance(name, str):
            return None
        for resolver in self._resolvers:
            found = resolver.resolve(name)
            if found is not None:
                return found, resolver.owner
        return None

    @overload
    def get(self, name: str) -> T: ...

    @overload
    def get(self, name: str, default: D) -> T | D: ...

    def get(self, name: str, default: object = _MISSING) -> object:
        """The component called ``name`` (registered, else resolved). Without ``default``, an
        unknown name raises ``UnknownComponent`` listing close matches; with it, ``default``
        is returned instead."""
        found = self._lookup(name)
        if found is not None:
            return found[0]
        if default is not _MISSING:
            return default
        raise UnknownComponent(self.unknown_message(name))

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def unknown_message(self, name: str) -> str:
        """'unknown <kind> ...' with close matches among the registered names and the names
        the resolvers know, and how to list them."""
        candidates = list(self._items)
        for resolver in self._resolvers:
            if resolver.candidates is not None:
                candidates += resolver.candidates()
        also = "".join(f", or {r.describe}" for r in self._resolvers)
        return (
            f"unknown {self.kind} {name!r}{suggestion(name, candidates)}; "
            f"run `kd plugins` to list the registered ones{also}"
        )

    def owner(self, name: str) -> str:
        """Name of the plugin that registered (or resolves) ``name``."""
        found = self._lookup(name)
        if found is None:
            raise UnknownComponent(self.unknown_message(name))
        return found[1]

    def list(self, pattern: str = "*") -> list[str]:
        """Sorted registered names matching a glob ``pattern`` (like ``timm.list_models``)."""
        return sorted(n for n in self._items if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._lookup(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        resolvers = [r.name for r in self._resolvers]
        return f"Registry({self.kind!r}, {self.list()}, resolvers={resolvers})"
