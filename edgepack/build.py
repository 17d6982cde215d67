"""`edgepack build RECIPE -o OUT`: convert -> quantize (each scheme) -> targets -> profile -> check.

Each stage's result is cached under `$EDGEPACK_CACHE/build/<stage>/<key>/`, where the key is the
sha256 of the stage's inputs (the content of the source model, the keys of the stages it consumes),
its configuration and the tool versions. A cache entry is written in a temporary folder and renamed
when complete, under a per-entry file lock, so an interrupted build leaves nothing half-written and
two builds sharing a cache wait for each other instead of corrupting it. The entry's `.complete`
marker, written last, lists its files with size and sha256; they are checked before each reuse, so a
corrupted entry is rebuilt (and the log says why) rather than shipped. Temporary folders of a killed
build are removed by the next one.

The bundle holds the deliverables only (targets, quality and profile reports, verdicts, reports and a
manifest); intermediate exports stay in the cache. It is assembled in a temporary sibling of OUT and
renamed into place last, so a killed build leaves either no bundle or the previous complete one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgepack.core.gates import GateResult, check_gates, failed
from edgepack.errors import BadInputError, UsageError

BUNDLE_KIND = "edgepack.manifest"
STAGES = ("convert", "quantize", "target", "profile", "check")
FP32 = "fp32"
# Targets whose bundle onnxruntime runs on this host: each is profiled as shipped (ort-mobile: its .ort file).
PROFILED_TARGETS = ("ort", "ort-mobile")


def profile_name(scheme: str, target: str | None) -> str:
    """Key of a bundle's profile in the build (profiles/<key>.json, report figures and verdicts): the scheme for
    the ort bundle (or the export when there is none), `<scheme>.<target>` for the other profiled targets."""
    return scheme if target in (None, "ort") else f"{scheme}.{target}"


@dataclass(frozen=True)
class BuildConfig:
    only: str | None = None  # stop after this stage
    jobs: int = 1
    junit: Path | None = None
    force: bool = False


@dataclass
class StageRecord:
    stage: str
    name: str
    key: str
    reused: bool
    seconds: float
    path: Path
    rebuilt: str | None = None  # why an existing cache entry was not reused (corrupted, incomplete)


@dataclass
class BuildResult:
    out: Path
    records: list[StageRecord] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    gates: list[GateResult] = field(default_factory=list)  # every gate the build applied, passed or not
    report: dict = field(default_factory=dict)

    @property
    def failures(self) -> list[GateResult]:
        return failed(self.gates)

    @property
    def passed(self) -> bool:
        return not self.failures


# ----------------------------------------------------------------------------------------------- cache


def _versions_fingerprint() -> dict:
    """Library versions plus a hash of edgepack's own code: a changed stage implementation invalidates its cache."""
    from edgepack.convert.export import tool_versions

    package = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*")):
        if path.suffix in (".py", ".txt", ".toml") and "__pycache__" not in path.parts:
            digest.update(path.relative_to(package).as_posix().encode())
            digest.update(path.read_bytes())
    return {**tool_versions(), "edgepack_code_sha256": digest.hexdigest()}


def stage_key(stage: str, payload: dict) -> str:
    blob = json.dumps({"stage": stage, "payload": payload, "versions": _versions_fingerprint()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@contextlib.contextmanager
def _locked(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _locked_if_free(path: Path):
    """Hold the lock `path` if no other process does (yield True), else yield False without waiting.

    The kernel drops a process's flock when it dies, kill -9 included, so a free lock means no live build
    is working on that entry.
    """
    import fcntl

    try:
        handle = open(path, "a")
    except OSError:
        yield False
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# Written last into a cache entry: JSON naming every file of the entry with its size and sha256.
ENTRY_MANIFEST = ".complete"
ENTRY_MANIFEST_KIND = "edgepack.cache-entry"
_ABSENT = "absent"


def _entry_files(entry: Path) -> dict[str, Path]:
    """Everything under `entry` except its manifest, by relative path; symbolic links are listed, never followed."""
    found = {}
    for folder, dirs, files in os.walk(entry):
        for name in dirs + files:
            path = Path(folder) / name
            if name in files or path.is_symlink():
                found[path.relative_to(entry).as_posix()] = path
    found.pop(ENTRY_MANIFEST, None)
    return found


def _entry_record(path: Path) -> dict:
    from edgepack.sources import file_sha256

    if path.is_symlink():
        return {"symlink": os.readlink(path)}
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _entry_problems(entry: Path) -> str | None:
    """Why the cache entry cannot be reused (`_ABSENT` when there is none), or None when every file matches."""
    import stat

    marker = entry / ENTRY_MANIFEST
    if not marker.is_file():
        return "cache entry incomplete (no manifest)" if entry.exists() else _ABSENT
    try:
        manifest = json.loads(marker.read_text())
        recorded = manifest["files"] if manifest.get("kind") == ENTRY_MANIFEST_KIND else None
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, KeyError):
        recorded = None
    if not isinstance(recorded, dict):
        return "cache entry has no file manifest (written by an older edgepack)"
    changed, missing = [], []
    try:
        present = _entry_files(entry)
        for name, record in sorted(recorded.items()):
            path = present.get(name)
            if path is None:
                missing.append(name)
                continue
            if not isinstance(record, dict):
                changed.append(name)
            elif "symlink" in record or path.is_symlink():
                if not path.is_symlink() or os.readlink(path) != record.get("symlink"):
                    changed.append(name)
            elif (not stat.S_ISREG(path.lstat().st_mode) or path.stat().st_size != record.get("bytes")
                  or _entry_record(path)["sha256"] != record.get("sha256")):
                changed.append(name)
    except OSError as exc:  # unreadable, or replaced by another build while we read it: check again under the lock
        return f"cache entry unreadable ({exc.strerror or exc}: {exc.filename})"
    extra = sorted(set(present) - set(recorded))
    if not (changed or missing or extra):
        return None

    def names(paths: list[str]) -> str:
        return ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")

    kinds = [f"{kind}: {names(paths)}" for kind, paths in (("changed", changed), ("missing", missing), ("extra", extra)) if paths]
    return f"cache entry corrupted ({'; '.join(kinds)})"


class StageCache:
    """Stage results under `root/<stage>/<key>/out/`, each entry with a manifest of its files checked on reuse."""

    def __init__(self, root: Path | None = None):
        from edgepack.sources import cache_folder

        self.root = root or cache_folder("build")

    def entry(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def run(self, stage: str, key: str, produce, force: bool = False) -> tuple[Path, bool, str | None]:
        """Return (the cached output folder, reused?, why an existing entry was rebuilt or None).

        The entry is produced with `produce(out_path)` when absent, incomplete or when a file differs
        from its manifest (size or sha256; missing and extra files too): a corrupted entry is rebuilt,
        never shipped.
        """
        entry = self.entry(stage, key)
        problem = _ABSENT if force else _entry_problems(entry)
        if problem is None:
            return entry / "out", True, None
        with _locked(self.root / stage / f"{key}.lock"):
            if not force:  # another build may have made or repaired it while we waited
                problem = _entry_problems(entry)
                if problem is None:
                    return entry / "out", True, None
            tmp = self.root / stage / f"{key}.tmp-{os.getpid()}"
            old = self.root / stage / f"{key}.old-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            try:
                produce(tmp / "out")
                files = {name: _entry_record(path) for name, path in sorted(_entry_files(tmp).items())}
                (tmp / ENTRY_MANIFEST).write_text(json.dumps({"kind": ENTRY_MANIFEST_KIND, "completed": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                                              "files": files}, indent=1) + "\n")
                if entry.exists() or entry.is_symlink():
                    shutil.rmtree(old, ignore_errors=True)
                    os.rename(entry, old)
                os.rename(tmp, entry)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.rmtree(old, ignore_errors=True)
        return entry / "out", False, None if problem == _ABSENT else f"{problem}; rebuilt"

    def remove_stale(self) -> list[Path]:
        """Remove temporary entries (`<key>.tmp-PID`, `<key>.old-PID`) of builds that ended without cleaning up.

        Such a folder only exists while a build holds `<key>.lock`, so one whose lock is free belongs to a
        build that was killed: it is removed whatever its age. The lock, not the PID, decides because a
        PID says nothing about a build on another machine sharing the cache, and PIDs are reused.
        """
        removed = []
        for path in sorted(self.root.glob("*/*")):
            key, dot, rest = path.name.partition(".")
            if not (dot and rest.startswith(("tmp-", "old-")) and path.is_dir() and not path.is_symlink()):
                continue
            with _locked_if_free(path.parent / f"{key}.lock") as free:
                if free:
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
        return removed


# ----------------------------------------------------------------------------------------------- inputs


def source_fingerprint(spec: str) -> dict:
    """Content identity of MODEL: the GGUF's sha256, or the sha256 of every file of a Hugging Face folder."""
    from edgepack.sources import DEMO_MODELS, file_sha256, find_demo_gguf

    if spec in DEMO_MODELS:
        path = find_demo_gguf(DEMO_MODELS[spec])
        return {"demo": spec, "sha256": file_sha256(path)}
    path = Path(spec).expanduser()
    if path.is_file():
        return {"file": path.name, "sha256": file_sha256(path)}
    if path.is_dir():
        return {"folder": {p.relative_to(path).as_posix(): file_sha256(p) for p in sorted(path.rglob("*")) if p.is_file()}}
    return {"missing": spec}  # convert reports the one-line error


def _text_fingerprint(recipe, value: str | None) -> str | None:
    from edgepack.sources import file_sha256

    path = recipe.resolve(value)
    return file_sha256(path) if path is not None and path.is_file() else value


def scheme_names(recipe) -> list[tuple[str, dict]]:
    """(name used in the bundle, scheme table) per scheme; fp32 alone when the recipe lists none."""
    if not recipe.quantize:
        return [(FP32, {})]
    names, seen = [], {}
    for table in recipe.quantize:
        base = table["scheme"]
        seen[base] = seen.get(base, 0) + 1
        names.append((base if seen[base] == 1 else f"{base}-{seen[base]}", table))
    return names


def _build_target(module_name: str, source_path: Path, out_path: Path, options: dict) -> None:
    """Build one target (module-level so a worker process can run it)."""
    import importlib

    from edgepack.recipe import target_config_class

    module = importlib.import_module(module_name)
    config_cls = target_config_class(module)
    if config_cls is None:
        module.build(source_path, out_path)
    else:
        module.build(source_path, out_path, config_cls(**options))


REPORTS_NOT_REPRODUCIBLE = {
    "report.json": "figures measured by this build (timings, latencies, energy)",
    "report.html": "figures measured by this build (timings, latencies, energy)",
    "junit.xml": "gate values measured by this build",
    "profiles/*.json": "latency and memory measured by this build",
    "quality/*.json": "quantization seconds and cache paths of this build",
    "targets/*/*/target.json": "build seconds and cache paths of this build",
    "targets/*/*/convert.json": "export seconds and cache paths of this build",
    "targets/*/*/quantize.json": "quantization seconds and cache paths of this build",
}


def not_reproducible(bundle: Path, targets: dict, available: dict) -> list[dict]:
    """Files of the bundle that a rebuild from a cold cache does not reproduce byte for byte, and why.

    Model files are reproducible unless their target module declares otherwise (`NOT_REPRODUCIBLE`:
    file pattern -> reason); reports carry this build's own measurements.
    """
    import importlib

    entries = {}
    for (target_name, scheme) in targets:
        module = importlib.import_module(available[target_name])
        folder = bundle / "targets" / target_name / scheme
        for pattern, reason in getattr(module, "NOT_REPRODUCIBLE", {}).items():
            for path in sorted(folder.glob(pattern)):
                entries[path.relative_to(bundle).as_posix()] = reason
    for pattern, reason in REPORTS_NOT_REPRODUCIBLE.items():
        for path in sorted(bundle.glob(pattern)):
            entries.setdefault(path.relative_to(bundle).as_posix(), reason)
    return [{"path": path, "reason": reason} for path, reason in sorted(entries.items())]


def target_workers(jobs: int):
    """The process pool of `build --jobs N`; its workers end when this process does, even on kill -9."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from edgepack.processes import exit_with_parent

    return ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=exit_with_parent, initargs=(os.getpid(),))


def kill_workers(workers) -> None:
    """SIGKILL the pool's worker processes (their own children die with them, see edgepack.processes)."""
    for process in list((getattr(workers, "_processes", None) or {}).values()):
        process.kill()


def _target_uses_schemes(module) -> bool:
    """Targets that convert from the PyTorch weights with their own compression (coreml, qnn) run once on fp32."""
    return getattr(module, "USES_QUANTIZED_SOURCE", True)


# ----------------------------------------------------------------------------------------------- build


def build_recipe(recipe_path: Path | str, out: Path | str, config: BuildConfig = BuildConfig(), on_status=None, on_log=None) -> BuildResult:
    import importlib

    from edgepack.bundle import write_manifest
    from edgepack.outputs import prepare_output, replace_dir, staging_dir
    from edgepack.recipe import load_recipe
    from edgepack.targets import registered_targets

    status = on_status or (lambda message: None)
    log = on_log or (lambda message: None)
    if config.only is not None and config.only not in STAGES:
        raise UsageError(f"--only must be one of {', '.join(STAGES)}")
    last_stage = STAGES.index(config.only) if config.only else len(STAGES) - 1
    recipe = load_recipe(recipe_path)
    out = Path(out)
    # A previous bundle (every file listed in its edgepack manifest) is replaced; anything else needs --force.
    prepare_output(out, config.force, replaceable_kinds=(BUNDLE_KIND,))
    junit = config.junit
    if junit is not None:
        from edgepack.outputs import check_output_file

        junit = Path(junit)
        check_output_file(junit / "junit.xml" if junit.is_dir() else junit)  # a folder gets junit.xml inside
    cache = StageCache()
    for stale in cache.remove_stale():
        log(f"cache    removed {stale.relative_to(cache.root)}, left by a build that was killed")
    result = BuildResult(out=out)
    start = time.perf_counter()

    def stage(stage_name: str, name: str, payload: dict, produce) -> Path:
        key = stage_key(stage_name, payload)
        t0 = time.perf_counter()
        status(f"{stage_name}: {name}")
        path, reused, rebuilt = cache.run(stage_name, key, produce, force=False)
        record = StageRecord(stage_name, name, key, reused, time.perf_counter() - t0, path, rebuilt)
        result.records.append(record)
        done = "reused from cache" if reused else f"built in {record.seconds:.1f} s"
        log(f"{stage_name:<8} {name:<28} {f'{rebuilt} in {record.seconds:.1f} s' if rebuilt else done}")
        return path

    # convert
    from edgepack.convert import ConvertConfig, convert_model

    model = recipe.model
    convert_payload = {"source": source_fingerprint(model["source"]), "options": {k: v for k, v in model.items() if k != "source"}}
    convert_config = ConvertConfig(**recipe.convert_options())
    export = stage("convert", "export", convert_payload, lambda o: convert_model(model["source"], o, convert_config))
    convert_key = result.records[-1].key

    # quantize
    from edgepack.quantize import QualityConfig, QualityGate, QuantizeConfig, quantize_model

    evaluation, calibration = recipe.evaluation, recipe.calibration
    gate = QualityGate(evaluation.get("max_kl"), evaluation.get("min_top1"), evaluation.get("max_ppl_ratio"))
    quality = QualityConfig(eval_text=recipe.resolve(evaluation.get("text")), eval_tokens=evaluation.get("tokens", 512))
    sources: dict[str, tuple[Path, str]] = {FP32: (export, convert_key)}
    quality_reports: dict[str, dict] = {}
    if last_stage >= 1:
        for name, table in scheme_names(recipe):
            if name == FP32:
                continue
            options = {k: v for k, v in table.items() if k != "scheme"}
            if "keep_8bit" in options:
                options["keep_8bit"] = tuple(options["keep_8bit"])
            qconfig = QuantizeConfig(scheme=table["scheme"], scheme_options=options, quality=quality,
                                     calibration_text=recipe.resolve(calibration.get("text")))
            payload = {"export": convert_key, "scheme": table, "eval": [_text_fingerprint(recipe, evaluation.get("text")), evaluation.get("tokens", 512)],
                       "calibration": [_text_fingerprint(recipe, calibration.get("text")), calibration.get("samples")]}
            path = stage("quantize", name, payload, lambda o, c=qconfig: quantize_model(export, o, c))
            sources[name] = (path, result.records[-1].key)
            report = json.loads((path / "quantize.json").read_text())
            quality_reports[name] = report
            result.gates.extend(gate.gates(report.get("quality"), subject=name))

    # targets
    available = registered_targets()
    targets: dict[tuple[str, str], Path] = {}
    if last_stage >= 2:
        tasks = []
        for target_name, options in recipe.targets.items():
            module = importlib.import_module(available[target_name])
            schemes = [s for s in sources if s != FP32 or len(sources) == 1] if _target_uses_schemes(module) else [FP32]
            for scheme in schemes:
                tasks.append((target_name, scheme, module, options))

        # Slow conversions from the PyTorch weights (coreml, qnn) start first so parallel jobs pack well.
        tasks.sort(key=lambda task: _target_uses_schemes(task[2]))
        workers = None
        if config.jobs > 1 and len(tasks) > 1:
            # Worker processes, not threads: the quantizers and converters the targets call are mostly
            # Python and hold the GIL. Caching, locking and renaming stay in this process.
            workers = target_workers(config.jobs)

        def run_target(task):
            target_name, scheme, module, options = task
            source_path, source_key = sources[scheme]
            payload = {"source": source_key, "target": target_name, "options": options}
            # The table's values as the config takes them, with the recipe's [evaluation]/[calibration] texts
            # for text fields the table leaves unset; the key holds the content of every text a target reads.
            kwargs = recipe.target_options(module, target_name)
            texts = {key: _text_fingerprint(recipe, str(value)) for key, value in kwargs.items() if isinstance(value, Path)}
            if texts:
                payload["texts"] = texts

            def produce(out_path):
                if workers is None:
                    _build_target(module.__name__, source_path, out_path, kwargs)
                else:
                    workers.submit(_build_target, module.__name__, source_path, out_path, kwargs).result()

            return task, stage("target", f"{target_name}/{scheme}", payload, produce)

        if workers is not None:
            from concurrent.futures import ThreadPoolExecutor
            from concurrent.futures.process import BrokenProcessPool

            try:
                with workers, ThreadPoolExecutor(max_workers=config.jobs) as pool:
                    try:
                        finished = list(pool.map(run_target, tasks))
                    except (KeyboardInterrupt, SystemExit):
                        # Interrupted: end the targets in flight now rather than wait for them. (After an
                        # ordinary error they finish, so the rerun finds them in the cache.)
                        kill_workers(workers)
                        raise
            except BrokenProcessPool as exc:
                raise BadInputError(f"a target worker process died ({exc}); rerun with --jobs 1 to see which target") from None
        else:
            finished = [run_target(task) for task in tasks]
        for (target_name, scheme, *_), path in finished:
            targets[(target_name, scheme)] = path
            report = json.loads((path / "target.json").read_text())
            result.gates.extend(check_gates(report.get("checks", {}), f"{target_name}/{scheme}"))

    # profile
    profiles: dict[str, dict] = {}
    if last_stage >= 3 and (recipe.devices or recipe.budgets or recipe.profile):
        import platform

        from edgepack.profiles.measure import ProfileConfig, profile_in_fresh_process

        prof = recipe.profile
        prompt_lens = prof.get("prompt_len", [128])
        devices = tuple(dict.fromkeys(list(recipe.devices) + [d for d in recipe.budgets if d != "host"]))
        pconfig = ProfileConfig(devices=devices, prompt_lens=tuple(prompt_lens if isinstance(prompt_lens, list) else [prompt_lens]),
                                gen_len=prof.get("gen_len", 64), runs=prof.get("runs", 3), warmup=prof.get("warmup", 1),
                                threads=prof.get("threads"))
        for scheme, (source_path, source_key) in sources.items():
            if scheme == FP32 and len(sources) > 1:
                continue
            # The ort bundle (or the export), plus every other bundle onnxruntime runs here (ort-mobile's .ort):
            # each measured as shipped, in a fresh process, and projected from its own graph.
            measured = [(scheme, targets.get(("ort", scheme), source_path), "ort" if ("ort", scheme) in targets else "export")]
            measured += [(profile_name(scheme, target), path, target) for (target, s), path in targets.items()
                         if s == scheme and target in PROFILED_TARGETS and target != "ort"]
            for name, model_path, kind in measured:
                payload = {"model": [str(model_path), source_key, kind], "config": repr(pconfig),
                           "host": [platform.node(), platform.processor(), os.cpu_count()]}
                path = stage("profile", name, payload,
                             lambda o, m=model_path: (o.mkdir(), profile_in_fresh_process(m, o / "profile.json", pconfig)))
                profiles[name] = json.loads((path / "profile.json").read_text())

    # check
    verdicts: dict[str, list] = {}
    if last_stage >= 4 and recipe.budgets:
        from edgepack.profiles.budgets import build_gates, evaluate, parse_budgets

        budgets = parse_budgets(recipe.budgets, where="recipe key budgets")
        for scheme, profile in profiles.items():
            verdicts[scheme] = evaluate(profile, budgets)
            result.gates.extend(build_gates(scheme, verdicts[scheme]))

    # bundle
    from edgepack.report import build_report, write_reports

    with staging_dir(out) as tmp:
        for (target_name, scheme), path in targets.items():
            shutil.copytree(path, tmp / "targets" / target_name / scheme)
        for scheme, report in quality_reports.items():
            (tmp / "quality").mkdir(exist_ok=True)
            (tmp / "quality" / f"{scheme}.json").write_text(json.dumps(report, indent=2) + "\n")
        for scheme, profile in profiles.items():
            (tmp / "profiles").mkdir(exist_ok=True)
            (tmp / "profiles" / f"{scheme}.json").write_text(json.dumps(profile, indent=2) + "\n")
        shutil.copy2(recipe.path, tmp / "recipe.toml")
        report = build_report(recipe, sources, quality_reports, targets, profiles, verdicts, result, time.perf_counter() - start)
        result.report = report
        result.rows = report["summary"]
        write_reports(tmp, report, result.gates)
        write_manifest(tmp, {"recipe": recipe.raw, "versions": _versions_fingerprint(),
                             "not_reproducible": not_reproducible(tmp, targets, available),
                             "stages": [{"stage": r.stage, "name": r.name, "key": r.key, "reused": r.reused, **({"rebuilt": r.rebuilt} if r.rebuilt else {})}
                                        for r in result.records],
                             "figures": report["figures"]})
        replace_dir(tmp, out)
    if junit is not None:
        from edgepack.outputs import write_output_file

        write_output_file(junit / "junit.xml" if junit.is_dir() else junit, (out / "junit.xml").read_bytes())
    return result
