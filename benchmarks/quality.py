"""Quality and size of every quantization scheme on SmolLM2-135M-Instruct (not a test).

    python benchmarks/quality.py [--work DIR] [--schemes a,b,c] [--eval-tokens 512]

Exports the demo model once (fp32, cached in --work), quantizes it with each scheme through
`edgepack.quantize.quantize_model`, and prints: scheme | MB | ratio to fp32 | ppl | top-1 | mean KL |
p99 KL | quantize seconds. The same table goes to benchmarks/results/quality.json for
docs/benchmarks.md. onnxruntime-genai's own model builder is compared in benchmarks/decode.py (it runs
in its own environment, see edgepack/targets/genai_builder.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import _results

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# name -> (scheme, options)
CONFIGS = {
    "int8-dynamic": ("int8-dynamic", {}),
    "int8-weight": ("int8-weight", {}),
    "int8-static-u16": ("int8-static", {"calibration_samples": 4}),
    "int4-rtn": ("int4", {"algorithm": "rtn"}),
    "int4-rtn-sym": ("int4", {"algorithm": "rtn", "symmetric": True}),
    "int4-hqq": ("int4", {"algorithm": "hqq"}),
    "int4-hqq-lmhead4": ("int4", {"algorithm": "hqq", "lm_head": "int4"}),
    "int4-k-quant": ("int4", {"algorithm": "k-quant"}),
    "fp16": ("fp16", {}),
    "gguf": ("gguf", {}),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("EDGEPACK_CACHE", Path.home() / ".cache/edgepack")) / "bench-quality")
    parser.add_argument("--schemes", default=",".join(CONFIGS))
    parser.add_argument("--eval-tokens", type=int, default=512)
    args = parser.parse_args()

    from edgepack.convert import ConvertConfig, convert_model
    from edgepack.errors import EdgepackError
    from edgepack.quantize import QualityConfig, QuantizeConfig, quantize_model

    args.work.mkdir(parents=True, exist_ok=True)
    fp32 = args.work / "fp32"
    if not (fp32 / "convert.json").is_file():
        print("exporting smollm2-135m (fp32) ...", file=sys.stderr)
        convert_model("smollm2-135m", fp32, ConvertConfig(verify=False, force=True))
    fp32_mb = (fp32 / "model.onnx").stat().st_size / 1e6

    rows = []
    for name in args.schemes.split(","):
        scheme, options = CONFIGS[name]
        out = args.work / name
        print(f"quantizing {name} ...", file=sys.stderr)
        start = time.perf_counter()
        try:
            result = quantize_model(fp32, out, QuantizeConfig(
                scheme=scheme, scheme_options=options, quality=QualityConfig(eval_tokens=args.eval_tokens), force=True))
        except EdgepackError as exc:
            rows.append((name, None, None, None, None, None, None, time.perf_counter() - start, str(exc)))
            continue
        q = result.quality
        rows.append((name, result.size_bytes / 1e6, result.size_bytes / result.reference_size_bytes, q["ppl"], q["top1_agreement"],
                     q["kl_mean"], q["kl_p99"], result.report["seconds"]["quantize"], ""))
        ppl_ref = q["ppl_reference"]

    print(f"\nSmolLM2-135M-Instruct, {args.eval_tokens} scored positions of the bundled eval text; fp32 {fp32_mb:.1f} MB, "
          f"fp32 ppl {ppl_ref:.2f}; CPU, onnxruntime\n")
    header = f"| {'scheme':<18} | {'MB':>6} | {'ratio':>5} | {'ppl':>7} | {'top-1':>5} | {'mean KL':>7} | {'p99 KL':>7} | {'quant s':>7} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, mb, ratio, ppl, top1, kl, p99, seconds, error in rows:
        if mb is None:
            print(f"| {name:<18} | failed: {error}")
            continue
        print(f"| {name:<18} | {mb:6.1f} | {ratio:5.3f} | {ppl:7.2f} | {top1:5.3f} | {kl:7.4f} | {p99:7.4f} | {seconds:7.1f} |")
    _results.write(
        "quality", title="Size and quality of every quantization scheme against fp32", threads=None,
        conditions={"model": "SmolLM2-135M-Instruct", "eval_tokens": args.eval_tokens, "eval_text": "edgepack/quantize/data/eval_en.txt",
                    "fp32_MB": fp32_mb, "fp32_ppl": ppl_ref, "runtime": "onnxruntime CPU",
                    "schemes": {name: {"scheme": CONFIGS[name][0], **CONFIGS[name][1]} for name in args.schemes.split(",")}},
        rows=[{"scheme": name, "MB": mb, "ratio to fp32": ratio, "ppl": ppl, "top-1": top1, "mean KL": kl, "p99 KL": p99,
               "quantize s": seconds, **({"error": error} if error else {})}
              for name, mb, ratio, ppl, top1, kl, p99, seconds, error in rows],
        notes="top-1 is the share of positions where the quantized model's most likely next token equals fp32's; "
              "KL is KL(fp32 || quantized) per position.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
