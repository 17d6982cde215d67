"""`edgepack target ort`: an ONNX Runtime bundle for desktop/server CPUs that onnxruntime-genai loads unchanged.

Graph routes (`--graph`):
  * builder: onnxruntime-genai's model builder (run in its own environment, see genai_builder.py)
    writes the fused decoding graph (GroupQueryAttention with rotary embedding, fused QKV,
    SkipSimplifiedLayerNormalization) from the Hugging Face weights; edgepack then applies the
    source folder's quantization scheme (quantize.json) to that graph, so the same scheme and its
    quality hold on the fast graph.
  * optimum: the export itself, optimized offline by onnxruntime (extended level) and saved.
  * auto (default): builder for the decoder families it supports when it is set up, else optimum.

The bundle holds model.onnx, the tokenizer, genai_config.json (context length set to --max-context,
never the model's full context: KV buffers are allocated at that length) and target.json.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from edgepack.errors import BadInputError, NotOnThisHostError, UsageError
from edgepack.runtime.model_dir import CONVERT_REPORT, MODEL_FILE, TEXT_GENERATION, ExportedModelDir, load_model_dir
from edgepack.targets.base import TargetArtifact, write_target_json

SUMMARY = "ONNX Runtime CPU bundle (fused decoding graph) that onnxruntime-genai loads unchanged"
GRAPH_ROUTES = ("auto", "builder", "optimum")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "config.json", "generation_config.json",
                   # provenance: what the graph was made from and the scheme's measured price (checked below to hold)
                   "convert.json", "quantize.json")
GENAI_CHECK_PROMPT = "What is the capital of France?"
# onnxruntime-genai model types served by its generic decoder-only class (inputs/outputs named in the config).
# Others (gpt2 means an older combined-KV layout there) are declared as "llama", which is that generic class.
GENAI_GENERIC_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma", "gemma2", "granite", "olmo", "smollm3"}


@dataclass(frozen=True)
class OrtTargetConfig:
    max_context: int = 2048
    graph: str = "auto"
    verify: bool = True
    force: bool = False
    eval_tokens: int = 128  # positions compared against the source model
    genai_tokens: int = 24  # greedy tokens compared between onnxruntime-genai and edgepack's runtime
    compact: bool = False  # keep the quantized layout's compact form (fp16 scales, zero points made at load) instead of saving it optimized


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def choose_route(requested: str, model_type: str, task: str) -> str:
    from edgepack.targets.genai_builder import BUILDER_MODEL_TYPES, builder_python

    if requested not in GRAPH_ROUTES:
        raise UsageError(f"--graph must be one of {', '.join(GRAPH_ROUTES)}")
    builder_ok = task == TEXT_GENERATION and model_type in BUILDER_MODEL_TYPES
    if requested == "builder":
        if not builder_ok:
            raise UsageError(f"--graph builder: onnxruntime-genai's builder does not take {model_type} ({task}); use --graph optimum")
        if builder_python() is None:
            raise NotOnThisHostError("--graph builder: the builder is not set up here; run `python -m edgepack.targets.genai_builder install`")
        return "builder"
    if requested == "optimum":
        return "optimum"
    return "builder" if builder_ok and builder_python() is not None else "optimum"


def _scheme_of(quantize_report: dict):
    from edgepack.quantize.schemes import scheme_from_options

    if not quantize_report:
        return None
    params = dict(quantize_report["scheme"])
    name = params.pop("name")
    if "keep_8bit" in params:
        params["keep_8bit"] = tuple(params["keep_8bit"])
    return scheme_from_options(name, **params)


def _builder_graph(model_dir: ExportedModelDir, hf_dir: Path, scheme, work: Path, out_model: Path, status) -> dict:
    """Builder fp32 graph -> (scheme applied) -> out_model. Returns facts."""
    import onnx

    from edgepack.quantize.graph import save_model
    from edgepack.quantize.pipeline import apply_scheme
    from edgepack.targets.genai_builder import run_builder

    built = work / "builder"
    status("building the fused decoding graph with onnxruntime-genai's model builder")
    run_builder(hf_dir, built, precision="fp32", cache_dir=work / "builder-cache", log_path=work / "builder.log")
    facts = {"builder_files": sorted(p.name for p in built.iterdir())}
    if scheme is None:
        save_model(onnx.load(str(built / MODEL_FILE)), out_model, external_data=True)
        return facts
    # The scheme (and the GGUF import, which finds its source through convert.json) runs on the builder graph.
    shutil.copy2(model_dir.folder / CONVERT_REPORT, built / CONVERT_REPORT)
    builder_dir = ExportedModelDir(built, built / MODEL_FILE, model_dir.config, model_dir.generation_config, TEXT_GENERATION)
    status(f"applying {scheme.label()} to the fused graph")
    facts["scheme_facts"] = apply_scheme(scheme, builder_dir, model_dir.load_tokenizer(), out_model, work, None)
    return facts


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
    the folded tensors) is the same size. The price is disk: SmolLM2 int4 level-4 99.5 -> 110.0 MB,
    gguf 99.5 -> 126.4 MB, int8-weight 152.2 -> 179.1 MB; `--compact` keeps the compact form. A table the
    builder ties as Gather(Transpose(lm_head)) is first stored in the gather's layout, with the lm_head
    reading it transposed (FusedMatMul transB), so folding does not store it twice.
    """
    import onnx
    import onnxruntime as ort

    from edgepack.quantize.graph import save_model
    from edgepack.targets.ort_mobile import gather_table_without_transpose, transposed_gather_tables

    before = sum(p.stat().st_size for p in model_path.parent.glob(model_path.name + "*"))
    untransposed, model_path_in = 0, model_path
    if transposed_gather_tables(onnx.load(str(model_path), load_external_data=False)):  # the graph alone decides
        model = onnx.load(str(model_path))
        untransposed = gather_table_without_transpose(model)
        model_path_in = work / "untransposed" / model_path.name
        model_path_in.parent.mkdir()
        save_model(model, model_path_in, external_data=True)
        del model
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
    eos = sorted(model_dir.eos_token_ids())
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
            "eos_token_id": eos if len(eos) > 1 else (eos[0] if eos else None),
            "pad_token_id": config.get("pad_token_id") if config.get("pad_token_id") is not None else (eos[0] if eos else 0),
            "type": config.get("model_type") if config.get("model_type") in GENAI_GENERIC_TYPES else "llama",
            "vocab_size": int(config.get("vocab_size")),
        },
        "search": {"do_sample": False, "max_length": max_context, "num_beams": 1, "past_present_share_buffer": False,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0, "repetition_penalty": 1.0},
    }


def _set_context(genai_config: dict, max_context: int) -> dict:
    genai_config["model"]["context_length"] = max_context
    genai_config.setdefault("search", {})["max_length"] = max_context
    return genai_config


def _greedy_with_genai(bundle: Path, prompt_ids: list[int], new_tokens: int) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(bundle))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt_ids)
    tokens = []
    while not generator.is_done() and len(tokens) < new_tokens:
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def verify_bundle(bundle: Path, model_dir: ExportedModelDir, config: OrtTargetConfig, quantize_report: dict, status) -> dict:
    from edgepack.quantize.quality import QualityConfig, QualityEvaluator
    from edgepack.runtime.generate import DecoderSession, generate
    from edgepack.runtime.run import encode_prompt
    from edgepack.runtime.session import create_session

    checks: dict = {}
    tokenizer = model_dir.load_tokenizer()
    bundle_dir = load_model_dir(bundle)
    status("checking the bundle against its source model")
    evaluator = QualityEvaluator(model_dir.onnx_path, model_dir, tokenizer, QualityConfig(eval_tokens=config.eval_tokens, context=256))
    same = evaluator.evaluate(bundle / MODEL_FILE)
    # fp32 graphs must agree; a quantized graph computes the same weights through other kernels.
    limit_kl = 1e-3 if not quantize_report else 0.02
    checks["parity_vs_source"] = {
        "reference": str(model_dir.folder), "positions": same["positions"], "top1_agreement": same["top1_agreement"],
        "kl_mean": same["kl_mean"], "max_abs_logit_diff": same["max_abs_logit_diff"], "max_kl_mean": limit_kl,
        "passed": same["kl_mean"] <= limit_kl,
    }
    if quantize_report.get("quality") and quantize_report.get("source_dir") and Path(quantize_report["source_dir"]).is_dir():
        fp32_dir = load_model_dir(quantize_report["source_dir"])
        status("measuring the bundle's quality against fp32")
        fp32_eval = QualityEvaluator(fp32_dir.onnx_path, fp32_dir, tokenizer, QualityConfig(eval_tokens=config.eval_tokens, context=256))
        mine, source = fp32_eval.evaluate(bundle / MODEL_FILE), fp32_eval.evaluate(model_dir.onnx_path)
        checks["quality_vs_fp32"] = {
            "reference": str(fp32_dir.folder), "positions": mine["positions"],
            "bundle": {k: mine[k] for k in ("top1_agreement", "kl_mean", "kl_p99", "ppl", "ppl_reference")},
            "source": {k: source[k] for k in ("top1_agreement", "kl_mean", "kl_p99", "ppl", "ppl_reference")},
            # The scheme's price must hold on this graph: KL within 25% (or 0.005) of the source's.
            "passed": mine["kl_mean"] <= max(1.25 * source["kl_mean"], source["kl_mean"] + 0.005),
        }

    status("running the bundle with onnxruntime-genai and with edgepack's runtime")
    prompt_ids, _ = encode_prompt(tokenizer, GENAI_CHECK_PROMPT, chat=True)
    session = create_session(bundle / MODEL_FILE)
    eos = bundle_dir.eos_token_ids(tokenizer)
    ours = generate(DecoderSession(session, bundle_dir.config, share_kv_buffer=bundle_dir.share_kv_buffer), prompt_ids,
                    max_new_tokens=config.genai_tokens, eos_token_ids=eos).tokens
    if bundle_dir.share_kv_buffer:
        # The runtime appends to one KV buffer in place on this graph; it must decode what copying the cache decodes.
        copied = generate(DecoderSession(session, bundle_dir.config), prompt_ids, max_new_tokens=config.genai_tokens, eos_token_ids=eos).tokens
        checks["shared_kv_buffer"] = {"tokens_identical_to_copied_cache": copied == ours, "passed": copied == ours}
    try:
        theirs = _greedy_with_genai(bundle, prompt_ids, config.genai_tokens)
        checks["onnxruntime_genai"] = {
            "prompt": GENAI_CHECK_PROMPT, "edgepack_tokens": ours, "genai_tokens": theirs,
            "greedy_tokens_identical": ours == theirs, "passed": ours == theirs,
        }
    except ImportError:
        checks["onnxruntime_genai"] = {"passed": None, "skipped": "onnxruntime-genai is not installed"}
    checks["edgepack_runtime"] = {"text": tokenizer.decode(ours, skip_special_tokens=True), "tokens": len(ours), "passed": True}
    return checks


def build(directory: Path | str, out: Path | str, config: OrtTargetConfig = OrtTargetConfig(), on_status=None) -> TargetArtifact:
    from edgepack._quiet import quiet_libraries
    from edgepack.convert.export import tool_versions
    from edgepack.outputs import prepare_output, replace_dir, staging_dir
    from edgepack.profiles.model_facts import model_facts
    from edgepack.quantize.graph import op_counts

    status = on_status or (lambda message: None)
    start = time.perf_counter()
    out = Path(out)
    if config.max_context < 16:
        raise UsageError("--max-context must be at least 16")
    prepare_output(out, config.force)
    model_dir = load_model_dir(directory)
    quiet_libraries()
    convert_report = _read_json(model_dir.folder / CONVERT_REPORT)
    quantize_report = _read_json(model_dir.folder / "quantize.json")
    model_type = model_dir.config.get("model_type", "")
    route = choose_route(config.graph, model_type, model_dir.task)
    hf_dir = Path(convert_report.get("source", {}).get("hf_dir", ""))
    if route == "builder" and not (hf_dir / "config.json").is_file():
        raise BadInputError(f"the builder needs the Hugging Face folder this export came from ({hf_dir or 'unknown'}); use --graph optimum")
    scheme = _scheme_of(quantize_report)
    model_positions = model_dir.config.get("max_position_embeddings") or model_dir.config.get("n_positions")
    max_context = min(config.max_context, int(model_positions)) if model_positions else config.max_context

    with staging_dir(out) as tmp:
        work = tmp / ".work"
        work.mkdir()
        t0 = time.perf_counter()
        if route == "builder":
            facts = _builder_graph(model_dir, hf_dir, scheme, work, tmp / MODEL_FILE, status)
            genai_config = _set_context(_read_json(work / "builder" / "genai_config.json"), max_context)
        else:
            facts = _optimum_graph(model_dir, tmp / MODEL_FILE, status)
            genai_config = genai_config_for(model_dir, tmp / MODEL_FILE, max_context) if model_dir.task == TEXT_GENERATION else None
        if route == "builder" and not config.compact:
            status("saving the graph as onnxruntime optimizes it (basic level)")
            facts["saved_optimized"] = _save_optimized(tmp / MODEL_FILE, work)
        graph_seconds = time.perf_counter() - t0
        for name in TOKENIZER_FILES:
            if (model_dir.folder / name).is_file():
                shutil.copy2(model_dir.folder / name, tmp / name)
        if genai_config is not None:
            (tmp / "genai_config.json").write_text(json.dumps(genai_config, indent=4) + "\n")

        import onnx

        graph = onnx.load(str(tmp / MODEL_FILE), load_external_data=False)
        cost = model_facts(tmp / MODEL_FILE, model_dir.config)
        facts.update({
            "format": "onnx",
            "graph_route": route,
            "scheme": quantize_report.get("scheme") if quantize_report else None,
            "nodes": len(graph.graph.node),
            "ops": op_counts(graph),
            "max_context": max_context,
            "max_context_requested": config.max_context,
            "model_max_positions": model_positions,
            "kv_bytes_per_token": cost.kv_bytes_per_position,
            "kv_bytes_at_max_context": cost.kv_bytes_per_position * max_context,
            "weight_bytes_per_token": cost.weight_bytes_per_token,
            "genai_config": genai_config is not None,
            "execution_provider": "CPUExecutionProvider",
        })
        del graph
        shutil.rmtree(work)
        checks = {}
        t0 = time.perf_counter()
        if config.verify and model_dir.task == TEXT_GENERATION:
            checks = verify_bundle(tmp, model_dir, config, quantize_report, status)
        artifact = TargetArtifact(
            out=out, target="ort", facts=facts, checks=checks,
            source={"dir": str(Path(directory).resolve()), "convert": convert_report.get("source"),
                    "scheme": quantize_report.get("scheme_label") if quantize_report else "fp32"},
            versions={**tool_versions(), **_genai_version()},
            seconds={"graph": round(graph_seconds, 3), "verify": round(time.perf_counter() - t0, 3),
                     "total": round(time.perf_counter() - start, 3)},
        )
        artifact.facts["config"] = asdict(config)
        write_target_json(tmp, artifact)
        replace_dir(tmp, out)
    return artifact


def _genai_version() -> dict:
    from importlib import metadata

    try:
        return {"onnxruntime-genai": metadata.version("onnxruntime-genai")}
    except metadata.PackageNotFoundError:
        return {"onnxruntime-genai": "not installed"}


@click.command("ort")
@click.argument("directory", metavar="DIR", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Bundle folder.")
@click.option("--max-context", type=click.IntRange(min=16), default=2048, show_default=True,
              help="Context length the runtime allocates KV buffers for (never the model's full context by default).")
@click.option("--graph", type=click.Choice(GRAPH_ROUTES), default="auto", show_default=True,
              help="builder: onnxruntime-genai's fused graph; optimum: the export, optimized offline; auto: builder when possible.")
@click.option("--compact", is_flag=True,
              help="Builder graphs: keep the quantized layout's compact form (fp16 scales, zero points made at load; 10-21% smaller for quantized graphs) "
                   "instead of saving the graph as onnxruntime optimizes it. Its ORT-format conversion then grows by that much.")
@click.option("--no-verify", is_flag=True, help="Skip the parity and onnxruntime-genai checks.")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
def command(directory, out, max_context, graph, compact, no_verify, force):
    """ONNX Runtime bundle (model.onnx, tokenizer, genai_config.json, target.json).

    \b
    Example:
      edgepack target ort build/smollm2-q4 -o build/smollm2-ort
      edgepack target ort build/smollm2 -o build/smollm2-ort-fp32 --max-context 1024 --graph optimum
    """
    from edgepack.cli import _Status, report_target

    config = OrtTargetConfig(max_context=max_context, graph=graph, compact=compact, verify=not no_verify, force=force)
    with _Status(f"target ort: {directory}") as status:
        artifact = build(directory, out, config, on_status=status)
    report_target(artifact)
