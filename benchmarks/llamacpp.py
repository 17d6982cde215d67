"""llama.cpp as the peer on the same GGUF: `llama-bench` built from a pinned source package, and its figures.

llama.cpp publishes no Linux CPU binary on the registries this project installs from; the PyPI sdist of
llama-cpp-python carries the whole llama.cpp tree (vendor/llama.cpp) at a known commit, so that sdist,
pinned below, is the source. Built once into $EDGEPACK_CACHE/tools/llama-cpp-<version>/ (about five
minutes on two cores), CPU only, with the host's native instruction set as llama.cpp's default build.

    python benchmarks/llamacpp.py                    # build (once) and print the llama-bench path
    python benchmarks/llamacpp.py --bench GGUF       # one llama-bench run: prompt 128, 64 tokens, 2 threads
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"  # the sdist whose vendor/llama.cpp is built


def tools_dir() -> Path:
    root = Path(os.environ.get("EDGEPACK_CACHE", Path.home() / ".cache" / "edgepack"))
    return root / "tools" / f"llama-cpp-{LLAMA_CPP_PYTHON}"


def llama_bench(build: bool = True, target: str = "llama-bench") -> Path | None:
    """The llama-bench (or another llama.cpp `target`) binary, built from the pinned sdist when missing (None when
    not built and build=False)."""
    folder = tools_dir()
    binary = folder / "build" / "bin" / target
    if binary.is_file() or not build:
        return binary if binary.is_file() else None
    folder.mkdir(parents=True, exist_ok=True)
    sdist = folder / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(folder)], check=True)
    source = folder / "src"
    if not (source / "CMakeLists.txt").is_file():
        shutil.rmtree(source, ignore_errors=True)
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        with tarfile.open(sdist) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(prefix)]
            for member in members:
                member.name = member.name[len(prefix):]
            archive.extractall(source, members=[m for m in members if m.name], filter="data")
    build_dir = folder / "build"
    subprocess.run(["cmake", "-S", str(source), "-B", str(build_dir), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_NATIVE=ON"], check=True)
    subprocess.run(["cmake", "--build", str(build_dir), "--target", target, "-j", str(os.cpu_count() or 2)], check=True)
    return binary


def f32_gguf(gguf_path: Path, out: Path) -> Path:
    """The same GGUF with every tensor dequantized to F32 (metadata kept, file type ALL_F32): the exact weights
    llama.cpp's quantized run is compared with. Written once."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize

    if out.is_file():
        return out
    reader = gguf.GGUFReader(str(gguf_path))
    writer = gguf.GGUFWriter(str(out) + ".tmp", reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = int(gguf.LlamaFileType.ALL_F32) if key == "general.file_type" else field.contents()
        kind = field.types[0]
        writer.add_key_value(key, value, kind, sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape)))
        writer.add_tensor(tensor.name, values, raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(str(out) + ".tmp", out)
    return out


def kl_divergence(gguf_path: Path, text_file: Path, work: Path, *, threads: int, context: int = 512) -> dict:
    """llama.cpp's own quality loss on this GGUF: `llama-perplexity --kl-divergence` of the quantized run against
    the F32 GGUF of the same weights, on `text_file` (llama-perplexity scores the second half of each context
    window). Returns kl_mean, top1_agreement ("Same top p"), positions, context."""
    import re

    binary = llama_bench(target="llama-perplexity")
    work.mkdir(parents=True, exist_ok=True)
    reference = f32_gguf(gguf_path, work / (gguf_path.stem + ".f32.gguf"))
    base = work / "base.kld"
    common = ["-f", str(text_file), "-c", str(context), "-t", str(threads), "--kl-divergence-base", str(base)]
    subprocess.run([str(binary), "-m", str(reference), *common], capture_output=True, text=True, check=True)
    done = subprocess.run([str(binary), "-m", str(gguf_path), *common, "--kl-divergence"], capture_output=True, text=True, check=True)
    log = done.stdout + done.stderr
    kl = float(re.search(r"Mean\s+KLD:\s+([-0-9.e]+)", log).group(1))
    same = float(re.search(r"Same top p:\s+([0-9.]+)", log).group(1)) / 100
    found = re.search(r"computing over (\d+) chunks", log)
    chunks = int(found.group(1)) if found else None
    return {"kl_mean": kl, "top1_agreement": same, "context": context,
            "positions": None if chunks is None else chunks * (context - context // 2 - 1),
            "method": "llama-perplexity --kl-divergence against the F32 GGUF of the same weights"}


def bench(gguf: Path, *, threads: int, prompt_len: int, gen_len: int, repetitions: int = 1) -> dict:
    """llama-bench's prompt processing of prompt_len tokens (from an empty cache) and its generation of gen_len
    tokens after prompt_len tokens of context (`-d`, as the other runtimes decode after the prompt), as TTFT ms,
    decode ms/token and the process's peak RSS."""
    binary = llama_bench()

    def run(*args: str) -> dict:
        done = subprocess.run([str(binary), "-m", str(gguf), "-t", str(threads), "-r", str(repetitions), "-o", "json", *args],
                              capture_output=True, text=True, check=True)
        return json.loads(done.stdout)[0]

    prompt = run("-p", str(prompt_len), "-n", "0")
    generate = run("-p", "0", "-n", str(gen_len), "-d", str(prompt_len))
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the benchmark's own processes (Linux: KiB)
    return {"ttft_ms": 1000 * prompt_len / prompt["avg_ts"], "decode_ms": 1000 / generate["avg_ts"], "peak_rss_mb": peak_kb / 1024,
            "depth": generate.get("n_depth"), "build_commit": prompt.get("build_commit"), "cpu_info": prompt.get("cpu_info"),
            "type_k": prompt.get("type_k")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", type=Path, default=None, help="a GGUF to run llama-bench on")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    binary = llama_bench()
    print(binary)
    if args.bench:
        print(json.dumps(bench(args.bench, threads=args.threads, prompt_len=128, gen_len=64), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
