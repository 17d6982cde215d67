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
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from edgepack.core.files import copy_side_files
from edgepack.core.versions import MODEL_PACKAGES
from edgepack.errors import BadInputError, UsageError
from edgepack.options import click_options, config_from_cli, option

SUMMARY = "Qualcomm Hexagon NPU (QNN HTP): static QDQ graphs, KV cache, context binaries, checked in the HTP simulator"
# Quantizes the fp32 export itself (QDQ for the HTP): `edgepack build` runs it once, on fp32.
USES_QUANTIZED_SOURCE = False
TARGET = "qnn"
# Packages whose versions key this target's cached builds (`genai-builder:` the builder venv's, `qnn-sdk` the
# QNN SDK onnxruntime-qnn carries).
CACHE_PACKAGES = ("onnxruntime-qnn", "qnn-sdk", "onnxruntime-genai", *MODEL_PACKAGES)
PRECISIONS = ("w8a16", "w4a16", "w8a8", "fp16")
CONFIG_FILE = "qnn_config.json"
PREFIX_FILE = "prefix_kv.npz"
MIN_CALIBRATION_SAMPLES = 2
DEFAULT_CONTEXT = {"decoder": 256, "encoder": 128}
CALIBRATION_DECODE_STEPS = 4  # decode feeds per calibration window (the decode graph's activation ranges)
DEFAULT_MIN_TOP1 = 0.5  # decoders' parity floor without --min-top1
DEFAULT_MIN_COSINE = 0.9  # encoders' parity floor (min cosine of hidden states)
STATIC_ATOL = 1e-3  # fp32 static graphs + host loop vs the dynamic export: same arithmetic, reordered


@dataclass(frozen=True)
class QnnConfig:
    device: str | None = option(None, help="Device profile giving soc_model/htp_arch (e.g. galaxy-s24; see `edgepack devices`).")
    soc_model: int | None = option(None, help="QNN soc_model (e.g. 57 = SM8650, Snapdragon 8 Gen 3); overrides --device.")
    htp_arch: int | None = option(None, help="QNN htp_arch (e.g. 75 = Hexagon v75); overrides --device.")
    precision: str = option("w8a16", choices=PRECISIONS, help="weights/activations: w8a16, w4a16, w8a8 (QDQ), or fp16 (HTP fp16 mode).")
    max_context: int | None = option(None, min=2, unit="tokens",  # decoders: KV-cache slots; encoders: sequence length
                                     help="Decoders: KV-cache slots (default 256); encoders: sequence length (default 128). Capped by the model.")
    prefill_len: int = option(32, min=1, unit="tokens", help="Tokens per prefill call (decoders).")
    calibration_text: Path | None = option(None, help="UTF-8 calibration text (default: bundled English text).")
    # Checked in __post_init__, not as a click range: the error says why fewer windows do not work.
    calibration_samples: int = option(8, help="Calibration windows of real text.")
    rescue: int = option(8, min=0, help="Keep the N weights whose quantization costs most KL at 16 bits (0: off).")
    range_margin: float | None = option(None, min=0,  # None: 0.25 at 16 bits, 0 at 8 bits
                                        help="Widen calibrated activation ranges by this fraction of their span (default 0.25 at 16 bits, 0 at 8 bits).")
    eval_text: Path | None = option(None, help="UTF-8 text for parity (default: bundled English text).")
    eval_windows: int = option(2, min=1, help="Evaluation windows (prefill + decode steps each).")
    decode_steps: int = option(4, min=0, help="Teacher-forced decode steps per window.")
    min_top1: float | None = option(None, min=0, max=1,
                                    help="Gate: top-1 agreement with fp32 at least Y (exit 1; default floor 0.5, encoders: min cosine 0.9).")
    max_kl: float | None = option(None, min=0, help="Gate: mean KL(fp32 || HTP) at most X (exit 1).")
    symmetric_activations: bool = option(False, help="Quantize activations with symmetric ranges (default: asymmetric, twice the resolution for one-sided tensors).")
    share_weights: bool = option(True, cli="--no-share-weights",
                                 help="Decoders: ship one context binary holding the prefill and decode graphs with their weights once "
                                      "(runs on a device; the x86-64 HTP simulator cannot load it), instead of one binary per graph.")
    prefix: bool = option(True, cli="--no-prefix",
                          help="Decoders: quantize position 0 too, instead of computing the BOS prefix in fp32 (prefix_kv.npz).")
    force: bool = option(False, help="Replace a non-empty output folder.", in_recipe=False,
                         note="a bundle replaces its own previous output; --force is for a folder edgepack did not write")

    def __post_init__(self):
        _check_config(self)


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
    for flag, value in (("--soc-model", config.soc_model), ("--htp-arch", config.htp_arch)):
        if value is not None and value < 1:
            # QNN takes any integer and falls back to a default SoC: a context binary for the wrong chip.
            raise UsageError(f"{flag} {value}: must be positive, e.g. --soc-model 57 --htp-arch 75 for Snapdragon 8 Gen 3")


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


@dataclass
class _Source:
    """Step 1 (read source): the export, what kind of model it is, and the SoC to compile for."""

    model_dir: object  # ExportedModelDir
    decoder: bool
    kind: str  # "decoder" | "encoder"
    max_context: int
    soc_model: int
    htp_arch: int
    soc_origin: str
    qnn_versions: dict
    htp: object  # qnn_ep.HtpOptions
    tokenizer: object


@dataclass
class _Calibration:
    """Step 3 (calibrate): calibration feeds per graph, from real text run through the fp32 static graphs."""

    text_origin: str
    windows: list
    window_len: int
    feeds: dict  # graph name -> list of feeds
    fp32_static: object  # StaticDecoder | StaticEncoder over the CPU sessions
    prefix: list
    prefix_kv: dict


@dataclass
class _Reference:
    """Step 4: evaluation windows, the fp32 export's outputs on them, and the static graphs' difference."""

    text_origin: str
    windows: list
    outputs: list
    static_diff: float


@dataclass
class _Rescue:
    """Step 5 (accuracy rescue): weights whose quantization costs most, kept at 16 bits."""

    sensitivities: list
    keep16: set


@dataclass
class _Compiled:
    """Step 6 (quantize + compile): per graph its facts, HTP placement, quantization facts and reloaded session."""

    graphs: dict
    placements: dict
    quant_facts: dict
    sessions: dict
    shared: bool = False  # every graph in one context binary, identical weights stored once
    binary_bytes: int = 0


def _read_source(directory, out: Path, config: QnnConfig) -> _Source:
    from edgepack._quiet import quiet_libraries
    from edgepack.outputs import prepare_output
    from edgepack.runtime.model_dir import TEXT_GENERATION, load_model_dir
    from edgepack.targets.qnn_support import ep as qnn_ep

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
    if decoder:
        from edgepack.targets.architectures import check_decoder

        check_decoder(model_dir.config, max_context, TARGET)  # exit 3: a model_type outside the table, or a context above its sliding window
    if decoder and not config.prefill_len < max_context:
        raise UsageError(f"--prefill-len {config.prefill_len} must be smaller than --max-context {max_context}")
    htp = qnn_ep.HtpOptions(soc_model=soc_model, htp_arch=htp_arch, fp16=config.precision == "fp16")
    quiet_libraries()
    return _Source(model_dir, decoder, kind, max_context, soc_model, htp_arch, soc_origin, qnn_versions, htp,
                   model_dir.load_tokenizer())


def _calibrate(src: _Source, specs, cpu: dict, config: QnnConfig, status) -> _Calibration:
    from edgepack.core.texts import calibration_text
    from edgepack.core.windows import token_windows, vocab_size_of
    from edgepack.targets.qnn_support.static_model import StaticDecoder, StaticEncoder

    prefix, prefix_kv = [], {}
    text, origin = calibration_text(config.calibration_text)
    if src.decoder:
        window_len = config.prefill_len + CALIBRATION_DECODE_STEPS
        windows = token_windows(src.tokenizer, text, window_len, config.calibration_samples, what="calibration",
                                vocab_size=vocab_size_of(src.model_dir.config))
        fp32_static = StaticDecoder(specs, cpu, src.max_context)
        prefix = attention_sink_prefix(src.tokenizer, config.prefix)
        if prefix:
            status(f"computing the attention-sink prefix (token {prefix}) in fp32")
            prefix_kv = fp32_static.make_prefix(prefix)
        status(f"calibrating on {len(windows)} windows of real text through the fp32 static graphs")
        feeds = fp32_static.calibration_feeds(windows, CALIBRATION_DECODE_STEPS)
    else:
        window_len = min(src.max_context, 64)
        windows = token_windows(src.tokenizer, text, window_len, config.calibration_samples, what="calibration",
                                vocab_size=vocab_size_of(src.model_dir.config))
        fp32_static = StaticEncoder(specs[0], cpu["encoder"])
        feeds = {"encoder": [fp32_static.feeds(w) for w in windows]}
    return _Calibration(origin, windows, window_len, feeds, fp32_static, prefix, prefix_kv)


def _reference(src: _Source, config: QnnConfig) -> _Reference:
    """The fp32 reference: the dynamic export on CPU, alone in memory (its session is dropped on return)."""
    from edgepack.core.texts import eval_text
    from edgepack.core.windows import token_windows, vocab_size_of

    text, origin = eval_text(config.eval_text)
    length = config.prefill_len + config.decode_steps if src.decoder else min(src.max_context, 64)
    windows = token_windows(src.tokenizer, text, length, config.eval_windows, what="evaluation",
                            vocab_size=vocab_size_of(src.model_dir.config))
    if src.decoder:
        reference = _reference_decoder(src.model_dir, windows, attention_sink_prefix(src.tokenizer, config.prefix))
    else:
        reference = _reference_encoder(src.model_dir, windows)
    return _Reference(origin, windows, reference, float("nan"))


def _static_diff(src: _Source, calibration: _Calibration, reference: _Reference, config: QnnConfig) -> float:
    """The fp32 static graphs (+ host loop) on the evaluation windows against the export: must already match."""
    static = calibration.fp32_static
    if src.decoder:
        figures = phase_logit_figures(reference.outputs, [static.teacher_forced(w, config.decode_steps) for w in reference.windows],
                                      config.prefill_len)
    else:
        figures = hidden_state_figures(reference.outputs, [static.run(w) for w in reference.windows])
    return figures.get("max_abs_logit_diff", figures.get("max_abs_diff"))


def _rescue(src: _Source, specs, output: str, feeds: dict, config: QnnConfig, work: Path, seconds: dict, status) -> _Rescue:
    from edgepack.targets.base import timed
    from edgepack.targets.qnn_support import quant

    if config.precision == "fp16" or config.rescue <= 0:
        return _Rescue([], set())
    status("measuring per-weight quantization sensitivity on CPU (accuracy rescue)")
    with timed(seconds, "sensitivity"):
        main = "prefill" if src.decoder else "encoder"
        sensitivities = quant.sensitivity(next(s.npu_path for s in specs if s.name == main), feeds[main][:4],
                                          config.precision, work, output=output)
    return _Rescue(sensitivities, {entry["tensor"] for entry in sensitivities[: config.rescue]})


def _quantize(spec, feeds: list, keep16: set, config: QnnConfig, work: Path, seconds: dict, status) -> tuple[Path, dict]:
    """One graph to QDQ at config.precision (fp16 stays as is: the HTP's fp16 mode); returns (path, facts)."""
    from edgepack.targets.base import timed
    from edgepack.targets.qnn_support import quant

    if config.precision == "fp16":
        return spec.npu_path, {"precision": "fp16", "quantized": False}
    margin = config.range_margin if config.range_margin is not None else (0.0 if config.precision == "w8a8" else 0.25)
    status(f"quantizing the {spec.name} graph ({config.precision}, {len(feeds)} calibration feeds)")
    model_path = work / f"{spec.name}.qdq.onnx"
    with timed(seconds, f"quantize_{spec.name}"):
        facts = quant.quantize_qdq(spec.npu_path, model_path, feeds, config.precision, keep16, range_margin=margin, work=work,
                                   activation_symmetric=config.symmetric_activations)
    return model_path, facts


def _compile(spec, model_path: Path, probe: dict, src: _Source, folder: Path, tmp: Path, seconds: dict, status) -> tuple[dict, object, object]:
    """Compile one graph alone for the HTP into `folder`, reload its context binary and check both give the same outputs.

    Returns (graph facts, placement, the reloaded session as an `_OnDemand` that knows its outputs on the probe).
    One compiled graph is in memory at a time: the compiling session is dropped once it has run the probe."""
    import numpy as np

    from edgepack.targets.qnn_support import ep as qnn_ep

    status(f"compiling the {spec.name} graph for the HTP (soc_model {src.soc_model}, htp_arch {src.htp_arch}); CPU fallback disabled")
    context_path = folder / f"{spec.name}_ctx.onnx"
    session, where, compile_s = qnn_ep.compile_on_htp(model_path, src.htp, context_path)
    seconds[f"compile_{spec.name}"] = round(compile_s, 3)
    binaries = qnn_ep.context_binaries(context_path) if context_path.is_file() else []
    if not binaries or not all((folder / name).is_file() for name in binaries):
        raise BadInputError(f"QNN wrote no context binary for the {spec.name} graph")
    t0 = time.perf_counter()
    first = session.run(None, probe)
    seconds[f"run_{spec.name}"] = round(time.perf_counter() - t0, 3)
    del session
    # The context binary must reload and give exactly what the compiling session gives.
    status(f"reloading the {spec.name} context binary and comparing outputs")
    reloaded, reload_s = qnn_ep.load_context(context_path, src.htp)
    second = reloaded.run(None, probe)
    identical = all(np.array_equal(a, b) for a, b in zip(first, second))
    if spec.host_path is not None:
        shutil.copy2(spec.host_path, tmp / spec.host_path.name)
    facts = {
        "context_model": context_path.name, "context_binaries": binaries,
        "host_prep": spec.host_path.name if spec.host_path else None, "host_inputs": spec.host_inputs,
        "npu_inputs": {i.name: list(i.shape) for i in reloaded.get_inputs()},
        "npu_outputs": {o.name: list(o.shape) for o in reloaded.get_outputs()},
        "seq_len": spec.seq_len, "past_len": spec.past_len, "nodes_fp32": spec.nodes_fp32,
        "placement": where.to_json(), "compile_seconds": round(compile_s, 3), "reload_seconds": round(reload_s, 4),
        "reload_identical": identical, "surgery": spec.facts,
    }
    graph = _OnDemand(context_path, src.htp)
    graph.remember(probe, second, reloaded)
    return facts, where, graph


# Quantized graphs up to this size (QDQ model files, all graphs) compile into the shared binary while this process
# checks them one by one in the simulator: two compilers at once hold two copies of the weights. Larger ones
# compile one after the other.
OVERLAP_MAX_BYTES = 1 << 30


def _start_shared(specs, models: dict, src: _Source, tmp: Path, status):
    """Start compiling every graph into one context binary that stores identical weights once, in a child process.

    The graphs are the QDQ models that are also compiled alone for the x86-64 HTP simulator, which cannot load a
    weight-shared context binary (QNN_COMMON_ERROR_NOT_SUPPORTED; onnxruntime-qnn turns HTP weight sharing on for
    offline generation on x86-64), so the shipped binary runs on a device only."""
    from edgepack.targets.qnn_support import ep as qnn_ep

    status(f"compiling {' + '.join(s.name for s in specs)} into one context binary (weights stored once)")
    return qnn_ep.SharedCompile([(models[spec.name], tmp / f"{spec.name}_ctx.onnx") for spec in specs], src.htp)


def _finish_shared(pending, specs, compiled: _Compiled, tmp: Path, seconds: dict, memory: dict) -> None:
    """Wait for the shared compile and record its binary; its seconds and peak RSS are the child's own."""
    from edgepack.targets.qnn_support import ep as qnn_ep

    compile_s, rss = pending.result()
    seconds["compile_shared"] = round(compile_s, 3)
    memory["compile_shared"] = {**rss, "process": "child"}
    binaries = set()
    for spec in specs:
        graph = compiled.graphs[spec.name]
        graph["context_binaries"] = qnn_ep.context_binaries(tmp / graph["context_model"])
        binaries.update(graph["context_binaries"])
    if len(binaries) != 1 or not (tmp / next(iter(binaries))).is_file():
        raise BadInputError(f"QNN wrote {len(binaries)} context binaries for graphs compiled to share one: {sorted(binaries)}")
    compiled.shared = True
    compiled.binary_bytes = (tmp / next(iter(binaries))).stat().st_size


@dataclass
class _Finished:
    """A shared compile already waited for: what `SharedCompile.result` returned."""

    figures: tuple

    def result(self) -> tuple:
        return self.figures

    def cancel(self) -> None:
        pass


def _file_bytes(model_path: Path) -> int:
    """A model file and the external data files beside it that it names."""
    from edgepack.targets.qnn_support.quant import _external_bytes

    return model_path.stat().st_size + _external_bytes(model_path)


def _quantize_and_compile(src: _Source, specs, calibration: _Calibration, rescue: _Rescue, reference: _Reference, config: QnnConfig,
                          work: Path, tmp: Path, seconds: dict, status, step) -> tuple[_Compiled, object, dict]:
    """Quantize every graph, then compile, reload, compare and evaluate one graph at a time (`_check_on_htp`);
    decoders' graphs also go into one context binary, compiled in a child process meanwhile (returned pending:
    `_finish_shared` waits for it). Returns (compiled, pending, parity figures)."""
    compiled = _Compiled({}, {}, {}, {})
    share = len(specs) > 1 and config.share_weights
    folder = work / "simulator" if share else tmp  # shared: the per-graph binaries are only the simulator's
    folder.mkdir(exist_ok=True)
    models = {}
    for spec in specs:
        with step(f"quantize_{spec.name}", record_seconds=False):
            models[spec.name], compiled.quant_facts[spec.name] = _quantize(spec, calibration.feeds[spec.name], rescue.keep16, config,
                                                                           work, seconds, status)
    pending = None
    if share:
        pending = _start_shared(specs, models, src, tmp, status)
    try:
        if share and sum(_file_bytes(path) for path in models.values()) > OVERLAP_MAX_BYTES:
            pending = _Finished(pending.result())
        parity = _check_on_htp(src, specs, models, compiled, calibration, reference, config, folder, tmp, seconds, status, step)
    except BaseException:
        if pending is not None:
            pending.cancel()
        raise
    if not share:
        binaries = {name for graph in compiled.graphs.values() for name in graph["context_binaries"]}
        compiled.binary_bytes = sum((tmp / name).stat().st_size for name in binaries)
    return compiled, pending, parity


class _GraphIO:
    """A graph's inputs and outputs (names, shapes) read from its model file, as an onnxruntime session lists them."""

    def __init__(self, model_path: Path):
        import onnx

        graph = onnx.load(str(model_path), load_external_data=False).graph
        self._inputs = [_Arg(v.name, [d.dim_value for d in v.type.tensor_type.shape.dim]) for v in graph.input]
        self._outputs = [_Arg(v.name, [d.dim_value for d in v.type.tensor_type.shape.dim]) for v in graph.output]

    def get_inputs(self):
        return self._inputs

    def get_outputs(self):
        return self._outputs


class _OnDemand(_GraphIO):
    """A context model's HTP session, created on demand and dropped by `release`, so that one compiled graph
    at a time is in memory; its inputs and outputs (names, shapes) come from the context model itself.

    It keeps the outputs the session gave on the reload check's probe: the probe is the evaluation's first
    feed of the graph, and a simulator run of it is not repeated."""

    def __init__(self, context_path: Path, htp):
        super().__init__(context_path)
        self.path, self.htp, self.session = context_path, htp, None
        self._known: tuple | None = None

    def remember(self, feeds: dict, outputs: list, session) -> None:
        import numpy as np

        self._known = ({k: np.array(v, copy=True) for k, v in feeds.items()}, outputs)
        self.session = session

    def run(self, names, feeds):
        import numpy as np

        from edgepack.targets.qnn_support import ep as qnn_ep

        if names is None and self._known is not None:
            known, outputs = self._known
            if known.keys() == feeds.keys() and all(np.array_equal(known[k], feeds[k]) for k in known):
                return outputs
        if self.session is None:
            self.session, _ = qnn_ep.load_context(self.path, self.htp)
        return self.session.run(names, feeds)

    def release(self) -> None:
        self.session, self._known = None, None


@dataclass(frozen=True)
class _Arg:
    name: str
    shape: list


def _check_on_htp(src: _Source, specs, models: dict, compiled: _Compiled, calibration: _Calibration, reference: _Reference,
                  config: QnnConfig, folder: Path, tmp: Path, seconds: dict, status, step) -> dict:
    """Each graph compiled alone, reloaded and compared (`_compile`), then its part of the evaluation windows run
    through it on the HTP; returns the parity figures against the fp32 export.

    The reload check's probe is the evaluation's first feed of the graph, so the reloaded session's outputs
    on it are evaluation outputs too. Decoders run every window's prefill, then compile the decode graph (its
    probe is the first decode step after the HTP's own prefill) and run every window's decode steps (the same
    teacher-forced sequence per window as StaticDecoder.teacher_forced): one graph's session is in memory at a time."""
    import numpy as np

    from edgepack.targets.qnn_support.static_model import StaticDecoder, StaticEncoder

    by_name = {spec.name: spec for spec in specs}

    def compile_graph(name: str, probe: dict):
        with step(f"compile_{name}", record_seconds=False):
            compiled.graphs[name], compiled.placements[name], session = _compile(by_name[name], models[name], probe, src, folder,
                                                                                 tmp, seconds, status)
        compiled.sessions[name] = session
        return session

    def use(model, name: str, session) -> None:
        model.sessions[name] = session
        model.input_names[name] = {i.name for i in session.get_inputs()}
        model.output_names[name] = [o.name for o in session.get_outputs()]

    windows, prefill_len = reference.windows, config.prefill_len
    if src.decoder:
        htp_model = StaticDecoder(specs, {name: _GraphIO(models[name]) for name in by_name}, src.max_context)
        htp_model.use_prefix(calibration.prefix, calibration.prefix_kv)
        starts = [htp_model.start() for _ in windows]
        use(htp_model, "prefill", compile_graph("prefill", htp_model.feeds("prefill", windows[0][:prefill_len], *starts[0])))
        status("running the evaluation windows on the HTP and comparing with fp32")
        states = []
        with step("evaluate_on_htp"):
            for window, (cache, start) in zip(windows, starts):
                logits, cache = htp_model.run("prefill", window[:prefill_len], cache, start)
                states.append(([logits], cache, start + min(len(window), prefill_len)))
            htp_model.sessions["prefill"].release()
        steps = [window[prefill_len: prefill_len + config.decode_steps] for window in windows]
        first = next(((cache, position, tokens[0]) for (_, cache, position), tokens in zip(states, steps) if tokens), None)
        probe = htp_model.feeds("decode", [first[2]], first[0], first[1]) if first else calibration.feeds["decode"][0]
        use(htp_model, "decode", compile_graph("decode", probe))
        with step("evaluate_on_htp"):
            for (rows, cache, position), tokens in zip(states, steps):
                for token in tokens:
                    logits, cache = htp_model.run("decode", [token], cache, position)
                    rows.append(logits)
                    position += 1
            htp_model.sessions["decode"].release()
        candidate = [np.concatenate(rows, axis=0) for rows, _, _ in states]
        return phase_logit_figures(reference.outputs, candidate, prefill_len)
    htp_model = StaticEncoder(specs[0], _GraphIO(models["encoder"]))
    session = compile_graph("encoder", htp_model.feeds(windows[0]))
    htp_model.session, htp_model.input_names = session, {i.name for i in session.get_inputs()}
    status("running the evaluation windows on the HTP and comparing with fp32")
    with step("evaluate_on_htp"):
        figures = hidden_state_figures(reference.outputs, [htp_model.run(w) for w in windows])
        session.release()
    return figures


def _write_runtime_files(src: _Source, compiled: _Compiled, calibration: _Calibration, config: QnnConfig, tmp: Path) -> None:
    """Side files, the attention-sink prefix and qnn_config.json (what an app needs to run the graphs)."""
    import numpy as np

    from edgepack.targets.qnn_support.ep import SHARE_CONTEXTS
    from edgepack.targets.qnn_support.graph import MASK_VALUE

    copy_side_files(tmp, src.model_dir.folder)
    prefix, prefix_kv, decoder = calibration.prefix, calibration.prefix_kv, src.decoder
    if prefix_kv:
        np.savez(tmp / PREFIX_FILE, **{name.replace(".", "_"): kv for name, kv in prefix_kv.items()})
    runtime_config = {
        "kind": src.kind, "max_context": src.max_context, "prefill_len": config.prefill_len if decoder else None,
        "prefix": {"token_ids": prefix, "kv_file": PREFIX_FILE,
                   "kv_names": {name.replace(".", "_"): name for name in prefix_kv},
                   "use": "copy each array into slots 0..len(token_ids)-1 of its cache; the prompt starts at position "
                          "len(token_ids) (position 0's massive activations stay out of the quantized graphs)"} if prefix_kv else None,
        "mask_value": MASK_VALUE, "graphs": {k: {key: v[key] for key in ("context_model", "context_binaries", "host_prep",
                                                                        "host_inputs", "npu_inputs", "npu_outputs", "seq_len", "past_len")}
                                             for k, v in compiled.graphs.items()},
        "kv_cache": ("slot j holds position j; feed past_key_values[:, :, :past_len]; write present.* (this call's "
                     "keys/values) into slots position..position+n; attention_mask marks filled slots, then the new tokens") if decoder else None,
        "soc_model": src.soc_model, "htp_arch": src.htp_arch, "qnn_sdk": src.qnn_versions.get("qnn_sdk"),
        "weights_shared_between_graphs": compiled.shared,
        # An app creates every session of a shared context binary with these entries, so onnxruntime's QNN EP
        # holds one copy of the weights for all of its graphs.
        "session_config": dict(SHARE_CONTEXTS) if compiled.shared else {},
    }
    (tmp / CONFIG_FILE).write_text(json.dumps(runtime_config, indent=2) + "\n")


def qnn_gates(src: _Source, compiled: _Compiled, static_diff: float, parity: dict, tokenizer_check: dict,
              config: QnnConfig) -> list:
    """Every pass/fail decision of the QNN target, as gates named `<check>.<figure>`."""
    from edgepack.targets.base import check_gate, figure_gate, flag_gate

    nodes_on = sum(p.nodes_on_htp for p in compiled.placements.values())
    nodes_total = sum(p.nodes_total for p in compiled.placements.values())
    identical = all(g["reload_identical"] for g in compiled.graphs.values())
    gates = [
        check_gate(TARGET, "tokenizer_files", tokenizer_check),
        figure_gate(TARGET, "all_nodes_on_htp", "nodes_on_htp", nodes_on, nodes_total, "min", option="nodes_total"),
        flag_gate(TARGET, "context_binary_reload", "identical", identical,
                  "a reloaded context binary gives other outputs than the session that compiled it"),
        figure_gate(TARGET, "static_graphs_vs_export", "max_abs_diff", static_diff, STATIC_ATOL, "max", option="atol"),
    ]
    if src.decoder:
        # A default floor, so that a binary that computes noise can never pass silently; --min-top1 replaces it.
        min_top1 = config.min_top1 if config.min_top1 is not None else DEFAULT_MIN_TOP1
        gates.append(figure_gate(TARGET, "parity_vs_fp32", "top1_agreement", parity["top1_agreement"], min_top1, "min",
                                 option="--min-top1"))
        if config.max_kl is not None:
            gates.append(figure_gate(TARGET, "parity_vs_fp32", "kl_mean", parity["kl_mean"], config.max_kl, "max", option="--max-kl"))
    else:
        gates.append(figure_gate(TARGET, "parity_vs_fp32", "cosine_min", parity["cosine_min"], DEFAULT_MIN_COSINE, "min",
                                 option="min cosine"))
    return gates


def _checks(src: _Source, compiled: _Compiled, reference: _Reference, parity: dict, tmp: Path, config: QnnConfig) -> tuple[dict, list]:
    """target.json `checks` (figures) and the gates that decide them."""
    from edgepack.targets.base import verdict
    from edgepack.targets.tokenizer_check import check_tokenizer_files

    # The app's tokenizer (Hugging Face tokenizers' bindings) reads the shipped files: same ids as the source's.
    tokenizer_check = check_tokenizer_files(tmp, src.tokenizer)
    gates = qnn_gates(src, compiled, reference.static_diff, parity, tokenizer_check, config)
    nodes_on = sum(p.nodes_on_htp for p in compiled.placements.values())
    nodes_total = sum(p.nodes_total for p in compiled.placements.values())
    graphs, decoder = compiled.graphs, src.decoder
    limits = {gate.name.split(".", 1)[1]: gate.limit for gate in gates if gate.name.startswith("parity_vs_fp32.")}
    gate = {{"top1_agreement": "min_top1", "kl_mean": "max_kl", "cosine_min": "min_cosine"}[k]: v for k, v in limits.items()}
    checks = {
        "tokenizer_files": {**tokenizer_check, "passed": verdict(gates, "tokenizer_files")},
        "all_nodes_on_htp": {"nodes_on_htp": nodes_on, "nodes_total": nodes_total, "cpu_fallback": "disabled",
                             "passed": verdict(gates, "all_nodes_on_htp")},
        "context_binary_reload": {"identical": all(g["reload_identical"] for g in graphs.values()),
                                  "reload_seconds": {k: g["reload_seconds"] for k, g in graphs.items()},
                                  "passed": verdict(gates, "context_binary_reload")},
        "static_graphs_vs_export": {"reference": "fp32 export on CPU", "candidate": "fp32 static graphs + host loop on CPU",
                                    "max_abs_diff": reference.static_diff, "atol": STATIC_ATOL,
                                    "passed": verdict(gates, "static_graphs_vs_export")},
        "parity_vs_fp32": {"reference": "fp32 export on CPU (onnxruntime)", "candidate": f"{config.precision} context binaries on the QNN HTP",
                           "eval_text": reference.text_origin, "windows": len(reference.windows),
                           "prefill_len": config.prefill_len if decoder else None,
                           "decode_steps": config.decode_steps if decoder else None,
                           **parity, "gate": gate or None, "passed": verdict(gates, "parity_vs_fp32")},
    }
    return checks, gates


def _facts(src: _Source, compiled: _Compiled, calibration: _Calibration, rescue: _Rescue, seconds: dict, config: QnnConfig) -> dict:
    placements, graphs, decoder, prefix = compiled.placements, compiled.graphs, src.decoder, calibration.prefix
    return {
        "format": "onnx-ep-context (QNN HTP context binary, embed mode 0)",
        "kind": src.kind, "precision": config.precision, "soc_model": src.soc_model, "htp_arch": src.htp_arch, "soc_from": src.soc_origin,
        "device": config.device, "max_context": src.max_context, "prefill_len": config.prefill_len if decoder else None,
        "nodes_on_htp": sum(p.nodes_on_htp for p in placements.values()),
        "nodes_total": sum(p.nodes_total for p in placements.values()),
        "not_on_htp_by_op": {op: n for p in placements.values() for op, n in p.not_on_htp.items()},
        "compile_seconds": {k: g["compile_seconds"] for k, g in graphs.items()},
        "simulator_seconds_per_run": {k.removeprefix("run_"): v for k, v in seconds.items() if k.startswith("run_")},
        "weights_shared_between_graphs": compiled.shared,
        "context_binary_bytes": compiled.binary_bytes,
        "simulator_check": ("each graph compiled alone from the same QDQ model (the x86-64 HTP simulator cannot load a "
                            "weight-shared context binary); the shipped binary holds every graph, for a device") if compiled.shared
        else "the shipped context binaries",
        "attention_sink_prefix": {"token_ids": prefix, "file": PREFIX_FILE, "computed": "fp32 static decode graph on CPU, at build time"}
        if prefix else None,
        "graphs": graphs,
        "quantization": compiled.quant_facts,
        "calibration": {"text": calibration.text_origin, "windows": len(calibration.windows), "window_tokens": calibration.window_len,
                        "decode_steps_per_window": CALIBRATION_DECODE_STEPS if decoder else None,
                        "feeds": {k: len(v) for k, v in calibration.feeds.items()}},
        "rescue": {"kept_16bit": sorted(rescue.keep16), "requested": config.rescue,
                   "method": "each weight quantized alone in the fp32 prefill graph on CPU; score = mean KL vs fp32 (encoders: 1 - cosine)",
                   "sensitivity_top": rescue.sensitivities[:12]} if rescue.sensitivities else {"kept_16bit": [], "requested": config.rescue},
        "host": ("HTP simulator on x86-64: timings are not device latency" if platform.machine() in ("x86_64", "AMD64")
                 else f"{platform.system()} {platform.machine()}"),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
    }


def _proc_status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


class _Steps:
    """Wall seconds and resident memory of each build step: its peak (sampled every 20 ms by a thread; the
    kernel's own high-water mark covers the whole process) and what it leaves held, so the step that sets a
    build's peak, and what it keeps, can be read from target.json."""

    def __init__(self, seconds: dict):
        self.seconds, self.memory = seconds, {}

    @contextmanager
    def __call__(self, name: str, *, record_seconds: bool = True):
        import threading

        peak = [_proc_status_mb("VmRSS") or 0.0]
        done = threading.Event()

        def sample():
            while not done.wait(0.02):
                peak[0] = max(peak[0], _proc_status_mb("VmRSS") or 0.0)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            done.set()
            thread.join()
            from edgepack.core.allocator import return_freed_memory

            return_freed_memory()
        if record_seconds:  # a step run in several parts (evaluate_on_htp, graph by graph) adds them up
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 3)
        held = _proc_status_mb("VmRSS")
        if held is not None:
            before = self.memory.get(name, {}).get("peak", 0.0)
            self.memory[name] = {"peak": max(peak[0], held, before), "held_after": held}


def build(directory: Path | str, out: Path | str, config: QnnConfig = QnnConfig(), on_status=None):
    """read source -> static graphs -> calibrate -> fp32 reference -> rescue -> quantize + compile -> evaluate -> write."""
    from edgepack.core.versions import tool_versions
    from edgepack.outputs import replace_dir, staging_dir
    from edgepack.targets.base import TargetArtifact, write_target_json
    from edgepack.targets.qnn_support.static_model import cpu_sessions, prepare_graphs

    status = on_status or (lambda message: None)
    start = time.perf_counter()
    out = Path(out)
    src = _read_source(directory, out, config)
    seconds: dict = {}

    with staging_dir(out) as tmp:
        work = tmp / ".work"
        work.mkdir()
        step = _Steps(seconds)
        status(f"fixing shapes ({'prefill ' + str(config.prefill_len) + ' + decode 1, ' if src.decoder else ''}"
               f"context {src.max_context}) and folding constants")
        with step("static_graphs"):
            specs = prepare_graphs(src.model_dir.onnx_path, src.decoder, prefill_len=config.prefill_len,
                                   max_context=src.max_context, work=work)
        # One model in memory at a time where the steps allow it: the export for the reference, then both static
        # graphs (calibration runs prefill then decode), dropped before quantization.
        with step("reference"):
            reference = _reference(src, config)
        with step("calibrate"):
            cpu = cpu_sessions(specs)
            output = "logits" if src.decoder else cpu["encoder"].get_outputs()[0].name
            calibration = _calibrate(src, specs, cpu, config, status)
            reference.static_diff = _static_diff(src, calibration, reference, config)
            calibration.fp32_static = None
            del cpu
        with step("rescue"):
            rescue = _rescue(src, specs, output, calibration.feeds, config, work, seconds, status)
        with step("quantize_and_compile"):  # the evaluation on the HTP runs inside it, graph by graph (evaluate_on_htp)
            compiled, shared, parity = _quantize_and_compile(src, specs, calibration, rescue, reference, config, work, tmp, seconds,
                                                             status, step)
        if shared is not None:
            try:
                _finish_shared(shared, specs, compiled, tmp, seconds, step.memory)
            finally:
                shared.cancel()  # nothing left to end once it has finished; interrupted while waiting, it ends here
        _write_runtime_files(src, compiled, calibration, config, tmp)
        shutil.rmtree(work)

        checks, gates = _checks(src, compiled, reference, parity, tmp, config)
        facts = _facts(src, compiled, calibration, rescue, seconds, config)
        facts["memory_mb"] = step.memory
        seconds["total"] = round(time.perf_counter() - start, 3)
        artifact = TargetArtifact(out=out, target=TARGET, facts=facts, checks=checks,
                                  source={"dir": str(Path(directory).resolve()), "task": src.model_dir.task},
                                  versions={**tool_versions(), **src.qnn_versions}, seconds=seconds, gates=gates)
        compiled.sessions.clear()
        write_target_json(tmp, artifact)
        replace_dir(tmp, out)
    return artifact


@click.command("qnn")
@click.argument("directory", metavar="DIR", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Bundle folder.")
@click_options(QnnConfig)
def command(directory, out, **options):
    """QNN HTP bundle: *_ctx.onnx + .bin context binaries, host_*.onnx, qnn_config.json, target.json.

    Needs onnxruntime-qnn (Linux x86-64 runs the HTP as a simulator; exit 4 without it).

    \b
    Example:
      edgepack target qnn build/smollm2 -o build/smollm2-qnn --device galaxy-s24
      edgepack target qnn build/smollm2 -o build/smollm2-qnn --soc-model 57 --htp-arch 75 --max-context 128 --prefill-len 32
      edgepack target qnn build/bert -o build/bert-qnn --device galaxy-s24 --precision w8a8
    """
    from edgepack.core.console import Status, report_target

    config = config_from_cli(QnnConfig, options)
    with Status(f"target qnn: {directory}") as status:
        artifact = build(directory, out, config, on_status=status)
    report_target(artifact)
