"""Command-line flags derived from EngineConfig's fields, as vLLM's EngineArgs derives its own.

One declaration per knob: a field added to EngineConfig becomes `--its-name` in `kvpilot serve`,
`generate` and `tune`, with the field's description as help, its choices and type, and its default shown.
`to_flags` is the inverse, used wherever a configuration becomes a command line (the operator's pod
arguments, the tuner's trial servers): each flag and its value are one argument (`--name=value`), so a
value that starts with `-` can never be read as a flag.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Collection, Mapping
from typing import Any, Literal

from kvpilot.engine.config import EngineConfig
from pydantic.fields import FieldInfo


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _inner(annotation: Any) -> tuple[Any, bool]:
    """(the type without `| None`, whether None is allowed)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _add(group: argparse._ActionsContainer, name: str, info: FieldInfo, required: bool) -> None:
    kind, _ = _inner(info.annotation)
    default = None if info.is_required() else info.get_default(call_default_factory=True)
    help_text = (info.description or name) + ("" if required or default is None else f" (default: {default})")
    if kind is bool:
        group.add_argument(flag_name(name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        return
    kwargs: dict[str, Any] = {"default": None, "required": required, "help": help_text}
    if typing.get_origin(kind) is Literal:
        kwargs["choices"] = list(typing.get_args(kind))
    elif kind in (int, float, str):
        kwargs["type"] = kind
    else:
        raise TypeError(f"EngineConfig.{name}: no flag for a {kind!r} field; give it a flag type here")
    group.add_argument(flag_name(name), **kwargs)


def add_engine_flags(group: argparse._ActionsContainer, exclude: Collection[str] = ()) -> None:
    """Every EngineConfig field not in `exclude` as a flag; unset flags stay None (EngineConfig's default)."""
    for name, info in EngineConfig.model_fields.items():
        if name not in exclude:
            _add(group, name, info, required=info.is_required())


def engine_values(args: argparse.Namespace, exclude: Collection[str] = ()) -> dict[str, Any]:
    """The flags the user set, as EngineConfig keyword arguments."""
    return {
        name: getattr(args, name)
        for name in EngineConfig.model_fields
        if name not in exclude and getattr(args, name, None) is not None
    }


def to_flags(values: Mapping[str, Any]) -> list[str]:
    """EngineConfig fields as flags that `add_engine_flags` parses back: `--name=value`, booleans as
    `--name` / `--no-name`; None means unset and is left out."""
    flags: list[str] = []
    for name, value in values.items():
        if name not in EngineConfig.model_fields:
            raise KeyError(f"{name!r} is not an EngineConfig field")
        if value is None:
            continue
        if isinstance(value, bool):
            flags.append(flag_name(name) if value else "--no-" + flag_name(name)[2:])
        else:
            flags.append(f"{flag_name(name)}={value}")
    return flags
