"""`edgepack estimate`: shapes from a config or GGUF header, costs per target, projections per compute unit, `check`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgepack.profiles.architecture import GGML_TYPES, from_config, read_architecture
from edgepack.profiles.costs import facts_for, target_layout
from edgepack.profiles.devices import load_devices
from edgepack.profiles.model_facts import model_facts
from edgepack.profiles.projection import project_device

ROOT = Path(__file__).parents[2]
CONFIGS = ROOT / "benchmarks" / "data" / "configs"
LLAMA_1B = CONFIGS / "llama-3.2-1b.json"


def test_ggml_block_sizes_match_the_gguf_package():
    gguf = pytest.importorskip("gguf")
    for code, (name, block, nbytes) in GGML_TYPES.items():
        kind = gguf.GGMLQuantizationType(code)
        assert kind.name == name and gguf.GGML_QUANT_SIZES[kind] == (block, nbytes), name


def test_gguf_header_gives_the_shapes_and_the_bytes_of_every_tensor():
    from edgepack.sources import DEMO_MODELS, find_demo_gguf

    try:
        path = find_demo_gguf(DEMO_MODELS["smollm2-135m"])
    except Exception as exc:  # the demo package is installed by scripts/setup.sh
        pytest.skip(f"demo GGUF not installed: {exc}")
    arch = read_architecture(path)
    assert (arch.hidden_size, arch.layers, arch.heads, arch.kv_heads, arch.head_dim, arch.intermediate_size, arch.vocab_size) == \
        (576, 30, 9, 3, 64, 1536, 49152)
    assert arch.tied_embeddings and arch.params == 134_479_872
    stored = sum(t.bytes for t in arch.gguf_tensors)
    assert stored < path.stat().st_size < stored + 4_000_000  # the tensors are the file, bar the header
    facts = facts_for(arch, target_layout("ort", "gguf"))
    assert facts.weight_bytes_per_token == stored  # tied: every tensor read in full


@pytest.mark.parametrize("scheme", ["fp32", "int8-weight", "int4", "fp16"])
def test_estimated_costs_match_the_quantized_graph(scheme, exported_tiny_factory, tmp_path):
    """The config-only cost of a scheme is what `edgepack quantize` writes, read back from the graph."""
    export = exported_tiny_factory("llama")
    folder = export
    if scheme != "fp32":
        from edgepack.quantize import QuantizeConfig, quantize_model

        folder = tmp_path / scheme
        quantize_model(export, folder, QuantizeConfig(scheme=scheme, evaluate=False))
    config = json.loads((folder / "config.json").read_text())
    real = model_facts(folder / "model.onnx", config)
    estimated = facts_for(from_config(config), target_layout("ort", scheme))
    # tiny models are dominated by their 2-layer fixed parts; real sizes agree closer (SmolLM2: within 4%)
    assert estimated.weight_bytes_per_token == pytest.approx(real.weight_bytes_per_token, rel=0.12)
    assert estimated.kv_bytes_per_position == real.kv_bytes_per_position
    assert estimated.nodes == pytest.approx(real.nodes, rel=0.15)


def test_static_programs_read_their_whole_cache_every_call():
    arch = from_config(json.loads(LLAMA_1B.read_text()))
    devices = load_devices()
    ane = facts_for(arch, target_layout("coreml", "int4", "ane"), context=512)
    gpu = facts_for(arch, target_layout("coreml", "int4", "gpu"), context=512)
    assert ane.kv_read_bytes(10) == ane.kv_read_bytes(400) == 3 * 512 * ane.kv_bytes_per_position
    assert gpu.kv_read_bytes(10) < gpu.kv_read_bytes(400)
    early = project_device(ane, devices["iphone-15-pro"], (16,), 4, 512, unit="ane")["by_prompt_len"][0]
    late = project_device(ane, devices["iphone-15-pro"], (400,), 4, 512, unit="ane")["by_prompt_len"][0]
    assert early["decode_ms_per_token"] == pytest.approx(late["decode_ms_per_token"])
    # the prefill runs whole chunks: 65 tokens cost two 64-token calls
    calls = project_device(ane, devices["iphone-15-pro"], (65,), 4, 512, unit="ane")["by_prompt_len"][0]["prefill_detail"]["calls"]
    assert calls == 2
    qnn = facts_for(arch, target_layout("qnn", "int4"), context=1024)
    assert qnn.kv_slots == 1024 and qnn.bytes_per_token_by_format["int4"] > 0


def test_each_unit_is_projected_with_its_own_figures():
    arch = from_config(json.loads(LLAMA_1B.read_text()))
    devices = load_devices()
    iphone = devices["iphone-15-pro"]
    by_unit = {}
    for unit in ("ane", "gpu", "cpu"):
        target = "ort" if unit == "cpu" else "coreml"
        facts = facts_for(arch, target_layout(target, "int8", unit), context=512)
        projection = project_device(facts, iphone, (64,), 8, 512, unit=unit)
        by_unit[unit] = projection
        assert projection["unit"] == unit
    assert by_unit["ane"]["efficiency"]["decode_bandwidth_int8"] == iphone.value("ane", "decode_bandwidth_int8")
    assert by_unit["gpu"]["efficiency"]["decode_bandwidth_int8"] == iphone.value("gpu", "decode_bandwidth_int8")
    assert by_unit["cpu"]["efficiency"]["decode_bandwidth_int8"] == iphone.value("efficiency", "decode_bandwidth_int8")
    energy = by_unit["ane"]["by_prompt_len"][0]
    assert energy["energy"]["decode_mj_per_token"] == pytest.approx(iphone.value("ane", "power_w") * energy["decode_ms_per_token"])
    assert "ane.power_w" in by_unit["ane"]["figures_verified"] and "efficiency.decode_bandwidth_int8" not in by_unit["ane"]["figures_verified"]


def _estimate(cli, *args):
    return cli("estimate", *args)


def test_estimate_llama_1b_from_its_config_on_three_devices(cli, tmp_path):
    out = tmp_path / "estimate.json"
    result = _estimate(cli, LLAMA_1B, "--scheme", "int4", "--device", "galaxy-s24", "--device", "iphone-15-pro",
                       "--device", "raspberry-pi-5", "-o", out)
    assert result.exit_code == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["kind"] == "edgepack.estimate" and report["model"]["unit"] == "cpu"
    assert set(report["projections"]) == {"galaxy-s24", "iphone-15-pro", "raspberry-pi-5"}
    for projection in report["projections"].values():
        entry = projection["by_prompt_len"][0]
        assert projection["kind"] == "estimated" and entry["energy"]["kind"] == "estimated"
        assert entry["decode_ms_per_token"] > 0 and entry["energy"]["decode_mj_per_token"] > 0
        assert projection["memory_fit"]["fits"] is True
    # 1.24B parameters: 4-bit matrices and an int8 tied table
    assert 0.8e9 < report["estimate"]["weight_bytes_per_token"] < 1.1e9
    assert report["estimate"]["kv_bytes_per_position"] == 2 * 16 * 8 * 64 * 4
    # the Pi has less bandwidth than the phones
    decode = {d: p["by_prompt_len"][0]["decode_ms_per_token"] for d, p in report["projections"].items()}
    assert decode["raspberry-pi-5"] > decode["galaxy-s24"]
    for device in ("galaxy-s24", "iphone-15-pro", "raspberry-pi-5"):
        assert device in result.stdout


def test_estimate_starts_without_heavy_libraries(tmp_path):
    code = ("import sys, json; from edgepack.cli import cli\n"
            "try:\n    cli(['estimate', sys.argv[1], '--json'], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
            "print(json.dumps(sorted(m for m in ('numpy', 'torch', 'onnx', 'onnxruntime', 'transformers', 'gguf') if m in sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code, str(LLAMA_1B)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


BUDGETS = """
[galaxy-s24]
max_decode_ms_per_token = {decode}
max_peak_memory_mb = 3000
min_top1 = 0.95

[host]
max_decode_ms_per_token = 1
"""


def test_check_gates_an_estimate_with_the_same_budgets(cli, tmp_path):
    out = tmp_path / "estimate.json"
    assert _estimate(cli, LLAMA_1B, "--scheme", "int4", "--device", "galaxy-s24", "-o", out).exit_code == 0
    budgets = tmp_path / "budgets.toml"
    budgets.write_text(BUDGETS.format(decode=1000))
    verdicts = tmp_path / "verdicts.json"
    passed = cli("check", out, "--budgets", budgets, "-o", verdicts)
    assert passed.exit_code == 0, passed.stderr
    report = json.loads(verdicts.read_text())
    assert [(v["budget"], v["kind"]) for v in report["verdicts"]] == [("max_decode_ms_per_token", "estimated"), ("max_peak_memory_mb", "estimated")]
    assert {(s["device"], s["budget"]) for s in report["skipped"]} == {("galaxy-s24", "min_top1"), ("host", "max_decode_ms_per_token")}
    budgets.write_text(BUDGETS.format(decode=5))
    failed = cli("check", out, "--budgets", budgets)
    assert failed.exit_code == 1 and "max_decode_ms_per_token" in failed.stderr


@pytest.mark.parametrize("args, message", [
    (["--target", "qnn", "--scheme", "int8-dynamic"], "does not apply to target qnn"),
    (["--target", "qnn", "--device", "pixel-8"], "pixel-8 has no [htp] figures"),
    (["--target", "ort", "--unit", "ane"], "runs on the CPU"),
    (["--scheme", "gguf"], "pass the .gguf file"),
    (["--context", "200000"], "exceeds the model's 131072 positions"),
])
def test_bad_estimates_get_one_error_line(cli, args, message):
    result = _estimate(cli, LLAMA_1B, *args)
    assert result.exit_code == 2, result.stderr
    assert result.stderr_lines == [result.stderr_lines[0]] and result.stderr_lines[0].startswith("error:")
    assert message in result.stderr


def test_encoders_and_broken_configs_are_refused(cli, tmp_path):
    bert = tmp_path / "bert.json"
    bert.write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 64}))
    assert "not a decoder" in _estimate(cli, bert).stderr
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4}))
    result = _estimate(cli, broken)
    assert result.exit_code == 3 and "num_hidden_layers" in result.stderr
    not_json = tmp_path / "x.json"
    not_json.write_text("{")
    assert _estimate(cli, not_json).exit_code == 3
    assert _estimate(cli, tmp_path / "missing").exit_code == 3
