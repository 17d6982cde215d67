"""`edgepack.toml` -> a validated Recipe. Every error names the key path and what was expected.

    [model]          source (MODEL: folder, .gguf or demo name) plus `edgepack convert`'s options
    [[quantize]]     one table per scheme: scheme = "int8-weight" | "int4" | "gguf" | ... plus its parameters
    [targets.NAME]   one table per target (ort, ort-mobile, coreml, qnn) with that target's options
                     (paths relative to the recipe; text fields left unset take [evaluation]/[calibration] text)

Option keys are the config fields of the stage (edgepack.options): a recipe takes what the command line takes,
checked the same way; `force` is command-line only.
    devices          device IDs from the device database (`edgepack devices`) to project onto, or
                     [devices.NAME] tables with `on` = "ssh://..." | "adb:SERIAL" to measure there
                     (NAME a database ID is also projected; `like` = ID names the one to project beside it)
    [budgets.ID]     per-device budgets (docs/budgets.md keys)
    [evaluation]     text, tokens, and the quality gate: max_kl, min_top1, max_ppl_ratio, min_cosine
    [calibration]    text, samples
    [profile]        prompt_len, gen_len, runs, warmup, threads
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from edgepack.errors import BadInputError, UsageError
from edgepack.options import check_type as _check_type
from edgepack.options import construct, recipe_value, recipe_values, specs

PROFILE_KEYS = {"prompt_len": (int, list), "gen_len": int, "runs": int, "warmup": int, "threads": int}
# Target tables not set here take the recipe's [evaluation] and [calibration] texts (field -> (table, key)).
SHARED_TEXTS = {"eval_text": ("evaluation", "text"), "calibration_text": ("calibration", "text")}


# [evaluation] and [calibration] keys -> the `edgepack quantize` option each stands for (class, field).
EVALUATION_KEYS = {"text": ("QualityOptions", "eval_text"), "tokens": ("QualityOptions", "eval_tokens"),
                   "max_kl": ("QualityOptions", "max_kl"), "min_top1": ("QualityOptions", "min_top1"),
                   "max_ppl_ratio": ("QualityOptions", "max_ppl_ratio"), "min_cosine": ("QualityOptions", "min_cosine")}
CALIBRATION_KEYS = {"text": ("QualityOptions", "calibration_text"), "samples": ("SchemeOptions", "calibration_samples")}


TOP_KEYS = {"model": dict, "quantize": list, "targets": dict, "devices": (list, dict), "budgets": dict,
            "evaluation": dict, "calibration": dict, "profile": dict}


@dataclass
class Recipe:
    path: Path
    model: dict
    quantize: list[dict] = field(default_factory=list)
    targets: dict[str, dict] = field(default_factory=dict)
    devices: list[str] = field(default_factory=list)  # database IDs projected onto
    budgets: dict[str, dict] = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    profile: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)
    # device name -> {"on": ssh:// or adb: address measured on, "like": the database ID projected beside it, or None}
    measured: dict[str, dict] = field(default_factory=dict)

    def resolve(self, value: str | None) -> Path | None:
        """Paths in a recipe are relative to the recipe file."""
        if value is None:
            return None
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.path.parent / path)

    def convert_options(self) -> dict:
        """Keyword arguments of the ConvertConfig the [model] table asks for."""
        return convert_values(self.model)

    def target_options(self, module, name: str) -> dict:
        """Keyword arguments of target `name`'s config: its table, paths resolved, and the recipe's [evaluation] and
        [calibration] texts for the text fields the table leaves unset."""
        values = target_values(module, name, self.targets.get(name, {}), self.path)
        config_cls = target_config_class(module)
        fields = {f.name for f in dataclasses.fields(config_cls)} if config_cls is not None else set()
        for key, (table, text_key) in SHARED_TEXTS.items():
            text = getattr(self, table).get(text_key)
            if key in fields and key not in values and text is not None:
                values[key] = self.resolve(text)
        return values


def _check_table(where: str, table: dict, keys: dict) -> None:
    for key, value in table.items():
        if key not in keys:
            raise UsageError(f"recipe key {where}.{key}: unknown key; expected one of {', '.join(sorted(keys))}")
        _check_type(f"{where}.{key}", value, keys[key])


def _check_against_command(where: str, table: dict, command) -> None:
    """Hold recipe values to the ranges of the command-line options of the same name (the [profile] table)."""
    import click

    params = {param.name: param for param in command.params}
    for key, value in table.items():
        param = params.get(key)
        if param is None or not isinstance(param.type, (click.IntRange, click.FloatRange)) or isinstance(value, bool):
            continue
        for item in value if isinstance(value, list) else [value]:
            try:
                param.type.convert(item, param, None)
            except click.BadParameter as exc:
                raise UsageError(f"recipe key {where}.{key}: {exc.message} (as {param.opts[-1]})") from None


def _check_text_file(where: str, path: Path) -> None:
    # Checked now, not when a stage first reads it: after a long convert, or never when no stage does.
    if not path.is_file():
        raise BadInputError(f"recipe key {where}: {path} is {'a folder' if path.is_dir() else 'missing'}; expected a UTF-8 text file")


def target_config_class(module):
    """The target module's config dataclass (the one whose name ends in `Config`)."""
    for value in vars(module).values():
        if isinstance(value, type) and dataclasses.is_dataclass(value) and value.__name__.endswith("Config") \
                and value.__module__ == module.__name__:
            return value
    return None


def _resolver(path: Path):
    def resolve(value: str) -> Path:
        resolved = Path(value).expanduser()
        return resolved if resolved.is_absolute() else path.parent / resolved

    return resolve


def shared_values(where: str, table: dict, keys: dict, resolve_path=None) -> dict:
    """An [evaluation] or [calibration] table, each key checked as the quantize option it stands for."""
    from edgepack.quantize import schemes

    values = {}
    for key, value in table.items():
        if key not in keys:
            raise UsageError(f"recipe key {where}.{key}: unknown key; expected one of {', '.join(sorted(keys))}")
        cls_name, name = keys[key]
        spec = next(spec for spec in specs(getattr(schemes, cls_name)) if spec.name == name)
        values[key] = recipe_value(spec, value, f"{where}.{key}", resolve_path)
    return values


def scheme_values(table: dict, where: str, resolve_path=None) -> dict:
    """A `[[quantize]]` table's parameters (scheme excluded), checked as `edgepack quantize` checks its options."""
    from edgepack.quantize.schemes import SCHEMES, SchemeOptions, scheme_from_options

    name = table["scheme"]
    allowed = {f.name for f in dataclasses.fields(SCHEMES[name])}
    schema = {spec.name: spec for spec in specs(SchemeOptions) if spec.name in allowed}
    values = {}
    for key, value in table.items():
        if key == "scheme":
            continue
        if key not in schema:
            raise UsageError(f"recipe key {where}.{key}: unknown key; expected one of {', '.join(sorted([*schema, 'scheme']))}")
        values[key] = recipe_value(schema[key], value, f"{where}.{key}", resolve_path)
    construct(lambda **kw: scheme_from_options(name, **kw), values, where)  # the scheme's own rules (block sizes, regexes)
    return values


def convert_values(model: dict) -> dict:
    """The [model] table's options (source excluded) as ConvertConfig takes them, checked as `edgepack convert` checks them."""
    from edgepack.convert.config import ConvertConfig

    return recipe_values(ConvertConfig, model, "model", extra=("source",))


def target_values(module, name: str, table: dict, recipe_path: Path) -> dict:
    """A target table as its config takes it: checked like the command line, paths resolved against the recipe."""
    from edgepack.options import config_from_recipe

    config_cls = target_config_class(module)
    if config_cls is None:
        return dict(table)
    where = f"targets.{name}"
    values = recipe_values(config_cls, table, where, _resolver(recipe_path))
    config_from_recipe(config_cls, table, where, _resolver(recipe_path))  # cross-field rules, named by the table
    return values


def parse_recipe(data: dict, path: Path) -> Recipe:
    import importlib

    from edgepack.profiles.cli import profile as profile_command
    from edgepack.quantize.schemes import SCHEMES
    from edgepack.targets import registered_targets

    resolve = _resolver(path)
    for key, value in data.items():
        if key not in TOP_KEYS:
            raise UsageError(f"recipe key {key}: unknown key; expected one of {', '.join(TOP_KEYS)}")
        _check_type(key, value, TOP_KEYS[key])
    if "model" not in data:
        raise UsageError("recipe key model: required (a table with source = MODEL)")
    model = data["model"]
    if "source" in model:
        _check_type("model.source", model["source"], str)
    convert_values(model)
    if "source" not in model:
        raise UsageError("recipe key model.source: required (a string)")

    quantize = data.get("quantize", [])
    for index, table in enumerate(quantize):
        where = f"quantize[{index}]"
        _check_type(where, table, dict)
        if "scheme" not in table:
            raise UsageError(f"recipe key {where}.scheme: required; one of {', '.join(SCHEMES)}")
        _check_type(f"{where}.scheme", table["scheme"], str)
        if table["scheme"] not in SCHEMES:
            raise UsageError(f"recipe key {where}.scheme: unknown scheme {table['scheme']!r}; one of {', '.join(SCHEMES)}")
        scheme_values(table, where, resolve)

    targets = data.get("targets", {})
    available = registered_targets()
    for name, options in targets.items():
        where = f"targets.{name}"
        if name not in available:
            raise UsageError(f"recipe key {where}: unknown target {name!r}; one of {', '.join(sorted(available))}")
        _check_type(where, options, dict)
        try:
            module = importlib.import_module(available[name])
        except ImportError as exc:
            raise UsageError(f"recipe key {where}: target {name!r} cannot be loaded here ({exc})") from None
        for key, value in target_values(module, name, options, path).items():
            if isinstance(value, Path):
                _check_text_file(f"{where}.{key}", value)

    devices, measured, named = _devices(data.get("devices", []))
    budgets = data.get("budgets", {})
    for device, table in budgets.items():
        _check_type(f"budgets.{device}", table, dict)
    if devices or budgets or measured:
        from edgepack.profiles.devices import load_devices

        known = load_devices()
        for where, device in named + [(f"budgets.{d}", d) for d in budgets if d not in measured]:
            if device not in known:
                raise UsageError(f"recipe key {where}: unknown device {device!r}; see `edgepack devices`")
        for name, device in measured.items():
            device["like"] = device["like"] or (name if name in known else None)
            if device["like"] and device["like"] not in devices:
                devices.append(device["like"])
    if budgets:
        from edgepack.profiles.budgets import parse_budgets

        parse_budgets(budgets, where="recipe key budgets")

    evaluation, calibration, profile = data.get("evaluation", {}), data.get("calibration", {}), data.get("profile", {})
    for where, table, keys in (("evaluation", evaluation, EVALUATION_KEYS), ("calibration", calibration, CALIBRATION_KEYS)):
        text = shared_values(where, table, keys, resolve).get("text")
        if text is not None:
            _check_text_file(f"{where}.text", text)
    _check_table("profile", profile, PROFILE_KEYS)
    _check_against_command("profile", profile, profile_command)
    return Recipe(path=path, model=data["model"], quantize=quantize, targets=targets, devices=devices, budgets=budgets,
                  evaluation=evaluation, calibration=calibration, profile=profile, raw=data, measured=measured)


DEVICE_KEYS = {"on": str, "like": str}


def _devices(value) -> tuple[list[str], dict[str, dict], list[tuple[str, str]]]:
    """(database IDs to project onto, {name: {on, like}} to measure on, [(key path, database ID)] to check)."""
    if isinstance(value, list):
        for index, device in enumerate(value):
            _check_type(f"devices[{index}]", device, str)
        return list(value), {}, [(f"devices[{i}]", d) for i, d in enumerate(value)]
    projected, measured, named = [], {}, []
    for name, table in value.items():
        where = f"devices.{name}"
        _check_type(where, table, dict)
        unknown = set(table) - set(DEVICE_KEYS)
        if unknown:
            raise UsageError(f"recipe key {where}: unknown key(s) {', '.join(sorted(unknown))}; a device table takes on, like")
        for key, value_type in DEVICE_KEYS.items():
            if key in table:
                _check_type(f"{where}.{key}", table[key], value_type)
        if "on" in table:
            from edgepack.runners import parse_on

            measured[name] = {"on": parse_on(table["on"])[1], "like": table.get("like")}
        if "like" in table:
            projected.append(table["like"])
            named.append((f"{where}.like", table["like"]))
        elif "on" not in table:
            projected.append(name)
            named.append((where, name))
    return list(dict.fromkeys(projected)), measured, named


def load_recipe(path: Path | str) -> Recipe:
    path = Path(path)
    if path.is_dir():
        raise BadInputError(f"recipe {path} is a folder; pass the recipe file (e.g. {path / 'edgepack.toml'})")
    if not path.is_file():
        raise BadInputError(f"recipe not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"recipe {path} is not valid TOML: {exc}") from None
    return parse_recipe(data, path.resolve())


STARTER_RECIPE = '''\
# edgepack recipe: `edgepack build edgepack.toml -o build/release`
# Every key is optional except model.source. Paths are relative to this file.

# Devices to project onto (`edgepack devices` lists them); their budgets are the [budgets.ID] tables below.
# (Top-level keys like this one must come before the first [table] in TOML.)
devices = ["pixel-8", "iphone-15-pro", "galaxy-s24"]

[model]
source = "smollm2-135m"          # a Hugging Face folder, a .gguf file, or a demo name
# task = "auto"                  # auto | text-generation | feature-extraction

# One table per quantization scheme (edgepack quantize --help lists them and their options).
[[quantize]]
scheme = "int8-weight"

[[quantize]]
scheme = "gguf"                  # only for GGUF sources: the file's own blocks, no second quantization
# scheme = "int4"
# block_size = 32
# algorithm = "hqq"

# One table per target, with that target's options.
[targets.ort]
max_context = 2048

[targets.ort-mobile]
# max_size_ratio = 1.05          # the .ort against onnxruntime's own optimized graph of the same model

# Budgets gate the build (exit 1 when one fails); these hold for the demo model with room to spare.
[budgets.pixel-8]
max_decode_ms_per_token = 30
max_peak_memory_mb = 1500
max_energy_mj_per_token = 60

[evaluation]
tokens = 512                     # scored positions for the quality report
max_kl = 0.05                    # quality gate on every scheme
# text = "eval.txt"

[profile]
prompt_len = [128]
gen_len = 64
runs = 3
'''
