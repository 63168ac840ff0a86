"""Dataclass configurations to and from the JSON-ready dicts that files store.

A config class inherits `DictConfig`: `to_dict` gives its fields (tuples as lists, nested
configs as their dicts) and `from_dict` rebuilds it from such a dict, however old or new the
file: keys it does not know are ignored (or refused, with `strict`), missing ones take the
field's default (those it names `required` are an error), lists become tuples where the field
is a tuple, and dicts become the nested config where the field is one.
"""

from __future__ import annotations

import types
from dataclasses import asdict, fields
from functools import cache
from typing import Any, ClassVar, TypeVar, Union, get_args, get_origin, get_type_hints

C = TypeVar("C", bound="DictConfig")


class DictConfig:
    """Mixin of a dataclass: `to_dict` and `from_dict` (see the module's docstring)."""

    # True: a key that is not a field is an error (a network this version cannot build),
    # not ignored
    strict: ClassVar[bool] = False
    # keys every file holds: without them a dict is not such a config, and no default serves
    required: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, DictConfig):
                d[f.name] = value.to_dict()
            elif isinstance(value, tuple):
                d[f.name] = list(value)
        return d

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        kinds = field_types(cls)
        unknown = set(d) - kinds.keys()
        if unknown and cls.strict:
            raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
        missing = [k for k in cls.required if k not in d]
        if missing:
            raise ValueError(f"{cls.__name__} needs {', '.join(missing)}")
        return cls(**{k: from_json(kinds[k], v) for k, v in d.items() if k in kinds})


@cache
def field_types(cls: type) -> dict[str, Any]:
    """The type of each field of the dataclass `cls` (its annotations evaluated)."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def from_json(kind: Any, value: Any) -> Any:
    """`value` as read from JSON, made a field of type `kind`: a list a tuple where `kind` is
    (or may be) a tuple, a dict the config class `kind` names (also `X | None`)."""
    options = get_args(kind) if get_origin(kind) in (Union, types.UnionType) else (kind,)
    for option in options:
        if isinstance(value, list) and (option is tuple or get_origin(option) is tuple):
            return tuple(value)
        if isinstance(value, dict) and is_config(option):
            return option.from_dict(value)
    return value


def is_config(kind: Any) -> bool:
    return isinstance(kind, type) and get_origin(kind) is None and issubclass(kind, DictConfig)
