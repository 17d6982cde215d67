"""Export a Hugging Face model to ONNX with optimum-onnx, then prove the export against PyTorch.

One entry point, `convert_model(model, out, config) -> ExportedModel`. The output folder is built in a
temporary sibling and renamed into place only when complete, so a failure or a kill never leaves a
half-written export at `out`.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgepack.convert.config import ConvertConfig
from edgepack.convert.pooling import add_sentence_output, read_sentence_pooling
from edgepack.convert.store import finish_export, per_tensor_external_data, tied_info
from edgepack.core.files import tokenizer_files
from edgepack.core.versions import tool_versions
from edgepack.errors import BadInputError, UnsupportedModelError, UsageError
from edgepack.outputs import prepare_output, replace_dir, staging_dir
from edgepack.runtime.model_dir import CONVERT_REPORT, FEATURE_EXTRACTION, MODEL_FILE, TEXT_GENERATION
from edgepack.sources import ModelSource, resolve_source

TASKS = ("auto", TEXT_GENERATION, FEATURE_EXTRACTION)
# optimum's task name for each of ours: decoders always carry their KV cache.
_OPTIMUM_TASK = {TEXT_GENERATION: "text-generation-with-past", FEATURE_EXTRACTION: "feature-extraction"}
REPORT_SCHEMA_VERSION = 1


@dataclass
class ExportedModel:
    out: Path
    task: str
    model_type: str
    architecture: str
    num_parameters: int
    files: dict[str, int]
    source: dict
    versions: dict[str, str]
    seconds: dict[str, float]
    opset: int
    parity: dict | None = None
    config: dict = field(default_factory=dict)
    # True: every tied table (embedding = lm_head) is stored once; None: the model ties nothing.
    tied_weights_stored_once: bool | None = None
    # sentence-transformers folders: the pooling written into the graph (output `sentence_embedding`), or why not
    sentence_embedding: dict | None = None

    @property
    def parity_passed(self) -> bool | None:
        return None if self.parity is None else bool(self.parity["passed"])

    def to_json(self) -> dict:
        return {
            "schema_version": REPORT_SCHEMA_VERSION,
            "kind": "edgepack.convert",
            "task": self.task,
            "model_type": self.model_type,
            "architecture": self.architecture,
            "num_parameters": self.num_parameters,
            "opset": self.opset,
            "files": self.files,
            "total_bytes": sum(self.files.values()),
            "source": self.source,
            "config": self.config,
            "parity": self.parity,
            "tied_weights_stored_once": self.tied_weights_stored_once,
            "sentence_embedding": self.sentence_embedding,
            "versions": self.versions,
            "seconds": self.seconds,
        }


def resolve_task(source: ModelSource, requested: str) -> str:
    """Our task for this model, checked against what optimum-onnx can export for its model_type."""
    if requested not in TASKS:
        raise UsageError(f"unknown task {requested!r}; choose one of {', '.join(TASKS)}")
    import optimum.exporters.onnx.model_configs  # noqa: F401  (fills optimum's task registry)
    from optimum.exporters.tasks import TasksManager

    model_type = source.model_type
    if source.config.get("is_encoder_decoder"):
        raise UnsupportedModelError(
            f"model_type {source.model_type!r} is an encoder-decoder model; edgepack exports decoder-only LLMs and encoders"
        )
    try:
        supported = TasksManager.get_supported_tasks_for_model_type(model_type, "onnx", library_name="transformers")
    except KeyError:
        decoders, encoders = _exportable_types(TasksManager)
        raise UnsupportedModelError(
            f"unknown model_type {source.model_type!r}: optimum-onnx cannot export it. Supported decoders: "
            f"{', '.join(decoders)}; supported encoders: {', '.join(encoders)}"
        ) from None
    if requested == "auto":
        requested = TEXT_GENERATION if _OPTIMUM_TASK[TEXT_GENERATION] in supported else FEATURE_EXTRACTION
    if _OPTIMUM_TASK[requested] not in supported:
        raise UnsupportedModelError(
            f"model_type {source.model_type!r} cannot be exported for {requested}; it supports: {', '.join(supported)}"
        )
    return requested


def _exportable_types(tasks_manager) -> tuple[list[str], list[str]]:
    """(decoder-only types, text encoder types) optimum-onnx exports and edgepack takes.

    Encoder-decoders are in neither list (edgepack refuses them), nor are image and audio encoders
    (edgepack feeds token ids).
    """
    generating = set(tasks_manager.get_supported_model_type_for_task("text-generation-with-past", exporter="onnx"))
    decoders = sorted(name for name in generating if _is_encoder_decoder(name) is False)
    encoders = sorted(name for name in tasks_manager.get_supported_model_type_for_task("feature-extraction", exporter="onnx")
                      if name not in generating and _takes_text(tasks_manager, name) and _is_encoder_decoder(name) is False)
    return decoders, encoders


def _takes_text(tasks_manager, model_type: str) -> bool:
    from optimum.utils import DummyTextInputGenerator

    try:
        constructor = tasks_manager.get_exporter_config_constructor(
            "onnx", model_type=model_type, task="feature-extraction", library_name="transformers")
    except Exception:  # optimum lists it but cannot say how: leave it out of the list
        return False
    generators = getattr(getattr(constructor, "func", constructor), "DUMMY_INPUT_GENERATOR_CLASSES", ())
    return bool(generators) and issubclass(generators[0], DummyTextInputGenerator)


def _is_encoder_decoder(model_type: str) -> bool | None:
    """From the architecture's default config; None when transformers does not know the type."""
    from transformers import CONFIG_MAPPING

    # CONFIG_MAPPING is lazy: only `in` and [] import the config class (its .get() sees an empty dict).
    for name in (model_type, model_type.replace("-", "_")):
        if name in CONFIG_MAPPING:
            try:
                return bool(getattr(CONFIG_MAPPING[name](), "is_encoder_decoder", False))
            except Exception:  # a config class that needs arguments: leave the type out of the list
                return None
    return None


def convert_model(model: str, out: Path | str, config: ConvertConfig = ConvertConfig(), on_status=None) -> ExportedModel:
    """Export MODEL to `out/model.onnx` (+ tokenizer, configs, convert.json) and check parity unless disabled."""
    out = Path(out)
    status = on_status or (lambda message: None)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    prepare_output(out, config.force)
    source = resolve_source(
        model, allow_pickle=config.allow_pickle, trust_remote_code=config.trust_remote_code, on_status=status
    )
    timings["resolve_source"] = time.perf_counter() - start

    from edgepack._quiet import quiet_libraries

    quiet_libraries()
    status("checking the architecture against optimum-onnx")
    task = resolve_task(source, config.task)

    status(f"loading {source.model_type} weights with transformers")
    t0 = time.perf_counter()
    torch_model, tokenizer = load_torch_model(source, task, trust_remote_code=config.trust_remote_code)
    timings["load"] = time.perf_counter() - t0
    from edgepack.convert.parity import check_tokenizer_fits

    check_tokenizer_fits(torch_model, tokenizer)

    # One copy of the weights at a time where the libraries allow it: PyTorch's (export, then its
    # reference outputs), then, once the PyTorch model is freed, the rewrite on disk (convert/store.py,
    # a tensor at a time) and onnxruntime's session for parity.
    architecture = (source.config.get("architectures") or [type(torch_model).__name__])[0]
    num_parameters = int(sum(p.numel() for p in torch_model.parameters()))
    tied = tied_info(torch_model)
    with staging_dir(out) as tmp:
        status(f"exporting to ONNX ({_OPTIMUM_TASK[task]}) with optimum-onnx")
        t0 = time.perf_counter()
        opset, folded_export = export_onnx(torch_model, tmp, task, config.opset)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        timings["export"] = time.perf_counter() - t0

        reference = None
        if config.verify:
            from edgepack.convert.parity import torch_reference

            status("running PyTorch for the parity reference")
            t0 = time.perf_counter()
            reference = torch_reference(torch_model, tokenizer, tmp / MODEL_FILE, task, config)
            timings["parity_torch"] = time.perf_counter() - t0
        del torch_model
        gc.collect()

        status("storing weights in MatMul layout, tied tables once, external data in one file")
        t0 = time.perf_counter()
        stored = finish_export(tmp / MODEL_FILE, tied, folded_export=folded_export)
        timings["store"] = time.perf_counter() - t0
        pooling = read_sentence_pooling(source.hf_dir) if task == FEATURE_EXTRACTION else None
        if pooling is not None and pooling.unsupported is None:
            status(f"adding the sentence embedding ({'+'.join(pooling.modes)} pooling{', normalized' if pooling.normalize else ''})")
            add_sentence_output(tmp / MODEL_FILE, pooling)
        elif pooling is not None:
            status(f"no sentence_embedding output: {pooling.unsupported}")

        parity = None
        if reference is not None:
            from edgepack.convert.parity import compare_with_onnx

            status("checking parity against PyTorch")
            t0 = time.perf_counter()
            parity = compare_with_onnx(reference, tmp / MODEL_FILE, config, pooling if pooling and not pooling.unsupported else None)
            timings["parity"] = time.perf_counter() - t0 + timings.pop("parity_torch")
        timings["total"] = time.perf_counter() - start

        result = ExportedModel(
            out=out,
            task=task,
            model_type=source.model_type,
            architecture=architecture,
            num_parameters=num_parameters,
            files={},
            source=source.describe(),
            versions=tool_versions(),
            seconds={k: round(v, 3) for k, v in timings.items()},
            opset=opset,
            parity=parity,
            config={k: v for k, v in asdict(config).items() if k != "force"},
            tied_weights_stored_once=stored["tied_weights_stored_once"],
            sentence_embedding=None if pooling is None else pooling.to_json(),
        )
        # The report lists the artifacts beside it (not itself).
        result.files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / CONVERT_REPORT).write_text(json.dumps(result.to_json(), indent=2) + "\n")
        replace_dir(tmp, out)
    return result


def load_torch_model(source: ModelSource, task: str, *, trust_remote_code: bool):
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    model_cls = AutoModelForCausalLM if task == TEXT_GENERATION else AutoModel
    use_safetensors = any(name.endswith(".safetensors") for name in source.weight_files) or not source.weight_files
    try:
        model = model_cls.from_pretrained(
            str(source.hf_dir),
            torch_dtype=torch.float32,
            use_safetensors=use_safetensors,
            trust_remote_code=trust_remote_code,
            local_files_only=True,
        )
    except Exception as exc:  # transformers raises many types for bad folders; all are bad input to us
        raise BadInputError(f"transformers cannot load {source.hf_dir}: {type(exc).__name__}: {exc}") from exc
    model.eval()
    files = tokenizer_files(source.hf_dir)
    if not files:
        return model, None  # an export without a tokenizer is still useful; parity then uses fixed token ids
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.hf_dir), local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as exc:  # tokenizers/transformers raise many types for broken files
        # Dropping it would ship an export `run` cannot use, with exit 0.
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        raise BadInputError(f"the tokenizer in {source.hf_dir} does not load ({', '.join(files)}): {reason}") from exc
    return model, tokenizer


def export_onnx(torch_model, out: Path, task: str, opset: int | None, fold: bool | None = None) -> tuple[int, bool]:
    """Export with optimum-onnx; return (opset, whether torch folded constants). `fold` None: unfolded, below."""
    import onnx
    from optimum.exporters.onnx import onnx_export_from_model

    # torch's constant folding transposes every Linear weight into a new tensor while the PyTorch model
    # still holds the original: two copies of the weights. Unfolded, torch's graph holds one, and
    # `finish_export` stores the transposes a tensor at a time from disk; the weights' values are the
    # same, only the initializers' names differ. (Below protobuf's 2 GiB torch still builds the serialized
    # model in memory; past it, it writes external data as it goes.)
    if fold is None:
        fold = False

    try:
        with per_tensor_external_data():
            onnx_export_from_model(
                torch_model,
                str(out),
                task=_OPTIMUM_TASK[task],
                opset=opset,
                do_validation=False,  # our own parity check below is stricter and uses real token sequences
                # optimum's post-processing (tied-weight deduplication) holds the whole model in one
                # protobuf and fails past 2 GB; `finish_export` does it on disk instead.
                no_post_process=True,
                do_constant_folding=fold,
            )
    except ValueError as exc:  # e.g. an opset below the architecture's minimum
        raise UsageError(f"optimum-onnx refused the export: {exc}") from exc
    model_path = out / MODEL_FILE
    if not model_path.is_file():
        raise UnsupportedModelError(f"optimum-onnx did not produce {MODEL_FILE} for this model (files: {sorted(p.name for p in out.iterdir())})")
    proto = onnx.load(str(model_path), load_external_data=False)
    return max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0), fold


