"""Core ML target: an ML Program `.mlpackage` for iOS 18 / macOS 15 and the Apple Neural Engine.

Decoder LLMs (llama, mistral, qwen2) get a stateful KV cache (`ct.StateType`): one function takes a
prefill of any length up to --max-context or one decode token. Encoders (bert) get a fixed-shape model.
The program is fp16; an fp16 safety pass rewrites ops whose activations would overflow fp16.
Verified without a Mac: the saved program is executed by a MIL reference interpreter and compared with
the fp32 PyTorch model (on macOS, also with Core ML itself). target.json holds the ANE readiness report.

Heavy libraries (coremltools, torch, transformers) are imported inside `build`.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

from edgepack.errors import BadInputError, GateFailedError, UnsupportedModelError, UsageError
from edgepack.options import FiniteFloatRange

SUMMARY = "Core ML .mlpackage (iOS 18/macOS 15): stateful KV cache, fp16-safe, compressed, ANE report, verified without a Mac."
# Converts from the PyTorch weights with Core ML's own compression: `edgepack build` runs it once, on fp32.
USES_QUANTIZED_SOURCE = False
TARGET = "coreml"
PACKAGE = "model.mlpackage"
# Files that differ between two builds of the same model, and why (collected into the build manifest).
NOT_REPRODUCIBLE = {
    f"{PACKAGE}/Data/com.apple.CoreML/model.mlmodel": "coremltools stamps the conversion date into the spec "
    "(metadata com.github.apple.coremltools.conversion_date): identical bytes within one day",
}
COMPUTE_UNITS = ("all", "cpu_and_ne", "cpu_and_gpu", "cpu_only")
COMPRESSIONS = ("none", "int8", "int4-block", "palettize4")
DECODER_TYPES = ("llama", "mistral", "qwen2")
ENCODER_TYPES = ("bert",)
# Files copied next to the package so an app has the tokenizer and configs.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "vocab.txt", "merges.txt", "vocab.json")
DEVICES_DIR = Path(__file__).resolve().parent.parent / "profiles" / "devices"
# Default gates for the uncompressed fp16 program (the issue's acceptance): compressed schemes report only.
FP16_MIN_TOP1, FP16_MAX_KL, ENCODER_MIN_COSINE = 0.99, 0.001, 0.999


@dataclass(frozen=True)
class CoreMLConfig:
    compute_units: str = "all"
    compress: str = "none"
    block_size: int = 32  # int4-block
    embedding: str = "same"  # int4-block: "same" (uint4 affine per block), "row" (uint4 per row), "int8" (per channel) or "split"
    integer_offsets: bool = False  # int4-block: uint4 offsets + int4 rounding residue (saves ~3 MB on SmolLM2)
    split_rows: int = 6000  # embedding "split": ids below this in int8
    split_block: int = 48  # embedding "split": block of the rare rows' scale and offset
    split_bits: int = 3  # embedding "split": bits of the rare rows (3 or 4)
    split_levels: str = "normal"  # embedding "split": rare rows' levels, "normal" quantiles (LUT, iOS 26) or "uniform" (4 bits, iOS 18)
    block_scales: str = "fp16"  # int4-block: "fp16" per block, or "uint8" codes applied to block sums (4.5 bits a weight)
    tune_steps: int = 0  # embedding "split": distillation steps for the table's stored values (table_tuning.py)
    max_context: int | None = None  # decoders: KV-cache length; encoders: sequence length
    device: str | None = None
    eval_text: Path | None = None
    eval_positions: int = 64
    decode_steps: int = 8
    fp16_safety: bool = True
    fp16_margin: float = 4.0
    verify: bool = True
    min_top1: float | None = None
    max_kl: float | None = None
    force: bool = False


@dataclass
class _Source:
    hf_dir: Path
    config: dict
    model_type: str
    task: str
    report: dict = field(default_factory=dict)


def read_source(directory: Path) -> _Source:
    """The Hugging Face folder an export came from (convert.json `source.hf_dir`), or DIR itself if it is one."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BadInputError(f"{directory} is not a folder: pass the output folder of `edgepack convert`")
    report_path = directory / "convert.json"
    if report_path.is_file():
        try:
            report = json.loads(report_path.read_text())
        except json.JSONDecodeError as exc:
            raise BadInputError(f"{report_path} is not valid JSON: {exc}") from exc
        hf_dir = Path((report.get("source") or {}).get("hf_dir") or "")
        if not (hf_dir / "config.json").is_file():
            raise BadInputError(f"{report_path} names source folder {hf_dir or '(none)'}, which is gone: re-run `edgepack convert`")
    elif (directory / "config.json").is_file() and any(directory.glob("*.safetensors")):
        report, hf_dir = {}, directory
    else:
        raise BadInputError(f"{directory} has no convert.json: pass the output folder of `edgepack convert` (Core ML is built from its source weights)")
    config = json.loads((hf_dir / "config.json").read_text())
    model_type = config.get("model_type", "")
    task = report.get("task") or ("feature-extraction" if model_type in ENCODER_TYPES else "text-generation")
    return _Source(hf_dir=hf_dir, config=config, model_type=model_type, task=task, report=report)


def device_memory_limit(device_id: str) -> tuple[int | None, str]:
    """(app memory limit in bytes or None, note) from edgepack/profiles/devices/<id>.toml, read directly."""
    import tomllib

    if not DEVICES_DIR.is_dir():
        return None, "no device profiles installed: memory check skipped"
    path = DEVICES_DIR / f"{device_id}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in DEVICES_DIR.glob("*.toml"))
        raise UsageError(f"unknown device {device_id!r}; known devices: {', '.join(known) or '(none)'}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise BadInputError(f"{path} is not valid TOML: {exc}") from exc
    figure = (data.get("memory") or {}).get("app_memory_limit_mb")
    value = figure.get("value") if isinstance(figure, dict) else figure
    if not isinstance(value, (int, float)):
        return None, f"{path.name} has no memory.app_memory_limit_mb: memory check skipped"
    source = figure.get("source", "") if isinstance(figure, dict) else ""
    return int(value * 1024 * 1024), f"{device_id}: app memory limit {value} MB ({source})"


_BITS = {"none": 16, "int8": 8.25, "int4-block": 5, "palettize4": 4.1}


def _validate(config: CoreMLConfig) -> None:
    if config.compute_units not in COMPUTE_UNITS:
        raise UsageError(f"unknown compute units {config.compute_units!r}; choose one of: {', '.join(COMPUTE_UNITS)}")
    if config.compress not in COMPRESSIONS:
        raise UsageError(f"unknown compression {config.compress!r}; choose one of: {', '.join(COMPRESSIONS)}")
    if config.block_size not in (16, 32, 64, 128):
        raise UsageError(f"--block-size must be 16, 32, 64 or 128, not {config.block_size}")
    if config.tune_steps < 0:
        raise UsageError(f"--tune-steps must be 0 or more, not {config.tune_steps}")
    if config.tune_steps and not (config.compress == "int4-block" and config.embedding == "split"):
        raise UsageError("--tune-steps tunes the split table: it needs --compress int4-block --embedding split")
    from edgepack.targets.coreml_support.convert import SPLIT_BITS  # numpy only: cheap

    if config.split_bits not in SPLIT_BITS:
        raise UsageError(f"--split-bits must be one of {', '.join(map(str, SPLIT_BITS))}, not {config.split_bits}")
    if config.split_levels not in ("normal", "uniform"):
        raise UsageError(f"--split-levels must be normal or uniform, not {config.split_levels!r}")
    if config.split_levels == "uniform" and config.split_bits != 4:
        raise UsageError("--split-levels uniform stores the rare rows as uint4 codes: it needs --split-bits 4")
    if config.block_scales not in ("fp16", "uint8"):
        raise UsageError(f"--block-scales must be fp16 or uint8, not {config.block_scales!r}")
    if config.block_scales == "uint8" and config.compress != "int4-block":
        raise UsageError("--block-scales uint8 codes the scales of int4 blocks: it needs --compress int4-block")
    if config.block_scales == "uint8" and config.integer_offsets:
        raise UsageError("--block-scales uint8 stores each block's offset in 8 bits itself: drop --integer-offsets")
    if config.max_context is not None and not 8 <= config.max_context <= 32768:
        raise UsageError(f"--max-context must be between 8 and 32768, not {config.max_context}")


def build(directory, out, config: CoreMLConfig = CoreMLConfig(), on_status=None):
    from edgepack.outputs import prepare_output, replace_dir, staging_dir
    from edgepack.targets.base import TargetArtifact, write_target_json

    status = on_status or (lambda message: None)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    _validate(config)
    out = Path(out)
    prepare_output(out, config.force)
    source = read_source(Path(directory))
    kind = "decoder" if source.model_type in DECODER_TYPES else "encoder" if source.model_type in ENCODER_TYPES else None
    max_pos = int(source.config.get("max_position_embeddings") or 512)
    context = min(config.max_context or (512 if kind == "decoder" else 128), max_pos)

    device_note, limit = None, None
    if config.device:
        limit, device_note = device_memory_limit(config.device)

    from edgepack._quiet import quiet_libraries

    quiet_libraries()
    from edgepack.targets.coreml_support import compat

    compat.quiet()
    status(f"loading {source.model_type} weights from {source.hf_dir}")
    t0 = time.perf_counter()
    hf_model, tokenizer = _load(source, kind)
    timings["load"] = time.perf_counter() - t0
    if kind is None:
        attention = next((type(m).__name__ for m in hf_model.modules() if type(m).__name__.endswith("Attention")), type(hf_model).__name__)
        raise UnsupportedModelError(
            f"model_type {source.model_type!r}: the Core ML converter cannot take op {attention} "
            f"(supported: decoders {', '.join(DECODER_TYPES)}; encoders {', '.join(ENCODER_TYPES)})"
        )
    _check_architecture(hf_model, source)
    if config.compress == "int4-block" and config.embedding == "split":
        hidden, vocab = int(hf_model.config.hidden_size), int(hf_model.config.vocab_size)
        if kind != "decoder" or hidden % config.split_block or hidden % 32:
            raise UsageError(f"--embedding split needs a decoder whose hidden size ({hidden}) is a multiple of 32 and of --split-block ({config.split_block})")
        if not 0 < config.split_rows < vocab:
            raise UsageError(f"--split-rows must be between 1 and the vocabulary size ({vocab}), not {config.split_rows}")

    params = sum(p.numel() for n, p in hf_model.named_parameters() if "lm_head" not in n or not source.config.get("tie_word_embeddings", True))
    state_bytes = 0
    if kind == "decoder":
        cfg = hf_model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        state_bytes = 2 * cfg.num_hidden_layers * (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads) * context * head_dim * 2
    estimate = int(params * _BITS[config.compress] / 8) + state_bytes
    if limit is not None and estimate > limit:
        raise BadInputError(
            f"model too large for {config.device}: about {estimate / 2**20:.0f} MB (weights at {config.compress} + KV cache) "
            f"> app memory limit {limit / 2**20:.0f} MB; try --compress int4-block or a smaller --max-context"
        )

    tokens = _eval_tokens(tokenizer, config, source)
    from edgepack.core.windows import split_windows
    from edgepack.targets.coreml_support import fp16 as fp16_pass

    status("fp16 safety pass: recording activation ranges on the evaluation text")
    t0 = time.perf_counter()
    windows = split_windows(tokens, min(context, 512), count=2, min_length=1)
    plan = fp16_pass.analyse(hf_model, windows, kind=kind, margin=config.fp16_margin, enabled=config.fp16_safety)
    timings["fp16_safety"] = time.perf_counter() - t0

    from edgepack.targets.coreml_support import convert as cm_convert

    applied_fixes = compat.apply()
    scheme = cm_convert.CompressionScheme(
        config.compress, config.block_size, config.embedding, integer_offsets=config.integer_offsets, split_rows=config.split_rows,
        split_block=config.split_block, split_bits=config.split_bits, split_levels=config.split_levels, block_scales=config.block_scales)
    column_weights, split_table, tuning = None, None, None
    if config.compress == "int4-block" and config.embedding == "split" and kind == "decoder":
        from edgepack.targets.coreml_support.table_tuning import SEQUENCE_TOKENS, tune_split_table

        column_weights = _table_column_weights(hf_model, tokenizer)
        table = hf_model.get_input_embeddings().weight.detach().float().numpy()
        split_table = cm_convert.fit_split_table(table, config.split_rows, config.split_block, column_weights, config.split_bits, config.split_levels)
        if config.tune_steps:
            t0 = time.perf_counter()
            split_table, tuning = tune_split_table(hf_model, tokenizer, split_table, steps=config.tune_steps, projection_block=config.block_size,
                                                   integer_offsets=config.integer_offsets, block_scales=config.block_scales,
                                                   sequence_tokens=min(SEQUENCE_TOKENS, context),
                                                   on_status=status)
            timings["table_tuning"] = time.perf_counter() - t0
    with staging_dir(out) as tmp:
        status(f"converting to a Core ML ML Program ({'stateful KV cache' if kind == 'decoder' else 'fixed shape'}, fp16)")
        t0 = time.perf_counter()
        if kind == "decoder":
            mlmodel = cm_convert.convert_decoder(hf_model, model_type=source.model_type, max_context=context, plan=plan,
                                                 compute_units=config.compute_units, deployment_target=scheme.deployment_target)
            flexible = ["input_ids[1]", "causal_mask[2]", "causal_mask[3]"]
        else:
            mlmodel = cm_convert.convert_encoder(hf_model, model_type=source.model_type, seq_len=context, plan=plan, compute_units=config.compute_units)
            flexible = []
        timings["convert"] = time.perf_counter() - t0
        if config.compress != "none":
            status(f"compressing weights ({config.compress})")
            t0 = time.perf_counter()
            mlmodel = cm_convert.compress(mlmodel, scheme, column_weights=column_weights, split_table=split_table)
            timings["compress"] = time.perf_counter() - t0
        _describe(mlmodel, source, kind, context, scheme)
        package = tmp / PACKAGE
        mlmodel.save(str(package))
        compat.make_package_reproducible(package)
        for name in SIDE_FILES:
            for folder in (Path(directory), source.hf_dir):
                if (folder / name).is_file():
                    shutil.copy2(folder / name, tmp / name)
                    break
        package_bytes = sum(p.stat().st_size for p in package.rglob("*") if p.is_file())

        status("ANE readiness report (static inspection of the saved program)")
        from edgepack.targets.coreml_support import ane
        from edgepack.targets.coreml_support.mil_reference import load_program

        program = load_program(package)
        ane_report = ane.report(program.function, size_bytes=package_bytes, flexible_inputs=flexible)

        checks: dict = {"fp16_safety": {"passed": not plan.unsafe, "unsafe": plan.unsafe, "low_headroom": plan.warnings, "rewritten_ops": len(plan.rewrites)}}
        from edgepack.targets.tokenizer_check import check_tokenizer_files

        # The app's tokenizer (swift-transformers) reads the shipped files: they must tokenize as the source does.
        checks["tokenizer_files"] = check_tokenizer_files(tmp, tokenizer)
        if limit is not None:
            need = package_bytes + state_bytes
            checks["device_memory"] = {"passed": need <= limit, "device": config.device, "bytes_needed": need, "limit_bytes": limit,
                                       "basis": "package size + fp16 KV-cache state; activations not counted"}
        verification = None
        if config.verify:
            status("verifying with the MIL reference interpreter against fp32 PyTorch")
            t0 = time.perf_counter()
            verification = _verify(package, hf_model, tokens, kind, context, config)
            timings["verify"] = time.perf_counter() - t0
            checks["parity"] = _gate(verification, kind, config)

        artifact = TargetArtifact(
            out=out, target=TARGET,
            facts={
                "format": "mlprogram (.mlpackage)",
                "deployment_target": {"iOS18": "iOS 18 / macOS 15", "iOS26": "iOS 26 / macOS 26"}[scheme.deployment_target],
                "kind": kind,
                "model_type": source.model_type,
                "compute_units": config.compute_units,
                "compute_precision": "fp16",
                "compression": scheme.describe() | ({"table_tuning": tuning} if tuning else {}),
                "io": _io_facts(kind, context, ane_report),
                "package_bytes": package_bytes,
                "kv_cache_bytes": state_bytes,
                "fp16_safety": plan.to_json(),
                "ane": ane_report,
                "verification": verification,
                "device": {"id": config.device, "note": device_note} if config.device else None,
                "compat_fixes": applied_fixes,
            },
            checks=checks,
            source={"directory": str(Path(directory).resolve()), "hf_dir": str(source.hf_dir), "convert": source.report.get("source")},
            versions=_versions(),
            seconds={},
        )
        timings["total"] = time.perf_counter() - start
        artifact.seconds = {k: round(v, 2) for k, v in timings.items()}
        artifact.facts["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items() if k != "force"}
        write_target_json(tmp, artifact)
        replace_dir(tmp, out)
    return artifact


def _table_column_weights(hf_model, tokenizer):
    """E[h_k^2] of the final hidden states on the calibration text (not the evaluation text): how much each
    column of the tied table contributes to the logits, to weight the fit of its 3-bit rows."""
    import torch

    from edgepack.core.windows import token_ids
    from edgepack.quantize.calibration import DEFAULT_CALIBRATION_TEXT, read_text

    if tokenizer is None:
        return None
    text, _origin = read_text(None, DEFAULT_CALIBRATION_TEXT)
    ids = token_ids(tokenizer, text)[:512]
    with torch.no_grad():
        hidden = hf_model.model(torch.tensor([ids])).last_hidden_state[0].double()
    return (hidden ** 2).mean(0).numpy()


def _load(source: _Source, kind):
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    cls = AutoModelForCausalLM if kind == "decoder" else AutoModel
    try:
        model = cls.from_pretrained(str(source.hf_dir), dtype=torch.float32, local_files_only=True, attn_implementation="eager").eval()
    except Exception as exc:
        raise BadInputError(f"transformers cannot load {source.hf_dir}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.hf_dir), local_files_only=True)
    except Exception:
        tokenizer = None
    return model, tokenizer


def _check_architecture(model, source: _Source) -> None:
    cfg = source.config
    if source.model_type in DECODER_TYPES:
        if cfg.get("sliding_window") and cfg.get("use_sliding_window", source.model_type == "mistral"):
            raise UnsupportedModelError(f"model_type {source.model_type!r}: sliding-window attention is not supported by the Core ML converter")
        layer = model.model.layers[0]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not hasattr(layer.self_attn, name):
                raise UnsupportedModelError(f"model_type {source.model_type!r}: attention op {type(layer.self_attn).__name__} has no {name}")
        if getattr(model.config, "hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"model_type {source.model_type!r}: activation op {model.config.hidden_act!r} is not supported (silu only)")
    if source.model_type == "bert" and getattr(model.config, "position_embedding_type", "absolute") != "absolute":
        raise UnsupportedModelError(f"model_type 'bert': position embedding op {model.config.position_embedding_type!r} is not supported")


def _eval_tokens(tokenizer, config: CoreMLConfig, source: _Source) -> list[int]:
    from edgepack.core.windows import token_ids
    from edgepack.quantize.calibration import DEFAULT_EVAL_TEXT, read_text

    text, _origin = read_text(config.eval_text, DEFAULT_EVAL_TEXT)
    if tokenizer is None:
        vocab = int(source.config.get("vocab_size") or 100)
        return [(7 * i + 3) % vocab for i in range(1024)]
    return token_ids(tokenizer, text)


def _verify(package: Path, hf_model, tokens: list[int], kind: str, context: int, config: CoreMLConfig) -> dict:
    import numpy as np
    import torch

    from edgepack.quantize.calibration import DEFAULT_EVAL_TEXT
    from edgepack.targets.coreml_support import verify

    result: dict = {"eval_text": str(config.eval_text) if config.eval_text else f"edgepack/quantize/data/{DEFAULT_EVAL_TEXT}"}
    if kind == "decoder":
        n = min(config.eval_positions, context, len(tokens))
        steps = min(config.decode_steps, n - 1)
        ids = tokens[:n]
        with torch.no_grad():
            reference = hf_model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().numpy()
        logits, timing = verify.run_decoder_mil(package, ids, steps)
        result["mil-reference"] = {"verified_by": "mil-reference", "prefill_tokens": n - steps, "decode_steps": steps,
                                   **verify.fp16_logit_figures(reference, logits), "seconds": timing}
    else:
        n = min(context, len(tokens))
        ids = np.zeros((1, context), dtype=np.int32)
        ids[0, :n] = tokens[:n]
        mask = np.zeros((1, context), dtype=np.int32)
        mask[0, :n] = 1
        with torch.no_grad():
            reference = hf_model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state[0].numpy()
        hidden = verify.run_encoder_mil(package, ids, mask)
        result["mil-reference"] = {"verified_by": "mil-reference", **verify.fp16_hidden_state_figures(reference[:n], hidden[:n])}
    available, reason = verify.coreml_runtime_available()
    if available:
        if kind == "decoder":
            logits = verify.run_decoder_coreml(package, ids, steps, config.compute_units)
            result["coreml-runtime"] = {"verified_by": "coreml-runtime", **verify.fp16_logit_figures(reference, logits)}
        else:
            hidden = verify.run_encoder_coreml(package, ids, mask, config.compute_units)
            result["coreml-runtime"] = {"verified_by": "coreml-runtime", **verify.fp16_hidden_state_figures(reference[:n], hidden[:n])}
    else:
        result["coreml-runtime"] = {"skipped": reason}
    result["verified_by"] = "coreml-runtime" if available else "mil-reference"
    return result


def _gate(verification: dict, kind: str, config: CoreMLConfig) -> dict:
    figures = verification.get("coreml-runtime") if "verified_by" in verification.get("coreml-runtime", {}) else verification["mil-reference"]
    failures = []
    if kind == "decoder":
        min_top1 = config.min_top1 if config.min_top1 is not None else (FP16_MIN_TOP1 if config.compress == "none" else None)
        max_kl = config.max_kl if config.max_kl is not None else (FP16_MAX_KL if config.compress == "none" else None)
        if not figures["finite"]:
            failures.append("non-finite logits (fp16 overflow)")
        if min_top1 is not None and figures["top1_agreement"] < min_top1:
            failures.append(f"top-1 agreement {figures['top1_agreement']:.3f} < {min_top1}")
        if max_kl is not None and figures["kl_mean"] > max_kl:
            failures.append(f"mean KL {figures['kl_mean']:.4g} > {max_kl}")
        gate = {"min_top1": min_top1, "max_kl": max_kl}
        summary = {"top1_agreement": figures["top1_agreement"], "top1_ci95": figures["top1_ci95"], "near_tie_positions": figures["near_tie_positions"],
                   "kl_mean": figures["kl_mean"], "max_abs_logit_diff": figures["max_abs_logit_diff"]}
    else:
        min_cos = ENCODER_MIN_COSINE if config.compress == "none" else None
        if not figures["finite"]:
            failures.append("non-finite hidden states (fp16 overflow)")
        if min_cos is not None and figures["cosine_min"] < min_cos:
            failures.append(f"min cosine {figures['cosine_min']:.5f} < {min_cos}")
        gate = {"min_cosine": min_cos}
        summary = {"cosine_min": figures["cosine_min"], "max_abs_diff": figures["max_abs_diff"]}
    return {"passed": not failures, "verified_by": verification["verified_by"], "gate": gate, "failures": failures,
            "positions": figures["positions"], **summary}


def _io_facts(kind: str, context: int, ane_report: dict) -> dict:
    if kind == "decoder":
        return {
            "inputs": {"input_ids": f"int32 (1, q), 1 <= q <= {context}",
                       "causal_mask": f"fp16 (1, 1, q, end), additive (0 / -inf), end = tokens in the cache after this call <= {context}"},
            "outputs": {"logits": "fp16 (1, q, vocab)"},
            "states": {s["name"]: f"{s['dtype']} {s['shape']} (layers, batch, kv_heads, context, head_dim)" for s in ane_report["states"]},
            "usage": "prefill: q = prompt length, end = q; decode: q = 1, end = tokens so far; create one state per conversation (model.make_state())",
        }
    return {"inputs": {"input_ids": f"int32 (1, {context})", "attention_mask": f"int32 (1, {context}), 1 = token, 0 = padding"},
            "outputs": {"last_hidden_state": "fp16 (1, seq, hidden)"}}


def _describe(mlmodel, source: _Source, kind: str, context: int, scheme) -> None:
    mlmodel.short_description = f"{source.config.get('architectures', [source.model_type])[0]} ({kind}, context {context}) by edgepack"
    mlmodel.user_defined_metadata["edgepack.compression"] = scheme.name
    mlmodel.user_defined_metadata["edgepack.model_type"] = source.model_type


def _versions() -> dict:
    from importlib import metadata

    versions = {}
    for dist in ("edgepack", "coremltools", "torch", "transformers", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


@click.command(name="coreml", help="""Build a Core ML .mlpackage (ML Program, iOS 18 / macOS 15) from an export.

\b
Decoder LLMs (llama, mistral, qwen2): stateful KV cache (ct.StateType), one
function for prefill (q tokens) and decode (q = 1). Encoders (bert): fixed
shape. fp16 program, made safe by rewriting ops whose activations overflow
fp16; compressed weights optional. Verified against fp32 PyTorch by a MIL
reference interpreter (any host) and, on macOS, by Core ML itself. OUT gets
model.mlpackage, the tokenizer, and target.json (ANE readiness report).
Exit 1 if the fp16 parity gate fails (outputs are still written).

\b
Example:
  edgepack target coreml build/smollm2 -o build/smollm2-coreml
  edgepack target coreml build/smollm2 -o build/smollm2-coreml-q4 --compress int4-block
  edgepack target coreml build/my-bert -o build/bert-coreml --max-context 128
""")
@click.argument("directory", metavar="DIR", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Output folder (must not exist or be empty, unless --force).")
@click.option("--compute-units", default="all", show_default=True, help="all | cpu_and_ne | cpu_and_gpu | cpu_only (stored in the model; the ANE report gives a verdict for each).")
@click.option("--compress", default="none", show_default=True, help="none (fp16) | int8 (per channel) | int4-block (uint4, fp16 scale+offset per block) | palettize4.")
@click.option("--block-size", type=int, default=32, show_default=True, help="int4-block block size (16, 32, 64, 128).")
@click.option("--embedding", type=click.Choice(["same", "row", "int8", "split"]), default="same", show_default=True,
              help="int4-block: embedding/lm_head table as uint4 per block like the projections, uint4 with one scale/offset per row (smaller), "
                   "int8 per channel, or split: ids below --split-rows int8, the rest --split-bits bits with a scale and offset per --split-block entries.")
@click.option("--split-rows", type=click.IntRange(min=1), default=6000, show_default=True, help="--embedding split: token ids below this stay int8 (BPE ids come in merge order: the low ones are the frequent tokens).")
@click.option("--split-block", type=click.IntRange(min=8), default=48, show_default=True, help="--embedding split: entries per fp16 scale/offset of the rare rows (must divide the hidden size).")
@click.option("--split-bits", type=click.Choice(["3", "4"]), default="3", show_default=True,
              help="--embedding split: bits of the rare rows' indices into normal-quantile levels (4: +0.5 bit an entry, ~3 MB more for SmolLM2).")
@click.option("--split-levels", type=click.Choice(["normal", "uniform"]), default="normal", show_default=True,
              help="--embedding split: rare rows' levels: normal quantiles through a LUT (iOS 26), or uniform = plain uint4 codes "
                   "with the per-block scale and offset (needs --split-bits 4; iOS 18).")
@click.option("--tune-steps", type=int, default=0, show_default=True,
              help="--embedding split: distillation steps that tune the table's stored values against the fp32 model on text it generates "
                   "itself (2 sequences of 256 tokens a step, each a forward and backward pass of the model; see docs/coreml.md). 0: least-squares fit only.")
@click.option("--integer-offsets", is_flag=True, help="int4-block: uint4 offsets plus the rounding residue in int4 (three small ops per projection; ~3 MB less for SmolLM2).")
@click.option("--block-scales", type=click.Choice(["fp16", "uint8"]), default="fp16", show_default=True,
              help="int4-block: fp16 scale per block in the weight op, or uint8 codes into a per-weight log-spaced table, applied to "
                   "per-block partial sums with the offsets in uint8 (4.5 bits a weight against 5 by default and 4.75 with --integer-offsets; "
                   "see docs/coreml.md).")
@click.option("--max-context", type=int, default=None, help="Decoders: KV-cache length (default min(512, max positions)); encoders: sequence length (default 128).")
@click.option("--device", default=None, metavar="D", help="Device profile ID (e.g. iphone-15-pro): refuse a model larger than its app memory limit.")
@click.option("--eval-text", type=click.Path(path_type=Path), default=None, help="UTF-8 text for the fp16 safety pass and verification (default: bundled English text).")
@click.option("--eval-positions", type=click.IntRange(min=8), default=64, show_default=True, help="Token positions compared with PyTorch.")
@click.option("--min-top1", type=FiniteFloatRange(0, 1), default=None, help="Gate: top-1 agreement with fp32 (default 0.99 for --compress none).")
@click.option("--max-kl", type=FiniteFloatRange(min=0), default=None, help="Gate: mean KL(fp32 || Core ML) (default 0.001 for --compress none).")
@click.option("--no-fp16-safety", is_flag=True, help="Do not rewrite overflowing ops (the report still lists them).")
@click.option("--no-verify", is_flag=True, help="Skip the MIL reference / Core ML comparison with PyTorch.")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder (only once the new one is complete).")
def command(directory, out, compute_units, compress, block_size, embedding, split_rows, split_block, split_bits, split_levels, tune_steps, integer_offsets,
            block_scales, max_context, device, eval_text, eval_positions, min_top1, max_kl, no_fp16_safety, no_verify, force):
    config = CoreMLConfig(
        compute_units=compute_units, compress=compress, block_size=block_size, embedding=embedding, split_rows=split_rows,
        split_block=split_block, split_bits=int(split_bits), split_levels=split_levels, tune_steps=tune_steps, integer_offsets=integer_offsets,
        block_scales=block_scales, max_context=max_context,
        device=device, eval_text=eval_text, eval_positions=eval_positions, min_top1=min_top1, max_kl=max_kl,
        fp16_safety=not no_fp16_safety, verify=not no_verify, force=force,
    )
    _validate(config)
    from edgepack.core.console import Status

    with Status(f"building Core ML target from {directory}") as status:
        artifact = build(directory, out, config, on_status=status)
    _print_summary(artifact)
    failed = [f"{name}: {'; '.join(check.get('failures') or check.get('unsafe') or ['failed'])}" for name, check in artifact.checks.items() if check.get("passed") is False]
    if failed:
        raise GateFailedError("Core ML target check failed: " + " | ".join(failed) + f"; see {out}/target.json")


def _print_summary(artifact) -> None:
    from edgepack.core.console import stdout_console

    facts = artifact.facts
    lines = [f"edgepack target coreml -> {artifact.out}",
             f"  {facts['kind']} {facts['model_type']}, {facts['compression']['name']}, {facts['package_bytes'] / 1e6:.1f} MB package"
             + (f", KV cache {facts['kv_cache_bytes'] / 1e6:.1f} MB" if facts["kv_cache_bytes"] else ""),
             f"  fp16 safety: {facts['fp16_safety']['rewritten_ops']} ops rewritten" + (f", UNSAFE: {facts['fp16_safety']['unsafe']}" if facts["fp16_safety"]["unsafe"] else "")]
    parity = artifact.checks.get("parity")
    if parity:
        if "top1_agreement" in parity:
            low, high = parity["top1_ci95"]
            lines.append(f"  parity ({parity['verified_by']}, {parity['positions']} positions): top-1 {parity['top1_agreement']:.3f} "
                         f"(95% CI {low:.3f}-{high:.3f}; {parity['near_tie_positions']} near ties in fp32), "
                         f"KL {parity['kl_mean']:.2e}, max |logit diff| {parity['max_abs_logit_diff']:.3g} -> {'PASS' if parity['passed'] else 'FAIL'}")
        else:
            lines.append(f"  parity ({parity['verified_by']}): min cosine {parity['cosine_min']:.5f}, max |diff| {parity['max_abs_diff']:.3g} -> {'PASS' if parity['passed'] else 'FAIL'}")
    for unit, verdict in facts["ane"]["verdicts"].items():
        lines.append(f"  {unit}: {verdict}")
    stdout_console().print("\n".join(lines), markup=False)
