"""Core ML target: an ML Program `.mlpackage` for iOS 18 / macOS 15 and the Apple Neural Engine.

Decoder LLMs (the architectures of edgepack/targets/architectures.py) get a stateful KV cache
(`ct.StateType`): one function takes a prefill of any length up to --max-context or one decode token. Encoders (bert) get a fixed-shape model.
The program is fp16; an fp16 safety pass rewrites ops whose activations would overflow fp16.
Verified without a Mac: the saved program is executed by a MIL reference interpreter and compared with
the fp32 PyTorch model (on macOS, also with Core ML itself). target.json holds the ANE readiness report.

Heavy libraries (coremltools, torch, transformers) are imported inside `build`.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

from edgepack.core.files import copy_side_files
from edgepack.core.versions import MODEL_PACKAGES
from edgepack.errors import BadInputError, GateFailedError, UnsupportedModelError, UsageError
from edgepack.options import click_options, config_from_cli, option
from edgepack.targets.architectures import DECODER_TYPES, check_decoder

SUMMARY = "Core ML .mlpackage (iOS 18/macOS 15): stateful KV cache, fp16-safe, compressed, ANE report, verified without a Mac."
# Converts from the PyTorch weights with Core ML's own compression: `edgepack build` runs it once, on fp32.
USES_QUANTIZED_SOURCE = False
TARGET = "coreml"
# Packages whose versions key this target's cached builds (`genai-builder:` the builder venv's, `qnn-sdk` the
# QNN SDK onnxruntime-qnn carries).
CACHE_PACKAGES = ("coremltools", "onnxruntime-genai", *MODEL_PACKAGES)
PACKAGE = "model.mlpackage"
# Files that differ between two builds of the same model, and why (collected into the build manifest).
NOT_REPRODUCIBLE = {
    "model*.mlpackage/Data/com.apple.CoreML/model.mlmodel": "coremltools stamps the conversion date into the spec "
    "(metadata com.github.apple.coremltools.conversion_date): identical bytes within one day",
}
COMPUTE_UNITS = ("all", "cpu_and_ne", "cpu_and_gpu", "cpu_only")
COMPRESSIONS = ("none", "int8", "int4-block", "palettize4")
SHAPES = ("auto", "fixed", "flexible")
ENCODER_TYPES = ("bert",)
# Default gates for the uncompressed fp16 program (the issue's acceptance): compressed schemes report only.
FP16_MIN_TOP1, FP16_MAX_KL, ENCODER_MIN_COSINE = 0.99, 0.001, 0.999


@dataclass(frozen=True)
class CoreMLConfig:
    # compute_units and compress are checked in __post_init__ (not as click choices): their error names the choices.
    compute_units: str = option("all", help="all | cpu_and_ne | cpu_and_gpu | cpu_only (stored in the model; the ANE report gives a verdict for each). "
                                            "cpu_and_ne builds the Neural Engine program (see --shapes).")
    shapes: str = option("auto", choices=SHAPES,
                         help="Decoders: fixed = the Neural Engine program (a prefill function over --prefill-chunk tokens and a one-token "
                              "decode function, both over the whole KV cache, in one multifunction package sharing the weights); "
                              "flexible = one function for any query length (GPU/CPU); auto = fixed for --compute-units cpu_and_ne, else flexible.")
    model_parts: int = option(0, min=0, help="--shapes fixed: split the decoder layers into this many packages (model-00001-of-0000N.mlpackage, "
                                             "hidden states passed between them); 0: as many as keep each package's weights under 1 GiB, "
                                             "what iOS loads on the Neural Engine.")
    prefill_chunk: int = option(64, min=1, unit="tokens", help="--shapes fixed: tokens per prefill call; longer prompts are fed chunk by chunk "
                                                               "(a chunk longer than the context is cut to it).")
    compress: str = option("none", help="none (fp16) | int8 (per channel) | int4-block (uint4, fp16 scale+offset per block) | palettize4.")
    block_size: int = option(32, help="int4-block block size (16, 32, 64, 128).")
    # int4-block: "same" (uint4 affine per block), "row" (uint4 per row), "int8" (per channel) or "split"
    embedding: str = option("same", choices=("same", "row", "int8", "split"),
                            help="int4-block: embedding/lm_head table as uint4 per block like the projections, uint4 with one scale/offset per row (smaller), "
                                 "int8 per channel, or split: ids below --split-rows int8, the rest --split-bits bits with a scale and offset per --split-block entries.")
    split_rows: int = option(6000, min=1, help="--embedding split: token ids below this stay int8 (BPE ids come in merge order: the low ones are the frequent tokens).")
    split_block: int = option(48, min=8, help="--embedding split: entries per fp16 scale/offset of the rare rows (must divide the hidden size).")
    split_bits: int = option(3, choices=(3, 4), help="--embedding split: bits of the rare rows' indices into normal-quantile levels (4: +0.5 bit an entry).")
    split_levels: str = option("normal", choices=("normal", "uniform"),
                               help="--embedding split: rare rows' levels: normal quantiles through a LUT (iOS 26), or uniform = plain uint4 codes "
                                    "with the per-block scale and offset (needs --split-bits 4; iOS 18).")
    tune_steps: int = option(0, help="--embedding split: distillation steps that tune the table's stored values against the fp32 model on text it generates "
                                     "itself (2 sequences of 256 tokens a step, each a forward and backward pass of the model; see docs/coreml.md). 0: least-squares fit only.")
    integer_offsets: bool = option(False, help="int4-block: uint4 offsets plus the rounding residue in int4 (three small ops per projection).")
    block_scales: str = option("fp16", choices=("fp16", "uint8"),
                               help="int4-block: fp16 scale per block in the weight op, or uint8 codes into a per-weight log-spaced table, applied to "
                                    "per-block partial sums with the offsets in uint8 (4.5 bits a weight against 5 by default and 4.75 with --integer-offsets; "
                                    "see docs/coreml.md).")
    max_context: int | None = option(None, unit="tokens",
                                     help="Decoders: KV-cache length (default min(512, max positions)); encoders: sequence length (default 128).")
    device: str | None = option(None, metavar="D", help="Device profile ID (e.g. iphone-15-pro): refuse a model larger than its app memory limit.")
    devices_dirs: tuple[Path, ...] = option((), cli="--devices-dir", metavar="DIR", in_recipe=False,
                                            help="Extra folder of device TOML files for --device (repeatable); a file with a known id replaces the built-in one.",
                                            note="a recipe names devices of the built-in database")
    eval_text: Path | None = option(None, help="UTF-8 text for the fp16 safety pass and verification (default: bundled English text).")
    eval_positions: int = option(64, min=8, help="Token positions compared with PyTorch.")
    min_top1: float | None = option(None, min=0, max=1, help="Gate: top-1 agreement with fp32 (default 0.99 for --compress none).")
    max_kl: float | None = option(None, min=0, help="Gate: mean KL(fp32 || Core ML) (default 0.001 for --compress none).")
    fp16_safety: bool = option(True, cli="--no-fp16-safety", help="Do not rewrite overflowing ops (the report still lists them).")
    verify: bool = option(True, cli="--no-verify", help="Skip the MIL reference / Core ML comparison with PyTorch.")
    force: bool = option(False, help="Replace a non-empty output folder (only once the new one is complete).", in_recipe=False,
                         note="a bundle replaces its own previous output; --force is for a folder edgepack did not write")
    decode_steps: int = option(8, min=0, in_cli=False, help="Decode steps compared with PyTorch after the prefill.",
                               note="tuning of the verification, not a choice a user makes per bundle")
    fp16_margin: float = option(4.0, min=1, in_cli=False, help="Headroom factor below the fp16 limit that the safety pass keeps activations within.",
                                note="tuning of the fp16 safety pass, not a choice a user makes per bundle")

    def __post_init__(self):
        _validate(self)


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


def device_memory_limit(device_id: str, devices_dirs: tuple[Path, ...] = ()) -> tuple[int | None, str]:
    """(app memory limit in bytes or None, note) from the device database: built-in devices, then `devices_dirs`."""
    from edgepack.profiles.devices import get_device, load_devices

    device = get_device(device_id, load_devices(devices_dirs))
    figure = device.figure("memory", "app_memory_limit_mb")
    if figure is None or not isinstance(figure.value, (int, float)):
        return None, f"{device.path.name} has no memory.app_memory_limit_mb: memory check skipped"
    return int(figure.value * 1024 * 1024), f"{device_id}: app memory limit {figure.value} MB ({figure.source})"


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
    if config.shapes not in SHAPES:
        raise UsageError(f"--shapes must be one of {', '.join(SHAPES)}, not {config.shapes!r}")


def fixed_shapes(config: CoreMLConfig) -> bool:
    """Whether a decoder gets the fixed-shape Neural Engine program (`--shapes`, auto: for cpu_and_ne)."""
    return config.shapes == "fixed" or (config.shapes == "auto" and config.compute_units == "cpu_and_ne")


@dataclass
class _Plan:
    """Step 1 (read source): the Hugging Face source, its kind, the context and the device's memory limit."""

    source: _Source
    kind: str | None  # "decoder" | "encoder" (None: not a supported architecture)
    context: int
    limit: int | None  # app memory limit in bytes (--device)
    device_note: str | None
    architecture: dict = field(default_factory=dict)  # decoders: architectures.check_decoder facts (sliding window)
    chunk: int | None = None  # decoders with fixed shapes: tokens per prefill call (None: the flexible program)
    parts: list = field(default_factory=list)  # fixed shapes: (package name, (first layer, last layer + 1), estimated bytes)


@dataclass
class _Compression:
    """Step 4: the compression scheme, and for the split embedding its fitted (and tuned) table."""

    scheme: object  # cm_convert.CompressionScheme
    applied_fixes: list  # coremltools compatibility fixes in effect for the conversion
    column_weights: object = None
    split_table: object = None
    tuning: dict | None = None


@dataclass
class _Package:
    """Step 5 (convert + save): the saved .mlpackage(s) and what was applied to make them."""

    path: Path  # the package (the first part of a split model)
    bytes: int  # all packages
    flexible: list
    paths: list = field(default_factory=list)  # every package, in the order a token goes through them


def model_parts(layer_bytes: list[int], embedding_bytes: int, head_bytes: int, limit: int, parts: int = 0) -> list[tuple[int, int, int]]:
    """The decoder layers split into `parts` runs of consecutive layers (0: the fewest whose estimated weights each
    fit `limit`), as even in layer count as possible: (start, stop, estimated bytes) each, the first part holding
    the embedding and the last the head."""
    count = len(layer_bytes)

    def split(n):
        bounds = [round(i * count / n) for i in range(n + 1)]
        return [(a, b, sum(layer_bytes[a:b]) + (embedding_bytes if a == 0 else 0) + (head_bytes if b == count and n > 1 else 0))
                for a, b in zip(bounds, bounds[1:])]

    if parts:
        return split(min(parts, count))
    for n in range(1, count + 1):
        runs = split(n)
        if max(size for _a, _b, size in runs) <= limit:
            return runs
    return split(count)


def _model_parts(hf_model, plan: _Plan, config: CoreMLConfig) -> list:
    """Step 3b (fixed shapes): which layers go in which package, from the weights' estimated compressed size."""
    from edgepack.targets.coreml_support.ane import ANE_WEIGHT_FILE_LIMIT

    bits = _BITS[config.compress] / 8
    embedding_bits = 8.25 / 8 if config.compress == "int4-block" and config.embedding == "int8" else bits
    layer_bytes = [int(sum(p.numel() for p in layer.parameters()) * bits) for layer in hf_model.model.layers]
    # One package holds a tied table once; split, the first part holds it for the lookup and the last again for
    # the logits (an untied head is counted with the last part only when split: approximate for one package).
    table = int(hf_model.get_input_embeddings().weight.numel() * embedding_bits)
    head = int(hf_model.lm_head.weight.numel() * embedding_bits)
    runs = model_parts(layer_bytes, table, head, ANE_WEIGHT_FILE_LIMIT, config.model_parts)
    names = [PACKAGE] if len(runs) == 1 else [f"model-{i + 1:05d}-of-{len(runs):05d}.mlpackage" for i in range(len(runs))]
    return [(name, (start, stop), size) for name, (start, stop, size) in zip(names, runs)]


def _plan(directory, config: CoreMLConfig) -> _Plan:
    source = read_source(Path(directory))
    kind = "decoder" if source.model_type in DECODER_TYPES else "encoder" if source.model_type in ENCODER_TYPES else None
    max_pos = int(source.config.get("max_position_embeddings") or 512)
    context = min(config.max_context or (512 if kind == "decoder" else 128), max_pos)
    device_note, limit = None, None
    if config.device:
        limit, device_note = device_memory_limit(config.device, config.devices_dirs)
    architecture = check_decoder(source.config, context, TARGET) if kind == "decoder" else {}
    return _Plan(source, kind, context, limit, device_note, architecture, _prefill_chunk(kind, context, config))


def _prefill_chunk(kind: str | None, context: int, config: CoreMLConfig) -> int | None:
    """Tokens per prefill call of the Neural Engine program (cut to the context); None for the flexible program."""
    return min(config.prefill_chunk, context) if kind == "decoder" and fixed_shapes(config) else None


def _load_checked(plan: _Plan, config: CoreMLConfig, timings: dict, status):
    """Step 2 (load): the fp32 PyTorch model and tokenizer, refused unless the converter takes them."""
    from edgepack._quiet import quiet_libraries
    from edgepack.targets.base import timed

    quiet_libraries()
    from edgepack.targets.coreml_support import compat

    compat.quiet()
    source, kind = plan.source, plan.kind
    status(f"loading {source.model_type} weights from {source.hf_dir}")
    with timed(timings, "load", digits=None):
        hf_model, tokenizer = _load(source, kind)
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
    return hf_model, tokenizer


def _check_memory(hf_model, plan: _Plan, config: CoreMLConfig) -> int:
    """Step 3: refuse a model larger than the device's app memory limit before converting; returns the KV-state bytes."""
    params = sum(p.numel() for n, p in hf_model.named_parameters() if "lm_head" not in n or not plan.source.config.get("tie_word_embeddings", True))
    state_bytes = 0
    if plan.kind == "decoder":
        cfg = hf_model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if plan.chunk:  # the Neural Engine program stores heads padded to a multiple of 32 (wrappers.FixedShapeDecoder)
            head_dim += -head_dim % 32
        state_bytes = 2 * cfg.num_hidden_layers * (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads) * plan.context * head_dim * 2
    estimate = int(params * _BITS[config.compress] / 8) + state_bytes
    if plan.limit is not None and estimate > plan.limit:
        raise BadInputError(
            f"model too large for {config.device}: about {estimate / 2**20:.0f} MB (weights at {config.compress} + KV cache) "
            f"> app memory limit {plan.limit / 2**20:.0f} MB; try --compress int4-block or a smaller --max-context"
        )
    return state_bytes


def _fp16_plan(hf_model, tokens: list[int], plan: _Plan, config: CoreMLConfig, timings: dict, status):
    """Step 4a (fp16 safety): activation ranges on the evaluation text decide which ops to rewrite."""
    from edgepack.core.windows import split_windows
    from edgepack.targets.base import timed
    from edgepack.targets.coreml_support import fp16 as fp16_pass

    status("fp16 safety pass: recording activation ranges on the evaluation text")
    with timed(timings, "fp16_safety", digits=None):
        windows = split_windows(tokens, min(plan.context, 512), count=2, min_length=1)
        return fp16_pass.analyse(hf_model, windows, kind=plan.kind, margin=config.fp16_margin, enabled=config.fp16_safety)


def _compression(hf_model, tokenizer, plan: _Plan, config: CoreMLConfig, timings: dict, status) -> _Compression:
    """Step 4b: the scheme (coremltools' compatibility fixes applied); the split embedding's table is fitted (and tuned) here, before conversion."""
    from edgepack.targets.base import timed
    from edgepack.targets.coreml_support import compat
    from edgepack.targets.coreml_support import convert as cm_convert

    applied_fixes = compat.apply()
    scheme = cm_convert.CompressionScheme(
        config.compress, config.block_size, config.embedding, integer_offsets=config.integer_offsets, split_rows=config.split_rows,
        split_block=config.split_block, split_bits=config.split_bits, split_levels=config.split_levels, block_scales=config.block_scales)
    result = _Compression(scheme, applied_fixes)
    if not (config.compress == "int4-block" and config.embedding == "split" and plan.kind == "decoder"):
        return result
    from edgepack.targets.coreml_support.table_tuning import SEQUENCE_TOKENS, tune_split_table

    result.column_weights = _table_column_weights(hf_model, tokenizer)
    table = hf_model.get_input_embeddings().weight.detach().float().numpy()
    result.split_table = cm_convert.fit_split_table(table, config.split_rows, config.split_block, result.column_weights,
                                                    config.split_bits, config.split_levels)
    if config.tune_steps:
        with timed(timings, "table_tuning", digits=None):
            result.split_table, result.tuning = tune_split_table(
                hf_model, tokenizer, result.split_table, steps=config.tune_steps, projection_block=config.block_size,
                integer_offsets=config.integer_offsets, block_scales=config.block_scales,
                sequence_tokens=min(SEQUENCE_TOKENS, plan.context), on_status=status)
    return result


@dataclass
class _Reference:
    """Step 4c: what verification feeds the package, and the fp32 PyTorch outputs it is compared with."""

    kind: str
    ids: object  # decoder: the token ids (prefill, then one a decode step); encoder: int32 (1, context)
    outputs: object  # decoder: logits (positions, vocab); encoder: last hidden state (tokens, hidden)
    steps: int = 0  # decoder: single-token decode steps after the prefill
    mask: object = None  # encoder: attention mask (1, context)
    chunk: int | None = None  # decoder, Neural Engine program: tokens per prefill call
    context: int = 0  # decoder: KV-cache length


def _reference(hf_model, tokens: list[int], plan: _Plan, config: CoreMLConfig, timings: dict, status) -> _Reference | None:
    """Step 4c: the PyTorch outputs verification needs, computed before conversion so the model can be freed
    once it is converted (compression and verification then hold only the program's weights)."""
    from edgepack.targets.base import timed

    if not config.verify:
        return None
    status("fp32 PyTorch reference outputs for verification")
    with timed(timings, "reference", digits=None):
        return _reference_outputs(hf_model, tokens, plan.kind, plan.context, config, plan.chunk)


def _reference_outputs(hf_model, tokens: list[int], kind: str, context: int, config: CoreMLConfig, chunk: int | None = None) -> _Reference:
    import numpy as np
    import torch

    if kind == "decoder":
        n = min(config.eval_positions, context, len(tokens))
        ids = tokens[:n]
        with torch.no_grad():
            logits = hf_model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().numpy()
        return _Reference(kind, ids, logits, steps=min(config.decode_steps, n - 1), chunk=chunk, context=context)
    n = min(context, len(tokens))
    ids = np.zeros((1, context), dtype=np.int32)
    ids[0, :n] = tokens[:n]
    mask = np.zeros((1, context), dtype=np.int32)
    mask[0, :n] = 1
    with torch.no_grad():
        hidden = hf_model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state[0]
    return _Reference(kind, ids, hidden.numpy()[:n].copy(), mask=mask)


def _convert(hf_model, fp16_plan, compression: _Compression, plan: _Plan, config: CoreMLConfig, timings: dict, status):
    """Step 5a: the fp16 ML Program (stateful KV cache or fixed shape), uncompressed; returns (MLModel, flexible inputs)."""
    from edgepack.targets.base import timed
    from edgepack.targets.coreml_support import convert as cm_convert

    kind, source, scheme = plan.kind, plan.source, compression.scheme
    if plan.chunk:
        from edgepack.targets.coreml_support.verify import DECODE, PREFILL

        split = f", {len(plan.parts)} packages" if len(plan.parts) > 1 else ""
        status(f"converting to a Core ML ML Program (Neural Engine: prefill of {plan.chunk} tokens and decode of 1, fixed shapes, fp16{split})")
        with timed(timings, "convert", digits=None):
            packages = {}
            for package_name, layers, _estimate in plan.parts:
                packages[package_name] = {
                    name: cm_convert.convert_decoder_fixed(
                        hf_model, model_type=source.model_type, max_context=plan.context, query=query, plan=fp16_plan,
                        compute_units=config.compute_units, deployment_target=scheme.deployment_target, layers=layers)[0]
                    for name, query in ((PREFILL, plan.chunk), (DECODE, 1))}
            return packages, []
    status(f"converting to a Core ML ML Program ({'stateful KV cache' if kind == 'decoder' else 'fixed shape'}, fp16)")
    with timed(timings, "convert", digits=None):
        if kind == "decoder":
            mlmodel = cm_convert.convert_decoder(hf_model, model_type=source.model_type, max_context=plan.context, plan=fp16_plan,
                                                 compute_units=config.compute_units, deployment_target=scheme.deployment_target)
            return mlmodel, ["input_ids[1]", "causal_mask[2]", "causal_mask[3]"]
        mlmodel = cm_convert.convert_encoder(hf_model, model_type=source.model_type, seq_len=plan.context, plan=fp16_plan,
                                             compute_units=config.compute_units)
        return mlmodel, []


def _compress_and_save(mlmodel, flexible: list, compression: _Compression, plan: _Plan, directory, config: CoreMLConfig,
                       tmp: Path, timings: dict, status) -> _Package:
    """Step 5b: the program compressed (weight by weight, read back from the converted package) and saved with the side files."""
    from edgepack.targets.base import timed
    from edgepack.targets.coreml_support import compat
    from edgepack.targets.coreml_support import convert as cm_convert

    kind, source, scheme = plan.kind, plan.source, compression.scheme
    package = tmp / PACKAGE
    paths = [package]
    if isinstance(mlmodel, dict):  # the Neural Engine program: package name -> its functions
        paths = [tmp / name for name in mlmodel]
        package = paths[0]
        for path in paths:
            _save_functions(mlmodel.pop(path.name), compression, plan, config, path, timings, status)
            compat.make_package_reproducible(path)
    else:
        if config.compress != "none":
            status(f"compressing weights ({config.compress})")
            with timed(timings, "compress", digits=None):
                mlmodel = cm_convert.compress(mlmodel, scheme, column_weights=compression.column_weights, split_table=compression.split_table)
        _describe(mlmodel, source, kind, plan.context, scheme)
        mlmodel.save(str(package))
        compat.make_package_reproducible(package)
    copy_side_files(tmp, Path(directory), source.hf_dir)
    package_bytes = sum(p.stat().st_size for path in paths for p in path.rglob("*") if p.is_file())
    return _Package(package, package_bytes, flexible, paths)


def _save_functions(functions: dict, compression: _Compression, plan: _Plan, config: CoreMLConfig, package: Path, timings: dict, status) -> None:
    """Step 5b for the Neural Engine program: each function compressed alike, its token lookup made direct, saved on
    its own, then all in one multifunction package (a weight the functions hold identically is stored once)."""
    import shutil

    from edgepack.targets.base import timed
    from edgepack.targets.coreml_support import convert as cm_convert
    from edgepack.targets.coreml_support.verify import DECODE

    parts = package.parent / "_functions"
    parts.mkdir(exist_ok=True)
    saved = {}
    for name in list(functions):
        mlmodel = functions.pop(name)
        if config.compress != "none":
            status(f"compressing weights ({config.compress}, {name} function)")
            with timed(timings, "compress", digits=None, add=True):
                mlmodel = cm_convert.compress(mlmodel, compression.scheme, column_weights=compression.column_weights,
                                              split_table=compression.split_table)
        mlmodel = cm_convert.direct_token_lookup(mlmodel)
        _describe(mlmodel, plan.source, plan.kind, plan.context, compression.scheme)
        saved[name] = parts / f"{name}.mlpackage"
        mlmodel.save(str(saved[name]))
        del mlmodel
    status(f"joining the prefill and decode functions into {package.name} (weights stored once)")
    cm_convert.save_multifunction(saved, package, default=DECODE)
    shutil.rmtree(parts)


def _ane_report(package: _Package, config: CoreMLConfig, status):
    """Step 6: ANE readiness, by static inspection of the saved program; returns (report, the loaded program),
    the program read once for this and the MIL reference verification (a dict of functions for the Neural Engine
    program, sharing their state)."""
    from edgepack.targets.coreml_support import ane
    from edgepack.targets.coreml_support.mil_reference import function_names, load_functions, load_program

    status("ANE readiness report (static inspection of the saved program)")
    weight_files = {path.name: sum(f.stat().st_size for f in path.rglob("weight.bin")) for path in package.paths}
    names = function_names(package.path)
    if names == ["main"]:
        program = load_program(package.path)
        functions = {"main": program.function}
    else:
        program = [load_functions(path, names) for path in package.paths]  # one dict of functions per package
        functions = {_function_label(package, path, name): loaded.function
                     for path, part in zip(package.paths, program) for name, loaded in part.items()}
    report = ane.report(functions, size_bytes=package.bytes, flexible_inputs=package.flexible, weight_files=weight_files)
    report["placement"] = _placement(package, config)
    return report, program


def _function_label(package: _Package, path: Path, name: str) -> str:
    """A function's name in the report: prefixed by its package's when the model is split into several."""
    return f"{path.stem}/{name}" if len(package.paths) > 1 else name


def _placement(package: _Package, config: CoreMLConfig) -> dict:
    """Where Core ML itself places the ops (MLComputePlan, macOS only): the measured side of the static report."""
    from edgepack.targets.coreml_support import verify

    available, reason = verify.coreml_runtime_available()
    if not available:
        return {"skipped": reason}
    try:
        placements = {path: verify.neural_engine_placement(path, config.compute_units) for path in package.paths}
        return {"measured_by": "MLComputePlan", "compute_units": config.compute_units,
                "functions": {_function_label(package, path, name): figures
                              for path, placement in placements.items() for name, figures in placement["functions"].items()}}
    except Exception as exc:  # a compute plan Core ML cannot make is a finding of this report, not a failed build
        return {"error": f"MLComputePlan: {type(exc).__name__}: {exc}"}


def coreml_gates(fp16_plan, tokenizer_check: dict, need: int | None, plan: _Plan, parity_figures: dict | None,
                 config: CoreMLConfig) -> list:
    """Every pass/fail decision of the Core ML target, as gates named `<check>.<figure>`.

    Parity has default limits only for the uncompressed fp16 program; compressed schemes report figures."""
    from edgepack.targets.base import check_gate, figure_gate, flag_gate

    gates = [flag_gate(TARGET, "fp16_safety", "safe", not fp16_plan.unsafe, "ops overflow fp16: " + "; ".join(fp16_plan.unsafe)),
             check_gate(TARGET, "tokenizer_files", tokenizer_check)]
    if plan.limit is not None:
        gates.append(figure_gate(TARGET, "device_memory", "bytes_needed", need, plan.limit, "max", option="app memory limit", unit="B"))
    if parity_figures is None:
        return gates
    fp16 = config.compress == "none"
    if plan.kind == "decoder":
        min_top1 = config.min_top1 if config.min_top1 is not None else (FP16_MIN_TOP1 if fp16 else None)
        max_kl = config.max_kl if config.max_kl is not None else (FP16_MAX_KL if fp16 else None)
        gates += [flag_gate(TARGET, "parity", "finite", parity_figures["finite"], "non-finite logits (fp16 overflow)"),
                  figure_gate(TARGET, "parity", "top1_agreement", parity_figures["top1_agreement"], min_top1, "min", option="--min-top1"),
                  figure_gate(TARGET, "parity", "kl_mean", parity_figures["kl_mean"], max_kl, "max", option="--max-kl")]
    else:
        min_cos = ENCODER_MIN_COSINE if fp16 else None
        gates += [flag_gate(TARGET, "parity", "finite", parity_figures["finite"], "non-finite hidden states (fp16 overflow)"),
                  figure_gate(TARGET, "parity", "cosine_min", parity_figures["cosine_min"], min_cos, "min", option="min cosine")]
    return gates


def _checks(fp16_plan, package: _Package, program, state_bytes: int, tokenizer, reference: _Reference | None, plan: _Plan,
            config: CoreMLConfig, tmp: Path, timings: dict, status) -> tuple[dict, list, dict | None]:
    """Step 7 (verify): target.json `checks`, the gates that decide them, and the verification figures."""
    from edgepack.targets.base import timed, verdict
    from edgepack.targets.tokenizer_check import check_tokenizer_files

    # The app's tokenizer (swift-transformers) reads the shipped files: they must tokenize as the source does.
    tokenizer_check = check_tokenizer_files(tmp, tokenizer)
    need = package.bytes + state_bytes
    verification, figures = None, None
    if reference is not None:
        status("verifying with the MIL reference interpreter against fp32 PyTorch")
        with timed(timings, "verify", digits=None):
            verification = _compare(package.paths, reference, config, program)
        figures = _parity_figures(verification)
    gates = coreml_gates(fp16_plan, tokenizer_check, need, plan, figures, config)
    checks: dict = {"fp16_safety": {"passed": verdict(gates, "fp16_safety"), "unsafe": fp16_plan.unsafe, "low_headroom": fp16_plan.warnings,
                                    "rewritten_ops": len(fp16_plan.rewrites)},
                    "tokenizer_files": {**tokenizer_check, "passed": verdict(gates, "tokenizer_files")}}
    if plan.limit is not None:
        checks["device_memory"] = {"passed": verdict(gates, "device_memory"), "device": config.device, "bytes_needed": need,
                                   "limit_bytes": plan.limit, "basis": "package size + fp16 KV-cache state; activations not counted"}
    if verification is not None:
        checks["parity"] = _parity_check(verification, figures, plan.kind, gates)
    return checks, gates, verification


def _facts(plan: _Plan, package: _Package, compression: _Compression, fp16_plan, ane_report: dict, state_bytes: int,
           verification, config: CoreMLConfig) -> dict:
    scheme, tuning, kind = compression.scheme, compression.tuning, plan.kind
    return {
        "format": "mlprogram (.mlpackage)",
        "deployment_target": {"iOS18": "iOS 18 / macOS 15", "iOS26": "iOS 26 / macOS 26"}[scheme.deployment_target],
        "kind": kind,
        "model_type": plan.source.model_type,
        **({"architecture": plan.architecture} if plan.architecture else {}),
        "compute_units": config.compute_units,
        "compute_precision": "fp16",
        "compression": scheme.describe() | ({"table_tuning": tuning} if tuning else {}),
        "io": _io_facts(kind, plan.context, ane_report, plan.chunk, [name for name, _layers, _estimate in plan.parts]),
        "program": ({"shapes": "fixed", "functions": ["prefill", "decode"], "prefill_chunk": plan.chunk,
                     "why": "the Neural Engine compiles static shapes only (see ane.rules static-shapes)",
                     "packages": [{"package": name, "layers": [start, stop - 1], "weight_bytes": ane_report["weight_files"].get(name),
                                   "estimated_weight_bytes": estimate} for name, (start, stop), estimate in plan.parts],
                     **({"split": f"{len(plan.parts)} packages of consecutive layers: each package's weights stay under the 1 GiB "
                                  "iOS loads on the Neural Engine (ane.rules weight-file-size)"} if len(plan.parts) > 1 else {})}
                    if plan.chunk else {"shapes": "flexible" if kind == "decoder" else "fixed", "functions": ["main"]}),
        "package_bytes": package.bytes,
        "kv_cache_bytes": state_bytes,
        "fp16_safety": fp16_plan.to_json(),
        "ane": ane_report,
        "verification": verification,
        "device": {"id": config.device, "note": plan.device_note} if config.device else None,
        "compat_fixes": compression.applied_fixes,
    }


def build(directory, out, config: CoreMLConfig = CoreMLConfig(), on_status=None):
    """read source -> load -> memory check -> fp16 plan + compression -> convert + save -> ANE report -> verify -> write."""
    from edgepack.outputs import prepare_output, replace_dir, staging_dir
    from edgepack.targets.base import TargetArtifact, write_target_json

    status = on_status or (lambda message: None)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(out)
    prepare_output(out, config.force)
    plan = _plan(directory, config)
    hf_model, tokenizer = _load_checked(plan, config, timings, status)
    state_bytes = _check_memory(hf_model, plan, config)
    if plan.chunk:
        plan.parts = _model_parts(hf_model, plan, config)
    tokens = _eval_tokens(tokenizer, config, plan.source)
    fp16_plan = _fp16_plan(hf_model, tokens, plan, config, timings, status)
    compression = _compression(hf_model, tokenizer, plan, config, timings, status)
    reference = _reference(hf_model, tokens, plan, config, timings, status)
    with staging_dir(out) as tmp:
        mlmodel, flexible = _convert(hf_model, fp16_plan, compression, plan, config, timings, status)
        # Every step that reads the PyTorch model has run: its weights are freed before compression and
        # verification, which then hold only the program's (peak memory: the fp32 model + its fp16 program).
        del hf_model
        gc.collect()
        package = _compress_and_save(mlmodel, flexible, compression, plan, directory, config, tmp, timings, status)
        del mlmodel
        gc.collect()
        ane_report, program = _ane_report(package, config, status)
        checks, gates, verification = _checks(fp16_plan, package, program, state_bytes, tokenizer, reference, plan, config, tmp,
                                              timings, status)
        del program
        artifact = TargetArtifact(
            out=out, target=TARGET, facts=_facts(plan, package, compression, fp16_plan, ane_report, state_bytes, verification, config),
            checks=checks,
            source={"directory": str(Path(directory).resolve()), "hf_dir": str(plan.source.hf_dir), "convert": plan.source.report.get("source")},
            versions=_versions(),
            seconds={},
            gates=gates,
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

    from edgepack.core.texts import calibration_text
    from edgepack.core.windows import token_ids

    if tokenizer is None:
        return None
    text, _origin = calibration_text()
    ids = token_ids(tokenizer, text, vocab_size=hf_model.get_input_embeddings().num_embeddings)[:512]
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
    if source.model_type in DECODER_TYPES:
        from edgepack.targets.architectures import ACTIVATIONS, DECODERS

        arch, layer = DECODERS[source.model_type], model.model.layers[0]
        for owner, names in ((layer.self_attn, arch.attention_modules()), (layer.mlp, arch.mlp_modules()), (layer, arch.layer_norms())):
            for name in names:
                if not hasattr(owner, name):
                    raise UnsupportedModelError(f"model_type {source.model_type!r}: op {type(owner).__name__} has no {name}")
        act = getattr(model.config, "hidden_act", None) or getattr(model.config, "hidden_activation", None) or "silu"
        if act not in ACTIVATIONS:
            raise UnsupportedModelError(f"model_type {source.model_type!r}: activation op {act!r} is not supported ({', '.join(ACTIVATIONS)})")
    if source.model_type == "bert" and getattr(model.config, "position_embedding_type", "absolute") != "absolute":
        raise UnsupportedModelError(f"model_type 'bert': position embedding op {model.config.position_embedding_type!r} is not supported")


def _eval_tokens(tokenizer, config: CoreMLConfig, source: _Source) -> list[int]:
    from edgepack.core.texts import eval_text
    from edgepack.core.windows import token_ids, vocab_size_of

    text, _origin = eval_text(config.eval_text)
    if tokenizer is None:
        vocab = int(source.config.get("vocab_size") or 100)
        return [(7 * i + 3) % vocab for i in range(1024)]
    return token_ids(tokenizer, text, vocab_size=vocab_size_of(source.config))


def _verify(package: Path, hf_model, tokens: list[int], kind: str, context: int, config: CoreMLConfig) -> dict:
    """The package against the PyTorch model on `tokens` (what `build` does in two steps, for re-verification)."""
    return _compare(package, _reference_outputs(hf_model, tokens, kind, context, config, _prefill_chunk(kind, context, config)), config)


def _compare(package, reference: _Reference, config: CoreMLConfig, program=None) -> dict:
    """The package's outputs (MIL reference on `program` when loaded, else the package's; Core ML too on macOS)
    against the PyTorch reference outputs. `package`: a path, or the packages of a split model in order."""
    from edgepack.core.texts import EVAL_TEXT, text_label
    from edgepack.targets.coreml_support import verify

    packages = list(package) if isinstance(package, (list, tuple)) else [package]
    package = packages[0]

    result: dict = {"eval_text": text_label(config.eval_text, EVAL_TEXT)}
    kind, ids, steps, mask, expected = reference.kind, reference.ids, reference.steps, reference.mask, reference.outputs
    n = expected.shape[0]
    chunk, context = reference.chunk, reference.context
    if kind == "decoder" and chunk:
        logits, timing = verify.run_fixed_decoder_mil(packages, ids, steps, chunk, context, programs=program)
        result["mil-reference"] = {"verified_by": "mil-reference", "prefill_tokens": n - steps, "prefill_chunks": -(-(n - steps) // chunk),
                                   "prefill_chunk": chunk, "decode_steps": steps, **verify.fp16_logit_figures(expected, logits), "seconds": timing}
    elif kind == "decoder":
        logits, timing = verify.run_decoder_mil(program if program is not None else package, ids, steps)
        result["mil-reference"] = {"verified_by": "mil-reference", "prefill_tokens": n - steps, "decode_steps": steps,
                                   **verify.fp16_logit_figures(expected, logits), "seconds": timing}
    else:
        hidden = verify.run_encoder_mil(program if program is not None else package, ids, mask)
        result["mil-reference"] = {"verified_by": "mil-reference", **verify.fp16_hidden_state_figures(expected, hidden[:n])}
    available, reason = verify.coreml_runtime_available()
    if available:
        if kind == "decoder" and chunk:
            logits = verify.run_fixed_decoder_coreml(packages, ids, steps, chunk, context, config.compute_units)
            result["coreml-runtime"] = {"verified_by": "coreml-runtime", "compute_units": config.compute_units,
                                        **verify.fp16_logit_figures(expected, logits)}
        elif kind == "decoder":
            logits = verify.run_decoder_coreml(package, ids, steps, config.compute_units)
            result["coreml-runtime"] = {"verified_by": "coreml-runtime", **verify.fp16_logit_figures(expected, logits)}
        else:
            hidden = verify.run_encoder_coreml(package, ids, mask, config.compute_units)
            result["coreml-runtime"] = {"verified_by": "coreml-runtime", **verify.fp16_hidden_state_figures(expected, hidden[:n])}
    else:
        result["coreml-runtime"] = {"skipped": reason}
    result["verified_by"] = "coreml-runtime" if available else "mil-reference"
    return result


def _parity_figures(verification: dict) -> dict:
    """The figures parity is gated on: Core ML's own when it ran (macOS), else the MIL reference's."""
    runtime = verification.get("coreml-runtime", {})
    return runtime if "verified_by" in runtime else verification["mil-reference"]


def _parity_check(verification: dict, figures: dict, kind: str, gates: list) -> dict:
    """target.json's `parity` entry: the verdict and limits of the parity gates, with the figures they read."""
    from edgepack.targets.base import gate_check, verdict

    parity = {gate.name.split(".", 1)[1]: gate for gate in gates if gate_check(gate) == "parity"}
    failures = [gate.message for gate in parity.values() if gate.failed]
    if kind == "decoder":
        gate = {"min_top1": parity["top1_agreement"].limit, "max_kl": parity["kl_mean"].limit}
        summary = {"top1_agreement": figures["top1_agreement"], "top1_ci95": figures["top1_ci95"], "near_tie_positions": figures["near_tie_positions"],
                   "kl_mean": figures["kl_mean"], "max_abs_logit_diff": figures["max_abs_logit_diff"]}
    else:
        gate = {"min_cosine": parity["cosine_min"].limit}
        summary = {"cosine_min": figures["cosine_min"], "max_abs_diff": figures["max_abs_diff"]}
    return {"passed": verdict(gates, "parity"), "verified_by": verification["verified_by"], "gate": gate, "failures": failures,
            "positions": figures["positions"], **summary}


def _io_facts(kind: str, context: int, ane_report: dict, chunk: int | None = None, packages: list | None = None) -> dict:
    if kind == "decoder" and chunk:
        from edgepack.targets.coreml_support.verify import MASK_MIN

        outputs = list(ane_report["functions"].values())[-1]["outputs"]  # the last package's
        split = {"packages": (f"{len(packages)} packages, each with the two functions and its own state (its layers' cache): the first takes "
                              "input_ids and returns output_hidden_states fp16 (1, q, hidden); each next one takes them as hidden_states "
                              "with the same causal_mask and positions; the last returns the logits")} if packages and len(packages) > 1 else {}
        return {
            **split,
            "functions": {"prefill": f"{chunk} tokens a call", "decode": "1 token a call", "default": "decode"},
            "inputs": {"input_ids": "int32 (1, q): q = the function's tokens; a last, shorter prompt chunk is padded with any id",
                       "causal_mask": f"fp16 (1, 1, q, {context}), additive: row i is 0 at the slots token i may attend (0 .. its position), "
                                      f"{MASK_MIN:g} elsewhere (padding rows: {MASK_MIN:g} everywhere)",
                       "positions": f"fp16 (1, q, {context}) one-hot: row i has a 1 at the cache slot (position) of token i; padding rows all 0"},
            "outputs": ({"logits": "fp16 (1, q, vocab)"} if outputs == ["logits"] else
                        {name: "fp16 (1, q, a slice of the vocabulary of at most 65536 tokens, in order): join them along the last axis"
                         for name in outputs}),
            "states": {s["name"]: f"{s['dtype']} {s['shape']} (layers, kv_heads, context, head_dim zero-padded to a multiple of 32)"
                       for s in ane_report["states"]},
            "usage": (f"one state per conversation (make_state() on the decode function; both functions read and write it); feed the prompt "
                      f"to prefill in chunks of {chunk} tokens at positions 0, {chunk}, ... (pad the last), take the logits of its last real "
                      f"token, then call decode with one token at each next position; the context ends at {context} tokens"),
        }
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
Decoder LLMs (llama, mistral, qwen2, qwen3, phi3, gemma, gemma2, granite):
stateful KV cache (ct.StateType), one function for prefill (q tokens) and
decode (q = 1); other decoders are refused (exit 3). Encoders (bert): fixed
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
@click_options(CoreMLConfig)
def command(directory, out, **options):
    config = config_from_cli(CoreMLConfig, options)
    from edgepack.core.console import Status

    with Status(f"building Core ML target from {directory}") as status:
        artifact = build(directory, out, config, on_status=status)
    _print_summary(artifact)
    failure = artifact.failure_message("Core ML target check failed")
    if failure:
        raise GateFailedError(failure)


def _print_summary(artifact) -> None:
    from edgepack.core.console import stdout_console

    facts = artifact.facts
    lines = [f"edgepack target coreml -> {artifact.out}",
             f"  {facts['kind']} {facts['model_type']}, {facts['compression']['name']}, {facts['package_bytes'] / 1e6:.1f} MB package"
             + (f", KV cache {facts['kv_cache_bytes'] / 1e6:.1f} MB" if facts["kv_cache_bytes"] else ""),
             *([f"  Neural Engine program: prefill ({facts['program']['prefill_chunk']} tokens) + decode (1 token), fixed shapes, one copy of the weights"
                + (f", split into {len(facts['program']['packages'])} packages of consecutive layers" if len(facts["program"]["packages"]) > 1 else "")]
               if facts.get("program", {}).get("prefill_chunk") else []),
             f"  fp16 safety: {facts['fp16_safety']['rewritten_ops']} ops rewritten" + (f", UNSAFE: {facts['fp16_safety']['unsafe']}" if facts["fp16_safety"]["unsafe"] else "")]
    parity = artifact.checks.get("parity")
    if parity:
        if "top1_agreement" in parity:
            low, high = parity["top1_ci95"]
            lines.append(f"  parity ({parity['verified_by']}, {parity['positions']} positions): top-1 {parity['top1_agreement']:.3f} "
                         f"(95% CI {low:.3f}-{high:.3f}; {parity['near_tie_positions']} near ties in fp32), "
                         f"KL {parity['kl_mean']:.2e}, max |logit diff| {parity['max_abs_logit_diff']:.3g} -> {'PASS' if parity['passed'] else 'FAIL'}")
        else:
            lines.append(f"  parity ({parity['verified_by']}): min cosine {parity['cosine_min']:.5f}, max |diff| {parity['max_abs_diff']:.3g} "
                         f"-> {'PASS' if parity['passed'] else 'FAIL'}")
    for unit, verdict in facts["ane"]["verdicts"].items():
        lines.append(f"  {unit}: {verdict}")
    stdout_console().print("\n".join(lines), markup=False)
