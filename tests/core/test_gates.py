"""GateResult values from every gate edgepack applies, and the one JUnit writer that reports them."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest

from edgepack.convert.parity import parity_gates
from edgepack.core.gates import GateResult, boolean_gate, check_gates, evaluate_gate, failed, failure_messages
from edgepack.profiles.budgets import Budget, build_gates, verdict
from edgepack.quantize.pipeline import QualityGate
from edgepack.report.junit import junit_xml


def test_a_figure_within_its_limit_passes():
    gate = evaluate_gate("kl_mean", 0.01, 0.05, "max", subject="int4", stage="quantize", option="--max-kl")
    assert gate.passed is True and not gate.failed
    assert (gate.figure, gate.limit, gate.direction, gate.subject, gate.stage) == (0.01, 0.05, "max", "int4", "quantize")
    assert gate.message == "int4: kl_mean 0.01 within --max-kl 0.05"
    assert evaluate_gate("top1_agreement", 0.9, 0.9, "min").passed is True  # the limit itself passes


def test_a_figure_beyond_its_limit_fails_naming_figure_and_limit():
    high = evaluate_gate("kl_mean", 0.2, 0.05, "max", option="--max-kl")
    assert high.passed is False and high.failed and high.message == "kl_mean 0.2 > --max-kl 0.05"
    low = evaluate_gate("tokens_per_s", 12.0, 20.0, "min", unit="tokens/s")
    assert low.failed and low.message == "tokens_per_s 12 tokens/s < tokens_per_s 20"


def test_a_missing_figure_with_a_limit_fails():
    gate = evaluate_gate("ppl_ratio", None, 1.05, "max", option="--max-ppl-ratio")
    assert gate.passed is False and gate.figure is None
    assert gate.message == "ppl_ratio is not measured for this model (--max-ppl-ratio 1.05)"


@pytest.mark.parametrize("direction", ["max", "min"])
def test_a_nan_figure_fails_either_way(direction):
    gate = evaluate_gate("kl_mean", math.nan, 0.05, direction, option="--max-kl")
    assert gate.passed is False and math.isnan(gate.figure) and gate.message.startswith("kl_mean nan ")


def test_no_limit_is_not_a_gate():
    gate = evaluate_gate("kl_mean", 0.3, None, "max", subject="int4")
    assert gate.passed is None and not gate.failed and failed([gate]) == []
    assert gate.message == "int4: kl_mean not gated"


def test_unknown_direction_is_refused():
    with pytest.raises(ValueError, match="direction"):
        evaluate_gate("x", 1.0, 2.0, "below")


def test_gate_json_round_trip():
    gate = evaluate_gate("kl_mean", 0.2, 0.05, "max", conditions={"tokens": 512})
    assert GateResult.from_json(gate.to_json()) == gate


def test_boolean_gate_is_figure_one_or_zero_against_one():
    holds, broken = boolean_gate("tokens_identical", True), boolean_gate("tokens_identical", False, message="tokens differ")
    assert (holds.figure, holds.limit, holds.direction, holds.passed) == (1.0, 1.0, "min", True)
    assert (broken.figure, broken.passed, broken.message) == (0.0, False, "tokens differ")
    assert boolean_gate("tokens_identical", None).passed is None


def test_target_checks_become_one_gate_each():
    checks = {"parity": {"passed": False, "failures": ["top-1 agreement 0.5 < 0.9"]}, "tokenizer": {"passed": True},
              "ops": {"passed": None}, "notes": "not a check"}
    gates = check_gates(checks, "coreml/fp32")
    assert [(g.name, g.passed, g.stage) for g in gates] == [("parity", False, "target"), ("tokenizer", True, "target"), ("ops", None, "target")]
    assert failure_messages(gates) == ["target coreml/fp32: check parity failed"]


def test_quality_gate_one_gate_per_limit_with_the_quantize_texts():
    gate = QualityGate(max_kl=0.05, min_top1=0.9)
    gates = gate.gates({"kl_mean": 0.1, "top1_agreement": 0.95, "ppl_ratio": 1.2})
    assert [(g.name, g.passed) for g in gates] == [("kl_mean", False), ("top1_agreement", True)]
    assert failure_messages(gates) == ["kl_mean 0.1 > --max-kl 0.05"]
    assert failure_messages(gate.gates({"kl_mean": 0.1}, subject="int4")) == [
        "quality gate, int4: kl_mean 0.1 > --max-kl 0.05",
        "quality gate, int4: top1_agreement is not measured for this model (--min-top1 0.9)",
    ]
    # Quality not evaluated: every limit fails, for one reason said once.
    assert failure_messages(gate.gates(None)) == ["quality was not evaluated (--no-eval) but a quality gate was set"]
    assert QualityGate().gates(None) == []


def test_parity_gates_atol_and_greedy_tokens():
    decoder = {"atol": 1e-3, "max_abs_logit_diff": 2e-4, "greedy_tokens_identical": True}
    assert not failed(parity_gates(decoder))
    atol = failed(parity_gates({**decoder, "max_abs_logit_diff": 2e-3}))
    assert [(g.name, g.figure, g.limit) for g in atol] == [("max_abs_logit_diff", 2e-3, 1e-3)]
    assert atol[0].message == "max |logit diff| 0.002 > atol 0.001"
    greedy = failed(parity_gates({**decoder, "greedy_tokens_identical": False}))
    assert [(g.name, g.figure) for g in greedy] == [("greedy_tokens_identical", 0.0)]
    encoder = {"atol": 1e-3, "max_abs_logit_diff": None, "greedy_tokens_identical": None, "max_abs_embedding_diff": 1e-4,
               "min_cosine": 0.99, "min_cosine_required": 0.9999}
    assert [g.name for g in failed(parity_gates(encoder))] == ["min_cosine"]


def test_budget_verdicts_are_gates_with_device_kind_and_margin():
    over = verdict(Budget("pixel-8", "max_decode_ms_per_token", 10.0), 12.5, "projected", "prompt 128 + 64 generated")
    assert isinstance(over, GateResult) and over.failed and over.stage == "check"
    assert (over.device, over.budget, over.value, over.kind) == ("pixel-8", "max_decode_ms_per_token", 12.5, "projected")
    assert over.margin == pytest.approx(-0.25)
    assert over.message == "pixel-8.max_decode_ms_per_token: 12.5 ms/token (projected) must be <= 10"
    assert over.to_json()["conditions"] == "prompt 128 + 64 generated"
    missing = verdict(Budget("host", "min_top1", 0.9), None, "missing", "no quality figures")
    assert missing.passed is False and missing.margin is None and "no figure in the profile" in missing.message
    (built,) = build_gates("int4", [over])
    assert type(built) is GateResult and built.subject == "int4/pixel-8"
    assert built.message == "budget, int4: " + over.message


def test_junit_one_case_per_gate_failures_carry_the_message():
    gates = [
        evaluate_gate("kl_mean", 0.2, 0.05, "max", subject="int4", stage="quantize", option="--max-kl"),
        evaluate_gate("top1_agreement", 0.95, 0.9, "min", subject="int4", stage="quantize"),
        boolean_gate("parity", None, subject="coreml/fp32", stage="target"),
    ]
    budgets = [verdict(Budget("pixel-8", "max_ttft_ms", 100.0), 150.0, "projected", "prompt 128")]
    root = ET.fromstring(junit_xml({"edgepack.quality": gates, "edgepack.check": budgets}, name="edgepack.build"))
    assert root.get("name") == "edgepack.build" and root.get("tests") == "4" and root.get("failures") == "2"
    quality, check = root.findall("testsuite")
    assert (quality.get("name"), quality.get("tests"), quality.get("failures"), quality.get("skipped")) == ("edgepack.quality", "3", "1", "1")
    cases = quality.findall("testcase")
    assert [(c.get("classname"), c.get("name")) for c in cases] == [
        ("edgepack.quality.int4", "kl_mean"), ("edgepack.quality.int4", "top1_agreement"), ("edgepack.quality.coreml.fp32", "parity")]
    failure = cases[0].find("failure")
    assert failure.get("message") == gates[0].message and failure.get("type") == "GateFailed"
    assert cases[1].find("failure") is None and cases[2].find("skipped") is not None
    (budget,) = check.findall("testcase")
    assert (budget.get("classname"), budget.get("name")) == ("edgepack.check.pixel-8", "max_ttft_ms")
    assert budget.find("failure").get("message") == budgets[0].message and budget.find("failure").get("type") == "BudgetExceeded"
    assert budget.find("system-out").text == "projected: value 150.0 ms, limit 100; prompt 128"
    assert all(case.find("system-out") is not None for case in root.iter("testcase"))
