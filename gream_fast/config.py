"""Stage configs are dataclasses; every CLI flag is one of their fields (`--k-core` <-> k_core).
Each run writes its resolved config beside its outputs."""
import argparse
import dataclasses
import typing


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
