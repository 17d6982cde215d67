"""Energy meters. Energy is `measured` only from a real meter; otherwise it is `estimated` and says from what.

Each meter is a small class with `available() -> (bool, reason)`, `start()`, `read_j()` (joules since
start) and `stop()`. Counters that wrap (RAPL) are polled from a background thread often enough that
at most one wrap happens between two polls.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import threading
from pathlib import Path

RAPL_ROOT = Path("/sys/class/powercap")
_TOP_DOMAIN = re.compile(r"^intel-rapl:\d+$")
_SUB_DOMAIN = re.compile(r"^intel-rapl:\d+:\d+$")


class EnergyMeter:
    name = "none"
    scope = ""

    def available(self) -> tuple[bool, str]:
        return False, "not implemented"

    def start(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def read_j(self) -> float:  # pragma: no cover - interface
        raise NotImplementedError

    def stop(self) -> float:
        return self.read_j()

    def describe(self) -> dict:
        ok, reason = self.available()
        return {"meter": self.name, "available": ok, "reason": reason, "scope": self.scope}


class PolledMeter(EnergyMeter):
    """A meter read by a background thread every `poll_s` (0: only when read): subclasses give `reset()`
    (the reading at start), `poll()` (fold what happened since the last poll in) and `joules()`."""

    poll_s = 0.25

    def _init_polling(self, poll_s: float) -> None:
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    def reset(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def poll(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def joules(self) -> float:  # pragma: no cover - interface
        raise NotImplementedError

    def start(self) -> None:
        self.reset()
        self._stop.clear()
        if self.poll_s > 0:
            self._thread = threading.Thread(target=self._run, name=f"edgepack-{self.name}", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def read_j(self) -> float:
        self.poll()
        return self.joules()

    def stop(self) -> float:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return self.read_j()


class RaplMeter(PolledMeter):
    """Linux RAPL through powercap: `energy_uj` counters that wrap at `max_energy_range_uj`.

    Counted domains: every package (`intel-rapl:N`) plus any `dram` sub-domain (DRAM energy is not
    inside the package counter); core/uncore sub-domains are inside the package and are skipped so
    nothing is counted twice. The poll interval must be shorter than the time a counter takes to wrap
    (max_energy_range_uj / power: about 60 s for 262 J at 4 W, 2.6 s at 100 W); 0.25 s is safe.
    """

    name = "rapl"

    def __init__(self, root: Path | str = RAPL_ROOT, poll_s: float = 0.25):
        self.root = Path(root)
        self._init_polling(poll_s)
        self._last: dict[Path, int] = {}
        self._total_uj = 0

    def domains(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = []
        for entry in sorted(self.root.iterdir()):
            if not (entry / "energy_uj").exists():
                continue
            if _TOP_DOMAIN.match(entry.name):
                found.append(entry)
            elif _SUB_DOMAIN.match(entry.name) and _read_text(entry / "name") == "dram":
                found.append(entry)
        return found

    @property
    def scope(self) -> str:  # type: ignore[override]
        names = [f"{d.name}({_read_text(d / 'name') or '?'})" for d in self.domains()]
        return "RAPL " + ", ".join(names) if names else "RAPL"

    def available(self) -> tuple[bool, str]:
        domains = self.domains()
        if not domains:
            return False, f"no RAPL powercap domains under {self.root}"
        for domain in domains:
            try:
                int(_read_text(domain / "energy_uj", strict=True))
            except PermissionError:
                return False, f"{domain / 'energy_uj'} is not readable (root only on this kernel)"
            except (OSError, ValueError) as exc:
                return False, f"cannot read {domain / 'energy_uj'}: {exc}"
        return True, "ok"

    @staticmethod
    def delta_uj(before: int, after: int, max_range_uj: int) -> int:
        """Energy between two readings of one counter, allowing for one wraparound."""
        if after >= before:
            return after - before
        return after + max_range_uj - before

    def poll(self) -> None:
        """Fold the counters' progress since the last poll into the total."""
        with self._lock:
            for domain in self._last:
                now = int(_read_text(domain / "energy_uj", strict=True))
                max_range = int(_read_text(domain / "max_energy_range_uj", strict=True) or 0)
                self._total_uj += self.delta_uj(self._last[domain], now, max_range)
                self._last[domain] = now

    def reset(self) -> None:
        self._last = {d: int(_read_text(d / "energy_uj", strict=True)) for d in self.domains()}
        self._total_uj = 0

    def joules(self) -> float:
        return self._total_uj / 1e6


class PowermetricsMeter(EnergyMeter):
    """macOS `powermetrics` (needs root): CPU+GPU+ANE power sampled while the workload runs."""

    name = "powermetrics"
    scope = "macOS powermetrics combined CPU/GPU/ANE power"

    def available(self) -> tuple[bool, str]:
        if platform.system() != "Darwin":
            return False, "powermetrics exists only on macOS"
        if shutil.which("powermetrics") is None:
            return False, "powermetrics not found"
        if os.geteuid() != 0:
            return False, "powermetrics needs root (sudo)"
        # Sampling powermetrics' text output is not implemented yet: say so instead of guessing.
        return False, "powermetrics sampling is not implemented in this edgepack version"


class JetsonInaMeter(PolledMeter):
    """NVIDIA Jetson INA3221 rails through hwmon: `inN_input` (mV) x `currN_input` (mA) of the `VDD_IN` channel
    (the module's input: everything on the board), or of every channel when none is labelled so.

    The sensor gives instantaneous power, not a counter: a background thread samples it every `poll_s` and
    integrates (trapezoids), so energy between two reads is the area under the sampled power.
    """

    name = "jetson-ina3221"

    def __init__(self, hwmon_root: Path | str = "/sys/class/hwmon", poll_s: float = 0.02):
        self.hwmon_root = Path(hwmon_root)
        self._init_polling(poll_s)
        self._total_j = 0.0
        self._last: tuple[float, float] | None = None  # (time, watts)

    def sensors(self) -> list[Path]:
        if not self.hwmon_root.is_dir():
            return []
        return [d for d in sorted(self.hwmon_root.iterdir()) if _read_text(d / "name").startswith("ina3221")]

    def channels(self) -> list[tuple[Path, str]]:
        """(sensor folder, channel number) of the rails counted."""
        found = []
        for sensor in self.sensors():
            for label in sorted(sensor.glob("in*_label")):
                number = label.name[2:-len("_label")]
                if (sensor / f"curr{number}_input").exists():
                    found.append((sensor, number, _read_text(label)))
        total = [(s, n) for s, n, name in found if name == "VDD_IN"]
        return total or [(s, n) for s, n, _name in found]

    @property
    def scope(self) -> str:  # type: ignore[override]
        names = [_read_text(s / f"in{n}_label") or f"in{n}" for s, n in self.channels()]
        return "Jetson INA3221 " + (", ".join(names) or "rails")

    def available(self) -> tuple[bool, str]:
        if not self.sensors():
            return False, f"no INA3221 hwmon sensor under {self.hwmon_root} (not a Jetson)"
        if not self.channels():
            return False, "INA3221 sensor without labelled voltage/current channels"
        try:
            self.watts()
        except (OSError, ValueError) as exc:
            return False, f"INA3221 channels not readable: {exc}"
        return True, "ok"

    def watts(self) -> float:
        return sum(int(_read_text(s / f"in{n}_input", strict=True)) * int(_read_text(s / f"curr{n}_input", strict=True))
                   for s, n in self.channels()) * 1e-6  # mV x mA

    def poll(self) -> None:
        import time

        now, watts = time.monotonic(), self.watts()
        with self._lock:
            if self._last is not None:
                self._total_j += (now - self._last[0]) * (watts + self._last[1]) / 2
            self._last = (now, watts)

    def reset(self) -> None:
        self._total_j, self._last = 0.0, None
        self.poll()

    def joules(self) -> float:
        return self._total_j


class AndroidRailsMeter(EnergyMeter):
    """Android power rails (ODPM, `dumpsys android.hardware.power.stats`) read through a device runner over adb."""

    name = "android-rails"
    scope = "Android ODPM power rails"

    def available(self) -> tuple[bool, str]:
        if shutil.which("adb") is None:
            return False, "no adb: Android rails need a device runner (edgepack profiles on this host only)"
        return False, "no Android device runner in this edgepack version"


def all_meters(rapl_root: Path | str = RAPL_ROOT) -> list[EnergyMeter]:
    return [RaplMeter(rapl_root), PowermetricsMeter(), JetsonInaMeter(), AndroidRailsMeter()]


def find_meter(rapl_root: Path | str = RAPL_ROOT) -> tuple[EnergyMeter | None, list[dict]]:
    """The first available meter (or None) and why each one is or is not available."""
    report = []
    chosen = None
    for meter in all_meters(rapl_root):
        info = meter.describe()
        report.append(info)
        if chosen is None and info["available"]:
            chosen = meter
    return chosen, report


# Host power model used when no meter is available. Estimates, stated as such in every output.
HOST_WATTS_PER_ACTIVE_CORE = 5.0
HOST_DRAM_PJ_PER_BYTE = 20.0
HOST_POWER_BASIS = (
    "no energy meter: host power model {watts_per_core} W per active thread x {threads} threads "
    "(estimate for server/desktop x86 cores at all-core load) x measured time, plus {pj} pJ/byte x bytes read "
    "(estimate for DDR4/DDR5 access energy)"
)


def estimate_energy_mj(seconds: float, nbytes: float, threads: int, watts_per_core: float = HOST_WATTS_PER_ACTIVE_CORE,
                       dram_pj_per_byte: float = HOST_DRAM_PJ_PER_BYTE) -> float:
    """Estimated mJ: active cores x W x s, plus DRAM bytes x pJ/byte."""
    return 1e3 * seconds * watts_per_core * threads + nbytes * dram_pj_per_byte * 1e-9


def _read_text(path: Path, strict: bool = False) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        if strict:
            raise
        return ""
