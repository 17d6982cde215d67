"""One declaration per option: for every target, quantization scheme and convert, the command-line options,
the recipe keys and the config fields are the same set (exceptions below, each with its reason), and a
recipe accepts exactly the values the command line accepts, giving the same config; a refused value is
exit 2 and one `error:` line naming the key path, from both."""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import click
import pytest

from edgepack.options import config_from_cli, recipe_schema, specs
from edgepack.recipe import load_recipe
from edgepack.targets import registered_targets

# (stage, field) -> why the field is on only one side. Anything else must be on both.
CLI_ONLY = {
    "force": "a bundle replaces its own previous output; --force is for a folder edgepack did not write",
    "devices_dirs": "coreml --devices-dir: a recipe names devices of the built-in database",
    "evaluate": "quantize --no-eval: a recipe's schemes are always evaluated, the bundle reports their quality",
}
RECIPE_ONLY = {
    ("ort", "eval_tokens"): "tuning of the verification, not a per-bundle choice",
    ("ort", "genai_tokens"): "tuning of the verification, not a per-bundle choice",
    ("ort-mobile", "atol"): "tuning of the verification, not a per-bundle choice",
    ("coreml", "decode_steps"): "tuning of the verification, not a per-bundle choice",
    ("coreml", "fp16_margin"): "tuning of the fp16 safety pass, not a per-bundle choice",
    ("executorch", "decode_steps"): "tuning of the verification, not a per-bundle choice",
    ("executorch", "greedy_tokens"): "tuning of the verification, not a per-bundle choice",
    ("executorch", "prompt_len"): "conditions of the build's timing; `edgepack profile` owns the sweep",
    ("executorch", "gen_len"): "conditions of the build's timing; `edgepack profile` owns the sweep",
    ("executorch", "runs"): "conditions of the build's timing; `edgepack profile` owns the sweep",
    ("quantize", "method"): "int8-static: minmax is the method the quality figures are measured with",
    ("quantize", "keep_io_types"): "fp16: fp32 inputs and outputs are what every runner feeds",
}
NEITHER = {
    ("convert", "greedy_tokens"): "fixed by the parity check's definition",
    ("convert", "decode_steps"): "fixed by the parity check's definition",
}

TARGETS = sorted(registered_targets())


@pytest.fixture(autouse=True)
def _targets_looked_up_once(monkeypatch):
    """The probes parse hundreds of recipes; each would scan the installed packages' entry points again."""
    import edgepack.targets

    found = registered_targets()
    monkeypatch.setattr(edgepack.targets, "registered_targets", lambda: dict(found))
SCHEMES = ["int8-dynamic", "int8-weight", "int8-static", "int4", "fp16", "gguf"]


def _target(name):
    from edgepack.recipe import target_config_class

    module = importlib.import_module(registered_targets()[name])
    return module, target_config_class(module), module.command


def _cli_params(command, skip=("out",)) -> dict[str, click.Option]:
    return {p.name: p for p in command.params if isinstance(p, click.Option) and p.name not in skip}


def _expected(stage: str, fields: set[str]) -> tuple[set[str], set[str]]:
    """(fields on the command line, recipe keys) the exceptions allow."""
    neither = {f for (s, f) in NEITHER if s == stage}
    recipe_only = {f for (s, f) in RECIPE_ONLY if s == stage}
    return fields - neither - recipe_only, fields - neither - set(CLI_ONLY)


def _declared_exceptions(cls) -> set[str]:
    return {s.name for s in specs(cls) if not (s.option.in_cli and s.option.in_recipe)}


@pytest.mark.parametrize("name", TARGETS)
def test_target_options_recipe_keys_and_fields_are_one_set(name):
    _, cls, command = _target(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    assert {s.name for s in specs(cls)} == fields, "every config field is declared with option()"
    cli_fields, recipe_keys = _expected(name, fields)
    params = _cli_params(command)
    assert set(params) == cli_fields
    assert set(recipe_schema(cls)) == recipe_keys
    assert _declared_exceptions(cls) == fields - (cli_fields & recipe_keys)
    for spec in specs(cls):  # the option as the user types it: --no-verify for verify, --max-context for max_context
        if spec.name in params:
            assert spec.flag in params[spec.name].opts + params[spec.name].secondary_opts


@pytest.mark.parametrize("scheme", SCHEMES)
def test_scheme_options_recipe_keys_and_fields_are_one_set(scheme):
    from edgepack.cli import quantize
    from edgepack.quantize.schemes import SCHEMES as CLASSES
    from edgepack.quantize.schemes import SchemeOptions

    fields = {f.name for f in dataclasses.fields(CLASSES[scheme])}
    declared = {s.name: s for s in specs(SchemeOptions)}
    assert fields <= set(declared), f"{scheme} parameters without a declaration: {fields - set(declared)}"
    cli_fields, _ = _expected("quantize", fields)
    params = _cli_params(quantize)
    assert cli_fields <= set(params)
    assert {f for f in fields if f not in params} == {f for (s, f) in RECIPE_ONLY if s == "quantize"} & fields
    # every parameter of the scheme is a recipe key of its [[quantize]] table (checked by the probes below)


def test_convert_options_recipe_keys_and_fields_are_one_set():
    from edgepack.cli import convert
    from edgepack.convert.config import ConvertConfig

    fields = {f.name for f in dataclasses.fields(ConvertConfig)}
    cli_fields, recipe_keys = _expected("convert", fields)
    assert set(_cli_params(convert)) == cli_fields
    assert set(recipe_schema(ConvertConfig)) == recipe_keys


def test_exceptions_are_declared_where_the_option_is():
    for (stage, field), _ in {**RECIPE_ONLY, **NEITHER}.items():
        if stage == "quantize":
            from edgepack.quantize.schemes import SchemeOptions as cls
        elif stage == "convert":
            from edgepack.convert.config import ConvertConfig as cls
        else:
            cls = _target(stage)[1]
        spec = next(s for s in specs(cls) if s.name == field)
        assert spec.option.note, f"{stage}.{field}: the declaration says why it is not on both sides"


# ----------------------------------------------------------------------------------------------- values


def _probes(spec, text_file: Path) -> list:
    if spec.base is bool:
        return [True, False]
    if spec.base is Path:
        return [str(text_file)]
    if spec.option.choices is not None:
        return [*spec.option.choices, "bogus", *([5] if spec.base is int else [])]
    if spec.base is int:
        return [-1, 0, 1, 2, 3, 4, 7, 8, 16, 100, 40000, "many"]
    if spec.base is float:
        return [-0.5, 0.0, 0.5, 1.0, 1.02, 2.5, "much"]
    return ["all", "none", "int8", "int4-block", "bogus"]  # free text: some fields take a closed set


def _cli_args(spec, value) -> list[str] | None:
    """The command-line arguments that ask for `value`, or None when the command line cannot say it."""
    if spec.base is bool:
        if spec.option.cli and "/" in spec.option.cli:
            on, off = spec.option.cli.split("/")
            return [on if value else off]
        if spec.option.negated:
            return [] if value else [spec.flag]
        return [spec.flag] if value else []
    return [spec.flag, str(value)]


def _toml(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else json.dumps(value)


def _cli_refusal(cli, args, tmp_path) -> tuple[int, list[str]]:
    result = cli(*args)
    return result.exit_code, result.stderr_lines


def _check_refusal(cli, recipe_text: str, tmp_path: Path, key_path: str, problems: list, label: str):
    path = tmp_path / "edgepack.toml"
    path.write_text(recipe_text)
    result = cli("build", path, "-o", tmp_path / "bundle")
    if result.exit_code != 2 or len(result.stderr_lines) != 1 or not result.stderr_lines[0].startswith(f"error: recipe key {key_path}"):
        problems.append(f"{label}: recipe refusal is exit {result.exit_code}, {result.stderr_lines}")


def _recipe_accepts(text: str, tmp_path: Path):
    from edgepack.errors import UsageError

    path = tmp_path / "edgepack.toml"
    path.write_text(text)
    try:
        return load_recipe(path)
    except UsageError:
        return None


@pytest.mark.parametrize("name", TARGETS)
def test_target_recipe_accepts_what_the_command_line_accepts(name, tmp_path, cli):
    from edgepack.errors import UsageError

    module, cls, command = _target(name)
    text_file = tmp_path / "text.txt"
    text_file.write_text("Some text.\n")
    problems = []
    for spec in specs(cls):
        if not (spec.option.in_cli and spec.option.in_recipe):
            continue
        for value in _probes(spec, text_file):
            label = f"{name}.{spec.name} = {value!r}"
            args = ["DIR", "-o", str(tmp_path / "out"), *_cli_args(spec, value)]
            try:
                ctx = command.make_context(name, args)
                cli_config = config_from_cli(cls, {k: v for k, v in ctx.params.items() if k not in ("directory", "out")})
            except (click.ClickException, UsageError):
                cli_config = None
            recipe_text = f'[model]\nsource = "x"\n[targets.{name}]\n{spec.name} = {_toml(value)}\n'
            recipe = _recipe_accepts(recipe_text, tmp_path)
            if (cli_config is None) != (recipe is None):
                problems.append(f"{label}: command line {'refuses' if cli_config is None else 'accepts'}, "
                                f"recipe {'refuses' if recipe is None else 'accepts'}")
                continue
            if cli_config is None:
                code, lines = _cli_refusal(cli, ["target", name, tmp_path / "missing", "-o", tmp_path / "out", *_cli_args(spec, value)], tmp_path)
                if code != 2 or len(lines) != 1 or not lines[0].startswith("error: "):
                    problems.append(f"{label}: command-line refusal is exit {code}, {lines}")
                _check_refusal(cli, recipe_text, tmp_path, f"targets.{name}.{spec.name}", problems, label)
            elif cls(**recipe.target_options(module, name)) != cli_config:
                problems.append(f"{label}: the recipe gives {cls(**recipe.target_options(module, name))}, the command line {cli_config}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_scheme_recipe_accepts_what_the_command_line_accepts(scheme, tmp_path, cli):
    from edgepack.cli import quantize
    from edgepack.errors import UsageError
    from edgepack.options import cli_values
    from edgepack.quantize.schemes import SCHEMES as CLASSES
    from edgepack.quantize.schemes import SchemeOptions, scheme_from_options
    from edgepack.recipe import scheme_values

    fields = {f.name for f in dataclasses.fields(CLASSES[scheme])}
    unset = {s.name: s.default for s in specs(SchemeOptions)}
    problems = []
    for spec in specs(SchemeOptions):
        if spec.name not in fields:
            continue
        values = [["layers\\.0/"], ["("], [], "x"] if spec.base is tuple else _probes(spec, tmp_path)
        for value in values:
            label = f"{scheme}.{spec.name} = {value!r}"
            recipe_text = f'[model]\nsource = "x"\n[[quantize]]\nscheme = "{scheme}"\n{spec.name} = {_toml(value)}\n'
            recipe = _recipe_accepts(recipe_text, tmp_path)
            if not spec.option.in_cli:
                if recipe is None:
                    _check_refusal(cli, recipe_text, tmp_path, f"quantize[0].{spec.name}", problems, label)
                continue
            if spec.base is tuple:
                if not isinstance(value, list):
                    assert recipe is None  # the command line cannot pass a non-list
                    continue
                args = [a for item in value for a in (spec.flag, item)]
            else:
                args = _cli_args(spec, value)
            try:
                ctx = quantize.make_context("quantize", ["DIR", "-o", "OUT", "--scheme", scheme, *args])
                options = {k: v for k, v in cli_values(SchemeOptions, ctx.params).items() if v != unset[k]}
                cli_scheme = scheme_from_options(scheme, **options)
            except (click.ClickException, UsageError):
                cli_scheme = None
            if (cli_scheme is None) != (recipe is None):
                problems.append(f"{label}: command line {'refuses' if cli_scheme is None else 'accepts'}, "
                                f"recipe {'refuses' if recipe is None else 'accepts'}")
                continue
            if cli_scheme is None:
                code, lines = _cli_refusal(cli, ["quantize", tmp_path / "missing", "-o", tmp_path / "out", "--scheme", scheme, *args], tmp_path)
                if code != 2 or len(lines) != 1 or not lines[0].startswith("error: "):
                    problems.append(f"{label}: command-line refusal is exit {code}, {lines}")
                _check_refusal(cli, recipe_text, tmp_path, f"quantize[0].{spec.name}", problems, label)
            else:
                from_recipe = scheme_from_options(scheme, **scheme_values(recipe.quantize[0], "quantize[0]"))
                if from_recipe != cli_scheme:
                    problems.append(f"{label}: the recipe gives {from_recipe}, the command line {cli_scheme}")
    assert not problems, "\n".join(problems)


def test_convert_recipe_accepts_what_the_command_line_accepts(tmp_path, cli):
    from edgepack.cli import convert
    from edgepack.convert.config import ConvertConfig
    from edgepack.errors import UsageError

    problems = []
    for spec in specs(ConvertConfig):
        if not (spec.option.in_cli and spec.option.in_recipe):
            continue
        for value in _probes(spec, tmp_path):
            label = f"model.{spec.name} = {value!r}"
            try:
                ctx = convert.make_context("convert", ["MODEL", "-o", "OUT", *_cli_args(spec, value)])
                cli_config = config_from_cli(ConvertConfig, {k: v for k, v in ctx.params.items() if k not in ("model", "out")})
            except (click.ClickException, UsageError):
                cli_config = None
            recipe_text = f'[model]\nsource = "x"\n{spec.name} = {_toml(value)}\n'
            recipe = _recipe_accepts(recipe_text, tmp_path)
            if (cli_config is None) != (recipe is None):
                problems.append(f"{label}: command line {'refuses' if cli_config is None else 'accepts'}, "
                                f"recipe {'refuses' if recipe is None else 'accepts'}")
            elif cli_config is None:
                code, lines = _cli_refusal(cli, ["convert", tmp_path / "missing", "-o", tmp_path / "out", *_cli_args(spec, value)], tmp_path)
                if code != 2 or len(lines) != 1:
                    problems.append(f"{label}: command-line refusal is exit {code}, {lines}")
                _check_refusal(cli, recipe_text, tmp_path, f"model.{spec.name}", problems, label)
            elif ConvertConfig(**recipe.convert_options()) != cli_config:
                problems.append(f"{label}: the recipe gives {ConvertConfig(**recipe.convert_options())}, the command line {cli_config}")
    assert not problems, "\n".join(problems)


def test_force_is_command_line_only(tmp_path, cli):
    for table in ("[targets.ort]", "[targets.qnn]", "[model]"):
        path = tmp_path / "edgepack.toml"
        path.write_text(f'[model]\nsource = "x"\n{table if table != "[model]" else ""}\nforce = true\n')
        result = cli("build", path, "-o", tmp_path / "bundle")
        assert result.exit_code == 2 and len(result.stderr_lines) == 1 and "force: command line only" in result.stderr_lines[0]


# ----------------------------------------------------------------------------------------------- text paths


@pytest.mark.parametrize("target, key", [("coreml", "eval_text"), ("qnn", "eval_text"), ("qnn", "calibration_text")])
def test_text_paths_are_recipe_keys_relative_to_the_recipe(tmp_path, cli, target, key):
    module, cls, _ = _target(target)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "mine.txt").write_text("Some text of my own.\n")
    recipe = load_recipe(_write(tmp_path / "edgepack.toml", f'[model]\nsource = "x"\n[targets.{target}]\n{key} = "texts/mine.txt"\n'))
    assert recipe.target_options(module, target)[key] == tmp_path / "texts" / "mine.txt"
    # a missing file is bad input (exit 3) named by its key, before any stage runs
    path = _write(tmp_path / "missing.toml", f'[model]\nsource = "x"\n[targets.{target}]\n{key} = "texts/gone.txt"\n')
    result = cli("build", path, "-o", tmp_path / "bundle")
    assert result.exit_code == 3 and len(result.stderr_lines) == 1, result.stderr
    assert result.stderr_lines[0].startswith(f"error: recipe key targets.{target}.{key}: ") and "gone.txt is missing" in result.stderr


def test_recipe_texts_reach_the_targets_that_read_text(tmp_path):
    for name in ("eval.txt", "calib.txt", "own.txt"):
        (tmp_path / name).write_text(f"{name}: some text.\n")
    recipe = load_recipe(_write(tmp_path / "edgepack.toml", '[model]\nsource = "x"\n[evaluation]\ntext = "eval.txt"\n'
                                '[calibration]\ntext = "calib.txt"\n[targets.coreml]\n[targets.qnn]\neval_text = "own.txt"\n[targets.ort]\n'))
    coreml, qnn, ort = (_target(n)[0] for n in ("coreml", "qnn", "ort"))
    assert recipe.target_options(coreml, "coreml") == {"eval_text": tmp_path / "eval.txt"}
    assert recipe.target_options(qnn, "qnn") == {"eval_text": tmp_path / "own.txt", "calibration_text": tmp_path / "calib.txt"}
    assert recipe.target_options(ort, "ort") == {}  # no text field: nothing added
    bare = load_recipe(_write(tmp_path / "bare.toml", '[model]\nsource = "x"\n[targets.coreml]\nmax_context = 64\n'))
    assert bare.target_options(coreml, "coreml") == {"max_context": 64}


def test_build_passes_the_recipe_texts_to_the_target_config(tmp_path, tiny_model_factory, monkeypatch, cli):
    """Through `edgepack build`: the config each target is built with, and its cache key following the text."""
    import edgepack.build as build_module
    from edgepack.recipe import target_config_class
    from edgepack.targets.base import TargetArtifact, write_target_json

    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))
    built = []

    def fake_build_target(module_name, source_path, out_path, options):  # the real Core ML/QNN builds take minutes
        module = importlib.import_module(module_name)
        built.append((module.TARGET, target_config_class(module)(**options)))
        out_path.mkdir(parents=True)
        write_target_json(out_path, TargetArtifact(out=out_path, target=module.TARGET))

    monkeypatch.setattr(build_module, "_build_target", fake_build_target)
    (tmp_path / "eval.txt").write_text("Evaluation text, first version.\n")
    (tmp_path / "calib.txt").write_text("Calibration text.\n")
    path = _write(tmp_path / "edgepack.toml", f'[model]\nsource = "{tiny_model_factory("llama")}"\nverify = false\n[evaluation]\ntext = "eval.txt"\n'
                                             '[calibration]\ntext = "calib.txt"\n[targets.coreml]\nmax_context = 16\n'
                                             '[targets.qnn]\nsoc_model = 57\nhtp_arch = 75\n')
    result = cli("build", path, "-o", tmp_path / "bundle", "--only", "target")
    assert result.exit_code == 0, result.stderr
    configs = dict(built)
    assert configs["coreml"].eval_text == tmp_path / "eval.txt" and configs["coreml"].max_context == 16
    assert configs["qnn"].eval_text == tmp_path / "eval.txt" and configs["qnn"].calibration_text == tmp_path / "calib.txt"
    assert configs["qnn"].soc_model == 57

    built.clear()
    assert cli("build", path, "-o", tmp_path / "bundle", "--only", "target").exit_code == 0
    assert built == []  # same texts: every target reused
    (tmp_path / "eval.txt").write_text("Evaluation text, second version.\n")
    assert cli("build", path, "-o", tmp_path / "bundle", "--only", "target").exit_code == 0
    assert sorted(name for name, _ in built) == ["coreml", "qnn"]  # the text's content is part of their cache key


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_every_option_has_help_and_a_reference_row():
    from edgepack.convert.config import ConvertConfig
    from edgepack.options import option_rows, options_markdown
    from edgepack.quantize.schemes import SchemeOptions

    for cls in [*(_target(name)[1] for name in TARGETS), SchemeOptions, ConvertConfig]:
        rows = option_rows(cls)
        assert [row["key"] or row["option"] for row in rows] and all(row["help"] for row in rows), cls.__name__
        assert len(options_markdown(cls).splitlines()) == len(dataclasses.fields(cls)) + 2


def test_evaluation_and_calibration_keys_are_the_quantize_options(tmp_path, cli):
    """[evaluation] and [calibration] stand for quantize's quality and calibration options: every one of them
    has a key (--no-eval excepted, see its declaration), and each key takes what its option takes."""
    from edgepack.cli import quantize
    from edgepack.errors import UsageError
    from edgepack.options import cli_values
    from edgepack.quantize import schemes
    from edgepack.recipe import CALIBRATION_KEYS, EVALUATION_KEYS

    mapped = {**{("evaluation", k): v for k, v in EVALUATION_KEYS.items()}, **{("calibration", k): v for k, v in CALIBRATION_KEYS.items()}}
    quality_fields = {s.name for s in specs(schemes.QualityOptions) if s.option.in_recipe}
    assert {name for cls, name in mapped.values() if cls == "QualityOptions"} == quality_fields
    text_file = tmp_path / "text.txt"
    text_file.write_text("Some text.\n")
    problems = []
    for (table, key), (cls_name, name) in mapped.items():
        cls = getattr(schemes, cls_name)
        spec = next(s for s in specs(cls) if s.name == name)
        for value in _probes(spec, text_file):
            label = f"{table}.{key} = {value!r}"
            try:
                ctx = quantize.make_context("quantize", ["DIR", "-o", "OUT", *_cli_args(spec, value)])
                cli_value = cli_values(cls, ctx.params)[name]
            except (click.ClickException, UsageError):
                cli_value = None
            recipe_text = f'[model]\nsource = "x"\n[{table}]\n{key} = {_toml(value)}\n'
            recipe = _recipe_accepts(recipe_text, tmp_path)
            if (cli_value is None) != (recipe is None):
                problems.append(f"{label}: command line {'refuses' if cli_value is None else 'accepts'}, "
                                f"recipe {'refuses' if recipe is None else 'accepts'}")
            elif cli_value is None:
                _check_refusal(cli, recipe_text, tmp_path, f"{table}.{key}", problems, label)
            elif getattr(recipe, table)[key] != (str(cli_value) if spec.base is Path else cli_value):
                problems.append(f"{label}: the recipe holds {getattr(recipe, table)[key]!r}, the command line {cli_value!r}")
    assert not problems, "\n".join(problems)
