"""Core ML target on SmolLM2-135M: fp16 (with and without the fp16 safety pass) and compressed variants.

Not a test (the MIL reference interpreter takes minutes per variant on 2 cores). Needs an fp32 export:

    EDGEPACK_CACHE=/tmp/epcache edgepack convert smollm2-135m -o /tmp/cm/smol --no-verify
    python benchmarks/coreml.py /tmp/cm/smol --work /tmp/cm/bench [--variants fp16,int4-block,...]
    python benchmarks/coreml.py /tmp/cm/smol --variants int4-split,int4-split-tuned --more-positions 128,256
    # the under-80 MB variants over 1024 positions of the bundled text, then the same counts of a second text
    python benchmarks/coreml.py /tmp/cm/smol --variants int4-scaled-split4u,int4-scaled-split4,int4-split --max-context 1024 --positions 1024 \
        --more-positions 64,128,256,512 --second-text benchmarks/data/eval_alt_en.txt

Top-1 over a few dozen positions is mostly decided by near ties (positions where fp32's top two tokens
are within 0.1 nats: 6 of the first 64 of the bundled text): read it with its 95% interval, and prefer
1024 positions (MIL reference for SmolLM2 on 2 cores: 33-37 s with fp16 block scales, ~3 min with
--block-scales uint8, whose per-block intermediates are mostly elementwise work).

Prints one row per variant (package size, top-1 agreement and KL against fp32 PyTorch over the
positions verified by the MIL reference) and writes the rows to WORK/coreml-bench.json and
benchmarks/results/coreml.json (for docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import _results

VARIANTS = {
    "fp16-unsafe": dict(compress="none", fp16_safety=False),
    "fp16": dict(compress="none"),
    "int8": dict(compress="int8"),
    "int4-block": dict(compress="int4-block"),
    "int4-block+int8-emb": dict(compress="int4-block", embedding="int8"),
    "int4-block+row-emb": dict(compress="int4-block", embedding="row"),
    # a <= 80 MB point: split table (ids < 6000 int8, the rest 3-bit per 48) + uint4 offsets with residue
    "int4-split": dict(compress="int4-block", embedding="split", integer_offsets=True),
    # the same with its stored values tuned by distillation (--tune-steps 200: ~18 min on 2 cores)
    "int4-split-tuned": dict(compress="int4-block", embedding="split", integer_offsets=True, tune_steps=200),
    # the <= 80 MB point with a margin: uint8 block scales (applied to per-block partial sums) free the
    # ~3 MB that the split table's rare rows need at 4 bits
    "int4-scaled-split4": dict(compress="int4-block", embedding="split", split_bits=4, block_scales="uint8"),  # iOS 26 (LUT chain)
    "int4-scaled-split4u": dict(compress="int4-block", embedding="split", split_bits=4, split_levels="uniform", block_scales="uint8"),  # iOS 18
    "palettize4": dict(compress="palettize4"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/cm/bench"))
    parser.add_argument("--variants", default="fp16,fp16-unsafe,int4-block,int4-block+int8-emb,int8,palettize4")
    parser.add_argument("--positions", type=int, default=64)
    parser.add_argument("--max-context", type=int, default=256)
    parser.add_argument("--more-positions", default="", help="also verify each package over these position counts (e.g. 128,256)")
    parser.add_argument("--second-text", type=Path, help="also verify each package on this text (--positions and --more-positions)")
    parser.add_argument("--compute-units", default="all", help="as the target's option: cpu_and_ne builds the fixed-shape Neural Engine program")
    parser.add_argument("--prefill-chunk", type=int, default=64, help="tokens per prefill call of the Neural Engine program")
    args = parser.parse_args()

    from edgepack.errors import EdgepackError
    from edgepack.targets.coreml import CoreMLConfig, build

    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.variants.split(","):
        config = CoreMLConfig(max_context=args.max_context, eval_positions=args.positions, force=True, compute_units=args.compute_units,
                              prefill_chunk=args.prefill_chunk, **VARIANTS[name])
        t0 = time.perf_counter()
        try:
            artifact = build(args.export, args.work / name, config, on_status=lambda m, name=name: print(f"  [{name}] {m}", file=sys.stderr, flush=True))
        except EdgepackError as exc:
            print(f"{name}: error: {exc}", flush=True)
            continue
        facts = artifact.facts
        mil = facts["verification"]["mil-reference"]
        row = {
            "variant": name,
            "package_bytes": facts["package_bytes"],
            "package_MB": round(facts["package_bytes"] / 1e6, 1),
            "package_MiB": round(facts["package_bytes"] / 2**20, 1),
            "positions": mil["positions"],
            "top1_agreement": round(mil["top1_agreement"], 4),
            "top1_ci95": [round(v, 4) for v in mil["top1_ci95"]],
            "near_tie_positions": mil["near_tie_positions"],
            "kl_mean": mil["kl_mean"],
            "kl_p99": mil["kl_p99"],
            "max_abs_logit_diff": mil["max_abs_logit_diff"],
            "finite": mil["finite"],
            "fp16_rewrites": facts["fp16_safety"]["rewritten_ops"],
            "mil_reference_seconds": mil["seconds"],
            "build_seconds": round(time.perf_counter() - t0, 1),
            "ane_cpu_and_ne": facts["ane"]["verdicts"]["cpu_and_ne"],
            "neural_engine": facts["ane"]["neural_engine"],
            "ane_findings": {f["id"]: f["severity"] for f in facts["ane"]["findings"]},
            "program": facts["program"]["shapes"],
            "prefill_chunks": mil.get("prefill_chunks"),
        }
        if args.more_positions:
            row["top1_by_positions"] = {mil["positions"]: row["top1_agreement"], **more_positions(args, artifact, config, args.more_positions)}
        if args.second_text:
            counts = ",".join(filter(None, [str(args.positions), args.more_positions]))
            row["second_text"] = {"text": str(args.second_text),
                                  "top1_by_positions": more_positions(args, artifact, replace(config, eval_text=args.second_text), counts)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if name == "fp16":
            (args.work / "fp16-safety.json").write_text(json.dumps(facts["fp16_safety"], indent=2))
            (args.work / "ane.json").write_text(json.dumps(facts["ane"], indent=2))
    (args.work / "coreml-bench.json").write_text(json.dumps(rows, indent=2) + "\n")
    _results.write("coreml", title="Core ML target: package size and parity with fp32 PyTorch (MIL reference interpreter)",
                   threads=None, rows=rows,
                   conditions={"export": str(args.export), "max_context": args.max_context, "positions": args.positions,
                               "compute_units": args.compute_units, "prefill_chunk": args.prefill_chunk,
                               "more_positions": args.more_positions or None,
                               "second_text": str(args.second_text) if args.second_text else None,
                               "variants": {name: VARIANTS[name] for name in args.variants.split(",")}},
                   notes="top-1 comes with its 95% interval and the count of positions where fp32 itself is a near tie.")
    print(f"\n{'variant':<22} {'MB':>7} {'MiB':>7} {'pos':>4} {'top-1':>7} {'KL mean':>10} {'max|dlogit|':>11}")
    for r in rows:
        print(f"{r['variant']:<22} {r['package_MB']:>7} {r['package_MiB']:>7} {r['positions']:>4} {r['top1_agreement']:>7.4f} "
              f"{r['kl_mean']:>10.2e} {r['max_abs_logit_diff']:>11.3g}")
    return 0


@functools.cache
def _reference(export: Path):
    """The fp32 PyTorch model, its tokenizer and source, loaded once for all re-verifications."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgepack.targets.coreml import read_source

    source = read_source(export)
    model = AutoModelForCausalLM.from_pretrained(source.hf_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(source.hf_dir), source


def more_positions(args, artifact, config, counts: str) -> dict:
    """Top-1 of the built package over more positions of `config`'s evaluation text (decoders only)."""
    from edgepack.targets.coreml import _eval_tokens, _verify

    model, tokenizer, source = _reference(args.export)
    tokens = _eval_tokens(tokenizer, config, source)
    out = {}
    for n in map(int, counts.split(",")):
        mil = _verify(artifact.out / "model.mlpackage", model, tokens, "decoder", args.max_context, replace(config, eval_positions=n))["mil-reference"]
        out[mil["positions"]] = round(mil["top1_agreement"], 4)
    return out


if __name__ == "__main__":
    sys.exit(main())
