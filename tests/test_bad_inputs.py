"""Every command against a table of bad inputs: the contract of the command line, case by case.

For each case: a documented exit code (1 gate failed, 2 usage, 3 bad input, 4 not on this host), exactly
one line on stderr starting with `error:`, no traceback, no temporary file or folder left anywhere, and
nothing on disk changed (a previous OUT, the user's files and the inputs stay byte for byte as they were).

Inputs are cheap: one tiny exported model (session fixture) and small files derived from it. Each case
runs in its own folder, which is also the current folder (so `-o .` means that folder).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.tiny_models import VOCAB_SIZE

CODES = {1, 2, 3, 4}
TARGETS = ("ort", "ort-mobile", "coreml", "qnn")
TARGET_ARGS = {"ort": ["--graph", "optimum"], "ort-mobile": [], "coreml": [], "qnn": ["--soc-model", "57", "--htp-arch", "75"]}
# `build` reports each finished stage on stderr before a later failure; those lines are not errors.
STAGE_LINE = re.compile(r"^(convert|quantize|target|profile|check)\s+\S+\s+(built in|reused from cache)")

GOOD_BUDGETS = "[pixel-8]\nmax_decode_ms_per_token = 1000\n"
RECIPE = '[model]\nsource = "{model}"\n'


def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)
    return path


def _export_variant(export: Path, dst: Path, **files) -> Path:
    """A copy of the tiny export with some files replaced (bytes/str) or removed (None)."""
    shutil.copytree(export, dst)
    for name, data in files.items():
        name = name.replace("__", ".")
        if data is None:
            (dst / name).unlink()
        else:
            _write(dst / name, data)
    return dst


def _try_mount(point: Path, options: str) -> bool:
    point.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None or os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, exported_tiny_factory, tiny_model_factory):
    """Shared bad and good inputs, built once: name -> path (as str)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    export = exported_tiny_factory("llama")
    model_bytes = (export / "model.onnx").read_bytes()
    paths = {"export": export, "model": tiny_model_factory("llama"), "bert_model": tiny_model_factory("bert")}
    paths["truncated_export"] = _export_variant(export, root / "truncated-export", model__onnx=model_bytes[: len(model_bytes) // 2])
    paths["empty_onnx_export"] = _export_variant(export, root / "empty-onnx-export", model__onnx=b"")
    paths["garbage_onnx_export"] = _export_variant(export, root / "garbage-onnx-export", model__onnx=b"\xff\xfe not a protobuf" * 100)
    paths["text_onnx_export"] = _export_variant(export, root / "text-onnx-export", model__onnx="ir_version: 8\n")
    paths["bad_config_export"] = _export_variant(export, root / "bad-config-export", config__json="{not json")
    paths["list_config_export"] = _export_variant(export, root / "list-config-export", config__json="[1, 2]")
    paths["binary_config_export"] = _export_variant(export, root / "binary-config-export", config__json=b"\x80\x81\xfe\xff")
    paths["onnx_dir_export"] = _export_variant(export, root / "onnx-dir-export", model__onnx=None)
    (paths["onnx_dir_export"] / "model.onnx").mkdir()
    paths["bad_report_export"] = _export_variant(export, root / "bad-report-export", convert__json="{oops")
    paths["empty_dir"] = root / "empty-dir"
    paths["empty_dir"].mkdir()
    paths["empty_file"] = _write(root / "empty.bin", b"")
    paths["text_file"] = _write(root / "notes.txt", "just some text\n")
    paths["empty_gguf"] = _write(root / "empty.gguf", b"")
    paths["fake_gguf"] = _write(root / "fake.gguf", b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    paths["png"] = _write(root / "picture.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    paths["missing"] = root / "does-not-exist"
    for name, config in {"bad_config_model": "{not json", "list_config_model": "[]", "empty_config_model": "",
                         "binary_config_model": b"\xff\xfe\x00"}.items():
        paths[name] = _write(root / name / "config.json", config).parent
    paths["no_type_model"] = _write(root / "no-type-model" / "config.json", json.dumps({"hidden_size": 8})).parent

    # profiles and budgets for `check`
    # A profile `check` accepts with GOOD_BUDGETS (exit 0), so a case fails for the reason its id names.
    entry = {"prompt_len": 128, "gen_len": 64, "ttft_ms": 60.0, "decode_ms_per_token": 10.0, "tokens_per_s": 100.0}
    profile = {"schema_version": 1, "kind": "edgepack.profile", "host": {"by_prompt_len": []},
               "projections": {"pixel-8": {"by_prompt_len": [entry]}}}
    paths["good_profile"] = _write(root / "profile.json", json.dumps(profile))
    paths["garbage_profile"] = _write(root / "garbage-profile.json", "{\"kind\": ")
    paths["binary_profile"] = _write(root / "binary-profile.json", b"\x80\xff\x00")
    paths["wrong_kind_profile"] = _write(root / "wrong-kind.json", json.dumps({"kind": "edgepack.check"}))
    paths["list_profile"] = _write(root / "list-profile.json", "[]")
    for name, body in {
        "host_list_profile": {"host": [1]},
        "projections_number_profile": {"projections": 5},
        "projection_list_profile": {"projections": {"pixel-8": [1, 2]}},
        "entries_dict_profile": {"projections": {"pixel-8": {"by_prompt_len": {"a": 1}}}},
        "entry_no_lengths_profile": {"projections": {"pixel-8": {"by_prompt_len": [{"decode_ms_per_token": 3}]}}},
        "figure_text_profile": {"projections": {"pixel-8": {"by_prompt_len": [{"prompt_len": 8, "gen_len": 4, "decode_ms_per_token": "fast"}]}}},
        "quality_text_profile": {"quality": {"kl_mean": "low"}, "projections": {"pixel-8": {}}},
        "efficiency_text_profile": {"projections": {"pixel-8": {"efficiency": {"decode": "high"}}}},
    }.items():
        paths[name] = _write(root / f"{name}.json", json.dumps({"schema_version": 1, "kind": "edgepack.profile", **body}))
    paths["budgets"] = _write(root / "budgets.toml", GOOD_BUDGETS)
    paths["garbage_budgets"] = _write(root / "garbage.toml", "[pixel-8\nmax = = 3")
    paths["binary_budgets"] = _write(root / "binary.toml", b"\xff\xfe\x00\x01")
    paths["unknown_key_budgets"] = _write(root / "unknown-key.toml", "[pixel-8]\nmax_speed = 3\n")
    paths["negative_budgets"] = _write(root / "negative.toml", "[pixel-8]\nmax_decode_ms_per_token = -5\n")
    paths["text_budgets"] = _write(root / "text-budget.toml", "[pixel-8]\nmax_decode_ms_per_token = \"fast\"\n")
    paths["flat_budgets"] = _write(root / "flat.toml", "max_decode_ms_per_token = 5\n")
    paths["nan_budgets"] = _write(root / "nan.toml", "[pixel-8]\nmax_decode_ms_per_token = nan\n")
    paths["inf_budgets"] = _write(root / "inf.toml", "[pixel-8]\nmax_decode_ms_per_token = inf\n")
    paths["absent_device_budgets"] = _write(root / "absent-device.toml", GOOD_BUDGETS + "[galaxy-s24]\nmax_ttft_ms = 500\n")
    paths["unknown_device_budgets"] = _write(root / "unknown-device.toml", GOOD_BUDGETS + "[pixel-99]\nmax_ttft_ms = 500\n")

    # recipes for `build`
    model = paths["model"]
    paths["recipe"] = _write(root / "recipe.toml", RECIPE.format(model=model))
    paths["empty_recipe"] = _write(root / "empty-recipe.toml", "")
    paths["garbage_recipe"] = _write(root / "garbage-recipe.toml", "[model\nsource = ")
    paths["binary_recipe"] = _write(root / "binary-recipe.toml", b"\xff\xfe\x00")
    paths["unknown_key_recipe"] = _write(root / "unknown-key.toml", RECIPE.format(model=model) + "colour = 'blue'\n")
    paths["missing_source_recipe"] = _write(root / "missing-source.toml", RECIPE.format(model=root / "nowhere"))
    paths["no_model_recipe"] = _write(root / "no-model.toml", "[targets.ort]\n")
    paths["unknown_target_recipe"] = _write(root / "unknown-target.toml", RECIPE.format(model=model) + "[targets.tpu]\n")
    paths["bad_scheme_recipe"] = _write(root / "bad-scheme.toml", RECIPE.format(model=model) + "[[quantize]]\nscheme = \"int3\"\n")
    paths["negative_budget_recipe"] = _write(root / "negative-budget.toml", RECIPE.format(model=model)
                                             + "[budgets.pixel-8]\nmax_decode_ms_per_token = -1\n")
    paths["text_option_recipe"] = _write(root / "text-option.toml", RECIPE.format(model=model) + "[targets.ort]\nmax_context = \"long\"\n")
    paths["negative_option_recipe"] = _write(root / "negative-option.toml", RECIPE.format(model=model)
                                             + "[targets.ort]\nmax_context = -5\n")
    paths["garbage_model_recipe"] = _write(root / "garbage-model.toml", RECIPE.format(model=paths["bad_config_model"]))
    for name, budget in {"nan_budget_recipe": "nan", "inf_budget_recipe": "inf", "minus_inf_budget_recipe": "-inf"}.items():
        paths[name] = _write(root / f"{name}.toml", RECIPE.format(model=model) + f"[budgets.pixel-8]\nmax_decode_ms_per_token = {budget}\n")
    paths["eval_text_missing_recipe"] = _write(root / "eval-text-missing.toml", RECIPE.format(model=model)
                                               + f"[evaluation]\ntext = \"{root / 'no-such-text.txt'}\"\n")
    paths["broken_tokenizer_recipe"] = _write(root / "broken-tokenizer.toml", RECIPE.format(model=root / "truncated-tokenizer-model"))
    for name, extra in {
        "eval_gate_nan_recipe": "[evaluation]\nmax_kl = nan\n",
        "eval_tokens_zero_recipe": "[[quantize]]\nscheme = \"int8-weight\"\n[evaluation]\ntokens = 0\n",
        "calibration_samples_zero_recipe": "[[quantize]]\nscheme = \"int8-static\"\n[calibration]\nsamples = 0\n",
        "calibration_text_dir_recipe": f"[calibration]\ntext = \"{root / 'empty-dir'}\"\n",
        "profile_runs_zero_recipe": "[profile]\nruns = 0\n",
        "profile_prompt_len_negative_recipe": "[profile]\nprompt_len = [-8]\n",
        "qnn_soc_negative_recipe": "[targets.qnn]\nsoc_model = -1\nhtp_arch = 75\n",
        "coreml_block_size_odd_recipe": "[targets.coreml]\ncompress = \"int4-block\"\nblock_size = 7\n",
        "ort_mobile_ratio_below_one_recipe": "[targets.ort-mobile]\nmax_size_ratio = 0.5\n",
    }.items():
        paths[name] = _write(root / f"{name}.toml", RECIPE.format(model=model) + extra)

    # model folders whose tokenizer is broken, and a small GGUF for the cache cases
    tokenizer = (paths["model"] / "tokenizer.json").read_text()
    for name, data in {"truncated_tokenizer_model": tokenizer[: len(tokenizer) // 2], "text_tokenizer_model": "not json, a note\n",
                       "empty_tokenizer_model": ""}.items():
        paths[name] = root / name.replace("_", "-")
        shutil.copytree(paths["model"], paths[name])
        _write(paths[name] / "tokenizer.json", data)
    # A tokenizer with ids the model has no embedding row for: common words added past the model's vocabulary
    # (a tokenizer from another model), in a Hugging Face folder and in a copy of the export.
    from transformers import AutoTokenizer

    wide = AutoTokenizer.from_pretrained(str(paths["model"]))
    wide.add_tokens([f"<filler_{i}>" for i in range(VOCAB_SIZE)] + ["the", " the", "and", " and", "of", " of"])
    paths["wide_tokenizer_model"] = root / "wide-tokenizer-model"
    shutil.copytree(paths["model"], paths["wide_tokenizer_model"])
    wide.save_pretrained(str(paths["wide_tokenizer_model"]))
    paths["wide_tokenizer_export"] = _export_variant(export, root / "wide-tokenizer-export")
    wide.save_pretrained(str(paths["wide_tokenizer_export"]))
    from tests.gguf_fixtures import write_tiny_llama_gguf

    paths["gguf"] = write_tiny_llama_gguf(root / "tiny.gguf")

    # bundles for `verify`
    for name, manifest in {"truncated_manifest": '{"files": {', "list_files_manifest": '{"files": [1, 2]}',
                           "text_bytes_manifest": '{"files": {"a.txt": {"bytes": "ten", "sha256": "00"}}}',
                           "number_entry_manifest": '{"files": {"a.txt": 3}}', "binary_manifest": b"\x80\x81\x82",
                           "no_files_manifest": '{"kind": "edgepack.manifest"}', "empty_manifest": ""}.items():
        bundle = root / name
        _write(bundle / "a.txt", "0123456789")
        _write(bundle / "manifest.json", manifest)
        paths[name] = bundle
    from edgepack.bundle import write_manifest

    tampered = root / "tampered-bundle"
    _write(tampered / "a.txt", "original")
    write_manifest(tampered)
    _write(tampered / "a.txt", "changed!")
    paths["tampered_bundle"] = tampered
    outside = _write(root / "outside.txt", "original")
    linked = root / "linked-out-bundle"
    _write(linked / "a.txt", "original")
    write_manifest(linked)
    (linked / "a.txt").unlink()
    (linked / "a.txt").symlink_to(outside)  # same bytes, but the file now lives outside the bundle
    paths["linked_out_bundle"] = linked
    dangling = root / "dangling-link-bundle"
    _write(dangling / "a.txt", "original")
    write_manifest(dangling)
    (dangling / "extra.txt").symlink_to(root / "nowhere.txt")
    paths["dangling_link_bundle"] = dangling
    for name, entry in {"dotdot_entry_manifest": "../outside.txt", "absolute_entry_manifest": str(root / "outside.txt")}.items():
        bundle = root / name.replace("_", "-")
        _write(bundle / "a.txt", "original")
        write_manifest(bundle)
        manifest = json.loads((bundle / "manifest.json").read_text())
        manifest["files"][entry] = manifest["files"]["a.txt"]  # a path out of the bundle, with the right bytes and hash
        _write(bundle / "manifest.json", json.dumps(manifest))
        paths[name] = bundle
    dir_manifest = root / "dir-manifest"
    (dir_manifest / "manifest.json").mkdir(parents=True)
    paths["dir_manifest"] = dir_manifest

    # devices
    paths["garbage_devices"] = _write(root / "garbage-devices" / "phone.toml", "id = [")
    paths["garbage_devices"] = paths["garbage_devices"].parent

    # a full and a read-only file system, when this host lets us mount them (root in a container usually can)
    paths["full_fs"] = root / "full-fs"
    paths["ro_fs"] = root / "ro-fs"
    mounted = [p for p, options in ((paths["full_fs"], "size=16k"), (paths["ro_fs"], "ro,size=16k")) if _try_mount(p, options)]
    paths["mounts"] = mounted
    yield {k: (v if k == "mounts" else str(v)) for k, v in paths.items()}
    for point in mounted:
        subprocess.run(["umount", str(point)], capture_output=True)


# (id, args). Placeholders: {name} = a shared input above; {out} = a fresh OUT in the case folder; {prev} = a
# previous OUT holding the user's files (a manifest.json of their own included); {file} = an existing
# file; {case} = the case folder. A `!full`/`!ro` marker needs the tmpfs mounts.
CASES = [
    # convert
    ("convert-missing-path", ["convert", "{missing}", "-o", "{out}"], 3),
    ("convert-empty-dir", ["convert", "{empty_dir}", "-o", "{out}"], 3),
    ("convert-empty-file", ["convert", "{empty_file}", "-o", "{out}"], 3),
    ("convert-text-file", ["convert", "{text_file}", "-o", "{out}"], 3),
    ("convert-png", ["convert", "{png}", "-o", "{out}"], 3),
    ("convert-tokenizer-outside-vocab", ["convert", "{wide_tokenizer_model}", "-o", "{out}"], 3),
    ("quantize-tokenizer-outside-vocab", ["quantize", "{wide_tokenizer_export}", "-o", "{out}"], 3),
    ("target-ort-tokenizer-outside-vocab", ["target", "ort", "{wide_tokenizer_export}", "-o", "{out}", "--graph", "optimum"], 3),
    ("target-qnn-tokenizer-outside-vocab", ["target", "qnn", "{wide_tokenizer_export}", "-o", "{out}", *TARGET_ARGS["qnn"]], 3),
    ("convert-empty-gguf", ["convert", "{empty_gguf}", "-o", "{out}"], 3),
    ("convert-fake-gguf", ["convert", "{fake_gguf}", "-o", "{out}"], 3),
    ("convert-garbage-config", ["convert", "{bad_config_model}", "-o", "{out}"], 3),
    ("convert-list-config", ["convert", "{list_config_model}", "-o", "{out}"], 3),
    ("convert-empty-config", ["convert", "{empty_config_model}", "-o", "{out}"], 3),
    ("convert-binary-config", ["convert", "{binary_config_model}", "-o", "{out}"], 3),
    ("convert-config-without-type", ["convert", "{no_type_model}", "-o", "{out}"], 3),
    ("convert-an-export", ["convert", "{export}", "-o", "{out}"], 3),
    ("convert-out-under-proc", ["convert", "{model}", "-o", "/proc/edgepack-out"], 2),
    ("convert-out-under-a-file", ["convert", "{model}", "-o", "{file}/sub"], 2),
    ("convert-out-deep-under-a-file", ["convert", "{model}", "-o", "{file}/a/b/c"], 2),
    ("convert-out-is-a-file", ["convert", "{model}", "-o", "{file}"], 2),
    ("convert-out-dot", ["convert", "{model}", "-o", "."], 2),
    ("convert-out-dot-force", ["convert", "{model}", "-o", ".", "--force"], 2),
    ("convert-out-parent-of-cwd", ["convert", "{model}", "-o", "..", "--force"], 2),
    ("convert-out-root", ["convert", "{model}", "-o", "/", "--force"], 2),
    ("convert-out-not-empty", ["convert", "{model}", "-o", "{prev}"], 2),
    ("convert-opset-too-low", ["convert", "{model}", "-o", "{out}", "--opset", "3"], 2),
    ("convert-opset-text", ["convert", "{model}", "-o", "{out}", "--opset", "latest"], 2),
    ("convert-atol-negative", ["convert", "{model}", "-o", "{out}", "--atol", "-1"], 2),
    ("convert-task-nonsense", ["convert", "{model}", "-o", "{out}", "--task", "poetry"], 2),
    ("convert-no-out", ["convert", "{model}"], 2),
    ("convert-missing-path-nested-out", ["convert", "{missing}", "-o", "{case}/build/nested/out"], 3),
    ("convert-garbage-config-nested-out", ["convert", "{bad_config_model}", "-o", "{case}/build/nested/out"], 3),
    ("convert-full-disk!full", ["convert", "{model}", "-o", "{full_fs}/out", "--no-verify"], 2),
    ("convert-read-only-disk!ro", ["convert", "{model}", "-o", "{ro_fs}/out", "--no-verify"], 2),
    ("convert-truncated-tokenizer", ["convert", "{truncated_tokenizer_model}", "-o", "{out}"], 3),
    ("convert-tokenizer-not-json", ["convert", "{text_tokenizer_model}", "-o", "{out}"], 3),
    ("convert-empty-tokenizer", ["convert", "{empty_tokenizer_model}", "-o", "{out}"], 3),
    ("convert-atol-nan", ["convert", "{model}", "-o", "{out}", "--atol", "nan"], 2),
    ("convert-gguf-cache-is-a-file", ["convert", "{gguf}", "-o", "{out}"], 2),
    ("convert-gguf-cache-under-proc", ["convert", "{gguf}", "-o", "{out}"], 2),
    ("convert-gguf-cache-is-proc", ["convert", "{gguf}", "-o", "{out}"], 2),
    # quantize
    ("quantize-missing-dir", ["quantize", "{missing}", "-o", "{out}"], 3),
    ("quantize-a-file", ["quantize", "{text_file}", "-o", "{out}"], 3),
    ("quantize-empty-dir", ["quantize", "{empty_dir}", "-o", "{out}"], 3),
    ("quantize-truncated-model", ["quantize", "{truncated_export}", "-o", "{out}", "--no-eval"], 3),
    ("quantize-truncated-model-eval", ["quantize", "{truncated_export}", "-o", "{out}"], 3),
    ("quantize-empty-model", ["quantize", "{empty_onnx_export}", "-o", "{out}"], 3),
    ("quantize-garbage-model", ["quantize", "{garbage_onnx_export}", "-o", "{out}"], 3),
    ("quantize-text-model", ["quantize", "{text_onnx_export}", "-o", "{out}"], 3),
    ("quantize-model-is-a-dir", ["quantize", "{onnx_dir_export}", "-o", "{out}"], 3),
    ("quantize-garbage-config", ["quantize", "{bad_config_export}", "-o", "{out}"], 3),
    ("quantize-binary-config", ["quantize", "{binary_config_export}", "-o", "{out}"], 3),
    ("quantize-garbage-convert-json", ["quantize", "{bad_report_export}", "-o", "{out}"], 3),
    ("quantize-hf-folder-not-export", ["quantize", "{model}", "-o", "{out}"], 3),
    ("quantize-unknown-scheme", ["quantize", "{export}", "-o", "{out}", "--scheme", "int3"], 2),
    ("quantize-block-size-odd", ["quantize", "{export}", "-o", "{out}", "--scheme", "int4", "--block-size", "7"], 2),
    ("quantize-block-size-negative", ["quantize", "{export}", "-o", "{out}", "--scheme", "int4", "--block-size", "-32"], 2),
    ("quantize-block-size-huge", ["quantize", "{export}", "-o", "{out}", "--scheme", "int4", "--block-size", "99999999999999999999"], 2),
    ("quantize-eval-tokens-small", ["quantize", "{export}", "-o", "{out}", "--eval-tokens", "3"], 2),
    ("quantize-min-top1-above-1", ["quantize", "{export}", "-o", "{out}", "--min-top1", "2"], 2),
    ("quantize-max-kl-negative", ["quantize", "{export}", "-o", "{out}", "--max-kl", "-0.1"], 2),
    ("quantize-auto-without-gate", ["quantize", "{export}", "-o", "{out}", "--scheme", "auto"], 2),
    ("quantize-eval-text-missing", ["quantize", "{export}", "-o", "{out}", "--eval-text", "{missing}"], 3),
    ("quantize-eval-text-dir", ["quantize", "{export}", "-o", "{out}", "--eval-text", "{empty_dir}"], 3),
    ("quantize-eval-text-empty", ["quantize", "{export}", "-o", "{out}", "--eval-text", "{empty_file}"], 3),
    ("quantize-eval-text-binary", ["quantize", "{export}", "-o", "{out}", "--eval-text", "{binary_budgets}"], 3),
    ("quantize-calibration-text-missing", ["quantize", "{export}", "-o", "{out}", "--scheme", "int8-static", "--calibration-text", "{missing}"], 3),
    ("quantize-out-under-proc", ["quantize", "{export}", "-o", "/proc/edgepack-out", "--no-eval"], 2),
    ("quantize-out-under-a-file", ["quantize", "{export}", "-o", "{file}/sub", "--no-eval"], 2),
    ("quantize-out-dot", ["quantize", "{export}", "-o", ".", "--no-eval"], 2),
    ("quantize-out-not-empty", ["quantize", "{export}", "-o", "{prev}", "--no-eval"], 2),
    ("quantize-truncated-model-nested-out", ["quantize", "{truncated_export}", "-o", "{case}/build/q", "--no-eval"], 3),
    ("quantize-out-is-its-input", ["quantize", "{export}", "-o", "{export}", "--no-eval"], 2),
    ("quantize-full-disk!full", ["quantize", "{export}", "-o", "{full_fs}/out", "--no-eval"], 2),
    ("quantize-read-only-disk!ro", ["quantize", "{export}", "-o", "{ro_fs}/out", "--no-eval"], 2),
    ("quantize-keep-8bit-invalid-regex", ["quantize", "{export}", "-o", "{out}", "--scheme", "int4", "--keep-8bit", "("], 2),
    ("quantize-calibration-samples-zero", ["quantize", "{export}", "-o", "{out}", "--scheme", "int8-static", "--calibration-samples", "0"], 2),
    ("quantize-max-kl-nan", ["quantize", "{export}", "-o", "{out}", "--max-kl", "nan"], 2),
    ("quantize-min-top1-nan", ["quantize", "{export}", "-o", "{out}", "--min-top1", "nan"], 2),
    ("quantize-max-ppl-ratio-inf", ["quantize", "{export}", "-o", "{out}", "--max-ppl-ratio", "inf"], 2),
    # run
    ("run-missing-dir", ["run", "{missing}", "-p", "hi"], 3),
    ("run-a-file", ["run", "{text_file}", "-p", "hi"], 3),
    ("run-empty-dir", ["run", "{empty_dir}", "-p", "hi"], 3),
    ("run-truncated-model", ["run", "{truncated_export}", "-p", "hi"], 3),
    ("run-tokenizer-outside-vocab", ["run", "{wide_tokenizer_export}", "-p", "the sea and the sky", "--no-chat"], 3),
    ("run-empty-model", ["run", "{empty_onnx_export}", "-p", "hi"], 3),
    ("run-garbage-model", ["run", "{garbage_onnx_export}", "-p", "hi"], 3),
    ("run-model-is-a-dir", ["run", "{onnx_dir_export}", "-p", "hi"], 3),
    ("run-garbage-config", ["run", "{bad_config_export}", "-p", "hi"], 3),
    ("run-hf-folder-not-export", ["run", "{model}", "-p", "hi"], 3),
    ("run-no-prompt", ["run", "{export}"], 2),
    ("run-top-p-zero", ["run", "{export}", "-p", "hi", "--top-p", "0"], 2),
    ("run-top-p-above-1", ["run", "{export}", "-p", "hi", "--top-p", "1.5"], 2),
    ("run-zero-tokens", ["run", "{export}", "-p", "hi", "-n", "0"], 2),
    ("run-negative-temperature", ["run", "{export}", "-p", "hi", "--temperature", "-1"], 2),
    ("run-zero-threads", ["run", "{export}", "-p", "hi", "--threads", "0"], 2),
    ("run-seed-text", ["run", "{export}", "-p", "hi", "--seed", "lucky"], 2),
    ("run-huge-prompt", ["run", "{export}", "-p", "word " * 20000, "-n", "4"], 2),
    ("run-empty-prompt", ["run", "{export}", "-p", ""], 2),
    ("run-empty-prompt-no-chat", ["run", "{export}", "-p", "", "--no-chat"], 2),
    ("run-temperature-nan", ["run", "{export}", "-p", "hi", "--temperature", "nan"], 2),
    ("run-temperature-inf", ["run", "{export}", "-p", "hi", "--temperature", "inf"], 2),
    ("run-top-p-nan", ["run", "{export}", "-p", "hi", "--top-p", "nan"], 2),
    # targets
    *[(f"target-{t}-missing-dir", ["target", t, "{missing}", "-o", "{out}", *TARGET_ARGS[t]], 3) for t in TARGETS],
    *[(f"target-{t}-empty-dir", ["target", t, "{empty_dir}", "-o", "{out}", *TARGET_ARGS[t]], 3) for t in TARGETS],
    *[(f"target-{t}-a-file", ["target", t, "{text_file}", "-o", "{out}", *TARGET_ARGS[t]], 3) for t in TARGETS],
    *[(f"target-{t}-out-under-proc", ["target", t, "{export}", "-o", "/proc/edgepack-out", *TARGET_ARGS[t]], 2) for t in TARGETS],
    *[(f"target-{t}-out-under-a-file", ["target", t, "{export}", "-o", "{file}/sub", *TARGET_ARGS[t]], 2) for t in TARGETS],
    *[(f"target-{t}-out-dot", ["target", t, "{export}", "-o", ".", *TARGET_ARGS[t]], 2) for t in TARGETS],
    *[(f"target-{t}-out-not-empty", ["target", t, "{export}", "-o", "{prev}", *TARGET_ARGS[t]], 2) for t in TARGETS],
    ("target-ort-truncated-model", ["target", "ort", "{truncated_export}", "-o", "{out}", "--graph", "optimum"], 3),
    ("target-ort-mobile-truncated-model", ["target", "ort-mobile", "{truncated_export}", "-o", "{out}"], 3),
    ("target-ort-garbage-model", ["target", "ort", "{garbage_onnx_export}", "-o", "{out}", "--graph", "optimum"], 3),
    ("target-ort-max-context-zero", ["target", "ort", "{export}", "-o", "{out}", "--max-context", "0"], 2),
    ("target-ort-mobile-batch-size-zero", ["target", "ort-mobile", "{export}", "-o", "{out}", "--batch-size", "0"], 2),
    ("target-ort-mobile-size-ratio-nan", ["target", "ort-mobile", "{export}", "-o", "{out}", "--max-size-ratio", "nan"], 2),
    ("target-coreml-max-context-zero", ["target", "coreml", "{export}", "-o", "{out}", "--max-context", "0"], 2),
    ("target-coreml-max-context-negative", ["target", "coreml", "{export}", "-o", "{out}", "--max-context", "-5"], 2),
    ("target-coreml-max-context-huge", ["target", "coreml", "{export}", "-o", "{out}", "--max-context", "99999999999999999999"], 2),
    ("target-coreml-block-size-odd", ["target", "coreml", "{export}", "-o", "{out}", "--compress", "int4-block", "--block-size", "7"], 2),
    ("target-coreml-block-size-negative", ["target", "coreml", "{export}", "-o", "{out}", "--compress", "int4-block", "--block-size", "-32"], 2),
    ("target-coreml-tune-steps-negative", ["target", "coreml", "{export}", "-o", "{out}", "--embedding", "split", "--compress", "int4-block", "--tune-steps", "-1"], 2),
    ("target-coreml-compress-nonsense", ["target", "coreml", "{export}", "-o", "{out}", "--compress", "int2"], 2),
    ("target-coreml-compute-units-nonsense", ["target", "coreml", "{export}", "-o", "{out}", "--compute-units", "tpu"], 2),
    ("target-coreml-max-kl-nan", ["target", "coreml", "{export}", "-o", "{out}", "--max-kl", "nan"], 2),
    ("target-coreml-devices-dir-missing", ["target", "coreml", "{export}", "-o", "{out}", "--device", "iphone-15-pro", "--devices-dir", "{missing}"], 2),
    ("target-coreml-devices-dir-garbage", ["target", "coreml", "{export}", "-o", "{out}", "--device", "iphone-15-pro", "--devices-dir", "{garbage_devices}"], 3),
    ("target-qnn-max-context-one", ["target", "qnn", "{export}", "-o", "{out}", *TARGET_ARGS["qnn"], "--max-context", "1"], 2),
    ("target-qnn-prefill-len-zero", ["target", "qnn", "{export}", "-o", "{out}", *TARGET_ARGS["qnn"], "--prefill-len", "0"], 2),
    ("target-qnn-calibration-samples-zero", ["target", "qnn", "{export}", "-o", "{out}", *TARGET_ARGS["qnn"], "--calibration-samples", "0"], 2),
    ("target-qnn-calibration-samples-negative", ["target", "qnn", "{export}", "-o", "{out}", *TARGET_ARGS["qnn"], "--calibration-samples", "-3"], 2),
    ("target-qnn-soc-model-negative", ["target", "qnn", "{export}", "-o", "{out}", "--soc-model", "-1", "--htp-arch", "75"], 2),
    ("target-qnn-htp-arch-zero", ["target", "qnn", "{export}", "-o", "{out}", "--soc-model", "57", "--htp-arch", "0"], 2),
    ("target-qnn-unknown-device", ["target", "qnn", "{export}", "-o", "{out}", "--device", "pixel-99"], 2),
    ("target-qnn-range-margin-nan", ["target", "qnn", "{export}", "-o", "{out}", *TARGET_ARGS["qnn"], "--range-margin", "nan"], 2),
    ("target-ort-graph-nonsense", ["target", "ort", "{export}", "-o", "{out}", "--graph", "magic"], 2),
    ("target-qnn-without-soc", ["target", "qnn", "{export}", "-o", "{out}"], 2),
    ("target-unknown", ["target", "tpu", "{export}", "-o", "{out}"], 2),
    ("target-ort-full-disk!full", ["target", "ort", "{export}", "-o", "{full_fs}/out", "--graph", "optimum", "--no-verify"], 2),
    ("target-ort-read-only-disk!ro", ["target", "ort", "{export}", "-o", "{ro_fs}/out", "--graph", "optimum", "--no-verify"], 2),
    # build
    ("build-missing-recipe", ["build", "{missing}", "-o", "{out}"], 3),
    ("build-recipe-is-a-dir", ["build", "{empty_dir}", "-o", "{out}"], 3),
    ("build-empty-recipe", ["build", "{empty_recipe}", "-o", "{out}"], 2),
    ("build-garbage-recipe", ["build", "{garbage_recipe}", "-o", "{out}"], 2),
    ("build-binary-recipe", ["build", "{binary_recipe}", "-o", "{out}"], 2),
    ("build-recipe-unknown-key", ["build", "{unknown_key_recipe}", "-o", "{out}"], 2),
    ("build-recipe-without-model", ["build", "{no_model_recipe}", "-o", "{out}"], 2),
    ("build-recipe-unknown-target", ["build", "{unknown_target_recipe}", "-o", "{out}"], 2),
    ("build-recipe-unknown-scheme", ["build", "{bad_scheme_recipe}", "-o", "{out}"], 2),
    ("build-recipe-negative-budget", ["build", "{negative_budget_recipe}", "-o", "{out}"], 2),
    ("build-recipe-text-option", ["build", "{text_option_recipe}", "-o", "{out}"], 2),
    ("build-recipe-negative-option", ["build", "{negative_option_recipe}", "-o", "{out}"], 2),
    ("build-recipe-nan-budget", ["build", "{nan_budget_recipe}", "-o", "{out}"], 2),
    ("build-recipe-inf-budget", ["build", "{inf_budget_recipe}", "-o", "{out}"], 2),
    ("build-recipe-minus-inf-budget", ["build", "{minus_inf_budget_recipe}", "-o", "{out}"], 2),
    ("build-recipe-eval-text-missing", ["build", "{eval_text_missing_recipe}", "-o", "{out}"], 3),
    ("build-recipe-broken-tokenizer", ["build", "{broken_tokenizer_recipe}", "-o", "{out}"], 3),
    ("build-cache-is-a-file", ["build", "{recipe}", "-o", "{out}"], 2),
    ("build-cache-under-proc", ["build", "{recipe}", "-o", "{out}"], 2),
    ("build-recipe-eval-gate-nan", ["build", "{eval_gate_nan_recipe}", "-o", "{out}"], 2),
    ("build-recipe-eval-tokens-zero", ["build", "{eval_tokens_zero_recipe}", "-o", "{out}"], 2),
    ("build-recipe-calibration-samples-zero", ["build", "{calibration_samples_zero_recipe}", "-o", "{out}"], 2),
    ("build-recipe-calibration-text-is-a-dir", ["build", "{calibration_text_dir_recipe}", "-o", "{out}"], 3),
    ("build-recipe-profile-runs-zero", ["build", "{profile_runs_zero_recipe}", "-o", "{out}"], 2),
    ("build-recipe-profile-prompt-len-negative", ["build", "{profile_prompt_len_negative_recipe}", "-o", "{out}"], 2),
    ("build-recipe-qnn-soc-negative", ["build", "{qnn_soc_negative_recipe}", "-o", "{out}"], 2),
    ("build-recipe-coreml-block-size-odd", ["build", "{coreml_block_size_odd_recipe}", "-o", "{out}"], 2),
    ("build-recipe-ort-mobile-ratio-below-one", ["build", "{ort_mobile_ratio_below_one_recipe}", "-o", "{out}"], 2),
    ("build-recipe-missing-source", ["build", "{missing_source_recipe}", "-o", "{out}"], 3),
    ("build-recipe-garbage-model", ["build", "{garbage_model_recipe}", "-o", "{out}"], 3),
    ("build-recipe-missing-source-nested-out", ["build", "{missing_source_recipe}", "-o", "{case}/build/release"], 3),
    ("build-out-has-a-users-manifest", ["build", "{recipe}", "-o", "{prev}"], 2),
    ("build-out-under-proc", ["build", "{recipe}", "-o", "/proc/edgepack-out"], 2),
    ("build-out-under-a-file", ["build", "{recipe}", "-o", "{file}/sub"], 2),
    ("build-out-is-a-file", ["build", "{recipe}", "-o", "{file}"], 2),
    ("build-out-dot", ["build", "{recipe}", "-o", "."], 2),
    ("build-jobs-zero", ["build", "{recipe}", "-o", "{out}", "--jobs", "0"], 2),
    ("build-only-nonsense", ["build", "{recipe}", "-o", "{out}", "--only", "deploy"], 2),
    ("build-junit-under-missing-folder", ["build", "{recipe}", "-o", "{out}", "--junit", "{case}/no/such/junit.xml"], 2),
    ("build-junit-under-a-file", ["build", "{recipe}", "-o", "{out}", "--junit", "{file}/junit.xml"], 2),
    ("build-full-disk!full", ["build", "{recipe}", "-o", "{full_fs}/out", "--only", "convert"], 2),
    ("build-read-only-disk!ro", ["build", "{recipe}", "-o", "{ro_fs}/out", "--only", "convert"], 2),
    # init
    ("init-path-is-a-dir", ["init", "{case}"], 2),
    ("init-existing-file", ["init", "{file}"], 2),
    ("init-under-proc", ["init", "/proc/edgepack.toml"], 2),
    ("init-under-a-file", ["init", "{file}/edgepack.toml"], 2),
    ("init-missing-parent", ["init", "{case}/no/such/edgepack.toml"], 2),
    ("init-read-only-disk!ro", ["init", "{ro_fs}/edgepack.toml"], 2),
    # verify
    ("verify-missing", ["verify", "{missing}"], 3),
    ("verify-a-file", ["verify", "{text_file}"], 3),
    ("verify-empty-dir", ["verify", "{empty_dir}"], 3),
    ("verify-user-folder", ["verify", "{prev}"], 3),
    ("verify-truncated-manifest", ["verify", "{truncated_manifest}"], 3),
    ("verify-files-is-a-list", ["verify", "{list_files_manifest}"], 3),
    ("verify-bytes-is-text", ["verify", "{text_bytes_manifest}"], 3),
    ("verify-entry-is-a-number", ["verify", "{number_entry_manifest}"], 3),
    ("verify-binary-manifest", ["verify", "{binary_manifest}"], 3),
    ("verify-manifest-without-files", ["verify", "{no_files_manifest}"], 3),
    ("verify-empty-manifest", ["verify", "{empty_manifest}"], 3),
    ("verify-manifest-is-a-dir", ["verify", "{dir_manifest}"], 3),
    ("verify-tampered-bundle", ["verify", "{tampered_bundle}"], 1),
    ("verify-file-replaced-by-a-link-out", ["verify", "{linked_out_bundle}"], 1),
    ("verify-dangling-link-added", ["verify", "{dangling_link_bundle}"], 1),
    ("verify-manifest-entry-out-of-the-bundle", ["verify", "{dotdot_entry_manifest}"], 1),
    ("verify-manifest-entry-absolute", ["verify", "{absolute_entry_manifest}"], 1),
    # devices
    ("devices-show-unknown", ["devices", "show", "pixel-99"], 2),
    ("devices-unknown-subcommand", ["devices", "explode"], 2),
    ("devices-dir-missing", ["devices", "--devices-dir", "{missing}"], 2),
    ("devices-dir-garbage", ["devices", "--devices-dir", "{garbage_devices}"], 3),
    ("devices-calibrate-out-dir", ["devices", "calibrate", "-o", "{case}", "--quick"], 2),
    ("devices-calibrate-out-under-proc", ["devices", "calibrate", "-o", "/proc/host.toml", "--quick"], 2),
    ("devices-calibrate-out-under-a-file", ["devices", "calibrate", "-o", "{file}/host.toml", "--quick"], 2),
    ("devices-calibrate-sizes-text", ["devices", "calibrate", "-o", "{out}.toml", "--sizes-mb", "big"], 2),
    ("devices-calibrate-sizes-negative", ["devices", "calibrate", "-o", "{out}.toml", "--sizes-mb", "-1"], 2),
    ("devices-calibrate-zero-repeats", ["devices", "calibrate", "-o", "{out}.toml", "--repeats", "0"], 2),
    ("devices-calibrate-sizes-nan", ["devices", "calibrate", "-o", "{out}.toml", "--sizes-mb", "nan"], 2),
    ("devices-calibrate-sizes-inf", ["devices", "calibrate", "-o", "{out}.toml", "--sizes-mb", "inf"], 2),
    # profile
    ("profile-missing-dir", ["profile", "{missing}", "-o", "{out}.json"], 3),
    ("profile-empty-dir", ["profile", "{empty_dir}", "-o", "{out}.json"], 3),
    ("profile-truncated-model", ["profile", "{truncated_export}", "-o", "{out}.json", "--runs", "1", "--gen-len", "2", "--prompt-len", "4"], 3),
    ("profile-tokenizer-outside-vocab", ["profile", "{wide_tokenizer_export}", "-o", "{out}.json", "--runs", "1", "--gen-len", "2",
                                         "--prompt-len", "4"], 3),
    ("profile-garbage-model", ["profile", "{garbage_onnx_export}", "-o", "{out}.json", "--runs", "1", "--gen-len", "2", "--prompt-len", "4"], 3),
    ("profile-out-is-a-dir", ["profile", "{export}", "-o", "{case}", "--runs", "1", "--gen-len", "2", "--prompt-len", "4"], 2),
    ("profile-out-under-proc", ["profile", "{export}", "-o", "/proc/profile.json", "--runs", "1", "--gen-len", "2", "--prompt-len", "4"], 2),
    ("profile-out-under-a-file", ["profile", "{export}", "-o", "{file}/profile.json"], 2),
    ("profile-out-missing-parent", ["profile", "{export}", "-o", "{case}/no/such/profile.json"], 2),
    ("profile-prompt-len-text", ["profile", "{export}", "-o", "{out}.json", "--prompt-len", "long"], 2),
    ("profile-prompt-len-zero", ["profile", "{export}", "-o", "{out}.json", "--prompt-len", "0"], 2),
    ("profile-prompt-len-huge", ["profile", "{export}", "-o", "{out}.json", "--prompt-len", "100000000"], 2),
    ("profile-gen-len-one", ["profile", "{export}", "-o", "{out}.json", "--gen-len", "1"], 2),
    ("profile-unknown-device", ["profile", "{export}", "-o", "{out}.json", "--device", "pixel-99"], 2),
    ("profile-runs-zero", ["profile", "{export}", "-o", "{out}.json", "--runs", "0"], 2),
    ("profile-prompt-len-negative", ["profile", "{export}", "-o", "{out}.json", "--prompt-len", "-8"], 2),
    ("profile-prompt-len-empty", ["profile", "{export}", "-o", "{out}.json", "--prompt-len", ""], 2),
    ("profile-cooldown-nan", ["profile", "{export}", "-o", "{out}.json", "--cooldown", "nan"], 2),
    ("profile-context-huge", ["profile", "{export}", "-o", "{out}.json", "--context", "99999999999999999999"], 2),
    ("profile-read-only-disk!ro", ["profile", "{export}", "-o", "{ro_fs}/profile.json", "--runs", "1", "--gen-len", "2", "--prompt-len", "4"], 2),
    # estimate
    ("estimate-missing-model", ["estimate", "{missing}"], 3),
    ("estimate-empty-dir", ["estimate", "{empty_dir}"], 3),
    ("estimate-garbage-config", ["estimate", "{bad_config_export}"], 3),
    ("estimate-list-config", ["estimate", "{list_config_export}"], 3),
    ("estimate-binary-config", ["estimate", "{binary_config_export}"], 3),
    ("estimate-encoder", ["estimate", "{bert_model}"], 2),
    ("estimate-unknown-target", ["estimate", "{export}", "--target", "tflite"], 2),
    ("estimate-scheme-not-for-target", ["estimate", "{export}", "--target", "qnn", "--scheme", "int8-dynamic"], 2),
    ("estimate-unit-not-for-target", ["estimate", "{export}", "--unit", "htp"], 2),
    ("estimate-device-without-the-unit", ["estimate", "{export}", "--target", "coreml", "--device", "pixel-8"], 2),
    ("estimate-unknown-device", ["estimate", "{export}", "--device", "pixel-99"], 2),
    ("estimate-context-zero", ["estimate", "{export}", "--context", "0"], 2),
    ("estimate-prompt-over-context", ["estimate", "{export}", "--context", "64", "--prompt-len", "128"], 2),
    ("estimate-out-dir", ["estimate", "{export}", "-o", "{case}"], 2),
    # measuring on a device: addresses that are not devices, a device that is not there
    ("profile-on-not-a-device", ["profile", "{export}", "-o", "{out}.json", "--on", "ftp://box"], 2),
    ("profile-on-ssh-password", ["profile", "{export}", "-o", "{out}.json", "--on", "ssh://me:pw@box"], 2),
    ("profile-on-adb-no-serial", ["profile", "{export}", "-o", "{out}.json", "--on", "adb:"], 2),
    ("devices-prepare-not-a-device", ["devices", "prepare", "http://box"], 2),
    # check
    ("check-missing-profile", ["check", "{missing}", "--budgets", "{budgets}"], 3),
    ("check-profile-is-a-dir", ["check", "{empty_dir}", "--budgets", "{budgets}"], 3),
    ("check-empty-profile", ["check", "{empty_file}", "--budgets", "{budgets}"], 3),
    ("check-garbage-profile", ["check", "{garbage_profile}", "--budgets", "{budgets}"], 3),
    ("check-binary-profile", ["check", "{binary_profile}", "--budgets", "{budgets}"], 3),
    ("check-wrong-kind-profile", ["check", "{wrong_kind_profile}", "--budgets", "{budgets}"], 3),
    ("check-list-profile", ["check", "{list_profile}", "--budgets", "{budgets}"], 3),
    *[(f"check-{name.replace('_', '-')}", ["check", "{" + name + "}", "--budgets", "{budgets}"], 3) for name in (
        "host_list_profile", "projections_number_profile", "projection_list_profile", "entries_dict_profile",
        "entry_no_lengths_profile", "figure_text_profile", "quality_text_profile", "efficiency_text_profile")],
    ("check-missing-budgets", ["check", "{good_profile}", "--budgets", "{missing}"], 2),
    ("check-budgets-is-a-dir", ["check", "{good_profile}", "--budgets", "{empty_dir}"], 2),
    ("check-garbage-budgets", ["check", "{good_profile}", "--budgets", "{garbage_budgets}"], 2),
    ("check-binary-budgets", ["check", "{good_profile}", "--budgets", "{binary_budgets}"], 2),
    ("check-unknown-budget-key", ["check", "{good_profile}", "--budgets", "{unknown_key_budgets}"], 2),
    ("check-negative-budget", ["check", "{good_profile}", "--budgets", "{negative_budgets}"], 2),
    ("check-text-budget", ["check", "{good_profile}", "--budgets", "{text_budgets}"], 2),
    ("check-flat-budgets", ["check", "{good_profile}", "--budgets", "{flat_budgets}"], 2),
    ("check-nan-budget", ["check", "{good_profile}", "--budgets", "{nan_budgets}"], 2),
    ("check-inf-budget", ["check", "{good_profile}", "--budgets", "{inf_budgets}"], 2),
    ("check-budget-for-a-device-the-profile-lacks", ["check", "{good_profile}", "--budgets", "{absent_device_budgets}"], 2),
    ("check-budget-for-an-unknown-device", ["check", "{good_profile}", "--budgets", "{unknown_device_budgets}"], 2),
    ("check-out-is-a-dir", ["check", "{good_profile}", "--budgets", "{budgets}", "-o", "{case}"], 2),
    ("check-junit-is-a-dir", ["check", "{good_profile}", "--budgets", "{budgets}", "--junit", "{case}"], 2),
    ("check-out-under-proc", ["check", "{good_profile}", "--budgets", "{budgets}", "-o", "/proc/verdicts.json"], 2),
    ("check-junit-under-a-file", ["check", "{good_profile}", "--budgets", "{budgets}", "--junit", "{file}/junit.xml"], 2),
    ("check-out-missing-parent", ["check", "{good_profile}", "--budgets", "{budgets}", "-o", "{case}/no/such/v.json"], 2),
    ("check-read-only-disk!ro", ["check", "{good_profile}", "--budgets", "{budgets}", "-o", "{ro_fs}/v.json"], 2),
    # the top level
    ("unknown-command", ["deploy", "{export}"], 2),
    ("unknown-option", ["--colour", "convert"], 2),
]

# Environment a case runs with (on top of a fresh shared cache): the cache itself in the way.
CASE_ENV = {
    "convert-gguf-cache-is-a-file": {"EDGEPACK_CACHE": "{file}"},
    "convert-gguf-cache-under-proc": {"EDGEPACK_CACHE": "/proc/edgepack-cache"},
    "convert-gguf-cache-is-proc": {"EDGEPACK_CACHE": "/proc"},
    "build-cache-is-a-file": {"EDGEPACK_CACHE": "{file}"},
    "build-cache-under-proc": {"EDGEPACK_CACHE": "/proc/edgepack-cache"},
}


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` with a hash of its content (folders and symlinks included)."""
    found = {}
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[name] = "link:" + os.readlink(path)
        elif path.is_dir():
            found[name] = "dir"
        else:
            found[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _leftovers(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name or ".old-" in p.name)


def test_the_table_covers_every_command_and_enough_cases():
    from edgepack.cli import cli

    commands = {args[0] for _, args, _ in CASES}
    assert set(cli.list_commands(None)) <= commands, set(cli.list_commands(None)) - commands
    targets = {args[1] for _, args, _ in CASES if args[0] == "target"}
    assert {"ort", "ort-mobile", "coreml", "qnn"} <= targets
    assert len(CASES) >= 60
    assert len({case_id for case_id, _, _ in CASES}) == len(CASES)
    assert set(CASE_ENV) <= {case_id for case_id, _, _ in CASES}


def test_the_good_profile_and_budgets_pass_check(inputs, cli, tmp_path):
    """The `check` cases change one thing against inputs that pass, so each fails for the reason its id names."""
    result = cli("check", inputs["good_profile"], "--budgets", inputs["budgets"], "-o", tmp_path / "verdicts.json")
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("case_id, args, code", CASES, ids=[case[0] for case in CASES])
def test_bad_input(case_id, args, code, inputs, tmp_path, monkeypatch, cli):
    marker = case_id.rpartition("!")[2] if "!" in case_id else None
    if marker is not None:
        point = inputs["full_fs" if marker == "full" else "ro_fs"]
        if Path(point) not in inputs["mounts"]:
            pytest.skip(f"cannot mount a {'full' if marker == 'full' else 'read-only'} tmpfs here")
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path.parent / "bad-inputs-cache"))  # shared by the build cases
    case = tmp_path / "case"
    case.mkdir()
    monkeypatch.chdir(case)
    prev = case / "webapp"  # the user's own folder: a manifest.json that is not edgepack's, and code
    _write(prev / "manifest.json", json.dumps({"name": "app", "files": ["src/app.js"]}))
    _write(prev / "src" / "app.js", "console.log('precious')\n")
    _write(case / "notes.txt", "a file, not a folder\n")
    values = {k: v for k, v in inputs.items() if k != "mounts"}
    values.update(out=str(case / "out"), prev=str(prev), file=str(case / "notes.txt"), case=str(case))
    for name, value in CASE_ENV.get(case_id, {}).items():
        monkeypatch.setenv(name, value.format(**values))
    argv = [arg.format(**values) for arg in args]
    shared = [Path(v) for k, v in values.items() if k not in ("out", "prev", "file", "case") and Path(v).exists()]
    before = _snapshot(case), {str(p): _snapshot(p) if p.is_dir() else p.read_bytes() for p in shared}

    result = cli(*argv)

    assert result.exit_code in CODES, (result.exit_code, result.stderr)
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr_lines if not (argv[0] == "build" and STAGE_LINE.match(line))]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and result.stderr_lines[-1] == lines[0], result.stderr
    after = _snapshot(case), {str(p): _snapshot(p) if p.is_dir() else p.read_bytes() for p in shared}
    assert after[0] == before[0], "a failing command changed the case folder (previous OUT, user files, leftovers)"
    assert after[1] == before[1], "a failing command changed one of its inputs"
    for arg in argv:  # nothing left beside any path the command was given
        parent = Path(arg).parent
        if parent != Path("/") and not str(parent).startswith("/proc"):
            assert not _leftovers(parent), _leftovers(parent)
