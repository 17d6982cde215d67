"""`adb:SERIAL`: an Android phone over adb, measured with onnxruntime's own perf tool.

A stock Android device has no Python, so the measuring program there is `onnxruntime_perf_test`, the
benchmark onnxruntime builds beside its Android library, at the onnxruntime version the bundle was built
with: `tools/ci_build/build.py --android --android_abi arm64-v8a --android_api 29 --build_shared_lib
--config Release` (with `--use_qnn --qnn_home QNN_SDK` for QNN bundles) of the onnxruntime release tag,
file `build/Android/Release/onnxruntime_perf_test` (docs/devices.md). Its path is given in
`EDGEPACK_ADB_PERF_TEST`; it is pushed once per content like the bundle.

Per prompt length the decoder runs twice through it: one call of `prompt` new tokens on an empty cache
(TTFT) and one call of one token after `prompt + gen/2` cached positions (decode), the graph's free
dimensions fixed with `-f` from the names the host reads in the graph. Energy comes from the battery's
current and voltage (`/sys/class/power_supply/battery/*`, microamperes and microvolts) when the phone is
discharging, else it is estimated and says why. The phone's SoC is `ro.soc.model` (Android 12 and later).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

from edgepack.errors import UsageError
from edgepack.runners.base import DeviceError, Runner

REMOTE_ROOT = "/data/local/tmp/edgepack"
PERF_TEST_ENV = "EDGEPACK_ADB_PERF_TEST"
BATTERY = "/sys/class/power_supply/battery"


def parse_serial(url: str) -> str:
    serial = url[len("adb:"):]
    if not url.startswith("adb:") or not serial or any(c.isspace() for c in serial):
        raise UsageError(f"{url!r} is not an Android device: write adb:SERIAL with a serial `adb devices` lists")
    return serial


def parse_devices(text: str) -> dict[str, dict]:
    """`adb devices -l` -> {serial: {"state": ..., key: value, ...}}."""
    found = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("List of devices", "*")):
            continue
        parts = line.split()
        entry = {"state": parts[1] if len(parts) > 1 else "unknown"}
        entry.update(part.split(":", 1) for part in parts[2:] if ":" in part)
        found[parts[0]] = entry
    return found


def parse_getprop(text: str) -> dict[str, str]:
    """`adb shell getprop` -> {property: value}."""
    return {m.group(1): m.group(2) for m in re.finditer(r"^\[([^\]]+)\]: \[(.*)\]\s*$", text, flags=re.M)}


_PERF_LINES = {
    "session_creation_s": r"Session creation time cost:\s*([\d.eE+-]+)\s*s",
    "first_inference_ms": r"First inference time cost:\s*([\d.eE+-]+)\s*ms",
    "requests": r"Total inference requests:\s*(\d+)",
    "average_ms": r"Average inference time cost(?: total)?:\s*([\d.eE+-]+)\s*ms",  # "total" since onnxruntime 1.23
    "peak_working_set_bytes": r"Peak working set size:\s*(\d+)\s*bytes",
    "min_s": r"Min Latency:\s*([\d.eE+-]+)\s*s",
    "max_s": r"Max Latency:\s*([\d.eE+-]+)\s*s",
    "p50_s": r"P50 Latency:\s*([\d.eE+-]+)\s*s",
    "p95_s": r"P95 Latency:\s*([\d.eE+-]+)\s*s",
}


def parse_perf_test(text: str) -> dict:
    """The figures onnxruntime_perf_test prints; DeviceError naming what is missing when it printed no latency."""
    found = {}
    for key, pattern in _PERF_LINES.items():
        match = re.search(pattern, text)
        if match:
            found[key] = float(match.group(1)) if key != "requests" else int(match.group(1))
    if "average_ms" not in found and "p50_s" not in found:
        tail = (text.strip().splitlines() or ["no output"])[-1]
        raise DeviceError(f"onnxruntime_perf_test printed no latency ({tail[:200]})")
    return found


def latency_ms(perf: dict) -> dict:
    """profile.json's {p50, p95, min, max, mean, n} in ms from one perf_test run."""
    mean = perf.get("average_ms")
    p50 = perf["p50_s"] * 1e3 if "p50_s" in perf else mean
    return {"p50": p50, "p95": perf["p95_s"] * 1e3 if "p95_s" in perf else p50, "min": perf.get("min_s", p50 / 1e3) * 1e3,
            "max": perf.get("max_s", p50 / 1e3) * 1e3, "mean": mean if mean is not None else p50, "n": int(perf.get("requests") or 0)}


def battery_watts(current_now: str, voltage_now: str, status: str) -> tuple[float | None, str]:
    """(watts drawn from the battery, how) from the power_supply files: current in uA, voltage in uV. Vendors differ in
    the current's sign; its magnitude is the draw. None while charging: the charger, not the phone, supplies power."""
    status = status.strip()
    if status != "Discharging":
        return None, f"battery status {status or 'unknown'}: unplug the phone from charging power to measure energy"
    try:
        watts = abs(int(current_now.strip())) * 1e-6 * int(voltage_now.strip()) * 1e-6
    except ValueError:
        return None, "battery current/voltage not readable"
    return watts, "battery current_now x voltage_now (whole phone, screen included)"


def free_dimensions(inputs: list[tuple[str, list]], batch: int, new: int, past: int) -> dict[str, int]:
    """Values for the graph's named dimensions on one call of `new` tokens after `past` cached ones (perf_test -f)."""
    values = {}
    for _name, dims in inputs:
        for dim in dims:
            if not isinstance(dim, str) or dim in values:
                continue
            lowered = dim.lower()
            if "batch" in lowered:
                values[dim] = batch
            elif "past" in lowered and ("+" in lowered or "total" in lowered):
                values[dim] = past + new
            elif "total" in lowered or "+" in lowered or "attention_mask" in lowered:
                values[dim] = past + new
            elif "past" in lowered:
                values[dim] = past
            else:
                values[dim] = new
    return values


class AdbRunner(Runner):
    def __init__(self, url: str, timeout: float = 600.0):
        self.url = url
        self.timeout = timeout
        self.serial = parse_serial(url)

    def command(self, *args: str) -> list[str]:
        return ["adb", "-s", self.serial, *args]

    def _adb(self, args: list[str], *, stdin: bytes | None = None, timeout: float | None = None) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(self.command(*args), input=stdin if stdin is not None else b"", capture_output=True,
                                  timeout=timeout or self.timeout)
        except FileNotFoundError as exc:
            raise DeviceError(f"device {self.url}: no `adb` on this host (Android platform-tools; Debian: apt install adb)") from exc
        except subprocess.TimeoutExpired as exc:
            raise DeviceError(f"device {self.url}: no answer within {timeout or self.timeout:g} s ({args[0]})") from exc

    def run(self, argv: list[str], *, stdin: bytes | None = None, timeout: float | None = None, check: bool = True) -> bytes:
        done = self._adb(["shell", shlex.join(argv)], stdin=stdin, timeout=timeout)
        error = done.stderr.decode(errors="replace").strip()
        if error.startswith(("error: device", "adb: device", "error: no devices")) or "device offline" in error:
            raise DeviceError(f"device {self.url}: {error.splitlines()[-1][:200]}")
        if check and done.returncode != 0:
            raise DeviceError(f"device {self.url}: `{argv[0]}` failed there ({(error.splitlines() or [f'exit status {done.returncode}'])[-1][:200]})")
        return done.stdout

    def home(self) -> str:
        return "/data/local/tmp"

    def root(self) -> str:
        return REMOTE_ROOT

    def upload_tree(self, folder: Path, remote: str) -> None:
        tmp = f"{remote}.tmp-{os.getpid()}"
        self.run(["rm", "-rf", tmp])
        self.run(["mkdir", "-p", tmp])
        done = self._adb(["push", f"{folder}/.", tmp])
        if done.returncode != 0:
            raise DeviceError(f"device {self.url}: adb push failed ({(done.stderr.decode(errors='replace').strip().splitlines() or ['?'])[-1][:200]})")
        self.run(["sh", "-c", f"touch {shlex.quote(tmp)}/.complete && rm -rf {shlex.quote(remote)} && mv {shlex.quote(tmp)} {shlex.quote(remote)}"])

    def identity(self) -> dict:
        props = parse_getprop(self.run(["getprop"]).decode(errors="replace"))
        meminfo = self.run(["cat", "/proc/meminfo"], check=False).decode(errors="replace")
        ram = re.search(r"MemTotal:\s*(\d+)", meminfo)
        cores = self.run(["sh", "-c", "grep -c ^processor /proc/cpuinfo"], check=False).decode().strip()
        return identity_from_props(props, ram_kb=int(ram.group(1)) if ram else None, cores=int(cores) if cores.isdigit() else None)

    def battery(self) -> tuple[float | None, str]:
        values = [self.run(["cat", f"{BATTERY}/{name}"], check=False).decode(errors="replace") for name in ("current_now", "voltage_now", "status")]
        return battery_watts(*values)


def identity_from_props(props: dict, *, ram_kb: int | None, cores: int | None) -> dict:
    soc = " ".join(v for v in (props.get("ro.soc.manufacturer"), props.get("ro.soc.model")) if v) or props.get("ro.board.platform")
    return {"hostname": props.get("ro.product.model"), "os": f"Android {props.get('ro.build.version.release')} (SDK {props.get('ro.build.version.sdk')})",
            "system": "Android", "machine": props.get("ro.product.cpu.abi"),
            "model": " ".join(v for v in (props.get("ro.product.manufacturer"), props.get("ro.product.model")) if v) or None,
            "cpu": soc, "soc": soc, "cores": cores, "ram_mb": round(ram_kb / 1024) if ram_kb else None, "runtimes": {}}


def perf_test_command(binary: str, model: str, dims: dict[str, int], *, runs: int, threads: int | None, provider: str = "cpu") -> list[str]:
    """onnxruntime_perf_test timing `runs` calls of `model` with its free dimensions fixed (-f name:value)."""
    command = [binary, "-e", provider, "-m", "times", "-r", str(runs)]
    if threads:
        command += ["-x", str(threads)]
    for name, value in dims.items():
        command += ["-f", f"{name}:{value}"]
    return command + [model]


def graph_inputs(onnx_path: Path) -> list[tuple[str, list]]:
    """(name, [dim value or dim name]) of a model's inputs, read on the host (the .ort format: from its graph)."""
    if onnx_path.suffix == ".ort":
        from edgepack.profiles.ort_format import read_ort_graph

        graph = read_ort_graph(onnx_path).graph
    else:
        import onnx

        graph = onnx.load(str(onnx_path), load_external_data=False).graph
    out = []
    for value in graph.input:
        dims = [d.dim_param if d.dim_param else d.dim_value for d in value.type.tensor_type.shape.dim]
        out.append((value.name, dims))
    return out


def measure_android(runner: AdbRunner, model_dir, facts, prompts: dict[int, list[int]], config, *, binary: Path | None = None) -> dict:
    """profile.json's measured section for an Android phone: perf_test runs of the prefill and decode calls."""
    import hashlib
    import shutil

    from edgepack.profiles.on_device import cache_dir

    path = binary or (Path(os.environ[PERF_TEST_ENV]) if os.environ.get(PERF_TEST_ENV) else None)
    if path is None or not path.is_file():
        raise DeviceError(f"device {runner.url}: no measuring binary: set {PERF_TEST_ENV} to onnxruntime_perf_test built for Android "
                          "at this onnxruntime version (docs/devices.md, Measuring on a device)")
    tools = cache_dir() / "adb-tools" / hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    if not (tools / "onnxruntime_perf_test").is_file():
        tools.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, tools / "onnxruntime_perf_test")
    remote_tools, _ = runner.ensure_tree(tools, "tools")
    perf = f"{remote_tools}/onnxruntime_perf_test"
    runner.run(["chmod", "755", perf])
    remote, copied = runner.ensure_tree(model_dir.folder, "bundles")
    model = f"{remote}/{model_dir.onnx_path.name}"
    inputs = graph_inputs(model_dir.onnx_path)
    by_len, peaks, loads = [], [], []
    for prompt_len in prompts:
        runs = {}
        for call, (new, past, count) in {"prefill": (prompt_len, 0, config.runs), "decode": (1, prompt_len + config.gen_len // 2, config.runs * config.gen_len)}.items():
            before = runner.battery()
            output = runner.run(perf_test_command(perf, model, free_dimensions(inputs, 1, new, past), runs=count, threads=config.threads),
                                check=False).decode(errors="replace")
            try:
                runs[call] = parse_perf_test(output)
            except DeviceError as exc:
                raise DeviceError(f"device {runner.url}: {exc}") from None
            after = runner.battery()
            runs[call + "_watts"] = (before, after)
        ttft, decode = latency_ms(runs["prefill"]), latency_ms(runs["decode"])
        peaks += [runs[c].get("peak_working_set_bytes") or 0 for c in ("prefill", "decode")]
        loads.append(runs["decode"].get("session_creation_s"))
        watts = [w for w, _how in runs["decode_watts"] if w is not None]
        how = runs["decode_watts"][0][1]
        energy = {"kind": "measured", "meter": "battery", "scope": how, "prefill_mj_per_token": None,
                  "decode_mj_per_token": sum(watts) / len(watts) * decode["p50"], "basis": f"{how}, mean of readings before and after the decode run"} \
            if len(watts) == 2 else {"kind": "missing", "meter": None, "prefill_mj_per_token": None, "decode_mj_per_token": None, "basis": how}
        by_len.append({"prompt_len": prompt_len, "gen_len": config.gen_len, "runs": config.runs, "ttft_ms": ttft,
                       "prefill_tokens_per_s": prompt_len / (ttft["p50"] / 1e3), "decode_ms_per_token": decode,
                       "tokens_per_s": 1e3 / decode["p50"], "energy": energy})
    return {"kind": "measured", "load_seconds": next((x for x in loads if x is not None), None), "peak_rss_mb": max(peaks) / 1e6,
            "peak_rss_note": "onnxruntime_perf_test's peak working set", "model_size_mb": facts.file_bytes / 1e6, "by_prompt_len": by_len,
            "conditions": {"runtime": "onnxruntime_perf_test", "provider": "CPUExecutionProvider", "threads": config.threads, "runs": config.runs,
                           "warmup": 0, "loadavg_before": None, "loadavg_after": None,
                           "method": "one perf_test run per call shape: the prompt on an empty cache (TTFT), one token after "
                                     "prompt + gen/2 cached positions (decode); inputs are perf_test's random data"},
            "bundle_copied": copied,
            "parity": None, "parity_note": "onnxruntime_perf_test returns no logits: parity on an Android phone needs the app's runtime"}
