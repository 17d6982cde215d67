"""An exported model folder: model.onnx plus tokenizer, config and generation config beside it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from edgepack.errors import BadInputError

MODEL_FILE = "model.onnx"
ORT_MODEL_FILE = "model.ort"
CONVERT_REPORT = "convert.json"
TEXT_GENERATION = "text-generation"
FEATURE_EXTRACTION = "feature-extraction"


@dataclass
class ExportedModelDir:
    folder: Path
    onnx_path: Path
    config: dict
    generation_config: dict = field(default_factory=dict)
    task: str = TEXT_GENERATION

    def eos_token_ids(self, tokenizer=None) -> set[int]:
        ids: set[int] = set()
        for source in (self.generation_config.get("eos_token_id"), self.config.get("eos_token_id")):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, list):
                ids.update(int(i) for i in source)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        return ids

    @property
    def context_length(self) -> int | None:
        """The most positions (prompt + generated tokens) this model takes, None when nothing says.

        A target bundle's genai_config.json `context_length` is what an app built on it allocates KV
        buffers for (the graph may run further, but the bundle does not promise it); an export is bounded by
        its position embeddings (config.json). `run` and `profile` both hold lengths to this one figure.
        """
        genai = _read_json(self.folder / "genai_config.json") or {}
        limits = [_positive_int((genai.get("model") or {}).get("context_length")), max_positions(self.config)]
        limits = [limit for limit in limits if limit is not None]
        return min(limits) if limits else None

    @property
    def share_kv_buffer(self) -> bool:
        """True when the folder's genai_config.json says past and present KV share one buffer (GroupQueryAttention graphs)."""
        genai = _read_json(self.folder / "genai_config.json") or {}
        return bool((genai.get("search") or {}).get("past_present_share_buffer"))

    def load_tokenizer(self):
        from edgepack._quiet import quiet_libraries

        quiet_libraries()
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(self.folder))
        except Exception as exc:  # missing or broken tokenizer files
            raise BadInputError(f"{self.folder} has no usable tokenizer: {exc}") from exc


def max_positions(config: dict) -> int | None:
    """The longest sequence a Hugging Face config's position embeddings cover, None when it does not say."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = _positive_int(config.get(key))
        if value is not None:
            return value
    return None


def _positive_int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def load_model_dir(folder: Path | str) -> ExportedModelDir:
    """Open an edgepack export (or any folder with model.onnx + config.json); one-line errors otherwise."""
    folder = Path(folder)
    if not folder.exists():
        raise BadInputError(f"{folder} does not exist")
    if not folder.is_dir():
        raise BadInputError(f"{folder} is not a folder: pass the output folder of `edgepack convert`")
    onnx_path = folder / MODEL_FILE
    if not onnx_path.is_file() and (folder / ORT_MODEL_FILE).is_file():
        onnx_path = folder / ORT_MODEL_FILE  # an `edgepack target ort-mobile` bundle
    if not onnx_path.is_file():
        raise BadInputError(f"no model in {folder}: expected {MODEL_FILE} (made by `edgepack convert MODEL -o {folder}`)")
    config = _read_json(folder / "config.json") or {}
    generation_config = _read_json(folder / "generation_config.json") or {}
    report = _read_json(folder / CONVERT_REPORT) or {}
    task = report.get("task") or _infer_task(onnx_path)
    return ExportedModelDir(folder, onnx_path, config, generation_config, task)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path} is not valid JSON: {exc}") from exc
    return data if isinstance(data, dict) else None


def _infer_task(onnx_path: Path) -> str:
    import onnx

    if onnx_path.suffix == ".ort":
        from edgepack.runtime.session import create_session

        outputs = {o.name for o in create_session(onnx_path).get_outputs()}
        return TEXT_GENERATION if "logits" in outputs else FEATURE_EXTRACTION

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:
        raise BadInputError(f"{onnx_path} is not a readable ONNX model: {exc}") from exc
    outputs = {o.name for o in model.graph.output}
    return TEXT_GENERATION if "logits" in outputs else FEATURE_EXTRACTION
