"""Command-line flags generated from pydantic config models, one flag per field, overriding a TOML file.

A field `a.b_c` becomes `--a-b-c` (nested tables listed in `flatten` drop their prefix, e.g.
`tls.ca_file` is `--ca-file` and `run.rounds` is `--rounds`). Each given flag sets exactly its
field, over the defaults, the TOML file and CDIMF_* environment variables: flags are the last
layer of `cdimf.common.config.load_config`, so validation is the same and errors name the flag.
"""

import argparse
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel

from cdimf.common.config import Override, load_config

Model = TypeVar("Model", bound=BaseModel)
# the flag holding the secret would show it in `ps`: the secret comes from a file or CDIMF_SECRET
SKIPPED_FIELDS = frozenset({"secret"})


def _plain(annotation: Any) -> tuple[Any, bool]:
    """The annotation without `| None`, and whether None was allowed."""
    args = typing.get_args(annotation)
    if args and type(None) in args:
        rest = [arg for arg in args if arg is not type(None)]
        return (rest[0] if len(rest) == 1 else annotation), True
    return annotation, False


def _key_values(text: str) -> tuple[str, int]:
    """NAME=N for dict[str, int] fields."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=N, got {text!r}")
    try:
        return name, int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=N with a whole number N, got {text!r}") from None


_UNSET = object()


def _with_default(text: str, info: Any, default: Any = _UNSET) -> str:
    """The field's help with its default: the enclosing table's default value when it has one, else the field's own."""
    if default is _UNSET and info.is_required():
        return f"{text} (required)"
    if default is _UNSET:
        default = info.get_default(call_default_factory=True)
    if default is None or isinstance(default, BaseModel) or default == {} or default == []:
        return text
    shown = str(default).lower() if isinstance(default, bool) else str(default)
    return f"{text} (default: {shown})"


def add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel], flatten: frozenset[str] = frozenset(),
                    path: tuple[str, ...] = (), flag_prefix: str = "", defaults: BaseModel | None = None,
                    ) -> dict[str, tuple[tuple[str, ...], str]]:
    """Add one flag per (nested) field of `model`; returns {argparse dest: (field path, flag)}.

    `defaults`: the value the enclosing field defaults to (e.g. simulate's run, made by a default
    factory), whose fields the help shows as the defaults, since a flag changes only its field of it.
    """
    fields: dict[str, tuple[tuple[str, ...], str]] = {}
    for name, info in model.model_fields.items():
        if name in SKIPPED_FIELDS:
            continue
        annotation, _ = _plain(info.annotation)
        field_path = (*path, name)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            prefix = flag_prefix if name in flatten else f"{flag_prefix}{name.replace('_', '-')}-"
            nested = getattr(defaults, name) if defaults is not None else (None if info.is_required() else info.get_default(call_default_factory=True))
            fields.update(add_model_flags(parser, annotation, flatten, field_path, prefix, nested if isinstance(nested, BaseModel) else None))
            continue
        if typing.get_origin(annotation) is list:
            continue  # tables of records (e.g. simulate's domains) are TOML-only
        flag = f"--{flag_prefix}{name.replace('_', '-')}"
        dest = "field__" + "__".join(field_path)
        help_text = _with_default((info.description or name.replace("_", " ")), info,
                                  getattr(defaults, name) if defaults is not None else _UNSET).replace("%", "%%")
        origin = typing.get_origin(annotation)
        if annotation is bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif origin is dict:
            parser.add_argument(flag, dest=dest, type=_key_values, action="append", default=None, metavar="NAME=N",
                                help=f"{help_text} (repeatable)")
        elif origin is Literal:
            choices = [str(choice) for choice in typing.get_args(annotation)]
            parser.add_argument(flag, dest=dest, choices=choices, default=None, help=help_text)
        else:
            kind = {int: int, float: float, Path: Path}.get(annotation, str)
            parser.add_argument(flag, dest=dest, type=kind, default=None, metavar=name.upper(), help=help_text)
        fields[dest] = (field_path, flag)
    return fields


def flag_overrides(args: argparse.Namespace, fields: dict[str, tuple[tuple[str, ...], str]]) -> list[Override]:
    """One override per flag that was given: its field path, its value and the flag's name."""
    overrides = []
    for dest, (field_path, flag) in fields.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if isinstance(value, list):
            value = dict(value)
        overrides.append(Override(field_path, value, f"option {flag}"))
    return overrides


def load_with_flags(model: type[Model], config_file: str | Path | None, args: argparse.Namespace,
                    fields: dict[str, tuple[tuple[str, ...], str]], table: str | None = None) -> Model:
    """The model from the TOML file (or its `table`), CDIMF_* variables, then the given flags (highest priority)."""
    return load_config(model, config_file, overrides=flag_overrides(args, fields), table=table)
