"""The build's figures gathered into one report, one row per scheme x target x device."""

from __future__ import annotations

import json
from pathlib import Path

REPORT_SCHEMA_VERSION = 1
FIGURE_KEYS = {  # summary column -> budget key whose figure it shows
    "decode_ms_per_token": "max_decode_ms_per_token",
    "ttft_ms": "max_ttft_ms",
    "energy_mj_per_token": "max_energy_mj_per_token",
    "peak_memory_mb": "max_peak_memory_mb",
}


def scheme_label(row: dict) -> str:
    """The scheme column: the recipe's scheme, or `fp32 -> <own precision>` for coreml/qnn rows."""
    precision = row.get("precision")
    return row["scheme"] if precision in (None, row["scheme"]) else f"{row['scheme']} -> {precision}"


def target_label(row: dict) -> str:
    """The target column: the target, with the Neural Engine verdict of a Core ML package (`ane`)."""
    target = row.get("target") or ""
    return f"{target} (ANE {row['ane']})" if row.get("ane") else target


def _neural_engine(data: dict) -> str | None:
    """A Core ML target's ANE report verdict (ready, partial, unlikely); None for other targets."""
    ane = (data.get("facts") or {}).get("ane")
    return ane.get("neural_engine") if isinstance(ane, dict) else None


def _figures(profile: dict, device: str) -> dict:
    from edgepack.profiles.budgets import figure_for

    figures = {}
    for column, key in FIGURE_KEYS.items():
        value, kind, conditions = figure_for(profile, device, key)
        figures[column] = {"value": value, "kind": kind, "conditions": conditions}
    return figures


def _own_compression_rows(target: str, scheme: str, data: dict, figures: dict, verdicts: list) -> list[dict]:
    """Summary rows of a target that converts the fp32 weights with its own compression (coreml, qnn).

    Quality is the target's own parity check against fp32 (MIL reference, HTP simulator). Nothing runs
    it here at device speed: its figures are projected onto each recipe device whose compute unit runs
    it (`figures`, from edgepack/profiles/artifacts.py) and checked against that device's budgets; with
    no such device, one row with empty figures (figure_kind "missing") and the target's own verdict.
    """
    base = _own_compression_row(target, scheme, data)
    rows = []
    for device, device_figures in figures.items():
        device_verdicts = [v for v in verdicts if v.device == device]
        passed = bool(data.get("passed")) and all(v.passed for v in device_verdicts)
        rows.append({**base, "device": device, **{k: (device_figures.get(k) or {}).get("value") for k in FIGURE_KEYS},
                     "figure_kind": (device_figures.get("decode_ms_per_token") or {}).get("kind"), "budgets": len(device_verdicts),
                     "verdict": "pass" if passed else "fail"})
    return rows or [base]


def _own_compression_row(target: str, scheme: str, data: dict) -> dict:
    facts = data.get("facts") or {}
    compression = facts.get("compression")
    precision = facts.get("precision") or (compression.get("name") if isinstance(compression, dict) else None) \
        or facts.get("compute_precision") or scheme
    checks = data.get("checks") or {}
    # A target that checks its program against the same weights and against fp32 (executorch) names the latter
    # `quality`: the row's figures are against fp32, like every other row's.
    parity = checks["quality"] if "top1_agreement" in (checks.get("quality") or {}) else \
        next((check for check in checks.values() if isinstance(check, dict) and "top1_agreement" in check), {})
    return {
        "scheme": scheme, "target": target, "device": facts.get("device"),
        "size_mb": data["total_bytes"] / 1e6, "kl_mean": parity.get("kl_mean"), "top1_agreement": parity.get("top1_agreement"),
        **{k: None for k in FIGURE_KEYS}, "figure_kind": "missing", "budgets": 0,
        "verdict": "pass" if data.get("passed") else "fail", "precision": precision, "ane": _neural_engine(data),
    }


def build_report(recipe, sources, quality_reports, targets, profiles, verdicts, result, seconds: float) -> dict:
    schemes = {}
    for name in sources:
        report = quality_reports.get(name)
        schemes[name] = {
            "scheme": report["scheme"] if report else {"name": "fp32"},
            "size_bytes": report["size_bytes"] if report else None,
            "size_ratio": report["size_ratio"] if report else 1.0,
            "quality": report.get("quality") if report else None,
        }
    target_rows, own_rows = [], []
    target_data = {key: json.loads((path / "target.json").read_text()) for key, path in targets.items()}
    for (target, scheme), data in target_data.items():
        ane = _neural_engine(data)
        target_rows.append({"target": target, "scheme": scheme, "total_bytes": data["total_bytes"], "passed": data["passed"],
                            "path": f"targets/{target}/{scheme}", **({"ane": ane} if ane else {})})
    from edgepack.build import profile_name

    figures, rows = {}, []
    for name, profile in profiles.items():  # keyed by build.profile_name: one profile per bundle measured or projected
        devices = (["host"] if profile.get("host") else []) + list(profile.get("measured_on") or {}) + list(profile.get("projections") or {})
        figures[name] = {device: _figures(profile, device) for device in dict.fromkeys(devices)}
    for (target, scheme), data in target_data.items():
        if scheme == "fp32" and len(sources) > 1:
            name = profile_name(scheme, target)
            own_rows.extend(_own_compression_rows(target, scheme, data, figures.get(name) or {}, verdicts.get(name, [])))
    for scheme in sources:
        if scheme == "fp32" and len(sources) > 1:
            continue  # the fp32 export is the quality reference here, not a deliverable
        quality = (schemes[scheme].get("quality") or {})
        scheme_targets = [t for t in target_rows if t["scheme"] == scheme] or [{"target": None, "total_bytes": schemes[scheme]["size_bytes"], "passed": True}]
        for target in scheme_targets:
            # A target's rows show the figures of its own bundle where it was profiled (ort-mobile: the .ort),
            # else those of the scheme's ort bundle or export.
            name = profile_name(scheme, target["target"])
            name = name if name in figures else scheme
            devices = figures.get(name) or {None: {}}
            for device, device_figures in devices.items():
                device_verdicts = [v for v in verdicts.get(name, []) if v.device == device]
                rows.append({
                    "scheme": scheme,
                    "target": target["target"],
                    "device": device,
                    "size_mb": None if target["total_bytes"] is None else target["total_bytes"] / 1e6,
                    "kl_mean": quality.get("kl_mean"),
                    "top1_agreement": quality.get("top1_agreement"),
                    **{k: (device_figures.get(k) or {}).get("value") for k in FIGURE_KEYS},
                    "figure_kind": (device_figures.get("decode_ms_per_token") or {}).get("kind"),
                    "budgets": len(device_verdicts),
                    "verdict": ("pass" if all(v.passed for v in device_verdicts) else "fail") if device_verdicts else "no budget",
                    "precision": scheme,
                    "ane": target.get("ane"),
                })
    rows.extend(own_rows)
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "kind": "edgepack.report",
        "recipe": str(recipe.path),
        "model": recipe.model.get("source"),
        "passed": result.passed,
        "failures": [gate.message for gate in result.failures],
        "schemes": schemes,
        "targets": target_rows,
        "summary": rows,
        "figures": figures,
        "verdicts": {scheme: [v.to_json() for v in vs] for scheme, vs in verdicts.items()},
        "stages": [{"stage": r.stage, "name": r.name, "reused": r.reused, "seconds": round(r.seconds, 3)} for r in result.records],
        "seconds": round(seconds, 3),
        "measured_vs_projected": measured_vs_projected(profiles, recipe.measured),
    }


def measured_vs_projected(profiles: dict, measured: dict) -> list[dict]:
    """One row per bundle x device measured on (`[devices.NAME] on = ...`): the measurement beside the projection
    of the database device it is like, and their ratio (measured / projected)."""
    from edgepack.profiles.budgets import figure_for

    rows = []
    for name, profile in profiles.items():
        for device, section in (profile.get("measured_on") or {}).items():
            like = (measured.get(device) or {}).get("like")
            projection = (profile.get("projections") or {}).get(like) if like else None
            row = {"profile": name, "device": device, "url": (section.get("device") or {}).get("url"), "projected_as": like,
                   "top1_agreement": ((section.get("parity") or {}).get("device") or {}).get("top1_agreement")}
            for column, key in (("decode_ms_per_token", "max_decode_ms_per_token"), ("ttft_ms", "max_ttft_ms")):
                value = figure_for(profile, device, key)[0]
                entries = (projection or {}).get("by_prompt_len") or []
                projected = max((e[column] for e in entries if e.get(column) is not None), default=None)
                row[f"measured_{column}"] = value
                row[f"projected_{column}"] = projected
                row[f"{column}_ratio"] = value / projected if value is not None and projected else None
            rows.append(row)
    return rows


# build stage of a gate -> the junit.xml testsuite it is written in
JUNIT_SUITES = {"quantize": "edgepack.quality", "target": "edgepack.targets", "check": "edgepack.budgets"}


def write_reports(folder: Path, report: dict, gates: list) -> None:
    """report.json, junit.xml (one test case per gate: scheme quality limit, target check, bundle x device x budget) and report.html."""
    from edgepack.report.html import render_html
    from edgepack.report.junit import junit_xml

    suites = {suite: [gate for gate in gates if gate.stage == stage] for stage, suite in JUNIT_SUITES.items()}
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "junit.xml").write_text(junit_xml(suites, name="edgepack.build"))
    (folder / "report.html").write_text(render_html(report, folder))
