"""QNN HTP target on SmolLM2-135M with its KV cache: naive QDQ vs the accuracy rescue, in the HTP simulator.

Not a test (the simulator takes minutes on 2 cores). Prints one table and writes JSON:

    EDGEPACK_CACHE=/tmp/epcache edgepack convert smollm2-135m -o /tmp/qnn/smol --no-verify
    python benchmarks/qnn.py /tmp/qnn/smol --out /tmp/qnn/bench [--rescue 0 16] [--soc-model 57 --htp-arch 75]

Each run is one `edgepack target qnn` build: static prefill (--prefill-len) + decode graphs over a
--max-context cache, w8a16 QDQ, compiled for the SoC with CPU fallback disabled, context binaries
written and reloaded, then --eval-windows windows of (prefill + --decode-steps teacher-forced decode
steps) compared with the fp32 export on CPU. Figures: nodes on HTP, compile seconds, simulator seconds
per run, top-1 / KL / max |logit diff| vs fp32, reload identical.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path, help="`edgepack convert` output of SmolLM2 (or another decoder)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/qnn/bench"))
    parser.add_argument("--rescue", type=int, nargs="+", default=[0, 16], help="rescue sizes to compare (0 = naive)")
    parser.add_argument("--precision", default="w8a16")
    parser.add_argument("--soc-model", type=int, default=57)
    parser.add_argument("--htp-arch", type=int, default=75)
    parser.add_argument("--max-context", type=int, default=128)
    parser.add_argument("--prefill-len", type=int, default=32)
    parser.add_argument("--decode-steps", type=int, default=4)
    parser.add_argument("--eval-windows", type=int, default=2)
    parser.add_argument("--calibration-samples", type=int, default=8)
    parser.add_argument("--range-margin", type=float, default=None, help="default: the target's (0.25 at 16 bits)")
    args = parser.parse_args()

    from edgepack.targets.qnn import QnnConfig, build

    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for rescue in args.rescue:
        config = QnnConfig(soc_model=args.soc_model, htp_arch=args.htp_arch, precision=args.precision,
                           max_context=args.max_context, prefill_len=args.prefill_len, decode_steps=args.decode_steps,
                           eval_windows=args.eval_windows, calibration_samples=args.calibration_samples,
                           rescue=rescue, range_margin=args.range_margin, force=True)
        start = time.perf_counter()
        artifact = build(args.export, args.out / f"rescue-{rescue}", config, on_status=lambda m, rescue=rescue: print(f"  [{rescue}] {m}", flush=True))
        parity = artifact.checks["parity_vs_fp32"]
        rows.append({
            "rescue": rescue, "kept_16bit": len(artifact.facts["rescue"]["kept_16bit"]),
            "nodes_on_htp": artifact.facts["nodes_on_htp"], "nodes_total": artifact.facts["nodes_total"],
            "compile_s": artifact.facts["compile_seconds"], "sim_s_per_run": artifact.facts["simulator_seconds_per_run"],
            "positions": parity["positions"], "top1": parity["top1_agreement"], "kl_mean": parity["kl_mean"],
            "max_abs_logit_diff": parity["max_abs_logit_diff"],
            "top1_prefill": parity["prefill"]["top1_agreement"], "top1_decode": parity.get("decode", {}).get("top1_agreement"),
            "reload_identical": artifact.checks["context_binary_reload"]["identical"],
            "reload_s": artifact.checks["context_binary_reload"]["reload_seconds"],
            "bundle_mb": round(sum(artifact.files.values()) / 1e6, 1), "total_s": round(time.perf_counter() - start, 1),
            "sensitivity_top": [(e["node"], round(e["score"], 5)) for e in artifact.facts["rescue"].get("sensitivity_top", [])[:8]],
        })
        print(json.dumps(rows[-1]), flush=True)
    (args.out / "bench.json").write_text(json.dumps(rows, indent=2) + "\n")
    _results.write("qnn", title="QNN target in the HTP simulator: sensitivity rescue against the naive graph", threads=None,
                   rows=[{k: v for k, v in r.items() if k != "sensitivity_top"} for r in rows],
                   conditions={"export": str(args.export), "precision": args.precision, "soc_model": args.soc_model,
                               "htp_arch": args.htp_arch, "max_context": args.max_context, "prefill_len": args.prefill_len,
                               "decode_steps": args.decode_steps, "eval_windows": args.eval_windows,
                               "calibration_samples": args.calibration_samples, "range_margin": args.range_margin,
                               "runtime": "onnxruntime-qnn HTP simulator (x86-64 Linux), CPU fallback disabled"},
                   notes="top-1 and KL against fp32 over the evaluation windows; rescue N keeps the N most sensitive "
                         "nodes at 16 bits.")
    print(f"\n{'rescue':>6} {'on HTP':>11} {'top-1':>6} {'KL':>8} {'max|d|':>7} {'prefill':>7} {'decode':>7} {'reload==':>8} {'total s':>8}")
    for r in rows:
        print(f"{r['rescue']:>6} {r['nodes_on_htp']:>5}/{r['nodes_total']:<5} {r['top1']:>6.3f} {r['kl_mean']:>8.4f} "
              f"{r['max_abs_logit_diff']:>7.3f} {r['top1_prefill']:>7.3f} {str(r['top1_decode'])[:5]:>7} {str(r['reload_identical']):>8} {r['total_s']:>8}")


if __name__ == "__main__":
    main()
