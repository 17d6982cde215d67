"""Recipe validation: every mistake is a usage error (exit 2) naming the key path."""

from __future__ import annotations

import pytest

from edgepack.errors import UsageError
from edgepack.recipe import STARTER_RECIPE, load_recipe


def write(tmp_path, text):
    path = tmp_path / "edgepack.toml"
    path.write_text(text)
    return path


def test_starter_recipe_is_valid(tmp_path, cli):
    path = tmp_path / "edgepack.toml"
    result = cli("init", path)
    assert result.exit_code == 0, result.stderr
    assert path.read_text() == STARTER_RECIPE
    recipe = load_recipe(path)
    assert recipe.model["source"] == "smollm2-135m"
    assert [q["scheme"] for q in recipe.quantize] == ["int8-weight", "gguf"]
    assert set(recipe.targets) == {"ort", "ort-mobile"}
    assert recipe.devices == ["pixel-8", "iphone-15-pro", "galaxy-s24"]
    assert cli("init", path).exit_code == 2  # no silent overwrite


@pytest.mark.parametrize(
    "text, fragment",
    [
        ('[model]\nsorce = "x"\n', "model.sorce: unknown key"),
        ('[model]\nopset = 17\n', "model.source: required"),
        ('[model]\nsource = 3\n', "model.source: expected a string"),
        ('[model]\nsource = "x"\n[[quantize]]\nscheme = "int3"\n', "quantize[0].scheme: unknown scheme 'int3'"),
        ('[model]\nsource = "x"\n[[quantize]]\nscheme = "int4"\nblock_size = "32"\n', "quantize[0].block_size: expected an integer"),
        ('[model]\nsource = "x"\n[targets.tpu]\n', "targets.tpu: unknown target 'tpu'"),
        ('[model]\nsource = "x"\n[targets.ort]\nmax_context = "big"\n', "targets.ort.max_context: expected an integer"),
        ('devices = ["pixel-99"]\n[model]\nsource = "x"\n', "devices[0]: unknown device 'pixel-99'"),
        ('[model]\nsource = "x"\n[budgets.pixel-8]\nmax_speed = 3\n', "max_speed"),
        ('[model]\nsource = "x"\n[evaluation]\nmax_kl = "low"\n', "evaluation.max_kl: expected a number"),
        ('[model]\nsource = "x"\nflavour = 1\n', "flavour: unknown key"),
        ('[model\nsource = "x"\n', "not valid TOML"),
        ('[devices.box]\nhost = "pi"\n[model]\nsource = "x"\n', "devices.box: unknown key(s) host"),
        ('[devices.box]\non = "ftp://pi"\n[model]\nsource = "x"\n', "ssh://[user@]host[:port] or adb:SERIAL"),
        ('[devices.box]\non = 3\n[model]\nsource = "x"\n', "devices.box.on: expected a string"),
        ('[devices.box]\non = "ssh://pi"\nlike = "pi-9"\n[model]\nsource = "x"\n', "devices.box.like: unknown device 'pi-9'"),
        ('[devices.pixel-99]\n[model]\nsource = "x"\n', "devices.pixel-99: unknown device 'pixel-99'"),
        ('[devices.box]\non = "ssh://pi"\n[model]\nsource = "x"\n[budgets.boxx]\nmax_kl = 1\n', "budgets.boxx: unknown device 'boxx'"),
    ],
)
def test_bad_recipes_name_the_key(tmp_path, text, fragment):
    with pytest.raises(UsageError, match=None) as info:
        load_recipe(write(tmp_path, text))
    assert fragment in str(info.value)


def test_paths_resolve_relative_to_the_recipe(tmp_path):
    (tmp_path / "eval.txt").write_text("Some text to score.\n")
    recipe = load_recipe(write(tmp_path, '[model]\nsource = "x"\n[evaluation]\ntext = "eval.txt"\n'))
    assert recipe.resolve(recipe.evaluation["text"]) == tmp_path / "eval.txt"


def test_example_recipe_is_valid_and_covers_every_kind_of_target():
    # The README's demo builds examples/smollm2.toml; a typo there would only show in a 10-minute build.
    from pathlib import Path

    recipe = load_recipe(Path(__file__).parents[1] / "examples" / "smollm2.toml")
    assert recipe.model["source"] == "smollm2-135m"
    assert set(recipe.targets) == {"ort", "ort-mobile", "coreml", "qnn"}
    assert {table["scheme"] for table in recipe.quantize} == {"int8-weight", "gguf"}
    assert len(recipe.devices) == 4 and set(recipe.budgets) <= set(recipe.devices)


def test_executorch_example_recipe_is_valid():
    from pathlib import Path

    recipe = load_recipe(Path(__file__).parents[1] / "examples" / "smollm2-executorch.toml")
    assert set(recipe.targets) == {"ort", "executorch"} and recipe.targets["executorch"]["backend"] == "xnnpack"


def test_devices_measured_on_and_projected_beside(tmp_path):
    recipe = load_recipe(write(tmp_path, '[devices.raspberry-pi-5]\non = "ssh://pi@pi5.local"\n\n[devices.box]\non = "adb:R5CX"\n'
                                         'like = "galaxy-s24"\n\n[devices.pixel-8]\n\n[model]\nsource = "x"\n\n[budgets.box]\nmax_kl = 0.1\n'))
    assert recipe.measured == {"raspberry-pi-5": {"on": "ssh://pi@pi5.local", "like": "raspberry-pi-5"},
                               "box": {"on": "adb:R5CX", "like": "galaxy-s24"}}
    assert set(recipe.devices) == {"galaxy-s24", "pixel-8", "raspberry-pi-5"}
