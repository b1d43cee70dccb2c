"""Registry: one small name -> factory table per component kind (timm-style register/get/list).

Lookups never guess: an unknown name is an error listing up to three close matches and the command that
lists them all.
"""

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from minsota.errors import UserError, did_you_mean


def override(factory: Callable) -> Callable:
    """Mark a factory as deliberately replacing a name another plugin registers."""
    factory.minsota_override = True
    return factory


def summary_of(obj: Any) -> str:
    """The first line of a factory's docstring; a value that is no factory (a recipe's path) has none."""
    doc = (getattr(obj, "__doc__", None) or "").strip() if callable(obj) else ""
    return doc.splitlines()[0] if doc else ""


@dataclass(frozen=True)
class Entry:
    name: str
    factory: Any
    summary: str
    provider: str


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, factory=None, *, summary: str | None = None, provider: str = "<direct>"):
        """Register ``factory`` under ``name``; usable as a decorator when ``factory`` is omitted (timm). A name
        registered twice is an error unless exactly one of the two factories is marked with `override`, which
        then holds the name whichever plugin loaded first."""
        if factory is None:
            return lambda f: self.register(name, f, summary=summary, provider=provider)
        old = self._entries.get(name)
        if old is not None:
            replacing, replaced = (getattr(f, "minsota_override", False) for f in (factory, old.factory))
            if replacing == replaced:
                raise UserError(
                    f"{self.kind} '{name}' is registered by both plugin '{old.provider}' and plugin '{provider}' "
                    f"(wrap one factory in minsota.override() to replace the other deliberately)"
                )
            if replaced:
                return factory
        self._entries[name] = Entry(name, factory, summary if summary is not None else summary_of(factory), provider)
        return factory

    def get(self, name: str):
        return self.describe(name).factory

    def describe(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            hint = did_you_mean(name, self._entries)
            hint = f"; {hint}" if hint else ""
            raise UserError(f"unknown {self.kind} '{name}'{hint} (`minsota list {self.kind}` lists them)") from None

    def list(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)
