"""What an app using onnxruntime-genai as documented gets from an `ort` bundle: its tokenizer reads the shipped
files as Hugging Face does, og.Model accepts the genai_config.json, and `--graph auto` never picks a wrong graph."""

from __future__ import annotations

import json
import shutil

import pytest

from edgepack.targets.genai_builder import builder_python
from tests import tiny_models
from tests.conftest import read_json
from tests.gguf_fixtures import TinyLlamaSpec, write_tiny_llama_gguf

needs_builder = pytest.mark.skipif(builder_python() is None, reason="onnxruntime-genai builder env not set up (scripts/setup.sh)")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "tokenizer.model")


def _transformers_gguf_tokenizer(gguf_path, folder):
    """Replace the tokenizer files of `folder` by what transformers writes from the GGUF (its mixed decoders)."""
    from transformers import AutoTokenizer

    for name in TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
    AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).save_pretrained(str(folder))
    (folder / "tokenizer.model").unlink(missing_ok=True)
    decoder = json.loads((folder / "tokenizer.json").read_text())["decoder"]
    assert [d["type"] for d in decoder["decoders"]][:3] == ["ByteFallback", "Fuse", "Replace"]  # the style under test


def test_genai_tokenizer_check_catches_the_gguf_style_tokenizer_and_the_clean_writer_fixes_it(exported_tiny_factory, tmp_path, cli):
    from edgepack.sources import write_gguf_tokenizer

    gguf_path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", TinyLlamaSpec(chat_template=tiny_models.CHAT_TEMPLATE))
    source = tmp_path / "src"
    shutil.copytree(exported_tiny_factory("llama"), source)
    _transformers_gguf_tokenizer(gguf_path, source)

    broken = tmp_path / "broken"
    result = cli("target", "ort", source, "-o", broken, "--graph", "optimum")
    assert result.exit_code == 1, result.stderr
    assert "tokenizer_genai" in result.stderr
    checks = read_json(broken / "target.json")["checks"]
    tokenizer = checks["tokenizer_genai"]
    assert tokenizer["passed"] is False and tokenizer["encode_identical"] < tokenizer["samples"]
    assert -1 in tokenizer["encode_mismatches"][0]["onnxruntime_genai"]  # spaces genai cannot map
    # The generation check now tokenizes with onnxruntime-genai too, so it sees the same defect.
    assert checks["onnxruntime_genai"]["prompt_ids_identical"] is False and checks["onnxruntime_genai"]["passed"] is False
    assert checks["parity_vs_source"]["passed"] is True  # the graph itself is fine

    info = write_gguf_tokenizer(gguf_path, source)
    assert info["written_by"] == "edgepack" and info["add_bos_token"] is False
    written = json.loads((source / "tokenizer.json").read_text())
    assert written["normalizer"] is None and written["decoder"]["type"] == "ByteLevel"
    assert written["model"]["byte_fallback"] is False
    fixed = tmp_path / "fixed"
    result = cli("target", "ort", source, "-o", fixed, "--graph", "optimum")
    assert result.exit_code == 0, result.stderr
    checks = read_json(fixed / "target.json")["checks"]
    assert checks["tokenizer_genai"]["passed"] is True
    assert checks["tokenizer_genai"]["encode_identical"] == checks["tokenizer_genai"]["samples"] >= 6
    assert checks["tokenizer_genai"]["chat_template"] == {"identical": True, "ids_identical": True}
    assert checks["onnxruntime_genai"]["prompt_ids_identical"] is True and checks["onnxruntime_genai"]["passed"] is True


def test_gguf_source_gets_a_clean_byte_level_tokenizer(tmp_path, monkeypatch):
    """resolve_source writes the GGUF's tokenizer as plain byte-level BPE; caches of the older layout are rewritten."""
    from transformers import AutoTokenizer

    from edgepack.sources import SOURCE_INFO_FILE, resolve_source, write_gguf_tokenizer

    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))
    gguf_path = write_tiny_llama_gguf(tmp_path / "g" / "tiny.gguf", TinyLlamaSpec(chat_template=tiny_models.CHAT_TEMPLATE))
    source = resolve_source(str(gguf_path))
    written = json.loads((source.hf_dir / "tokenizer.json").read_text())
    assert written["normalizer"] is None and written["decoder"]["type"] == "ByteLevel"
    tokenizer = AutoTokenizer.from_pretrained(str(source.hf_dir))
    # The GGUF's own ids: EOS is <|im_end|> (transformers' loader takes the BOS for it) and no BOS is added.
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token == "<|im_start|>"
    ids = tokenizer("the cat sat")["input_ids"]
    assert tokenizer.bos_token_id not in ids and tokenizer.decode(ids) == "the cat sat"
    assert tokenizer.chat_template == tiny_models.CHAT_TEMPLATE

    # A cache folder written before this layout still holds transformers' tokenizer: it is rewritten in place.
    _transformers_gguf_tokenizer(gguf_path, source.hf_dir)
    info = json.loads((source.hf_dir / SOURCE_INFO_FILE).read_text())
    del info["tokenizer"]
    (source.hf_dir / SOURCE_INFO_FILE).write_text(json.dumps(info))
    again = resolve_source(str(gguf_path))
    assert again.hf_dir == source.hf_dir
    assert json.loads((again.hf_dir / "tokenizer.json").read_text())["decoder"]["type"] == "ByteLevel"

    # A GGUF that asks for a BOS gets one from Hugging Face's tokenizer, as llama.cpp adds it.
    with_bos = write_tiny_llama_gguf(tmp_path / "b" / "bos.gguf", TinyLlamaSpec(add_bos=True))
    folder = tmp_path / "bos-tok"
    folder.mkdir()
    assert write_gguf_tokenizer(with_bos, folder)["add_bos_token"] is True
    ids = AutoTokenizer.from_pretrained(str(folder))("the cat")["input_ids"]
    assert ids[0] == 1 and 1 not in ids[1:]


def _tiny_export(tmp_path, arch, **overrides):
    from edgepack.convert import ConvertConfig, convert_model

    model = tiny_models.build(arch, tmp_path / f"{arch}-hf", **overrides)
    out = tmp_path / f"{arch}-export"
    convert_model(str(model), out, ConvertConfig(verify=False))
    return out


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_model_without_bos_gets_a_genai_config_genai_loads(tmp_path, cli, arch):
    import onnxruntime_genai as og

    export = _tiny_export(tmp_path, arch, bos_token_id=None)
    assert "bos_token_id" not in json.loads((export / "config.json").read_text()) or \
        json.loads((export / "config.json").read_text())["bos_token_id"] is None
    out = tmp_path / "ort"
    result = cli("target", "ort", export, "-o", out, "--graph", "optimum", "--no-verify")
    assert result.exit_code == 0, result.stderr
    genai = json.loads((out / "genai_config.json").read_text())["model"]
    assert "bos_token_id" not in genai and genai["eos_token_id"] == 2 and genai["pad_token_id"] == 3
    report = read_json(out / "target.json")
    assert report["checks"]["onnxruntime_genai_loads"]["passed"] is True  # loaded even with --no-verify
    og.Model(str(out))


def _greedy_with_genai(bundle, prompt: list[int], steps: int) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(bundle))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + steps)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    return list(generator.get_sequence(0))[len(prompt):]


@pytest.mark.slow
@pytest.mark.parametrize("graph", ["optimum", pytest.param("builder", marks=needs_builder)])
def test_config_with_null_bos_builds_a_verified_bundle_genai_runs(tmp_path, cli, graph):
    """config.json `"bos_token_id": null` (and no BOS in the tokenizer): both graph routes, verification on, genai generates."""
    export = _tiny_export(tmp_path, "llama", bos_token_id=None)
    for name, key in (("tokenizer_config.json", "bos_token"), ("special_tokens_map.json", "bos_token")):
        data = json.loads((export / name).read_text())
        data.pop(key, None)
        (export / name).write_text(json.dumps(data))
    assert json.loads((export / "config.json").read_text())["bos_token_id"] is None
    out = tmp_path / "ort"
    result = cli("target", "ort", export, "-o", out, "--graph", graph, "--max-context", "64")
    assert result.exit_code == 0, result.stderr
    report = read_json(out / "target.json")
    assert report["facts"]["graph_route"] == graph and report["passed"] is True
    assert report["checks"]["onnxruntime_genai_loads"]["passed"] is True
    genai = json.loads((out / "genai_config.json").read_text())["model"]
    if graph == "optimum":
        assert "bos_token_id" not in genai
    else:  # the builder writes a BOS of its own choosing; one onnxruntime-genai accepts lies in the vocabulary
        assert genai.get("bos_token_id", 0) in range(tiny_models.VOCAB_SIZE)
    assert len(_greedy_with_genai(out, [5, 17, 99, 23], 4)) == 4


def test_eos_outside_the_vocabulary(tmp_path, cli):
    """gpt2-style configs (eos 50256 over a 512-token vocabulary): the tokenizer's EOS is used; none at all is refused."""
    export = _tiny_export(tmp_path, "gpt2", bos_token_id=50256, eos_token_id=50256)
    out = tmp_path / "ort"
    result = cli("target", "ort", export, "-o", out, "--no-verify")
    assert result.exit_code == 0, result.stderr
    genai = json.loads((out / "genai_config.json").read_text())["model"]
    assert genai["eos_token_id"] == 2 and "bos_token_id" not in genai  # <|im_end|>, the tokenizer's EOS
    facts = read_json(out / "target.json")["facts"]["genai_token_ids"]
    assert facts["eos_token_ids_outside_vocab"] == [50256] and facts["bos_token_id_dropped"] == 50256

    config = json.loads((export / "tokenizer_config.json").read_text())
    config.pop("eos_token", None)
    (export / "tokenizer_config.json").write_text(json.dumps(config))
    special = json.loads((export / "special_tokens_map.json").read_text())
    special.pop("eos_token", None)
    (export / "special_tokens_map.json").write_text(json.dumps(special))
    refused = tmp_path / "refused"
    result = cli("target", "ort", export, "-o", refused)
    assert result.exit_code == 3, result.stderr
    assert len(result.stderr_lines) == 1 and "end-of-sequence" in result.stderr and "50256" in result.stderr
    assert not refused.exists()


@needs_builder
def test_auto_falls_back_to_optimum_when_the_builder_graph_fails_parity(tmp_path, cli):
    """Qwen3 with head_dim != hidden/heads (as Qwen3-0.6B has): the builder's fp32 graph computes other logits."""
    export = _tiny_export(tmp_path, "qwen3", head_dim=128)
    auto = tmp_path / "auto"
    result = cli("target", "ort", export, "-o", auto, "--no-verify")
    assert result.exit_code == 0, result.stderr
    report = read_json(auto / "target.json")
    assert report["facts"]["graph_route"] == "optimum"
    assert "failed parity" in report["facts"]["graph_route_reason"] and "fell back" in report["facts"]["graph_route_reason"]
    rejected = report["facts"]["builder_rejected"]["parity_vs_source"]
    assert rejected["passed"] is False and rejected["kl_mean"] > rejected["max_kl_mean"]
    shown = " ".join(result.stdout.replace("│", " ").split())  # the summary table wraps long cells
    assert "graph_route_reason" in shown and "fell back to the optimum route" in shown

    explicit = tmp_path / "builder"
    result = cli("target", "ort", export, "-o", explicit, "--graph", "builder")
    assert result.exit_code == 1, result.stderr
    checks = read_json(explicit / "target.json")["checks"]
    assert checks["parity_vs_source"]["passed"] is False
