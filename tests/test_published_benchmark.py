"""benchmarks/published.py: the published measurements are sourced, the device database holds what the fit says,
and the projection meets its error target on the measurements it was not fitted to."""

from __future__ import annotations

from edgepack.profiles.devices import load_devices
from tests.benchmark_scripts import load_benchmark


def _published():
    return load_benchmark("published")


def test_every_measurement_is_sourced_and_costable():
    published = _published()
    data = published.load_published()
    measurements = data["measurement"]
    assert len(measurements) >= 10
    devices = load_devices()
    for m in measurements:
        assert m["source"].startswith("https://") and m["quote"].strip(), m["id"]
        assert m["device"] in devices and m["role"] in ("fit", "held-out"), m["id"]
        assert (published.CONFIGS / f"{m['config']}.json").is_file(), m["id"]
        assert m["decode_tokens_per_s"] > 0
    held_out = [m for m in measurements if m["role"] == "held-out"]
    assert len(held_out) >= 10 and {m["unit"] for m in held_out} >= {"cpu", "gpu", "htp", "ane"}


def test_the_device_database_holds_the_fitted_figures_and_names_their_measurements():
    published = _published()
    data = published.load_published()
    devices = load_devices()
    _, fits = published.run_fits(data, devices)
    for fit in fits:
        for device_id in fit["devices"]:
            for key in fit["keys"]:
                figure = devices[device_id].figure(fit["table"], key)
                assert figure.value == fit["value"], (fit["name"], device_id, key, figure.value, fit["value"])
                assert not figure.verified and all(m in figure.source for m in fit["measurements"]), (device_id, key)
    fitted = {m for fit in fits for m in fit["measurements"]}
    assert fitted == {m["id"] for m in data["measurement"] if m["role"] == "fit"}


def test_held_out_measurements_meet_the_error_target():
    published = _published()
    rows = published.compare(published.load_published(), load_devices())
    held = published.errors(rows, "held-out", "decode")
    assert held["median_abs_error"] <= published.GATE_MEDIAN and held["max_factor"] <= published.GATE_MAX_FACTOR, held
    fit = published.errors(rows, "fit", "decode")
    assert fit["max_abs_error"] < 0.01, fit
