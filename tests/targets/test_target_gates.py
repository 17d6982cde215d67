"""Target checks decided by GateResult values: verdicts, limits at their boundary, the exit-1 message."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from edgepack.targets.base import TargetArtifact, check_gate, figure_gate, flag_gate, verdict


def test_verdict_follows_the_gates_of_its_check():
    gates = [figure_gate("qnn", "parity_vs_fp32", "top1_agreement", 0.8, 0.5, "min", option="--min-top1"),
             figure_gate("qnn", "parity_vs_fp32", "kl_mean", 0.2, None, "max", option="--max-kl"),  # not gated
             flag_gate("qnn", "context_binary_reload", "identical", False, "outputs differ"),
             check_gate("ort", "onnxruntime_genai", {"passed": None, "skipped": "onnxruntime-genai is not installed"})]
    assert verdict(gates, "parity_vs_fp32") is True
    assert verdict(gates, "context_binary_reload") is False
    assert verdict(gates, "onnxruntime_genai") is None  # skipped stays skipped, never a pass
    assert gates[1].passed is None and gates[2].figure == 0.0 and gates[2].limit == 1.0


def test_failure_message_is_built_from_failed_gates(tmp_path):
    gates = [figure_gate("ort-mobile", "size_vs_onnx", "ort_bytes", 2000, 1000.0, "max", unit="B", option="limit"),
             figure_gate("ort-mobile", "parity_vs_onnx", "max_abs_diff", 1e-6, 1e-4, "max", option="atol")]
    checks = {"size_vs_onnx": {"passed": verdict(gates, "size_vs_onnx")}, "parity_vs_onnx": {"passed": verdict(gates, "parity_vs_onnx")},
              "legacy": {"passed": False}}  # decided without a gate: still named
    artifact = TargetArtifact(out=tmp_path, target="ort-mobile", checks=checks, gates=gates)
    message = artifact.failure_message("target ort-mobile: check(s) failed")
    assert message.startswith("target ort-mobile: check(s) failed: ort-mobile: size_vs_onnx.ort_bytes 2000 B > limit 1000; legacy; see ")
    assert "parity_vs_onnx" not in message and message.endswith(str(Path(tmp_path) / "target.json"))
    report = artifact.to_json()
    assert report["passed"] is False and [g["name"] for g in report["gates"]] == ["size_vs_onnx.ort_bytes", "parity_vs_onnx.max_abs_diff"]
    assert TargetArtifact(out=tmp_path, target="x", checks={"a": {"passed": True}}).failure_message("x") is None


def test_ort_mobile_size_limit_is_ratio_or_fixed_overhead():
    from edgepack.targets.ort_mobile import ALLOWED_OVERHEAD_BYTES, size_gate

    check = {"ort_bytes": 0, "optimized_onnx_bytes": 10_000_000, "max_ratio": 1.05, "allowed_overhead_bytes": ALLOWED_OVERHEAD_BYTES}
    assert size_gate({**check, "ort_bytes": 10_500_000}).passed is True  # exactly at the ratio
    assert size_gate({**check, "ort_bytes": 10_500_001}).passed is False
    tiny = {**check, "optimized_onnx_bytes": 1000}
    assert size_gate({**tiny, "ort_bytes": 1000 + ALLOWED_OVERHEAD_BYTES}).passed is True
    assert size_gate({**tiny, "ort_bytes": 1001 + ALLOWED_OVERHEAD_BYTES}).passed is False


def test_ort_quality_holds_within_a_quarter_or_0_005_of_the_source():
    from edgepack.targets.ort import parity_gate, quality_gate

    def quality(bundle, source):
        return {"bundle": {"kl_mean": bundle}, "source": {"kl_mean": source}}

    assert quality_gate(quality(0.125, 0.1)).passed is True and quality_gate(quality(0.1251, 0.1)).passed is False
    assert quality_gate(quality(0.006, 0.001)).passed is True and quality_gate(quality(0.0061, 0.001)).passed is False
    assert parity_gate({"kl_mean": 0.02, "max_kl_mean": 0.02}).passed is True
    assert parity_gate({"kl_mean": float("nan"), "max_kl_mean": 0.02}).passed is False


def test_coreml_parity_is_gated_by_default_only_uncompressed():
    from edgepack.targets.coreml import FP16_MAX_KL, FP16_MIN_TOP1, CoreMLConfig, coreml_gates

    safe = SimpleNamespace(unsafe=[])
    plan = SimpleNamespace(kind="decoder", limit=None)
    figures = {"finite": True, "top1_agreement": 0.9, "kl_mean": 0.05}
    fp16 = {g.name: g for g in coreml_gates(safe, {"passed": True}, None, plan, figures, CoreMLConfig())}
    assert (fp16["parity.top1_agreement"].limit, fp16["parity.kl_mean"].limit) == (FP16_MIN_TOP1, FP16_MAX_KL)
    assert verdict(list(fp16.values()), "parity") is False
    int4 = coreml_gates(safe, {"passed": True}, None, plan, figures, CoreMLConfig(compress="int4-block"))
    assert verdict(int4, "parity") is True and {g.name for g in int4 if g.passed is None} == {"parity.top1_agreement", "parity.kl_mean"}
    overflow = coreml_gates(SimpleNamespace(unsafe=["mlp.down_proj output reaches 7e+04"]), {"passed": True}, None, plan,
                            {**figures, "finite": False}, CoreMLConfig(compress="int4-block"))
    failed = [g.message for g in overflow if g.failed]
    assert failed == ["coreml: fp16_safety: ops overflow fp16: mlp.down_proj output reaches 7e+04",
                      "coreml: parity: non-finite logits (fp16 overflow)"]
