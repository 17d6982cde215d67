"""`edgepack profile DIR`: measure latency, memory and energy here, project them onto device profiles.

Measured (this host, onnxruntime CPU, edgepack's own decoding loop): model load time, TTFT, prefill
tokens/s, decode ms/token p50/p95, tokens/s, peak RSS, energy (measured from a meter or estimated).
Projected (per --device): the same figures from the model's bytes/FLOPs per token and the device
profile (edgepack/profiles/roofline.py). Everything goes to profile.json (docs/profile-json.md).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgepack.errors import BadInputError, UsageError

PROFILE_SCHEMA_VERSION = 1
DEFAULT_DEVICES = ("iphone-15-pro", "pixel-8", "galaxy-s24", "raspberry-pi-5")
# Text the exact-length prompts are cut from: ordinary English so the token mix looks like real input.
PROMPT_TEXT = (
    "The history of the lighthouse is a history of engineering against the sea. Early towers burned wood "
    "or coal in open braziers; later ones used oil lamps with polished reflectors, and then the Fresnel lens, "
    "whose rings of glass bend scattered light into a single beam that can be seen for twenty miles. Keepers "
    "trimmed wicks, wound clockwork, and logged every passing ship in weather that kept everyone else indoors. "
)


@dataclass(frozen=True)
class ProfileConfig:
    devices: tuple[str, ...] = DEFAULT_DEVICES
    prompt_lens: tuple[int, ...] = (128, 512)
    gen_len: int = 64
    runs: int = 5
    warmup: int = 1
    threads: int | None = None
    cooldown_s: float = 0.0
    devices_dirs: tuple[Path, ...] = ()
    context: int | None = None  # memory fit context (default: the model's context, as `run` bounds it)
    rapl_root: Path | None = None  # tests point this at a fake powercap tree
    on: tuple[tuple[str, str], ...] = ()  # (name, ssh:// or adb: address): measure there too
    device_timeout_s: float = 600.0
    measure_here: bool = True  # False: only on the `on` devices (`profile --on`)
    reference: Path | None = None  # fp32 export the devices' parity is computed against (default: quantize.json source_dir)


@dataclass
class ProfileResult:
    out: Path | None
    report: dict = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100), numpy's default method, without numpy."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _stats_ms(seconds: list[float]) -> dict:
    ms = [1e3 * s for s in seconds]
    return {"p50": percentile(ms, 50), "p95": percentile(ms, 95), "min": min(ms), "max": max(ms),
            "mean": statistics.fmean(ms), "n": len(ms)}


def exact_prompt(tokenizer, length: int, vocab_size: int | None) -> list[int]:
    """`length` token ids cut from ordinary text (repeated as needed); no special tokens."""
    ids: list[int] = []
    if tokenizer is not None:
        from edgepack.core.windows import token_ids

        piece = token_ids(tokenizer, PROMPT_TEXT, special_tokens=False, vocab_size=vocab_size)
        if piece:
            while len(ids) < length:
                ids.extend(piece)
            return ids[:length]
    # No tokenizer: deterministic ids away from the special tokens at the start of most vocabularies.
    top = max(int(vocab_size or 32000) - 1, 20)
    return [10 + (i * 7919) % (top - 10) for i in range(length)]


class _TokenizerJson:
    """tokenizer.json through the `tokenizers` library: the ids of transformers' fast tokenizer for the same file,
    without importing transformers (and torch), which would dominate a fresh measuring process's start and memory."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(path))

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids}


def _prompt_tokenizer(model_dir):
    """What exact_prompt cuts prompts with; None when the folder has no usable tokenizer (ids alone then)."""
    path = model_dir.folder / "tokenizer.json"
    if path.is_file():
        try:
            return _TokenizerJson(path)
        except Exception:  # a file the tokenizers library cannot read: let transformers try the folder
            pass
    try:
        return model_dir.load_tokenizer()
    except BadInputError:
        return None


def peak_rss_mb() -> float:
    """This process's peak resident set. On Linux VmHWM, not getrusage's ru_maxrss: the kernel carries
    ru_maxrss across exec, so a freshly spawned measuring process would report its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6  # macOS: bytes, Linux: KiB


def _loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def host_conditions(threads: int | None) -> dict:
    import onnxruntime as ort

    from edgepack import __version__
    from edgepack.profiles.calibrate import host_description

    return {
        "host": host_description(),
        "platform": platform.platform(),
        "edgepack": __version__,
        "runtime": f"onnxruntime {ort.__version__}",
        "provider": "CPUExecutionProvider",
        "threads": threads,
        "threads_note": "onnxruntime intra-op threads; null = onnxruntime's default (one per physical core)",
    }


def profile_model(directory: Path | str, out: Path | str | None, config: ProfileConfig = ProfileConfig(), on_status=None) -> ProfileResult:
    """Measure DIR here, project it onto config.devices, write `out` (profile.json) when given."""
    from edgepack.outputs import check_output_file, write_output_file
    from edgepack.profiles.devices import get_device, load_devices
    from edgepack.profiles.energy import RAPL_ROOT, find_meter
    from edgepack.profiles.model_facts import model_facts
    from edgepack.runtime.model_dir import TEXT_GENERATION, load_model_dir

    status = on_status or (lambda message: None)
    _validate(config)
    if out is not None:
        check_output_file(out)  # before minutes of measuring
    devices = load_devices(list(config.devices_dirs))
    chosen = [get_device(d, devices) for d in config.devices]  # unknown ids fail before any measuring
    model_dir = load_model_dir(directory)
    if model_dir.task != TEXT_GENERATION:
        raise UsageError(f"{directory} holds a {model_dir.task} model; `edgepack profile` measures decoder exports")
    status("reading the graph")
    facts = model_facts(model_dir.onnx_path, model_dir.config)
    longest = max(config.prompt_lens) + config.gen_len
    model_context = model_dir.context_length  # the bundle's declared context, else the position limit (as `run`)
    if model_context and longest > model_context:
        raise UsageError(f"--prompt-len {max(config.prompt_lens)} + --gen-len {config.gen_len} = {longest} exceeds the model's context {model_context}")
    meter, meters = find_meter(config.rapl_root or RAPL_ROOT)

    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    host, measured_on = None, {}
    if config.on:  # measured on the devices themselves
        from edgepack.profiles.on_device import measure_on_devices

        measured_on = measure_on_devices(model_dir, facts, config, on_status=status)
    if config.measure_here:
        loadavg_before = _loadavg()
        host = _measure_host(model_dir, facts, config, meter, status)
        host["conditions"] = {
            **host_conditions(config.threads), "prompt_lens": list(config.prompt_lens), "gen_len": config.gen_len,
            "runs": config.runs, "warmup": config.warmup, "cooldown_s": config.cooldown_s,
            "loadavg_before": loadavg_before, "loadavg_after": _loadavg(), "started": started,
        }
        host["energy_meters"] = meters

    status("projecting")
    context = config.context or model_context or longest
    from edgepack.profiles.projection import project_device

    projections = {device.id: project_device(facts, device, config.prompt_lens, config.gen_len, context) for device in chosen}
    report = {
        "schema_version": PROFILE_SCHEMA_VERSION,
        "kind": "edgepack.profile",
        "model": {
            "dir": str(Path(directory).resolve()),
            "architecture": (model_dir.config.get("architectures") or [None])[0],
            "scheme": _scheme_label(model_dir.folder),
            "facts": facts.to_json(),
        },
        "quality": _quality(model_dir.folder),
        "host": host,
        **({"measured_on": measured_on} if measured_on else {}),
        "projections": projections,
    }
    if out is not None:
        write_output_file(out, json.dumps(report, indent=2) + "\n")
    return ProfileResult(out=Path(out) if out is not None else None, report=report)


def profile_in_fresh_process(directory: Path | str, out: Path | str | None, config: ProfileConfig = ProfileConfig()) -> ProfileResult:
    """`profile_model` in a new interpreter, so that peak RSS, load time and latencies are those of this model
    alone: a calling build process also holds exports, quantizers and other bundles in memory."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            report = pool.submit(_profile_child, str(directory), None if out is None else str(out), config).result()
    except BrokenProcessPool as exc:
        raise BadInputError(f"the process profiling {directory} died ({exc}); `edgepack profile {directory}` shows why") from None
    return ProfileResult(out=Path(out) if out is not None else None, report=report)


def _profile_child(directory: str, out: str | None, config: ProfileConfig) -> dict:
    return profile_model(directory, out, config).report


def _validate(config: ProfileConfig) -> None:
    if not config.prompt_lens or any(p < 1 for p in config.prompt_lens):
        raise UsageError("--prompt-len needs positive lengths, e.g. 128,512")
    if config.gen_len < 2:
        raise UsageError("--gen-len must be at least 2 (one prefill token and one decoded token)")
    if config.runs < 1 or config.warmup < 0 or config.cooldown_s < 0:
        raise UsageError("--runs must be >= 1, --warmup and --cooldown >= 0")


def _measure_host(model_dir, facts, config: ProfileConfig, meter, status) -> dict:
    status("loading the tokenizer")
    prompts = build_prompts(model_dir, config)
    return measure_prompts(model_dir, prompts, facts, config, meter, status)


def build_prompts(model_dir, config: ProfileConfig) -> dict[int, list[int]]:
    """prompt length -> exactly that many token ids, cut from ordinary text with the model's tokenizer."""
    tokenizer = _prompt_tokenizer(model_dir)
    vocab = model_dir.config.get("vocab_size")
    return {prompt_len: exact_prompt(tokenizer, prompt_len, vocab) for prompt_len in config.prompt_lens}


def measure_prompts(model_dir, prompts: dict[int, list[int]], facts, config: ProfileConfig, meter, status) -> dict:
    """The timed runs of each prompt: profile.json's host section. `facts` needs only `decode_bytes(position)`
    and `file_bytes`. Runs here, and on a device inside `edgepack.runners.probe` (no tokenizer there)."""
    decoder, load_s = _load_decoder(model_dir, config, status)
    threads_used = config.threads or os.cpu_count() or 1

    by_len = []
    for prompt_len, prompt in prompts.items():
        runs = _timed_runs(decoder, prompt, prompt_len, config, meter, status)
        ttft = _stats_ms(runs.ttfts)
        decode = _stats_ms(runs.steps)
        if meter is not None:
            energy = _measured_energy(meter, runs, prompt_len, config)
        else:
            energy = _estimated_energy(facts, ttft, decode, prompt_len, config, threads_used)
        by_len.append({
            "prompt_len": prompt_len,
            "gen_len": config.gen_len,
            "runs": config.runs,
            "ttft_ms": ttft,
            "prefill_tokens_per_s": prompt_len / (ttft["p50"] / 1e3),
            "decode_ms_per_token": decode,
            "tokens_per_s": 1e3 / decode["p50"],
            "energy": energy,
        })
    return {
        "kind": "measured",
        "load_seconds": load_s,
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_note": "peak resident set of the measuring process (VmHWM on Linux) including Python, the tokenizer and "
                         "onnxruntime; `edgepack build` measures each bundle in a fresh process",
        "pid": os.getpid(),
        "model_size_mb": facts.file_bytes / 1e6,
        "by_prompt_len": by_len,
    }


def _load_decoder(model_dir, config: ProfileConfig, status):
    """(DecoderSession, seconds the onnxruntime session took to load)."""
    from edgepack.runtime.generate import DecoderSession
    from edgepack.runtime.session import create_session

    status("loading the model")
    begin = time.perf_counter()
    try:
        session = create_session(model_dir.onnx_path, threads=config.threads)
    except Exception as exc:
        raise BadInputError(f"onnxruntime cannot load {model_dir.onnx_path}: {exc}") from exc
    decoder = DecoderSession(session, model_dir.config, share_kv_buffer=model_dir.share_kv_buffer)
    return decoder, time.perf_counter() - begin


@dataclass
class _Runs:
    """What the timed runs of one prompt length recorded."""

    ttfts: list[float] = field(default_factory=list)  # seconds, one per run
    steps: list[float] = field(default_factory=list)  # seconds per decoded token, all runs
    prefill_j: float = 0.0  # metered energy, summed over runs (0 without a meter)
    decode_j: float = 0.0


def _timed_runs(decoder, prompt, prompt_len: int, config: ProfileConfig, meter, status) -> _Runs:
    """Warmup, then `config.runs` generations of exactly gen_len tokens, metered when a meter is given."""
    from edgepack.runtime.generate import generate

    for i in range(config.warmup):
        status(f"prompt {prompt_len}: warmup {i + 1}/{config.warmup}")
        generate(decoder, prompt, max_new_tokens=config.gen_len)
    runs = _Runs()
    for i in range(config.runs):
        if config.cooldown_s and (i or config.warmup):
            time.sleep(config.cooldown_s)  # let clocks and temperature settle between runs
        status(f"prompt {prompt_len}: run {i + 1}/{config.runs}")
        marks = {}
        if meter is not None:
            meter.start()

        def on_token(_token, marks=marks):
            if "prefill_j" not in marks and meter is not None:
                marks["prefill_j"] = meter.read_j()

        # No EOS: exactly gen_len tokens every run, so runs are comparable.
        result = generate(decoder, prompt, max_new_tokens=config.gen_len, eos_token_ids=frozenset(), on_token=on_token)
        if meter is not None:
            total_j = meter.stop()
            runs.prefill_j += marks.get("prefill_j", 0.0)
            runs.decode_j += total_j - marks.get("prefill_j", 0.0)
        runs.ttfts.append(result.time_to_first_token_s)
        runs.steps.extend(result.step_seconds[1:])
    return runs


def _measured_energy(meter, runs: _Runs, prompt_len: int, config: ProfileConfig) -> dict:
    return {
        "kind": "measured",
        "meter": meter.name,
        "scope": meter.scope,
        "prefill_mj_per_token": 1e3 * runs.prefill_j / (prompt_len * config.runs),
        "decode_mj_per_token": 1e3 * runs.decode_j / max(len(runs.steps), 1),
        "basis": f"{meter.scope}: whole-package energy during the runs (includes anything else running)",
    }


def _estimated_energy(facts, ttft: dict, decode: dict, prompt_len: int, config: ProfileConfig, threads_used: int) -> dict:
    """Energy from the p50 times and the host power model, at the prompt's end and at the decode's mean position."""
    from edgepack.profiles.energy import HOST_DRAM_PJ_PER_BYTE, HOST_POWER_BASIS, HOST_WATTS_PER_ACTIVE_CORE, estimate_energy_mj

    mean_position = prompt_len + config.gen_len / 2
    prefill_mj = estimate_energy_mj(ttft["p50"] / 1e3, facts.decode_bytes(0), threads_used)
    decode_mj = estimate_energy_mj(decode["p50"] / 1e3, facts.decode_bytes(int(mean_position)), threads_used)
    return {
        "kind": "estimated",
        "meter": None,
        "prefill_mj_per_token": prefill_mj / prompt_len,
        "decode_mj_per_token": decode_mj,
        "basis": HOST_POWER_BASIS.format(watts_per_core=HOST_WATTS_PER_ACTIVE_CORE, threads=threads_used, pj=HOST_DRAM_PJ_PER_BYTE)
        + "; p50 times",
    }


def _read_quantize_report(folder: Path) -> dict | None:
    path = Path(folder) / "quantize.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _scheme_label(folder: Path) -> str:
    report = _read_quantize_report(folder)
    return (report or {}).get("scheme_label") or "fp32 (not quantized)"


def _quality(folder: Path) -> dict | None:
    """Quality figures from quantize.json (measured by `edgepack quantize` on this host), for max_kl / min_top1."""
    report = _read_quantize_report(folder)
    if report is None:
        return None
    quality = report.get("quality") or {}
    return {
        "kind": "measured",
        "source": str(Path(folder) / "quantize.json"),
        "kl_mean": quality.get("kl_mean"),
        "kl_p99": quality.get("kl_p99"),
        "top1_agreement": quality.get("top1_agreement"),
        "ppl": quality.get("ppl"),
        "ppl_reference": quality.get("ppl_reference"),
        "evaluated": bool(quality),
    }
