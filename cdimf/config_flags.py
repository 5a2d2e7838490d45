"""Command-line flags generated from pydantic config models, one flag per field, overriding a TOML file.

A field `a.b_c` becomes `--a-b-c` (nested tables listed in `flatten` drop their prefix, e.g.
`tls.ca_file` is `--ca-file` and `run.rounds` is `--rounds`). Flags take precedence over the
TOML file and over CDIMF_* environment variables: they are applied as the highest-priority
overrides through `cdimf.common.config.load_config`, so validation and error messages are the same.
"""

import argparse
import json
import os
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel

from cdimf.common.config import ENV_PREFIX, ConfigError, load_config

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


def add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel], flatten: frozenset[str] = frozenset(),
                    path: tuple[str, ...] = (), flag_prefix: str = "") -> dict[str, tuple[tuple[str, ...], str]]:
    """Add one flag per (nested) field of `model`; returns {argparse dest: (field path, flag)}."""
    fields: dict[str, tuple[tuple[str, ...], str]] = {}
    for name, info in model.model_fields.items():
        if name in SKIPPED_FIELDS:
            continue
        annotation, _ = _plain(info.annotation)
        field_path = (*path, name)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            prefix = flag_prefix if name in flatten else f"{flag_prefix}{name.replace('_', '-')}-"
            fields.update(add_model_flags(parser, annotation, flatten, field_path, prefix))
            continue
        if typing.get_origin(annotation) is list:
            continue  # tables of records (e.g. simulate's domains) are TOML-only
        flag = f"--{flag_prefix}{name.replace('_', '-')}"
        dest = "field__" + "__".join(field_path)
        help_text = (info.description or name).replace("%", "%%")
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


def _variable(field_path: tuple[str, ...]) -> str:
    return ENV_PREFIX + "__".join(part.upper() for part in field_path)


def flag_overrides(args: argparse.Namespace, fields: dict[str, tuple[tuple[str, ...], str]]) -> dict[str, str]:
    """CDIMF_* variables (JSON values) for the flags that were given."""
    environ: dict[str, str] = {}
    for dest, (field_path, _) in fields.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if isinstance(value, list):
            value = dict(value)
        elif isinstance(value, Path):
            value = str(value)
        environ[_variable(field_path)] = json.dumps(value)
    return environ


def load_with_flags(model: type[Model], config_file: str | Path | None, args: argparse.Namespace,
                    fields: dict[str, tuple[tuple[str, ...], str]]) -> Model:
    """The model from the TOML file, CDIMF_* variables, then the given flags (highest priority)."""
    overrides = flag_overrides(args, fields)
    flags_by_variable = {_variable(field_path): flag for field_path, flag in fields.values()}
    try:
        return load_config(model, config_file, environ={**os.environ, **overrides})  # type: ignore[return-value]
    except ConfigError as error:
        message = str(error)
        # name the flag rather than the variable it was passed through
        for variable in overrides:
            message = message.replace(f"environment variable {variable}", f"option {flags_by_variable[variable]}")
        raise ConfigError(message) from error
