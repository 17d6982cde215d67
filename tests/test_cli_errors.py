"""Every bad input: one line on stderr, the documented exit code, no traceback, nothing left at -o."""

from __future__ import annotations

import json
import shutil

import pytest


def assert_clean_failure(result, code: int, *fragments: str):
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert len(result.stderr_lines) == 1, result.stderr
    line = result.stderr_lines[0]
    assert line.startswith("error: "), line
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in line, line


def assert_no_output(out):
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*")), "no temporary folder may be left behind"


def test_missing_path(tmp_path, cli):
    out = tmp_path / "out"
    result = cli("convert", tmp_path / "nope", "-o", out)
    assert_clean_failure(result, 3, "does not exist")
    assert_no_output(out)


def test_folder_without_config(tmp_path, cli):
    (tmp_path / "empty-model").mkdir()
    out = tmp_path / "out"
    result = cli("convert", tmp_path / "empty-model", "-o", out)
    assert_clean_failure(result, 3, "config.json")
    assert_no_output(out)


def _copy_model(tiny_model_factory, tmp_path, arch="llama"):
    dst = tmp_path / f"{arch}-copy"
    shutil.copytree(tiny_model_factory(arch), dst)
    return dst


def test_truncated_safetensors(tiny_model_factory, tmp_path, cli):
    model = _copy_model(tiny_model_factory, tmp_path)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    result = cli("convert", model, "-o", out)
    assert_clean_failure(result, 3, "truncated", "model.safetensors")
    assert_no_output(out)


def test_corrupt_safetensors(tiny_model_factory, tmp_path, cli):
    model = _copy_model(tiny_model_factory, tmp_path)
    (model / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\0" * 64)
    out = tmp_path / "out"
    result = cli("convert", model, "-o", out)
    assert_clean_failure(result, 3, "corrupt")
    assert_no_output(out)


def _write_small_gguf(path):
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((64, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_truncated_gguf(tmp_path, cli, monkeypatch):
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))
    good = tmp_path / "small.gguf"
    _write_small_gguf(good)
    data = good.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: len(data) - 1000])
    out = tmp_path / "out"
    result = cli("convert", bad, "-o", out)
    assert_clean_failure(result, 3, "truncated")
    assert_no_output(out)
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def test_not_a_gguf_file(tmp_path, cli):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"NOPE" + b"\0" * 100)
    out = tmp_path / "out"
    result = cli("convert", fake, "-o", out)
    assert_clean_failure(result, 3, "not a GGUF file")
    assert_no_output(out)


def test_unknown_model_type_lists_supported(tiny_model_factory, tmp_path, cli):
    model = _copy_model(tiny_model_factory, tmp_path)
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "frobnicator"
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    result = cli("convert", model, "-o", out)
    assert_clean_failure(result, 3, "unknown model_type 'frobnicator'", "llama", "qwen2", "bert")
    assert_no_output(out)


def test_output_not_empty_without_force(tiny_model_factory, tmp_path, cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = cli("convert", tiny_model_factory("llama"), "-o", out)
    assert_clean_failure(result, 2, "not empty", "--force")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_pickle_refused_without_allow_pickle(tiny_model_factory, tmp_path, cli):
    model = _copy_model(tiny_model_factory, tmp_path)
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(b"pickle would run code")
    out = tmp_path / "out"
    result = cli("convert", model, "-o", out)
    assert_clean_failure(result, 3, "pickle", "--allow-pickle")
    assert_no_output(out)


def test_trust_remote_code_refused(tiny_model_factory, tmp_path, cli):
    model = _copy_model(tiny_model_factory, tmp_path)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    result = cli("convert", model, "-o", out)
    assert_clean_failure(result, 3, "trust_remote_code", "--trust-remote-code")
    assert_no_output(out)


def test_run_on_folder_without_model(tmp_path, cli):
    (tmp_path / "hollow").mkdir()
    result = cli("run", tmp_path / "hollow", "--prompt", "hi")
    assert_clean_failure(result, 3, "no model", "model.onnx")


def test_run_on_missing_folder(tmp_path, cli):
    result = cli("run", tmp_path / "missing", "--prompt", "hi")
    assert_clean_failure(result, 3, "does not exist")


def test_unknown_demo_name_is_a_missing_path(tmp_path, cli):
    out = tmp_path / "out"
    result = cli("convert", "smollm9-1t", "-o", out)
    assert_clean_failure(result, 3, "smollm2-135m")
    assert_no_output(out)


@pytest.mark.parametrize("args", [["convert"], ["convert", "x"], ["run", "x"], ["nonsense"], ["run", "x", "-p", "a", "--top-p", "0"]])
def test_usage_errors_are_one_line_exit_2(args, cli):
    result = cli(*args)
    assert_clean_failure(result, 2)


def test_unexpected_error_is_one_line_and_debug_shows_traceback(tmp_path, cli, monkeypatch):
    import edgepack.convert.export as export

    def boom(*args, **kwargs):
        raise RuntimeError("simulated bug\nwith two lines")

    monkeypatch.setattr(export, "resolve_source", boom)
    result = cli("convert", tmp_path, "-o", tmp_path / "out")
    assert result.exit_code == 70
    assert len(result.stderr_lines) == 1 and "simulated bug with two lines" in result.stderr_lines[0]
    result = cli("--debug", "convert", tmp_path, "-o", tmp_path / "out")
    assert result.exit_code == 70 and "Traceback" in result.stderr


def test_missing_parent_folders_are_created(tiny_model_factory, tmp_path, cli):
    out = tmp_path / "build" / "nested" / "export"
    result = cli("convert", tiny_model_factory("gpt2"), "-o", out, "--no-verify")
    assert result.exit_code == 0, result.stderr
    assert (out / "model.onnx").is_file()


def _mount_tmpfs(point, options):
    import os
    import subprocess

    point.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    return point


@pytest.mark.parametrize("options, reason", [("size=16k", "No space left on device"), ("ro,size=16k", "Read-only file system")])
def test_full_or_read_only_disk_is_exit_2_naming_the_output(options, reason, tiny_model_factory, tmp_path, cli, monkeypatch):
    import subprocess

    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))
    disk = _mount_tmpfs(tmp_path / "disk", options)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[model]\nsource = "{tiny_model_factory("llama")}"\n')
    try:
        for args in (["convert", tiny_model_factory("llama"), "--no-verify"], ["build", recipe, "--only", "convert"]):
            out = disk / "out"
            result = cli(*args, "-o", out)
            assert result.exit_code == 2, result.stderr
            assert result.stderr_lines[-1].startswith(f"error: cannot write {out}: {reason}"), result.stderr
            assert "Traceback" not in result.stderr and len(result.stderr_lines[-1]) < 400
            assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.mark.parametrize("out", ["/proc/edgepack-out", "FILE/sub", "."])
def test_unwritable_output_paths_are_exit_2(out, tiny_model_factory, tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("a file")
    result = cli("convert", tiny_model_factory("llama"), "-o", out, "--no-verify")
    assert_clean_failure(result, 2, "output" if out == "." else "cannot write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]


def test_profile_and_check_outputs_that_are_folders(exported_tiny_factory, tmp_path, cli):
    folder = tmp_path / "reports"
    folder.mkdir()
    result = cli("profile", exported_tiny_factory("llama"), "-o", folder, "--runs", "1", "--gen-len", "2", "--prompt-len", "4")
    assert_clean_failure(result, 2, "is a folder")
    assert list(tmp_path.iterdir()) == [folder] and list(folder.iterdir()) == []  # no reports.tmp beside it
    profile = tmp_path / "p.json"
    assert cli("profile", exported_tiny_factory("llama"), "-o", profile, "--runs", "1", "--gen-len", "2", "--prompt-len", "4").exit_code == 0
    budgets = tmp_path / "b.toml"
    budgets.write_text("[host]\nmax_decode_ms_per_token = 100000\n")
    for option in ("-o", "--junit"):
        result = cli("check", profile, "--budgets", budgets, option, folder)
        assert_clean_failure(result, 2, "is a folder")


def test_truncated_model_onnx_is_bad_input_for_quantize_and_run(exported_tiny_factory, tmp_path, cli):
    model = tmp_path / "cut"
    shutil.copytree(exported_tiny_factory("llama"), model)
    data = (model / "model.onnx").read_bytes()
    (model / "model.onnx").write_bytes(data[: len(data) // 2])
    result = cli("quantize", model, "-o", tmp_path / "q", "--no-eval")
    assert_clean_failure(result, 3, str(model / "model.onnx"))
    assert_no_output(tmp_path / "q")
    result = cli("run", model, "-p", "hi")
    assert_clean_failure(result, 3, str(model / "model.onnx"))


@pytest.mark.parametrize("manifest", ['{"files": [1, 2]}', '{"files": {"a.txt": 3}}', '{"files": {"a.txt": {"bytes": "1"}}}', '{"files"'])
def test_malformed_manifest_is_bad_input(manifest, tmp_path, cli):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "manifest.json").write_text(manifest)
    assert_clean_failure(cli("verify", tmp_path), 3, "manifest")


@pytest.mark.parametrize("body", [{"host": [1]}, {"projections": {"pixel-8": {"by_prompt_len": [{"ttft_ms": 5}]}}},
                                  {"quality": {"kl_mean": "low"}}])
def test_profile_of_the_right_kind_but_wrong_structure_is_bad_input(body, tmp_path, cli):
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps({"kind": "edgepack.profile", **body}))
    budgets = tmp_path / "b.toml"
    budgets.write_text("[pixel-8]\nmax_kl = 0.1\nmax_ttft_ms = 10\n[host]\nmax_ttft_ms = 10\n")
    assert_clean_failure(cli("check", profile, "--budgets", budgets), 3, "not a valid edgepack profile")
