"""The measuring program edgepack runs on a device: `python edgepack-probe.pyz COMMAND REQUEST.json`.

Shipped as a zip of the edgepack package itself (`edgepack.runners.base.probe_archive`), so a device
times a bundle with the very loop `edgepack profile` times it with here (edgepack/runtime/generate.py),
needing only Python, numpy and onnxruntime there (onnx as well for `calibrate`). It reads one request,
writes one line `EDGEPACK-RESULT <json>` on stdout and nothing else there; errors become a result
with `error` set, never a traceback the host would have to parse.

Commands:
  identity   the device: hostname, OS, machine, CPU, cores, RAM, Python and runtime versions
  measure    load time, TTFT, decode ms/token p50/p95, peak RSS, energy for each prompt of the request,
             then the logits of each evaluation window (written to an .npz beside the request)
  calibrate  `edgepack devices calibrate` on the device: the device file's text
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

RESULT_MARK = "EDGEPACK-RESULT "


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return None


def identity() -> dict:
    """What the device is and what it runs, from files every Linux has (and platform elsewhere)."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = _read("/proc/cpuinfo") or ""
    for line in cpuinfo.splitlines():
        key = line.split(":", 1)[0].strip().lower()
        if key in ("model name", "hardware", "cpu model") and ":" in line:
            cpu = line.split(":", 1)[1].strip()
            break
    model = (_read("/proc/device-tree/model") or "").strip("\x00\n ") or None
    ram_mb = None
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            ram_mb = int(line.split()[1]) / 1024
    if ram_mb is None and hasattr(os, "sysconf"):
        try:
            ram_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
        except (ValueError, OSError):
            pass
    runtimes = {"python": platform.python_version()}
    for name in ("numpy", "onnxruntime", "onnx", "onnxruntime_genai", "coremltools"):
        try:
            module = __import__(name)
            runtimes[name.replace("_", "-")] = getattr(module, "__version__", "unknown")
        except Exception:  # absent or broken: the host decides whether it is needed
            runtimes[name.replace("_", "-")] = None
    return {"hostname": platform.node(), "os": platform.platform(), "system": platform.system(), "machine": platform.machine(),
            "model": model, "cpu": cpu, "cores": os.cpu_count(), "ram_mb": round(ram_mb) if ram_mb else None, "runtimes": runtimes}


class _Bytes:
    """What the estimated energy needs of ModelFacts, sent by the host (the device has no onnx to read the graph)."""

    def __init__(self, weight_bytes_per_token: int, kv_bytes_per_position: int, file_bytes: int):
        self.weight_bytes_per_token, self.kv_bytes_per_position, self.file_bytes = weight_bytes_per_token, kv_bytes_per_position, file_bytes

    def decode_bytes(self, position: int) -> int:
        return self.weight_bytes_per_token + self.kv_bytes_per_position * position


def measure(request: dict, folder: Path) -> dict:
    import numpy as np

    from edgepack.profiles.energy import RAPL_ROOT, find_meter
    from edgepack.profiles.measure import ProfileConfig, _loadavg, host_conditions, measure_prompts
    from edgepack.runtime.model_dir import load_model_dir

    config = ProfileConfig(devices=(), prompt_lens=tuple(int(k) for k in request["prompts"]), gen_len=request["gen_len"],
                           runs=request["runs"], warmup=request["warmup"], threads=request.get("threads"),
                           cooldown_s=request.get("cooldown_s", 0.0))
    model_dir = load_model_dir(request["bundle"])
    meter, meters = find_meter(RAPL_ROOT)
    facts = _Bytes(**request["facts"])
    loadavg = _loadavg()
    prompts = {int(k): v for k, v in request["prompts"].items()}
    section = measure_prompts(model_dir, prompts, facts, config, meter, lambda message: None)
    section["conditions"] = {**host_conditions(config.threads), "prompt_lens": list(config.prompt_lens), "gen_len": config.gen_len,
                             "runs": config.runs, "warmup": config.warmup, "loadavg_before": loadavg, "loadavg_after": _loadavg()}
    section["energy_meters"] = meters
    windows = request.get("windows") or []
    if windows:
        np.savez(folder / "logits.npz", **window_logits(model_dir, windows, config.threads))
        section["logits_file"] = str(folder / "logits.npz")
    return section


def window_logits(model_dir, windows: list[list[int]], threads: int | None = None) -> dict:
    """{window_i: logits [positions, vocab]} of each token window, each prefilled from an empty cache: the same
    computation on the device and here, so their parity figures compare."""
    import numpy as np

    from edgepack.runtime.generate import DecoderSession
    from edgepack.runtime.session import create_session

    session = create_session(model_dir.onnx_path, threads=threads)
    decoder = DecoderSession(session, model_dir.config, share_kv_buffer=model_dir.share_kv_buffer)
    logits = {}
    for index, window in enumerate(windows):
        cache = decoder.empty_cache(capacity=len(window)) if decoder.share_kv_buffer else decoder.empty_cache()
        out, _ = decoder.forward(window, cache, 0)
        logits[f"window_{index}"] = np.asarray(out, dtype=np.float32)
    return logits


def calibrate(request: dict, folder: Path) -> dict:
    from edgepack.profiles.calibrate import CalibrateConfig, calibrate_host

    out = folder / "device.toml"
    config = CalibrateConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in request["config"].items()})
    result = calibrate_host(out, config)
    return {"toml": out.read_text(), "seconds": result.seconds}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command, request_path = (argv + ["", ""])[:2]
    try:
        request = json.loads(Path(request_path).read_text()) if request_path else {}
        folder = Path(request_path).parent if request_path else Path.cwd()
        if command == "identity":
            result = identity()
        elif command == "measure":
            result = {"identity": identity(), "measured": measure(request, folder)}
        elif command == "calibrate":
            result = {"identity": identity(), **calibrate(request, folder)}
        else:
            result = {"error": f"unknown probe command {command!r}"}
    except ModuleNotFoundError as exc:
        result = {"error": f"missing on the device: {exc.name} (run `edgepack devices prepare` for this device)", "missing": exc.name}
    except Exception as exc:  # reported to the host as one line; the host raises it as a device error
        result = {"error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
