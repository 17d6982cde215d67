"""Projected vs published: edgepack's device projections against speeds vendors and projects measured.

For every measurement in benchmarks/published.toml, runs the projection `edgepack estimate` makes for the
model's configuration stored the way the measured runtime stored it (target, scheme, compute unit), on
the device the measurement names, and prints projected vs published decode (and prefill) tokens/s with
their ratio. Measurements marked `role = "fit"` are those the device database's efficiencies were fitted
to; the error that counts is the one on the others (`held-out`). Writes benchmarks/results/published.json.

    python benchmarks/published.py              # the table, with the database as it is
    python benchmarks/published.py --fit        # recompute the fitted figures and print them
    python benchmarks/published.py --fit --write  # ... and write them into edgepack/profiles/devices/*.toml

The fit is arithmetic only (no device here): each [[fit]] table of published.toml names figures of some
devices and the measurements they are fitted to; one value per fit is found by bisection so that the
median projected/published ratio of its measurements is 1.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tomllib
from dataclasses import replace
from pathlib import Path

import _results

HERE = Path(__file__).parent
PUBLISHED = HERE / "published.toml"
CONFIGS = HERE / "data" / "configs"
DEVICES_DIR = HERE.parent / "edgepack" / "profiles" / "devices"
GATE_MEDIAN, GATE_MAX_FACTOR = 0.25, 2.0


def load_published(path: Path = PUBLISHED) -> dict:
    data = tomllib.loads(path.read_text())
    ids = [m["id"] for m in data["measurement"]]
    if len(ids) != len(set(ids)):
        raise SystemExit("published.toml: duplicate measurement ids")
    known = set(ids)
    for fit in data.get("fit", []):
        missing = [m for m in fit["measurements"] if m not in known]
        if missing:
            raise SystemExit(f"published.toml: fit {fit['name']!r} names unknown measurements {missing}")
    return data


def project(measurement: dict, devices: dict) -> dict:
    """Projected decode and prefill tokens/s of one measurement on `devices[measurement['device']]`."""
    from edgepack.profiles.architecture import read_architecture
    from edgepack.profiles.costs import facts_for, target_layout
    from edgepack.profiles.projection import project_device

    arch = read_architecture(CONFIGS / f"{measurement['config']}.json")
    layout = target_layout(measurement["target"], measurement["scheme"], measurement["unit"])
    # The measured runtime's own bits per weight where its format differs from edgepack's (scales included)
    for group in ("linear", "lm_head"):
        bits = measurement.get(f"{group}_bits")
        if bits is not None:
            storage = getattr(layout, group)
            layout = replace(layout, **{group: replace(storage, bits=float(bits), label=f"{bits} bits per weight as published")})
    context = measurement.get("context") or 2048
    prompt = measurement.get("prompt_tokens") or 128
    gen = measurement.get("generated_tokens") or 64
    context = max(context, prompt + gen)
    facts = facts_for(arch, layout, context)
    p = project_device(facts, devices[measurement["device"]], (prompt,), gen, context, unit=layout.unit, kind="estimated")
    entry = p["by_prompt_len"][0]
    return {"decode_tokens_per_s": entry["tokens_per_s"], "prefill_tokens_per_s": entry["prefill_tokens_per_s"],
            "decode_ms": entry["decode_ms_per_token"], "weight_mb_per_token": facts.weight_bytes_per_token / 1e6,
            "prompt_tokens": prompt, "context": context}


def published_prefill(measurement: dict) -> float | None:
    if measurement.get("prefill_tokens_per_s"):
        return float(measurement["prefill_tokens_per_s"])
    if measurement.get("prefill_ms_per_token"):
        return 1e3 / float(measurement["prefill_ms_per_token"])
    return None


def compare(data: dict, devices: dict) -> list[dict]:
    rows = []
    for m in data["measurement"]:
        projected = project(m, devices)
        row = {"id": m["id"], "device": m["device"], "unit": m["unit"], "model": m["config"], "scheme": f"{m['target']} {m['scheme']}",
               "role": m["role"], "runtime": m["runtime"], "source": m["source"],
               "published_decode": float(m["decode_tokens_per_s"]), "projected_decode": projected["decode_tokens_per_s"],
               "decode_ratio": projected["decode_tokens_per_s"] / float(m["decode_tokens_per_s"])}
        prefill = published_prefill(m)
        if prefill:
            row.update(published_prefill=prefill, projected_prefill=projected["prefill_tokens_per_s"],
                       prefill_ratio=projected["prefill_tokens_per_s"] / prefill)
        rows.append(row)
    return rows


def errors(rows: list[dict], role: str, metric: str = "decode") -> dict:
    ratios = [r[f"{metric}_ratio"] for r in rows if r["role"] == role and f"{metric}_ratio" in r]
    if not ratios:
        return {"count": 0}
    off = [abs(x - 1) for x in ratios]
    factor = [max(x, 1 / x) for x in ratios]
    return {"count": len(ratios), "median_abs_error": statistics.median(off), "max_abs_error": max(off), "max_factor": max(factor),
            "within_25pct": sum(o <= 0.25 for o in off)}


def with_value(devices: dict, fit: dict, value: float) -> dict:
    from edgepack.profiles.devices import Figure

    out = dict(devices)
    for device_id in fit["devices"]:
        device = devices[device_id]
        tables = {k: dict(v) for k, v in device.tables.items()}
        for key in fit["keys"]:
            old = tables.get(fit["table"], {}).get(key)
            tables.setdefault(fit["table"], {})[key] = Figure(value, old.source if old else "fit", False, old.basis if old else "fit")
        out[device_id] = replace(device, tables=tables)
    return out


def fit_value(data: dict, devices: dict, fit: dict) -> float:
    """The value of the fit's figures that makes the median projected/published ratio of its measurements 1."""
    chosen = [m for m in data["measurement"] if m["id"] in fit["measurements"]]

    def median_ratio(value: float) -> float:
        trial = with_value(devices, fit, value)
        ratios = []
        for m in chosen:
            p = project(m, trial)
            if fit["metric"] == "decode":
                ratios.append(p["decode_tokens_per_s"] / float(m["decode_tokens_per_s"]))
            else:
                ratios.append(p["prefill_tokens_per_s"] / published_prefill(m))
        return statistics.median(ratios)

    low, high = 0.005, 2.0  # the projection's speed grows with the efficiency
    if median_ratio(high) < 1:
        raise SystemExit(f"fit {fit['name']!r}: even an efficiency of {high} projects slower than published; check the measurement")
    for _ in range(60):
        mid = (low + high) / 2
        if median_ratio(mid) < 1:
            low = mid
        else:
            high = mid
    return round((low + high) / 2, 3)


def run_fits(data: dict, devices: dict) -> tuple[dict, list[dict]]:
    """Fits in file order (decode before prefill: prefill's memory floor uses the decode figures)."""
    fits = sorted(data.get("fit", []), key=lambda f: f["metric"] != "decode")
    values: dict[str, float] = {}
    for _ in range(3):  # fits share terms (the cache streams at the fp16 figure): repeat until the values settle
        for fit in fits:
            values[fit["name"]] = fit_value(data, devices, fit)
            devices = with_value(devices, fit, values[fit["name"]])
    return devices, [{**fit, "value": values[fit["name"]]} for fit in fits]


def write_fits(results: list[dict]) -> None:
    """Put each fitted value, its source and basis into the device files (the lines of the fitted keys)."""
    for fit in results:
        source = f"fitted by benchmarks/published.py to {', '.join(fit['measurements'])} (benchmarks/published.toml)"
        basis = (f"fit '{fit['name']}': the value that makes the projection of the measurement{'s' if len(fit['measurements']) > 1 else ''} "
                 f"({fit['metric']}) equal the published figure; docs/devices.md lists the error on the held-out measurements")
        for device_id in fit["devices"]:
            path = DEVICES_DIR / f"{device_id}.toml"
            text = path.read_text()
            for key in fit["keys"]:
                text = _replace_figure(text, path, fit["table"], key,
                                       f'{key} = {{ value = {fit["value"]}, source = "{source}", verified = false, basis = "{basis}" }}')
            path.write_text(text)
            tomllib.loads(text)


def _replace_figure(text: str, path: Path, table: str, key: str, line: str) -> str:
    section = re.search(rf"^\[{re.escape(table)}\]\n(.*?)(?=^\[|\Z)", text, flags=re.M | re.S)
    if section is None:
        raise SystemExit(f"{path}: no [{table}] table")
    body = section.group(1)
    pattern = re.compile(rf"^{re.escape(key)} = .*$", flags=re.M)
    if not pattern.search(body):
        raise SystemExit(f"{path}: [{table}] has no {key}")
    body = pattern.sub(lambda _m: line, body, count=1)
    return text[:section.start(1)] + body + text[section.end(1):]


def print_table(rows: list[dict]) -> None:
    print(f"{'measurement':52} {'device':15} {'unit':4} {'role':8} {'published':>9} {'projected':>9} {'ratio':>6}  prefill pub/proj/ratio")
    for r in rows:
        prefill = ""
        if "prefill_ratio" in r:
            prefill = f"{r['published_prefill']:.0f} / {r['projected_prefill']:.0f} / {r['prefill_ratio']:.2f}"
        print(f"{r['id'][:52]:52} {r['device']:15} {r['unit']:4} {r['role']:8} {r['published_decode']:9.2f} {r['projected_decode']:9.2f} "
              f"{r['decode_ratio']:6.2f}  {prefill}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fit", action="store_true", help="recompute the fitted figures (printed; the table uses them)")
    parser.add_argument("--write", action="store_true", help="with --fit: write the fitted figures into the device files")
    args = parser.parse_args(argv)

    from edgepack.profiles.devices import load_devices

    data = load_published()
    devices = load_devices()
    fits = []
    if args.fit:
        devices, fits = run_fits(data, devices)
        for fit in fits:
            print(f"fit {fit['name']}: [{fit['table']}] {', '.join(fit['keys'])} = {fit['value']} on {', '.join(fit['devices'])}")
        if args.write:
            write_fits(fits)
            devices = load_devices()
    rows = compare(data, devices)
    print_table(rows)
    summary = {role: {metric: errors(rows, role, metric) for metric in ("decode", "prefill")} for role in ("fit", "held-out")}
    held = summary["held-out"]["decode"]
    passed = held["count"] >= 1 and held["median_abs_error"] <= GATE_MEDIAN and held["max_factor"] <= GATE_MAX_FACTOR
    print(f"\nheld-out decode: {held['count']} measurements, median |projected/published - 1| = {held['median_abs_error']:.3f} "
          f"(target <= {GATE_MEDIAN}), worst factor {held['max_factor']:.2f}x (target <= {GATE_MAX_FACTOR}x), "
          f"{held['within_25pct']} within 25%")
    pre = summary["held-out"]["prefill"]
    if pre["count"]:
        print(f"held-out prefill: {pre['count']} measurements, median |ratio - 1| = {pre['median_abs_error']:.3f}, worst factor {pre['max_factor']:.2f}x")
    table = [{"measurement": r["id"], "device": r["device"], "unit": r["unit"], "edgepack artifact": r["scheme"], "role": r["role"],
              "published tok/s": r["published_decode"], "projected tok/s": round(r["projected_decode"], 2), "ratio": round(r["decode_ratio"], 3),
              "prefill published": r.get("published_prefill"), "prefill projected": None if "projected_prefill" not in r else round(r["projected_prefill"], 1),
              "prefill ratio": None if "prefill_ratio" not in r else round(r["prefill_ratio"], 3), "source": r["source"]} for r in rows]
    fitted = "; ".join(f"{f['name']}: [{f['table']}] {'/'.join(f['keys'])} = {f['value']} ({', '.join(f['measurements'])})" for f in fits)
    _results.write(
        "published", title="Projected vs published decode (and prefill) tokens/s", threads=None,
        conditions={"published": "benchmarks/published.toml", "measurements": len(rows), "fit": summary["fit"]["decode"]["count"],
                    "held_out": held["count"], "held_out_decode_median_abs_error": round(held["median_abs_error"], 4),
                    "held_out_decode_max_factor": round(held["max_factor"], 3),
                    "held_out_prefill_median_abs_error": round(pre["median_abs_error"], 4) if pre["count"] else None,
                    "held_out_prefill_max_factor": round(pre["max_factor"], 3) if pre["count"] else None,
                    "gate": f"held-out decode median <= {GATE_MEDIAN}, worst factor <= {GATE_MAX_FACTOR}x", "passed": passed},
        rows=table, notes=("Fitted figures: " + fitted) if fitted else "Device database as committed (run with --fit to recompute the fitted figures).")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
