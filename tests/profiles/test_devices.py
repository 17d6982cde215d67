"""The device database: >= 12 devices, every number a sourced figure, clear errors, CLI listing."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import pytest

from edgepack.errors import BadInputError, UsageError
from edgepack.profiles.devices import BUILTIN_DIR, iter_numbers, load_device_file, load_devices

REQUIRED_IDS = {
    "iphone-15-pro", "iphone-16-pro", "macbook-air-m2", "macbook-air-m3", "macbook-air-m4", "pixel-8", "pixel-9",
    "galaxy-s24", "raspberry-pi-5", "jetson-orin-nano", "jetson-orin-nano-super", "x86-laptop",
}


def test_at_least_12_devices_with_the_required_ids():
    devices = load_devices()
    assert len(devices) >= 12
    assert REQUIRED_IDS <= set(devices)
    assert any(d.value("qnn", "soc_model") == 69 and d.value("qnn", "htp_arch") == 79 for d in devices.values()), "a Snapdragon 8 Elite phone"
    for device_id in devices:
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", device_id), device_id


@pytest.mark.parametrize("path", sorted(BUILTIN_DIR.glob("*.toml")), ids=lambda p: p.stem)
def test_every_numeric_field_has_a_source(path):
    data = tomllib.loads(path.read_text())
    assert data["id"] == path.stem, "file name and id agree"
    for where, _number in iter_numbers(data):
        if where == "schema_version":
            continue
        # Every other number is the value of a figure table: {value, source, verified[, basis]}.
        assert re.fullmatch(r"[a-z_]+\.[a-z0-9_]+\.value(\[\d+\])?", where), f"{path.name}: bare number at {where}"
        table, key = where.split(".")[:2]
        figure = data[table][key]
        assert isinstance(figure["source"], str) and figure["source"].strip(), f"{path.name}: {where} has no source"
        assert isinstance(figure["verified"], bool), f"{path.name}: {where} verified must be a bool"
        if not figure["verified"]:
            assert figure.get("basis", "").strip(), f"{path.name}: unverified {where} must say its basis"
    device = load_device_file(path)
    for needed in (("memory", "ram_mb"), ("memory", "app_memory_limit_mb"), ("memory", "bandwidth_gb_s"),
                   ("memory", "dram_pj_per_byte"), ("power", "sustained_w"), ("power", "idle_w"),
                   ("compute", "cpu_fp32_gflops"), ("efficiency", "decode_bandwidth_fp32")):
        assert device.figure(*needed) is not None, f"{path.name} lacks {needed}"
    if device.id.startswith(("iphone", "macbook")):
        assert device.coreml.get("compute_units")


def test_verified_figures_cite_something_checkable():
    for device in load_devices().values():
        for table, figures in device.tables.items():
            for key, fig in figures.items():
                if fig.verified:
                    assert "http" in fig.source or "Data Sheet" in fig.source, f"{device.id} {table}.{key}: {fig.source}"


def _write(tmp_path, text, name="mine.toml"):
    folder = tmp_path / "devs"
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(text)
    return folder


MINIMAL = """
id = "my-board"
name = "My board"
[memory]
bandwidth_gb_s = { value = 10, source = "my datasheet", verified = true }
"""


def test_devices_dir_adds_and_overrides(tmp_path):
    folder = _write(tmp_path, MINIMAL)
    devices = load_devices([folder])
    assert devices["my-board"].value("memory", "bandwidth_gb_s") == 10
    override = MINIMAL.replace('"my-board"', '"pixel-8"').replace("value = 10", "value = 99")
    folder = _write(tmp_path, override, "pixel.toml")
    assert load_devices([folder])["pixel-8"].value("memory", "bandwidth_gb_s") == 99


@pytest.mark.parametrize("bad, words", [
    (MINIMAL.replace(', source = "my datasheet"', ""), "source"),
    (MINIMAL.replace("verified = true", "verified = false"), "basis"),
    (MINIMAL.replace("value = 10", 'value = "ten"'), "value"),
    (MINIMAL.replace("bandwidth_gb_s = { value = 10", "bandwidth_gb_s = 10 #"), "figure table"),
    ("foo = 1\n" + MINIMAL, "unknown top-level"),
])
def test_bad_figures_are_one_line_errors(tmp_path, bad, words):
    folder = _write(tmp_path, bad)
    with pytest.raises(BadInputError, match=words):
        load_devices([folder])


def test_cli_lists_and_shows(cli):
    result = cli("devices")
    assert result.exit_code == 0, result.stderr
    assert all(device_id in result.stdout for device_id in REQUIRED_IDS)
    shown = cli("devices", "show", "galaxy-s24")
    assert shown.exit_code == 0
    assert "memory.bandwidth_gb_s" in shown.stdout and "qnn.soc_model" in shown.stdout and "estimate" in shown.stdout
    as_json = cli("devices", "list", "--json")
    assert as_json.exit_code == 0 and as_json.stdout.lstrip().startswith("[")


def test_cli_unknown_device_is_a_usage_error(cli):
    result = cli("devices", "show", "nokia-3310")
    assert result.exit_code == 2
    assert len(result.stderr_lines) == 1 and "nokia-3310" in result.stderr


@pytest.mark.parametrize("module", ["torch", "transformers", "onnxruntime", "onnx", "numpy", "rich"])
def test_profiles_cli_import_is_light(module):
    code = f"import edgepack.profiles.cli, sys; assert {module!r} not in sys.modules, 'imported {module}'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_devices_dir_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError):
        load_devices([tmp_path / "missing"])
