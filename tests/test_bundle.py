"""Bundle manifest and `edgepack verify`: any missing, extra or changed file is named, exit 1."""

from __future__ import annotations

import json

from edgepack.bundle import write_manifest


def _bundle(tmp_path):
    folder = tmp_path / "bundle"
    (folder / "targets" / "ort").mkdir(parents=True)
    (folder / "targets" / "ort" / "model.onnx").write_bytes(bytes(range(256)) * 64)
    (folder / "report.json").write_text(json.dumps({"verdict": "pass"}))
    manifest = write_manifest(folder, {"recipe": {"model": "x"}})
    return folder, manifest


def test_manifest_lists_every_file_but_itself(tmp_path):
    folder, manifest = _bundle(tmp_path)
    assert set(manifest["files"]) == {"targets/ort/model.onnx", "report.json"}
    record = manifest["files"]["targets/ort/model.onnx"]
    assert record["bytes"] == 256 * 64 and len(record["sha256"]) == 64
    assert manifest["recipe"] == {"model": "x"} and manifest["host"]["cpus"] >= 1


def test_verify_accepts_untouched_bundle(tmp_path, cli):
    folder, _ = _bundle(tmp_path)
    result = cli("verify", folder)
    assert result.exit_code == 0, result.stderr
    assert "2 files match" in result.stdout


def test_verify_names_a_changed_byte(tmp_path, cli):
    folder, _ = _bundle(tmp_path)
    path = folder / "targets" / "ort" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[1000] ^= 0x01  # one byte, same size
    path.write_bytes(bytes(data))
    result = cli("verify", folder)
    assert result.exit_code == 1
    assert len(result.stderr_lines) == 1 and "changed: targets/ort/model.onnx" in result.stderr_lines[0]


def test_verify_names_missing_and_extra(tmp_path, cli):
    folder, _ = _bundle(tmp_path)
    (folder / "report.json").unlink()
    (folder / "surprise.txt").write_text("hi")
    result = cli("verify", folder)
    assert result.exit_code == 1
    assert "missing: report.json" in result.stderr and "extra: surprise.txt" in result.stderr


def test_verify_without_manifest_is_bad_input(tmp_path, cli):
    (tmp_path / "plain").mkdir()
    result = cli("verify", tmp_path / "plain")
    assert result.exit_code == 3 and "manifest.json" in result.stderr


def test_verify_names_a_file_replaced_by_a_link_out_of_the_bundle(tmp_path, cli):
    # A link to an identical copy outside the bundle hashes the same when followed; it is still not a
    # file of the bundle (an app copying the bundle loses it, and whoever controls the target controls it).
    folder, _ = _bundle(tmp_path)
    model = folder / "targets" / "ort" / "model.onnx"
    outside = tmp_path / "elsewhere.onnx"
    outside.write_bytes(model.read_bytes())
    model.unlink()
    model.symlink_to(outside)
    result = cli("verify", folder)
    assert result.exit_code == 1, result.stdout
    assert len(result.stderr_lines) == 1
    assert f"changed: targets/ort/model.onnx (a symbolic link to {outside}, outside the bundle)" in result.stderr


def test_verify_names_added_links_dangling_or_not(tmp_path, cli):
    folder, _ = _bundle(tmp_path)
    (folder / "targets" / "ghost.onnx").symlink_to(tmp_path / "does-not-exist")
    (folder / "targets" / "alias.json").symlink_to("../report.json")
    (folder / "outside").symlink_to(tmp_path, target_is_directory=True)
    result = cli("verify", folder)
    assert result.exit_code == 1
    assert f"extra: targets/ghost.onnx (a symbolic link to {tmp_path / 'does-not-exist'}, dangling)" in result.stderr
    assert "extra: targets/alias.json (a symbolic link to ../report.json, inside the bundle)" in result.stderr
    assert f"extra: outside (a symbolic link to {tmp_path}, outside the bundle)" in result.stderr
    assert "Traceback" not in result.stderr


def test_write_manifest_never_follows_a_link_out_of_the_folder(tmp_path):
    import pytest

    from edgepack.errors import BadInputError

    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key.txt").write_text("not for the bundle")
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"onnx")
    (folder / "secrets").symlink_to(secret, target_is_directory=True)
    with pytest.raises(BadInputError, match="secrets is a symbolic link to .*outside the bundle"):
        write_manifest(folder)
    assert not (folder / "manifest.json").exists()
