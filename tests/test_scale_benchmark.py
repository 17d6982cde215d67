"""benchmarks/scale.py's verdict: a stage that did not finish is never "ok", whatever its memory."""

from __future__ import annotations

from tests.benchmark_scripts import load_benchmark


def _scale():
    return load_benchmark("scale")


def test_a_stage_that_timed_out_or_failed_is_not_ok():
    scale = _scale()
    gb = scale.GB
    small, weights = 1 * gb, 4 * gb  # well within 2x and 12 GB

    def run(code, timed_out=False, error=None):
        return scale.Run(code, 10.0, small, None, timed_out, error)

    assert scale.stage_verdict(run(0), small, weights) == "ok"
    assert scale.stage_verdict(run(-15, True, "timed out after 1200 s"), small, weights) == "timed out after 1200 s"
    assert scale.stage_verdict(run(70, error="internal error: x"), small, weights) == "failed (exit 70)"
    assert scale.stage_verdict(run(1), small, weights) == "gate failed (exit 1)"
    over = 13 * gb
    assert scale.stage_verdict(run(0), over, weights) == "over: > 2x, >= 12 GB"
    assert scale.stage_verdict(run(-9, True, "timed out after 60 s"), over, weights) == "timed out after 60 s; memory over: > 2x, >= 12 GB"


def test_rows_of_shapes_not_measured_again_are_kept_with_their_run(tmp_path):
    import json

    previous = tmp_path / "scale.json"
    previous.write_text(json.dumps({
        "command": "python benchmarks/scale.py --shapes llama-3.2-1b", "recorded_utc": "2026-12-07T16:22:04Z",
        "commit": {"sha": "abc", "dirty": False}, "conditions": {"shapes": ["llama-3.2-1b"], "loadavg_start": [0.1], "loadavg_end": [0.2]},
        "rows": [{"shape": "llama-3.2-1b", "stage": "qnn"}, {"shape": "qwen2.5-0.5b", "stage": "qnn"}]}))
    conditions: dict = {}
    kept = _scale().kept_rows(previous, ["qwen2.5-0.5b"], conditions)
    assert kept == [{"shape": "llama-3.2-1b", "stage": "qnn"}]  # the re-measured shape's old row is dropped
    assert conditions["earlier_runs"] == [{"command": "python benchmarks/scale.py --shapes llama-3.2-1b", "recorded_utc": "2026-12-07T16:22:04Z",
                                           "commit": {"sha": "abc", "dirty": False}, "shapes": ["llama-3.2-1b"], "loadavg": [[0.1], [0.2]]}]
    assert _scale().kept_rows(tmp_path / "missing.json", ["qwen2.5-0.5b"], conditions) == []
