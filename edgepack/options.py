"""Options declared once: config dataclass fields carry their help, type, range and command-line name.

A config field declared with `option(...)` yields
  * its click option (`click_options(Config)`): name, type, range or choices, default, help;
  * its recipe key (`recipe_values(Config, table, where, resolve_path)`): the field name, the same type and
    range/choice check as the command line (the click type itself converts the value), paths relative to
    the recipe, and one-line errors naming the key path;
  * its row in the option reference (`option_rows(Config)`).
Cross-field rules live in the config's `__post_init__` (raising UsageError): they hold for the command
line, the recipe and the Python API alike.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import MISSING
from pathlib import Path

import click

from edgepack.errors import UsageError

METADATA_KEY = "edgepack.option"
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "an array", dict: "a table"}


class FiniteFloatRange(click.FloatRange):
    """A click.FloatRange that also refuses nan and inf.

    click's range check compares with < and >, which nan passes whatever the bounds: `--max-kl nan`
    would otherwise reach a gate that every value fails (or none), and `--temperature nan` the sampler.
    """

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


@dataclasses.dataclass(frozen=True)
class Option:
    """What a config field declares about itself beyond its Python type and default."""

    help: str = ""
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    min_open: bool = False
    cli: str | None = None  # the option as typed: "--no-verify" (a flag that sets the field False), "--symmetric/--asymmetric"
    metavar: str | None = None
    unit: str | None = None
    show_default: bool | None = None  # None: shown when the default is a value (not None, not a flag)
    in_cli: bool = True
    in_recipe: bool = True
    note: str = ""  # why the field is not on both the command line and in the recipe

    @property
    def negated(self) -> bool:
        return bool(self.cli) and self.cli.startswith("--no-") and "/" not in self.cli


def option(default=MISSING, *, default_factory=MISSING, **metadata) -> dataclasses.Field:
    """A dataclass field with option metadata (see `Option`)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={METADATA_KEY: Option(**metadata)})


@dataclasses.dataclass(frozen=True)
class Spec:
    """One option of a config class, resolved: field name, base type, optional?, default, metadata."""

    name: str
    base: type  # int, float, str, bool, Path or tuple (of str)
    optional: bool
    default: object
    option: Option

    @property
    def flag(self) -> str:
        """The command-line option as typed (first spelling)."""
        return (self.option.cli or "--" + self.name.replace("_", "-")).split("/")[0]

    def click_type(self):
        opt = self.option
        if opt.choices is not None:
            return click.Choice(list(opt.choices))
        if self.base is Path:
            return click.Path(path_type=Path)
        if self.base is int:
            return click.IntRange(min=opt.min, max=opt.max) if (opt.min, opt.max) != (None, None) else click.INT
        if self.base is float:
            if (opt.min, opt.max) != (None, None):
                return FiniteFloatRange(min=opt.min, max=opt.max, min_open=opt.min_open)
            return click.FLOAT
        return click.STRING

    def click_option(self):
        opt = self.option
        kwargs = {"help": opt.help}
        if opt.metavar:
            kwargs["metavar"] = opt.metavar
        if self.base is bool and "/" not in (opt.cli or ""):
            if opt.negated:
                return click.option(opt.cli, self.name, is_flag=True, flag_value=False, default=True, **kwargs)
            return click.option(self.flag, self.name, is_flag=True, default=bool(self.default), **kwargs)
        if self.base is bool:  # --on/--off, default None: unset unless given
            return click.option(opt.cli, self.name, default=self.default, **kwargs)
        if self.base is tuple:
            return click.option(self.flag, self.name, multiple=True, **kwargs)
        show = opt.show_default if opt.show_default is not None else self.default is not None
        return click.option(self.flag, self.name, type=self.click_type(), default=self.default, show_default=show, **kwargs)

    def type_name(self) -> str:
        if self.option.choices is not None:
            return " | ".join(map(str, self.option.choices))
        name = {int: "integer", float: "number", str: "text", bool: "flag", Path: "path", tuple: "list of text"}[self.base]
        bounds = []
        if self.option.min is not None:
            bounds.append(f"{'>' if self.option.min_open else '>='} {self.option.min:g}")
        if self.option.max is not None:
            bounds.append(f"<= {self.option.max:g}")
        return name + (f" ({', '.join(bounds)})" if bounds else "")


def _base_type(annotation) -> tuple[type, bool]:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        base, _ = _base_type(rest[0])
        return base, len(rest) < len(args)
    if annotation is tuple or typing.get_origin(annotation) is tuple:
        return tuple, False
    return annotation, False


def specs(cls) -> list[Spec]:
    """Every option of a config class, in declaration order."""
    hints = typing.get_type_hints(cls)
    result = []
    for f in dataclasses.fields(cls):
        opt = f.metadata.get(METADATA_KEY)
        if opt is None:
            continue
        base, optional = _base_type(hints[f.name])
        default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING else None)
        result.append(Spec(f.name, base, optional, default, opt))
    return result


# ---------------------------------------------------------------------------------------------- command line


def click_options(cls, *, exclude: tuple[str, ...] = ()):
    """Decorator adding the command-line options of `cls` (declaration order) to a click command."""
    chosen = [spec for spec in specs(cls) if spec.option.in_cli and spec.name not in exclude]

    def decorate(function):
        for spec in reversed(chosen):
            function = spec.click_option()(function)
        return function

    return decorate


def cli_values(cls, kwargs: dict) -> dict:
    """The config fields among a command's keyword arguments, as the config takes them (lists as tuples)."""
    values = {}
    for spec in specs(cls):
        if spec.option.in_cli and spec.name in kwargs:
            value = kwargs[spec.name]
            values[spec.name] = tuple(value) if spec.base is tuple else value
    return values


def config_from_cli(cls, kwargs: dict):
    """The config from a command's keyword arguments (its cross-field rules run here)."""
    return cls(**cli_values(cls, kwargs))


# ---------------------------------------------------------------------------------------------- recipe


def check_type(where: str, value, expected) -> None:
    """Recipe values: the TOML type a key takes, and no nan/inf."""
    expected = expected if isinstance(expected, tuple) else (expected,)
    ok = any(
        (isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool))) if t is float
        else (isinstance(value, t) and not (t is int and isinstance(value, bool)))
        for t in expected
    )
    if not ok:
        names = " or ".join(_TYPE_NAMES[t] for t in expected)
        raise UsageError(f"recipe key {where}: expected {names}, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not math.isfinite(value):  # TOML's nan and inf: no gate or option means them
        raise UsageError(f"recipe key {where}: expected a finite number, got {value}")


def recipe_schema(cls) -> dict[str, Spec]:
    """Recipe key -> option, for the keys a recipe table of this config takes."""
    return {spec.name: spec for spec in specs(cls) if spec.option.in_recipe}


def _toml_type(spec: Spec):
    return {Path: str, tuple: list}.get(spec.base, spec.base)


def recipe_value(spec: Spec, value, where: str, resolve_path=None):
    """One recipe value checked as the command line checks it, converted to what the config takes."""
    check_type(where, value, _toml_type(spec))
    if spec.base is tuple:
        for index, item in enumerate(value):
            check_type(f"{where}[{index}]", item, str)
        return tuple(value)
    if spec.base is Path:
        return resolve_path(value) if resolve_path is not None else Path(value)
    if spec.base is bool:
        return value
    param = click.Option([spec.flag], type=spec.click_type())
    try:
        return param.type.convert(value, param, None)
    except click.BadParameter as exc:
        raise UsageError(f"recipe key {where}: {exc.message}" + (f" (as {spec.flag})" if spec.option.in_cli else "")) from None


def recipe_values(cls, table: dict, where: str, resolve_path=None, *, extra: tuple[str, ...] = ()) -> dict:
    """A recipe table checked key by key against `cls`: field name -> value as the config takes it.

    Keys in `extra` are allowed and left out (e.g. a scheme table's `scheme`).
    """
    schema = recipe_schema(cls)
    values = {}
    for key, value in table.items():
        if key in extra:
            continue
        if key not in schema:
            cli_only = next((spec for spec in specs(cls) if spec.name == key), None)
            if cli_only is not None:
                raise UsageError(f"recipe key {where}.{key}: command line only ({cli_only.option.note})")
            raise UsageError(f"recipe key {where}.{key}: unknown key; expected one of {', '.join(sorted([*schema, *extra]))}")
        values[key] = recipe_value(schema[key], value, f"{where}.{key}", resolve_path)
    return values


def config_from_recipe(cls, table: dict, where: str, resolve_path=None, *, extra: tuple[str, ...] = ()):
    """The config from a recipe table; a cross-field rule it breaks is reported against the table's key path."""
    return construct(cls, recipe_values(cls, table, where, resolve_path, extra=extra), where)


def construct(make, values: dict, where: str):
    """`make(**values)`, its UsageError reported as a recipe error: against the key that breaks a rule on its
    own, or against the table when only the combination does."""
    try:
        return make(**values)
    except UsageError as exc:
        culprit = next((key for key in values if _refused(make, {key: values[key]})), None)
        raise UsageError(f"recipe key {where}{'.' + culprit if culprit else ''}: {exc.message}") from None


def _refused(make, values: dict) -> bool:
    try:
        make(**values)
    except UsageError:
        return True
    return False


# ---------------------------------------------------------------------------------------------- docs


def option_rows(cls) -> list[dict]:
    """The option reference of a config: one row per field (command-line option, recipe key, type, default, help)."""
    rows = []
    for spec in specs(cls):
        opt = spec.option
        default = spec.default
        if spec.base is bool and opt.negated:
            default = "on"
        rows.append({
            "option": (opt.cli or spec.flag) if opt.in_cli else None,
            "key": spec.name if opt.in_recipe else None,
            "type": spec.type_name(),
            "default": None if default in (None, ()) else default,
            "unit": opt.unit,
            "help": opt.help,
            "note": opt.note,
        })
    return rows


def options_markdown(cls) -> str:
    """The option reference of a config as a Markdown table (command-line option, recipe key, type, default, help)."""
    lines = ["| option | recipe key | type | default | description |", "|---|---|---|---|---|"]
    for row in option_rows(cls):
        cells = [f"`{row['option']}`" if row["option"] else "(recipe only)", f"`{row['key']}`" if row["key"] else "(command line only)",
                 row["type"] + (f", {row['unit']}" if row["unit"] else ""), "" if row["default"] is None else f"`{row['default']}`",
                 row["help"] + (f" ({row['note']})" if row["note"] else "")]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"

