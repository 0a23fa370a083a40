"""Options dataclasses built from a config's keyword dict: the one check for unknown names."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar('T')


def from_options(cls: type[T], options: dict[str, Any], where: str) -> T:
    """``cls(**options)``, naming unknown options and the known ones instead of a bare TypeError."""
    known = {f.name for f in fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f'{where}: unknown option(s) {unknown}; the options are {sorted(known)}')
    return cls(**options)
