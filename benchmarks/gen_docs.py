"""Write docs/benchmarks.md from the result files in benchmarks/results/.

    python benchmarks/gen_docs.py            # rewrite docs/benchmarks.md
    python benchmarks/gen_docs.py --check    # exit 1 if docs/benchmarks.md is stale

Every figure on that page comes from a result file a benchmark script wrote; a benchmark without a
result file is listed as not yet recorded, with the command that records it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DOC = HERE.parent / "docs" / "benchmarks.md"
REGENERATE = "python benchmarks/gen_docs.py"

# name -> (script, what it measures, how to record it). The order is the page's order.
BENCHMARKS: dict[str, tuple[str, str, str]] = {
    "quality": ("benchmarks/quality.py", "Size and quality (perplexity, top-1 agreement, KL) of every quantization scheme "
                "against fp32 on the demo model.", "python benchmarks/quality.py"),
    "decode": ("benchmarks/decode.py", "Decode and prefill speed and peak memory of edgepack's bundles against "
               "onnxruntime-genai's model builder, llama.cpp on the demo's own GGUF, the optimum export and PyTorch, "
               "variants interleaved in fresh processes.",
               "python benchmarks/decode.py --threads 2"),
    "decode-1024": ("benchmarks/decode.py --prompt-len 1024", "The same comparison after a 1024-token prompt: decode reads "
                    "a KV cache of 1024+ positions.", "python benchmarks/decode.py --threads 2 --prompt-len 1024"),
    "decode-executorch": ("benchmarks/decode.py --name decode-executorch", "ExecuTorch's XNNPACK program (`target executorch`, "
                          "torchao 8da4w) in ExecuTorch's runtime next to the ort int4 bundle in onnxruntime-genai, the builder's "
                          "int4 and llama.cpp on the demo's GGUF, interleaved in fresh processes.",
                          "python benchmarks/decode.py --threads 2 --precisions int4 --variants genai-on-edgepack,executorch,genai-builder,"
                          "llama.cpp --name decode-executorch"),
    "encoder": ("benchmarks/encoder.py", "Sentence encoders: batch-8 latency, size and sentence-embedding cosine against fp32 of "
                "the encoder default and its alternatives on all-MiniLM-L6-v2, interleaved in one process.",
                "python benchmarks/encoder.py --threads 2"),
    "projection": ("benchmarks/projection.py", "The device projection checked against measurement on this host: the host "
                   "is calibrated, models are profiled, and projected decode ms/token is compared with the measured one.",
                   "python benchmarks/projection.py --models /tmp/p --threads 2  # models: see the script's docstring"),
    "projection-paired": ("benchmarks/projection.py --paired", "The same comparison with calibration and measurement "
                          "alternated per round, for shared hosts whose load changes.",
                          "python benchmarks/projection.py --models /tmp/p --threads 2 --paired 5"),
    "published": ("benchmarks/published.py", "edgepack's device projections (`edgepack estimate`) against decode and prefill "
                  "speeds that vendors and projects published for devices of the database: the efficiencies fitted to the "
                  "`fit` rows, the error reported on the `held-out` rows.", "python benchmarks/published.py"),
    "coreml": ("benchmarks/coreml.py", "Core ML packages: size, parity with fp32 PyTorch (MIL reference interpreter) and the ANE "
               "report's verdict for each compression variant.",
               "python benchmarks/coreml.py EXPORT --compute-units cpu_and_ne --max-context 512 --positions 320 "
               "--variants fp16,int4-block+int8-emb,int4-block,int8,palettize4"),
    "coreml-table-study": ("benchmarks/coreml_table_study.py", "Weight formats for the tied embedding table simulated in "
                           "PyTorch: estimated package size against top-1 agreement.",
                           "python benchmarks/coreml_table_study.py EXPORT exact/int8row res16/split:6000:64:nf"),
    "scale": ("benchmarks/scale.py", "Wall time and peak memory of each stage, one process per stage, on random-weight "
              "models of real shapes (SmolLM2-135M, Qwen2.5-0.5B, Llama-3.2-1B), against the memory target of 2x the "
              "fp32 weight bytes and 12 GB.", "python benchmarks/scale.py"),
    "qnn": ("benchmarks/qnn.py", "QNN target in the HTP simulator: nodes on the HTP, parity with fp32, compile and "
            "simulator time, with and without the sensitivity rescue.", "python benchmarks/qnn.py EXPORT --rescue 0 16"),
}

HEADER = f"""# Benchmarks

Measured figures of edgepack, each with the commit, package versions, host and conditions it was
measured under. The scripts in `benchmarks/` write `benchmarks/results/<name>.json`; this page is
generated from those files by `{REGENERATE}` (do not edit it by hand). Figures depend on the host
and its load: compare rows of one result file, not absolute figures across hosts. A benchmark listed
as *not yet recorded* has no result file; run its command to record one.
"""


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0:
            return "0"
        magnitude = abs(value)
        if magnitude >= 100:
            return f"{value:.1f}"
        if magnitude >= 1:
            return f"{value:.2f}"
        if magnitude >= 0.001:
            return f"{value:.4f}"
        return f"{value:.2e}"
    if isinstance(value, (list, dict)):
        return "`" + json.dumps(value, separators=(",", ":")) + "`"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(rows: list[dict]) -> str:
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines.extend("| " + " | ".join(_cell(row.get(column)) for column in columns) + " |" for row in rows)
    return "\n".join(lines)


def _section(name: str, script: str, what: str, command: str, record: dict | None) -> str:
    lines = [f"## {name}", "", f"{what} Script: `{script}`.", ""]
    if record is None:
        lines += ["*Not yet recorded.* Record it with:", "", "```bash", command, "```", ""]
        return "\n".join(lines)
    host, commit, versions = record["host"], record["commit"], record["versions"]
    sha = (commit.get("sha") or "unknown")[:12] + (" (with local changes)" if commit.get("dirty") else "")
    pinned = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    lines += [
        f"**{record['title']}**", "",
        f"- recorded: {record['recorded_utc']} at commit `{sha}` with `{record['command']}`",
        f"- host: {host.get('cpu')}, {host.get('cores')} cores, {host.get('ram_mb')} MB RAM, {host.get('system')} {host.get('machine')}"
        + (f"; {record['threads']} threads" if record.get("threads") else ""),
        f"- versions: {pinned}",
        "- conditions: " + "; ".join(f"{k} {_cell(v)}" for k, v in record["conditions"].items() if v is not None),
        "",
        _table(record["rows"]) if record["rows"] else "*The run produced no rows.*",
        "",
    ]
    if record.get("notes"):
        lines += [record["notes"], ""]
    return "\n".join(lines)


def render() -> str:
    parts = [HEADER]
    known = set(BENCHMARKS)
    for name, (script, what, command) in BENCHMARKS.items():
        path = RESULTS / f"{name}.json"
        record = json.loads(path.read_text()) if path.is_file() else None
        parts.append(_section(name, script, what, command, record))
    for path in sorted(RESULTS.glob("*.json")):
        if path.stem not in known:
            record = json.loads(path.read_text())
            parts.append(_section(path.stem, record.get("command", ""), "", "", record))
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 when docs/benchmarks.md is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not DOC.is_file() or DOC.read_text(encoding="utf-8") != text:
            print(f"docs/benchmarks.md is stale: run `{REGENERATE}`", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
