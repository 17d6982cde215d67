"""`edgepack quantize`: apply a scheme to an fp32 export, measure its price, gate on it.

One entry point, `quantize_model(directory, out, config) -> QuantizedModel`. The output folder is a
complete, runnable export (model.onnx + tokenizer + configs) plus `quantize.json`; it is built in a
temporary sibling and renamed into place when complete.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgepack.core.gates import GateResult, evaluate_gate, failure_messages
from edgepack.errors import BadInputError, UsageError
from edgepack.outputs import prepare_output, replace_dir, staging_dir
from edgepack.quantize.quality import QualityConfig
from edgepack.quantize.schemes import (
    ENCODER_DEFAULT_OPTIONS,
    Fp16,
    Gguf,
    Int4,
    Int8Dynamic,
    Int8Static,
    Int8Weight,
    Scheme,
    auto_candidates,
    scheme_from_options,
)
from edgepack.runtime.model_dir import CONVERT_REPORT, MODEL_FILE, TEXT_GENERATION, load_model_dir

QUANTIZE_REPORT = "quantize.json"
REPORT_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class QualityGate:
    max_kl: float | None = None
    min_top1: float | None = None
    max_ppl_ratio: float | None = None
    min_cosine: float | None = None  # encoders: sentence embeddings (token embeddings without a sentence output)

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.max_kl, self.min_top1, self.max_ppl_ratio, self.min_cosine))

    def gates(self, quality: dict | None, subject: str = "") -> list[GateResult]:
        """One gate per limit set, naming the figure and the limit; `subject` (a build's scheme) prefixes the messages."""
        gates = []
        for key, limit, direction, option in (
            ("kl_mean", self.max_kl, "max", "--max-kl"),
            ("top1_agreement", self.min_top1, "min", "--min-top1"),
            ("ppl_ratio", self.max_ppl_ratio, "max", "--max-ppl-ratio"),
            (_cosine_key(quality), self.min_cosine, "min", "--min-cosine"),
        ):
            if limit is None:
                continue
            gate = evaluate_gate(key, None if quality is None else quality.get(key), limit, direction, stage="quantize", option=option)
            if quality is None:
                gate = gate.reframed("", "quality was not evaluated (--no-eval) but a quality gate was set")
            if subject:
                gate = gate.reframed(subject, f"quality gate, {subject}: {gate.message}")
            gates.append(gate)
        return gates

    def to_json(self) -> dict:
        return {"max_kl": self.max_kl, "min_top1": self.min_top1, "max_ppl_ratio": self.max_ppl_ratio, "min_cosine": self.min_cosine}


def _cosine_key(quality: dict | None) -> str:
    """The cosine an encoder gate reads: the sentence embeddings' when the export outputs them."""
    return "sentence_cosine_min" if quality and quality.get("sentence_cosine_min") is not None else "cosine_min"


@dataclass(frozen=True)
class QuantizeConfig:
    scheme: str | None = None  # None: the task's default (`default_scheme`)
    scheme_options: dict = field(default_factory=dict)
    gate: QualityGate = QualityGate()
    quality: QualityConfig = QualityConfig()
    calibration_text: Path | None = None
    evaluate: bool = True
    force: bool = False


@dataclass
class QuantizedModel:
    out: Path
    scheme: Scheme
    size_bytes: int
    reference_size_bytes: int
    quality: dict | None
    gate_failures: list[str]  # the failed gates' messages, as in quantize.json `gate.failures`
    report: dict
    gates: list[GateResult] = field(default_factory=list)

    @property
    def gate_passed(self) -> bool:
        return not self.gate_failures


def _model_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.startswith(MODEL_FILE))


def check_quantizable(model_dir) -> None:
    if (model_dir.folder / QUANTIZE_REPORT).is_file():
        scheme = json.loads((model_dir.folder / QUANTIZE_REPORT).read_text()).get("scheme", {}).get("name", "?")
        raise BadInputError(f"{model_dir.folder} is already quantized ({scheme}); quantize the fp32 export from `edgepack convert`")
    import onnx

    try:
        graph = onnx.load(str(model_dir.onnx_path), load_external_data=False).graph
    except Exception as exc:  # protobuf's DecodeError names neither the file nor the cause
        raise BadInputError(f"{model_dir.onnx_path} is not a readable ONNX model (truncated or corrupt): {exc}") from exc
    inputs, outputs = {i.name for i in graph.input}, {o.name for o in graph.output}
    if model_dir.task == TEXT_GENERATION:
        missing = [n for n in ("input_ids", "attention_mask") if n not in inputs] + (["logits"] if "logits" not in outputs else [])
        if not any(n.startswith("past_key_values.") for n in inputs):
            missing.append("past_key_values.*")
    else:
        missing = [n for n in ("input_ids",) if n not in inputs]
    if missing:
        raise BadInputError(
            f"{model_dir.onnx_path} lacks the inputs/outputs edgepack expects of a {model_dir.task} export: {', '.join(missing)}"
        )


def apply_scheme(scheme: Scheme, model_dir, tokenizer, out_onnx: Path, work_dir: Path, calibration_text: Path | None) -> dict:
    """Write `out_onnx` quantized with `scheme`; return facts about what was done."""
    import onnx

    from edgepack.core.onnx_io import save_model

    if isinstance(scheme, Gguf):
        from edgepack.quantize.gguf_import import import_gguf_weights

        gguf_file = gguf_source(model_dir)
        result = import_gguf_weights(model_dir.onnx_path, gguf_file, out_onnx, allow_requantize=scheme.allow_requantize,
                                     accuracy_level=scheme.accuracy_level or None)
        return result.to_json()

    if isinstance(scheme, (Int4, Int8Weight)):
        from edgepack.quantize.external import TensorStore
        from edgepack.quantize.weight_only import quantize_weight_only

        reader = None
        if isinstance(scheme, Int4) and scheme.algorithm == "gptq":
            reader = calibration_reader(model_dir, tokenizer, calibration_text, scheme.calibration_samples)
        # Tensor by tensor: the graph without its weights, each weight read when its node is quantized,
        # everything written to a spill file and copied into the output (see quantize/external.py).
        model = onnx.load(str(model_dir.onnx_path), load_external_data=False)
        with TensorStore(model_dir.onnx_path.parent, work_dir) as store:
            model, facts = quantize_weight_only(model, scheme, calibration_reader=reader, store=store)
            store.save(model, out_onnx)  # a deliverable: weights beside the graph, mapped at load
        return facts
    model = onnx.load(str(model_dir.onnx_path))
    if isinstance(scheme, Int8Dynamic):
        from edgepack.quantize.activation import quantize_int8_dynamic

        model, facts = quantize_int8_dynamic(
            model, scheme, work_dir,
            calibration=lambda: list(calibration_reader(model_dir, tokenizer, calibration_text, scheme.calibration_samples)))
    elif isinstance(scheme, Int8Static):
        from edgepack.quantize.activation import quantize_int8_static

        reader = calibration_reader(model_dir, tokenizer, calibration_text, scheme.calibration_samples)
        model, facts = quantize_int8_static(model, scheme, reader, work_dir)
    elif isinstance(scheme, Fp16):
        from edgepack.quantize.activation import convert_fp16

        model, facts = convert_fp16(model, scheme)
    else:  # pragma: no cover - the registry and this table move together
        raise UsageError(f"scheme {scheme.name} has no implementation")
    save_model(model, out_onnx, external_data=True)  # a deliverable: weights mapped at load
    return facts


def gguf_source(model_dir) -> Path:
    report_path = model_dir.folder / CONVERT_REPORT
    source = json.loads(report_path.read_text()).get("source", {}) if report_path.is_file() else {}
    gguf_file = source.get("gguf_file")
    if not gguf_file:
        raise UsageError(
            f"--scheme gguf needs an export made from a .gguf file (or the demo); {model_dir.folder} came from "
            f"{source.get('kind', 'an unknown source')}"
        )
    if not Path(gguf_file).is_file():
        raise BadInputError(f"the GGUF source of this export is gone: {gguf_file}")
    return Path(gguf_file)


def calibration_reader(model_dir, tokenizer, calibration_text: Path | None, samples: int):
    from edgepack.core.texts import calibration_text as read_calibration_text
    from edgepack.core.windows import token_ids, vocab_size_of
    from edgepack.quantize.calibration import (
        DecoderCalibrationReader,
        decoder_calibration_feeds,
        encoder_calibration_feeds,
    )

    text, _origin = read_calibration_text(calibration_text)
    ids = token_ids(tokenizer, text, vocab_size=vocab_size_of(model_dir.config))
    if model_dir.task == TEXT_GENERATION:
        feeds = decoder_calibration_feeds(model_dir.onnx_path, ids, model_dir.config, samples=samples)
    else:
        import onnx

        names = {i.name for i in onnx.load(str(model_dir.onnx_path), load_external_data=False).graph.input}
        feeds = encoder_calibration_feeds(names, ids, samples=samples)
    if not feeds:
        raise BadInputError("the calibration text produced no samples")
    return DecoderCalibrationReader(feeds)


def quantize_model(directory: Path | str, out: Path | str, config: QuantizeConfig = QuantizeConfig(), on_status=None) -> QuantizedModel:
    from edgepack.core.versions import tool_versions

    status = on_status or (lambda message: None)
    out, start = Path(out), time.perf_counter()
    prepare_output(out, config.force)
    if config.scheme == "auto":
        if not config.gate.active:
            raise UsageError("--scheme auto needs a quality budget: set --max-kl, --min-top1 and/or --max-ppl-ratio")
        if not config.evaluate:
            raise UsageError("--scheme auto picks by measured quality; it cannot be combined with --no-eval")
    model_dir, tokenizer = _load_export(directory)
    candidates = _candidates(config, model_dir)
    evaluator = _reference_evaluator(config, model_dir, tokenizer, status)

    reference_bytes = _model_bytes(model_dir.folder)
    with staging_dir(out) as tmp:
        tried, chosen = [], None
        for index, scheme in enumerate(candidates):
            work = tmp / f".candidate-{index}"
            work.mkdir()
            run = _run_candidate(scheme, model_dir, tokenizer, work, config, evaluator, status)
            if run.skipped is not None:
                tried.append({"scheme": scheme.to_json(), "label": scheme.label(), "skipped": run.skipped})
                shutil.rmtree(work)
                continue
            facts, quality, quantize_seconds, eval_seconds = run.facts, run.quality, run.quantize_seconds, run.eval_seconds
            size = _model_bytes(work)
            gates = config.gate.gates(quality)
            failures = failure_messages(gates)
            entry = {
                "scheme": scheme.to_json(), "label": scheme.label(), "size_bytes": size,
                "size_ratio": size / reference_bytes, "quality": quality, "gate_failures": failures,
                "facts": facts, "seconds": {"quantize": round(quantize_seconds, 3), "evaluate": round(eval_seconds, 3)},
            }
            tried.append(entry)
            if chosen is None or not failures or _better(entry, chosen):
                if chosen is not None:
                    shutil.rmtree(chosen["_work"], ignore_errors=True)
                chosen = {**entry, "_work": work, "_gates": gates}
            else:
                shutil.rmtree(work, ignore_errors=True)
            if not failures:
                break
        if chosen is None:
            raise BadInputError("no quantization scheme could be applied: " + "; ".join(t.get("skipped", "") for t in tried))

        work, gates = chosen.pop("_work"), chosen.pop("_gates")
        _assemble_output(tmp, work, model_dir)

        import onnx

        from edgepack.core.onnx_io import op_counts

        scheme = next(c for c in candidates if c.to_json() == chosen["scheme"])
        report = {
            "schema_version": REPORT_SCHEMA_VERSION,
            "kind": "edgepack.quantize",
            "scheme": chosen["scheme"],
            "scheme_label": chosen["label"],
            "scheme_summary": scheme.summary,
            "requested_scheme": config.scheme,
            "task": model_dir.task,
            "source_dir": str(Path(directory).resolve()),
            "source": _convert_source(model_dir),
            "size_bytes": chosen["size_bytes"],
            "reference_size_bytes": reference_bytes,
            "size_ratio": chosen["size_ratio"],
            "quality": chosen["quality"],
            "gate": {**config.gate.to_json(), "passed": not chosen["gate_failures"], "failures": chosen["gate_failures"]},
            "auto": ({"picked": chosen["label"] if not chosen["gate_failures"] else None, "candidates": tried}
                     if config.scheme == "auto" else None),
            "facts": chosen["facts"],
            "ops": op_counts(onnx.load(str(tmp / MODEL_FILE), load_external_data=False)),
            "versions": tool_versions(),
            "seconds": {**chosen["seconds"], "total": round(time.perf_counter() - start, 3)},
        }
        (tmp / QUANTIZE_REPORT).write_text(json.dumps(report, indent=2) + "\n")
        replace_dir(tmp, out)
    return QuantizedModel(out, scheme, report["size_bytes"], reference_bytes, report["quality"], chosen["gate_failures"], report, gates)


def _load_export(directory):
    """The export folder (checked quantizable) and its tokenizer."""
    from edgepack._quiet import quiet_libraries

    model_dir = load_model_dir(directory)
    check_quantizable(model_dir)
    quiet_libraries()
    return model_dir, model_dir.load_tokenizer()


def _candidates(config: QuantizeConfig, model_dir) -> list[Scheme]:
    """The schemes to try in order: the requested one, or auto's list (gguf first when the export came from a GGUF)."""
    if config.scheme == "auto":
        has_gguf = bool(_convert_source(model_dir).get("gguf_file"))
        return auto_candidates(has_gguf)
    if config.scheme is None:  # the task's default
        return [default_scheme(model_dir.task, config.scheme_options)]
    return [scheme_from_options(config.scheme, **config.scheme_options)]


def default_scheme(task: str, options: dict) -> Scheme:
    """int8-weight for decoders; for encoders int8-dynamic with SmoothQuant, the worst-resolved inputs weight-only
    and a 4-bit word table (ENCODER_DEFAULT_OPTIONS), options given on the command line taking precedence."""
    if task == TEXT_GENERATION:
        return scheme_from_options("int8-weight", **options)
    return scheme_from_options("int8-dynamic", **{**ENCODER_DEFAULT_OPTIONS, **options})


def _reference_evaluator(config: QuantizeConfig, model_dir, tokenizer, status):
    """A QualityEvaluator holding the fp32 reference figures, or None with --no-eval."""
    if not config.evaluate:
        return None
    from edgepack.quantize.quality import QualityEvaluator

    status("measuring the fp32 reference on the evaluation text")
    return QualityEvaluator(model_dir.onnx_path, model_dir, tokenizer, config.quality)


@dataclass
class _CandidateRun:
    """One scheme applied into its work folder, and its measured quality (None without an evaluator)."""

    facts: dict | None = None
    quality: dict | None = None
    quantize_seconds: float = 0.0
    eval_seconds: float = 0.0
    skipped: str | None = None  # auto only: why the scheme does not apply to this export


def _run_candidate(scheme: Scheme, model_dir, tokenizer, work: Path, config: QuantizeConfig, evaluator, status) -> _CandidateRun:
    """Quantize into `work` with `scheme` and measure it; with --scheme auto a scheme that cannot apply is skipped."""
    status(f"quantizing: {scheme.label()}")
    t0 = time.perf_counter()
    try:
        scratch = work / "scratch"  # onnxruntime's quantizers read and write whole models on disk
        scratch.mkdir()
        facts = apply_scheme(scheme, model_dir, tokenizer, work / MODEL_FILE, scratch, config.calibration_text)
        shutil.rmtree(scratch, ignore_errors=True)
    except (BadInputError, UsageError) as exc:
        if config.scheme != "auto":
            raise
        return _CandidateRun(skipped=str(exc))
    run = _CandidateRun(facts=facts, quantize_seconds=time.perf_counter() - t0)
    if evaluator is not None:
        status(f"measuring quality: {scheme.label()}")
        t0 = time.perf_counter()
        run.quality = evaluator.evaluate(work / MODEL_FILE)
        run.eval_seconds = time.perf_counter() - t0
    return run


def _assemble_output(tmp: Path, work: Path, model_dir) -> None:
    """The chosen candidate's graph with the export's side files (tokenizer, configs, convert.json) in `tmp`."""
    for item in model_dir.folder.iterdir():  # everything but the graph
        if item.is_file() and not item.name.startswith(MODEL_FILE):
            shutil.copy2(item, tmp / item.name)
    for item in work.iterdir():  # the graph and its weights; the schemes' scratch files stay behind
        if item.is_file() and item.name.startswith(MODEL_FILE):
            item.rename(tmp / item.name)
    shutil.rmtree(work)
    for leftover in tmp.glob(".candidate-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _better(entry: dict, chosen: dict) -> bool:
    """When no candidate meets the budget, keep the one with the fewest broken limits, then lowest KL."""
    def key(e):
        kl = (e.get("quality") or {}).get("kl_mean")
        return (len(e["gate_failures"]), kl if kl is not None else float("inf"))

    return key(entry) < key(chosen)


def _convert_source(model_dir) -> dict:
    path = model_dir.folder / CONVERT_REPORT
    return json.loads(path.read_text()).get("source", {}) if path.is_file() else {}
