"""onnxruntime-genai's model builder, run in its own virtual environment.

Why isolated: the builder writes the fastest CPU graph we know for Llama-family decoders (fused QKV,
GroupQueryAttention with rotary embedding, SkipSimplifiedLayerNormalization; 342 nodes for SmolLM2
against optimum's 7426), but onnxruntime-genai 0.18's builder needs transformers 5, while
optimum-onnx 0.1.0 pins transformers 4.57. So edgepack keeps its own environment on the pins and
runs the builder as a subprocess from a second environment under the cache:

    python -m edgepack.targets.genai_builder install      # once (scripts/setup.sh does it)

`EDGEPACK_GENAI_BUILDER_PYTHON` may point at any Python that can `import onnxruntime_genai.models.builder`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from edgepack.errors import NotOnThisHostError, UnsupportedModelError
from edgepack.processes import run_child

BUILDER_REQUIREMENTS = [
    "torch==2.13.0",  # CPU build from the local wheel; pinned so no CUDA build is pulled
    "transformers==5.24.0",
    "onnx==1.23.2",
    "onnx-ir",
    "onnxruntime==1.32.0",
    "onnxruntime-genai==0.18.0",
    "safetensors",
    "sentencepiece",
    "jinja2",
    "protobuf",
]
# Decoder families the builder supports that edgepack routes through it (transformers model_type).
BUILDER_MODEL_TYPES = {
    "llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
    "gemma": "gemma", "gemma2": "gemma2", "granite": "granite", "olmo": "olmo", "smollm3": "smollm3",
}


def builder_env_dir() -> Path:
    from edgepack.sources import cache_root

    return cache_root() / "tools" / "genai-builder-0.18"


def builder_python() -> Path | None:
    override = os.environ.get("EDGEPACK_GENAI_BUILDER_PYTHON")
    if override:
        return Path(override)
    python = builder_env_dir() / "bin" / "python"
    return python if (builder_env_dir() / ".edgepack-complete").is_file() and python.is_file() else None


def install(quiet: bool = True) -> Path:
    """Create the builder's virtual environment (idempotent); return its Python."""
    env = builder_env_dir()
    if (env / ".edgepack-complete").is_file():
        return env / "bin" / "python"
    env.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(env)], check=True)
    pip = [str(env / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"] + (["--quiet"] if quiet else [])
    subprocess.run(pip + ["torch==2.13.0"], check=True)  # first, so nothing below resolves a CUDA torch
    subprocess.run(pip + BUILDER_REQUIREMENTS, check=True)
    subprocess.run([str(env / "bin" / "python"), "-c", "import onnxruntime_genai.models.builder"], check=True)
    (env / ".edgepack-complete").write_text(json.dumps(BUILDER_REQUIREMENTS) + "\n")
    return env / "bin" / "python"


def run_builder(hf_dir: Path, out: Path, *, precision: str = "fp32", max_context: int | None = None,
                cache_dir: Path | None = None, log_path: Path | None = None) -> None:
    """Run the builder on a Hugging Face folder into `out` (model.onnx[.data] + genai_config.json + tokenizer)."""
    python = builder_python()
    if python is None:
        raise NotOnThisHostError(
            "onnxruntime-genai's model builder is not set up: run `python -m edgepack.targets.genai_builder install` "
            "(or scripts/setup.sh), or pass --graph optimum"
        )
    config = json.loads((hf_dir / "config.json").read_text())
    if config.get("model_type") not in BUILDER_MODEL_TYPES:
        raise UnsupportedModelError(
            f"onnxruntime-genai's builder does not take model_type {config.get('model_type')!r}; use --graph optimum"
        )
    # windowed_kv_cache=0: sliding-window layers (gemma2) keep a cache as long as the others, as the graph's other
    # runtimes expect. The builder's default bounds those layers' cache to the window, which only onnxruntime-genai's
    # own buffer management feeds; edgepack's runtime (which verifies every bundle) grows one cache per sequence.
    extra = ["enable_cuda_graph=0", "windowed_kv_cache=0"]
    if max_context:
        extra.append(f"context_length={max_context}")
    command = [
        str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
        "-p", precision, "-e", "cpu", "-c", str(cache_dir or out / ".builder-cache"), "--extra_options", *extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    result = run_child(command, env=env)  # dies with edgepack: a killed build leaves no builder writing
    if log_path is not None:
        log_path.write_text(result.stdout + "\n--- stderr ---\n" + result.stderr)
    if result.returncode != 0 or not (out / "model.onnx").is_file():
        lines = result.stderr.strip().splitlines()
        disk = _disk_failure(result.returncode, "\n".join(lines[-30:]))
        if disk is not None:  # the disk under the output or the cache, not the model
            from edgepack.errors import UsageError

            raise UsageError(f"cannot write {out}: {disk} while onnxruntime-genai's builder wrote the graph there "
                             f"(its cache: {cache_dir or out / '.builder-cache'})")
        last = (lines or ["no output"])[-1]
        raise UnsupportedModelError(f"onnxruntime-genai's builder failed on {hf_dir}: {last}")


# Errors only a write can raise: whatever the model, these are about the disk the builder writes to.
_WRITE_ERRNOS = ("ENOSPC", "EDQUOT", "EROFS", "EFBIG")


def _disk_failure(returncode: int, stderr_tail: str) -> str | None:
    """'<strerror> (<ERRNO>, errno N)' when the builder failed writing, else None (then the model is to blame)."""
    import errno
    import signal

    for name in _WRITE_ERRNOS:
        number = getattr(errno, name, None)
        if number is None:
            continue
        reason = os.strerror(number)
        if f"[Errno {number}]" in stderr_tail or reason in stderr_tail or name in stderr_tail:
            return f"{reason} ({name}, errno {number})"
    if hasattr(signal, "SIGXFSZ") and returncode == -signal.SIGXFSZ:  # killed for passing the file size limit
        return "file size limit exceeded (SIGXFSZ)"
    return None


if __name__ == "__main__":
    if sys.argv[1:] == ["install"]:
        print(install(quiet=True))
    elif sys.argv[1:] == ["path"]:
        print(builder_python() or "not installed")
    else:
        print("usage: python -m edgepack.targets.genai_builder install|path", file=sys.stderr)
        sys.exit(2)
