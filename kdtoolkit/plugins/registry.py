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


class PluginError(KdError):
    """A component broke its contract (a wrong result, an exception from its code): one line
    naming the component, its plugin, where it happened (fold, stage) and what was wrong."""

    def __init__(self, kind: str, name: str, plugin: str, problem: str, where: str = "") -> None:
        self.kind, self.name, self.plugin, self.problem = kind, name, plugin, problem
        self.where = where
        by = f" (plugin {plugin!r})" if plugin else ""
        at = f", {where}" if where else ""
        super().__init__(f"{kind} {name!r}{by}{at}: {problem}")

    def at(self, where: str) -> PluginError:
        """The same error located at ``where`` (e.g. "fold 0 student")."""
        return PluginError(self.kind, self.name, self.plugin, self.problem, where)

    @classmethod
    def wrap(
        cls, exc: BaseException, kind: str, name: str, plugin: str, where: str = ""
    ) -> PluginError:
        """``exc``, raised by the component's own code, as a ``PluginError``."""
        if isinstance(exc, PluginError):
            return exc if exc.where or not where else exc.at(where)
        return cls(kind, name, plugin, failure(exc), where)


def failure(exc: BaseException) -> str:
    """'failed with Type: message' on one line: an exception from a component's code."""
    return f"failed with {type(exc).__name__}: {exc}".replace("\n", "; ")


#: ``check(component)``: None when ``component`` fits the registry's kind, else the problem.
Check = Callable[[object], str | None]


class Registry(Generic[T]):
    """Maps lower_snake_case names to components and remembers which plugin gave each.

    It reads like a mapping: ``name in registry``, ``registry[name]``, ``registry.get(name)``,
    ``len``, iteration, ``keys``/``values``/``items``. Lookups try the registered names first,
    then the resolvers in the order they were added; ``len``, iteration and ``list`` cover the
    registered names only. ``check`` (optional) rejects components of the wrong kind at
    registration (and resolved ones on lookup) with a ``KdError`` naming the plugin.

    >>> losses = Registry("loss")
    >>> @losses.register("my_loss")
    ... class MyLoss: ...
    >>> losses.get("my_loss") is MyLoss
    True
    """

    def __init__(self, kind: str, check: Check | None = None) -> None:
        self.kind = kind  # in messages: "unknown <kind> 'name'"
        self.check = check
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
        self._check_kind(name, obj, self._current_owner)
        self._items[name] = obj
        self._owners[name] = self._current_owner

    def _check_kind(self, name: str, obj: object, owner: str) -> None:
        problem = self.check(obj) if self.check is not None else None
        if problem:
            raise KdError(f"{self.kind} {name!r} from plugin {owner!r}: {problem}")

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
                self._check_kind(name, found, resolver.owner)
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

    def keys(self) -> list[str]:
        """The registered names, sorted (as ``list()``)."""
        return self.list()

    def values(self) -> list[T]:
        """The registered components, in name order."""
        return [self._items[n] for n in self.list()]

    def items(self) -> list[tuple[str, T]]:
        """(name, component) of the registered names, sorted by name."""
        return [(n, self._items[n]) for n in self.list()]

    def __repr__(self) -> str:
        resolvers = [r.name for r in self._resolvers]
        return f"Registry({self.kind!r}, {self.list()}, resolvers={resolvers})"
