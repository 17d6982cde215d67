"""The adb runner: parsing and command construction on recorded outputs of the real tools (tests/runners/data, each
with its source), graph dimensions from real exports, and a run on a real phone when `adb devices` lists one."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from edgepack.errors import UsageError
from edgepack.runners.adb import (
    AdbRunner,
    battery_watts,
    free_dimensions,
    graph_inputs,
    identity_from_props,
    latency_ms,
    parse_devices,
    parse_getprop,
    parse_perf_test,
    parse_serial,
    perf_test_command,
)
from edgepack.runners.base import DeviceError

DATA = Path(__file__).parent / "data"


def recorded(name: str) -> str:
    return (DATA / name).read_text()


def test_perf_test_outputs_give_the_latencies_and_the_peak_memory():
    pixel = parse_perf_test(recorded("perf_test_android_pixel6_resnet18.txt"))
    assert pixel["requests"] == 100 and pixel["average_ms"] == pytest.approx(19.918)
    assert pixel["p50_s"] == pytest.approx(0.0199047) and pixel["p95_s"] == pytest.approx(0.0201534)
    assert pixel["peak_working_set_bytes"] == 109531136 and pixel["session_creation_s"] == pytest.approx(0.0508382)
    figures = latency_ms(pixel)
    assert figures["p50"] == pytest.approx(19.9047) and figures["n"] == 100 and figures["min"] == pytest.approx(19.7812)
    # onnxruntime 1.23 prints "Average inference time cost total:" and a first-inference line
    vivo = parse_perf_test(recorded("perf_test_android_vivo_x300_sme2.txt"))
    assert vivo["average_ms"] == pytest.approx(98.961997) and vivo["first_inference_ms"] == 196 and vivo["requests"] == 5
    with pytest.raises(DeviceError, match="printed no latency"):
        parse_perf_test("Error: [ONNXRuntimeError] : 3 : NO_SUCHFILE : Load model from /x.onnx failed\n")


def test_adb_devices_and_getprop():
    [(serial, entry)] = parse_devices(recorded("adb_devices_l.txt")).items()
    assert serial == "UYT5T18414003349" and entry["state"] == "device" and entry["model"] == "ALP_AL00"
    states = {s: e["state"] for s, e in parse_devices(recorded("adb_devices_l_unauthorized.txt")).items()}
    assert states == {"0A281FDD4001LR": "unauthorized", "emulator-5554": "device"}
    assert parse_devices(recorded("adb_devices_offline.txt")) == {"emulator-5554": {"state": "offline"}}
    props = parse_getprop(recorded("getprop_galaxy_s24_android14.txt"))
    identity = identity_from_props(props, ram_kb=7_600_000, cores=8)
    assert identity["soc"] == "QTI SM8650" and identity["os"].startswith("Android 14") and identity["machine"] == "arm64-v8a"
    assert "SM-S9210" in identity["model"] and identity["ram_mb"] == 7422


def test_battery_energy_only_while_discharging():
    # a charging Xiaomi Mi 8's power_supply values (uA, uV): the charger, not the battery, feeds the phone
    uevent = dict(line.split("=", 1) for line in recorded("battery_uevent_acc_mi8_charging.txt").splitlines() if "=" in line)
    watts, how = battery_watts(uevent["CURRENT_NOW"], uevent["VOLTAGE_NOW"], uevent["STATUS"])
    assert watts is None and "Charging" in how
    watts, how = battery_watts("-512000\n", "3870000\n", "Discharging\n")  # uA, uV (sign differs by vendor)
    assert watts == pytest.approx(0.512 * 3.87) and "current_now x voltage_now" in how
    assert battery_watts("800000", "4200000", "Charging")[0] is None
    assert "unplug" in battery_watts("800000", "4200000", "Full")[1]


def test_perf_test_commands_fix_the_graph_dimensions_of_a_real_export(exported_tiny_factory):
    inputs = graph_inputs(exported_tiny_factory("llama") / "model.onnx")
    prefill = free_dimensions(inputs, 1, 128, 0)
    decode = free_dimensions(inputs, 1, 1, 160)
    assert prefill == {"batch_size": 1, "sequence_length": 128, "past_sequence_length + sequence_length": 128, "past_sequence_length": 0}
    assert decode["past_sequence_length"] == 160 and decode["past_sequence_length + sequence_length"] == 161
    command = perf_test_command("/data/local/tmp/edgepack/tools/x/onnxruntime_perf_test", "/data/local/tmp/m.onnx", decode, runs=64, threads=4)
    assert command[:7] == ["/data/local/tmp/edgepack/tools/x/onnxruntime_perf_test", "-e", "cpu", "-m", "times", "-r", "64"]
    assert ["-x", "4"] == command[7:9] and "-f" in command and "past_sequence_length:160" in command and command[-1] == "/data/local/tmp/m.onnx"
    runner = AdbRunner("adb:R5CX123")
    assert runner.command("shell", "getprop") == ["adb", "-s", "R5CX123", "shell", "getprop"]


def test_addresses():
    assert parse_serial("adb:emulator-5554") == "emulator-5554"
    for bad in ("adb:", "adb:two words", "usb:123"):
        with pytest.raises(UsageError):
            parse_serial(bad)


def _attached_phone() -> str | None:
    if shutil.which("adb") is None:
        return None
    try:
        listing = subprocess.run(["adb", "devices", "-l"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return next((serial for serial, entry in parse_devices(listing).items() if entry["state"] == "device"), None)


@pytest.mark.skipif(not os.environ.get("EDGEPACK_ADB_PERF_TEST"), reason="EDGEPACK_ADB_PERF_TEST does not name onnxruntime_perf_test for Android")
@pytest.mark.skipif(_attached_phone() is None, reason="no Android device: `adb devices` lists none (or adb is not installed)")
def test_profile_on_an_attached_phone(exported_tiny_factory, tmp_path, cli):
    from tests.conftest import read_json

    serial = _attached_phone()
    out = tmp_path / "phone.json"
    result = cli("profile", exported_tiny_factory("llama"), "-o", out, "--on", f"phone=adb:{serial}", "--prompt-len", "16", "--gen-len", "8",
                 "--runs", "3")
    assert result.exit_code == 0, result.stderr
    section = read_json(out)["measured_on"]["phone"]
    assert section["device"]["system"] == "Android" and section["by_prompt_len"][0]["decode_ms_per_token"]["p50"] > 0
