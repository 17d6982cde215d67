"""`edgepack target qnn` on tiny models in the QNN HTP simulator (onnxruntime-qnn, Linux x86-64)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import read_json

SOC = ("--soc-model", "57", "--htp-arch", "75")  # Snapdragon 8 Gen 3 (SM8650), Hexagon v75
needs_qnn = pytest.mark.skipif(__import__("importlib").util.find_spec("onnxruntime_qnn") is None,
                               reason="onnxruntime-qnn is not installed")


@pytest.fixture(scope="module")
def llama_bundle(exported_tiny_factory, tmp_path_factory):
    from tests.conftest import run_cli

    out = tmp_path_factory.mktemp("qnn") / "llama"
    result = run_cli("target", "qnn", exported_tiny_factory("llama"), "-o", out, *SOC, "--max-context", "64", "--prefill-len", "8")
    return out, result


@pytest.fixture(scope="module")
def llama_bundle_per_graph(exported_tiny_factory, tmp_path_factory):
    """The same build with one context binary per graph: the x86-64 simulator loads these, not a shared one."""
    from tests.conftest import run_cli

    out = tmp_path_factory.mktemp("qnn") / "llama-per-graph"
    result = run_cli("target", "qnn", exported_tiny_factory("llama"), "-o", out, *SOC, "--max-context", "64", "--prefill-len", "8",
                     "--no-share-weights")
    return out, result


@needs_qnn
def test_prefill_and_decode_share_one_context_binary(llama_bundle, llama_bundle_per_graph):
    from edgepack.errors import NotOnThisHostError
    from edgepack.targets.qnn_support import ep

    (out, result), (alone, alone_result) = llama_bundle, llama_bundle_per_graph
    assert result.exit_code == 0 and alone_result.exit_code == 0, result.stderr + alone_result.stderr
    report, per_graph = read_json(out / "target.json"), read_json(alone / "target.json")
    facts = report["facts"]
    assert facts["weights_shared_between_graphs"] is True and per_graph["facts"]["weights_shared_between_graphs"] is False
    binaries = sorted(p.name for p in out.glob("*.bin"))
    assert len(binaries) == 1
    for graph in ("prefill", "decode"):  # both EP context models read the one binary
        assert ep.context_binaries(out / f"{graph}_ctx.onnx") == binaries
        assert facts["graphs"][graph]["context_binaries"] == binaries
    assert facts["context_binary_bytes"] == (out / binaries[0]).stat().st_size
    memory = facts["memory_mb"]  # each step's peak and held RSS, so the step that sets a build's peak is known
    assert {"static_graphs", "reference", "calibrate", "quantize_and_compile", "evaluate_on_htp"} <= set(memory)
    assert all(0 < step["held_after"] <= step["peak"] for step in memory.values())
    # Weights stored once: the shared binary is well under the two per-graph binaries together.
    alone_bytes = sum(p.stat().st_size for p in alone.glob("*.bin"))
    assert len(list(alone.glob("*.bin"))) == 2 and per_graph["facts"]["context_binary_bytes"] == alone_bytes
    assert facts["context_binary_bytes"] < 0.75 * alone_bytes
    # The same QDQ graphs were checked in the simulator: the same parity as the per-graph build.
    assert report["checks"]["parity_vs_fp32"]["max_abs_logit_diff"] == per_graph["checks"]["parity_vs_fp32"]["max_abs_logit_diff"]
    assert report["checks"]["parity_vs_fp32"]["top1_agreement"] == 1.0
    config = read_json(out / "qnn_config.json")
    assert config["weights_shared_between_graphs"] is True and config["session_config"] == {"ep.share_ep_contexts": "1"}
    assert read_json(alone / "qnn_config.json")["session_config"] == {}
    # The simulator cannot load a weight-shared binary: a clear "not on this host", never a crash.
    with pytest.raises(NotOnThisHostError, match="device only"):
        ep.load_context(out / "prefill_ctx.onnx", ep.HtpOptions(soc_model=57, htp_arch=75), share=True)


@needs_qnn
def test_context_binaries_do_not_depend_on_the_build_folder(llama_bundle, llama_bundle_per_graph, exported_tiny_factory, tmp_path, cli):
    # The graphs compile from their files (external data mapped, not copied); onnxruntime names a context graph
    # after the model path it was given, which must not be the temporary build folder's.
    import hashlib

    # Per-graph binaries (--no-share-weights) are compared by their context models only: two builds of the same
    # single graph give different binaries (so did compiling from bytes, before graphs compiled from their files).
    for first, extra, suffixes in ((llama_bundle[0], (), ("_ctx.onnx", ".bin")),
                                   (llama_bundle_per_graph[0], ("--no-share-weights",), ("_ctx.onnx",))):
        again = tmp_path / "elsewhere" / first.name
        result = cli("target", "qnn", exported_tiny_factory("llama"), "-o", again, *SOC, "--max-context", "64", "--prefill-len", "8", *extra)
        assert result.exit_code == 0, result.stderr
        names = sorted(p.name for p in first.iterdir() if p.name.endswith(suffixes))
        assert names and names == sorted(p.name for p in again.iterdir() if p.name.endswith(suffixes))
        differ = [name for name in names if hashlib.sha256((first / name).read_bytes()).digest() != hashlib.sha256((again / name).read_bytes()).digest()]
        assert not differ, (extra, differ)


@needs_qnn
def test_llama_context_binaries_all_on_htp_and_parity(llama_bundle):
    out, result = llama_bundle
    assert result.exit_code == 0, result.stderr
    report = read_json(out / "target.json")
    assert report["target"] == "qnn" and report["passed"] is True
    for graph in ("prefill", "decode"):
        assert (out / f"{graph}_ctx.onnx").is_file()
        assert (out / f"host_{graph}.onnx").is_file()
    facts = report["facts"]
    assert facts["nodes_total"] > 0 and facts["nodes_on_htp"] == facts["nodes_total"]
    assert report["checks"]["all_nodes_on_htp"]["cpu_fallback"] == "disabled"
    assert report["checks"]["context_binary_reload"]["identical"] is True
    assert report["checks"]["static_graphs_vs_export"]["max_abs_diff"] <= 1e-3
    parity = report["checks"]["parity_vs_fp32"]
    assert parity["positions"] == 2 * (8 + 4) and parity["decode"]["positions"] == 8
    # the attention-sink prefix: BOS keys/values at position 0, computed in fp32 and shipped
    config = read_json(out / "qnn_config.json")
    prefix = config["prefix"]
    assert prefix["token_ids"] == report["facts"]["attention_sink_prefix"]["token_ids"] and len(prefix["token_ids"]) == 1
    arrays = np.load(out / prefix["kv_file"])
    assert sorted(prefix["kv_names"].values()) == sorted(n for n in config["graphs"]["decode"]["npu_inputs"]
                                                         if n.startswith("past_key_values"))
    for key, name in prefix["kv_names"].items():
        cache_shape = config["graphs"]["decode"]["npu_inputs"][name]
        assert arrays[key].shape == (1, cache_shape[1], 1, cache_shape[3]) and np.abs(arrays[key]).max() > 0
    assert parity["top1_agreement"] == 1.0
    low, high = parity["top1_ci95"]  # 24 of 24: the Wilson interval of a perfect score still admits misses
    assert 0.85 < low < 0.87 and high == 1.0 and 0 <= parity["near_tie_positions"] <= 24
    assert parity["decode"]["top1_ci95"][0] < low  # fewer positions, wider interval
    assert parity["gate"] == {"min_top1": 0.5}  # the default floor: noise can never pass silently
    # w8a16, asymmetric activations, rescue 8, margin 0.25: 0.044 measured (symmetric activations: 0.064)
    assert parity["max_abs_logit_diff"] <= 0.05
    assert report["facts"]["quantization"]["prefill"]["activation_symmetric"] is False
    assert report["versions"]["qnn_sdk"] and report["versions"]["onnxruntime_qnn"]
    assert facts["soc_model"] == 57 and facts["htp_arch"] == 75
    assert len(facts["rescue"]["kept_16bit"]) == 8 and facts["rescue"]["sensitivity_top"]
    config = read_json(out / "qnn_config.json")
    assert config["graphs"]["decode"]["npu_inputs"]["input_ids"] == [1, 1]
    assert config["graphs"]["prefill"]["past_len"] == 56


@needs_qnn
def test_context_binary_reloads_from_the_bundle(llama_bundle_per_graph):
    from edgepack.targets.qnn_support import ep
    from edgepack.targets.qnn_support.static_model import GraphSpec, StaticDecoder

    out, result = llama_bundle_per_graph
    assert result.exit_code == 0, result.stderr
    config = read_json(out / "qnn_config.json")
    options = ep.HtpOptions(soc_model=57, htp_arch=75)
    sessions, specs = {}, []
    for name, graph in config["graphs"].items():
        sessions[name], seconds = ep.load_context(out / graph["context_model"], options)
        assert seconds < 5
        specs.append(GraphSpec(name, out / graph["context_model"], out / graph["host_prep"], graph["host_inputs"],
                               [n for n in graph["npu_inputs"] if n != "input_ids" and not n.startswith("past_key_values")],
                               graph["seq_len"], graph["past_len"]))
    model = StaticDecoder(specs, sessions, config["max_context"])
    # Greedy generation through prefill + decode on the HTP: deterministic and in the vocabulary.
    cache, tokens = model.empty_cache(), [5, 17, 42]
    logits, cache = model.run("prefill", tokens, cache, 0)
    position, generated = len(tokens), []
    for _ in range(3):
        token = int(np.argmax(logits[-1]))
        generated.append(token)
        logits, cache = model.run("decode", [token], cache, position)
        position += 1
    assert all(0 <= t < 512 for t in generated)


@needs_qnn
def test_bert_encoder(exported_tiny_factory, tmp_path, cli):
    out = tmp_path / "bert"
    result = cli("target", "qnn", exported_tiny_factory("bert"), "-o", out, *SOC, "--max-context", "32")
    assert result.exit_code == 0, result.stderr
    report = read_json(out / "target.json")
    assert (out / "encoder_ctx.onnx").is_file() and list(out.glob("encoder_ctx*.bin"))
    assert report["facts"]["nodes_on_htp"] == report["facts"]["nodes_total"] > 0
    parity = report["checks"]["parity_vs_fp32"]
    assert parity["cosine_min"] >= 0.999 and parity["max_abs_diff"] < 0.05


def test_soc_is_required(exported_tiny_factory, tmp_path, cli):
    result = cli("target", "qnn", exported_tiny_factory("llama"), "-o", tmp_path / "x")
    assert result.exit_code == 2
    assert len(result.stderr_lines) == 1 and "--soc-model" in result.stderr


def test_device_without_qnn_soc_is_a_usage_error(exported_tiny_factory, tmp_path, cli):
    result = cli("target", "qnn", exported_tiny_factory("llama"), "-o", tmp_path / "x", "--device", "pixel-8")
    assert result.exit_code == 2
    assert len(result.stderr_lines) == 1 and "soc_model" in result.stderr


def test_calibration_set_too_small(exported_tiny_factory, tmp_path, cli):
    result = cli("target", "qnn", exported_tiny_factory("llama"), "-o", tmp_path / "x", *SOC, "--calibration-samples", "1")
    assert result.exit_code == 2 and result.stderr_lines == [
        "error: --calibration-samples 1: at least 2 windows are needed for activation ranges that hold on other text"]
    short = tmp_path / "short.txt"
    short.write_text("The capital of France is Paris.")
    result = cli("target", "qnn", exported_tiny_factory("llama"), "-o", tmp_path / "y", *SOC, "--calibration-text", short)
    assert result.exit_code == 3 and "calibration set too small" in result.stderr
    assert len(result.stderr_lines) == 1


def test_missing_onnxruntime_qnn_is_exit_4(exported_tiny_factory, tmp_path, cli, monkeypatch):
    import edgepack.targets.qnn_support.ep as ep
    from edgepack.errors import NotOnThisHostError

    def missing():
        raise NotOnThisHostError("onnxruntime-qnn is not installed: `pip install onnxruntime-qnn==2.7.0`")

    monkeypatch.setattr(ep, "qnn_versions", missing)
    result = cli("target", "qnn", exported_tiny_factory("llama"), "-o", tmp_path / "x", *SOC)
    assert result.exit_code == 4 and "onnxruntime-qnn" in result.stderr
    assert not (tmp_path / "x").exists()


def test_dynamic_dimension_left_is_a_clear_error(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from edgepack.errors import BadInputError
    from edgepack.targets.qnn_support.graph import fix_dims

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch_size", "mystery"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch_size", "mystery"])])
    model = helper.make_model(graph)
    with pytest.raises(BadInputError, match="dynamic dimension.*mystery"):
        fix_dims(model, {"batch_size": 1})
    assert isinstance(model, onnx.ModelProto)


def _rms_norm_graph(hidden: int, positions: int, eps: float = 1e-5):
    """optimum's RMSNorm: x / sqrt(mean(x^2) + eps) * gamma, on an input x [1, positions, hidden]."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array(2.0, np.float32), "two"), numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array(np.array(eps, np.float32), "eps"),
             numpy_helper.from_array(np.linspace(0.5, 1.5, hidden).astype(np.float32), "gamma")]
    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"], name="/norm/Pow"),
             helper.make_node("ReduceMean", ["sq", "axes"], ["mean"], name="/norm/ReduceMean", keepdims=1),
             helper.make_node("Add", ["mean", "eps"], ["var"], name="/norm/Add"),
             helper.make_node("Sqrt", ["var"], ["rms"], name="/norm/Sqrt"),
             helper.make_node("Div", ["x", "rms"], ["normed"], name="/norm/Div"),
             helper.make_node("Mul", ["gamma", "normed"], ["y"], name="/norm/Mul")]
    graph = helper.make_graph(nodes, "rms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, positions, hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, positions, hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def _all_tensors(model, x):
    """Every intermediate tensor's values, by running the model with each one made a graph output."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = [o for n in probe.graph.node for o in n.output]
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(None, {"x": x})))


def test_scale_free_rms_norm_is_exact_and_keeps_every_tensor_in_range():
    """A massive activation (25,000 on one position, as SmolLM2's first token) puts x^2 at 6e8: no 16-bit scale
    holds that and the ordinary positions' x^2 of ~1 at once. The rewrite computes the same norm with no
    tensor beyond the normalised output's own range."""
    from edgepack.targets.qnn_support.graph import scale_free_rms_norms

    hidden, positions = 64, 6
    x = np.random.default_rng(0).standard_normal((1, positions, hidden)).astype(np.float32)
    x[0, 0, 3] = 25_000.0
    model = _rms_norm_graph(hidden, positions)
    before = _all_tensors(model, x)
    assert before["sq"].max() > 6e8
    assert scale_free_rms_norms(model) == 1
    after = _all_tensors(model, x)
    np.testing.assert_allclose(after["y"], before["y"], rtol=1e-5, atol=1e-5)
    # Beyond |x| and its max, no tensor of the rewritten norm exceeds the normalised vector's own bound
    # (sqrt(hidden) = 8, reached by the one-hot massive position), where before x^2 reached 6e8.
    widest = {name: float(np.abs(v).max()) for name, v in after.items() if "abs" not in name and "max" not in name}
    assert max(widest.values()) <= max(float(np.abs(before["normed"]).max()), float(np.abs(before["y"]).max())) + 1e-3, widest


@needs_qnn
def test_context_binary_on_a_full_disk_is_an_output_error(tmp_path):
    """The EP writing `<name>_ctx_qnn.bin` into a full disk (/dev/full: every write is ENOSPC) is not the model's fault."""
    import os

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgepack.errors import UsageError
    from edgepack.targets.qnn_support.ep import HtpOptions, compile_on_htp

    weight = numpy_helper.from_array(np.arange(256, dtype=np.float32).reshape(16, 16) / 256, "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], [weight])
    model = tmp_path / "matmul.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    options = HtpOptions(soc_model=57, htp_arch=75, fp16=True)
    (tmp_path / "ok").mkdir()
    compile_on_htp(model, options, tmp_path / "ok" / "matmul_ctx.onnx")
    assert (tmp_path / "ok" / "matmul_ctx_qnn.bin").is_file()  # the same model compiles where the disk has room

    full = tmp_path / "full"
    full.mkdir()
    os.symlink("/dev/full", full / "matmul_ctx_qnn.bin")
    with pytest.raises(UsageError, match=r"cannot write .*full/matmul_ctx\.onnx .*Failed to write context cache file"):
        compile_on_htp(model, options, full / "matmul_ctx.onnx")


def test_static_graphs_read_the_weights_once_and_calibrate_like_onnxruntime(exported_tiny_factory, tmp_path):
    """An export with external data: both static graphs read one folded data file, their CPU sessions share it, and
    the weightless calibration gives onnxruntime's MinMax ranges."""
    import onnx
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    from edgepack.runtime.session import create_session
    from edgepack.targets.qnn_support import quant
    from edgepack.targets.qnn_support.static_model import StaticDecoder, _external, cpu_sessions, prepare_graphs

    export = tmp_path / "export"
    export.mkdir()
    model = onnx.load(str(exported_tiny_factory("llama") / "model.onnx"))
    onnx.save_model(model, str(export / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx_data", size_threshold=1024)
    work = tmp_path / "work"
    work.mkdir()
    specs = prepare_graphs(export / "model.onnx", True, prefill_len=8, max_context=32, work=work)
    locations = {name: {loc for loc, _, _ in _external(onnx.load(str(s.npu_path), load_external_data=False)).values()}
                 for name, s in ((s.name, s) for s in specs)}
    assert locations == {"prefill": {"prefill.folded.onnx.data"}, "decode": {"prefill.folded.onnx.data"}}
    assert not (work / "decode.folded.onnx.data").exists()
    shared = cpu_sessions(specs)
    plain = {s.name: create_session(s.npu_path) for s in specs}
    feeds = StaticDecoder(specs, shared, 32).calibration_feeds([[5, 17, 42, 7, 9, 11, 13, 15, 3, 4]], 2)
    for name in ("prefill", "decode"):
        for feed in feeds[name]:
            for a, b in zip(shared[name].run(None, feed), plain[name].run(None, feed)):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    mine = quant.calibrate(specs[0].npu_path, feeds["prefill"], work)
    calibrator = create_calibrator(str(specs[0].npu_path), None, augmented_model_path=str(work / "aug.onnx"),
                                   calibrate_method=CalibrationMethod.MinMax)
    calibrator.collect_data(quant._Reader(feeds["prefill"]))
    theirs = calibrator.compute_data()
    assert set(mine.data) == set(theirs.data)
    for name, data in theirs.data.items():
        assert np.allclose([np.min(v) for v in mine.data[name].range_value], [np.min(v) for v in data.range_value], atol=1e-6)
