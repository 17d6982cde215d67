"""ExecuTorch target: a `.pte` program for ExecuTorch's runtime, delegated to XNNPACK (CPUs), Core ML (Apple) or
QNN (Qualcomm NPUs), from the PyTorch weights the export came from.

Decoder LLMs keep their KV cache as program state (a static cache of --max-context slots held in mutable
buffers) behind one `forward(input_ids, cache_position) -> logits` method, the signature ExecuTorch's LLM runner
calls: a prefill of any length, then one token per call (Core ML: one token per call, fixed shapes). Encoders
(bert) are `forward(input_ids, attention_mask) -> last_hidden_state`. Quantization is torchao's, as ExecuTorch's
own LLM export does it (8da4w on XNNPACK: int8 dynamic activations, int4 weights in groups).

Verified here: the XNNPACK program runs in ExecuTorch's runtime (its Python bindings over the same C++ runtime
and kernels an app links) against the PyTorch model with the same weights (greedy tokens, top-1, KL) and against
fp32 (the quantization's quality), and is timed. The Core ML and QNN programs are built where their lowering
runs and checked structurally (what the delegate took, what fell back). Heavy libraries are imported in `build`.
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

from edgepack.core.files import copy_side_files
from edgepack.core.versions import MODEL_PACKAGES
from edgepack.errors import GateFailedError, NotOnThisHostError, UnsupportedModelError, UsageError
from edgepack.options import click_options, config_from_cli, option
from edgepack.targets.architectures import DECODER_TYPES

SUMMARY = "ExecuTorch .pte (XNNPACK, Core ML, QNN delegates): KV cache as program state, torchao 8da4w, run and verified in ExecuTorch."
# Converts from the PyTorch weights with torchao's quantization: `edgepack build` runs it once, on fp32.
USES_QUANTIZED_SOURCE = False
TARGET = "executorch"
# (onnxruntime-genai: imported by the Core ML target's module, whose source reader this one shares)
CACHE_PACKAGES = ("executorch", "torchao", "coremltools", "onnxruntime-genai", *MODEL_PACKAGES)
PROGRAM = "model.pte"


def not_reproducible(folder: Path) -> dict:
    """Files of a built folder a rebuild does not reproduce byte for byte (see edgepack.build): XNNPACK programs are
    reproduced; a Core ML delegate program is not."""
    import json

    try:
        backend = json.loads((Path(folder) / "target.json").read_text())["facts"]["backend"]
    except (OSError, ValueError, KeyError):
        return {}
    if backend == "coreml":
        return {PROGRAM: "ExecuTorch names each Core ML delegate with a random identifier and coremltools stamps the conversion date"}
    return {}
ENCODER_TYPES = ("bert",)
BACKENDS = ("xnnpack", "coreml", "qnn")
QUANTIZE = ("auto", "none", "8da4w", "8da8w", "int8-weight", "int4-weight")
# Default gates, for programs whose weights are the source's own (--quantize none); quantized programs report
# their quality against fp32 and are gated only when asked. Parity with PyTorch on the same weights is always gated.
FP32_MIN_TOP1, FP32_MAX_KL, FP32_MIN_COSINE = 0.99, 0.001, 0.999
PARITY_MIN_TOP1 = 0.98  # an unquantized program against PyTorch
# A quantized program: KL(fp32 || program) <= this x KL(fp32 || PyTorch with the same weights), plus a floor for
# programs whose scheme costs almost nothing (see executorch_gates).
PARITY_MAX_KL_RATIO = 1.5
PARITY_KL_FLOOR = 1e-4
ENCODER_QUANTIZED_MIN_COSINE = 0.99  # a quantized encoder program against PyTorch with the same weights


@dataclass(frozen=True)
class ExecuTorchConfig:
    backend: str = option("xnnpack", choices=BACKENDS,
                          help="Delegate: xnnpack (Arm and x86 CPUs; runs and is verified here), coreml (Apple: Neural Engine, GPU, CPU), "
                               "qnn (Qualcomm Hexagon NPU; lowering needs the QNN SDK in QNN_SDK_ROOT).")
    quantize: str = option("auto", choices=QUANTIZE,
                           help="torchao scheme: 8da4w (int8 dynamic activations, int4 weights per --group-size), 8da8w (xnnpack); int8-weight, "
                                "int4-weight (coreml); none. auto: 8da4w for decoders on xnnpack, none otherwise.")
    group_size: int = option(32, choices=(32, 64, 128, 256), help="Weights per int4 group (8da4w, int4-weight).")
    embedding: str = option("auto", choices=("auto", "none", "int8", "int4"),
                            help="Token embedding table (xnnpack): int8 per row, int4 in groups of 32, or none (as the source). "
                                 "auto: int8 when --quantize quantizes, else none.")
    max_context: int | None = option(None, unit="tokens", help="Decoders: KV-cache length (default min(512, max positions)); encoders: "
                                                               "longest sequence (default 128).")
    threads: int | None = option(None, min=1, help="XNNPACK threads for verification and timing (default: ExecuTorch's, one per core).")
    eval_text: Path | None = option(None, help="UTF-8 text for verification (default: bundled English text).")
    eval_positions: int = option(64, min=8, help="Token positions compared with PyTorch.")
    min_top1: float | None = option(None, min=0, max=1, help="Gate: top-1 agreement with fp32 (default 0.99 for --quantize none).")
    max_kl: float | None = option(None, min=0, help="Gate: mean KL(fp32 || program) (default 0.001 for --quantize none).")
    min_cosine: float | None = option(None, min=-1, max=1, help="Gate, encoders: lowest per-token cosine with fp32 (default 0.999 for --quantize none).")
    verify: bool = option(True, cli="--no-verify", help="Skip running the program against PyTorch (xnnpack).")
    force: bool = option(False, help="Replace a non-empty output folder (only once the new one is complete).", in_recipe=False,
                         note="a bundle replaces its own previous output; --force is for a folder edgepack did not write")
    decode_steps: int = option(8, min=0, in_cli=False, help="Of the compared positions, the last ones fed one token a call (the cache path).",
                               note="tuning of the verification, not a choice a user makes per bundle")
    greedy_tokens: int = option(16, min=1, in_cli=False, help="Greedy tokens compared with PyTorch's.",
                                note="tuning of the verification, not a choice a user makes per bundle")
    prompt_len: int = option(128, min=1, in_cli=False, help="Prompt tokens of the timed runs (cut to fit the context).",
                             note="timing conditions; `edgepack profile` owns the full sweep")
    gen_len: int = option(32, min=2, in_cli=False, help="Generated tokens of the timed runs.", note="timing conditions; `edgepack profile` owns the full sweep")
    runs: int = option(3, min=1, in_cli=False, help="Timed runs (median).", note="timing conditions; `edgepack profile` owns the full sweep")

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise UsageError(f"unknown backend {self.backend!r}; choose one of: {', '.join(BACKENDS)}")
        if self.quantize not in QUANTIZE:
            raise UsageError(f"unknown quantization {self.quantize!r}; choose one of: {', '.join(QUANTIZE)}")
        from edgepack.targets.executorch_support.program import SCHEMES

        if self.quantize != "auto" and self.quantize not in SCHEMES[self.backend]:
            raise UsageError(f"--quantize {self.quantize} is not one the {self.backend} delegate runs; choose one of: {', '.join(SCHEMES[self.backend])}")
        if self.embedding not in ("auto", "none") and self.backend != "xnnpack":
            raise UsageError(f"--embedding {self.embedding} is run by ExecuTorch's quantized CPU kernels: it needs --backend xnnpack")
        if self.max_context is not None and not 8 <= self.max_context <= 32768:
            raise UsageError(f"--max-context must be between 8 and 32768, not {self.max_context}")


@dataclass
class _Plan:
    """Step 1 (read source): the Hugging Face source, its kind, the scheme and the program's shapes."""

    source: object  # coreml._Source
    kind: str
    scheme: str
    context: int
    dynamic: bool  # one method for any query length (xnnpack); else fixed shapes (coreml, qnn)
    runs_here: bool  # ExecuTorch's runtime here runs the delegate (xnnpack)
    embedding: str = "none"  # the token table's storage (program.EMBEDDINGS)


@dataclass
class _References:
    """Step 3: what verification feeds the program and the PyTorch outputs it is compared with."""

    ids: list  # decoder: evaluation token ids; encoder: (1, n) ids
    fp32: object  # decoder: logits (positions, vocab); encoder: hidden states (tokens, hidden)
    same_weights: object = None  # the same outputs of the quantized PyTorch model (None: the scheme is none)
    greedy: list = field(default_factory=list)  # decoder: greedy tokens of the (quantized) PyTorch model
    greedy_gaps: list = field(default_factory=list)  # at each of those steps, PyTorch's top-1/top-2 gap in nats
    prompt: list = field(default_factory=list)  # decoder: the greedy prompt
    mask: object = None  # encoder


@dataclass
class _Program:
    """Step 5: the saved program and what its delegate took."""

    path: Path
    bytes: int
    delegation: object  # program.Delegation
    constant_methods: dict
    llm_ops: bool = False  # the KV cache and attention are ExecuTorch's LLM kernels (custom_sdpa, update_cache)


def _plan(directory, config: ExecuTorchConfig) -> _Plan:
    from edgepack.targets.coreml import read_source
    from edgepack.targets.executorch_support.program import default_scheme, embedding_scheme, qnn_unavailable

    source = read_source(Path(directory))
    kind = "decoder" if source.model_type in DECODER_TYPES else "encoder" if source.model_type in ENCODER_TYPES else None
    if kind is None:
        raise UnsupportedModelError(f"model_type {source.model_type!r}: the executorch target takes decoders {', '.join(DECODER_TYPES)} "
                                    f"and encoders {', '.join(ENCODER_TYPES)}")
    if config.backend == "qnn":
        reason = qnn_unavailable()
        if reason:
            raise NotOnThisHostError(f"cannot build the QNN delegate program on this host: {reason}")
    max_pos = int(source.config.get("max_position_embeddings") or 512)
    context = min(config.max_context or (512 if kind == "decoder" else 128), max_pos)
    scheme = default_scheme(config.backend, kind) if config.quantize == "auto" else config.quantize
    dynamic = config.backend == "xnnpack"
    return _Plan(source, kind, scheme, context, dynamic, runs_here=config.backend == "xnnpack",
                 embedding=embedding_scheme(config.embedding, config.backend, scheme))


def _references(model, tokens: list[int], plan: _Plan, config: ExecuTorchConfig, status) -> _References | None:
    """Step 3: fp32 outputs (before quantization changes the model in place)."""
    import numpy as np

    from edgepack.targets.executorch_support import run

    if not (config.verify and plan.runs_here):
        return None
    status("fp32 PyTorch reference outputs")
    if plan.kind == "decoder":
        n = min(config.eval_positions, plan.context - 1, len(tokens))
        ids = tokens[:n]
        return _References(ids, run.torch_logits(model, ids), prompt=tokens[:min(16, n)])
    n = min(plan.context, len(tokens))
    ids = np.array([tokens[:n]], dtype=np.int64)
    mask = np.ones_like(ids)
    return _References(ids, run.torch_hidden(model, ids, mask), mask=mask)


def _same_weight_references(model, refs: _References | None, plan: _Plan, config: ExecuTorchConfig, status) -> None:
    """Step 4b: the quantized PyTorch model's outputs and greedy tokens, which the program must reproduce."""
    from edgepack.targets.executorch_support import run

    if refs is None:
        return
    status("PyTorch outputs with the program's weights")
    if plan.kind == "decoder":
        refs.same_weights = refs.fp32 if plan.scheme == plan.embedding == "none" else run.torch_logits(model, refs.ids)
        refs.greedy, refs.greedy_gaps = run.torch_greedy(model, refs.prompt, min(config.greedy_tokens, plan.context - len(refs.prompt) - 1))
    else:
        refs.same_weights = refs.fp32 if plan.scheme == plan.embedding == "none" else run.torch_hidden(model, refs.ids, refs.mask)


def _constant_methods(model, plan: _Plan) -> dict:
    """Metadata methods ExecuTorch's LLM runner reads from a decoder program."""
    if plan.kind != "decoder":
        return {}
    cfg = model.config
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id] if cfg.eos_token_id is not None else []
    methods = {"get_max_seq_len": plan.context, "get_max_context_len": plan.context, "get_vocab_size": int(cfg.vocab_size),
               "use_kv_cache": True, "enable_dynamic_shape": plan.dynamic, "get_eos_ids": [int(e) for e in eos]}
    if cfg.bos_token_id is not None:
        methods["get_bos_id"] = int(cfg.bos_token_id)
    return methods


def _export_and_lower(model, plan: _Plan, config: ExecuTorchConfig, tmp: Path, timings: dict, status) -> _Program:
    """Step 5: torch.export, lowering to the delegate, the .pte written."""
    from edgepack.targets.base import timed
    from edgepack.targets.executorch_support import program

    shapes = "any query length" if plan.dynamic else ("one token a call" if plan.kind == "decoder" else f"{plan.context} tokens")
    status(f"torch.export ({plan.kind}, {shapes}, context {plan.context})")
    llm_ops = program.uses_llm_ops(model, plan.kind, config.backend)
    with timed(timings, "export"):
        exported = program.export_program(model, plan.kind, plan.context, plan.dynamic, llm_ops)
    constant_methods = _constant_methods(model, plan)
    status(f"lowering to the {config.backend} delegate")
    with timed(timings, "lower"):
        try:
            manager, delegation = program.lower(exported, config.backend, constant_methods)
        except Exception as exc:  # the delegate's converter refused an op of this model, or QNN's SDK refused this host
            if config.backend == "qnn":
                raise NotOnThisHostError(f"cannot build the QNN delegate program on this host: ExecuTorch's QNN backend failed with the SDK in "
                                         f"QNN_SDK_ROOT ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); it needs the Qualcomm "
                                         "AI Engine Direct SDK release this executorch package was built against") from exc
            raise UnsupportedModelError(f"the {config.backend} delegate cannot lower this {plan.source.model_type} model: "
                                        f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from exc
    del exported
    path = tmp / PROGRAM
    with timed(timings, "write"):
        with open(path, "wb") as handle:
            manager.write_to_file(handle)
    return _Program(path, path.stat().st_size, delegation, constant_methods, llm_ops)


def _verify(prog: _Program, refs: _References | None, plan: _Plan, config: ExecuTorchConfig, timings: dict, status) -> dict:
    """Step 6: the program run in ExecuTorch against PyTorch (same weights and fp32), then timed."""
    from edgepack.core import metrics
    from edgepack.targets.base import timed

    # The Core ML target's comparison figures (top-1 with its interval, KL, max diff; cosine for hidden states).
    from edgepack.targets.coreml_support.verify import fp16_hidden_state_figures as _hidden_figures
    from edgepack.targets.coreml_support.verify import fp16_logit_figures as _logit_figures
    from edgepack.targets.executorch_support import run

    if not plan.runs_here:
        return {"skipped": f"ExecuTorch's {config.backend} delegate does not run on this host: checked structurally (delegation)"}
    if refs is None:
        return {"skipped": "--no-verify"}
    status("running the program in ExecuTorch against PyTorch")
    with timed(timings, "verify"):
        method = run.load_method(prog.path, config.threads)
        result: dict = {"runtime": "executorch", "threads": run.thread_count()}
        if plan.kind == "decoder":
            steps = min(config.decode_steps, len(refs.ids) - 1)
            logits = run.decoder_logits(method, refs.ids, steps)
            result["positions"], result["decode_steps"] = len(refs.ids), steps
            result["same_weights"] = _logit_figures(refs.same_weights, logits)
            result["fp32"] = _logit_figures(refs.fp32, logits)
            # What the scheme itself costs (PyTorch with the program's weights against fp32), and the program's share.
            result["pytorch_same_weights_vs_fp32"] = _logit_figures(refs.fp32, refs.same_weights)
            result["kl_ratio_to_pytorch"] = result["fp32"]["kl_mean"] / max(result["pytorch_same_weights_vs_fp32"]["kl_mean"], PARITY_KL_FLOOR)
            tokens = run.greedy(method, refs.prompt, len(refs.greedy))
            prefix = _prefix(tokens, refs.greedy)
            # Kernels that round differently can flip a step where PyTorch's two likeliest tokens nearly tie, and
            # every later token with it; a divergence at a decisive step is a real difference.
            diverged_gap = refs.greedy_gaps[prefix] if prefix < len(refs.greedy) else None
            result["greedy"] = {"prompt_tokens": len(refs.prompt), "tokens": tokens, "pytorch": refs.greedy, "equal": tokens == refs.greedy,
                                "agreeing_prefix": prefix, "divergence_gap_nats": diverged_gap,
                                "equal_up_to_near_tie": diverged_gap is None or diverged_gap < metrics.NEAR_TIE_NATS}
        else:
            hidden = run.encoder_hidden(method, refs.ids, refs.mask)
            result["positions"] = int(hidden.shape[0])
            result["same_weights"] = _hidden_figures(refs.same_weights, hidden)
            result["fp32"] = _hidden_figures(refs.fp32, hidden)
    status("timing the program in ExecuTorch")
    with timed(timings, "measure"):
        if plan.kind == "decoder":
            prompt_len = max(1, min(config.prompt_len, plan.context - config.gen_len - 1))
            prompt = (refs.ids * (prompt_len // len(refs.ids) + 1))[:prompt_len]
            result["measured"] = {"prompt_len": prompt_len, "gen_len": config.gen_len, "runs": config.runs, "threads": run.thread_count(),
                                  **run.measure_decoder(method, prompt, config.gen_len, config.runs)}
        else:
            result["measured"] = {"tokens": int(refs.ids.shape[1]), "runs": config.runs, "threads": run.thread_count(),
                                  **run.measure_encoder(method, refs.ids, refs.mask, config.runs)}
    del method
    return result


def _prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def executorch_gates(verification: dict, delegation, plan: _Plan, config: ExecuTorchConfig) -> list:
    """The target's decisions: the delegate took part of the program; parity with PyTorch; quality against fp32
    (gated by default only for unquantized programs).

    Parity of an unquantized program is direct: PyTorch's greedy tokens (up to a near tie) and its top-1. A
    quantized program is held to the quantization's own price instead: its KL from fp32 may exceed that of the
    PyTorch model with the same weights by at most PARITY_MAX_KL_RATIO. Its kernels quantize activations with their
    own rounding, which on a model with activation outliers moves logits as much as the scheme itself does: a
    same-weights comparison would fail sound programs, while a broken lowering shows as a loss beyond the scheme's."""
    from edgepack.targets.base import figure_gate, flag_gate

    gates = [flag_gate(TARGET, "delegation", "delegated", delegation.subgraphs > 0,
                       f"the {config.backend} delegate took no part of the program: it would run on portable CPU kernels only")]
    if "same_weights" not in verification:
        return gates
    unquantized = plan.scheme == "none" and plan.embedding == "none"
    same, fp32 = verification["same_weights"], verification["fp32"]
    if plan.kind == "decoder":
        if unquantized:
            greedy = verification["greedy"]
            gates.append(flag_gate(TARGET, "parity", "greedy_tokens", greedy["equal_up_to_near_tie"],
                                   f"greedy tokens differ from PyTorch's at step {greedy['agreeing_prefix']}, where PyTorch's two likeliest "
                                   f"tokens are {greedy['divergence_gap_nats']} nats apart"))
            gates.append(figure_gate(TARGET, "parity", "top1_agreement", same["top1_agreement"], PARITY_MIN_TOP1, "min"))
        else:
            gates.append(figure_gate(TARGET, "parity", "kl_ratio_to_pytorch", verification["kl_ratio_to_pytorch"], PARITY_MAX_KL_RATIO, "max"))
        min_top1 = config.min_top1 if config.min_top1 is not None else (FP32_MIN_TOP1 if unquantized else None)
        max_kl = config.max_kl if config.max_kl is not None else (FP32_MAX_KL if unquantized else None)
        gates.append(figure_gate(TARGET, "quality", "top1_agreement", fp32["top1_agreement"], min_top1, "min", option="--min-top1"))
        gates.append(figure_gate(TARGET, "quality", "kl_mean", fp32["kl_mean"], max_kl, "max", option="--max-kl"))
    else:
        gates.append(figure_gate(TARGET, "parity", "cosine_min", same["cosine_min"], FP32_MIN_COSINE if unquantized else ENCODER_QUANTIZED_MIN_COSINE, "min"))
        min_cosine = config.min_cosine if config.min_cosine is not None else (FP32_MIN_COSINE if unquantized else None)
        gates.append(figure_gate(TARGET, "quality", "cosine_min", fp32["cosine_min"], min_cosine, "min", option="--min-cosine"))
    return gates


def _checks(gates: list, verification: dict, delegation) -> dict:
    from edgepack.targets.base import verdict

    checks = {"delegation": {"passed": verdict(gates, "delegation"), **delegation.to_json()}}
    if "same_weights" in verification:
        parity = {"passed": verdict(gates, "parity"), "against": "PyTorch, same weights", **verification["same_weights"]}
        if "greedy" in verification:
            parity["greedy_equal"] = verification["greedy"]["equal"]
            parity["greedy_equal_up_to_near_tie"] = verification["greedy"]["equal_up_to_near_tie"]
            parity["kl_ratio_to_pytorch"] = verification["kl_ratio_to_pytorch"]
            parity["pytorch_same_weights_vs_fp32"] = {k: verification["pytorch_same_weights_vs_fp32"][k] for k in ("top1_agreement", "kl_mean")}
        checks["parity"] = parity
        checks["quality"] = {"passed": verdict(gates, "quality"), "against": "PyTorch fp32", **verification["fp32"]}
    else:
        checks["parity"] = {"passed": None, "skipped": verification.get("skipped")}
    return checks


def _io_facts(plan: _Plan, llm_ops: bool = False) -> dict:
    if plan.kind == "decoder":
        query = f"1 <= q <= {plan.context - 1}" if plan.dynamic else "q = 1"
        kernels = {"custom_kernels": "llama::custom_sdpa, llama::update_cache: link ExecuTorch's custom_ops library (its LLM runner does)"} \
            if llm_ops else {}
        return {"method": "forward", **kernels,
                "inputs": {"input_ids": f"int64 (1, q), {query}", "cache_position": "int64 (q,): the positions of these tokens (0, 1, ...)"},
                "outputs": {"logits": "fp32 (1, q, vocab)"},
                "state": f"KV cache of {plan.context} positions per layer, in the program's mutable buffers (one conversation per loaded method)",
                "usage": ("prefill: the prompt at positions 0..q-1; then one token per call at the next position" if plan.dynamic
                          else "one token per call at positions 0, 1, ... (the prompt too)")}
    seq = f"1 <= n <= {plan.context}" if plan.dynamic else f"n = {plan.context}"
    return {"method": "forward", "inputs": {"input_ids": f"int64 (1, n), {seq}", "attention_mask": "int64 (1, n), 1 = token, 0 = padding"},
            "outputs": {"last_hidden_state": "fp32 (1, n, hidden)"}}


def _versions() -> dict:
    from edgepack.core.versions import package_versions

    return package_versions(("edgepack", "executorch", "torchao", "torch", "transformers", "coremltools"))


def build(directory, out, config: ExecuTorchConfig = ExecuTorchConfig(), on_status=None):
    """read source -> load -> fp32 references -> quantize -> export + lower -> run and time -> write."""
    from edgepack._quiet import quiet_libraries
    from edgepack.outputs import prepare_output, replace_dir, staging_dir
    from edgepack.targets.base import TargetArtifact, timed, write_target_json

    status = on_status or (lambda message: None)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(out)
    prepare_output(out, config.force)
    plan = _plan(directory, config)
    quiet_libraries()
    from edgepack.targets.executorch_support import program

    status(f"loading {plan.source.model_type} weights from {plan.source.hf_dir}")
    with timed(timings, "load"):
        model, tokenizer = program.load_model(plan.source.hf_dir, plan.kind)
    from edgepack.targets.coreml import _eval_tokens  # the same evaluation text and fallback ids as the Core ML target

    tokens = _eval_tokens(tokenizer, config, plan.source)
    refs = _references(model, tokens, plan, config, status)
    if plan.scheme != "none" or plan.embedding != "none":
        status(f"quantizing with torchao ({plan.scheme}, embedding {plan.embedding})")
        with timed(timings, "quantize"):
            model = program.quantize_embedding(model, plan.embedding)
            program.quantize_model(model, plan.scheme, config.group_size)
    _same_weight_references(model, refs, plan, config, status)
    with staging_dir(out) as tmp:
        prog = _export_and_lower(model, plan, config, tmp, timings, status)
        del model
        gc.collect()
        copy_side_files(tmp, plan.source.hf_dir)
        verification = _verify(prog, refs, plan, config, timings, status)
        gates = executorch_gates(verification, prog.delegation, plan, config)
        facts = {
            "format": "ExecuTorch program (.pte)", "precision": plan.scheme, "backend": config.backend, "kind": plan.kind, "model_type": plan.source.model_type,
            "quantization": {"scheme": plan.scheme, "group_size": config.group_size if plan.scheme in ("8da4w", "int4-weight") else None,
                             "embedding": plan.embedding, "by": "torchao"},
            "program_bytes": prog.bytes, "max_context": plan.context, "dynamic_shapes": plan.dynamic,
            "io": _io_facts(plan, prog.llm_ops), "constant_methods": prog.constant_methods, "delegation": prog.delegation.to_json(),
            "verification": verification, "runs_on": _runs_on(config.backend),
        }
        artifact = TargetArtifact(
            out=out, target=TARGET, facts=facts, checks=_checks(gates, verification, prog.delegation),
            source={"directory": str(Path(directory).resolve()), "hf_dir": str(plan.source.hf_dir), "convert": plan.source.report.get("source")},
            versions=_versions(), gates=gates)
        timings["total"] = time.perf_counter() - start
        artifact.seconds = {k: round(v, 2) for k, v in timings.items()}
        artifact.facts["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items() if k != "force"}
        write_target_json(tmp, artifact)
        replace_dir(tmp, out)
    return artifact


def _runs_on(backend: str) -> str:
    return {"xnnpack": "ExecuTorch with the XNNPACK delegate: Android, iOS, Linux, macOS, Windows CPUs (Arm with KleidiAI, x86)",
            "coreml": "ExecuTorch with the Core ML delegate: iOS 18 / macOS 15 (Neural Engine, GPU, CPU as Core ML places it)",
            "qnn": "ExecuTorch with the QNN delegate: Snapdragon Hexagon NPUs"}[backend]


@click.command(name="executorch", help="""Build an ExecuTorch program (.pte) from an export.

\b
Decoder LLMs (llama, mistral, qwen2, qwen3, phi3, gemma, gemma2, granite):
the KV cache is program state; forward(input_ids, cache_position) -> logits,
the signature ExecuTorch's LLM runner calls (prefill of any length, then one
token a call). Encoders (bert): forward(input_ids, attention_mask) ->
last_hidden_state. Quantized with torchao (8da4w by default for decoders on
XNNPACK). The XNNPACK program runs here in ExecuTorch's runtime against
PyTorch (greedy tokens, top-1, KL; fp32 quality) and is timed; Core ML and QNN
programs are checked structurally. OUT gets model.pte, the tokenizer files and
target.json. Exit 1 if a gate fails (outputs are still written); exit 4 if
this host cannot lower to the backend (qnn without the QNN SDK).

\b
Example:
  edgepack target executorch build/smollm2 -o build/smollm2-et
  edgepack target executorch build/smollm2 -o build/smollm2-et-coreml --backend coreml
  edgepack target executorch build/my-bert -o build/bert-et --quantize none
""")
@click.argument("directory", metavar="DIR", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Output folder (must not exist or be empty, unless --force).")
@click_options(ExecuTorchConfig)
def command(directory, out, **options):
    config = config_from_cli(ExecuTorchConfig, options)
    from edgepack.core.console import Status

    with Status(f"building ExecuTorch target from {directory}") as status:
        artifact = build(directory, out, config, on_status=status)
    _print_summary(artifact)
    failure = artifact.failure_message("ExecuTorch target check failed")
    if failure:
        raise GateFailedError(failure)


def _print_summary(artifact) -> None:
    from edgepack.core.console import stdout_console

    facts, checks = artifact.facts, artifact.checks
    d = facts["delegation"]
    lines = [f"edgepack target executorch -> {artifact.out}",
             f"  {facts['kind']} {facts['model_type']}, {facts['backend']}, {facts['quantization']['scheme']}, {facts['program_bytes'] / 1e6:.1f} MB program",
             f"  delegation: {d['delegated_nodes']} of {d['delegated_nodes'] + d['fallback_nodes']} nodes in {d['delegated_subgraphs']} subgraphs"
             + (f"; on ExecuTorch's CPU kernels: {d['fallback_nodes']} nodes, most: {_most(d['fallback_ops'])}" if d["fallback_ops"] else "")]
    parity, quality = checks.get("parity", {}), checks.get("quality", {})
    if "top1_agreement" in parity:
        lines.append(f"  parity with PyTorch (same weights): top-1 {parity['top1_agreement']:.3f}, KL {parity['kl_mean']:.2e}, "
                     f"greedy tokens {_greedy_word(parity)} -> {'PASS' if parity['passed'] else 'FAIL'}")
        scheme_cost = parity["pytorch_same_weights_vs_fp32"]
        lines.append(f"  quality against fp32: top-1 {quality['top1_agreement']:.3f}, KL {quality['kl_mean']:.2e} "
                     f"(PyTorch with the same weights: top-1 {scheme_cost['top1_agreement']:.3f}, KL {scheme_cost['kl_mean']:.2e})")
    elif "cosine_min" in parity:
        lines.append(f"  parity with PyTorch (same weights): min cosine {parity['cosine_min']:.5f} -> {'PASS' if parity['passed'] else 'FAIL'}")
        lines.append(f"  quality against fp32: min cosine {quality['cosine_min']:.5f}")
    else:
        lines.append(f"  parity: {parity.get('skipped')}")
    measured = (facts.get("verification") or {}).get("measured")
    if measured and "decode_ms_per_token" in measured:
        lines.append(f"  measured here ({measured['threads']} threads, prompt {measured['prompt_len']}): TTFT {measured['ttft_ms']:.1f} ms, "
                     f"decode {measured['decode_ms_per_token']:.2f} ms/token")
    elif measured:
        lines.append(f"  measured here ({measured['threads']} threads, {measured['tokens']} tokens): {measured['latency_ms']:.2f} ms")
    stdout_console().print("\n".join(lines), markup=False)


def _greedy_word(parity: dict) -> str:
    if parity.get("greedy_equal"):
        return "equal"
    return "equal up to a near tie" if parity.get("greedy_equal_up_to_near_tie") else "DIFFER"


def _most(ops: dict, count: int = 4) -> str:
    top = sorted(ops.items(), key=lambda item: -item[1])[:count]
    return ", ".join(f"{op.removeprefix('aten_').removesuffix('_default')} x{n}" for op, n in top)
