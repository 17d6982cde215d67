"""`edgepack target ort-mobile`: ORT format (.ort) for onnxruntime's mobile packages and minimal builds.

Uses onnxruntime's own tools: `convert_onnx_models_to_ort` (optimizations saved in the file, plus the
reduced-operator config for a minimal build) and the mobile usability checker, whose log is turned into
JSON per execution provider. Before conversion the batch dimension is fixed to 1 (mobile EPs partition
only fixed-size tensors), and a tied lm_head (`MatMul(x, Transpose(embedding))`) is rewritten to
`FusedMatMul(x, embedding, transB=1)` so that constant folding cannot write the table a second time
(the plain export's .ort was 653 MB against 539 MB for the .onnx).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from edgepack.core.files import PROVENANCE_FILES, copy_side_files
from edgepack.core.gates import GateResult
from edgepack.core.versions import MODEL_PACKAGES
from edgepack.errors import BadInputError
from edgepack.options import click_options, config_from_cli, option
from edgepack.runtime.model_dir import MODEL_FILE, TEXT_GENERATION, load_model_dir
from edgepack.targets.base import TargetArtifact, check_gate, figure_gate, write_target_json

TARGET = "ort-mobile"
# Packages whose versions key this target's cached builds (`genai-builder:` the builder venv's, `qnn-sdk` the
# QNN SDK onnxruntime-qnn carries).
CACHE_PACKAGES = ("onnxruntime-genai", *MODEL_PACKAGES)
SUMMARY = "ORT format (.ort) for onnxruntime mobile / minimal builds, with a reduced-operator config and usability report"
ORT_FILE = "model.ort"
OPS_CONFIG = "required_operators.config"
USABILITY_FILE = "mobile_usability.json"
ALLOWED_OVERHEAD_BYTES = 262144  # the ORT format's fixed overhead, which dominates for tiny models
# Files that differ between two builds of the same model, and why (collected into the build manifest).
NOT_REPRODUCIBLE = {
    ORT_FILE: "onnxruntime's ORT-format writer orders its kernel type-string table by a hash of memory addresses: the "
              "entry order changes with address-space randomization (same graph, weights and outputs; two runs under "
              "`setarch -R` give identical bytes)",
}


@dataclass(frozen=True)
class OrtMobileConfig:
    batch_size: int = option(1, min=1, help="Value the batch dimension is fixed to.")
    # The .ort may exceed the graph onnxruntime runs by this factor: the same .onnx optimized by onnxruntime at the
    # converter's level and saved as ONNX. Folding is not the conversion's cost: quantized exports store
    # fp16-exact scales as fp16 + Cast and zero points as ConstantOfShape, which onnxruntime folds to fp32 tensors
    # whether it loads the .onnx (in memory) or writes the .ort (on disk), so the .ort of a quantized export is
    # larger than its .onnx by design. What the format adds beyond that graph is the conversion's own cost.
    max_size_ratio: float = option(1.05, min=1.0, help="Fail when the .ort exceeds onnxruntime's optimized graph (the .onnx as "
                                   "onnxruntime folds and runs it, saved as ONNX) by more than this factor.")
    verify: bool = option(True, cli="--no-verify", help="Skip the .ort vs .onnx output comparison.")
    force: bool = option(False, help="Replace a non-empty output folder.", in_recipe=False,
                         note="a bundle replaces its own previous output; --force is for a folder edgepack did not write")
    atol: float = option(1e-4, min=0, in_cli=False, help="Largest absolute output difference between the .ort and the .onnx.",
                         note="tuning of the verification, not a choice a user makes per bundle")


def _matmul_transb(model, node, x: str, weight: str) -> None:
    """Replace MatMul `node` in place by FusedMatMul(x, weight, transB=1) (onnxruntime's contrib op)."""
    from onnx import helper

    fused = helper.make_node("FusedMatMul", [x, weight], list(node.output), name=f"{node.name}_transB",
                             domain="com.microsoft", transB=1, alpha=1.0)
    position = list(model.graph.node).index(node)
    model.graph.node.remove(node)
    model.graph.node.insert(position, fused)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def tie_lm_head_without_copy(model) -> int:
    """MatMul(x, Transpose(W)) with W an initializer -> FusedMatMul(x, W, transB=1); return how many."""
    inits = {i.name for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    rewritten = 0
    for node in list(model.graph.node):
        source = producers.get(node.input[1]) if node.op_type == "MatMul" else None
        if source is None or source.op_type != "Transpose" or source.input[0] not in inits:
            continue
        perm = next((list(a.ints) for a in source.attribute if a.name == "perm"), [1, 0])
        if perm != [1, 0]:
            continue
        _matmul_transb(model, node, node.input[0], source.input[0])
        if not any(source.output[0] in n.input for n in model.graph.node):
            model.graph.node.remove(source)
        rewritten += 1
    return rewritten


def transposed_gather_tables(model) -> list[tuple]:
    """(Gather, Transpose, table name, MatMul users) for each Gather(Transpose(W)) whose W, an initializer,
    is otherwise only the right operand of MatMuls: a tied table stored in the lm_head's [D, V] layout, as
    onnxruntime-genai's builder writes it. Reads the graph only (no tensor data needed)."""
    inits = {i.name for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    found = []
    for gather in [n for n in model.graph.node if n.op_type == "Gather"]:
        source = producers.get(gather.input[0])
        if source is None or source.op_type != "Transpose" or source.input[0] not in inits:
            continue
        if next((list(a.ints) for a in source.attribute if a.name == "perm"), [1, 0]) != [1, 0]:
            continue
        table = source.input[0]
        users = [n for n in model.graph.node if table in n.input and n is not source]
        if any(n.op_type != "MatMul" or list(n.input).index(table) != 1 for n in users):
            continue
        found.append((gather, source, table, users))
    return found


def gather_table_without_transpose(model, store=None) -> int:
    """Gather(Transpose(W)) + MatMul(x, W) (see `transposed_gather_tables`) -> Gather(W.T) + FusedMatMul(x, W.T, transB=1).

    Constant folding would otherwise store the transposed table a second time (SmolLM2 fp32: +113 MB).
    With `store` (a `quantize.external.TensorStore`) the table is read from, and its transpose written to,
    files. Returns how many tables were rewritten."""
    from edgepack.quantize.external import TensorStore

    store = store if store is not None else TensorStore()
    found = transposed_gather_tables(model)
    inits = {i.name: i for i in model.graph.initializer}
    for gather, source, table_name, users in found:
        table = inits[table_name]
        transposed = store.add(store.array(table).T.copy(), table.name + "_t")
        model.graph.initializer.remove(table)
        model.graph.initializer.append(transposed)
        gather.input[0] = transposed.name
        for node in users:
            _matmul_transb(model, node, node.input[0], transposed.name)
        model.graph.node.remove(source)
    return len(found)


def fix_batch_dimension(model, batch_size: int) -> list[str]:
    from onnxruntime.tools.onnx_model_utils import make_dim_param_fixed

    params = sorted({d.dim_param for v in list(model.graph.input) + list(model.graph.output)
                     for d in v.type.tensor_type.shape.dim if d.dim_param and "batch" in d.dim_param})
    for param in params:
        make_dim_param_fixed(model.graph, param, batch_size)
    return params


def usability_report(onnx_path: Path) -> dict:
    """onnxruntime's mobile usability checker, per execution provider, as data instead of a log."""
    import logging

    import onnx
    from onnxruntime.tools.mobile_helpers import usability_checker as uc

    # What onnxruntime's ModelProtoWithShapeInfo does, without the weights: the checker reads op types and
    # shapes, and shape inference needs the initializers' dims (in the graph) and the small constant shape
    # tensors (kept inline), not the weights, which it would otherwise copy in and out of C++ several times.
    model = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_path), load_external_data=False), strict_mode=True)
    quiet = logging.getLogger("edgepack.quiet")
    quiet.setLevel(logging.ERROR)  # the checker logs every dynamic tensor at INFO; its findings go to JSON instead
    dynamic_inputs, dynamic_values = uc.check_shapes(model.graph, quiet)
    checkers = {
        "NNAPI": lambda m, fixed: uc.check_nnapi_partitions(m, fixed),
        "CoreML NeuralNetwork": lambda m, fixed: uc.check_coreml_partitions(m, fixed, "coreml_supported_neuralnetwork_ops.md"),
        "CoreML MLProgram": lambda m, fixed: uc.check_coreml_partitions(m, fixed, "coreml_supported_mlprogram_ops.md"),
    }
    providers = {}
    for name, check in checkers.items():
        info = check(model, True)
        entry = _partition_json(info)
        if dynamic_inputs:
            fixed = _partition_json(check(model, False))
            entry["if_shapes_fixed"] = fixed
            entry["recommendation"] = max(entry["suitability"], fixed["suitability"], key=["NO", "MAYBE", "YES"].index)
        else:
            entry["recommendation"] = entry["suitability"]
        providers[name] = entry
    return {
        "tool": "onnxruntime.tools.mobile_helpers.usability_checker",
        "dynamic_inputs": [i.name for i in dynamic_inputs] if dynamic_inputs else [],
        "values_with_dynamic_shape": int(dynamic_values),
        "providers": providers,
    }


def _partition_json(info) -> dict:
    return {
        "nodes_total": int(info.num_nodes),
        "nodes_supported": int(info.num_supported_nodes),
        "partitions": int(info.num_partitions),
        "unsupported_ops": sorted(info.unsupported_ops),
        "nodes_unsupported_due_to_dynamic_shape": int(info.nodes_unsupported_due_to_dynamic_input),
        "suitability": info.suitability().name,
    }


def _compare_logits(onnx_path: Path, ort_path: Path, model_dir) -> dict:
    """Prefill + 2 cached decode steps through both files; max abs difference of every output."""
    import numpy as np

    from edgepack.runtime.generate import DecoderSession, encoder_feeds
    from edgepack.runtime.session import create_session

    tokens = [int(t) for t in np.random.default_rng(0).integers(3, int(model_dir.config.get("vocab_size", 100)), 12)]
    diffs = []
    if model_dir.task == TEXT_GENERATION:
        a = DecoderSession(create_session(onnx_path), model_dir.config)
        b = DecoderSession(create_session(ort_path), model_dir.config)
        cache_a, cache_b, past = a.empty_cache(), b.empty_cache(), 0
        for chunk in (tokens[:10], tokens[10:11], tokens[11:12]):
            la, cache_a = a.forward(chunk, cache_a, past)
            lb, cache_b = b.forward(chunk, cache_b, past)
            past += len(chunk)
            diffs.append(float(np.max(np.abs(la - lb))))
    else:
        sa, sb = create_session(onnx_path), create_session(ort_path)
        feeds = encoder_feeds(tokens, {i.name for i in sa.get_inputs()})
        diffs.append(float(np.max(np.abs(sa.run(None, feeds)[0] - sb.run(None, feeds)[0]))))
    return {"max_abs_diff": max(diffs), "per_step": diffs}


@dataclass
class _Prepared:
    """Step 1 (prepare graph): the export with a fixed batch and a tied lm_head kept single, in the work folder."""

    path: Path
    fixed_dims: list
    tied_rewritten: int


@dataclass
class _Converted:
    """Step 2 (convert): the .ort in the bundle and whether a reduced-operator config came with it."""

    path: Path
    ops_config: bool


def _prepare_graph(model_dir, config: OrtMobileConfig, work: Path, status) -> _Prepared:
    import onnx

    from edgepack.quantize.external import TensorStore

    status("preparing the graph for mobile (fixed batch, tied weights kept single)")
    # Graph edits only: the weights stay in their file and are copied one at a time into the prepared model.
    model = onnx.load(str(model_dir.onnx_path), load_external_data=False)
    fixed = fix_batch_dimension(model, config.batch_size)
    tied = tie_lm_head_without_copy(model)
    # Shape hints are optional and onnxruntime re-infers them; the genai builder's graphs carry some that
    # onnx's own shape inference (run by the usability checker) rejects, e.g. a rank-0 hint on a [1] Constant.
    del model.graph.value_info[:]
    with TensorStore(model_dir.onnx_path.parent, work) as store:
        store.save(model, work / MODEL_FILE)
    del model
    return _Prepared(work / MODEL_FILE, fixed, tied)


def _convert(model_dir, prepared: _Prepared, work: Path, tmp: Path, status) -> _Converted:
    import contextlib
    import io
    import logging

    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    status("converting to ORT format with onnxruntime's converter")
    for name in ("ort_format_model", "ort_format_model.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints progress lines
        # The optimized .onnx is the size reference: the same graph and optimizations, in ONNX format.
        convert_onnx_models_to_ort(prepared.path, output_dir=work, optimization_styles=[OptimizationStyle.Fixed],
                                   enable_type_reduction=True, save_optimized_onnx_model=True)
    produced = sorted(work.glob("*.ort"))
    if not produced:
        raise BadInputError(f"onnxruntime's converter produced no .ort file for {model_dir.onnx_path}")
    shutil.move(str(produced[0]), tmp / ORT_FILE)
    configs = sorted(work.glob("*.config"))
    if configs:
        # The converter's header names the model by its temporary build path; name it as shipped
        # so the same model gives the same file.
        lines = configs[0].read_text().splitlines(keepends=True)
        lines = [f"# - {ORT_FILE}\n" if line.startswith("# - ") else line for line in lines]
        (tmp / OPS_CONFIG).write_text("".join(lines))
    return _Converted(tmp / ORT_FILE, bool(configs))


def _write_side_files(model_dir, tmp: Path) -> None:
    """Tokenizer and provenance files; a genai_config.json is kept, pointing at the .ort."""
    copy_side_files(tmp, model_dir.folder, extra=PROVENANCE_FILES)
    if (model_dir.folder / "genai_config.json").is_file():
        genai = json.loads((model_dir.folder / "genai_config.json").read_text())
        genai["model"]["decoder"]["filename"] = ORT_FILE
        (tmp / "genai_config.json").write_text(json.dumps(genai, indent=4) + "\n")


def _sizes(model_dir, converted: _Converted, config: OrtMobileConfig, work: Path) -> dict:
    """Step 3: the .ort's size against the source .onnx and against onnxruntime's optimized graph saved as ONNX."""
    onnx_bytes = sum(p.stat().st_size for p in model_dir.folder.glob(MODEL_FILE + "*"))
    ort_bytes = converted.path.stat().st_size
    optimized = sorted(work.glob("*.optimized.onnx"))
    if not optimized:
        raise BadInputError(f"onnxruntime's converter saved no optimized graph for {model_dir.onnx_path}")
    optimized_bytes = onnx_bytes_with_data(optimized[0])
    return {"onnx_bytes": onnx_bytes, "ort_bytes": ort_bytes, "ratio": ort_bytes / onnx_bytes,
            "optimized_onnx_bytes": optimized_bytes, "ratio_vs_optimized": ort_bytes / optimized_bytes,
            "max_ratio": config.max_size_ratio, "allowed_overhead_bytes": ALLOWED_OVERHEAD_BYTES}


def onnx_bytes_with_data(path: Path) -> int:
    """The graph file plus every byte of external data its tensors refer to, in whichever file: onnxruntime
    saves an optimized graph with references into its source's data file for the tensors it did not change."""
    import onnx

    from edgepack.quantize.external import is_external

    model = onnx.load(str(path), load_external_data=False)
    external = 0
    for tensor in model.graph.initializer:
        if is_external(tensor):
            external += int({e.key: e.value for e in tensor.external_data}.get("length", 0))
    return path.stat().st_size + external


def size_gate(check: dict) -> GateResult:
    """Within max_size_ratio of the optimized graph, or within the format's fixed overhead (which dominates
    for tiny test models). `ratio` (against the source .onnx) shows what onnxruntime's folding added."""
    limit = max(check["max_ratio"] * check["optimized_onnx_bytes"], check["optimized_onnx_bytes"] + check["allowed_overhead_bytes"])
    return figure_gate(TARGET, "size_vs_onnx", "ort_bytes", check["ort_bytes"], limit, "max", unit="B",
                       option="--max-size-ratio x optimized graph (or + overhead)")


def parity_gate(check: dict) -> GateResult:
    return figure_gate(TARGET, "parity_vs_onnx", "max_abs_diff", check["max_abs_diff"], check["atol"], "max", option="atol")


def ort_mobile_gates(checks: dict) -> list[GateResult]:
    """Every pass/fail decision of the ort-mobile target."""
    figures = {"size_vs_onnx": size_gate, "parity_vs_onnx": parity_gate}
    return [figures[name](check) if name in figures else check_gate(TARGET, name, check) for name, check in checks.items()]


def _checks(model_dir, size: dict, config: OrtMobileConfig, tmp: Path, status) -> dict:
    """Step 4 (verify): size against onnxruntime's own graph, the shipped tokenizer, .ort against .onnx outputs."""
    from edgepack.targets.tokenizer_check import check_genai_tokenizer, check_tokenizer_files, reference_tokenizer

    checks = {"size_vs_onnx": {**size, "passed": size_gate(size).passed}}
    reference = reference_tokenizer(model_dir.folder)
    if (tmp / "genai_config.json").is_file():
        # Shipped for onnxruntime-genai: its tokenizer must read the files as Hugging Face does.
        status("checking onnxruntime-genai's tokenizer against Hugging Face's")
        checks["tokenizer_genai"] = check_genai_tokenizer(tmp, reference)
    else:
        checks["tokenizer_files"] = check_tokenizer_files(tmp, reference)
    if config.verify:
        status("comparing .ort and .onnx outputs")
        parity = {**_compare_logits(model_dir.onnx_path, tmp / ORT_FILE, model_dir), "atol": config.atol}
        checks["parity_vs_onnx"] = {**parity, "passed": parity_gate(parity).passed}
    return checks


def build(directory: Path | str, out: Path | str, config: OrtMobileConfig = OrtMobileConfig(), on_status=None) -> TargetArtifact:
    """prepare graph -> convert to .ort -> usability report -> side files -> verify -> write."""
    from edgepack._quiet import quiet_libraries
    from edgepack.core.versions import tool_versions
    from edgepack.outputs import prepare_output, replace_dir, staging_dir

    status = on_status or (lambda message: None)
    start = time.perf_counter()
    out = Path(out)
    prepare_output(out, config.force)
    model_dir = load_model_dir(directory)
    if model_dir.onnx_path.suffix != ".onnx":
        raise BadInputError(f"{directory} holds no model.onnx to convert")
    quiet_libraries()
    with staging_dir(out) as tmp:
        work = tmp / ".work"
        work.mkdir()
        prepared = _prepare_graph(model_dir, config, work, status)
        converted = _convert(model_dir, prepared, work, tmp, status)
        status("checking mobile execution-provider coverage")
        usability = usability_report(prepared.path)
        (tmp / USABILITY_FILE).write_text(json.dumps(usability, indent=2) + "\n")
        _write_side_files(model_dir, tmp)
        size = _sizes(model_dir, converted, config, work)
        checks = _checks(model_dir, size, config, tmp, status)
        shutil.rmtree(work)
        facts = {
            "format": "ort",
            "optimization_style": "Fixed",
            "fixed_dims": {param: config.batch_size for param in prepared.fixed_dims},
            "tied_lm_head_rewritten": prepared.tied_rewritten,
            "reduced_operator_config": OPS_CONFIG if converted.ops_config else None,
            "usability": {name: {k: v for k, v in p.items() if k in ("nodes_supported", "nodes_total", "partitions", "recommendation")}
                          for name, p in usability["providers"].items()},
            "config": asdict(config),
        }
        artifact = TargetArtifact(out=out, target=TARGET, facts=facts, checks=checks,
                                  source={"dir": str(Path(directory).resolve())}, versions=tool_versions(),
                                  seconds={"total": round(time.perf_counter() - start, 3)}, gates=ort_mobile_gates(checks))
        write_target_json(tmp, artifact)
        replace_dir(tmp, out)
    return artifact


@click.command("ort-mobile")
@click.argument("directory", metavar="DIR", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Bundle folder.")
@click_options(OrtMobileConfig)
def command(directory, out, **options):
    """ORT-format bundle (model.ort, required_operators.config, mobile_usability.json, target.json).

    \b
    Example:
      edgepack target ort-mobile build/smollm2-ort -o build/smollm2-ort-mobile
      edgepack target ort-mobile build/smollm2-q4 -o build/smollm2-mobile
    """
    from edgepack.core.console import Status, report_target

    config = config_from_cli(OrtMobileConfig, options)
    with Status(f"target ort-mobile: {directory}") as status:
        artifact = build(directory, out, config, on_status=status)
    report_target(artifact)
