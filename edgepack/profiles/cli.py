"""`edgepack devices`, `edgepack profile`, `edgepack check`. Thin: parse, call one stage, print, exit code.

Only click and the standard library at module level: `edgepack devices` must start in a fraction of a
second. Stages (and numpy/onnxruntime/rich) are imported inside the commands.
"""

from __future__ import annotations

from pathlib import Path

import click

from edgepack.core.console import Status, stdout_console
from edgepack.errors import GateFailedError, UsageError
from edgepack.options import FiniteFloatRange, click_options, config_from_cli
from edgepack.profiles.estimate import EstimateConfig

DEVICES_DIR_HELP = "Extra folder of device TOML files (repeatable); a file with a known id replaces the built-in one."


def _fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return "[" + ", ".join(format(v, spec) for v in value) + "]"
    return format(value, spec)


class _DevicesGroup(click.Group):
    """`edgepack devices` alone lists the devices (the `list` subcommand)."""

    def parse_args(self, ctx, args):
        if not args or (args[0].startswith("-") and args[0] not in ("-h", "--help")):
            args = ["list", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DevicesGroup)
def devices():
    """List, show and calibrate device profiles (edgepack/profiles/devices/*.toml).

    Every figure carries its source and `verified = true|false`; unverified
    figures say how they were estimated (docs/devices.md).

    \b
    Example:
      edgepack devices
      edgepack devices show pixel-8
      edgepack devices calibrate -o host.toml --threads 2
      edgepack profile build/smollm2 --devices-dir . --device host
    """


@devices.command("list")
@click.option("--devices-dir", "devices_dirs", multiple=True, type=click.Path(path_type=Path), help=DEVICES_DIR_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_devices(devices_dirs, as_json):
    """List the known devices."""
    from edgepack.profiles.devices import ACCELERATOR_UNITS, load_devices

    found = load_devices(list(devices_dirs))
    if as_json:
        import json

        click.echo(json.dumps([d.to_json() for d in found.values()], indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{len(found)} devices (figures: (v) verified in the cited source, ~ estimated; `edgepack devices show ID` for sources)", title_justify="left")
    for column in ("id", "name", "class", "RAM MB", "app limit MB", "bandwidth GB/s", "sustained W", "NPU int8 TOPS", "extra"):
        table.add_column(column)

    def cell(device, table_name, key):
        fig = device.figure(table_name, key)
        return "-" if fig is None else f"{_fmt(fig.value, 'g')} {'(v)' if fig.verified else '~'}"

    for device in found.values():
        extra = []
        if device.figure("qnn", "soc_model"):
            extra.append(f"QNN soc {device.value('qnn', 'soc_model')}/htp v{device.value('qnn', 'htp_arch')}")
        if device.coreml:
            extra.append(f"Core ML {device.coreml.get('compute_units')}")
        units = [unit for unit in ACCELERATOR_UNITS if device.has_unit(unit)]
        if units:
            extra.append("units: cpu, " + ", ".join(units))
        table.add_row(device.id, device.name, device.device_class, cell(device, "memory", "ram_mb"),
                      cell(device, "memory", "app_memory_limit_mb"), cell(device, "memory", "bandwidth_gb_s"),
                      cell(device, "power", "sustained_w"), cell(device, "compute", "npu_int8_tops"), "; ".join(extra))
    stdout_console().print(table)


@devices.command("show")
@click.argument("device_id", metavar="ID")
@click.option("--devices-dir", "devices_dirs", multiple=True, type=click.Path(path_type=Path), help=DEVICES_DIR_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def show_device(device_id, devices_dirs, as_json):
    """Every figure of one device with its source and whether it is verified."""
    from edgepack.profiles.devices import get_device, load_devices

    device = get_device(device_id, load_devices(list(devices_dirs)))
    if as_json:
        import json

        click.echo(json.dumps(device.to_json(), indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{device.id}: {device.name} ({device.soc}) — {device.path}", title_justify="left")
    for column in ("figure", "value", "verified", "source / basis"):
        table.add_column(column, overflow="fold")
    for table_name, figures in device.tables.items():
        for key, fig in figures.items():
            note = fig.source + (f" — estimate: {fig.basis}" if fig.basis else "")
            table.add_row(f"{table_name}.{key}", _fmt(fig.value, ".4g"), "yes" if fig.verified else "no (estimate)", note)
    for key, value in device.coreml.items():
        table.add_row(f"coreml.{key}", str(value), "-", "Core ML setting for this device")
    console = stdout_console()
    console.print(table)
    if device.notes:
        console.print(f"notes: {device.notes}")


@devices.command("calibrate")
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Device TOML to write (e.g. host.toml).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Threads to measure with (default: all cores). Use the count you will profile with.")
@click.option("--id", "device_id", default="host", show_default=True, help="Device id written into the file.")
@click.option("--sizes-mb", default="32,128,512", show_default=True, help="GEMV working sets (MB) for the decode efficiency curve.")
@click.option("--repeats", type=click.IntRange(min=1), default=7, show_default=True, help="Timed repeats per figure (the median is kept).")
@click.option("--quick", is_flag=True, help="Small sizes and few repeats: seconds, for smoke tests; figures are rough.")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.option("--on", "on", default=None, metavar="URL", help="Calibrate this device instead of this host: ssh://[user@]host[:port] "
              "(after `edgepack devices prepare URL`). The file is written here; its figures are the device's.")
@click.option("--device-timeout", type=FiniteFloatRange(min=1), default=1800.0, show_default=True, help="Seconds the device may take.")
def calibrate(out, threads, device_id, sizes_mb, repeats, quick, force, on, device_timeout):
    """Measure this host and write a device profile usable with --devices-dir.

    Memory bandwidth (STREAM-like triad), effective GEMV bandwidth per
    weight format (fp32, int8, int4) by working set, GEMM throughput, and
    onnxruntime's per-node dispatch cost; power from RAPL when readable.

    \b
    Example:
      edgepack devices calibrate -o host.toml --threads 2
      edgepack devices calibrate -o pi5.toml --id pi5 --threads 4 --on ssh://pi@pi5.local
    """
    from edgepack.profiles.calibrate import CalibrateConfig, calibrate_host

    sizes = _parse_floats(sizes_mb, "--sizes-mb")
    config = CalibrateConfig(threads=threads, sizes_mb=sizes, repeats=repeats, device_id=device_id, force=force)
    if quick:
        config = CalibrateConfig(threads=threads, sizes_mb=(2.0, 8.0), triad_mb=16, repeats=2, gemm_rows=32,
                                 dispatch_nodes=200, overhead_mb=4.0, device_id=device_id, force=force)
    if on is not None:
        from edgepack.profiles.on_device import calibrate_on_device

        with Status(f"calibrating {on}") as status:
            done = calibrate_on_device(on, out, config, timeout=device_timeout, on_status=status)
        identity = done["identity"]
        stdout_console().print(f"edgepack devices calibrate --on {on} -> {out} ({done['seconds']:.0f} s, measured on {identity['hostname']}: "
                               f"{identity['cpu']}, {identity['cores']} cores, {identity['ram_mb']} MB)")
        return
    with Status("calibrating this host") as status:
        result = calibrate_host(out, config, on_status=status)
    from rich.table import Table

    f = result.figures
    table = Table(title=f"edgepack devices calibrate -> {result.out} ({result.seconds:.0f} s, measured)", title_justify="left")
    for column in ("figure", "value", "conditions"):
        table.add_column(column)
    table.add_row("triad bandwidth", f"{f['triad']['gb_s']:.2f} GB/s", f"{f['triad']['threads']} threads, {f['triad']['array_mb']:g} MB arrays, median")
    for fmt, points in f["gemv"].items():
        table.add_row(f"GEMV {fmt}", ", ".join(f"{p['gb_s']:.2f} GB/s @ {p['working_set_mb']:.0f} MB" for p in points),
                      f"efficiency at the largest set {points[-1]['gb_s'] / f['triad']['gb_s']:.2f} of triad")
    for fmt, g in f["gemm"].items():
        table.add_row(f"GEMM {fmt}", f"{g['gflops']:.1f} GFLOP/s", f"{g['rows']}x1024x1024")
    table.add_row("dispatch", f"{f['dispatch']['us_per_node']:.2f} us/node", f"{f['dispatch']['nodes']} tiny nodes")
    table.add_row("power", "measured (RAPL)" if f.get("power") else "estimated (no meter)", "")
    table.add_row("load average", f"{f.get('loadavg_before')} -> {f.get('loadavg_after')}", "a busy host lowers every figure")
    stdout_console().print(table)


@devices.command("prepare")
@click.argument("url", metavar="URL")
@click.option("--device-timeout", type=FiniteFloatRange(min=1), default=1800.0, show_default=True, help="Seconds the installation may take.")
def prepare(url, device_timeout):
    """Install what measuring needs on a device, once: a private venv there.

    URL is ssh://[user@]host[:port]. Creates ~/.cache/edgepack-device/venv-*
    on the device with its python3 and installs numpy, onnxruntime, onnx, onnx-ir and click
    at the versions this host runs (the bundles are built with them) from
    PyPI. `profile --on` and `devices calibrate --on` then use it.

    \b
    Example:
      edgepack devices prepare ssh://pi@pi5.local
      edgepack profile build/smollm2-ort -o pi.json --on ssh://pi@pi5.local
    """
    from edgepack.profiles.on_device import prepare_device

    with Status(f"preparing {url}") as status:
        done = prepare_device(url, timeout=device_timeout, on_status=status)
    pins = ", ".join(f"{k} {v}" for k, v in done["pins"].items())
    stdout_console().print(f"{url}: {'installed' if done['installed'] else 'already prepared'} {done['venv']} ({pins})")


def _parse_ints(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{option} takes comma-separated integers, e.g. 128,512; got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise UsageError(f"{option} takes positive integers, e.g. 128,512; got {text!r}")
    return values


def _parse_floats(text: str, option: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{option} takes comma-separated numbers; got {text!r}") from None
    if not values or not all(0 < v < float("inf") for v in values):  # nan fails every comparison
        raise UsageError(f"{option} takes positive numbers; got {text!r}")
    return tuple(sorted(values))


@click.command()
@click.argument("directory", metavar="DIR", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="profile.json to write (schema: docs/profile-json.md).")
@click.option("--device", "device_ids", multiple=True, help="Device id to project onto (repeatable; default: iphone-15-pro, pixel-8, galaxy-s24, "
              "raspberry-pi-5). `all` for every device.")
@click.option("--devices-dir", "devices_dirs", multiple=True, type=click.Path(path_type=Path), help=DEVICES_DIR_HELP)
@click.option("--prompt-len", default="128,512", show_default=True, help="Prompt lengths in tokens (comma-separated); prompts are built to exactly this many tokens.")
@click.option("--gen-len", type=click.IntRange(min=2), default=64, show_default=True, help="Tokens generated per run (EOS ignored so every run is the same length).")
@click.option("--runs", type=click.IntRange(min=1), default=5, show_default=True, help="Timed runs per prompt length.")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="Untimed runs first.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime intra-op threads (default: onnxruntime's choice).")
@click.option("--cooldown", "cooldown", type=FiniteFloatRange(min=0), default=0.0, show_default=True, help="Seconds of sleep between runs (thermals, shared hosts).")
@click.option("--context", type=click.IntRange(min=1), default=None, help="Context (tokens) for the memory-fit projection (default: the model's maximum).")
@click.option("--on", "on", multiple=True, metavar="[NAME=]URL", help="Measure on this device instead of here: ssh://[user@]host[:port] "
              "or adb:SERIAL (repeatable). NAME (default: the host or serial) is what budgets call it.")
@click.option("--device-timeout", type=FiniteFloatRange(min=1), default=600.0, show_default=True,
              help="Seconds a device may take for one step (copy, measurement) before it is given up (exit 4).")
def profile(directory, out, device_ids, devices_dirs, prompt_len, gen_len, runs, warmup, threads, cooldown, context, on, device_timeout):
    """Measure latency, memory and energy here; project them onto devices.

    DIR is any folder `edgepack run` takes (a convert or quantize output).
    Measured here: load time, TTFT, prefill tokens/s, decode ms/token
    p50/p95, tokens/s, peak RSS, energy (measured from RAPL when readable,
    otherwise estimated, and labelled so). Projected per device: decode
    from bytes read per token / (bandwidth x efficiency), prefill from
    FLOPs / (peak x efficiency), energy per token and memory fit.

    \b
    Example:
      edgepack profile build/smollm2-int4 -o profile.json --device pixel-8 --device iphone-15-pro
      edgepack profile build/smollm2 -o p.json --prompt-len 128 --gen-len 32 --runs 3 --threads 2
      edgepack profile build/smollm2-ort -o pi.json --on pi5=ssh://pi@pi5.local --threads 4
      edgepack check p.json --budgets budgets.toml
    """
    from edgepack.profiles.devices import load_devices
    from edgepack.profiles.measure import DEFAULT_DEVICES, ProfileConfig, profile_model
    from edgepack.runners import parse_on

    ids = tuple(device_ids) or DEFAULT_DEVICES
    if "all" in ids:
        ids = tuple(load_devices(list(devices_dirs)))
    config = ProfileConfig(
        devices=ids, prompt_lens=_parse_ints(prompt_len, "--prompt-len"), gen_len=gen_len, runs=runs, warmup=warmup,
        threads=threads, cooldown_s=cooldown, devices_dirs=tuple(devices_dirs), context=context,
        on=tuple(parse_on(value) for value in on), device_timeout_s=device_timeout, measure_here=not on,
    )
    with Status(f"profiling {directory}") as status:
        result = profile_model(directory, out, config, on_status=status)
    _print_profile(result.report, out)


def _print_profile(report: dict, out) -> None:
    from rich.table import Table

    host = report["host"]
    console = stdout_console()
    title = (f"edgepack profile -> {out}: {report['model']['scheme']}, {report['model']['facts']['weight_bytes_per_token'] / 1e6:.1f} MB "
             f"read per token + {report['model']['facts']['kv_bytes_per_position'] / 1e3:.1f} KB KV per position")
    table = Table(title=title, title_justify="left")
    for column in ("where", "kind", "prompt", "TTFT ms", "prefill tok/s", "decode ms/token", "tokens/s", "memory MB", "energy mJ/token (prefill / decode)"):
        table.add_column(column)
    measured = ([("this host", host)] if host else []) + list((report.get("measured_on") or {}).items())
    for where, section in measured:
        for entry in section["by_prompt_len"]:
            d = entry["decode_ms_per_token"]
            e = entry["energy"]
            table.add_row(
                where, "measured", f"{entry['prompt_len']}+{entry['gen_len']}",
                f"{entry['ttft_ms']['p50']:.1f} (p95 {entry['ttft_ms']['p95']:.1f})", f"{entry['prefill_tokens_per_s']:.0f}",
                f"{d['p50']:.2f} (p95 {d['p95']:.2f})", f"{entry['tokens_per_s']:.1f}", f"{section['peak_rss_mb']:.0f} peak RSS",
                f"{_fmt(e['prefill_mj_per_token'])} / {_fmt(e['decode_mj_per_token'])} ({e['kind']})",
            )
    for device_id, p in report["projections"].items():
        fit = p["memory_fit"]
        for entry in p["by_prompt_len"]:
            e = entry["energy"]
            table.add_row(
                device_id, "projected", f"{entry['prompt_len']}+{entry['gen_len']}", f"{entry['ttft_ms']:.1f}",
                f"{_fmt(entry['prefill_tokens_per_s'], '.0f')}", f"{entry['decode_ms_per_token']:.2f}", f"{_fmt(entry['tokens_per_s'], '.1f')}",
                f"{fit['total_mb']:.0f} / {_fmt(fit['limit_mb'], '.0f')} {'fits' if fit['fits'] else 'DOES NOT FIT' if fit['fits'] is False else ''}",
                f"{_fmt(e['prefill_mj_per_token'])} / {_fmt(e['decode_mj_per_token'])} (projected)",
            )
    console.print(table)
    for where, section in measured:
        c = section["conditions"]
        cpu = c["host"]["cpu"] if where == "this host" else section["device"]["cpu"]
        console.print(
            f"measured on {where}: {cpu}, {c['runtime']} {c['provider']}, threads {c['threads'] or 'default'}, "
            f"{c['runs']} runs + {c['warmup']} warmup, load {_fmt(section['load_seconds'], '.2f')} s, load average {c['loadavg_before']} -> {c['loadavg_after']}"
        )
        if section.get("parity"):
            p = section["parity"]
            console.print(f"  answers on {where}: top-1 {p['device']['top1_agreement']:.3f}, KL {p['device']['kl_mean']:.2e} against "
                          f"{p['reference']} (here: top-1 {p['here']['top1_agreement']:.3f}); bundle "
                          + ("copied" if section["bundle_copied"] else "already there"))
    for device_id, p in report["projections"].items():
        eff = ", ".join(f"{k.replace('decode_bandwidth_', 'bw ')} {v:.2f}" for k, v in p["efficiency"].items())
        curves = f"; calibrated curves: {', '.join(p['calibrated_curves'])}" if p["calibrated_curves"] else ""
        console.print(f"projected {device_id}: {p['bandwidth_gb_s']:g} GB/s, efficiency {eff}, dispatch {p['dispatch_us_per_node']:g} us/node{curves}")
    for where, section in measured:
        energy = section["by_prompt_len"][0]["energy"]
        console.print(f"energy on {where}: {energy['kind']} — {energy['basis']}")


@click.command()
@click.argument("profile_path", metavar="PROFILE", type=click.Path(path_type=Path))
@click.option("--budgets", "budgets_path", required=True, type=click.Path(path_type=Path), help="Budgets TOML: [device-id] tables (or a recipe's [budgets.<id>]); docs/budgets.md.")
@click.option("--junit", type=click.Path(path_type=Path), default=None, help="Write JUnit XML: one test case per device x budget.")
@click.option("-o", "--out", "out", type=click.Path(path_type=Path), default=None, help="Write the verdicts as JSON.")
def check(profile_path, budgets_path, junit, out):
    """Check a profile.json against budgets; exit 1 if any budget fails.

    \b
    Budget keys (units in the names): max_ttft_ms, max_decode_ms_per_token,
    min_tokens_per_s, max_peak_memory_mb, max_model_size_mb,
    max_energy_mj_per_token, max_kl, min_top1. Use [host] for the figures
    measured on this host and a device id for projected ones.

    \b
    Example:
      edgepack check profile.json --budgets budgets.toml --junit budgets.xml -o verdicts.json
    """
    from edgepack.profiles.budgets import CheckConfig, check_profile

    result = check_profile(profile_path, budgets_path, CheckConfig(junit=junit, out=out))
    from rich.table import Table

    table = Table(title=f"edgepack check {profile_path} --budgets {budgets_path}", title_justify="left")
    for column in ("device", "budget", "limit", "value", "kind", "margin", "verdict", "conditions"):
        table.add_column(column, overflow="fold")
    for v in result.verdicts:
        table.add_row(
            v.device, v.budget, f"{v.limit:g} {v.unit}", "-" if v.value is None else f"{v.value:.4g}", v.kind,
            "-" if v.margin is None else f"{100 * v.margin:+.1f}%", "PASS" if v.passed else "FAIL", v.detail,
        )
    stdout_console().print(table)
    for skipped in result.report.get("skipped", []):
        stdout_console().print(f"skipped {skipped['device']}.{skipped['budget']}: {skipped['reason']}")
    if result.failures:
        raise GateFailedError(
            f"{len(result.failures)} of {len(result.verdicts)} budgets failed: " + "; ".join(v.message for v in result.failures[:5])
            + (" ..." if len(result.failures) > 5 else "")
        )


@click.command()
@click.argument("model", metavar="MODEL", type=click.Path(path_type=Path))
@click_options(EstimateConfig)
@click.option("-o", "--out", "out", type=click.Path(path_type=Path), default=None, help="Write the estimate as JSON (`edgepack check` takes it).")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON instead of a table.")
def estimate(model, out, as_json, **options):
    """Project a model onto devices from its configuration alone, before building it.

    MODEL is a Hugging Face folder, its config.json, or a .gguf file; no
    weights are read. Prints weight bytes read per token, KV bytes per
    position, memory at the context, and per device decode ms/token, TTFT,
    mJ/token and the memory fit (kind: estimated). The JSON has the shape of
    profile.json's projections, so `edgepack check` gates it with the same
    budgets (quality budgets and [host] are skipped: an estimate has none).

    \b
    Example:
      edgepack estimate llama-3.2-1b/config.json --scheme int4 --device galaxy-s24 --device iphone-15-pro --device raspberry-pi-5
      edgepack estimate model.gguf --scheme gguf --device raspberry-pi-5 -o estimate.json
      edgepack estimate qwen2.5-1.5b/ --target coreml --scheme int4 --device iphone-15-pro --context 1024
      edgepack check estimate.json --budgets budgets.toml
    """
    from edgepack.profiles.estimate import estimate_model

    config = config_from_cli(EstimateConfig, options)
    if out is not None:
        from edgepack.outputs import check_output_file

        check_output_file(out)
    report = estimate_model(model, config).report
    import json

    text = json.dumps(report, indent=2) + "\n"
    if out is not None:
        from edgepack.outputs import write_output_file

        write_output_file(out, text)
    if as_json:
        click.echo(text, nl=False)
        return
    _print_estimate(report, out)


def _print_estimate(report: dict, out) -> None:
    from rich.table import Table

    m, e = report["model"], report["estimate"]
    title = (f"edgepack estimate: {m['architecture']['params'] / 1e9:.2f}B parameters as {m['target']} {m['scheme']} on the "
             f"{m['unit']}: {e['weight_bytes_per_token'] / 1e6:.1f} MB read per token, {e['kv_bytes_per_position'] / 1e3:.1f} KB KV "
             f"per position ({e['kv_bytes_at_context'] / 1e6:.1f} MB at {e['context']} tokens)")
    table = Table(title=title, title_justify="left")
    for column in ("device", "unit", "decode ms/token", "tokens/s", f"TTFT ms ({e['prompt_len']})", "mJ/token", "memory MB / limit", "fits"):
        table.add_column(column)
    for device_id, p in report["projections"].items():
        entry, fit = p["by_prompt_len"][0], p["memory_fit"]
        table.add_row(device_id, p["unit"], f"{entry['decode_ms_per_token']:.2f}", _fmt(entry["tokens_per_s"], ".1f"), f"{entry['ttft_ms']:.0f}",
                      _fmt(entry["energy"]["decode_mj_per_token"], ".1f"), f"{fit['total_mb']:.0f} / {_fmt(fit['limit_mb'], '.0f')}",
                      "yes" if fit["fits"] else "NO" if fit["fits"] is False else "-")
    console = stdout_console()
    console.print(table)
    console.print(f"kind: estimated (no build, no measurement): decode at position {e['prompt_len'] + e['gen_len'] // 2} "
                  f"(prompt {e['prompt_len']} + half of {e['gen_len']} generated), projected from each device's figures for the unit "
                  "(`edgepack devices show ID`, docs/devices.md)" + (f"; written to {out}" if out else ""))
