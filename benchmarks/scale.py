"""Wall time and peak memory of every edgepack stage on random-weight models of real shapes (not a test).

    python benchmarks/scale.py [--shapes smollm2-135m,qwen2.5-0.5b,llama-3.2-1b] [--stages convert,quantize,...,build]
                               [--work DIR] [--models DIR] [--timeout 3600] [--stage-args STAGE='--opt value' ...]

Each shape is a Hugging Face folder with the architecture's real dimensions and random weights (fp32
safetensors, the demo's tokenizer), built once under --models (default WORK/models) and reused when
present. Each stage then runs as its own process, `python -m edgepack ...` from this checkout, one after
another:

    convert -> quantize --scheme int4 -> target ort
                                      -> target ort-mobile
            -> target qnn --precision w4a16
            -> target coreml --compress int4-block

with small but real evaluation settings (STAGES below; --stage-args adds options to one stage). The `build`
stage runs all of them again as one recipe (`edgepack build --jobs 2`, profile and budget check included,
with an empty stage cache): the time a release pipeline takes for the model. Per stage it
records the wall time, the peak RSS of the stage's process (`ru_maxrss` from `wait4` on it: the largest
single process of its tree), the peak of the whole tree's summed RSS (sampled every 0.2 s, for stages
that run workers side by side), the output size, the exit code and error line, the model's fp32 weight
bytes and the ratio of the peak to them, and a verdict: "timed out" or "failed (exit N)" for a stage that did
not finish, else the memory target: at most 2x the fp32 weight bytes and below 12 GB. A stage that fails is recorded with its exit code and error line, and the
stages that need its output are skipped. The table is printed and written, with the conditions, to
benchmarks/results/scale.json (docs/benchmarks.md is generated from it).

Run it alone on the machine (other processes' memory pressure and CPU load change the figures).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import _results

ROOT = _results.ROOT
GB = 1e9
MAX_RATIO = 2.0  # peak RSS / fp32 weight bytes
MAX_RSS_BYTES = 12 * GB

# Transformers configs of the shapes (the published models' dimensions; weights are random).
SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, hidden_act="silu", bos_token_id=1, eos_token_id=2,
                         pad_token_id=2),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0,
                         max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu", bos_token_id=None, eos_token_id=0),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0, head_dim=64,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu",
                         rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                       "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                         bos_token_id=1, eos_token_id=2),
    "gemma-2-2b": dict(model_type="gemma2", hidden_size=2304, num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                       head_dim=256, intermediate_size=9216, vocab_size=256000, tie_word_embeddings=True,
                       hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, sliding_window=4096,
                       final_logit_softcapping=30.0, attn_logit_softcapping=50.0, max_position_embeddings=8192,
                       rms_norm_eps=1e-6, bos_token_id=2, eos_token_id=1, pad_token_id=0),
}
DEFAULT_SHAPES = ("smollm2-135m", "qwen2.5-0.5b", "llama-3.2-1b")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@dataclass(frozen=True)
class Stage:
    name: str
    needs: str | None  # the stage whose output is this one's input (None: the Hugging Face folder)
    command: tuple[str, ...]  # `python -m edgepack` arguments before DIR
    args: tuple[str, ...]  # options after `-o OUT`
    done_file: str  # present in a complete output


STAGES = (
    Stage("convert", None, ("convert",), (), "convert.json"),
    Stage("quantize", "convert", ("quantize",), ("--scheme", "int4", "--eval-tokens", "128"), "quantize.json"),
    Stage("ort", "quantize", ("target", "ort"), ("--max-context", "256"), "target.json"),
    Stage("ort-mobile", "quantize", ("target", "ort-mobile"), (), "target.json"),
    Stage("qnn", "convert", ("target", "qnn"),
          ("--device", "galaxy-s24", "--precision", "w4a16", "--max-context", "256", "--prefill-len", "32", "--calibration-samples", "4",
           "--eval-windows", "1", "--rescue", "0"), "target.json"),
    Stage("coreml", "convert", ("target", "coreml"),
          ("--compress", "int4-block", "--embedding", "int8", "--max-context", "256", "--eval-positions", "16"), "target.json"),
)
# The whole recipe as a release pipeline runs it: the stages above with the same options in one `edgepack build`
# (targets two at a time), then profile and check. The recipe is written per shape (build.toml beside its output).
BUILD = Stage("build", None, ("build",), ("--jobs", "2"), "manifest.json")
BUILD_DEVICE = "galaxy-s24"
BUILD_PROFILE = {"prompt_len": [32], "gen_len": 16, "runs": 1, "warmup": 0}
STAGE_NAMES = tuple(s.name for s in STAGES) + (BUILD.name,)


def _option_table(args: tuple[str, ...]) -> dict:
    """`--max-context 256 --rescue 0` -> {"max_context": 256, "rescue": 0} (the recipe's keys for those options)."""
    table, items = {}, list(args)
    while items:
        key = items.pop(0).removeprefix("--").replace("-", "_")
        value = items.pop(0) if items and not items[0].startswith("--") else True
        table[key] = int(value) if isinstance(value, str) and value.isdigit() else value
    return table


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def build_recipe(hf_dir: Path, extra: dict[str, list[str]]) -> str:
    """The recipe of the full build: the model folder, quantize int4, every target, profile and a budget check."""
    by_name = {s.name: s for s in STAGES}
    lines = [f"devices = [{json.dumps(BUILD_DEVICE)}]", "", "[model]", f"source = {json.dumps(str(hf_dir))}", ""]
    quantize = _option_table((*by_name["quantize"].args, *extra.get("quantize", [])))
    eval_tokens = quantize.pop("eval_tokens", None)
    lines += ["[[quantize]]", *(f"{k} = {_toml_value(v)}" for k, v in quantize.items()), ""]
    for name in ("ort", "ort-mobile", "qnn", "coreml"):
        table = _option_table((*by_name[name].args, *extra.get(name, [])))
        lines += [f"[targets.{name}]", *(f"{k} = {_toml_value(v)}" for k, v in table.items()), ""]
    if eval_tokens:
        lines += ["[evaluation]", f"tokens = {eval_tokens}", ""]
    lines += ["[profile]", *(f"{k} = {_toml_value(v)}" for k, v in BUILD_PROFILE.items()), ""]
    # A budget every stage's figures are checked against (random weights: the time of the check is what counts).
    lines += [f"[budgets.{BUILD_DEVICE}]", "max_decode_ms_per_token = 1000", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- models

def model_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (
        (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file())


def demo_tokenizer_folder() -> Path:
    """The demo model's Hugging Face folder (its tokenizer is copied into every shape's folder)."""
    from edgepack.sources import resolve_source

    return Path(resolve_source("smollm2-135m").hf_dir)


def make_model(name: str, out: Path, shard_bytes: int = 1 << 30) -> None:
    """Write a random-weight fp32 model of shape `name` to `out`, one tensor at a time.

    The model is instantiated on the meta device (no memory) only to learn its tensor names, shapes and
    tied weights; each tensor is then drawn with numpy and written into safetensors shards of about
    `shard_bytes`, so building a 10 GB model needs about one shard of memory, not the model twice over
    (`from_config` + `save_pretrained` does). Matrices are N(0, 0.02) (small random weights keep activations
    finite through many layers); vectors (norm weights, biases) take the model's own initialization.
    """
    import shutil

    import numpy as np
    import torch
    from safetensors.numpy import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    kwargs = dict(SHAPES[name])
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    owners = {}
    for module in model.modules():
        for pname, param in module.named_parameters(recurse=False):
            owners[id(param)] = (module, pname)
    rng = np.random.default_rng(0)
    seen, shard, shard_size, weight_map, total, shards = set(), {}, 0, {}, 0, []

    def flush():
        nonlocal shard, shard_size
        if shard:
            file = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, str(tmp / file), metadata={"format": "pt"})
            shards.append(file)
            weight_map.update({k: file for k in shard})
            shard, shard_size = {}, 0

    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:  # a tied weight (lm_head = embedding) is stored once, as save_pretrained does
            continue
        seen.add(id(tensor))
        if tensor.dim() > 1:
            array = rng.standard_normal(tuple(tensor.shape), dtype=np.float32)
            array *= np.float32(0.02)
        else:
            module, pname = owners.get(id(tensor), (None, None))
            has_matrix = module is not None and any(p.dim() > 1 for p in module.parameters(recurse=False))
            if module is None or has_matrix:  # a linear layer's bias or a buffer: zeros, as transformers initializes
                array = np.zeros(tuple(tensor.shape), np.float32)
            else:  # a norm's weight: ones, or zeros for (1 + w) norms; the model's own _init_weights decides
                module.to_empty(device="cpu", recurse=False)
                with torch.no_grad():
                    model._init_weights(module)
                array = getattr(module, pname).detach().numpy().astype(np.float32)
        if shard_size and shard_size + array.nbytes > shard_bytes:
            flush()
        shard[key] = array
        shard_size += array.nbytes
        total += array.nbytes
    flush()
    if len(shards) == 1:
        (tmp / shards[0]).rename(tmp / "model.safetensors")
    else:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.architectures = [type(model).__name__]  # what save_pretrained records; onnxruntime-genai's builder reads it
    config.dtype = "float32"
    config.save_pretrained(tmp)
    GenerationConfig.from_model_config(config).save_pretrained(tmp)
    demo = demo_tokenizer_folder()
    for file in TOKENIZER_FILES:
        if (demo / file).is_file():
            shutil.copy(demo / file, tmp / file)
    tmp.rename(out)
    print(f"{name}: {total / GB:.2f} GB fp32 in {len(shards)} shard(s) -> {out}", file=sys.stderr)


def safetensors_bytes(folder: Path) -> tuple[int, int]:
    """(tensor bytes, parameter count) of a folder's safetensors files, from their headers alone."""
    size = count = 0
    for file in sorted(folder.glob("*.safetensors")):
        with file.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for key, info in header.items():
            if key == "__metadata__":
                continue
            start, end = info["data_offsets"]
            size += end - start
            n = 1
            for d in info["shape"]:
                n *= d
            count += n
    return size, count


# ---------------------------------------------------------------------------------------------- running

@dataclass
class Run:
    exit_code: int | None
    wall_s: float
    peak_rss_bytes: int  # ru_maxrss of the stage's process (max over it and its waited-for children)
    peak_tree_rss_bytes: int | None  # sampled sum over the process tree (None without psutil)
    timed_out: bool
    error: str | None


def _tree_rss(pid: int) -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_measured(command: list[str], log: Path, timeout: float, env: dict) -> Run:
    """Run `command` in its own process group; wall time, wait4's ru_maxrss, sampled tree RSS, exit code.

    ru_maxrss of a child also counts the pages it shared with this process when it started, so this
    process stays small (it imports neither torch nor onnx).
    """
    start = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
    peak_tree: list[int | None] = [_tree_rss(proc.pid)]
    stop = threading.Event()
    timed_out = threading.Event()

    def sample():
        while not stop.wait(0.2):
            value = _tree_rss(proc.pid)
            if value is not None and (peak_tree[0] is None or value > peak_tree[0]):
                peak_tree[0] = value

    def expire():
        if not stop.wait(timeout):
            timed_out.set()
            for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 0)):
                try:
                    os.killpg(proc.pid, sig)  # the group this process started (start_new_session)
                except ProcessLookupError:
                    return
                if stop.wait(grace):
                    return

    threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=expire, daemon=True)]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stop.set()
    for t in threads:
        t.join()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    code = proc.returncode
    error = None
    if timed_out.is_set():
        error = f"timed out after {timeout:.0f} s"
    elif code != 0:
        error = last_error_line(log)
    return Run(code, wall, usage.ru_maxrss * 1024, peak_tree[0], timed_out.is_set(), error)


def fresh_cache(folder: Path) -> Path:
    """An edgepack cache with an empty stage cache, sharing the user's model folders and tool environments."""
    import shutil

    from edgepack.sources import cache_root

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for name in ("models", "tools"):  # converted GGUF sources, the model builder's venv: not stages
        if (cache_root() / name).is_dir():
            (folder / name).symlink_to(cache_root() / name)
    return folder


def last_error_line(log: Path) -> str | None:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:") or line.startswith("internal error:"):
            return line[:300]
    return lines[-1][:300] if lines else None


def dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def verdict(peak: int, weights: int) -> str:
    failed = []
    if peak > MAX_RATIO * weights:
        failed.append(f"> {MAX_RATIO:g}x")
    if peak >= MAX_RSS_BYTES:
        failed.append(f">= {MAX_RSS_BYTES / GB:g} GB")
    return "ok" if not failed else "over: " + ", ".join(failed)


def stage_verdict(run: Run, peak: int, weights: int) -> str:
    """The row's verdict: ok only for a stage that finished (exit 0) within the memory target. A stage killed at
    the timeout or exiting non-zero says so first: its peak is that of an unfinished or failed run."""
    memory = verdict(peak, weights)
    if run.timed_out:
        status = run.error or "timed out"
    elif run.exit_code == 1:
        status = "gate failed (exit 1)"  # a complete output whose quality or parity gate failed
    elif run.exit_code != 0:
        status = f"failed (exit {run.exit_code})"
    else:
        return memory
    return status if memory == "ok" else f"{status}; memory {memory}"


# ---------------------------------------------------------------------------------------------- main

def kept_rows(previous: Path, shapes: list[str], conditions: dict) -> list[dict]:
    """Rows of `previous` (an earlier scale.json) for shapes other than `shapes`; notes that run in `conditions`."""
    if not previous.is_file():
        return []
    earlier = json.loads(previous.read_text())
    kept = [row for row in earlier.get("rows", []) if row.get("shape") not in shapes]
    if kept:
        runs = earlier.get("conditions", {}).get("earlier_runs", [])
        own = {key: earlier.get(key) for key in ("command", "recorded_utc", "commit")}
        own["shapes"] = earlier.get("conditions", {}).get("shapes")
        own["loadavg"] = [earlier.get("conditions", {}).get(k) for k in ("loadavg_start", "loadavg_end")]
        conditions["earlier_runs"] = [*runs, own]
    return kept


def parse_list(text: str, known: tuple[str, ...], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"error: unknown {what} {', '.join(unknown)}; choose from {', '.join(known)}")
    return names


def print_table(rows: list[dict]) -> None:
    header = f"{'shape':<14} {'stage':<11} {'exit':>4} {'wall s':>8} {'peak GB':>8} {'tree GB':>8} {'fp32 GB':>8} {'x fp32':>7} {'out MB':>9}  verdict"
    print("\n" + header)
    print("-" * len(header))
    def num(row, key, fmt):
        value = row.get(key)
        return format(value, fmt) if isinstance(value, (int, float)) else "-"

    for r in rows:
        exit_code = r["exit_code"] if r["exit_code"] is not None else "-"
        print(f"{r['shape']:<14} {r['stage']:<11} {exit_code!s:>4} {num(r, 'wall_s', '8.1f')} {num(r, 'peak_rss_gb', '8.2f')} "
              f"{num(r, 'peak_tree_rss_gb', '8.2f')} {num(r, 'fp32_weights_gb', '8.2f')} {num(r, 'rss_ratio', '7.2f')} "
              f"{num(r, 'output_mb', '9.1f')}  {r['verdict']}")
        if r.get("error"):
            print(f"{'':<14} {'':<11} {r['error']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help=f"comma-separated, of: {', '.join(SHAPES)}")
    parser.add_argument("--stages", default=",".join(STAGE_NAMES), help=f"comma-separated, of: {', '.join(STAGE_NAMES)}")
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgepack-scale"), help="stage outputs and logs")
    parser.add_argument("--models", type=Path, default=None, help="shape folders (default WORK/models); built when missing")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per stage before its process group is killed")
    parser.add_argument("--keep-other-shapes", action="store_true",
                        help="keep the rows of shapes this run does not measure from the existing results file (a long "
                             "table recorded shape by shape); the earlier run's command, time and commit go into conditions")
    parser.add_argument("--stage-args", action="append", default=[], metavar="STAGE=ARGS",
                        help="extra options for one stage, e.g. --stage-args \"qnn=--precision w8a16\" (repeatable)")
    parser.add_argument("--make-model", nargs=2, metavar=("SHAPE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.make_model:  # the child process that builds one shape folder
        make_model(args.make_model[0], Path(args.make_model[1]))
        return 0

    shapes = parse_list(args.shapes, tuple(SHAPES), "shape")
    wanted = set(parse_list(args.stages, STAGE_NAMES, "stage"))
    extra: dict[str, list[str]] = {}
    for item in args.stage_args:
        stage, _, text = item.partition("=")
        parse_list(stage, STAGE_NAMES, "stage")
        extra.setdefault(stage, []).extend(shlex.split(text))
    work = args.work.resolve()
    models = (args.models or work / "models").resolve()
    models.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

    rows: list[dict] = []
    built: dict[str, dict] = {}
    conditions = {
        "shapes": shapes,
        "stages": [s.name for s in (*STAGES, BUILD) if s.name in wanted],
        "stage_commands": {s.name: "edgepack " + " ".join([*s.command, "RECIPE" if s is BUILD else "DIR", "-o", "OUT", *s.args,
                                                               *extra.get(s.name, [])])
                           for s in (*STAGES, BUILD) if s.name in wanted},
        "build_recipe": "the stages' options in one recipe (profile " + json.dumps(BUILD_PROFILE) + ", a budget on "
                        + BUILD_DEVICE + "), built with an empty stage cache" if BUILD.name in wanted else None,
        "memory_target": f"peak RSS <= {MAX_RATIO:g}x fp32 weight bytes and < {MAX_RSS_BYTES / GB:g} GB",
        "peak_rss": "ru_maxrss of the stage's process from wait4 (its largest process); tree: summed RSS of the "
                    "process tree sampled every 0.2 s",
        "one_stage_per_process": True,
        "timeout_s": args.timeout,
        "loadavg_start": _results.loadavg(),
        "runner_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "model_builds": built,
    }

    def record(**row) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    for shape in shapes:
        folder = models / shape
        if not model_complete(folder):
            print(f"building {shape} in {folder} ...", file=sys.stderr, flush=True)
            log = work / "logs" / f"{shape}.make-model.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            run = run_measured([sys.executable, str(Path(__file__).resolve()), "--make-model", shape, str(folder)],
                               log, args.timeout, env)
            built[shape] = {"exit_code": run.exit_code, "wall_s": round(run.wall_s, 1),
                            "peak_rss_gb": round(run.peak_rss_bytes / GB, 2), "error": run.error}
            if run.exit_code != 0:
                record(shape=shape, stage="make-model", exit_code=run.exit_code, error=run.error, verdict="failed")
                continue
        weights, params = safetensors_bytes(folder)
        outputs = {"hf": folder}
        failed: dict[str, str] = {}
        for stage in (*STAGES, BUILD):
            if stage.name not in wanted:
                continue
            base = dict(shape=shape, params_m=round(params / 1e6, 1), fp32_weights_gb=round(weights / GB, 3), stage=stage.name)
            needs = stage.needs or "hf"
            source = outputs.get(needs)
            if source is None:
                previous = work / shape / needs
                reusable = next((s for s in STAGES if s.name == needs), None)
                if reusable is not None and (previous / reusable.done_file).is_file():
                    source = previous  # an earlier run's output, for a subset of --stages
            if source is None:
                reason = f"skipped: {needs} failed ({failed[needs]})" if needs in failed else f"skipped: no {needs} output"
                failed[stage.name] = "skipped"
                record(**base, exit_code=None, error=None, verdict=reason)
                continue
            out = work / shape / stage.name
            out.parent.mkdir(parents=True, exist_ok=True)
            if stage is BUILD:  # the recipe names the model; the stage cache starts empty so every stage runs
                source = work / shape / "build.toml"
                source.write_text(build_recipe(folder, extra))
                stage_env = {**env, "EDGEPACK_CACHE": str(fresh_cache(work / shape / "build-cache"))}
            else:
                stage_env = env
            command = [sys.executable, "-m", "edgepack", *stage.command, str(source), "-o", str(out), "--force",
                       *stage.args, *extra.get(stage.name, [])]
            print(f"[{shape}] {stage.name}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
            log = work / "logs" / f"{shape}.{stage.name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            run = run_measured(command, log, args.timeout, stage_env)
            peak = max(run.peak_rss_bytes, run.peak_tree_rss_bytes or 0)
            # Exit 1 is a gate that failed on a complete output (quality, parity): later stages can still use it.
            usable = run.exit_code in (0, 1) and (out / stage.done_file).is_file()
            if usable:
                outputs[stage.name] = out
            else:
                failed[stage.name] = f"exit {run.exit_code}"
            record(**base, exit_code=run.exit_code, wall_s=round(run.wall_s, 1), peak_rss_gb=round(run.peak_rss_bytes / GB, 3),
                   peak_tree_rss_gb=round(run.peak_tree_rss_bytes / GB, 3) if run.peak_tree_rss_bytes is not None else None,
                   rss_ratio=round(peak / weights, 2) if weights else None,
                   output_mb=round(dir_bytes(out) / 1e6, 1) if usable else None,
                   verdict=stage_verdict(run, peak, weights), error=run.error)
        conditions["loadavg_end"] = _results.loadavg()
        if args.keep_other_shapes:
            rows[:0] = kept_rows(_results.RESULTS / "scale.json", shapes, conditions)
        _results.write("scale", title="Wall time and peak RSS per stage on random-weight models of real shapes",
                       threads=os.cpu_count(), conditions=conditions, rows=rows,
                       notes="One stage per process, run one after another on an otherwise idle machine; the verdict "
                             "names a stage that timed out or exited non-zero, else it is the memory target "
                             f"({conditions['memory_target']}) on the larger of the two peaks.")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
