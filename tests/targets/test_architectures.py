"""Every decoder architecture of edgepack/targets/architectures.py on the NPU targets, on tiny random models.

The tiny configs (tests/tiny_models.py) set each family's departures from Llama away from their neutral
values (granite's multipliers, gemma2's softcaps and query_pre_attn_scalar), so a target that dropped one
would fail parity. llama itself is covered by test_coreml.py / test_qnn.py.
"""

from __future__ import annotations

import importlib.util

import pytest

from edgepack.targets.architectures import DECODER_TYPES
from tests.conftest import read_json

OTHER_DECODERS = tuple(a for a in DECODER_TYPES if a != "llama")
SOC = ("--soc-model", "57", "--htp-arch", "75")
needs_qnn = pytest.mark.skipif(importlib.util.find_spec("onnxruntime_qnn") is None, reason="onnxruntime-qnn is not installed")
needs_coreml = pytest.mark.skipif(importlib.util.find_spec("coremltools") is None, reason="coremltools is not installed")


def _causal_mask(q_len: int, end: int):
    import torch

    mask = torch.full((q_len, end), float("-inf"))
    for row in range(q_len):
        mask[row, : end - q_len + row + 1] = 0.0
    return mask.view(1, 1, q_len, end)


@pytest.mark.parametrize(("arch", "config"), [(arch, {}) for arch in DECODER_TYPES] + [("phi3", {"partial_rotary_factor": 0.5})])
def test_core_ml_wrapper_computes_what_transformers_computes(tiny_model_factory, arch, config):
    """The traced forward (prefill, then decode steps through the stateful cache) against the model's own forward."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgepack.targets.coreml_support.wrappers import StatefulDecoder

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_factory(arch, **config)), attn_implementation="eager").eval()
    ids = torch.tensor([[5, 17, 99, 23, 301, 7, 44, 12, 9, 100]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    wrapper = StatefulDecoder(model, 16).eval()
    if "partial_rotary_factor" in config:  # RoPE on part of each head, the rest passed through
        assert wrapper.rotary_dim == int(wrapper.head_dim * config["partial_rotary_factor"]) < wrapper.head_dim
    prefill = 7
    rows = [wrapper(ids[:, :prefill].int(), _causal_mask(prefill, prefill))]
    for end in range(prefill + 1, ids.shape[1] + 1):
        rows.append(wrapper(ids[:, end - 1 : end].int(), _causal_mask(1, end)))
    got = torch.cat(rows, dim=1)
    assert float((got - expected).abs().max()) < 1e-4 * max(1.0, float(expected.abs().max()))


@pytest.mark.slow
@needs_coreml
@pytest.mark.parametrize("arch", OTHER_DECODERS)
def test_coreml_builds_and_matches_pytorch(cli, tiny_model_factory, tmp_path, arch):
    out = tmp_path / arch
    result = cli("target", "coreml", tiny_model_factory(arch), "-o", out, "--max-context", "32", "--eval-positions", "8")
    assert result.exit_code == 0, result.stderr
    report = read_json(out / "target.json")
    assert report["passed"] is True and report["facts"]["model_type"] == arch and report["facts"]["kind"] == "decoder"
    parity = report["checks"]["parity"]
    assert parity["passed"] is True
    if arch == "gemma2":  # window 128 > context 32: inactive, and said so
        assert report["facts"]["architecture"]["sliding_window"]["active"] is False


@pytest.mark.slow
@needs_qnn
@pytest.mark.parametrize("arch", OTHER_DECODERS)
def test_qnn_builds_and_matches_the_export(cli, exported_tiny_factory, tmp_path, arch):
    out = tmp_path / arch
    result = cli("target", "qnn", exported_tiny_factory(arch), "-o", out, *SOC, "--max-context", "32", "--prefill-len", "8",
                 "--eval-windows", "1", "--decode-steps", "2", "--calibration-samples", "2", "--rescue", "0")
    assert result.exit_code == 0, result.stderr
    report = read_json(out / "target.json")
    assert report["passed"] is True
    assert report["checks"]["static_graphs_vs_export"]["passed"] is True  # the fp32 static graphs compute what the export does
    assert report["checks"]["parity_vs_fp32"]["passed"] is True


@needs_qnn
def test_static_graphs_take_real_positions_without_position_ids(exported_tiny_factory, tmp_path):
    """gemma's export has no position_ids (positions = past length + i); the static cache puts new tokens in slots
    after the whole past, so the rotary embedding must get the real positions as an input, decode steps included."""
    import numpy as np
    import onnx

    from edgepack.runtime.model_dir import load_model_dir
    from edgepack.runtime.session import create_session
    from edgepack.targets import qnn
    from edgepack.targets.qnn_support.static_model import StaticDecoder, prepare_graphs

    export = exported_tiny_factory("gemma2")
    assert "position_ids" not in {i.name for i in onnx.load(str(export / "model.onnx"), load_external_data=False).graph.input}
    specs = prepare_graphs(export / "model.onnx", True, prefill_len=8, max_context=32, work=tmp_path)
    assert all("position_ids" in spec.host_inputs for spec in specs)
    static = StaticDecoder(specs, {s.name: create_session(s.npu_path) for s in specs}, 32)
    window = [5, 17, 99, 23, 301, 7, 44, 12, 9, 100, 200, 300]
    static.make_prefix([0])
    expected = qnn._reference_decoder(load_model_dir(export), [window], [0])[0]
    assert np.abs(static.teacher_forced(window, 4) - expected).max() < 1e-3


def test_empty_concat_inputs_are_dropped():
    """phi3's full-width rotary concatenates an empty pass-through slice: gone, with the Slice feeding it."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgepack.targets.qnn_support.graph import drop_empty_concat_inputs

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])
    inits = [numpy_helper.from_array(np.array(v, dtype=np.int64), n) for n, v in
             (("start", [8]), ("stop", [9223372036854775807]), ("axis", [-1]))]
    nodes = [helper.make_node("Neg", ["x"], ["rot"]),
             helper.make_node("Slice", ["x", "start", "stop", "axis"], ["rest"]),
             helper.make_node("Concat", ["rot", "rest"], ["y"], axis=-1)]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 18)])
    assert drop_empty_concat_inputs(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Neg", "Concat"] and list(model.graph.node[1].input) == ["rot"]
    assert not model.graph.initializer
    onnx.checker.check_model(model)


@needs_qnn
def test_qnn_refuses_other_decoders_naming_the_supported_ones(cli, exported_tiny_factory, tmp_path):
    result = cli("target", "qnn", exported_tiny_factory("gpt2"), "-o", tmp_path / "g", *SOC)
    assert result.exit_code == 3 and len(result.stderr_lines) == 1
    assert "'gpt2'" in result.stderr and ", ".join(DECODER_TYPES) in result.stderr
    assert not (tmp_path / "g").exists()


@needs_coreml
def test_coreml_refuses_other_decoders_naming_the_supported_ones(cli, tiny_model_factory, tmp_path):
    result = cli("target", "coreml", tiny_model_factory("gpt2"), "-o", tmp_path / "g")
    assert result.exit_code == 3 and len(result.stderr_lines) == 1
    assert "'gpt2'" in result.stderr and ", ".join(DECODER_TYPES) in result.stderr


@needs_coreml
@needs_qnn
def test_context_above_the_sliding_window_is_refused(cli, tiny_model_factory, exported_tiny_factory, tmp_path):
    """Both targets build full causal attention: it matches a sliding-window model only up to the window (128 here)."""
    coreml = cli("target", "coreml", tiny_model_factory("gemma2"), "-o", tmp_path / "c", "--max-context", "200")
    assert coreml.exit_code == 3 and len(coreml.stderr_lines) == 1 and "sliding window (128)" in coreml.stderr
    qnn = cli("target", "qnn", exported_tiny_factory("gemma2"), "-o", tmp_path / "q", *SOC, "--max-context", "200")
    assert qnn.exit_code == 3 and len(qnn.stderr_lines) == 1 and "sliding window (128)" in qnn.stderr
    assert not (tmp_path / "c").exists() and not (tmp_path / "q").exists()


def test_sliding_window_reading():
    from edgepack.targets.architectures import check_decoder, sliding_window

    assert sliding_window({"model_type": "mistral", "sliding_window": 4096}) == 4096
    assert sliding_window({"model_type": "mistral", "sliding_window": None}) is None
    assert sliding_window({"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False}) is None
    assert sliding_window({"model_type": "qwen2", "sliding_window": 4096, "layer_types": ["full_attention"] * 2}) is None
    assert sliding_window({"model_type": "gemma2", "sliding_window": 4096, "layer_types": ["sliding_attention", "full_attention"]}) == 4096
    assert check_decoder({"model_type": "phi3", "sliding_window": 2047}, 2047, "qnn")["sliding_window"]["active"] is False
    assert check_decoder({"model_type": "llama"}, 4096, "qnn") == {"sliding_window": None}
