"""Energy meters: the RAPL reader against a fake powercap tree whose counter wraps; others say why not."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgepack.profiles.energy import (
    AndroidRailsMeter,
    JetsonInaMeter,
    PowermetricsMeter,
    RaplMeter,
    estimate_energy_mj,
    find_meter,
)

MAX_RANGE = 262_143_328_850  # a real package counter's max_energy_range_uj


def _domain(root: Path, name: str, label: str, energy: int, max_range: int = MAX_RANGE) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "name").write_text(label + "\n")
    (folder / "energy_uj").write_text(f"{energy}\n")
    (folder / "max_energy_range_uj").write_text(f"{max_range}\n")
    return folder


def _set(folder: Path, energy: int) -> None:
    (folder / "energy_uj").write_text(f"{energy}\n")


@pytest.fixture
def powercap(tmp_path):
    root = tmp_path / "powercap"
    package = _domain(root, "intel-rapl:0", "package-0", MAX_RANGE - 1_000_000)  # 1 J before wrapping
    core = _domain(root, "intel-rapl:0:0", "core", 5_000_000)  # inside the package: must not be added
    dram = _domain(root, "intel-rapl:0:1", "dram", 100)
    return root, package, core, dram


def test_delta_handles_one_wraparound():
    assert RaplMeter.delta_uj(10, 25, 100) == 15
    assert RaplMeter.delta_uj(90, 5, 100) == 15  # 90 -> 100 wraps to 0 -> 5
    assert RaplMeter.delta_uj(50, 50, 100) == 0


def test_rapl_counts_package_and_dram_across_a_wrap(powercap):
    root, package, core, dram = powercap
    meter = RaplMeter(root, poll_s=0)  # no thread: the test drives the polls
    assert meter.available() == (True, "ok")
    assert [d.name for d in meter.domains()] == ["intel-rapl:0", "intel-rapl:0:1"]
    meter.start()
    _set(package, 2_000_000)  # wrapped: 1 J to the top, then 2 J
    _set(core, 9_000_000)  # ignored
    _set(dram, 500_100)  # +0.5 J
    assert meter.read_j() == pytest.approx(3.5)
    _set(package, 4_000_000)  # +2 J, no wrap
    assert meter.stop() == pytest.approx(5.5)


def test_rapl_polling_thread_sees_two_wraps(powercap):
    """Two wraps between start and stop are counted because the thread polls in between."""
    root, package, _core, dram = powercap
    meter = RaplMeter(root, poll_s=0)
    meter.start()
    _set(package, 1_000_000)
    meter.poll()  # what the background thread does every poll_s
    _set(package, 0)  # wrapped again: MAX_RANGE - 1 J
    meter.poll()
    assert meter.stop() == pytest.approx((1_000_000 + 1_000_000 + MAX_RANGE - 1_000_000) / 1e6)


def test_rapl_with_a_real_thread_stops_cleanly(powercap):
    root, package, _core, _dram = powercap
    meter = RaplMeter(root, poll_s=0.01)
    meter.start()
    _set(package, 500_000)
    assert meter.stop() == pytest.approx(1.5)


def test_rapl_unavailable_without_domains(tmp_path):
    ok, reason = RaplMeter(tmp_path / "nothing").available()
    assert not ok and "no RAPL" in reason


def test_other_meters_report_unavailable_here(tmp_path):
    for meter in (PowermetricsMeter(), JetsonInaMeter(tmp_path / "no-hwmon"), AndroidRailsMeter()):
        ok, reason = meter.available()
        assert ok is False and reason


def test_find_meter_prefers_rapl_and_explains_the_rest(powercap, tmp_path):
    root, *_ = powercap
    meter, report = find_meter(root)
    assert isinstance(meter, RaplMeter)
    assert [r["meter"] for r in report] == ["rapl", "powermetrics", "jetson-ina3221", "android-rails"]
    meter, report = find_meter(tmp_path / "none")
    assert meter is None and all(not r["available"] for r in report)


def test_estimate_is_power_times_time_plus_dram_bytes():
    # 2 threads x 5 W x 0.1 s = 1 J = 1000 mJ; 1e9 bytes x 20 pJ = 20 mJ
    assert estimate_energy_mj(0.1, 1e9, 2) == pytest.approx(1020.0)


def _ina3221(root, rails: dict[str, tuple[int, int]]):
    """A Jetson hwmon tree as the ina3221 driver lays it out: inN_label, inN_input (mV), currN_input (mA)."""
    sensor = root / "hwmon3"
    sensor.mkdir(parents=True)
    (sensor / "name").write_text("ina3221\n")
    for number, (label, (mv, ma)) in enumerate(rails.items(), start=1):
        (sensor / f"in{number}_label").write_text(label + "\n")
        (sensor / f"in{number}_input").write_text(f"{mv}\n")
        (sensor / f"curr{number}_input").write_text(f"{ma}\n")
    return sensor


def test_jetson_rails_are_integrated_from_the_module_input(tmp_path):
    import time

    _ina3221(tmp_path, {"VDD_IN": (5000, 1400), "VDD_CPU_GPU_CV": (5000, 600), "VDD_SOC": (5000, 300)})
    meter = JetsonInaMeter(tmp_path, poll_s=0.01)
    assert meter.available() == (True, "ok") and meter.scope == "Jetson INA3221 VDD_IN"
    assert meter.watts() == pytest.approx(7.0)  # VDD_IN alone: the other rails are inside it
    meter.start()
    begin = time.monotonic()
    time.sleep(0.3)
    joules = meter.stop()
    assert joules == pytest.approx(7.0 * (time.monotonic() - begin), rel=0.15)


def test_jetson_rails_without_a_module_input_are_summed(tmp_path):
    _ina3221(tmp_path, {"VDD_GPU": (5000, 200), "VDD_CPU": (5000, 400)})
    assert JetsonInaMeter(tmp_path).watts() == pytest.approx(3.0)
