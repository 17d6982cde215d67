"""Core ML target on tiny Llama and BERT: conversion, spec inspection, MIL-reference parity, ANE report.

Core ML itself runs only on macOS: those tests skip elsewhere with the reason. Everything else runs the
saved program through edgepack's MIL reference interpreter.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("coremltools")

from tests.conftest import read_json, run_cli  # noqa: E402

ON_MAC = platform.system() == "Darwin"
MAC_ONLY = pytest.mark.skipif(not ON_MAC, reason=f"Core ML predict runs only on macOS (this host is {platform.system()})")


class _Artifact:
    """target.json read back as the attributes tests use (the fixture is built through the CLI)."""

    def __init__(self, report: dict):
        self.facts, self.checks, self.files = report["facts"], report["checks"], report["files"]


@pytest.fixture(scope="module")
def llama_target(exported_tiny_factory, tmp_path_factory):
    from tests.conftest import run_cli

    out = tmp_path_factory.mktemp("coreml") / "llama"
    result = run_cli("target", "coreml", exported_tiny_factory("llama"), "-o", out, "--max-context", "64")
    assert result.exit_code == 0, result.stderr
    assert "cpu_and_ne" in result.stdout and "top-1 1.000" in result.stdout
    return out, _Artifact(read_json(out / "target.json"))


def _tiny_llama_variant(src: Path, out: Path, *, heads: int, scale_embeddings: float = 1.0) -> Path:
    """A tiny Llama HF folder with `heads` attention heads (head_dim = 64 / heads), tokenizer copied from src."""
    import torch
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=heads,
                            num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=0, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(1)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
        model.model.embed_tokens.weight.mul_(scale_embeddings)
    model.save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(src / name, out / name)
    return out


def test_llama_stateful_package_and_target_json(llama_target):
    out, artifact = llama_target
    report = read_json(out / "target.json")
    assert report["target"] == "coreml" and report["passed"] is True
    assert (out / "model.mlpackage" / "Manifest.json").is_file()
    assert (out / "tokenizer.json").is_file()
    facts = report["facts"]
    assert facts["kind"] == "decoder" and facts["compute_precision"] == "fp16"
    assert facts["compression"]["name"] == "none"
    assert report["total_bytes"] == sum(report["files"].values())
    assert any("coremltools#2633" in fix for fix in facts["compat_fixes"])


def test_llama_spec_inspection(llama_target):
    import coremltools as ct

    out, _ = llama_target
    spec = ct.models.MLModel(str(out / "model.mlpackage"), skip_model_load=True).get_spec()
    assert spec.WhichOneof("Type") == "mlProgram"
    assert spec.specificationVersion >= 9  # iOS 18 (states)
    assert [i.name for i in spec.description.input] == ["input_ids", "causal_mask"]
    assert [o.name for o in spec.description.output] == ["logits"]
    states = {s.name: list(s.type.stateType.arrayType.shape) for s in spec.description.state}
    # (layers, batch, kv_heads, context, head_dim) of the tiny Llama: 2 layers, 2 KV heads, head_dim 16
    assert states == {"key_cache": [2, 1, 2, 64, 16], "value_cache": [2, 1, 2, 64, 16]}


def test_llama_mil_reference_parity(llama_target):
    _, artifact = llama_target
    parity = artifact.checks["parity"]
    mil = artifact.facts["verification"]["mil-reference"]
    assert parity["passed"] and parity["verified_by"] == ("coreml-runtime" if ON_MAC else "mil-reference")
    assert mil["verified_by"] == "mil-reference" and mil["positions"] == 64 and mil["decode_steps"] == 8
    assert mil["top1_agreement"] >= 0.99 and mil["kl_mean"] <= 1e-3 and mil["max_abs_logit_diff"] < 0.05
    low, high = mil["top1_ci95"]
    assert low <= mil["top1_agreement"] <= high and high - low < 0.1  # 64 positions: the interval is wide
    assert 0 <= mil["near_tie_positions"] < mil["positions"] and parity["top1_ci95"] == mil["top1_ci95"]
    if not ON_MAC:
        assert "macOS" in artifact.facts["verification"]["coreml-runtime"]["skipped"]


def test_fp16_logit_figures_count_near_ties_and_bound_top1():
    """Near ties (fp32 top-2 gap < 0.1 nats) are counted, and agreement on the other positions is reported apart."""
    import numpy as np

    from edgepack.core.metrics import NEAR_TIE_NATS, wilson_interval
    from edgepack.targets.coreml_support.verify import fp16_logit_figures

    rng = np.random.default_rng(0)
    reference = rng.normal(size=(10, 32)).astype(np.float32)
    reference[:, 0] = reference.max(-1) + 2.0  # token 0 is fp32's clear top-1 ...
    reference[:3, 1] = reference[:3, 0] - NEAR_TIE_NATS / 2  # ... except at 3 near ties with token 1
    candidate = reference.copy()
    candidate[:3, 1] += NEAR_TIE_NATS  # the candidate flips all three near ties
    candidate[9, 5] = candidate[9, 0] + 1.0  # and one decisive position
    figures = fp16_logit_figures(reference, candidate)
    assert figures["top1_agreement"] == 0.6 and figures["near_tie_positions"] == 3
    assert abs(figures["top1_agreement_decisive"] - 6 / 7) < 1e-12
    assert figures["top1_ci95"] == wilson_interval(6, 10)
    low, high = wilson_interval(9, 10)  # textbook value: 0.596-0.982
    assert abs(low - 0.5958) < 1e-3 and abs(high - 0.9821) < 1e-3
    assert wilson_interval(0, 0) == [0.0, 1.0]


def test_ane_report_flags_state_dimension_not_multiple_of_32(llama_target):
    _, artifact = llama_target
    ane = artifact.facts["ane"]
    assert [s["last_dim_multiple_of_32"] for s in ane["states"]] == [False, False]
    rules = {f["id"]: f for f in ane["findings"]}
    assert rules["state-alignment-32"]["severity"] == "blocking"
    assert "coremltools#2631" in rules["state-alignment-32"]["source"]
    assert "state-alignment-32" in ane["verdicts"]["cpu_and_ne"]
    assert ane["op_counts"]["scaled_dot_product_attention"] == 2
    assert ane["dynamic_shape_ops"]["count"] > 0 and ane["size_bytes"] > 0
    assert all(f["source"] for f in ane["findings"])


def test_ane_report_passes_aligned_state(tiny_model_factory, tmp_path):
    from edgepack.targets.coreml import CoreMLConfig, build

    folder = _tiny_llama_variant(tiny_model_factory("llama"), tmp_path / "hf", heads=2)  # head_dim 32
    artifact = build(folder, tmp_path / "out", CoreMLConfig(max_context=16, verify=False))
    ane = artifact.facts["ane"]
    assert [s["shape"][-1] for s in ane["states"]] == [32, 32]
    assert "state-alignment-32" not in {f["id"] for f in ane["findings"]}


def test_fp16_safety_pass_rewrites_overflowing_norms(tiny_model_factory, tmp_path):
    from edgepack.targets.coreml import CoreMLConfig, build

    # Embeddings x30000: the residual stream reaches ~2e3, so RMSNorm's x^2 overflows fp16 (as in SmolLM2, ~2e4).
    folder = _tiny_llama_variant(tiny_model_factory("llama"), tmp_path / "hf", heads=2, scale_embeddings=30000.0)
    unsafe = build(folder, tmp_path / "unsafe", CoreMLConfig(max_context=16, eval_positions=16, decode_steps=4, fp16_safety=False))
    safe = build(folder, tmp_path / "safe", CoreMLConfig(max_context=16, eval_positions=16, decode_steps=4))
    rewrites = safe.facts["fp16_safety"]["rewrites"]
    assert any(r["op"] == "model.layers.0.input_layernorm" for r in rewrites)
    assert unsafe.facts["fp16_safety"]["rewritten_ops"] == 0
    bad, good = unsafe.facts["verification"]["mil-reference"], safe.facts["verification"]["mil-reference"]
    assert safe.facts["fp16_safety"]["largest_activations"][0]["max_abs"] ** 2 > 65504
    assert not unsafe.checks["parity"]["passed"]
    # random weights give near-tied logits, so top-1 is not asserted: KL is the measure here
    assert good["finite"] and good["kl_mean"] < 1e-3
    assert bad["kl_mean"] > 100 * max(good["kl_mean"], 1e-5)


def test_int4_block_compression(exported_tiny_factory, tmp_path, llama_target):
    from edgepack.targets.coreml import CoreMLConfig, build

    artifact = build(exported_tiny_factory("llama"), tmp_path / "q4", CoreMLConfig(max_context=16, eval_positions=16, compress="int4-block", block_size=16))
    ops = artifact.facts["ane"]["op_counts"]
    assert ops.get("constexpr_blockwise_shift_scale", 0) >= 15  # 14 projections + embedding + lm_head
    weights = "model.mlpackage/Data/com.apple.CoreML/weights/weight.bin"
    assert artifact.files[weights] < 0.45 * llama_target[1].files[weights]  # 4 bits + fp16 scale and offset per 16
    assert artifact.facts["compression"]["dtype"] == "uint4"
    assert artifact.facts["verification"]["mil-reference"]["top1_agreement"] >= 0.5  # reported; random weights
    # The MIL reference with no decompressed weight kept (each decompressed when an op reads it, as for a
    # model past its cache) computes the logits the cached run does, and keeps nothing across calls.
    from edgepack.targets.coreml_support import verify
    from edgepack.targets.coreml_support.mil_reference import load_program

    cached, uncached = load_program(tmp_path / "q4" / "model.mlpackage"), load_program(tmp_path / "q4" / "model.mlpackage")
    uncached.cache_bytes = 0
    tokens = list(range(5, 17))
    expected, _ = verify.run_decoder_mil(cached, tokens, decode_steps=4)
    logits, _ = verify.run_decoder_mil(uncached, tokens, decode_steps=4)
    assert cached.decompressed and not uncached.decompressed
    assert np.array_equal(logits, expected)
    assert np.array_equal(verify.run_decoder_mil(uncached, tokens, decode_steps=4)[0], expected)  # reused: a fresh KV cache


def test_int4_block_split_table_and_integer_offsets(exported_tiny_factory, tmp_path):
    """The <= 80 MB SmolLM2 layout on a tiny tied llama: split table (int8 rows + 3-bit LUT rows), uint4 offsets + residue."""
    from edgepack.targets.coreml import CoreMLConfig, build
    from edgepack.targets.coreml_support.mil_reference import load_program

    config = CoreMLConfig(max_context=16, eval_positions=16, compress="int4-block", embedding="split", split_rows=100,
                          split_block=16, integer_offsets=True, tune_steps=4)
    artifact = build(exported_tiny_factory("llama-tied"), tmp_path / "split", config)
    ops = artifact.facts["ane"]["op_counts"]
    assert ops["constexpr_lut_to_dense"] == 1  # the rare rows' 3-bit indices, once for the tied table
    # 14 projections: one uint4 weight + one int4 residue each; plus the table's two parts
    assert ops["constexpr_blockwise_shift_scale"] == 14 * 2 + 2
    compression = artifact.facts["compression"]
    assert "split" not in compression["embedding"] and "int8" in compression["embedding"] and "uint4" in compression["offsets"]
    tuning = compression["table_tuning"]
    assert tuning["steps"] == 4 and tuning["sequence_tokens"] == 16 and tuning["heldout_kl_after"] >= 0
    mil = artifact.facts["verification"]["mil-reference"]
    assert mil["top1_agreement"] >= 0.5 and mil["positions"] == 16  # random weights: reported, loosely gated
    program = load_program(tmp_path / "split" / "model.mlpackage")
    types = {op.op_type: op for op in program.function.operations}
    # lookups choose a part (select), the logits are both parts in id order (concat)
    assert {op.op_type for op in program.function.operations if op.name.endswith("_split")} == {"select", "concat"}
    assert artifact.facts["deployment_target"] == "iOS 26 / macOS 26"  # the LUT -> per-block scale chain
    lut = types["constexpr_lut_to_dense"]
    assert lut.indices.dtype.get_bitwidth() == 3 and lut.outputs[0].child_ops[0].op_type == "constexpr_blockwise_shift_scale"
    weights = "model.mlpackage/Data/com.apple.CoreML/weights/weight.bin"
    fp16_bytes = 2 * (2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64) + 512 * 64)  # 2 layers of projections + the table
    assert artifact.files[weights] < 0.4 * fp16_bytes


def test_split_table_tuning_lowers_heldout_kl(tiny_model_factory):
    """Distillation of the split table (--tune-steps): held-out KL goes down, the stored formats are kept,
    the fp32 reference model is not touched, and the same seed gives the same table."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgepack.targets.coreml_support.convert import fit_split_table
    from edgepack.targets.coreml_support.table_tuning import tune_split_table

    folder = tiny_model_factory("llama-tied")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    original = model.get_input_embeddings().weight.detach().clone()
    fit = fit_split_table(original.numpy(), 100, 16, None)
    tuned, report = tune_split_table(model, tokenizer, fit, steps=40, projection_block=32, integer_offsets=True, sequence_tokens=32)
    # a random tiny model's logits are nearly flat, so the gain is small; a diverging tuning fails here
    assert report["heldout_kl_after"] < report["heldout_kl_before"], report
    assert tuned.index.shape == fit.index.shape and tuned.index.max() <= 7 and tuned.frequent.dtype == np.int8
    assert tuned.scale.dtype == np.float16 and tuned.offset.dtype == np.float16
    assert (tuned.index != fit.index).mean() > 0.001  # values moved
    assert torch.equal(model.get_input_embeddings().weight, original)  # the reference stays fp32
    again, _ = tune_split_table(model, tokenizer, fit, steps=40, projection_block=32, integer_offsets=True, sequence_tokens=32)
    assert np.array_equal(again.index, tuned.index) and np.array_equal(again.scale, tuned.scale)


def test_tune_steps_needs_the_split_table(exported_tiny_factory, tmp_path):
    result = run_cli("target", "coreml", str(exported_tiny_factory("llama-tied")), "-o", str(tmp_path / "x"), "--tune-steps", "5")
    assert result.exit_code == 2 and "--embedding split" in result.stderr and len(result.stderr_lines) == 1
    result = run_cli("target", "coreml", str(exported_tiny_factory("llama-tied")), "-o", str(tmp_path / "x"), "--compress", "int4-block",
                     "--embedding", "split", "--tune-steps", "-1")
    assert result.exit_code == 2 and "--tune-steps" in result.stderr and len(result.stderr_lines) == 1


def test_block_scales_option_errors(exported_tiny_factory, tmp_path):
    export = str(exported_tiny_factory("llama-tied"))
    for extra, expected in ((["--block-scales", "uint8"], "--compress int4-block"),
                            (["--compress", "int4-block", "--block-scales", "uint8", "--integer-offsets"], "drop --integer-offsets"),
                            (["--compress", "int4-block", "--embedding", "split", "--split-bits", "5"], "--split-bits"),
                            (["--compress", "int4-block", "--embedding", "split", "--split-levels", "uniform"], "needs --split-bits 4")):
        result = run_cli("target", "coreml", export, "-o", str(tmp_path / "x"), *extra)
        assert result.exit_code == 2 and expected in result.stderr and len(result.stderr_lines) == 1, result.stderr
        assert not (tmp_path / "x").exists()


def test_split_table_fit_and_residue_reconstruct_weights():
    from edgepack.targets.coreml_support.convert import SPLIT_LEVELS, affine_blocks, integer_offsets, lut3_blocks

    rng = np.random.default_rng(1)
    table = rng.normal(0, 0.05, (64, 96)).astype(np.float32)
    index, scale, offset = lut3_blocks(table, 48, SPLIT_LEVELS, None)
    assert index.max() <= 7 and scale.shape == (64, 2) and scale.dtype == np.float16
    rebuilt = scale.astype(np.float32).repeat(48, 1) * (SPLIT_LEVELS[index].astype(np.float32) - offset.astype(np.float32).repeat(48, 1))
    rel = np.sqrt(np.mean((rebuilt - table) ** 2)) / table.std()
    assert rel < 0.2  # 3 bits: about 0.16 of the spread (uniform 3-bit min/max: ~0.2)
    # residue: w = s*(q - round(z)) - s*k/16 is within 1/32 of a step of s*(q - z)
    q, s, z = affine_blocks(table, 32)
    zi, k = integer_offsets(z)
    assert zi.min() >= 0 and zi.max() <= 15 and k.min() >= -8 and k.max() <= 7
    exact = s.astype(np.float32)[..., None] * (q.reshape(64, 3, 32) - z.astype(np.float32)[..., None])
    layout = s.astype(np.float32)[..., None] * (q.reshape(64, 3, 32) - zi[..., None]) - (s.astype(np.float32) * k / 16)[..., None]
    assert np.max(np.abs(layout - exact) / s.astype(np.float32)[..., None]) <= 1 / 32 + 1e-3


def test_affine_blocks_hold_q4_1_exactly():
    from edgepack.targets.coreml_support.convert import affine_blocks

    rng = np.random.default_rng(0)
    rows, cols, block = 8, 64, 32
    # GGUF stores d and m as fp16; m is the block minimum, a few levels below zero for real weights
    d = rng.uniform(0.001, 0.02, (rows, cols // block, 1)).astype(np.float16).astype(np.float32)
    m = (-d * rng.uniform(4, 11, d.shape)).astype(np.float16).astype(np.float32)
    q = rng.integers(0, 16, (rows, cols // block, block))
    q[..., 0], q[..., 1] = 0, 15  # llama.cpp's Q4_1 maps the block min to 0 and max to 15
    weight = (d * q + m).reshape(rows, cols).astype(np.float32)
    data, scale, offset = affine_blocks(weight, block)
    rebuilt = (scale.astype(np.float32)[..., None] * (data.reshape(rows, -1, block) - offset.astype(np.float32)[..., None])).reshape(rows, cols)
    assert np.array_equal(data.reshape(q.shape), q)
    assert np.array_equal(scale.astype(np.float32), d[..., 0])  # the scale is GGUF's d, bit for bit
    assert (np.abs(rebuilt - weight) / d.reshape(rows, -1).repeat(block, axis=1)).max() < 0.01  # offset: fp16 rounding only


def test_bert_encoder_fixed_shape(exported_tiny_factory, tmp_path):
    import coremltools as ct

    from edgepack.targets.coreml import CoreMLConfig, build

    artifact = build(exported_tiny_factory("bert"), tmp_path / "bert", CoreMLConfig(max_context=32))
    spec = ct.models.MLModel(str(tmp_path / "bert" / "model.mlpackage"), skip_model_load=True).get_spec()
    assert [list(i.type.multiArrayType.shape) for i in spec.description.input] == [[1, 32], [1, 32]]
    assert artifact.facts["kind"] == "encoder" and not artifact.facts["ane"]["states"]
    assert "static-shapes" not in {f["id"] for f in artifact.facts["ane"]["findings"]}
    mil = artifact.facts["verification"]["mil-reference"]
    assert artifact.checks["parity"]["passed"] and mil["cosine_min"] > 0.999


def test_cli_builds_and_errors(cli, exported_tiny_factory, tiny_model_factory, tmp_path):
    export = exported_tiny_factory("llama")
    bad_units = cli("target", "coreml", export, "-o", tmp_path / "x", "--compute-units", "npu")
    assert bad_units.exit_code == 2 and bad_units.stderr_lines == [bad_units.stderr_lines[0]] and "compute units" in bad_units.stderr
    bad_compress = cli("target", "coreml", export, "-o", tmp_path / "x", "--compress", "int3")
    assert bad_compress.exit_code == 2 and "int4-block" in bad_compress.stderr
    bad_block = cli("target", "coreml", export, "-o", tmp_path / "x", "--compress", "int4-block", "--embedding", "split", "--split-block", "40")
    assert bad_block.exit_code == 2 and len(bad_block.stderr_lines) == 1 and "--split-block (40)" in bad_block.stderr
    assert not (tmp_path / "x").exists()
    missing = cli("target", "coreml", tmp_path, "-o", tmp_path / "x")
    assert missing.exit_code == 3 and "convert.json" in missing.stderr
    gpt2 = cli("target", "coreml", tiny_model_factory("gpt2"), "-o", tmp_path / "g")
    assert gpt2.exit_code == 3 and len(gpt2.stderr_lines) == 1
    assert "'gpt2'" in gpt2.stderr and "GPT2Attention" in gpt2.stderr
    assert not (tmp_path / "g").exists()

    devices = _tiny_phone_devices(tmp_path)
    unknown = cli("target", "coreml", export, "-o", tmp_path / "x", "--device", "iphone-0", "--devices-dir", devices)
    assert unknown.exit_code == 2 and "tiny-phone" in unknown.stderr
    too_big = cli("target", "coreml", export, "-o", tmp_path / "x", "--device", "tiny-phone", "--devices-dir", devices)
    assert too_big.exit_code == 3 and "too large for tiny-phone" in too_big.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    again = cli("target", "coreml", export, "-o", tmp_path / "full", "--no-verify")
    assert again.exit_code == 2 and "--force" in again.stderr


def _tiny_phone_devices(tmp_path: Path) -> Path:
    """A devices folder holding one phone the built-in database does not know, with a tiny app memory limit."""
    devices = tmp_path / "devices"
    devices.mkdir()
    (devices / "tiny-phone.toml").write_text(
        'id = "tiny-phone"\nname = "Tiny phone"\n[memory]\n'
        'bandwidth_gb_s = { value = 10, source = "test fixture", verified = true }\n'
        'app_memory_limit_mb = { value = 0.01, source = "test fixture", verified = true }\n')
    return devices


def test_device_memory_limit_uses_the_device_database(tmp_path):
    from edgepack.errors import UsageError
    from edgepack.targets.coreml import device_memory_limit

    devices = _tiny_phone_devices(tmp_path)
    limit, note = device_memory_limit("tiny-phone", (devices,))
    assert limit == int(0.01 * 1024 * 1024) and note == "tiny-phone: app memory limit 0.01 MB (test fixture)"
    with pytest.raises(UsageError, match="unknown device 'tiny-phone'"):
        device_memory_limit("tiny-phone")  # only in the custom folder
    limit, note = device_memory_limit("iphone-15-pro")
    assert limit == 4096 * 1024 * 1024 and note.startswith("iphone-15-pro: app memory limit 4096 MB (")


def test_module_imports_light():
    code = "import sys, edgepack.targets.coreml as m; assert m.SUMMARY and m.command.name == 'coreml'; " \
           "heavy = [k for k in ('coremltools', 'torch', 'transformers') if k in sys.modules]; assert not heavy, heavy"
    subprocess.run([sys.executable, "-c", code], check=True)


@MAC_ONLY
def test_coreml_runtime_predict_matches_mil_reference(llama_target):
    _, artifact = llama_target
    runtime = artifact.facts["verification"]["coreml-runtime"]
    assert runtime["verified_by"] == "coreml-runtime"
    assert runtime["top1_agreement"] >= 0.99 and runtime["kl_mean"] <= 1e-3


@pytest.mark.parametrize("levels", ["normal", "uniform"])
def test_int4_block_uint8_block_scales_and_4bit_split_table(exported_tiny_factory, tmp_path, levels):
    """The <= 80 MB SmolLM2 layout with a margin: int4 codes with uint8 block scales and offsets applied to
    per-block partial sums, and the split table's rare rows at 4 bits (normal levels through a LUT, iOS 26;
    or uniform uint4 codes, iOS 18). The MIL reference must compute what the stored weights say: its
    logits match PyTorch run with the projections and table as stored."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgepack.targets.coreml import CoreMLConfig, build
    from edgepack.targets.coreml_support import verify
    from edgepack.targets.coreml_support.convert import stored_projection
    from edgepack.targets.coreml_support.mil_reference import load_program

    export = exported_tiny_factory("llama-tied")
    config = CoreMLConfig(max_context=16, eval_positions=16, compress="int4-block", embedding="split", split_rows=100,
                          split_block=16, split_bits=4, split_levels=levels, block_scales="uint8", tune_steps=2)
    artifact = build(export, tmp_path / "scaled", config)
    ops = artifact.facts["ane"]["op_counts"]
    # 14 projections: int4 codes + uint8 offsets (shift_scale) and uint8 scale codes (LUT); plus the table's two
    # parts, its rare rows through a LUT of normal levels or as plain uint4 codes
    uniform = levels == "uniform"
    assert ops["constexpr_blockwise_shift_scale"] == 14 * 2 + 2 and ops["constexpr_lut_to_dense"] == 14 + (0 if uniform else 1)
    assert artifact.facts["deployment_target"] == ("iOS 18 / macOS 15" if uniform else "iOS 26 / macOS 26")
    compression = artifact.facts["compression"]
    assert "uint8" in compression["block_scales"] and "uint8" in compression["offsets"]
    assert ("uint4 (uniform levels" if uniform else "4-bit indices into 16") in compression["embedding"]
    assert compression["table_tuning"]["steps"] == 2  # tuning runs against the projections as this layout stores them
    program = load_program(tmp_path / "scaled" / "model.mlpackage")
    luts = [op for op in program.function.operations if op.op_type == "constexpr_lut_to_dense"]
    assert sorted(op.indices.dtype.get_bitwidth() for op in luts) == ([] if uniform else [4]) + [8] * 14
    assert ops["matmul"] == 14 and ops["linear"] == 2  # every projection a matmul over blocks; the linears are the two table parts
    weights = "model.mlpackage/Data/com.apple.CoreML/weights/weight.bin"
    fp16_bytes = 2 * (2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64) + 512 * 64)
    assert artifact.files[weights] < 0.4 * fp16_bytes

    # The MIL reference against PyTorch run with the weights as stored: the same function up to fp16
    # rounding, so the per-block partial sums, offsets and coded scales are wired as the formula says.
    from edgepack.targets.coreml import read_source

    model = AutoModelForCausalLM.from_pretrained(read_source(export).hf_dir, dtype=torch.float32).eval()
    frequent = next(op for op in program.function.operations if op.name.endswith("_frequent") and op.op_type.startswith("constexpr"))
    rare = next(op for op in program.function.operations if op.name.endswith("_rare") and op.op_type.startswith("constexpr"))
    table = np.concatenate([frequent.materialized_val_inference(), rare.materialized_val_inference()]).astype(np.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.from_numpy(table))
        for module in model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(torch.from_numpy(stored_projection(module.weight.numpy(), 32, False, block_scales="uint8")))
        tokens = list(range(5, 21))
        expected = model(torch.tensor([tokens])).logits[0].numpy()
    logits, _ = verify.run_decoder_mil(tmp_path / "scaled" / "model.mlpackage", tokens, decode_steps=4)
    assert np.abs(logits - expected).max() < 0.02 * np.abs(expected).max(), np.abs(logits - expected).max()
    assert (logits.argmax(-1) == expected.argmax(-1)).mean() == 1.0


def test_uint8_block_scales_reconstruct_weights():
    """scaled_blocks: scale codes within half a log step of the fp16 scale, offsets in sixteenths, and the
    stored weights within a small fraction of a quantization step of the int4 blocks they code."""
    from edgepack.targets.coreml_support.convert import affine_blocks, scaled_blocks, stored_projection

    rng = np.random.default_rng(2)
    weight = (rng.normal(0, 0.02, (48, 96)) * rng.uniform(0.2, 3.0, (48, 1))).astype(np.float32)  # rows of different scale
    q, codes, table, zero16 = scaled_blocks(weight, 32)
    assert codes.dtype == np.uint8 and zero16.dtype == np.uint8 and table.dtype == np.float16 and table.shape == (256,)
    _, scale, _ = affine_blocks(weight, 32)
    ratio = table.astype(np.float64)[codes] / scale.astype(np.float64)
    step = np.log(table[-1] / table[0]) / 255
    assert np.abs(np.log(ratio)).max() <= step / 2 + 1e-3  # nearest log-spaced code
    exact = stored_projection(weight, 32, False)
    coded = stored_projection(weight, 32, False, block_scales="uint8")
    error = np.abs(coded - exact).reshape(48, 3, 32) / scale.astype(np.float32)[..., None]
    assert error.max() < 15 * step + 1 / 32 + 1e-3  # scale rounding times |q - z| <= 15, plus the offset's sixteenth
    assert np.sqrt(np.mean((coded - weight) ** 2)) < 1.05 * np.sqrt(np.mean((exact - weight) ** 2))  # ~ no worse than int4 itself


def test_bert_encoder_with_uint8_block_scales(exported_tiny_factory, tmp_path):
    """The per-block layout on an encoder (static shapes, projection biases): still the encoder's function."""
    from edgepack.targets.coreml import CoreMLConfig, build

    exact = build(exported_tiny_factory("bert"), tmp_path / "fp16", CoreMLConfig(max_context=16, compress="int4-block"))
    coded = build(exported_tiny_factory("bert"), tmp_path / "u8", CoreMLConfig(max_context=16, compress="int4-block", block_scales="uint8"))
    assert coded.facts["ane"]["op_counts"]["matmul"] >= 12  # 2 layers x 6 projections over blocks
    a, b = exact.facts["verification"]["mil-reference"], coded.facts["verification"]["mil-reference"]
    assert b["cosine_min"] > 0.99 and abs(b["cosine_min"] - a["cosine_min"]) < 0.01, (a, b)
