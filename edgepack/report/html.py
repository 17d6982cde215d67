"""report.html: one self-contained page (no network): summary table and plots embedded as PNG data URIs."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 2rem; color: #1d2330; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
.verdict { display: inline-block; padding: .2rem .7rem; border-radius: .4rem; color: white; font-weight: 600; }
.pass { background: #1a7f37; } .fail { background: #cf222e; } .none { background: #6e7781; }
table { border-collapse: collapse; margin: .5rem 0; font-size: .9rem; }
th, td { border: 1px solid #d0d7de; padding: .3rem .6rem; text-align: right; }
th { background: #f6f8fa; } td.l, th.l { text-align: left; }
.plots img { max-width: 560px; margin: .5rem 1rem .5rem 0; border: 1px solid #d0d7de; }
ul.failures li { color: #cf222e; } ul.failures li.note { color: #57606a; }
.note { color: #57606a; font-size: .85rem; }
"""


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _fmt(value, spec=".3g") -> str:
    return "" if value is None else format(value, spec)


def _plots(report: dict, folder: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = []
    # Size vs quality per scheme (the Pareto view): smaller and lower KL is better.
    points = [(n, s["size_bytes"], (s["quality"] or {}).get("kl_mean")) for n, s in report["schemes"].items()
              if s["size_bytes"] and (s["quality"] or {}).get("kl_mean") is not None]
    if points:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for name, size, kl in points:
            ax.scatter(size / 1e6, kl, s=50)
            ax.annotate(name, (size / 1e6, kl), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel("model size (MB)")
        ax.set_ylabel("mean KL vs fp32 (nats)")
        ax.set_yscale("symlog", linthresh=1e-4)
        ax.set_title("Size vs quality per scheme")
        ax.grid(alpha=.3)
        plots.append(("Size vs quality", _png(fig)))

    # Decode latency per device against its budget.
    for scheme, devices in report["figures"].items():
        names = [d for d, f in devices.items() if (f.get("decode_ms_per_token") or {}).get("value") is not None]
        if not names:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        values = [devices[d]["decode_ms_per_token"]["value"] for d in names]
        colors = ["#57606a" if d == "host" else "#0969da" for d in names]
        ax.barh(names, values, color=colors)
        for verdict in report["verdicts"].get(scheme, []):
            if verdict["budget"] == "max_decode_ms_per_token" and verdict["device"] in names:
                y = names.index(verdict["device"])
                ax.plot([verdict["limit"]] * 2, [y - .4, y + .4], color="#cf222e", linewidth=2)
        ax.set_xlabel("decode ms/token (host: measured, others: projected); red: budget")
        ax.set_title(f"Decode latency per device, {scheme}")
        plots.append((f"Latency per device ({scheme})", _png(fig)))

    # Decode ms/token against context length, projected from the model's bytes per token.
    curves = _context_curves(report, folder)
    if curves:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for label, xs, ys in curves:
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
        ax.set_xlabel("context position (tokens)")
        ax.set_ylabel("projected decode ms/token")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
        ax.grid(alpha=.3)
        ax.set_title("Decode cost grows with the KV cache")
        plots.append(("Decode vs context length", _png(fig)))
    return plots


def _context_curves(report: dict, folder: Path) -> list:
    from edgepack.profiles.devices import load_devices
    from edgepack.profiles.model_facts import ModelFacts
    from edgepack.profiles.roofline import DeviceModel, project_decode

    curves = []
    devices = load_devices()
    for scheme in report["figures"]:
        path = folder / "profiles" / f"{scheme}.json"
        if not path.is_file():
            continue
        profile = json.loads(path.read_text())
        raw = profile["model"]["facts"]
        facts = ModelFacts(onnx_path=profile["model"]["dir"], **{k: v for k, v in raw.items() if k in ModelFacts.__dataclass_fields__ and k != "onnx_path"})
        limit = facts.kv_slots or facts.max_context or 2048  # a static program holds kv_slots positions
        positions = [p for p in (64, 128, 256, 512, 1024, 2048, 4096, 8192) if p <= limit]
        for device_id, projection in list((profile.get("projections") or {}).items())[:4]:
            if device_id not in devices:
                continue
            unit = projection.get("unit") or "cpu"  # coreml and qnn bundles: the unit that runs them
            model = DeviceModel.for_unit(devices[device_id], unit)
            label = f"{scheme} @ {device_id}" + (f" ({unit})" if unit != "cpu" else "")
            curves.append((label, positions, [project_decode(facts, model, p)["ms"] for p in positions]))
    return curves


def _measured_vs_projected(report: dict) -> str:
    """Bundles measured on their devices beside their projections (empty without `[devices.NAME] on = ...`)."""
    rows = report.get("measured_vs_projected") or []
    if not rows:
        return ""
    cells = "".join(
        "<tr>" + "".join([
            f"<td class=l>{html.escape(r['profile'])}</td>", f"<td class=l>{html.escape(r['device'])}</td>",
            f"<td class=l>{html.escape(str(r['projected_as'] or '-'))}</td>", f"<td>{_fmt(r['top1_agreement'], '.3f')}</td>",
            f"<td>{_fmt(r['measured_decode_ms_per_token'], '.2f')}</td>", f"<td>{_fmt(r['projected_decode_ms_per_token'], '.2f')}</td>",
            f"<td>{_fmt(r['decode_ms_per_token_ratio'], '.2f')}</td>", f"<td>{_fmt(r['measured_ttft_ms'], '.0f')}</td>",
            f"<td>{_fmt(r['projected_ttft_ms'], '.0f')}</td>", f"<td>{_fmt(r['ttft_ms_ratio'], '.2f')}</td>",
        ]) + "</tr>" for r in rows)
    return ("<h2>Measured on the device vs projected</h2><table><tr><th class=l>bundle</th><th class=l>device</th><th class=l>projected as</th>"
            "<th>top-1 on device</th><th>decode ms/token measured</th><th>projected</th><th>ratio</th><th>TTFT ms measured</th>"
            f"<th>projected</th><th>ratio</th></tr>{cells}</table>\n")


def render_html(report: dict, folder: Path) -> str:
    from edgepack.report.summary import scheme_label, target_label

    verdict = "pass" if report["passed"] else "fail"
    rows = []
    for row in report["summary"]:
        cls = {"pass": "pass", "fail": "fail"}.get(row["verdict"], "none")
        rows.append(
            "<tr>" + "".join([
                f"<td class=l>{html.escape(scheme_label(row))}</td>",
                f"<td class=l>{html.escape(target_label(row))}</td>",
                f"<td class=l>{html.escape(str(row['device'] or ''))}</td>",
                f"<td>{_fmt(row['size_mb'], '.1f')}</td>",
                f"<td>{_fmt(row['top1_agreement'], '.3f')}</td>",
                f"<td>{_fmt(row['kl_mean'], '.4f')}</td>",
                f"<td>{_fmt(row['decode_ms_per_token'], '.1f')}</td>",
                f"<td>{_fmt(row['ttft_ms'], '.0f')}</td>",
                f"<td>{_fmt(row['energy_mj_per_token'], '.2f')}</td>",
                f"<td class=l>{html.escape(str(row['figure_kind'] or ''))}</td>",
                f"<td class=l><span class='verdict {cls}'>{html.escape(row['verdict'])}</span></td>",
            ]) + "</tr>"
        )
    failures = "".join(f"<li>{html.escape(f)}</li>" for f in report["failures"]) or "<li class=note>none</li>"
    try:
        plots = _plots(report, folder)
    except Exception as exc:  # a report without plots is still a report; say why
        plots = []
        failures += f"<li class=note>plots unavailable: {html.escape(str(exc))}</li>"
    plot_html = "".join(f"<figure><img alt='{html.escape(t)}' src='{src}'><figcaption class=note>{html.escape(t)}</figcaption></figure>"
                        for t, src in plots)
    stages = "".join(f"<tr><td class=l>{s['stage']}</td><td class=l>{html.escape(s['name'])}</td>"
                     f"<td class=l>{'reused' if s['reused'] else 'built'}</td><td>{s['seconds']:.1f}</td></tr>"
                     for s in report["stages"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>edgepack report: {html.escape(str(report['model']))}</title>
<style>{CSS}</style></head><body>
<h1>edgepack build: {html.escape(str(report['model']))} <span class="verdict {verdict}">{verdict.upper()}</span></h1>
<p class=note>recipe {html.escape(report['recipe'])} · {report['seconds']:.0f} s · host figures measured, device figures projected from the device database (docs/devices.md)</p>
<h2>Summary: scheme × target × device</h2>
<table><tr><th class=l>scheme</th><th class=l>target</th><th class=l>device</th><th>MB</th><th>top-1</th><th>mean KL</th>
<th>decode ms/token</th><th>TTFT ms</th><th>mJ/token</th><th class=l>kind</th><th class=l>verdict</th></tr>
{''.join(rows)}</table>
{_measured_vs_projected(report)}<h2>Failures</h2><ul class=failures>{failures}</ul>
<h2>Plots</h2><div class=plots>{plot_html}</div>
<h2>Stages</h2><table><tr><th class=l>stage</th><th class=l>name</th><th class=l>cache</th><th>seconds</th></tr>{stages}</table>
</body></html>
"""
