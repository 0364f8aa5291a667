"""Stage configs are dataclasses; every CLI flag is one of their fields (`--k-core` <-> k_core).
Each run writes its resolved config beside its outputs."""
import argparse
import dataclasses
import math
import typing

from gream_fast.errors import InvalidInputError


def add_fields(parser: argparse.ArgumentParser, cls, help: dict | None = None,
               required=(), choices: dict | None = None) -> None:
    """One flag per field of dataclass `cls`, typed and defaulted from the field."""
    help, choices = help or {}, choices or {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help.get(f.name))
            continue
        base = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
        parser.add_argument(flag, type=base, default=None if f.name in required else f.default,
                            required=f.name in required, choices=choices.get(f.name),
                            help=help.get(f.name))


def from_args(cls, args: argparse.Namespace):
    """The dataclass `cls` filled from the parsed flags of add_fields."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_ranges(cfg, at_least: dict | None = None, positive=(), fractions=()) -> None:
    """Bounds on a config's numbers, with the flag named in the error: every float field finite;
    at_least {field: low} (>= low), positive (> 0), fractions (0..1). The one place configs
    check their numbers, so the CLI and the Python API refuse the same values."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise InvalidInputError(f"{flag(f.name)}: expected a finite number, got {v}")
    for name, low in (at_least or {}).items():
        if getattr(cfg, name) < low:
            raise InvalidInputError(f"{flag(name)}: expected >= {low}, got {getattr(cfg, name)}")
    for name in positive:
        if not getattr(cfg, name) > 0:
            raise InvalidInputError(f"{flag(name)}: expected > 0, got {getattr(cfg, name)}")
    for name in fractions:
        if not 0 <= getattr(cfg, name) <= 1:
            raise InvalidInputError(f"{flag(name)}: expected a number in 0..1, got "
                                    f"{getattr(cfg, name)}")
