"""`edgepack target qnn`: Qualcomm Hexagon NPU (HTP) through ONNX Runtime's QNN execution provider.

The export becomes static-shape graphs (decoders: a prefill graph of --prefill-len tokens and a
one-token decode graph over a fixed KV cache of --max-context slots; encoders: one graph of
--max-context tokens), quantized to QDQ with calibration from real text run through the model
(or left fp32 for the HTP's fp16 mode), compiled for the target SoC by the QNN HTP backend with CPU
fallback disabled, and saved as EP context binaries (`<graph>_ctx.onnx` + `.bin`) that load on a
device without recompiling. Every graph is then run on the HTP (the simulator on x86-64 Linux) and
compared with the fp32 export on CPU. target.json records nodes on HTP, compile seconds, parity,
the accuracy rescue and the QNN SDK the binaries were built with (a different SDK can refuse them).

Heavy libraries (onnx, onnxruntime, onnxruntime-qnn, transformers) are imported inside `build`.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from edgepack.errors import BadInputError, UsageError
from edgepack.options import FiniteFloatRange

SUMMARY = "Qualcomm Hexagon NPU (QNN HTP): static QDQ graphs, KV cache, context binaries, checked in the HTP simulator"
# Quantizes the fp32 export itself (QDQ for the HTP): `edgepack build` runs it once, on fp32.
USES_QUANTIZED_SOURCE = False
TARGET = "qnn"
PRECISIONS = ("w8a16", "w4a16", "w8a8", "fp16")
CONFIG_FILE = "qnn_config.json"
PREFIX_FILE = "prefix_kv.npz"
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model")
MIN_CALIBRATION_SAMPLES = 2
DEFAULT_CONTEXT = {"decoder": 256, "encoder": 128}
CALIBRATION_DECODE_STEPS = 4  # decode feeds per calibration window (the decode graph's activation ranges)
DEFAULT_MIN_TOP1 = 0.5  # decoders' parity floor without --min-top1
DEFAULT_MIN_COSINE = 0.9  # encoders' parity floor (min cosine of hidden states)


@dataclass(frozen=True)
class QnnConfig:
    soc_model: int | None = None
    htp_arch: int | None = None
    device: str | None = None
    precision: str = "w8a16"
    max_context: int | None = None  # decoders: KV-cache slots; encoders: sequence length
    prefill_len: int = 32
    calibration_text: Path | None = None
    calibration_samples: int = 8
    rescue: int = 8  # weights kept at 16 bits, most sensitive first (0: off)
    symmetric_activations: bool = False  # 16-bit activations: asymmetric ranges use the whole code range
    prefix: bool = True  # decoders: position 0 (BOS) computed in fp32 at build time, shipped as prefix_kv.npz
    range_margin: float | None = None  # widen calibrated activation ranges (None: 0.25 at 16 bits, 0 at 8 bits)
    eval_text: Path | None = None
    eval_windows: int = 2
    decode_steps: int = 4  # decode steps per evaluation window (after a full prefill)
    min_top1: float | None = None
    max_kl: float | None = None
    force: bool = False


def resolve_soc(config: QnnConfig) -> tuple[int, int, str]:
    """(soc_model, htp_arch, where they came from): --soc-model/--htp-arch win over the device profile."""
    soc, arch, origin = config.soc_model, config.htp_arch, "--soc-model/--htp-arch"
    if config.device:
        from edgepack.profiles.devices import get_device, load_devices

        device = get_device(config.device, load_devices())
        if soc is None:
            soc = device.value("qnn", "soc_model")
            origin = f"device profile {device.id} ({device.path.name})"
        if arch is None:
            arch = device.value("qnn", "htp_arch")
        if soc is None:
            raise UsageError(f"device {config.device} has no Qualcomm HTP soc_model in its profile ([qnn] soc_model); "
                             "pick a Snapdragon device or pass --soc-model and --htp-arch")
    if soc is None:
        raise UsageError("the QNN target needs the SoC to compile for: pass --device (e.g. galaxy-s24) or --soc-model and --htp-arch")
    if arch is None:
        raise UsageError(f"soc_model {soc} given without htp_arch: pass --htp-arch (e.g. 75 for Snapdragon 8 Gen 3)")
    if int(soc) < 1 or int(arch) < 1:
        # QNN takes any integer and falls back to a default SoC: a context binary for the wrong chip.
        raise UsageError(f"soc_model {soc} / htp_arch {arch} ({origin}): both must be positive, e.g. 57 and 75 for Snapdragon 8 Gen 3")
    return int(soc), int(arch), origin


def _check_config(config: QnnConfig) -> None:
    if config.precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}")
    if config.calibration_samples < MIN_CALIBRATION_SAMPLES:
        raise UsageError(f"--calibration-samples {config.calibration_samples}: at least {MIN_CALIBRATION_SAMPLES} "
                         "windows are needed for activation ranges that hold on other text")
    if config.prefill_len < 1 or config.eval_windows < 1 or config.decode_steps < 0 or config.rescue < 0:
        raise UsageError("--prefill-len and --eval-windows must be >= 1, --decode-steps and --rescue >= 0")


def _reference_decoder(model_dir, windows: list[list[int]], prefix: list[int] = ()):
    """fp32 logits of the export for each window, read after `prefix` (the attention-sink prefix the NPU graphs use)."""
    from edgepack.runtime.generate import DecoderSession
    from edgepack.runtime.session import create_session

    decoder = DecoderSession(create_session(model_dir.onnx_path), model_dir.config)
    return [decoder.forward(list(prefix) + list(window), decoder.empty_cache(), 0)[0][len(prefix):] for window in windows]


def attention_sink_prefix(tokenizer, enabled: bool) -> list[int]:
    """The token the NPU graphs find already cached at position 0 (see StaticDecoder.make_prefix): BOS."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return [int(bos)] if enabled and bos is not None else []


def _reference_encoder(model_dir, windows: list[list[int]]):
    import numpy as np

    from edgepack.runtime.session import create_session

    session = create_session(model_dir.onnx_path)
    names = {i.name for i in session.get_inputs()}
    out = []
    for window in windows:
        ids = np.array([window], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
                 "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None]}
        out.append(session.run(None, {k: v for k, v in feeds.items() if k in names})[0][0])
    return out


def phase_logit_figures(reference: list, candidate: list, prefill_len: int) -> dict:
    """Top-1, KL(fp32 || candidate) and max |logit diff| over every position, then split prefill/decode."""
    import numpy as np

    from edgepack.core.metrics import kl_per_position, kl_summary, log_softmax, max_abs_diff, top1_agreement, top1_figures

    def stats(pairs):
        ref = np.concatenate([r for r, _ in pairs]).astype(np.float64)
        cand = np.concatenate([c for _, c in pairs]).astype(np.float64)
        lp_ref = log_softmax(ref)
        return {"positions": int(ref.shape[0]), **top1_figures(lp_ref, top1_agreement(ref, cand)),
                **kl_summary(kl_per_position(lp_ref, log_softmax(cand)), p99=False), "max_abs_logit_diff": max_abs_diff(ref, cand)}

    n = [len(c) for c in candidate]
    figures = stats([(r[: len(c)], c) for r, c in zip(reference, candidate)])
    figures["prefill"] = stats([(r[:prefill_len], c[:prefill_len]) for r, c in zip(reference, candidate)])
    if min(n) > prefill_len:
        figures["decode"] = stats([(r[prefill_len : len(c)], c[prefill_len:]) for r, c in zip(reference, candidate)])
    return figures


def hidden_state_figures(reference: list, candidate: list) -> dict:
    """Cosine and max |diff| of per-token hidden states over every window."""
    import numpy as np

    from edgepack.core.metrics import cosine_per_position, max_abs_diff

    ref = np.concatenate(reference).astype(np.float64)
    cand = np.concatenate(candidate).astype(np.float64)
    cos = cosine_per_position(ref, cand)
    return {"positions": int(ref.shape[0]), "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "max_abs_diff": max_abs_diff(ref, cand)}


def build(directory: Path | str, out: Path | str, config: QnnConfig = QnnConfig(), on_status=None):
    import numpy as np

    from edgepack._quiet import quiet_libraries
    from edgepack.convert.export import tool_versions
    from edgepack.outputs import prepare_output, replace_dir, staging_dir
    from edgepack.quantize.calibration import DEFAULT_CALIBRATION_TEXT, DEFAULT_EVAL_TEXT, read_text
    from edgepack.runtime.model_dir import TEXT_GENERATION, load_model_dir
    from edgepack.runtime.session import create_session
    from edgepack.targets.base import TargetArtifact, write_target_json
    from edgepack.targets.qnn_support import ep as qnn_ep
    from edgepack.targets.qnn_support import quant
    from edgepack.core.windows import token_windows
    from edgepack.targets.qnn_support.static_model import StaticDecoder, StaticEncoder, prepare_graphs

    status = on_status or (lambda message: None)
    start = time.perf_counter()
    out = Path(out)
    _check_config(config)
    soc_model, htp_arch, soc_origin = resolve_soc(config)
    qnn_versions = qnn_ep.qnn_versions()  # exit 4 here, before any work, when onnxruntime-qnn is missing
    prepare_output(out, config.force)
    model_dir = load_model_dir(directory)
    if model_dir.onnx_path.suffix != ".onnx":
        raise BadInputError(f"{directory} holds no model.onnx (an .ort bundle cannot be re-targeted)")
    decoder = model_dir.task == TEXT_GENERATION
    kind = "decoder" if decoder else "encoder"
    max_positions = model_dir.config.get("max_position_embeddings") or model_dir.config.get("n_positions")
    max_context = config.max_context or DEFAULT_CONTEXT[kind]
    if max_positions:
        max_context = min(max_context, int(max_positions))
    if decoder and not config.prefill_len < max_context:
        raise UsageError(f"--prefill-len {config.prefill_len} must be smaller than --max-context {max_context}")
    htp = qnn_ep.HtpOptions(soc_model=soc_model, htp_arch=htp_arch, fp16=config.precision == "fp16")
    quiet_libraries()
    tokenizer = model_dir.load_tokenizer()
    seconds: dict = {}

    with staging_dir(out) as tmp:
        work = tmp / ".work"
        work.mkdir()
        status(f"fixing shapes ({'prefill ' + str(config.prefill_len) + ' + decode 1, ' if decoder else ''}context {max_context}) and folding constants")
        t0 = time.perf_counter()
        specs = prepare_graphs(model_dir.onnx_path, decoder, prefill_len=config.prefill_len, max_context=max_context, work=work)
        seconds["static_graphs"] = round(time.perf_counter() - t0, 3)
        cpu = {spec.name: create_session(spec.npu_path) for spec in specs}

        # Calibration windows from real text, run through the fp32 static graphs (real KV cache for decode).
        prefix, prefix_kv = [], {}
        calib_text, calib_origin = read_text(config.calibration_text, DEFAULT_CALIBRATION_TEXT)
        if decoder:
            window_len = config.prefill_len + CALIBRATION_DECODE_STEPS
            windows = token_windows(tokenizer, calib_text, window_len, config.calibration_samples, what="calibration")
            fp32_static = StaticDecoder(specs, cpu, max_context)
            prefix = attention_sink_prefix(tokenizer, config.prefix)
            if prefix:
                status(f"computing the attention-sink prefix (token {prefix}) in fp32")
                prefix_kv = fp32_static.make_prefix(prefix)
            status(f"calibrating on {len(windows)} windows of real text through the fp32 static graphs")
            feeds = fp32_static.calibration_feeds(windows, CALIBRATION_DECODE_STEPS)
        else:
            window_len = min(max_context, 64)
            windows = token_windows(tokenizer, calib_text, window_len, config.calibration_samples, what="calibration")
            fp32_static = StaticEncoder(specs[0], cpu["encoder"])
            feeds = {"encoder": [fp32_static.feeds(w) for w in windows]}

        # Evaluation windows and the fp32 reference (the dynamic export on CPU).
        eval_text, eval_origin = read_text(config.eval_text, DEFAULT_EVAL_TEXT)
        eval_len = config.prefill_len + config.decode_steps if decoder else min(max_context, 64)
        eval_windows = token_windows(tokenizer, eval_text, eval_len, config.eval_windows, what="evaluation")
        if decoder:
            reference = _reference_decoder(model_dir, eval_windows, prefix)
            static_out = [fp32_static.teacher_forced(w, config.decode_steps) for w in eval_windows]
            static_figures = phase_logit_figures(reference, static_out, config.prefill_len)
        else:
            reference = _reference_encoder(model_dir, eval_windows)
            static_out = [fp32_static.run(w) for w in eval_windows]
            static_figures = hidden_state_figures(reference, static_out)
        static_diff = static_figures.get("max_abs_logit_diff", static_figures.get("max_abs_diff"))

        # Accuracy rescue: which weights' quantization costs most, kept at 16 bits.
        sensitivities, keep16 = [], set()
        if config.precision != "fp16" and config.rescue > 0:
            status("measuring per-weight quantization sensitivity on CPU (accuracy rescue)")
            t0 = time.perf_counter()
            main = "prefill" if decoder else "encoder"
            output = "logits" if decoder else cpu["encoder"].get_outputs()[0].name
            sensitivities = quant.sensitivity(next(s.npu_path for s in specs if s.name == main), feeds[main][:4],
                                              config.precision, work, output=output)
            keep16 = {entry["tensor"] for entry in sensitivities[: config.rescue]}
            seconds["sensitivity"] = round(time.perf_counter() - t0, 3)

        margin = config.range_margin if config.range_margin is not None else (0.0 if config.precision == "w8a8" else 0.25)
        graphs, placements, quant_facts = {}, {}, {}
        sessions = {}
        for spec in specs:
            if config.precision == "fp16":
                model_path = spec.npu_path
                quant_facts[spec.name] = {"precision": "fp16", "quantized": False}
            else:
                status(f"quantizing the {spec.name} graph ({config.precision}, {len(feeds[spec.name])} calibration feeds)")
                model_path = work / f"{spec.name}.qdq.onnx"
                t0 = time.perf_counter()
                quant_facts[spec.name] = quant.quantize_qdq(spec.npu_path, model_path, feeds[spec.name], config.precision, keep16,
                                                               range_margin=margin, work=work,
                                                               activation_symmetric=config.symmetric_activations)
                seconds[f"quantize_{spec.name}"] = round(time.perf_counter() - t0, 3)
            status(f"compiling the {spec.name} graph for the HTP (soc_model {soc_model}, htp_arch {htp_arch}); CPU fallback disabled")
            context_path = tmp / f"{spec.name}_ctx.onnx"
            session, where, compile_s = qnn_ep.compile_on_htp(model_path, htp, context_path)
            seconds[f"compile_{spec.name}"] = round(compile_s, 3)
            placements[spec.name] = where
            binaries = sorted(p.name for p in tmp.glob(f"{spec.name}_ctx*.bin"))
            if not context_path.is_file() or not binaries:
                raise BadInputError(f"QNN wrote no context binary for the {spec.name} graph")
            # The context binary must reload and give exactly what the compiling session gives.
            status(f"reloading the {spec.name} context binary and comparing outputs")
            reloaded, reload_s = qnn_ep.load_context(context_path, htp)
            probe = feeds[spec.name][0]
            t0 = time.perf_counter()
            first = session.run(None, probe)
            seconds[f"run_{spec.name}"] = round(time.perf_counter() - t0, 3)
            second = reloaded.run(None, probe)
            identical = all(np.array_equal(a, b) for a, b in zip(first, second))
            del session
            sessions[spec.name] = reloaded
            if spec.host_path is not None:
                shutil.copy2(spec.host_path, tmp / spec.host_path.name)
            graphs[spec.name] = {
                "context_model": context_path.name, "context_binaries": binaries,
                "host_prep": spec.host_path.name if spec.host_path else None, "host_inputs": spec.host_inputs,
                "npu_inputs": {i.name: list(i.shape) for i in reloaded.get_inputs()},
                "npu_outputs": {o.name: list(o.shape) for o in reloaded.get_outputs()},
                "seq_len": spec.seq_len, "past_len": spec.past_len, "nodes_fp32": spec.nodes_fp32,
                "placement": where.to_json(), "compile_seconds": round(compile_s, 3), "reload_seconds": round(reload_s, 4),
                "reload_identical": identical, "surgery": spec.facts,
            }

        status("running the evaluation windows on the HTP and comparing with fp32")
        t0 = time.perf_counter()
        if decoder:
            htp_model = StaticDecoder(specs, sessions, max_context)
            htp_model.use_prefix(prefix, prefix_kv)
            candidate = [htp_model.teacher_forced(w, config.decode_steps) for w in eval_windows]
            parity = phase_logit_figures(reference, candidate, config.prefill_len)
        else:
            htp_model = StaticEncoder(specs[0], sessions["encoder"])
            candidate = [htp_model.run(w) for w in eval_windows]
            parity = hidden_state_figures(reference, candidate)
        seconds["evaluate_on_htp"] = round(time.perf_counter() - t0, 3)

        for name in SIDE_FILES:
            if (model_dir.folder / name).is_file():
                shutil.copy2(model_dir.folder / name, tmp / name)
        from edgepack.targets.qnn_support.graph import MASK_VALUE

        if prefix_kv:
            np.savez(tmp / PREFIX_FILE, **{name.replace(".", "_"): kv for name, kv in prefix_kv.items()})
        runtime_config = {
            "kind": kind, "max_context": max_context, "prefill_len": config.prefill_len if decoder else None,
            "prefix": {"token_ids": prefix, "kv_file": PREFIX_FILE,
                       "kv_names": {name.replace(".", "_"): name for name in prefix_kv},
                       "use": "copy each array into slots 0..len(token_ids)-1 of its cache; the prompt starts at position "
                              "len(token_ids) (position 0's massive activations stay out of the quantized graphs)"} if prefix_kv else None,
            "mask_value": MASK_VALUE, "graphs": {k: {key: v[key] for key in ("context_model", "context_binaries", "host_prep",
                                                                            "host_inputs", "npu_inputs", "npu_outputs", "seq_len", "past_len")}
                                                 for k, v in graphs.items()},
            "kv_cache": ("slot j holds position j; feed past_key_values[:, :, :past_len]; write present.* (this call's "
                         "keys/values) into slots position..position+n; attention_mask marks filled slots, then the new tokens") if decoder else None,
            "soc_model": soc_model, "htp_arch": htp_arch, "qnn_sdk": qnn_versions.get("qnn_sdk"),
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(runtime_config, indent=2) + "\n")
        shutil.rmtree(work)

        nodes_on = sum(p.nodes_on_htp for p in placements.values())
        nodes_total = sum(p.nodes_total for p in placements.values())
        gate = {}
        passed_parity = True
        if decoder:
            # A default floor, so that a binary that computes noise (top-1 near chance) can never pass
            # silently; --min-top1 replaces it.
            min_top1 = config.min_top1 if config.min_top1 is not None else DEFAULT_MIN_TOP1
            gate["min_top1"] = min_top1
            passed_parity &= parity["top1_agreement"] >= min_top1
            if config.max_kl is not None:
                gate["max_kl"] = config.max_kl
                passed_parity &= parity["kl_mean"] <= config.max_kl
        else:
            gate["min_cosine"] = DEFAULT_MIN_COSINE
            passed_parity &= parity["cosine_min"] >= DEFAULT_MIN_COSINE
        from edgepack.targets.tokenizer_check import check_tokenizer_files

        checks = {
            # The app's tokenizer (Hugging Face tokenizers' bindings) reads the shipped files: same ids as the source's.
            "tokenizer_files": check_tokenizer_files(tmp, tokenizer),
            "all_nodes_on_htp": {"nodes_on_htp": nodes_on, "nodes_total": nodes_total, "cpu_fallback": "disabled",
                                 "passed": nodes_on == nodes_total},
            "context_binary_reload": {"identical": all(g["reload_identical"] for g in graphs.values()),
                                      "reload_seconds": {k: g["reload_seconds"] for k, g in graphs.items()},
                                      "passed": all(g["reload_identical"] for g in graphs.values())},
            "static_graphs_vs_export": {"reference": "fp32 export on CPU", "candidate": "fp32 static graphs + host loop on CPU",
                                        "max_abs_diff": static_diff, "atol": 1e-3, "passed": static_diff <= 1e-3},
            "parity_vs_fp32": {"reference": "fp32 export on CPU (onnxruntime)", "candidate": f"{config.precision} context binaries on the QNN HTP",
                               "eval_text": eval_origin, "windows": len(eval_windows),
                               "prefill_len": config.prefill_len if decoder else None,
                               "decode_steps": config.decode_steps if decoder else None,
                               **parity, "gate": gate or None, "passed": bool(passed_parity)},
        }
        facts = {
            "format": "onnx-ep-context (QNN HTP context binary, embed mode 0)",
            "kind": kind, "precision": config.precision, "soc_model": soc_model, "htp_arch": htp_arch, "soc_from": soc_origin,
            "device": config.device, "max_context": max_context, "prefill_len": config.prefill_len if decoder else None,
            "nodes_on_htp": nodes_on, "nodes_total": nodes_total,
            "not_on_htp_by_op": {op: n for p in placements.values() for op, n in p.not_on_htp.items()},
            "compile_seconds": {k: g["compile_seconds"] for k, g in graphs.items()},
            "simulator_seconds_per_run": {k.removeprefix("run_"): v for k, v in seconds.items() if k.startswith("run_")},
            "weights_shared_between_graphs": False,
            "attention_sink_prefix": {"token_ids": prefix, "file": PREFIX_FILE, "computed": "fp32 static decode graph on CPU, at build time"}
            if prefix else None,
            "graphs": graphs,
            "quantization": quant_facts,
            "calibration": {"text": calib_origin, "windows": len(windows), "window_tokens": window_len,
                            "decode_steps_per_window": CALIBRATION_DECODE_STEPS if decoder else None,
                            "feeds": {k: len(v) for k, v in feeds.items()}},
            "rescue": {"kept_16bit": sorted(keep16), "requested": config.rescue,
                       "method": "each weight quantized alone in the fp32 prefill graph on CPU; score = mean KL vs fp32 (encoders: 1 - cosine)",
                       "sensitivity_top": sensitivities[:12]} if sensitivities else {"kept_16bit": [], "requested": config.rescue},
            "host": ("HTP simulator on x86-64: timings are not device latency" if platform.machine() in ("x86_64", "AMD64")
                     else f"{platform.system()} {platform.machine()}"),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        }
        versions = {**tool_versions(), **qnn_versions}
        seconds["total"] = round(time.perf_counter() - start, 3)
        artifact = TargetArtifact(out=out, target=TARGET, facts=facts, checks=checks,
                                  source={"dir": str(Path(directory).resolve()), "task": model_dir.task},
                                  versions=versions, seconds=seconds)
        sessions.clear()
        write_target_json(tmp, artifact)
        replace_dir(tmp, out)
    return artifact


@click.command("qnn")
@click.argument("directory", metavar="DIR", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Bundle folder.")
@click.option("--device", default=None, help="Device profile giving soc_model/htp_arch (e.g. galaxy-s24; see `edgepack devices`).")
@click.option("--soc-model", type=int, default=None, help="QNN soc_model (e.g. 57 = SM8650, Snapdragon 8 Gen 3); overrides --device.")
@click.option("--htp-arch", type=int, default=None, help="QNN htp_arch (e.g. 75 = Hexagon v75); overrides --device.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="w8a16", show_default=True,
              help="weights/activations: w8a16, w4a16, w8a8 (QDQ), or fp16 (HTP fp16 mode).")
@click.option("--max-context", type=click.IntRange(min=2), default=None,
              help="Decoders: KV-cache slots (default 256); encoders: sequence length (default 128). Capped by the model.")
@click.option("--prefill-len", type=click.IntRange(min=1), default=32, show_default=True, help="Tokens per prefill call (decoders).")
@click.option("--calibration-text", type=click.Path(path_type=Path), default=None, help="UTF-8 calibration text (default: bundled English text).")
@click.option("--calibration-samples", type=int, default=8, show_default=True, help="Calibration windows of real text.")
@click.option("--rescue", type=click.IntRange(min=0), default=8, show_default=True,
              help="Keep the N weights whose quantization costs most KL at 16 bits (0: off).")
@click.option("--range-margin", type=FiniteFloatRange(min=0), default=None,
              help="Widen calibrated activation ranges by this fraction of their span (default 0.25 at 16 bits, 0 at 8 bits).")
@click.option("--eval-text", type=click.Path(path_type=Path), default=None, help="UTF-8 text for parity (default: bundled English text).")
@click.option("--eval-windows", type=click.IntRange(min=1), default=2, show_default=True, help="Evaluation windows (prefill + decode steps each).")
@click.option("--decode-steps", type=click.IntRange(min=0), default=4, show_default=True, help="Teacher-forced decode steps per window.")
@click.option("--min-top1", type=FiniteFloatRange(0, 1), default=None,
              help="Gate: top-1 agreement with fp32 at least Y (exit 1; default floor 0.5, encoders: min cosine 0.9).")
@click.option("--max-kl", type=FiniteFloatRange(min=0), default=None, help="Gate: mean KL(fp32 || HTP) at most X (exit 1).")
@click.option("--symmetric-activations", is_flag=True,
              help="Quantize activations with symmetric ranges (default: asymmetric, twice the resolution for one-sided tensors).")
@click.option("--no-prefix", is_flag=True,
              help="Decoders: quantize position 0 too, instead of computing the BOS prefix in fp32 (prefix_kv.npz).")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
def command(directory, out, device, soc_model, htp_arch, precision, max_context, prefill_len, calibration_text,
            calibration_samples, rescue, range_margin, eval_text, eval_windows, decode_steps, min_top1, max_kl, symmetric_activations, no_prefix, force):
    """QNN HTP bundle: *_ctx.onnx + .bin context binaries, host_*.onnx, qnn_config.json, target.json.

    Needs onnxruntime-qnn (Linux x86-64 runs the HTP as a simulator; exit 4 without it).

    \b
    Example:
      edgepack target qnn build/smollm2 -o build/smollm2-qnn --device galaxy-s24
      edgepack target qnn build/smollm2 -o build/smollm2-qnn --soc-model 57 --htp-arch 75 --max-context 128 --prefill-len 32
      edgepack target qnn build/bert -o build/bert-qnn --device galaxy-s24 --precision w8a8
    """
    from edgepack.core.console import Status, report_target

    config = QnnConfig(soc_model=soc_model, htp_arch=htp_arch, device=device, precision=precision, max_context=max_context,
                       prefill_len=prefill_len, calibration_text=calibration_text, calibration_samples=calibration_samples,
                       rescue=rescue, range_margin=range_margin, eval_text=eval_text, eval_windows=eval_windows, decode_steps=decode_steps,
                       min_top1=min_top1, max_kl=max_kl, prefix=not no_prefix,
                       symmetric_activations=symmetric_activations, force=force)
    with Status(f"target qnn: {directory}") as status:
        artifact = build(directory, out, config, on_status=status)
    report_target(artifact)
