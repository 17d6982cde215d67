"""`edgepack target ort`: an ONNX Runtime bundle for desktop/server CPUs that onnxruntime-genai loads unchanged.

Graph routes (`--graph`):
  * builder: onnxruntime-genai's model builder (run in its own environment, see genai_builder.py)
    writes the fused decoding graph (GroupQueryAttention with rotary embedding, fused QKV,
    SkipSimplifiedLayerNormalization) from the Hugging Face weights, in fp32; edgepack then puts the
    source folder's own quantized weights into it (edgepack.quantize.carry: every builder weight equal
    to a weight of the fp32 export quantize.json names gets the blocks `quantize` made and measured,
    stacked for the fused QKV), and applies the source's scheme (quantize.json) only to weights with no
    such equal. The bundle then ships the weights whose quality `quantize` measured, without quantizing twice.
  * optimum: the export itself, optimized offline by onnxruntime (extended level) and saved.
  * auto (default): builder for the decoder families it supports when it is set up, else optimum.

The bundle holds model.onnx, the tokenizer, genai_config.json (context length set to --max-context,
never the model's full context: KV buffers are allocated at that length) and target.json.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

from edgepack.core.files import PROVENANCE_FILES, copy_side_files
from edgepack.core.gates import GateResult
from edgepack.core.versions import MODEL_PACKAGES
from edgepack.errors import BadInputError, NotOnThisHostError, UsageError
from edgepack.options import click_options, config_from_cli, option
from edgepack.runtime.model_dir import CONVERT_REPORT, MODEL_FILE, TEXT_GENERATION, ExportedModelDir, load_model_dir
from edgepack.targets.base import TargetArtifact, check_gate, figure_gate, timed, write_target_json

TARGET = "ort"
# Packages whose versions key this target's cached builds (`genai-builder:` the builder venv's, `qnn-sdk` the
# QNN SDK onnxruntime-qnn carries).
CACHE_PACKAGES = ("onnxruntime-genai", "genai-builder:onnxruntime-genai", *MODEL_PACKAGES)
SUMMARY = "ONNX Runtime CPU bundle (fused decoding graph) that onnxruntime-genai loads unchanged"
GRAPH_ROUTES = ("auto", "builder", "optimum")
GENAI_CHECK_PROMPT = "What is the capital of France?"
# onnxruntime-genai model types served by its generic decoder-only class (inputs/outputs named in the config).
# Others (gpt2 means an older combined-KV layout there) are declared as "llama", which is that generic class.
GENAI_GENERIC_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma", "gemma2", "granite", "olmo", "smollm3"}


@dataclass(frozen=True)
class OrtTargetConfig:
    max_context: int = option(2048, min=16, unit="tokens",
                              help="Context length the runtime allocates KV buffers for (never the model's full context by default).")
    graph: str = option("auto", choices=GRAPH_ROUTES,
                        help="builder: onnxruntime-genai's fused graph; optimum: the export, optimized offline; auto: builder when possible.")
    compact: bool = option(False, help="Builder graphs: keep the quantized layout's compact form (fp16 scales, zero points made at load; "
                                       "10-21% smaller for quantized graphs) instead of saving the graph as onnxruntime optimizes it. "
                                       "Its ORT-format conversion then grows by that much.")
    verify: bool = option(True, cli="--no-verify", help="Skip the parity and onnxruntime-genai checks.")
    force: bool = option(False, help="Replace a non-empty output folder.", in_recipe=False,
                         note="a bundle replaces its own previous output; --force is for a folder edgepack did not write")
    eval_tokens: int = option(128, min=16, in_cli=False, help="Positions compared against the source model.",
                              note="tuning of the verification, not a choice a user makes per bundle")
    genai_tokens: int = option(24, min=1, in_cli=False, help="Greedy tokens compared between onnxruntime-genai and edgepack's runtime.",
                               note="tuning of the verification, not a choice a user makes per bundle")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def choose_route(requested: str, model_type: str, task: str) -> tuple[str, str]:
    """(route, why) before any graph is built; `auto` may still fall back to optimum after the builder's parity check."""
    from edgepack.targets.genai_builder import BUILDER_MODEL_TYPES, builder_python

    if requested not in GRAPH_ROUTES:
        raise UsageError(f"--graph must be one of {', '.join(GRAPH_ROUTES)}")
    builder_ok = task == TEXT_GENERATION and model_type in BUILDER_MODEL_TYPES
    if requested == "builder":
        if not builder_ok:
            raise UsageError(f"--graph builder: onnxruntime-genai's builder does not take {model_type} ({task}); use --graph optimum")
        if builder_python() is None:
            raise NotOnThisHostError("--graph builder: the builder is not set up here; run `python -m edgepack.targets.genai_builder install`")
        return "builder", "requested with --graph builder"
    if requested == "optimum":
        return "optimum", "requested with --graph optimum"
    if not builder_ok:
        return "optimum", f"auto: onnxruntime-genai's builder does not take {model_type or 'this model'} ({task})"
    if builder_python() is None:
        return "optimum", "auto: onnxruntime-genai's builder is not set up on this host"
    return "builder", "auto: the builder takes this model family"


def _scheme_of(quantize_report: dict):
    from edgepack.quantize.schemes import scheme_from_options

    if not quantize_report:
        return None
    params = dict(quantize_report["scheme"])
    name = params.pop("name")
    if "keep_8bit" in params:
        params["keep_8bit"] = tuple(params["keep_8bit"])
    return scheme_from_options(name, **params)


def _builder_graph(model_dir: ExportedModelDir, hf_dir: Path, scheme, fp32_onnx: Path | None, work: Path, out_model: Path,
                   status, seconds: dict) -> dict:
    """Builder fp32 graph -> (the source's quantized weights carried, the scheme applied to the rest) -> out_model.
    Returns facts."""
    import onnx

    from edgepack.quantize.external import TensorStore
    from edgepack.quantize.pipeline import apply_scheme
    from edgepack.targets.genai_builder import run_builder

    built = work / "builder"
    status("building the fused decoding graph with onnxruntime-genai's model builder")
    with timed(seconds, "builder"):
        run_builder(hf_dir, built, precision="fp32", cache_dir=work / "builder-cache", log_path=work / "builder.log")
    facts = {"builder_files": sorted(p.name for p in built.iterdir())}
    if scheme is None:  # the builder's graph as it is, its weights copied one tensor at a time
        with timed(seconds, "save"), TensorStore(built, work) as store:
            store.save(onnx.load(str(built / MODEL_FILE), load_external_data=False), out_model)
        return facts
    with timed(seconds, "quantize"):
        carried, why = _carry(model_dir, scheme, fp32_onnx, built, work, out_model, status)
        if carried is not None:
            facts["quantized_weights"] = carried.facts()
            if carried.scheme_facts is not None:
                facts["scheme_facts"] = carried.scheme_facts
            return facts
        facts["quantized_weights"] = {"reused_from_source": 0, "quantized_again": None, "why_none_reused": why}
        # The scheme (and the GGUF import, which finds its source through convert.json) runs on the builder graph.
        shutil.copy2(model_dir.folder / CONVERT_REPORT, built / CONVERT_REPORT)
        builder_dir = ExportedModelDir(built, built / MODEL_FILE, model_dir.config, model_dir.generation_config, TEXT_GENERATION)
        status(f"applying {scheme.label()} to the fused graph")
        facts["scheme_facts"] = apply_scheme(scheme, builder_dir, model_dir.load_tokenizer(), out_model, work, None)
    return facts


def _carry(model_dir: ExportedModelDir, scheme, fp32_onnx: Path | None, built: Path, work: Path, out_model: Path, status):
    """(CarryResult, None) when the source's quantized weights were carried into the builder graph, else (None, why)."""
    from edgepack.quantize.carry import carry_quantized_weights
    from edgepack.quantize.schemes import Int4, Int8Weight

    if scheme.name == "gguf":  # the import writes the GGUF file's own blocks into the builder graph (exact, by value)
        return None, "gguf: the GGUF import writes the GGUF file's own blocks into this graph (scheme_facts)"
    if not isinstance(scheme, (Int4, Int8Weight)):
        return None, f"{scheme.name}: not a weight-only block scheme; applied to the fused graph"
    if fp32_onnx is None or not fp32_onnx.is_file():
        return None, f"the fp32 export the source was quantized from is gone ({fp32_onnx or 'not recorded in quantize.json'})"
    carry_work = work / "carry"
    carry_work.mkdir(exist_ok=True)
    result = carry_quantized_weights(built / MODEL_FILE, model_dir.onnx_path, fp32_onnx, scheme, out_model, carry_work, status)
    if result is None:
        for stale in out_model.parent.glob(out_model.name + "*"):
            stale.unlink()
        return None, f"{scheme.label()}: the weights without an equal need the whole graph to calibrate; the scheme was applied to all"
    return result, None


def _optimum_graph(model_dir: ExportedModelDir, out_model: Path, status) -> dict:
    import onnxruntime as ort

    status("optimizing the export offline with onnxruntime")
    options = ort.SessionOptions()
    # Extended, not all: the "all" level adds layout transforms specific to this machine's CPU.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(out_model)
    # Weights beside the graph, written anew: a source with external data would otherwise be saved with
    # references to its own data file, which is not in the bundle.
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{out_model.name}.data")
    options.log_severity_level = 3
    ort.InferenceSession(str(model_dir.onnx_path), options, providers=["CPUExecutionProvider"])
    return {}


def _save_optimized(model_path: Path, work: Path) -> dict:
    """Replace the graph by what onnxruntime's basic (provider-independent) optimizations make of it.

    The quantized layouts store some tensors compactly and let onnxruntime expand them when it loads
    the model: fp16-stored scales (Cast to the fp32 the CPU kernels read), negated and transposed block
    minimums, all-zero zero points made by ConstantOfShape. Saved already optimized, the bundle holds
    them as onnxruntime does: nothing left to fold at load, and its ORT-format conversion (which saves
    the folded tensors) is the same size. The price is disk (quantized graphs grow by their expanded
    scales, minimums and zero points); `--compact` keeps the compact form. A table the
    builder ties as Gather(Transpose(lm_head)) is first stored in the gather's layout, with the lm_head
    reading it transposed (FusedMatMul transB), so folding does not store it twice.
    """
    import onnx
    import onnxruntime as ort

    from edgepack.quantize.external import TensorStore
    from edgepack.targets.ort_mobile import gather_table_without_transpose, transposed_gather_tables

    before = sum(p.stat().st_size for p in model_path.parent.glob(model_path.name + "*"))
    untransposed, model_path_in = 0, model_path
    graph = onnx.load(str(model_path), load_external_data=False)
    if transposed_gather_tables(graph):  # the graph alone decides
        model_path_in = work / "untransposed" / model_path.name
        model_path_in.parent.mkdir()
        with TensorStore(model_path.parent, work) as store:  # one table in memory at a time, not the model
            untransposed = gather_table_without_transpose(graph, store=store)
            store.save(graph, model_path_in)
    del graph
    staged = work / "optimized"
    staged.mkdir()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(staged / model_path.name)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{model_path.name}.data")
    options.log_severity_level = 3
    ort.InferenceSession(str(model_path_in), options, providers=["CPUExecutionProvider"])
    for old in model_path.parent.glob(model_path.name + "*"):
        old.unlink()
    for new in staged.iterdir():
        shutil.move(str(new), model_path.parent / new.name)
    after = sum(p.stat().st_size for p in model_path.parent.glob(model_path.name + "*"))
    return {"level": "basic", "compact_bytes": before, "bytes": after, "tied_tables_stored_once": untransposed}


def genai_config_for(model_dir: ExportedModelDir, onnx_path: Path, max_context: int) -> dict:
    """genai_config.json for a graph edgepack wrote itself (optimum route), from its real inputs/outputs."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inputs = {i.name for i in graph.input}
    config = model_dir.config
    heads = int(config.get("num_attention_heads") or config.get("n_head"))
    hidden = int(config.get("hidden_size") or config.get("n_embd"))
    decoder_inputs = {"input_ids": "input_ids", "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    for name in ("attention_mask", "position_ids"):
        if name in inputs:
            decoder_inputs[name] = name
    return {
        "model": {
            "bos_token_id": config.get("bos_token_id"),
            "context_length": max_context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": int(config.get("head_dim") or hidden // heads),
                "hidden_size": hidden,
                "inputs": decoder_inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
                "num_attention_heads": heads,
                "num_hidden_layers": int(config.get("num_hidden_layers") or config.get("n_layer")),
                "num_key_value_heads": int(config.get("num_key_value_heads") or heads),
            },
            "eos_token_id": config.get("eos_token_id"),
            "pad_token_id": config.get("pad_token_id"),
            "type": config.get("model_type") if config.get("model_type") in GENAI_GENERIC_TYPES else "llama",
            "vocab_size": int(config.get("vocab_size")),
        },
        "search": {"do_sample": False, "max_length": max_context, "num_beams": 1, "past_present_share_buffer": False,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0, "repetition_penalty": 1.0},
    }


def _in_vocab(value, vocab: int) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab]


def settle_token_ids(genai_config: dict, model_dir: ExportedModelDir, tokenizer) -> dict:
    """Make genai_config.json's token ids ones onnxruntime-genai accepts and edgepack's runtime uses; return facts.

    onnxruntime-genai refuses a null id and any end-of-sequence id outside the vocabulary, but runs
    without a BOS id (it only uses one when asked to add it). So: the BOS key is dropped when the model
    has no BOS in its vocabulary; the end-of-sequence ids are those edgepack's runtime stops on (config,
    generation config and the tokenizer's EOS) that lie inside the vocabulary, since an id the model
    cannot emit never ends a generation; the pad id falls back to the first end id. A model with no
    end id inside its vocabulary is refused: every answer would run to the context length.
    """
    model = genai_config["model"]
    vocab = int(model.get("vocab_size") or model_dir.config.get("vocab_size"))
    facts: dict = {"vocab_size": vocab}
    bos = _in_vocab(model.get("bos_token_id"), vocab)
    if bos:
        model["bos_token_id"] = bos[0]
    else:
        if model.get("bos_token_id") is not None:
            facts["bos_token_id_dropped"] = model.get("bos_token_id")
        model.pop("bos_token_id", None)
    candidates: list = []
    for value in (model.get("eos_token_id"), *[model_dir.generation_config.get("eos_token_id"), model_dir.config.get("eos_token_id")],
                  getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None):
        for v in (value if isinstance(value, list) else [value]):
            if v is not None and v not in candidates:
                candidates.append(v)
    eos = sorted(set(_in_vocab(candidates, vocab)))
    dropped = [v for v in candidates if v not in eos]
    if dropped:
        facts["eos_token_ids_outside_vocab"] = dropped
    if not eos:
        raise BadInputError(
            f"{model_dir.folder}: no end-of-sequence token id inside the vocabulary of {vocab} "
            f"(eos_token_id {dropped or 'missing'} in config.json, generation_config.json and the tokenizer): the model "
            "could never end an answer and onnxruntime-genai refuses such a config; set eos_token_id to the model's end token"
        )
    model["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    pad = _in_vocab(model.get("pad_token_id"), vocab)
    model["pad_token_id"] = pad[0] if pad else eos[0]
    facts.update({"bos_token_id": model.get("bos_token_id"), "eos_token_id": model["eos_token_id"], "pad_token_id": model["pad_token_id"]})
    return facts


def _genai_load_check(bundle: Path) -> dict:
    """onnxruntime-genai loads the bundle as an app does (`og.Model`), whatever else is checked."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        return {"passed": None, "skipped": "onnxruntime-genai is not installed"}
    try:
        og.Model(str(bundle))
    except Exception as exc:  # genai raises its own error types; the message is the finding
        return {"passed": False, "error": str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}
    return {"passed": True}


def _set_context(genai_config: dict, max_context: int) -> dict:
    genai_config["model"]["context_length"] = max_context
    genai_config.setdefault("search", {})["max_length"] = max_context
    return genai_config


def _greedy_with_genai(bundle: Path, prompt: str, chat: bool, new_tokens: int) -> tuple[list[int], list[int], str]:
    """Generate as an app does with onnxruntime-genai alone: its tokenizer, its chat template, its generator.

    Returns (prompt ids, generated ids, generated text), all from onnxruntime-genai.
    """
    import onnxruntime_genai as og

    model = og.Model(str(bundle))
    tokenizer = og.Tokenizer(model)
    if chat:
        prompt = tokenizer.apply_chat_template(messages=json.dumps([{"role": "user", "content": prompt}]), add_generation_prompt=True)
    prompt_ids = [int(i) for i in tokenizer.encode(prompt)]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt_ids)
    tokens = []
    while not generator.is_done() and len(tokens) < new_tokens:
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return prompt_ids, tokens, tokenizer.decode(tokens)


def parity_vs_source(graph: Path, model_dir: ExportedModelDir, tokenizer, config: OrtTargetConfig, quantize_report: dict) -> dict:
    """The graph's next-token distributions against the source export's, on the evaluation text."""
    from edgepack.quantize.quality import QualityConfig, QualityEvaluator

    evaluator = QualityEvaluator(model_dir.onnx_path, model_dir, tokenizer, QualityConfig(eval_tokens=config.eval_tokens, context=256))
    same = evaluator.evaluate(graph)
    # fp32 graphs must agree; a quantized graph computes the same weights through other kernels.
    limit_kl = 1e-3 if not quantize_report else 0.02
    check = {
        "reference": str(model_dir.folder), "positions": same["positions"], "top1_agreement": same["top1_agreement"],
        "kl_mean": same["kl_mean"], "max_abs_logit_diff": same["max_abs_logit_diff"], "max_kl_mean": limit_kl,
    }
    check["passed"] = parity_gate(check).passed
    return check


def parity_gate(check: dict) -> GateResult:
    """The graph computes what its source computes: mean KL within the check's `max_kl_mean`."""
    return figure_gate(TARGET, "parity_vs_source", "kl_mean", check["kl_mean"], check["max_kl_mean"], "max", option="max_kl_mean")


def quality_gate(check: dict) -> GateResult:
    """The scheme's measured price holds on this graph: KL within 25% (or 0.005) of the source's."""
    source_kl = check["source"]["kl_mean"]
    return figure_gate(TARGET, "quality_vs_fp32", "kl_mean", check["bundle"]["kl_mean"], max(1.25 * source_kl, source_kl + 0.005), "max",
                       option="the source's KL + 25% (or + 0.005)")


def ort_gates(checks: dict) -> list[GateResult]:
    """Every pass/fail decision of the ort target: figures against limits, and the runtime checks' findings."""
    figures = {"parity_vs_source": parity_gate, "quality_vs_fp32": quality_gate}
    return [figures[name](check) if name in figures else check_gate(TARGET, name, check) for name, check in checks.items()]


def verify_bundle(bundle: Path, model_dir: ExportedModelDir, config: OrtTargetConfig, quantize_report: dict, status,
                  parity: dict | None = None, seconds: dict | None = None) -> dict:
    """Parity with the source, quality against fp32 (a quantized source), and greedy decoding by both runtimes;
    each step's wall time goes to `seconds`."""
    from edgepack.quantize.quality import QualityConfig, QualityEvaluator
    from edgepack.runtime.generate import DecoderSession, generate
    from edgepack.runtime.run import encode_prompt
    from edgepack.runtime.session import create_session

    seconds = seconds if seconds is not None else {}
    checks: dict = {}
    tokenizer = model_dir.load_tokenizer()
    bundle_dir = load_model_dir(bundle)
    if parity is None:
        status("checking the bundle against its source model")
        with timed(seconds, "parity_vs_source"):
            parity = parity_vs_source(bundle / MODEL_FILE, model_dir, tokenizer, config, quantize_report)
    checks["parity_vs_source"] = parity
    if quantize_report.get("quality") and quantize_report.get("source_dir") and Path(quantize_report["source_dir"]).is_dir():
        fp32_dir = load_model_dir(quantize_report["source_dir"])
        status("measuring the bundle's quality against fp32")
        with timed(seconds, "quality_vs_fp32"):
            fp32_eval = QualityEvaluator(fp32_dir.onnx_path, fp32_dir, tokenizer, QualityConfig(eval_tokens=config.eval_tokens, context=256))
            mine, source = fp32_eval.evaluate(bundle / MODEL_FILE), fp32_eval.evaluate(model_dir.onnx_path)
        quality = {
            "reference": str(fp32_dir.folder), "positions": mine["positions"],
            "bundle": {k: mine[k] for k in ("top1_agreement", "kl_mean", "kl_p99", "ppl", "ppl_reference")},
            "source": {k: source[k] for k in ("top1_agreement", "kl_mean", "kl_p99", "ppl", "ppl_reference")},
        }
        checks["quality_vs_fp32"] = {**quality, "passed": quality_gate(quality).passed}

    status("running the bundle with onnxruntime-genai and with edgepack's runtime")
    t0 = time.perf_counter()
    chat = bool(getattr(tokenizer, "chat_template", None))
    prompt_ids, _ = encode_prompt(tokenizer, GENAI_CHECK_PROMPT, chat=chat)
    session = create_session(bundle / MODEL_FILE)
    eos = bundle_dir.eos_token_ids(tokenizer)
    ours = generate(DecoderSession(session, bundle_dir.config, share_kv_buffer=bundle_dir.share_kv_buffer), prompt_ids,
                    max_new_tokens=config.genai_tokens, eos_token_ids=eos).tokens
    if bundle_dir.share_kv_buffer:
        # The runtime appends to one KV buffer in place on this graph; it must decode what copying the cache decodes.
        copied = generate(DecoderSession(session, bundle_dir.config), prompt_ids, max_new_tokens=config.genai_tokens, eos_token_ids=eos).tokens
        checks["shared_kv_buffer"] = {"tokens_identical_to_copied_cache": copied == ours, "passed": copied == ours}
    try:
        # onnxruntime-genai tokenizes the prompt itself, as an app using it does: a tokenizer that reads
        # the shipped files differently shows up here as different prompt ids and different tokens.
        genai_prompt_ids, theirs, genai_text = _greedy_with_genai(bundle, GENAI_CHECK_PROMPT, chat, config.genai_tokens)
        same = ours == theirs and genai_prompt_ids == prompt_ids
        checks["onnxruntime_genai"] = {
            "prompt": GENAI_CHECK_PROMPT, "chat_template": chat, "prompt_ids_identical": genai_prompt_ids == prompt_ids,
            "edgepack_tokens": ours, "genai_tokens": theirs, "genai_text": genai_text,
            "greedy_tokens_identical": ours == theirs, "passed": same,
        }
    except ImportError:
        checks["onnxruntime_genai"] = {"passed": None, "skipped": "onnxruntime-genai is not installed"}
    except Exception as exc:  # genai's own error types (a config or template it rejects): the finding itself
        checks["onnxruntime_genai"] = {"prompt": GENAI_CHECK_PROMPT, "passed": False, "error": str(exc).strip() or type(exc).__name__}
    checks["edgepack_runtime"] = {"text": tokenizer.decode(ours, skip_special_tokens=True), "tokens": len(ours), "passed": True}
    seconds["generate"] = round(time.perf_counter() - t0, 3)
    return checks


@dataclass
class _Source:
    """Step 1 (read source): the export, its reports, and the graph route chosen for it."""

    model_dir: ExportedModelDir
    convert_report: dict
    quantize_report: dict
    route: str
    route_reason: str
    hf_dir: Path
    scheme: object  # the source's quantization scheme (None: fp32)
    max_context: int
    model_positions: int | None
    tokenizer: object


@dataclass
class _Graph:
    """Step 2 (build graph): model.onnx written, by which route, and its genai_config (None: not a decoder)."""

    route: str
    route_reason: str
    facts: dict
    genai_config: dict | None
    builder_parity: dict | None  # the builder graph's parity check, already run (auto route)
    seconds: float = 0.0
    steps: dict = field(default_factory=dict)  # wall seconds of each step of the route


def _read_source(directory, config: OrtTargetConfig) -> _Source:
    from edgepack._quiet import quiet_libraries

    model_dir = load_model_dir(directory)
    quiet_libraries()
    convert_report = _read_json(model_dir.folder / CONVERT_REPORT)
    quantize_report = _read_json(model_dir.folder / "quantize.json")
    model_type = model_dir.config.get("model_type", "")
    route, route_reason = choose_route(config.graph, model_type, model_dir.task)
    hf_dir = Path(convert_report.get("source", {}).get("hf_dir", ""))
    if route == "builder" and not (hf_dir / "config.json").is_file():
        raise BadInputError(f"the builder needs the Hugging Face folder this export came from ({hf_dir or 'unknown'}); use --graph optimum")
    scheme = _scheme_of(quantize_report)
    model_positions = model_dir.config.get("max_position_embeddings") or model_dir.config.get("n_positions")
    max_context = min(config.max_context, int(model_positions)) if model_positions else config.max_context
    tokenizer = _optional_tokenizer(model_dir) if model_dir.task == TEXT_GENERATION else None
    return _Source(model_dir, convert_report, quantize_report, route, route_reason, hf_dir, scheme, max_context, model_positions, tokenizer)


def _builder_route(src: _Source, config: OrtTargetConfig, tmp: Path, work: Path, status) -> _Graph:
    """The builder's fused graph; with --graph auto it must pass parity with the source, else optimum is used."""
    steps: dict = {}
    facts = _builder_graph(src.model_dir, src.hf_dir, src.scheme, _fp32_source(src.quantize_report), work, tmp / MODEL_FILE, status, steps)
    genai_config = _set_context(_read_json(work / "builder" / "genai_config.json"), src.max_context)
    if not config.compact:
        status("saving the graph as onnxruntime optimizes it (basic level)")
        with timed(steps, "save_optimized"):
            facts["saved_optimized"] = _save_optimized(tmp / MODEL_FILE, work)
    graph = _Graph("builder", src.route_reason, facts, genai_config, None, steps=steps)
    if config.graph != "auto" or src.tokenizer is None:
        return graph
    # Auto promises the faster graph only when it computes what the source computes: the builder
    # has produced wrong graphs for some configurations, and both runtimes would run them alike.
    status("checking the builder's graph against the source before choosing it")
    with timed(steps, "parity_vs_source"):
        parity = parity_vs_source(tmp / MODEL_FILE, src.model_dir, src.tokenizer, config, src.quantize_report)
    if parity["passed"]:
        graph.builder_parity = parity
        return graph
    reason = (f"auto: onnxruntime-genai's builder graph failed parity with the source (KL "
              f"{parity['kl_mean']:.3g} > {parity['max_kl_mean']:g}, top-1 "
              f"{parity['top1_agreement']:.3f}); fell back to the optimum route")
    status(reason.removeprefix("auto: "))
    for stale in tmp.glob(MODEL_FILE + "*"):
        stale.unlink()
    return _Graph("optimum", reason, {"builder_rejected": {"parity_vs_source": parity, "builder_files": facts.get("builder_files")}},
                  None, None, steps={f"builder_{k}": v for k, v in steps.items()})


def _fp32_source(quantize_report: dict) -> Path | None:
    """The fp32 export's graph a quantized source was made from (quantize.json `source_dir`), if recorded."""
    source_dir = quantize_report.get("source_dir") if quantize_report else None
    if not source_dir:
        return None
    try:
        return load_model_dir(source_dir).onnx_path
    except BadInputError:  # gone or no longer an export: the caller says so
        return Path(source_dir) / MODEL_FILE


def _make_graph(src: _Source, config: OrtTargetConfig, tmp: Path, work: Path, status) -> _Graph:
    t0 = time.perf_counter()
    graph = _Graph(src.route, src.route_reason, {}, None, None)
    if src.route == "builder":
        graph = _builder_route(src, config, tmp, work, status)
    if graph.route == "optimum":
        with timed(graph.steps, "optimize"):
            graph.facts.update(_optimum_graph(src.model_dir, tmp / MODEL_FILE, status))
        graph.genai_config = genai_config_for(src.model_dir, tmp / MODEL_FILE, src.max_context) if src.model_dir.task == TEXT_GENERATION else None
    graph.seconds = time.perf_counter() - t0
    return graph


def _write_side_files(src: _Source, graph: _Graph, tmp: Path) -> None:
    """Tokenizer and provenance files, and genai_config.json with token ids onnxruntime-genai accepts."""
    copy_side_files(tmp, src.model_dir.folder, extra=PROVENANCE_FILES)
    if graph.genai_config is not None:
        graph.facts["genai_token_ids"] = settle_token_ids(graph.genai_config, src.model_dir, src.tokenizer)
        (tmp / "genai_config.json").write_text(json.dumps(graph.genai_config, indent=4) + "\n")


def _graph_facts(src: _Source, graph: _Graph, config: OrtTargetConfig, tmp: Path) -> dict:
    import onnx

    from edgepack.core.onnx_io import op_counts
    from edgepack.profiles.model_facts import model_facts

    model = onnx.load(str(tmp / MODEL_FILE), load_external_data=False)
    cost = model_facts(tmp / MODEL_FILE, src.model_dir.config)
    return {
        "format": "onnx",
        "graph_route": graph.route,
        "graph_route_reason": graph.route_reason,
        "scheme": src.quantize_report.get("scheme") if src.quantize_report else None,
        "nodes": len(model.graph.node),
        "ops": op_counts(model),
        "max_context": src.max_context,
        "max_context_requested": config.max_context,
        "model_max_positions": src.model_positions,
        "kv_bytes_per_token": cost.kv_bytes_per_position,
        "kv_bytes_at_max_context": cost.kv_bytes_per_position * src.max_context,
        "weight_bytes_per_token": cost.weight_bytes_per_token,
        "genai_config": graph.genai_config is not None,
        "execution_provider": "CPUExecutionProvider",
    }


def _checks(src: _Source, graph: _Graph, config: OrtTargetConfig, tmp: Path, status, seconds: dict) -> dict:
    """Step 4 (verify): what onnxruntime-genai makes of the bundle and, unless --no-verify, parity and generation."""
    checks = {}
    if graph.genai_config is not None:
        from edgepack.targets.tokenizer_check import check_genai_tokenizer

        # Even unverified, a bundle must be one onnxruntime-genai opens, and its tokenizer must read
        # the shipped files as Hugging Face does (both take seconds).
        with timed(seconds, "genai_load"):
            checks["onnxruntime_genai_loads"] = _genai_load_check(tmp)
        status("checking onnxruntime-genai's tokenizer against Hugging Face's")
        with timed(seconds, "tokenizer_genai"):
            checks["tokenizer_genai"] = check_genai_tokenizer(tmp, src.tokenizer)
    if config.verify and src.model_dir.task == TEXT_GENERATION:
        checks.update(verify_bundle(tmp, src.model_dir, config, src.quantize_report, status, parity=graph.builder_parity,
                                    seconds=seconds))
    return checks


def build(directory: Path | str, out: Path | str, config: OrtTargetConfig = OrtTargetConfig(), on_status=None) -> TargetArtifact:
    """read source -> build graph (builder or optimum) -> side files -> facts -> verify -> write."""
    from edgepack.core.versions import tool_versions
    from edgepack.outputs import prepare_output, replace_dir, staging_dir

    status = on_status or (lambda message: None)
    start = time.perf_counter()
    out = Path(out)
    if config.max_context < 16:
        raise UsageError("--max-context must be at least 16")
    prepare_output(out, config.force)
    src = _read_source(directory, config)

    with staging_dir(out) as tmp:
        work = tmp / ".work"
        work.mkdir()
        graph = _make_graph(src, config, tmp, work, status)
        _write_side_files(src, graph, tmp)
        facts = graph.facts
        facts.update(_graph_facts(src, graph, config, tmp))
        shutil.rmtree(work)
        t0 = time.perf_counter()
        verify_steps: dict = {}
        checks = _checks(src, graph, config, tmp, status, verify_steps)
        artifact = TargetArtifact(
            out=out, target=TARGET, facts=facts, checks=checks,
            source={"dir": str(Path(directory).resolve()), "convert": src.convert_report.get("source"),
                    "scheme": src.quantize_report.get("scheme_label") if src.quantize_report else "fp32"},
            versions={**tool_versions(), **_genai_version()},
            # Each step's wall time (builder, quantize, save_optimized, parity_vs_source, quality_vs_fp32, ...)
            # beside the two phases and the total.
            seconds={**graph.steps, **verify_steps, "graph": round(graph.seconds, 3), "verify": round(time.perf_counter() - t0, 3),
                     "total": round(time.perf_counter() - start, 3)},
            gates=ort_gates(checks),
        )
        artifact.facts["config"] = asdict(config)
        write_target_json(tmp, artifact)
        replace_dir(tmp, out)
    return artifact


def _optional_tokenizer(model_dir: ExportedModelDir):
    try:
        return model_dir.load_tokenizer()
    except BadInputError:  # a graph without a tokenizer still gets a bundle; the checks that need one say so
        return None


def _genai_version() -> dict:
    from importlib import metadata

    try:
        return {"onnxruntime-genai": metadata.version("onnxruntime-genai")}
    except metadata.PackageNotFoundError:
        return {"onnxruntime-genai": "not installed"}


@click.command("ort")
@click.argument("directory", metavar="DIR", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Bundle folder.")
@click_options(OrtTargetConfig)
def command(directory, out, **options):
    """ONNX Runtime bundle (model.onnx, tokenizer, genai_config.json, target.json).

    \b
    Example:
      edgepack target ort build/smollm2-q4 -o build/smollm2-ort
      edgepack target ort build/smollm2 -o build/smollm2-ort-fp32 --max-context 1024 --graph optimum
    """
    from edgepack.core.console import Status, report_target

    config = config_from_cli(OrtTargetConfig, options)
    with Status(f"target ort: {directory}") as status:
        artifact = build(directory, out, config, on_status=status)
    report_target(artifact)
