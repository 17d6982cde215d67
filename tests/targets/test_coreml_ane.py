"""The Neural Engine program of the Core ML target (`--compute-units cpu_and_ne`): fixed shapes, prefill and
decode functions sharing one copy of the weights, a report with no blocking finding, and parity over several
prefill chunks through the MIL reference (Core ML's own placement and predictions on macOS only)."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("coremltools")

from tests.conftest import read_json, run_cli  # noqa: E402

ON_MAC = platform.system() == "Darwin"
MAC_ONLY = pytest.mark.skipif(not ON_MAC, reason=f"MLComputePlan and Core ML predict run only on macOS (this host is {platform.system()})")
# Every decoder architecture the target takes (edgepack/targets/architectures.py), each at its tiny config.
DECODERS = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "gemma2", "granite")
ANE_OPTIONS = ("--compute-units", "cpu_and_ne", "--max-context", "64", "--prefill-chunk", "16", "--eval-positions", "48")


def _build(source, out: Path, *options):
    result = run_cli("target", "coreml", source, "-o", out, *ANE_OPTIONS, *options)
    assert result.exit_code == 0, result.stderr + result.stdout
    return read_json(out / "target.json")


def _weight_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in (out / "model.mlpackage").rglob("weight.bin"))


@pytest.fixture(scope="module")
def llama_ane(tiny_model_factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("coreml-ane") / "llama"
    return out, _build(tiny_model_factory("llama"), out)


@pytest.mark.parametrize("arch", DECODERS)
def test_tiny_decoders_build_neural_engine_programs(arch, tiny_model_factory, tmp_path):
    report = _build(tiny_model_factory(arch), tmp_path / arch)
    facts = report["facts"]
    ane = facts["ane"]
    assert [f["id"] for f in ane["findings"] if f["severity"] == "blocking"] == []
    assert [f["id"] for f in ane["findings"] if f["severity"] == "fallback"] == []  # fp16 weights: nothing falls back
    assert ane["neural_engine"] == "ready" and ane["verdicts"]["cpu_and_ne"].startswith("Neural Engine ready")
    assert facts["program"]["shapes"] == "fixed" and facts["program"]["prefill_chunk"] == 16
    assert set(ane["functions"]) == {"prefill", "decode"}
    for name, query in (("prefill", 16), ("decode", 1)):
        function = ane["functions"][name]
        assert function["dynamic_shape_ops"] == 0 and function["non_fp16_tensors"] == 0
        assert function["inputs"]["input_ids"] == f"int32 (1, {query})"
        assert function["inputs"]["positions"] == f"fp16 (1, {query}, 64)"
    assert ane["flexible_inputs"] == [] and ane["dynamic_shape_ops"]["count"] == 0
    assert not any(t in ane["op_counts"] for t in ("greater_equal", "select", "cast", "scaled_dot_product_attention"))
    for state in ane["states"]:  # rank 4, last axis a multiple of 32 (tiny heads are 16 wide: padded)
        assert len(state["shape"]) == 4 and state["last_dim_multiple_of_32"]
    parity = report["checks"]["parity"]
    mil = facts["verification"]["mil-reference"]
    assert parity["passed"] and parity["positions"] == 48 and mil["prefill_chunks"] == 3 and mil["decode_steps"] == 8
    assert parity["top1_agreement"] >= 0.99 and parity["kl_mean"] <= 1e-3


def test_prefill_chunks_and_decode_match_pytorch_at_every_position(llama_ane, tiny_model_factory):
    """Chunk boundaries anywhere (a chunk of 5 after one of 16, a partial last chunk) give PyTorch's logits."""
    import torch
    import transformers as tf

    from edgepack.targets.coreml_support import verify

    out, _ = llama_ane
    model = tf.AutoModelForCausalLM.from_pretrained(str(tiny_model_factory("llama")), dtype=torch.float32).eval()
    tokens = [(11 * i + 5) % 500 for i in range(41)]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([tokens])).logits[0].numpy()
    logits, _timing = verify.run_fixed_decoder_mil(out / "model.mlpackage", tokens, 4, 16, 64)
    assert logits.shape == expected.shape
    figures = verify.fp16_logit_figures(expected, logits)
    assert figures["top1_agreement"] == 1.0 and figures["max_abs_logit_diff"] < 0.05


def test_fixed_feeds_pad_the_last_chunk_and_place_each_token():
    from edgepack.targets.coreml_support import verify

    steps = list(verify.fixed_decoder_steps(list(range(1, 24)), decode_steps=3, chunk=8, context=32))
    assert [(function, n) for function, n, _ in steps] == [("prefill", 8), ("prefill", 8), ("prefill", 4), ("decode", 1), ("decode", 1), ("decode", 1)]
    _, n, last = steps[2]  # tokens 17..20 at positions 16..19, four padding rows
    assert last["input_ids"].tolist() == [[17, 18, 19, 20, 0, 0, 0, 0]]
    assert last["positions"].shape == (1, 8, 32) and last["positions"].dtype == np.float16
    assert [int(np.argmax(row)) for row in last["positions"][0, :n]] == [16, 17, 18, 19]
    assert not last["positions"][0, n:].any()  # padding writes nothing
    mask = last["causal_mask"][0, 0]
    assert (mask[0, :17] == 0).all() and (mask[0, 17:] == verify.MASK_MIN).all()  # position 16 sees 0..16
    assert (mask[n:] == verify.MASK_MIN).all()
    _, _, decode = steps[-1]
    assert int(np.argmax(decode["positions"][0, 0])) == 22 and (decode["causal_mask"][0, 0, 0, :23] == 0).all()
    with pytest.raises(ValueError):
        verify.fixed_feed([1, 2, 3], 30, 4, 32)  # past the end of the cache


def test_vocabulary_above_the_axis_limit_is_sliced(tiny_model_factory, tmp_path):
    """A vocabulary above 65536 (Llama 3, Qwen, Gemma) comes out as logits_0, logits_1: no axis the engine refuses."""
    report = _build(tiny_model_factory("llama", vocab_size=70000, hidden_size=32, intermediate_size=64), tmp_path / "big-vocab")
    facts = report["facts"]
    assert facts["ane"]["functions"]["decode"]["outputs"] == ["logits_0", "logits_1"]
    assert not [f for f in facts["ane"]["findings"] if f["severity"] == "blocking"]
    assert set(facts["io"]["outputs"]) == {"logits_0", "logits_1"}
    assert report["checks"]["parity"]["passed"] and report["checks"]["parity"]["top1_agreement"] >= 0.99


def test_quantized_weights_are_a_named_fallback_and_palettized_weights_are_not(tiny_model_factory, tmp_path):
    source = tiny_model_factory("llama")
    int4 = _build(source, tmp_path / "int4", "--compress", "int4-block", "--block-size", "16", "--no-verify")["facts"]["ane"]
    quantized = next(f for f in int4["findings"] if f["id"] == "quantized-weights")
    assert quantized["severity"] == "fallback" and quantized["source"] and quantized["ops"]
    assert all(name.split("/")[0] in ("prefill", "decode") for name in quantized["ops"])
    assert int4["neural_engine"] == "partial"
    lut = _build(source, tmp_path / "lut", "--compress", "palettize4", "--no-verify")["facts"]["ane"]
    assert lut["neural_engine"] == "ready" and "quantized-weights" not in {f["id"] for f in lut["findings"]}
    assert next(f for f in lut["findings"] if f["id"] == "palettized-state")["severity"] == "warning"


def test_flexible_program_stays_for_the_gpu_and_holds_the_same_weights(llama_ane, tiny_model_factory, tmp_path):
    """--compute-units cpu_and_gpu keeps one function for any query length; the two-function Neural Engine package
    stores each weight once: its weight file is the size of that one-function program's."""
    out, _ = llama_ane
    # the per-function packages were staged and removed: OUT holds the one package
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".mlpackage") == ["model.mlpackage"] and not (out / "_functions").exists()
    gpu = tmp_path / "gpu"
    result = run_cli("target", "coreml", tiny_model_factory("llama"), "-o", gpu, "--compute-units", "cpu_and_gpu", "--max-context", "64",
                     "--no-verify")
    assert result.exit_code == 0, result.stderr
    facts = read_json(gpu / "target.json")["facts"]
    assert facts["program"] == {"shapes": "flexible", "functions": ["main"]} and "static-shapes" in {f["id"] for f in facts["ane"]["findings"]}
    assert abs(_weight_bytes(out) - _weight_bytes(gpu)) <= 0.02 * _weight_bytes(gpu)
    result = run_cli("target", "coreml", tiny_model_factory("llama"), "-o", tmp_path / "x", "--shapes", "rigid")
    assert result.exit_code == 2 and "--shapes" in result.stderr


@MAC_ONLY
def test_neural_engine_placement_and_predictions_on_macos(llama_ane):
    """MLComputePlan places the program's ops on the Neural Engine, and cpu_and_ne predictions match the MIL reference."""
    from edgepack.targets.coreml_support import verify

    out, report = llama_ane
    placement = verify.neural_engine_placement(out / "model.mlpackage", "cpu_and_ne")
    for name in ("prefill", "decode"):
        assert placement["functions"][name]["share"] >= 0.9, placement["functions"][name]
    tokens = [(11 * i + 5) % 500 for i in range(41)]
    on_device = verify.run_fixed_decoder_coreml(out / "model.mlpackage", tokens, 4, 16, 64, "cpu_and_ne")
    reference, _ = verify.run_fixed_decoder_mil(out / "model.mlpackage", tokens, 4, 16, 64)
    assert (on_device.argmax(-1) == reference.argmax(-1)).mean() >= 0.95
    assert report["facts"]["ane"]["placement"]["measured_by"] == "MLComputePlan"


def test_placement_is_skipped_with_its_reason_off_macos(llama_ane):
    if ON_MAC:
        pytest.skip("this host is macOS: the placement is measured (test above)")
    _, report = llama_ane
    assert "macOS" in report["facts"]["ane"]["placement"]["skipped"]


def test_shapes_option_needs_a_known_value():
    from edgepack.errors import UsageError
    from edgepack.targets.coreml import CoreMLConfig, fixed_shapes

    assert fixed_shapes(CoreMLConfig(compute_units="cpu_and_ne")) and not fixed_shapes(CoreMLConfig())
    assert fixed_shapes(CoreMLConfig(shapes="fixed")) and not fixed_shapes(CoreMLConfig(compute_units="cpu_and_ne", shapes="flexible"))
    with pytest.raises(UsageError):
        CoreMLConfig(shapes="static")


def test_a_model_split_into_packages_runs_part_after_part(tiny_model_factory, tmp_path):
    """--model-parts 2: two packages of one layer each, hidden states passed between them, PyTorch's logits."""
    out = tmp_path / "parts"
    report = _build(tiny_model_factory("llama"), out, "--model-parts", "2")
    facts = report["facts"]
    names = ["model-00001-of-00002.mlpackage", "model-00002-of-00002.mlpackage"]
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".mlpackage") == names
    assert [(p["package"], p["layers"]) for p in facts["program"]["packages"]] == [(names[0], [0, 0]), (names[1], [1, 1])]
    functions = facts["ane"]["functions"]
    assert functions["model-00001-of-00002/prefill"]["inputs"]["input_ids"] == "int32 (1, 16)"
    assert functions["model-00001-of-00002/decode"]["outputs"] == ["output_hidden_states"]
    assert functions["model-00002-of-00002/decode"]["inputs"]["hidden_states"] == "fp16 (1, 1, 64)"
    assert functions["model-00002-of-00002/decode"]["outputs"] == ["logits"]
    assert all(state.endswith("(1, 2, 64, 32)") for name, f in functions.items() for key, state in f["inputs"].items() if key.endswith("_cache"))
    assert facts["ane"]["neural_engine"] == "ready" and set(facts["ane"]["weight_files"]) == set(names)
    parity = report["checks"]["parity"]
    assert parity["passed"] and parity["top1_agreement"] >= 0.99 and parity["positions"] == 48
    assert "packages" in facts["io"]


def test_model_parts_keep_each_package_under_the_limit():
    from edgepack.targets.coreml import model_parts

    layers = [100] * 10
    assert model_parts(layers, 50, 50, limit=2000) == [(0, 10, 1050)]  # one package: the tied table once
    # split, the first part holds the table for the lookup and the last for the logits: two parts of 550 fit 600
    assert model_parts(layers, 50, 50, limit=600) == [(0, 5, 550), (5, 10, 550)]
    assert model_parts(layers, 50, 50, limit=450) == [(0, 3, 350), (3, 7, 400), (7, 10, 350)]
    assert [run[:2] for run in model_parts(layers, 50, 50, limit=10)] == [(i, i + 1) for i in range(10)]  # one layer a part at least
    assert [run[:2] for run in model_parts(layers, 50, 50, limit=2000, parts=4)] == [(0, 2), (2, 5), (5, 8), (8, 10)]
    assert len(model_parts(layers, 50, 50, limit=2000, parts=40)) == 10


def test_a_weight_file_above_the_ios_limit_is_blocking(llama_ane):
    from edgepack.targets.coreml_support import ane
    from edgepack.targets.coreml_support.mil_reference import load_functions

    out, _ = llama_ane
    functions = {name: program.function for name, program in load_functions(out / "model.mlpackage", ("prefill", "decode")).items()}
    fits = ane.report(functions, size_bytes=1, flexible_inputs=[], weight_files={"model.mlpackage": (1 << 30) - 1})
    assert fits["neural_engine"] == "ready"
    over = ane.report(functions, size_bytes=1, flexible_inputs=[], weight_files={"model.mlpackage": 3 << 30})
    finding = next(f for f in over["findings"] if f["id"] == "weight-file-size")
    assert over["neural_engine"] == "unlikely" and finding["severity"] == "blocking" and "--model-parts" in finding["detail"]
