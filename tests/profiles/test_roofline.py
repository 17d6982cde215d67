"""Projection arithmetic against hand-computed cases, and bytes-per-token rules on hand-built graphs."""

from __future__ import annotations

import pytest

from edgepack.profiles.devices import load_devices
from edgepack.profiles.model_facts import ModelFacts, model_facts
from edgepack.profiles.roofline import (
    DeviceModel,
    effective_bandwidth,
    interpolate_log,
    memory_fit,
    project_decode,
    project_energy,
    project_prefill,
)


def _facts(**overrides) -> ModelFacts:
    base = dict(
        onnx_path="m.onnx", file_bytes=101_000_000, initializer_bytes=100_000_000, weight_bytes_per_token=100_000_000,
        bytes_per_token_by_format={"fp32": 100_000_000}, kv_bytes_per_position=1_000, kv_layers=2,
        linear_flops_per_token=50_000_000, attention_flops_per_position=1_000, nodes=1_000, max_context=2048,
    )
    base.update(overrides)
    return ModelFacts(**base)


DEVICE = DeviceModel(
    id="hand", bandwidth_gb_s=10.0, decode_efficiency={"fp32": 0.5, "int8": 0.4, "int4": 0.25}, prefill_efficiency=0.5,
    cpu_fp32_gflops=100.0, cpu_int8_gops=400.0, dispatch_us_per_node=1.0, sustained_w=5.0, idle_w=1.0,
    dram_pj_per_byte=30.0, app_memory_limit_mb=150.0, overhead_mb=20.0,
)


def test_decode_is_bytes_over_effective_bandwidth_plus_dispatch():
    # 100 MB / (10 GB/s x 0.5) = 20 ms; 1000 nodes x 1 us = 1 ms
    p = project_decode(_facts(), DEVICE, position=0)
    assert p["memory_ms"] == pytest.approx(20.0)
    assert p["dispatch_ms"] == pytest.approx(1.0)
    assert p["ms"] == pytest.approx(21.0)
    # at position 1000 the KV cache adds 1000 x 1000 B = 1 MB at the fp32 rate: +0.2 ms
    p = project_decode(_facts(), DEVICE, position=1000)
    assert p["ms"] == pytest.approx(21.2)
    assert p["bytes"] == 101_000_000


def test_decode_mixed_formats_use_their_own_efficiency():
    facts = _facts(weight_bytes_per_token=60_000_000, bytes_per_token_by_format={"int4": 50_000_000, "int8": 10_000_000}, nodes=0)
    # int4: 50 MB / 2.5 GB/s = 20 ms; int8: 10 MB / 4 GB/s = 2.5 ms
    assert project_decode(facts, DEVICE, 0)["ms"] == pytest.approx(22.5)


def test_each_weight_matrix_adds_its_calibrated_fixed_cost():
    import dataclasses

    facts = _facts(weight_bytes_per_token=60_000_000, bytes_per_token_by_format={"int4": 50_000_000, "int8": 10_000_000},
                   nodes=0, weights_by_format={"int4": 200, "int8": 1, "fp16": 3})
    device = dataclasses.replace(DEVICE, weight_overhead_us={"int4": 12.5, "int8": 40.0, "fp32": 5.0})
    # 22.5 ms of bytes (previous test) + 200 x 12.5 us + 1 x 40 us + 3 x 5 us (fp16 takes fp32's) = 22.5 + 2.555 ms
    p = project_decode(facts, device, 0)
    assert p["weight_overhead_ms"] == pytest.approx(2.555)
    assert p["ms"] == pytest.approx(25.055)
    assert project_prefill(facts, device, 1)["dispatch_ms"] == pytest.approx(2.555)
    assert project_decode(facts, DEVICE, 0)["weight_overhead_ms"] == 0  # uncalibrated profiles: no such term


def test_two_4bit_planes_of_an_8bit_weight_count_as_one_int8_weight(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k, n = 64, 32
    b = numpy_helper.from_array(np.zeros((n, k // 32, 16), np.uint8), "b")
    s = numpy_helper.from_array(np.ones((n, k // 32), np.float32), "s")
    nodes = [
        helper.make_node("MatMulNBits", ["x", "b", "s"], ["lo"], name="w_lo", domain="com.microsoft", K=k, N=n, bits=4, block_size=32),
        helper.make_node("MatMulNBits", ["x", "b", "s"], ["hi"], name="w_hi", domain="com.microsoft", K=k, N=n, bits=4, block_size=32),
        helper.make_node("Add", ["lo", "hi"], ["y"]),
        helper.make_node("MatMulNBits", ["y", "b", "s"], ["z"], name="w4", domain="com.microsoft", K=k, N=n, bits=4, block_size=32),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, n])], [b, s])
    path = tmp_path / "planes.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]), str(path))
    facts = model_facts(path, {})
    assert facts.weights_by_format == {"int4": 1, "int8": 1}


def test_prefill_is_the_larger_of_compute_and_memory():
    facts = _facts()
    # 128 tokens: 128 x 50 MFLOP + 1000 x 128 x 129 / 2 = 6.4 GFLOP + 8.256 MFLOP
    flops = 128 * 50_000_000 + 1_000 * 128 * 129 // 2
    p = project_prefill(facts, DEVICE, 128)
    assert p["flops"] == flops
    assert p["compute_ms"] == pytest.approx(flops / (100e9 * 0.5) * 1e3)  # 128.165 ms
    assert p["memory_ms"] == pytest.approx(20.0)
    assert p["bound"] == "compute"
    assert p["ms"] == pytest.approx(p["compute_ms"] + 1.0)
    # a 1-token prompt is memory bound: reading the weights once dominates
    assert project_prefill(facts, DEVICE, 1)["bound"] == "memory"


def test_prefill_uses_int8_compute_for_weight_quantized_models():
    facts = _facts(bytes_per_token_by_format={"int4": 90_000_000, "fp32": 10_000_000})
    p = project_prefill(facts, DEVICE, 64)
    assert p["peak_key"] == "cpu_int8_gops" and p["peak_gflops"] == 400.0


def test_energy_is_power_times_time_with_a_dram_floor():
    e = project_energy(21.0, 100_000_000, DEVICE)
    assert e["mj"] == pytest.approx(105.0)  # 5 W x 21 ms
    assert e["dram_floor_mj"] == pytest.approx(3.0)  # 1e8 B x 30 pJ


def test_memory_fit():
    fit = memory_fit(_facts(), DEVICE, context=2048)
    # 100 MB weights + 2.048 MB KV + 20 MB overhead = 122.048 MB <= 150 MB
    assert fit["total_mb"] == pytest.approx(122.048)
    assert fit["fits"] is True and fit["headroom_mb"] == pytest.approx(27.952)
    assert memory_fit(_facts(initializer_bytes=200_000_000), DEVICE, 2048)["fits"] is False


def test_calibrated_curve_is_interpolated_in_log_size():
    assert interpolate_log([10, 1000], [20.0, 10.0], 100) == pytest.approx(15.0)
    assert interpolate_log([10, 1000], [20.0, 10.0], 1) == 20.0  # clamped
    assert interpolate_log([10, 1000], [20.0, 10.0], 10_000) == 10.0
    device = DeviceModel(id="cal", bandwidth_gb_s=20.0, decode_efficiency={"fp32": 0.9},
                         bandwidth_curves={"fp32": ([10.0, 1000.0], [20.0, 10.0])})
    rate, eff, how = effective_bandwidth(device, "fp32", 100e6)
    assert rate == pytest.approx(15.0) and eff == pytest.approx(0.75) and "calibrated" in how
    # a format without a curve falls back to bandwidth x efficiency
    rate, eff, how = effective_bandwidth(device, "int8", 100e6)
    assert rate == pytest.approx(18.0) and "decode_bandwidth_fp32" in how


def test_device_model_from_the_database():
    model = DeviceModel.from_device(load_devices()["pixel-8"])
    assert model.bandwidth_gb_s == pytest.approx(68.3)
    assert set(model.decode_efficiency) == {"fp32", "int8", "int4"}
    assert model.app_memory_limit_mb and model.sustained_w and model.dispatch_us_per_node > 0


# --- bytes per token from a graph -------------------------------------------------------------------------


def _graph_model(tmp_path, tied: bool, quantized: bool = False):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    vocab, hidden = 100, 8
    embed = numpy_helper.from_array(np.zeros((vocab, hidden), np.float32), "embed")  # 3200 B, 32 B per row
    w = numpy_helper.from_array(np.zeros((hidden, hidden), np.float32), "w")  # 256 B
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["h0"], axis=0)]
    inits = [embed]
    if quantized:
        q = numpy_helper.from_array(np.zeros((hidden, 1, 4), np.uint8), "wq")  # 32 B (int4: 8 values x 4 bits per row)
        s = numpy_helper.from_array(np.zeros((hidden,), np.float32), "ws")  # 32 B
        nodes.append(helper.make_node("MatMulNBits", ["h0", "wq", "ws"], ["h1"], domain="com.microsoft", K=hidden, N=hidden, bits=4, block_size=8))
        inits += [q, s]
    else:
        nodes.append(helper.make_node("MatMul", ["h0", "w"], ["h1"]))
        inits.append(w)
    if tied:
        nodes.append(helper.make_node("Transpose", ["embed"], ["embed_t"], perm=[1, 0]))
        nodes.append(helper.make_node("MatMul", ["h1", "embed_t"], ["logits"]))
    else:
        head = numpy_helper.from_array(np.zeros((hidden, vocab), np.float32), "head")
        inits.append(head)
        nodes.append(helper.make_node("MatMul", ["h1", "head"], ["logits"]))
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "s"])]
    for layer in range(2):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{layer}.{kind}", TensorProto.FLOAT, [1, 2, "p", 4]))
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "s", vocab])], inits)
    path = tmp_path / ("tied.onnx" if tied else "untied.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]), str(path))
    return path


def test_untied_embedding_reads_one_row(tmp_path):
    facts = model_facts(_graph_model(tmp_path, tied=False), {"num_attention_heads": 4})
    # embedding: 3200 B / 100 rows = 32 B; w 256 B; head 3200 B
    assert facts.weight_bytes_per_token == 32 + 256 + 3200
    assert facts.gathered_bytes_per_token == 32
    assert facts.initializer_bytes == 3200 + 256 + 3200
    # KV: 2 layers x (K + V) x 2 heads x 4 dims x 4 B = 128 B per position
    assert facts.kv_bytes_per_position == 128 and facts.kv_layers == 2
    # MACs: 8x8 + 8x100 = 864 -> 1728 FLOPs
    assert facts.linear_flops_per_token == 2 * (64 + 800)
    # attention: 2 x 2 x (4 query heads x 4 dims) x 2 layers per position
    assert facts.attention_flops_per_position == 2 * 2 * 16 * 2
    assert facts.nodes == 3


def test_tied_embedding_is_read_in_full_once(tmp_path):
    facts = model_facts(_graph_model(tmp_path, tied=True), {})
    assert facts.weight_bytes_per_token == 3200 + 256  # the lm_head reads every row; the gather adds nothing
    assert facts.gathered_bytes_per_token == 0
    assert facts.linear_flops_per_token == 2 * (64 + 800)  # MatMul through Transpose(embed) is found
    assert facts.nodes == 3  # Transpose(embed) reads only an initializer: onnxruntime folds it, it never runs


def test_matmulnbits_bytes_are_int4(tmp_path):
    facts = model_facts(_graph_model(tmp_path, tied=False, quantized=True), {})
    assert facts.bytes_per_token_by_format == {"fp32": 32 + 3200, "int4": 64}
    assert facts.linear_flops_per_token == 2 * (64 + 800)


def test_exported_tiny_llama_facts(exported_tiny_factory):
    import json

    folder = exported_tiny_factory("llama")
    config = json.loads((folder / "config.json").read_text())
    facts = model_facts(folder / "model.onnx", config)
    # tiny llama: 2 layers, 2 KV heads x 16 dims, fp32: 2 x 2 x 2 x 16 x 4 = 512 B per position
    assert facts.kv_bytes_per_position == 512
    # untied embedding (512 x 64 fp32): one 256-byte row per token
    assert facts.gathered_bytes_per_token == 256
    assert facts.weight_bytes_per_token < facts.initializer_bytes
    assert facts.max_context == 256 and facts.nodes > 0
