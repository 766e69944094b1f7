"""The one registry idiom: architectures, teacher recipes, divergences, serving-time defenses and label modes are
each a `Registry`; an entry is registered once, with its parameters and a one-line summary, and every tool (CLI
`--help`, the evaluation, the report, the README tables) finds it by name.

    DEFENSES = Registry("output defense")
    DEFENSES.register("topk", topk, summary="Stingy Teacher: the k largest, renormalised", params=("k",))
    DEFENSES["topk"]                  # the function; an unknown name raises UnknownName with the known ones
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownName(KeyError, ValueError):
    """A name no entry has. A KeyError (Mapping semantics: `in`, `.get`) and a ValueError (what the CLIs report as
    a one-line error); its message lists the known names."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    value: T
    summary: str  # one line, for --help and the README tables
    params: tuple[str, ...] = ()  # the settings the entry reads: its hyperparameters
    extra: tuple[tuple[str, Any], ...] = ()  # anything else a registry's users read (e.g. whether a defense keeps
    #                                          the top-1), as (key, value) pairs

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.extra).get(key, default)


class Registry(Mapping[str, T]):
    """Entries by name, in registration order. `registry[name]` is the registered value."""

    def __init__(self, kind: str):
        self.kind = kind  # what an entry is, for messages: "unknown <kind> 'x'; known: a, b"
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, value: T | None = None, *, summary: str, params: tuple[str, ...] = (),
                 **extra: Any):
        """Register `value` under `name`; without a value, a decorator that registers the function it decorates."""
        if value is None:
            def decorate(fn: T) -> T:
                self.register(name, fn, summary=summary, params=params, **extra)
                return fn
            return decorate
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        if not summary or "\n" in summary:
            raise ValueError(f"{self.kind} {name!r} needs a one-line summary")
        self._entries[name] = Entry(name, value, summary, tuple(params), tuple(extra.items()))
        return value

    def entry(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownName(f"unknown {self.kind} {name!r}; known: {', '.join(self._entries)}") from None

    def __getitem__(self, name: str) -> T:
        return self.entry(name).value

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[Entry[T]]:
        return list(self._entries.values())

    def help(self, title: str | None = None, skip: tuple[str, ...] = ()) -> str:
        """A titled list, one entry per line with its summary: for a CLI's --help epilog (raw formatting)."""
        shown = [e for e in self._entries.values() if e.name not in skip]
        width = max((len(e.name) for e in shown), default=0)
        lines = [f"  {e.name:<{width}}  {e.summary.replace('`', '')}" for e in shown]
        return "\n".join([f"{title or self.kind + 's'}:", *lines])

    def markdown(self, *, params: bool = True, extra: dict[str, Callable[[Entry[T]], str]] | None = None) -> str:
        """The README's table of this registry: key, its parameters (unless `params` is False), summary, and any
        `extra` columns (title -> cell)."""
        columns: dict[str, Callable[[Entry[T]], str]] = {"key": lambda e: f"`{e.name}`"}
        if params:
            columns["parameters"] = lambda e: ", ".join(f"`{p}`" for p in e.params)
        columns["what"] = lambda e: e.summary
        columns.update(extra or {})
        lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        for e in self._entries.values():
            lines.append("| " + " | ".join(fn(e).replace("|", "\\|") for fn in columns.values()) + " |")
        return "\n".join(lines)
