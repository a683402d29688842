"""Command-line flags generated from config dataclasses, in TF Serving's ``--name=value`` style."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Sequence, TypeVar

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, *, skip: Sequence[str] = (),
                        defaults: Any = None) -> None:
    """One ``--field`` per dataclass field, typed and documented from the field; ``defaults``:
    an instance whose values are the defaults instead of the fields' own."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):  # a group of settings: its fields are flags too
            group_defaults = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            add_dataclass_flags(parser, kind, defaults=group_defaults)  # type: ignore[arg-type]
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (getattr(defaults, f.name) if defaults is not None else f.default)
        helptext = f.metadata.get("help", "")
        if required:
            parser.add_argument(f"--{f.name}", type=kind, required=True, help=helptext)
            continue
        if kind is bool:
            names = [f"--{f.name}", *(f"--{alias}" for alias in f.metadata.get("aliases", ()))]
            parser.add_argument(*names, dest=f.name, type=parse_bool, nargs="?", const=True,
                                default=default, metavar="BOOL", help=f"{helptext} (default: {default})")
        elif kind == tuple[int, ...]:
            parser.add_argument(f"--{f.name}", type=parse_int_list, default=default, metavar="N,N,...",
                                help=helptext)
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=default,
                                help=f"{helptext} (default: {default!r})")


def dataclass_from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = dataclass_from_args(hints[f.name], args)
        elif hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    values.update(overrides)
    return cls(**values)


def parse_flags(cls: type[T], argv: Sequence[str]) -> T:
    """An instance of ``cls`` from flags made by dataclass_to_argv (settings passed to children)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_dataclass_flags(parser, cls)
    return dataclass_from_args(cls, parser.parse_args(list(argv)))


def dataclass_to_argv(instance: Any) -> list[str]:
    """The flags that rebuild ``instance`` through add_dataclass_flags (for spawned children)."""
    argv = []
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):  # a group: its fields are flags of their own
            argv += dataclass_to_argv(value)
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, tuple):
            text = ",".join(str(v) for v in value)
        else:
            text = str(value)
        argv.append(f"--{f.name}={text}")
    return argv
