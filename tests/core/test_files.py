"""One list of side files: every target ships the tokenizer files its runtime reads, sentencepiece models included."""

from __future__ import annotations

import shutil

from edgepack.core.files import PROVENANCE_FILES, SIDE_FILES, copy_side_files, tokenizer_files

# Bytes stand in for a sentencepiece model: copying must not depend on what the file holds.
SENTENCEPIECE = b"\x0a\x0bsentencepiece stand-in"


def test_side_files_include_every_tokenizer_runtime_file():
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.txt", "vocab.json",
                 "merges.txt", "special_tokens_map.json", "chat_template.jinja", "config.json", "generation_config.json"):
        assert name in SIDE_FILES, name
    assert not set(PROVENANCE_FILES) & set(SIDE_FILES)


def test_copy_side_files_takes_each_file_from_the_first_folder_that_has_it(tmp_path):
    first, second, out = tmp_path / "first", tmp_path / "second", tmp_path / "out"
    for folder in (first, second, out):
        folder.mkdir()
    (first / "config.json").write_text('{"from": "first"}')
    (first / "model.onnx").write_bytes(b"graph")  # not a side file
    (second / "config.json").write_text('{"from": "second"}')
    (second / "tokenizer.model").write_bytes(SENTENCEPIECE)
    (second / "spiece.model").write_bytes(SENTENCEPIECE)
    (second / "convert.json").write_text("{}")
    (second / "notes.txt").write_text("not shipped")

    copied = copy_side_files(out, first, second)
    assert sorted(copied) == ["config.json", "spiece.model", "tokenizer.model"]
    assert sorted(p.name for p in out.iterdir()) == sorted(copied)
    assert (out / "config.json").read_text() == '{"from": "first"}'
    assert (out / "tokenizer.model").read_bytes() == SENTENCEPIECE
    assert copy_side_files(out, second, extra=PROVENANCE_FILES)[-1] == "convert.json"
    assert tokenizer_files(second) == ["tokenizer.model", "spiece.model"]


def test_ort_mobile_bundle_ships_the_sentencepiece_model(exported_tiny_factory, tmp_path, cli):
    export = tmp_path / "export"
    shutil.copytree(exported_tiny_factory("llama"), export)
    (export / "tokenizer.model").write_bytes(SENTENCEPIECE)
    result = cli("target", "ort-mobile", export, "-o", tmp_path / "bundle", "--no-verify")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "bundle" / "tokenizer.model").read_bytes() == SENTENCEPIECE
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "convert.json"):
        assert (tmp_path / "bundle" / name).is_file(), name
