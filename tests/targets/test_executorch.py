"""`edgepack target executorch` on tiny models: XNNPACK programs run here in ExecuTorch's runtime, the Core ML
delegate program built and checked structurally, and the hosts and inputs it refuses."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from tests.conftest import read_json, run_cli

needs_executorch = pytest.mark.skipif(importlib.util.find_spec("executorch") is None or importlib.util.find_spec("torchao") is None,
                                      reason="executorch and torchao are not installed (pip install 'edgepack[executorch]')")
pytestmark = needs_executorch


@pytest.fixture(scope="module")
def llama_fp32(exported_tiny_factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("executorch") / "llama"
    return out, run_cli("target", "executorch", exported_tiny_factory("llama"), "-o", out, "--quantize", "none", "--max-context", "64",
                        "--threads", "2")


@pytest.mark.slow
def test_xnnpack_decoder_runs_here_with_pytorchs_greedy_tokens(llama_fp32):
    out, result = llama_fp32
    assert result.exit_code == 0, result.stderr
    assert {"model.pte", "target.json", "tokenizer.json", "config.json"} <= {p.name for p in out.iterdir()}
    report = read_json(out / "target.json")
    facts, checks = report["facts"], report["checks"]
    assert report["target"] == "executorch" and report["passed"] is True
    assert facts["backend"] == "xnnpack" and facts["quantization"]["scheme"] == "none" and facts["dynamic_shapes"] is True
    assert facts["program_bytes"] == (out / "model.pte").stat().st_size == report["files"]["model.pte"]
    # The linear layers and attention went to XNNPACK; what stayed on CPU kernels is listed by operator.
    delegation = checks["delegation"]
    assert delegation["passed"] is True and delegation["delegated_subgraphs"] > 0 and delegation["delegated_nodes"] > 0
    assert sum(delegation["fallback_ops"].values()) == delegation["fallback_nodes"]
    verification = facts["verification"]
    assert verification["greedy"]["equal"] is True and len(verification["greedy"]["tokens"]) == 16
    assert checks["parity"]["top1_agreement"] == 1.0 and checks["parity"]["kl_mean"] < 1e-6
    assert checks["quality"]["top1_agreement"] == 1.0 and checks["quality"]["passed"] is True
    measured = verification["measured"]
    assert measured["threads"] == 2 and measured["decode_ms_per_token"] > 0 and measured["ttft_ms"] > 0
    assert facts["constant_methods"]["get_max_seq_len"] == facts["max_context"] == 64
    assert "executorch" in report["versions"] and "torchao" in report["versions"]
    assert "parity with PyTorch (same weights): top-1 1.000" in result.stdout


@pytest.mark.slow
def test_qwen2_program_gives_pytorchs_greedy_tokens(exported_tiny_factory, tmp_path):
    out = tmp_path / "qwen2"
    result = run_cli("target", "executorch", exported_tiny_factory("qwen2"), "-o", out, "--quantize", "none", "--max-context", "48")
    assert result.exit_code == 0, result.stderr
    verification = read_json(out / "target.json")["facts"]["verification"]
    assert verification["greedy"]["equal"] is True and verification["same_weights"]["top1_agreement"] >= 0.98
    assert read_json(out / "target.json")["facts"]["io"]["custom_kernels"]  # qwen2's attention runs on ExecuTorch's LLM kernels


@pytest.mark.slow
def test_the_program_is_projected_onto_the_cpus_of_devices(llama_fp32):
    from edgepack.profiles.artifacts import project_artifact
    from edgepack.profiles.devices import get_device, load_devices

    out, _result = llama_fp32
    known = load_devices([])
    profile = project_artifact(out, [get_device(d, known) for d in ("pixel-8", "iphone-15-pro")], [16], 8)
    assert profile["model"]["unit"] == "cpu" and profile["model"]["target"] == "executorch"
    assert set(profile["projections"]) == {"pixel-8", "iphone-15-pro"} and not profile["not_projected"]
    assert profile["projections"]["pixel-8"]["by_prompt_len"][0]["decode_ms_per_token"] > 0
    assert profile["quality"]["source"].endswith("checks.quality (the target's own parity check against fp32)")
    assert profile["model"]["facts"]["initializer_bytes"] == read_json(out / "target.json")["facts"]["program_bytes"]


@pytest.mark.slow
def test_the_program_serves_an_app_loop_from_its_own_metadata(llama_fp32, tiny_model_factory):
    """What an app does with the .pte alone: read the context from the program, prefill, decode token by token,
    twice on one loaded method (the second conversation overwrites the first's cache)."""
    import torch
    from executorch.runtime import Runtime
    from transformers import AutoModelForCausalLM

    out, _result = llama_fp32
    program = Runtime.get().load_program(str(out / "model.pte"))
    assert {"forward", "get_max_seq_len", "use_kv_cache", "get_eos_ids"} <= set(program.method_names)
    context = int(program.load_method("get_max_seq_len").execute([])[0])
    method = program.load_method("forward")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_factory("llama"))).eval()

    def generate(prompt, count):
        logits = method.execute([torch.tensor([prompt]), torch.arange(len(prompt))])[0]
        tokens = [int(logits[0, -1].argmax())]
        for position in range(len(prompt), min(len(prompt) + count - 1, context)):
            tokens.append(int(method.execute([torch.tensor([[tokens[-1]]]), torch.tensor([position])])[0][0, -1].argmax()))
        return tokens

    for prompt in ([5, 17, 99, 240, 33, 7, 81, 400, 12, 9], [300, 2, 45]):
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, len(prompt):].tolist()
        assert generate(prompt, 12) == expected


@pytest.mark.slow
def test_encoder_program_matches_pytorch_hidden_states(exported_tiny_factory, tmp_path):
    out = tmp_path / "bert"
    result = run_cli("target", "executorch", exported_tiny_factory("bert"), "-o", out, "--max-context", "32")
    assert result.exit_code == 0, result.stderr
    report = read_json(out / "target.json")
    assert report["facts"]["kind"] == "encoder" and report["facts"]["quantization"]["scheme"] == "none"
    assert report["checks"]["parity"]["cosine_min"] > 0.99999 and report["checks"]["quality"]["passed"] is True
    assert report["facts"]["io"]["outputs"] == {"last_hidden_state": "fp32 (1, n, hidden)"}
    assert report["facts"]["verification"]["measured"]["latency_ms"] > 0


@pytest.mark.slow
def test_coreml_delegate_program_is_built_and_checked_structurally(exported_tiny_factory, tmp_path):
    out = tmp_path / "coreml"
    result = run_cli("target", "executorch", exported_tiny_factory("llama"), "-o", out, "--backend", "coreml", "--max-context", "32")
    assert result.exit_code == 0, result.stderr
    report = read_json(out / "target.json")
    facts, delegation = report["facts"], report["checks"]["delegation"]
    assert facts["backend"] == "coreml" and facts["dynamic_shapes"] is False and facts["io"]["inputs"]["input_ids"].endswith("q = 1")
    # Core ML took the model; only the KV-cache writes stay on ExecuTorch's CPU kernels.
    assert delegation["passed"] is True and delegation["delegated_nodes"] > 5 * delegation["fallback_nodes"]
    assert set(delegation["fallback_ops"]) == {"aten_index_put_default"}
    assert "does not run on this host" in report["checks"]["parity"]["skipped"]
    assert (out / "model.pte").stat().st_size > 100_000
    from edgepack.profiles.artifacts import project_artifact
    from edgepack.profiles.devices import get_device, load_devices

    known = load_devices([])
    profile = project_artifact(out, [get_device(d, known) for d in ("pixel-8", "iphone-15-pro")], [16], 8)
    assert profile["model"]["unit"] == "ane" and set(profile["projections"]) == {"iphone-15-pro"}
    assert "pixel-8" in profile["not_projected"]


def test_parity_gates_unquantized_programs_directly_and_quantized_ones_by_their_schemes_price():
    from edgepack.targets.executorch import ExecuTorchConfig, _Plan, executorch_gates
    from edgepack.targets.executorch_support.program import Delegation

    figures = {"top1_agreement": 1.0, "kl_mean": 1e-5}
    delegated = Delegation("xnnpack", 1, 10, 2)

    def unquantized(gap):
        plan = _Plan(source=None, kind="decoder", scheme="none", context=64, dynamic=True, runs_here=True)
        greedy = {"equal": gap is None, "agreeing_prefix": 3, "divergence_gap_nats": gap, "equal_up_to_near_tie": gap is None or gap < 0.1}
        gates = executorch_gates({"same_weights": figures, "fp32": figures, "greedy": greedy}, delegated, plan, ExecuTorchConfig())
        return {gate.name: gate.passed for gate in gates}

    assert unquantized(None)["parity.greedy_tokens"] is True
    assert unquantized(0.02)["parity.greedy_tokens"] is True  # a near tie flipped by rounding
    assert unquantized(1.5)["parity.greedy_tokens"] is False

    def quantized(ratio):
        plan = _Plan(source=None, kind="decoder", scheme="8da4w", context=64, dynamic=True, runs_here=True)
        verification = {"same_weights": figures, "fp32": {"top1_agreement": 0.9, "kl_mean": 0.05}, "kl_ratio_to_pytorch": ratio,
                        "greedy": {"equal": False, "equal_up_to_near_tie": False}}
        gates = {gate.name: gate for gate in executorch_gates(verification, delegated, plan, ExecuTorchConfig())}
        assert "parity.greedy_tokens" not in gates and gates["quality.kl_mean"].passed is None  # quantized: reported only
        return gates["parity.kl_ratio_to_pytorch"].passed

    assert quantized(1.1) is True and quantized(2.0) is False
    plan = _Plan(source=None, kind="decoder", scheme="none", context=64, dynamic=True, runs_here=True)
    no_delegate = executorch_gates({}, Delegation("xnnpack", 0, 0, 40), plan, ExecuTorchConfig())
    assert [gate.passed for gate in no_delegate] == [False]


def test_refusals_are_one_line_with_their_exit_codes(exported_tiny_factory, tiny_model_factory, tmp_path, monkeypatch):
    monkeypatch.delenv("QNN_SDK_ROOT", raising=False)
    llama = exported_tiny_factory("llama")
    cases = [
        (("--backend", "qnn"), 4, "QNN_SDK_ROOT"),
        (("--backend", "coreml", "--quantize", "8da4w"), 2, "not one the coreml delegate runs"),
        (("--backend", "cuda",), 2, "cuda"),
    ]
    for options, code, words in cases:
        result = run_cli("target", "executorch", llama, "-o", tmp_path / "out", *options)
        assert result.exit_code == code and words in result.stderr, (options, result.stderr)
        assert len(result.stderr_lines) == 1 and result.stderr_lines[0].startswith("error:")
        assert not (tmp_path / "out").exists()
    gpt2 = run_cli("target", "executorch", tiny_model_factory("gpt2"), "-o", tmp_path / "gpt2")
    assert gpt2.exit_code == 3 and "gpt2" in gpt2.stderr and len(gpt2.stderr_lines) == 1
    missing = run_cli("target", "executorch", tmp_path / "nowhere", "-o", tmp_path / "x")
    assert missing.exit_code == 3 and len(missing.stderr_lines) == 1


def test_delegation_counts_exclude_bookkeeping_nodes():
    from edgepack.targets.executorch_support.program import BOOKKEEPING_OPS, Delegation

    delegation = Delegation("xnnpack", 2, 30, 10, {"aten_index_put_default": 4, "aten_view_copy_default": 6})
    assert delegation.to_json()["delegated_share"] == 0.75
    assert "getitem" in BOOKKEEPING_OPS
    assert np.isclose(Delegation("coreml", 0, 0, 0).share, 0.0)


@pytest.mark.slow
def test_a_recipe_builds_the_8da4w_default_once_with_a_summary_row(tiny_model_factory, tmp_path, monkeypatch):
    from tests.test_build import QUICK_EVALUATION

    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))
    recipe = tmp_path / "edgepack.toml"
    recipe.write_text(f'[model]\nsource = "{tiny_model_factory("qwen2")}"\n\n[[quantize]]\nscheme = "int8-weight"\n\n'
                      '[targets.executorch]\nmax_context = 64\n\n' + QUICK_EVALUATION)
    result = run_cli("build", recipe, "-o", tmp_path / "bundle")
    assert result.exit_code == 0, result.stderr
    # It quantizes itself: one program, from fp32, whatever the recipe's schemes.
    assert sorted(p.name for p in (tmp_path / "bundle" / "targets" / "executorch").iterdir()) == ["fp32"]
    program = tmp_path / "bundle" / "targets" / "executorch" / "fp32" / "model.pte"
    report = read_json(program.parent / "target.json")
    facts, checks = report["facts"], report["checks"]
    assert facts["quantization"] == {"scheme": "8da4w", "group_size": 32, "embedding": "int8", "by": "torchao"}
    # The program costs what torchao's PyTorch model with the same weights costs against fp32 (its kernels round
    # activations their own way), and stays close to that model.
    assert checks["parity"]["passed"] is True and checks["parity"]["kl_ratio_to_pytorch"] <= 1.5
    assert checks["parity"]["top1_agreement"] >= 0.95 and checks["parity"]["kl_mean"] < 1e-2
    assert checks["quality"]["kl_mean"] > checks["parity"]["kl_mean"]
    assert checks["quality"]["passed"] is None  # quantized: reported against fp32, gated only when asked
    manifest = read_json(tmp_path / "bundle" / "manifest.json")
    assert "targets/executorch/fp32/model.pte" in manifest["files"]
    assert "targets/executorch/fp32/model.pte" not in {entry["path"] for entry in manifest["not_reproducible"]}
    summary = read_json(tmp_path / "bundle" / "report.json")["summary"]
    row = next(row for row in summary if row["target"] == "executorch")
    assert row["precision"] == "8da4w" and row["verdict"] == "pass" and row["top1_agreement"] == checks["quality"]["top1_agreement"]


def test_only_core_ml_programs_are_declared_not_reproducible(tmp_path):
    import json

    from edgepack.targets.executorch import not_reproducible

    for backend, expected in (("xnnpack", {}), ("coreml", {"model.pte"})):
        folder = tmp_path / backend
        folder.mkdir()
        (folder / "target.json").write_text(json.dumps({"facts": {"backend": backend}}))
        assert set(not_reproducible(folder)) == set(expected)
    assert not_reproducible(tmp_path / "missing") == {}
