"""Decode speed of SmolLM2-135M on this CPU, edgepack against its peers (not a test).

    python benchmarks/decode.py [--work DIR] [--runs 5] [--threads 2] [--prompt-len 128] [--gen-len 64]
                                [--variants a,b,...] [--precisions fp32,int8,int4,int4-rtn,int4-rtn-lm4,int4-exact,gguf,gguf-exact]

For each precision it builds (once, cached in --work) the edgepack artifacts: export -> quantize ->
`target ort`, plus onnxruntime-genai's own builder output at the same precision (when the builder
environment is set up). Every measurement runs in a fresh worker process (so peak RSS is that
variant's), variants are interleaved round by round so the machine's drift hits all alike, and each
variant gets one warm-up run before the timed runs. Every runtime gets the same explicit thread count (--threads:
edgepack's loop and onnxruntime-genai as intra-op threads with one inter-op thread, llama-bench as -t). Printed: TTFT for a prompt of --prompt-len
tokens, decode ms/token over --gen-len tokens (median and spread of --runs), peak RSS, the ratio to the
onnxruntime-genai builder at the same precision and to llama.cpp's llama-bench on the demo's own GGUF
(built from a pinned source: benchmarks/llamacpp.py), the speed-up over the fp32 optimum export, and the floor
(weight bytes read per token / best triad bandwidth measured in the same run). The table also goes to
benchmarks/results/decode.json for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import _results

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# precision -> (edgepack scheme and options, onnxruntime-genai builder precision to compare with).
# int4 is the fast CPU setting (HQQ blocks, int8 activations inside MatMulNBits: accuracy_level 4);
# int4-exact is the scheme's exact default (accuracy_level 0); gguf imports the demo's Q4_1 blocks.
PRECISIONS = {
    "fp32": (None, "fp32"),
    "int8": (("int8-weight", {}), None),
    "int4": (("int4", {"accuracy_level": 4}), "int4"),
    "int4-exact": (("int4", {}), "int4"),
    # The builder's own algorithm (round-to-nearest, integer zero points): same kernels, no block-minimum
    # correction, and the builder's quality class (top-1 ~0.68 on this Q4_1-derived model).
    "int4-rtn": (("int4", {"algorithm": "rtn", "accuracy_level": 4}), "int4"),
    # ... and with the builder's bit widths too (4-bit embedding/lm_head instead of int8): the same graph class.
    "int4-rtn-lm4": (("int4", {"algorithm": "rtn", "accuracy_level": 4, "lm_head": "int4", "embeddings": "int4"}), "int4"),
    # The default algorithm with the builder's 4-bit embedding/lm_head: fewer bytes per token, at what quality.
    "int4-lm4": (("int4", {"accuracy_level": 4, "lm_head": "int4", "embeddings": "int4"}), "int4"),
    # The GGUF's own blocks: the fast form (int8 activations, block minimums as residue columns) and the exact one.
    "gguf": (("gguf", {"accuracy_level": 4}), "int4"),
    "gguf-exact": (("gguf", {"accuracy_level": 0}), "int4"),
}
# llama.cpp runs the demo's own GGUF (the Q4_1 blocks the gguf scheme imports): the peer for gguf and int4.
VARIANTS = ("edgepack-ort", "genai-on-edgepack", "ort-mobile", "executorch", "genai-builder", "llama.cpp", "edgepack-export", "optimum-ort", "torch-eager")
# `target executorch` (XNNPACK) for a precision: torchao's scheme on the fp32 weights, the nearest to that precision.
EXECUTORCH_SCHEMES = {"fp32": "none", "int8": "8da8w", "int4": "8da4w"}


def _prompt_ids(length: int, vocab: int) -> list[int]:
    import numpy as np

    return [int(t) for t in np.random.default_rng(0).integers(100, vocab - 1, length)]


def _measure(variant: str, path: str, prompt_len: int, gen_len: int, threads: int) -> dict:
    """Runs in a fresh process: load, one generation of gen_len tokens after a prompt_len prompt."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    config = json.loads((Path(path) / "config.json").read_text()) if (Path(path) / "config.json").is_file() else {}
    vocab = int(config.get("vocab_size", 49152))
    prompt = _prompt_ids(prompt_len, vocab)
    steps: list[float] = []
    if variant == "ort-mobile":
        # The .ort as a minimal (mobile) build runs it: ORT format, no graph optimization at load beyond what
        # `target ort-mobile` saved in the file (a minimal build has no optimizers to run).
        import onnxruntime as ort

        from edgepack.runtime import DecoderSession, generate, load_model_dir

        model_dir = load_model_dir(path)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.add_session_config_entry("session.load_model_format", "ORT")
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.log_severity_level = 3
        session = ort.InferenceSession(str(model_dir.onnx_path), options, providers=["CPUExecutionProvider"])
        decoder = DecoderSession(session, model_dir.config, share_kv_buffer=model_dir.share_kv_buffer)
        load = time.perf_counter() - start
        steps = generate(decoder, prompt, max_new_tokens=gen_len).step_seconds
    elif variant in ("edgepack-ort", "edgepack-export"):
        from edgepack.runtime import DecoderSession, create_session, generate, load_model_dir

        model_dir = load_model_dir(path)
        decoder = DecoderSession(create_session(model_dir.onnx_path, threads=threads), model_dir.config, share_kv_buffer=model_dir.share_kv_buffer)
        load = time.perf_counter() - start
        result = generate(decoder, prompt, max_new_tokens=gen_len)
        steps = result.step_seconds
    elif variant in ("genai-on-edgepack", "genai-builder"):
        import onnxruntime_genai as og

        cfg = og.Config(path)
        cfg.clear_providers()
        # The same explicit threads as every other runtime here (edgepack's loop: intra-op `threads`, inter-op 1;
        # llama-bench -t): left unset, onnxruntime-genai picks its own thread pool, which decodes slower here than explicit threads.
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        model = og.Model(cfg)
        load = time.perf_counter() - start
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt_len + gen_len, min_length=prompt_len + gen_len, do_sample=False)
        generator = og.Generator(model, params)
        t0 = time.perf_counter()
        generator.append_tokens(prompt)
        while not generator.is_done():
            generator.generate_next_token()
            now = time.perf_counter()
            steps.append(now - t0)
            t0 = now
        steps = steps[:gen_len]
    elif variant == "executorch":
        from edgepack.targets.executorch_support import run

        method = run.load_method(Path(path) / "model.pte", threads)
        load = time.perf_counter() - start
        steps = run.timed_generation(method, prompt, gen_len)
    elif variant == "llama.cpp":
        import llamacpp

        figures = llamacpp.bench(Path(path), threads=threads, prompt_len=prompt_len, gen_len=gen_len)
        return {"load_s": None, "ttft_ms": figures["ttft_ms"], "decode_ms": figures["decode_ms"], "peak_rss_mb": figures["peak_rss_mb"]}
    elif variant == "optimum-ort":
        import onnxruntime as ort
        import torch
        from optimum.onnxruntime import ORTModelForCausalLM

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        model = ORTModelForCausalLM.from_pretrained(path, session_options=options, use_cache=True, use_io_binding=False)
        load = time.perf_counter() - start
        steps = _hf_steps(model, torch.tensor([prompt]), gen_len)
    elif variant == "torch-eager":
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
        load = time.perf_counter() - start
        steps = _hf_steps(model, torch.tensor([prompt]), gen_len)
    else:
        raise ValueError(variant)
    decode = steps[1:]
    return {
        "load_s": load,
        "ttft_ms": 1000 * steps[0],
        "decode_ms": 1000 * statistics.median(decode),
        "peak_rss_mb": _peak_rss_mb(),
    }


def _peak_rss_mb() -> float:
    """This process's peak RSS. Not getrusage's ru_maxrss: Linux keeps that across exec, so a spawned
    worker would report its parent's peak; VmHWM belongs to the new address space."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _hf_steps(model, ids, gen_len: int) -> list[float]:
    """Greedy loop with the KV cache through a transformers-style model, timing each step."""
    import torch

    steps = []
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        total = ids.shape[1]
        for _ in range(gen_len):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            now = time.perf_counter()
            steps.append(now - t0)
            t0 = now
            total += 1
            out = model(input_ids=token, attention_mask=torch.ones((1, total), dtype=torch.long),
                        past_key_values=out.past_key_values, use_cache=True)
    return steps


QUALITY_CONTEXT = 512  # llama-perplexity's default context: every artifact is scored on the same windows and positions


def _quality_windows(fp32: Path) -> tuple[list[list[int]], Path]:
    """Windows of QUALITY_CONTEXT tokens of the bundled evaluation text (no special tokens, as llama-perplexity
    reads a text file), and that text as a file for llama-perplexity."""
    from edgepack.core.texts import eval_text
    from edgepack.core.windows import token_ids
    from edgepack.runtime.model_dir import load_model_dir

    model_dir = load_model_dir(fp32)
    text, _ = eval_text()
    ids = token_ids(model_dir.load_tokenizer(), text, special_tokens=False, vocab_size=model_dir.config.get("vocab_size"))
    text_file = fp32.parent / "eval.txt"
    text_file.write_text(text)
    return [ids[i:i + QUALITY_CONTEXT] for i in range(0, len(ids) - QUALITY_CONTEXT + 1, QUALITY_CONTEXT)], text_file


def _quality(fp32: Path, artifacts: dict[str, Path], windows: list[list[int]], threads: int, executorch: dict | None = None) -> dict[str, dict]:
    """top-1 agreement and mean KL against the fp32 export of each artifact onnxruntime runs: each window prefilled
    from an empty cache, scored on the positions llama-perplexity scores (the second half of each window), so the
    llama.cpp row's figures (llama-perplexity --kl-divergence against the F32 GGUF) are on the same text and positions."""
    from edgepack.profiles.on_device import parity
    from edgepack.runners.probe import window_logits
    from edgepack.runtime.model_dir import load_model_dir

    reference_dir = load_model_dir(fp32)
    first = QUALITY_CONTEXT // 2

    def scored(logits: dict) -> dict:
        return {key: value[first:QUALITY_CONTEXT - 1] for key, value in logits.items()}

    reference = scored(window_logits(reference_dir, windows, threads))
    figures = {}
    for name, path in artifacts.items():
        model_dir = load_model_dir(path)
        if not model_dir.config:  # the builder writes genai_config.json only: the model's shapes are the export's
            model_dir.config.update(reference_dir.config)
        figures[name] = parity(reference, scored(window_logits(model_dir, windows, threads)))
    for name, path in (executorch or {}).items():  # ExecuTorch programs: the same windows, each from position 0
        from edgepack.targets.executorch_support import run

        method = run.load_method(path / "model.pte", threads)
        figures[name] = parity(reference, scored({f"window_{i}": run.decoder_logits(method, window, 0) for i, window in enumerate(windows)}))
    return figures


def _llamacpp_quality(work: Path, gguf_path: Path, text_file: Path, threads: int) -> dict:
    import llamacpp

    return llamacpp.kl_divergence(gguf_path, text_file, work / "llama-kld", threads=threads, context=QUALITY_CONTEXT)


def _bandwidth_gbs(threads: int) -> float:
    """Best STREAM triad bandwidth over 256 MB arrays with the benchmark's thread count (edgepack's calibration
    triad): the floor's denominator, so the floor is what this run's memory system could at best deliver."""
    from edgepack.profiles.calibrate import measure_triad

    return measure_triad(256, threads, repeats=3)["best_gb_s"]


def prepare(work: Path, precisions: list[str], variants: list[str]) -> dict[tuple[str, str], Path]:
    from edgepack.convert import ConvertConfig, convert_model
    from edgepack.quantize import QuantizeConfig, quantize_model
    from edgepack.targets.genai_builder import builder_python, run_builder
    from edgepack.targets.ort import OrtTargetConfig, build

    work.mkdir(parents=True, exist_ok=True)
    paths: dict[tuple[str, str], Path] = {}
    fp32 = work / "export-fp32"
    if not (fp32 / "convert.json").is_file():
        print("exporting smollm2-135m ...", file=sys.stderr)
        convert_model("smollm2-135m", fp32, ConvertConfig(verify=False, force=True))
    hf_dir = Path(json.loads((fp32 / "convert.json").read_text())["source"]["hf_dir"])
    for precision in precisions:
        source = fp32
        quantization, builder_precision = PRECISIONS[precision]
        if quantization:
            scheme, options = quantization
            source = work / f"export-{precision}"
            if not (source / "quantize.json").is_file():
                print(f"quantizing {precision} ({scheme}) ...", file=sys.stderr)
                quantize_model(fp32, source, QuantizeConfig(scheme=scheme, scheme_options=options, evaluate=False, force=True))
        bundle = work / f"ort-{precision}"
        if "edgepack-ort" in variants or "genai-on-edgepack" in variants:
            if not (bundle / "target.json").is_file():
                print(f"target ort {precision} ...", file=sys.stderr)
                build(source, bundle, OrtTargetConfig(verify=False, force=True))
            paths[("edgepack-ort", precision)] = bundle
            paths[("genai-on-edgepack", precision)] = bundle
        if "ort-mobile" in variants and quantization:
            from edgepack.targets.ort_mobile import OrtMobileConfig
            from edgepack.targets.ort_mobile import build as build_mobile

            mobile = work / f"ort-mobile-{precision}"
            if not (mobile / "target.json").is_file():
                print(f"target ort-mobile {precision} ...", file=sys.stderr)
                build_mobile(bundle, mobile, OrtMobileConfig(verify=False, force=True))
            paths[("ort-mobile", precision)] = mobile
        paths[("edgepack-export", precision)] = source
        if "genai-builder" in variants and builder_precision and builder_python() is not None:
            native = work / f"builder-{builder_precision}"
            if not (native / "genai_config.json").is_file():
                print(f"onnxruntime-genai builder {builder_precision} ...", file=sys.stderr)
                run_builder(hf_dir, native, precision=builder_precision, cache_dir=work / "builder-cache")
            paths[("genai-builder", precision)] = native
        if "llama.cpp" in variants and precision in ("gguf", "gguf-exact", "int4", "int4-exact", "int4-rtn"):
            import llamacpp

            from edgepack.sources import DEMO_MODELS, find_demo_gguf

            llamacpp.llama_bench()  # built once, before the timed rounds
            paths[("llama.cpp", precision)] = find_demo_gguf(DEMO_MODELS["smollm2-135m"])
        if "executorch" in variants and precision in EXECUTORCH_SCHEMES:
            from edgepack.targets.executorch import ExecuTorchConfig
            from edgepack.targets.executorch import build as build_executorch

            program = work / f"executorch-{precision}"
            if not (program / "target.json").is_file():
                print(f"target executorch {EXECUTORCH_SCHEMES[precision]} ...", file=sys.stderr)
                # Room for the 1024-token prompt run and the quality windows.
                build_executorch(fp32, program, ExecuTorchConfig(quantize=EXECUTORCH_SCHEMES[precision], max_context=2048, verify=False, force=True))
            paths[("executorch", precision)] = program
        if precision == "fp32":
            paths[("optimum-ort", "fp32")] = fp32
            paths[("torch-eager", "fp32")] = hf_dir
    return paths


def llamacpp_version() -> str:
    import llamacpp

    return llamacpp.LLAMA_CPP_PYTHON


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("EDGEPACK_CACHE", Path.home() / ".cache/edgepack")) / "bench-decode")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=64)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--name", help="results file name (default: decode, or decode-N for --prompt-len N)")
    parser.add_argument("--precisions", default="fp32,int8,int4,int4-rtn,int4-exact,gguf",
                        help=f"comma-separated, from {', '.join(PRECISIONS)}")
    args = parser.parse_args()
    variants, precisions = args.variants.split(","), args.precisions.split(",")

    paths = prepare(args.work, precisions, variants)
    jobs = [(v, p) for p in precisions for v in variants if (v, p) in paths]
    # Quality of every ONNX artifact measured (llama.cpp runs the GGUF the gguf bundle imports exactly: that row's)
    onnx_artifacts = {str(path): path for (variant, _p), path in paths.items() if variant in ("edgepack-ort", "ort-mobile", "genai-builder", "edgepack-export")}
    windows, text_file = _quality_windows(args.work / "export-fp32")
    quality = _quality(args.work / "export-fp32", onnx_artifacts, windows, args.threads,
                       executorch={str(path): path for (variant, _p), path in paths.items() if variant == "executorch"})
    llama_rows = {path for (variant, _p), path in paths.items() if variant == "llama.cpp"}
    for gguf_path in llama_rows:
        quality["llama.cpp:" + str(gguf_path)] = _llamacpp_quality(args.work, gguf_path, text_file, args.threads)
    from edgepack.profiles.model_facts import model_facts

    bytes_per_token = {}
    for precision in precisions:
        bundle = paths.get(("edgepack-ort", precision)) or paths.get(("edgepack-export", precision))
        if bundle is not None and (bundle / "model.onnx").is_file():
            bytes_per_token[precision] = model_facts(bundle / "model.onnx").weight_bytes_per_token

    ctx = mp.get_context("spawn")
    # One measurement per distinct artifact: the builder's int4 output serves int4, int4-exact and gguf.
    unique = sorted({(variant, str(paths[(variant, precision)])) for variant, precision in jobs})
    samples: dict[tuple[str, str], list[dict]] = {job: [] for job in unique}
    bandwidth = []
    for round_index in range(args.runs + 1):  # round 0 is the warm-up
        bandwidth.append(_bandwidth_gbs(args.threads))
        for job in unique:
            with ctx.Pool(1, maxtasksperchild=1) as pool:
                result = pool.apply(_measure, (job[0], job[1], args.prompt_len, args.gen_len, args.threads))
            if round_index:
                samples[job].append(result)
            print(f"round {round_index} {job[0]:<18} {Path(job[1]).name:<16} decode {result['decode_ms']:.1f} ms/token",
                  file=sys.stderr)
    bw = statistics.median(bandwidth)

    def runs_of(variant: str, precision: str) -> list[dict]:
        path = paths.get((variant, precision))
        return samples.get((variant, str(path)), []) if path else []

    def median_decode(variant: str, precision: str) -> float | None:
        runs = runs_of(variant, precision)
        return statistics.median(s["decode_ms"] for s in runs) if runs else None

    fp32_export = median_decode("edgepack-export", "fp32")
    print(f"\nSmolLM2-135M-Instruct, {args.threads} threads, prompt {args.prompt_len} tokens, {args.gen_len} decoded tokens, "
          f"median of {args.runs} interleaved runs after 1 warm-up; memory bandwidth {bw:.1f} GB/s (best STREAM triad, same run)\n")
    print("| precision | variant | TTFT ms | decode ms/token (min-max) | vs genai builder | vs llama.cpp | speed-up vs fp32 optimum export "
          "| peak RSS MB | floor ms/token | top-1 vs fp32 | KL vs fp32 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")

    def quality_of(variant: str, precision: str) -> dict:
        if variant == "llama.cpp":
            return quality.get("llama.cpp:" + str(paths.get((variant, precision))), {})
        path = paths.get((variant, precision)) or paths.get(("edgepack-export", precision))
        return quality.get(str(path), {}) if path else {}
    result_rows = []
    for precision in precisions:
        builder = median_decode("genai-builder", precision)
        peer = median_decode("llama.cpp", precision)
        floor = bytes_per_token[precision] / (bw * 1e9) * 1000 if precision in bytes_per_token else float("nan")
        for variant in variants:
            runs = runs_of(variant, precision)
            if not runs:
                continue
            decode = [s["decode_ms"] for s in runs]
            median = statistics.median(decode)
            vs_builder = f"{median / builder:.2f}x" if builder else ""
            vs_peer = f"{median / peer:.2f}x" if peer else ""
            speedup = f"{fp32_export / median:.2f}x" if fp32_export else ""
            print(f"| {precision} | {variant} | {statistics.median(s['ttft_ms'] for s in runs):.0f} | "
                  f"{median:.1f} ({min(decode):.1f}-{max(decode):.1f}) | {vs_builder} | {vs_peer} | {speedup} | "
                  f"{max(s['peak_rss_mb'] for s in runs):.0f} | {floor:.1f} | {quality_of(variant, precision).get('top1_agreement', float('nan')):.3f} | "
                  f"{quality_of(variant, precision).get('kl_mean', float('nan')):.2e} |")
            result_rows.append({"precision": precision, "variant": variant, "TTFT ms": statistics.median(s["ttft_ms"] for s in runs),
                                "decode ms/token": median, "decode min": min(decode), "decode max": max(decode),
                                "vs genai builder": median / builder if builder else None,
                                "vs llama.cpp": median / peer if peer else None,
                                "speed-up vs fp32 export": fp32_export / median if fp32_export else None,
                                "peak RSS MB": max(s["peak_rss_mb"] for s in runs), "floor ms/token": floor,
                                "top-1 vs fp32": quality_of(variant, precision).get("top1_agreement"),
                                "KL vs fp32": quality_of(variant, precision).get("kl_mean")})
    print("\nedgepack-export fp32 is optimum-onnx's export run by edgepack's runtime (the 'fp32 optimum "
          "export'); optimum-ort is the same file through optimum's ORTModelForCausalLM.")
    _results.write(
        args.name or ("decode" if args.prompt_len == 128 else f"decode-{args.prompt_len}"),
        title="Decode speed of edgepack's bundles against their peers" + ("" if args.prompt_len == 128 else f" after {args.prompt_len} tokens"),
        threads=args.threads, rows=result_rows,
        conditions={"model": "SmolLM2-135M-Instruct", "llama.cpp": f"llama-bench from llama-cpp-python {llamacpp_version()} sdist"
                    if "llama.cpp" in variants else None, "prompt_len": args.prompt_len, "gen_len": args.gen_len, "runs": args.runs,
                    "warmup_runs": 1, "order": "variants interleaved round by round, each in a fresh process",
                    "triad_GB_s": bw, "precisions": {p: PRECISIONS[p][0] and {"scheme": PRECISIONS[p][0][0], **PRECISIONS[p][0][1]}
                                                      for p in precisions}, "loadavg_end": _results.loadavg()},
        notes=f"Quality: top-1 agreement and mean KL against the fp32 export on windows of {QUALITY_CONTEXT} tokens of the bundled "
              "evaluation text, scored on the second half of each window as llama-perplexity scores it; the llama.cpp row's are "
              "llama-perplexity --kl-divergence of its run of the GGUF against the F32 GGUF of the same weights, on the same text "
              "(fp32 there is the GGUF's own weights, as the fp32 export is). llama.cpp decodes after --prompt-len tokens of "
              "context (llama-bench -d). "
              "edgepack-export fp32 is optimum-onnx's export run by edgepack's runtime; optimum-ort is the same file through "
              "optimum's ORTModelForCausalLM. floor = weight bytes read per token / triad bandwidth. Absolute figures move "
              "with the machine's load; ratios within one run are the comparison.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
