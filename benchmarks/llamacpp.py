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


def llama_bench(build: bool = True) -> Path | None:
    """The llama-bench binary, built from the pinned sdist when missing (None when not built and build=False)."""
    folder = tools_dir()
    binary = folder / "build" / "bin" / "llama-bench"
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
    subprocess.run(["cmake", "--build", str(build_dir), "--target", "llama-bench", "-j", str(os.cpu_count() or 2)], check=True)
    return binary


def bench(gguf: Path, *, threads: int, prompt_len: int, gen_len: int, repetitions: int = 1) -> dict:
    """One llama-bench run: prompt processing of prompt_len tokens and generation of gen_len tokens (its own
    `pp`/`tg` tests), as TTFT ms, decode ms/token and the process's peak RSS."""
    binary = llama_bench()
    done = subprocess.run([str(binary), "-m", str(gguf), "-t", str(threads), "-p", str(prompt_len), "-n", str(gen_len),
                           "-r", str(repetitions), "-o", "json"], capture_output=True, text=True, check=True)
    rows = json.loads(done.stdout)
    prompt = next(r for r in rows if r["n_prompt"] == prompt_len and r["n_gen"] == 0)
    generate = next(r for r in rows if r["n_gen"] == gen_len and r["n_prompt"] == 0)
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the benchmark's own process (Linux: KiB)
    return {"ttft_ms": 1000 * prompt_len / prompt["avg_ts"], "decode_ms": 1000 / generate["avg_ts"], "peak_rss_mb": peak_kb / 1024,
            "build_commit": prompt.get("build_commit"), "cpu_info": prompt.get("cpu_info"), "type_k": prompt.get("type_k")}


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
