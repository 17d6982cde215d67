"""`edgepack.toml` -> a validated Recipe. Every error names the key path and what was expected.

    [model]          source (MODEL: folder, .gguf or demo name), task, opset
    [[quantize]]     one table per scheme: scheme = "int8-weight" | "int4" | "gguf" | ... plus its parameters
    [targets.NAME]   one table per target (ort, ort-mobile, coreml, qnn) with that target's options
    devices          device IDs from the device database (`edgepack devices`)
    [budgets.ID]     per-device budgets (docs/budgets.md keys)
    [evaluation]     text, tokens, and the quality gate: max_kl, min_top1, max_ppl_ratio
    [calibration]    text, samples
    [profile]        prompt_len, gen_len, runs, warmup, threads
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from edgepack.errors import BadInputError, UsageError

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "an array", dict: "a table"}

MODEL_KEYS = {"source": str, "task": str, "opset": int, "allow_pickle": bool, "trust_remote_code": bool}
EVALUATION_KEYS = {"text": str, "tokens": int, "max_kl": float, "min_top1": float, "max_ppl_ratio": float}
CALIBRATION_KEYS = {"text": str, "samples": int}
PROFILE_KEYS = {"prompt_len": (int, list), "gen_len": int, "runs": int, "warmup": int, "threads": int}
TOP_KEYS = {"model": dict, "quantize": list, "targets": dict, "devices": list, "budgets": dict,
            "evaluation": dict, "calibration": dict, "profile": dict}


@dataclass
class Recipe:
    path: Path
    model: dict
    quantize: list[dict] = field(default_factory=list)
    targets: dict[str, dict] = field(default_factory=dict)
    devices: list[str] = field(default_factory=list)
    budgets: dict[str, dict] = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    profile: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)

    def resolve(self, value: str | None) -> Path | None:
        """Paths in a recipe are relative to the recipe file."""
        if value is None:
            return None
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.path.parent / path)


def _check_type(where: str, value, expected) -> None:
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


def _check_table(where: str, table: dict, keys: dict, required: tuple = ()) -> None:
    for key, value in table.items():
        if key not in keys:
            raise UsageError(f"recipe key {where}.{key}: unknown key; expected one of {', '.join(sorted(keys))}")
        _check_type(f"{where}.{key}", value, keys[key])
    for key in required:
        if key not in table:
            raise UsageError(f"recipe key {where}.{key}: required ({_TYPE_NAMES[keys[key]]})")


def _check_ranges(where: str, table: dict, command, names: dict | None = None) -> None:
    """Hold recipe values to the ranges of the command-line options they stand for (`names`: recipe key ->
    option name, default the same), so a recipe cannot pass what the command line refuses."""
    import click

    params = {param.name: param for param in command.params}
    for key, value in table.items():
        param = params.get((names or {}).get(key, key))
        if param is None or not isinstance(param.type, (click.IntRange, click.FloatRange)) or isinstance(value, bool):
            continue
        for item in value if isinstance(value, list) else [value]:
            try:
                param.type.convert(item, param, None)
            except click.BadParameter as exc:
                raise UsageError(f"recipe key {where}.{key}: {exc.message} (as {param.opts[-1]})") from None


def _dataclass_keys(cls) -> dict:
    """Option name -> python type, from a config dataclass's annotations (strings under `from __future__`)."""
    mapping = {"int": int, "str": str, "bool": bool, "float": float}
    keys = {}
    for f in dataclasses.fields(cls):
        annotation = str(f.type).replace(" ", "")
        base = annotation.split("|")[0]
        if base.startswith("tuple"):
            keys[f.name] = list
        elif base in mapping:
            keys[f.name] = mapping[base]
    return keys


def target_config_class(module):
    """The target module's config dataclass (the one whose name ends in `Config`)."""
    for value in vars(module).values():
        if isinstance(value, type) and dataclasses.is_dataclass(value) and value.__name__.endswith("Config") \
                and value.__module__ == module.__name__:
            return value
    return None


def parse_recipe(data: dict, path: Path) -> Recipe:
    import importlib

    from edgepack.cli import quantize as quantize_command
    from edgepack.profiles.cli import profile as profile_command
    from edgepack.quantize.schemes import SCHEMES
    from edgepack.targets import registered_targets

    for key, value in data.items():
        if key not in TOP_KEYS:
            raise UsageError(f"recipe key {key}: unknown key; expected one of {', '.join(TOP_KEYS)}")
        _check_type(key, value, TOP_KEYS[key])
    if "model" not in data:
        raise UsageError("recipe key model: required (a table with source = MODEL)")
    _check_table("model", data["model"], MODEL_KEYS, required=("source",))

    quantize = data.get("quantize", [])
    for index, table in enumerate(quantize):
        where = f"quantize[{index}]"
        _check_type(where, table, dict)
        if "scheme" not in table:
            raise UsageError(f"recipe key {where}.scheme: required; one of {', '.join(SCHEMES)}")
        _check_type(f"{where}.scheme", table["scheme"], str)
        if table["scheme"] not in SCHEMES:
            raise UsageError(f"recipe key {where}.scheme: unknown scheme {table['scheme']!r}; one of {', '.join(SCHEMES)}")
        keys = {"scheme": str, **_dataclass_keys(SCHEMES[table["scheme"]])}
        _check_table(where, table, keys)
        _check_ranges(where, table, quantize_command)

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
        config_cls = target_config_class(module)
        if config_cls is not None:
            _check_table(where, options, {k: v for k, v in _dataclass_keys(config_cls).items() if k != "force"})
        _check_ranges(where, options, module.command)

    devices = data.get("devices", [])
    for index, device in enumerate(devices):
        _check_type(f"devices[{index}]", device, str)
    budgets = data.get("budgets", {})
    for device, table in budgets.items():
        _check_type(f"budgets.{device}", table, dict)
    if devices or budgets:
        from edgepack.profiles.devices import load_devices

        known = load_devices()
        for where, device in [(f"devices[{i}]", d) for i, d in enumerate(devices)] + [(f"budgets.{d}", d) for d in budgets]:
            if device not in known:
                raise UsageError(f"recipe key {where}: unknown device {device!r}; see `edgepack devices`")
    if budgets:
        from edgepack.profiles.budgets import parse_budgets

        parse_budgets(budgets, where="recipe key budgets")

    evaluation, calibration, profile = data.get("evaluation", {}), data.get("calibration", {}), data.get("profile", {})
    _check_table("evaluation", evaluation, EVALUATION_KEYS)
    _check_table("calibration", calibration, CALIBRATION_KEYS)
    _check_table("profile", profile, PROFILE_KEYS)
    _check_ranges("evaluation", evaluation, quantize_command, {"tokens": "eval_tokens"})
    _check_ranges("calibration", calibration, quantize_command, {"samples": "calibration_samples"})
    _check_ranges("profile", profile, profile_command)
    for where, table in (("evaluation", evaluation), ("calibration", calibration)):
        # Checked now, not when a stage first reads it: after a long convert, or never when no stage does.
        text = table.get("text")
        if text is not None:
            text_path = Path(text).expanduser()
            text_path = text_path if text_path.is_absolute() else path.parent / text_path
            if not text_path.is_file():
                raise BadInputError(f"recipe key {where}.text: {text_path} is {'a folder' if text_path.is_dir() else 'missing'}; "
                                    "expected a UTF-8 text file")
    return Recipe(path=path, model=data["model"], quantize=quantize, targets=targets, devices=devices, budgets=budgets,
                  evaluation=evaluation, calibration=calibration, profile=profile, raw=data)


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
