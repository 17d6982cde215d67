"""The device database: one TOML file per device, every figure with its source.

Stdlib only (tomllib): `edgepack devices` must start in a fraction of a second.

A *figure* is an inline table `{ value = ..., source = "...", verified = true|false, basis = "..." }`:
`verified = true` means the value is printed in the cited vendor document (or was measured by
`edgepack devices calibrate`); `verified = false` means it is an estimate and `basis` says how it
was derived. Units are in the key names (`bandwidth_gb_s`, `idle_w`, `ram_mb`, ...).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack.errors import BadInputError, UsageError

BUILTIN_DIR = Path(__file__).parent / "devices"
DEVICE_SCHEMA_VERSION = 1
# Tables whose numbers must all be figures; `coreml` holds strings only.
# Accelerators a device may have, each with a figure table of its name (the CPU's figures are the tables before them).
ACCELERATOR_UNITS = ("ane", "gpu", "htp")
FIGURE_TABLES = ("memory", "compute", "power", "efficiency", "runtime", "qnn", "calibration", *ACCELERATOR_UNITS)
# Keys of the compute-unit tables [ane], [gpu], [htp] (the CPU's figures are in the tables above).
UNIT_KEYS = ("decode_bandwidth_fp16", "decode_bandwidth_int8", "decode_bandwidth_int4", "peak_gops", "prefill_compute",
             "call_overhead_ms", "power_w", "overhead_mb")


@dataclass(frozen=True)
class Figure:
    value: Any  # a number, or a list of numbers (calibration curves)
    source: str
    verified: bool
    basis: str = ""

    def to_json(self) -> dict:
        out = {"value": self.value, "source": self.source, "verified": self.verified}
        if self.basis:
            out["basis"] = self.basis
        return out


@dataclass
class Device:
    id: str
    name: str
    device_class: str
    soc: str
    path: Path
    tables: dict[str, dict[str, Figure]] = field(default_factory=dict)
    coreml: dict[str, Any] = field(default_factory=dict)
    notes: str = ""

    def figure(self, table: str, key: str) -> Figure | None:
        return self.tables.get(table, {}).get(key)

    def value(self, table: str, key: str, default=None):
        fig = self.figure(table, key)
        return default if fig is None else fig.value

    def has_unit(self, unit: str) -> bool:
        """Whether the device has figures for this compute unit (every device has a CPU)."""
        return unit == "cpu" or bool(self.tables.get(unit))

    def to_json(self) -> dict:
        out = {"id": self.id, "name": self.name, "class": self.device_class, "soc": self.soc, "file": str(self.path)}
        for table, figures in self.tables.items():
            out[table] = {key: fig.to_json() for key, fig in figures.items()}
        if self.coreml:
            out["coreml"] = dict(self.coreml)
        if self.notes:
            out["notes"] = self.notes
        return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_figure(where: str, raw) -> Figure:
    """A figure table, or a one-line error naming where it is and what is missing."""
    if not isinstance(raw, dict):
        raise BadInputError(f"{where}: expected a figure table {{ value, source, verified }}, got {raw!r}")
    value = raw.get("value")
    if not (_is_number(value) or (isinstance(value, list) and value and all(_is_number(v) for v in value))):
        raise BadInputError(f"{where}.value must be a number (or a list of numbers), got {value!r}")
    source = raw.get("source")
    if not isinstance(source, str) or not source.strip():
        raise BadInputError(f"{where}.source is missing: every figure needs a URL or document")
    verified = raw.get("verified")
    if not isinstance(verified, bool):
        raise BadInputError(f"{where}.verified must be true or false")
    basis = raw.get("basis", "")
    if not verified and not (isinstance(basis, str) and basis.strip()):
        raise BadInputError(f"{where}: an unverified figure needs a `basis` saying how it was estimated")
    unknown = set(raw) - {"value", "source", "verified", "basis"}
    if unknown:
        raise BadInputError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    return Figure(value, source.strip(), verified, basis.strip() if isinstance(basis, str) else "")


def parse_device(data: dict, path: Path) -> Device:
    where = path.name
    for key in ("id", "name"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise BadInputError(f"{where}: `{key}` (a string) is required")
    tables: dict[str, dict[str, Figure]] = {}
    for table in FIGURE_TABLES:
        raw = data.get(table)
        if raw is None:
            continue
        if not isinstance(raw, dict):
            raise BadInputError(f"{where}: [{table}] must be a table")
        tables[table] = {key: parse_figure(f"{where}: {table}.{key}", value) for key, value in raw.items()}
        if table in ACCELERATOR_UNITS:
            unknown_keys = set(raw) - set(UNIT_KEYS)
            if unknown_keys:
                raise BadInputError(f"{where}: unknown [{table}] key(s) {', '.join(sorted(unknown_keys))}; known: {', '.join(UNIT_KEYS)}")
    known = {"schema_version", "id", "name", "class", "soc", "notes", "coreml", *FIGURE_TABLES}
    unknown = set(data) - known
    if unknown:
        raise BadInputError(f"{where}: unknown top-level key(s) {', '.join(sorted(unknown))}")
    for table in ("memory",):
        if "bandwidth_gb_s" not in tables.get(table, {}):
            raise BadInputError(f"{where}: memory.bandwidth_gb_s is required (projection divides by it)")
    return Device(
        id=data["id"], name=data["name"], device_class=str(data.get("class", "")), soc=str(data.get("soc", "")),
        path=path, tables=tables, coreml=dict(data.get("coreml") or {}), notes=str(data.get("notes", "")),
    )


def load_device_file(path: Path) -> Device:
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"cannot read device file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise BadInputError(f"{path} is not valid TOML: {exc}") from exc
    return parse_device(data, Path(path))


def load_devices(devices_dirs: list[Path] | tuple = ()) -> dict[str, Device]:
    """Built-in devices, then each --devices-dir in order; a later file with the same id replaces an earlier one."""
    devices: dict[str, Device] = {}
    for folder in (BUILTIN_DIR, *[Path(d) for d in devices_dirs]):
        if not folder.is_dir():
            raise UsageError(f"--devices-dir {folder} is not a folder")
        for path in sorted(folder.glob("*.toml")):
            device = load_device_file(path)
            devices[device.id] = device
    return devices


def get_device(device_id: str, devices: dict[str, Device]) -> Device:
    if device_id not in devices:
        raise UsageError(f"unknown device {device_id!r}; known: {', '.join(sorted(devices))} (see `edgepack devices`)")
    return devices[device_id]


def iter_numbers(data, path: str = ""):
    """(dotted path, number) for every number in a parsed TOML document; the test that every figure is sourced uses it."""
    if isinstance(data, dict):
        for key, value in data.items():
            yield from iter_numbers(value, f"{path}.{key}" if path else key)
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from iter_numbers(value, f"{path}[{i}]")
    elif _is_number(data):
        yield path, data
