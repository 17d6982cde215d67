"""`edgepack build RECIPE -o OUT`: convert -> quantize (each scheme) -> targets -> profile -> check -> bundle.

The build is the list `BUILD_STAGES`, one function per stage over a shared `_Build`. Each stage's result is
cached under `$EDGEPACK_CACHE/build/<stage>/<key>/`. The key (`compute_key`) is the sha256 of:
  * the stage's payload: its inputs (the content of the source model, the keys of the stages it consumes)
    and its configuration;
  * the versions of Python and of the packages the stage declares (`StageDeclaration.packages`: coremltools
    for Core ML, onnxruntime-qnn and its QNN SDK for QNN, onnxruntime-genai and the builder environment's for
    the ort target's builder route, ...), so an upgrade invalidates the stages it can change and no other;
  * the source of the modules the stage uses: its entry modules, every edgepack module they import,
    transitively (found by reading the `import edgepack...` / `from edgepack... import` statements, those
    inside functions included, without running them) with the `__init__.py` of their packages, and the data
    files of those packages (non-Python files in the package folder and its non-package subfolders, e.g.
    quantize/data/*.txt, profiles/devices/*.toml). A comment edited in one target's module re-runs that
    target only; an edit in a shared module re-runs every stage that imports it.
build.py itself is not hashed: what it hands a stage is in the payload, and `KEY_FORMAT` is bumped when
that changes in a way the payload does not show.

A cache entry is written in a temporary folder and renamed when complete, under a per-entry file lock, so
an interrupted build leaves nothing half-written and two builds sharing a cache wait for each other instead
of corrupting it. The entry's `.complete` marker, written last, lists its files with size and sha256; they
are checked before each reuse, so a corrupted entry is rebuilt (and the log says why) rather than shipped.
Temporary folders of a killed build are removed by the next one.

The bundle holds the deliverables only (targets, quality and profile reports, verdicts, reports and a
manifest); intermediate exports stay in the cache. It is assembled in a temporary sibling of OUT and
renamed into place last, so a killed build leaves either no bundle or the previous complete one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgepack.core.gates import GateResult, check_gates, failed
from edgepack.core.versions import MODEL_PACKAGES
from edgepack.errors import UsageError

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
    max_memory_bytes: int | None = None  # what parallel targets may hold together (None: what the system has available)


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
    """Library versions plus a hash of edgepack's own code, recorded in the bundle's manifest."""
    from edgepack.core.versions import tool_versions

    package = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*")):
        if path.suffix in (".py", ".txt", ".toml") and "__pycache__" not in path.parts:
            digest.update(path.relative_to(package).as_posix().encode())
            digest.update(path.read_bytes())
    return {**tool_versions(), "edgepack_code_sha256": digest.hexdigest()}


# ------------------------------------------------------------------------------------------ stage keys

# Bump when build.py changes what it hands a stage in a way the stage's payload does not show.
KEY_FORMAT = 2
PACKAGE_ROOT = Path(__file__).parent
# Version lookups that are not a distribution of this environment.
EXTRA_VERSIONS = ("qnn-sdk", "genai-builder:onnxruntime-genai")


@dataclass(frozen=True)
class StageDeclaration:
    """What a stage uses, besides its payload: its entry modules (edgepack's own, followed through their
    imports) and the distributions whose versions shape its result (pip names, or one of `EXTRA_VERSIONS`)."""

    stage: str
    modules: tuple[str, ...]
    packages: tuple[str, ...]


CONVERT = StageDeclaration("convert", ("edgepack.convert.export",), (*MODEL_PACKAGES, "onnxscript", "accelerate"))  # torch.onnx's exporter; accelerate finds the tied weights
QUANTIZE = StageDeclaration("quantize", ("edgepack.quantize.pipeline",), MODEL_PACKAGES)
PROFILE = StageDeclaration("profile", ("edgepack.profiles.measure",), ("onnxruntime-genai", *MODEL_PACKAGES))


def target_declaration(target: str, module_name: str, options: dict) -> StageDeclaration:
    """The target stage of `target`: its module, and the packages its module declares in `CACHE_PACKAGES`
    (a target that declares none is keyed on every reported tool)."""
    import importlib

    from edgepack.core.versions import REPORTED_PACKAGES

    packages = tuple(getattr(importlib.import_module(module_name), "CACHE_PACKAGES", REPORTED_PACKAGES))
    if target == "ort" and options.get("graph") == "optimum":
        packages = tuple(p for p in packages if not p.startswith("genai-builder:"))  # the builder is not run
    return StageDeclaration("target", (module_name,), tuple(dict.fromkeys(packages)))


def stage_versions(declaration: StageDeclaration) -> dict[str, str]:
    """Python's version and that of each package the stage declares, as installed here."""
    from edgepack.core.versions import NOT_INSTALLED, package_version, python_version, qnn_sdk_version, venv_package_version

    versions = {"python": python_version()}
    for name in declaration.packages:
        if name == "qnn-sdk":
            versions[name] = qnn_sdk_version()
        elif name.startswith("genai-builder:"):
            from edgepack.targets.genai_builder import builder_python

            python = builder_python()
            version = NOT_INSTALLED if python is None else venv_package_version(python, name.partition(":")[2])
            # An interpreter outside a virtual environment (EDGEPACK_GENAI_BUILDER_PYTHON): at least its path.
            versions[name] = f"{version} ({python})" if python is not None and version == NOT_INSTALLED else version
        else:
            versions[name] = package_version(name)
    return versions


def _module_file(root: Path, name: str) -> Path | None:
    """The file of module `name` (edgepack.x.y) under the package folder `root`, or None when there is none."""
    base = root.joinpath(*name.split(".")[1:])
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


_PARSE_LOCK = threading.Lock()


@functools.lru_cache(maxsize=512)  # stages share most modules: each source is parsed once per process
def _edgepack_imports(source: bytes, name: str, is_package: bool) -> frozenset[str]:
    """Modules of edgepack that `source` (module `name`) imports anywhere, function bodies included; for
    `from edgepack.x import y`, both edgepack.x and edgepack.x.y (when y is a module, it is one)."""
    import ast

    with _PARSE_LOCK:  # CPython 3.11's ast.parse is not safe in concurrent threads (build --jobs keys targets in threads)
        statements = list(ast.parse(source).body)
    found = set()
    while statements:  # import statements sit in bodies of statements only, never inside expressions
        node = statements.pop()
        for name_ in ("body", "orelse", "finalbody", "handlers", "cases"):
            children = getattr(node, name_, None)
            if isinstance(children, list):
                statements.extend(children)
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "edgepack")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                package = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                module = f"{package}.{module}" if module else package
            if module.split(".")[0] == "edgepack":
                found.add(module)
                found.update(f"{module}.{alias.name}" for alias in node.names)
    return frozenset(found)


def module_sources(modules, root: Path = PACKAGE_ROOT, read=None) -> dict[str, bytes]:
    """Source of the modules a stage uses: its entry `modules`, the edgepack modules they import transitively
    (with their parent packages' `__init__.py`, which Python runs first), and the data files of every package
    among them (non-Python files in the package folder and its non-package subfolders).

    Keyed by path relative to `root` (the edgepack package folder); `read(path) -> bytes` reads a file. A module
    outside edgepack (a target registered by another package) contributes its own file.
    """
    import importlib.util

    read = read or Path.read_bytes
    sources: dict[str, bytes] = {}
    seen: set[str] = set()
    packages: set[Path] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        if not name.startswith("edgepack.") and name != "edgepack":
            spec = importlib.util.find_spec(name)
            if spec is not None and spec.origin and Path(spec.origin).is_file():
                source = read(Path(spec.origin))
                sources[f"<{name}>"] = source
                todo.extend(_edgepack_imports(source, name, spec.submodule_search_locations is not None))
            continue
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            module = ".".join(parts[:depth])
            if module in seen:
                continue
            seen.add(module)
            path = _module_file(root, module)
            if path is None:
                continue  # a name imported from a module, not a module
            source = read(path)
            sources[path.relative_to(root).as_posix()] = source
            packages.add(path.parent)
            todo.extend(_edgepack_imports(source, module, path.name == "__init__.py"))
    for package in sorted(packages):
        for path in sorted(_data_files(package)):
            sources[path.relative_to(root).as_posix()] = read(path)
    return sources


def _data_files(package: Path):
    for path in package.iterdir():
        if path.name == "__pycache__" or path.name.startswith("."):
            continue
        if path.is_file() and path.suffix not in (".py", ".pyc"):
            yield path
        elif path.is_dir() and not (path / "__init__.py").exists():
            yield from _data_files(path)


def compute_key(declaration: StageDeclaration, payload: dict, versions: dict, sources: dict[str, bytes]) -> str:
    """The cache key of a stage: a pure function of its declaration, payload, package versions and module sources."""
    blob = json.dumps({"format": KEY_FORMAT, "stage": declaration.stage, "payload": payload, "versions": versions,
                       "sources": {path: hashlib.sha256(source).hexdigest() for path, source in sources.items()}},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def stage_key(declaration: StageDeclaration, payload: dict, root: Path = PACKAGE_ROOT, read=None) -> str:
    """The cache key of a stage as installed here: its versions and the current source of its modules."""
    return compute_key(declaration, payload, stage_versions(declaration), module_sources(declaration.modules, root, read))


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


def _build_target(module_name: str, source_path: Path, out_path: Path, options: dict, running: Path | None = None,
                  label: str = "") -> None:
    """Build one target (module-level so a worker process can run it).

    In a worker, `running` is a folder where the process notes which target it builds (a file named by its PID,
    removed when done): if the process dies, the build names that target.
    """
    import importlib

    from edgepack.recipe import target_config_class

    note = None
    if running is not None:
        note = running / str(os.getpid())
        note.write_text(label)
    try:
        module = importlib.import_module(module_name)
        config_cls = target_config_class(module)
        if config_cls is None:
            module.build(source_path, out_path)
        else:
            module.build(source_path, out_path, config_cls(**options))
    finally:
        if note is not None:
            note.unlink(missing_ok=True)


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

    Model files are reproducible unless their target module declares otherwise (`NOT_REPRODUCIBLE`: file pattern ->
    reason, or `not_reproducible(folder)` returning one for a built folder); reports carry this build's own measurements.
    """
    import importlib

    entries = {}
    for (target_name, scheme) in targets:
        module = importlib.import_module(available[target_name])
        folder = bundle / "targets" / target_name / scheme
        declared = module.not_reproducible(folder) if hasattr(module, "not_reproducible") else getattr(module, "NOT_REPRODUCIBLE", {})
        for pattern, reason in declared.items():
            for path in sorted(folder.glob(pattern)):
                entries[path.relative_to(bundle).as_posix()] = reason
    for pattern, reason in REPORTS_NOT_REPRODUCIBLE.items():
        for path in sorted(bundle.glob(pattern)):
            entries.setdefault(path.relative_to(bundle).as_posix(), reason)
    return [{"path": path, "reason": reason} for path, reason in sorted(entries.items())]


def target_workers(jobs: int):
    """The process pool of `build --jobs N`; its workers end when this process does, even on kill -9.

    One target per worker process (`max_tasks_per_child=1`): a target's memory goes back to the system when it
    ends instead of staying in the worker's heap under the next target's."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from edgepack.processes import exit_with_parent

    return ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=exit_with_parent, initargs=(os.getpid(),), max_tasks_per_child=1)


# Memory a target build is allowed per byte of the model's fp32 weights: every stage is held to this bound
# (benchmarks/scale.py checks it on real shapes), so parallel targets are admitted against it.
TARGET_PEAK_PER_WEIGHT_BYTE = 2.0


def available_memory() -> int | None:
    """Bytes the system can give without swapping (Linux MemAvailable; physical memory elsewhere), or None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def model_weight_bytes(export: Path) -> int:
    """Bytes of an ONNX export's weights: its model files and their external data."""
    return sum(p.stat().st_size for p in export.iterdir() if p.is_file() and ".onnx" in p.name)


class MemoryAdmission:
    """Starts parallel target builds only while their expected peaks fit in the memory the build may use.

    Each target reserves `need` bytes (TARGET_PEAK_PER_WEIGHT_BYTE x the model's fp32 weight bytes) out of
    `budget` (the memory available when the target stage starts) and waits while the reservations of the
    targets running would exceed it. A target that alone needs more than the budget still runs, alone.
    """

    def __init__(self, budget: int | None, need: int, on_wait=None):
        self.budget, self.need, self.on_wait = budget, need, on_wait
        self.reserved = 0
        self._changed = threading.Condition()

    def _full(self) -> bool:
        """Whether one more target would pass the budget beside those running (a target alone always runs)."""
        return self.budget is not None and self.reserved > 0 and self.reserved + self.need > self.budget

    @contextlib.contextmanager
    def reserve(self, label: str):
        with self._changed:
            if self._full() and self.on_wait:
                self.on_wait(f"{label} waits for memory: it may need {self.need / 1e9:.1f} GB and the targets running "
                             f"hold {self.reserved / 1e9:.1f} GB of the {self.budget / 1e9:.1f} GB available")
            while self._full():
                self._changed.wait()
            self.reserved += self.need
        try:
            yield
        finally:
            with self._changed:
                self.reserved -= self.need
                self._changed.notify_all()


def kill_workers(workers) -> None:
    """SIGKILL the pool's worker processes (their own children die with them, see edgepack.processes)."""
    for process in list((getattr(workers, "_processes", None) or {}).values()):
        process.kill()


def _target_uses_schemes(module) -> bool:
    """Targets that convert from the PyTorch weights with their own compression (coreml, qnn) run once on fp32."""
    return getattr(module, "USES_QUANTIZED_SOURCE", True)


# ----------------------------------------------------------------------------------------------- build


@dataclass
class _Build:
    """What the stages of one build share: the recipe, the cache, what each stage produced and the result."""

    recipe: object
    config: BuildConfig
    cache: StageCache
    result: BuildResult
    last_stage: int
    status: object
    log: object
    available: dict
    start: float = field(default_factory=time.perf_counter)
    sources: dict[str, tuple[Path, str]] = field(default_factory=dict)  # scheme -> (model folder, its stage key)
    quality_reports: dict[str, dict] = field(default_factory=dict)
    targets: dict[tuple[str, str], Path] = field(default_factory=dict)  # (target, scheme) -> bundle folder
    profiles: dict[str, dict] = field(default_factory=dict)
    verdicts: dict[str, list] = field(default_factory=dict)
    _inputs: dict = field(default_factory=dict)  # declaration -> (versions, module sources)

    def reaches(self, stage: str) -> bool:
        return self.last_stage >= STAGES.index(stage)

    def key(self, declaration: StageDeclaration, payload: dict) -> str:
        if declaration not in self._inputs:  # read once per build
            self._inputs[declaration] = (stage_versions(declaration), module_sources(declaration.modules, PACKAGE_ROOT))
        versions, sources = self._inputs[declaration]
        return compute_key(declaration, payload, versions, sources)

    def run_stage(self, declaration: StageDeclaration, name: str, payload: dict, produce) -> tuple[Path, str]:
        """(the stage's cached output folder, its key): reused when its cache entry is intact, else produced."""
        stage_name = declaration.stage
        key = self.key(declaration, payload)
        t0 = time.perf_counter()
        self.status(f"{stage_name}: {name}")
        path, reused, rebuilt = self.cache.run(stage_name, key, produce, force=False)
        record = StageRecord(stage_name, name, key, reused, time.perf_counter() - t0, path, rebuilt)
        self.result.records.append(record)
        done = "reused from cache" if reused else f"built in {record.seconds:.1f} s"
        self.log(f"{stage_name:<8} {name:<28} {f'{rebuilt} in {record.seconds:.1f} s' if rebuilt else done}")
        return path, key


def convert_payload(model: dict) -> dict:
    """The convert stage's payload for the recipe's [model] table: the source's content and the options."""
    return {"source": source_fingerprint(model["source"]), "options": {k: v for k, v in model.items() if k != "source"}}


def _convert_stage(build: _Build) -> None:
    from edgepack.convert import ConvertConfig, convert_model

    model = build.recipe.model
    payload = convert_payload(model)
    convert_config = ConvertConfig(**build.recipe.convert_options())
    build.sources[FP32] = build.run_stage(CONVERT, "export", payload, lambda o: convert_model(model["source"], o, convert_config))


def _quantize_stage(build: _Build) -> None:
    from edgepack.quantize import QualityConfig, QualityGate, QuantizeConfig, quantize_model

    if not build.reaches("quantize"):
        return
    recipe, result = build.recipe, build.result
    export, convert_key = build.sources[FP32]
    evaluation, calibration = recipe.evaluation, recipe.calibration
    gate = QualityGate(evaluation.get("max_kl"), evaluation.get("min_top1"), evaluation.get("max_ppl_ratio"), evaluation.get("min_cosine"))
    quality = QualityConfig(eval_text=recipe.resolve(evaluation.get("text")), eval_tokens=evaluation.get("tokens", 512))
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
        path, key = build.run_stage(QUANTIZE, name, payload, lambda o, c=qconfig: quantize_model(export, o, c))
        build.sources[name] = (path, key)
        report = json.loads((path / "quantize.json").read_text())
        build.quality_reports[name] = report
        result.gates.extend(gate.gates(report.get("quality"), subject=name))


def _target_tasks(build: _Build) -> list[tuple]:
    """(target, scheme, module, options) for every bundle the recipe asks for, slow conversions first."""
    import importlib

    tasks = []
    for target_name, options in build.recipe.targets.items():
        module = importlib.import_module(build.available[target_name])
        uses_schemes = _target_uses_schemes(module)
        schemes = [s for s in build.sources if s != FP32 or len(build.sources) == 1] if uses_schemes else [FP32]
        tasks.extend((target_name, scheme, module, options) for scheme in schemes)
    # Slow conversions from the PyTorch weights (coreml, qnn) start first so parallel jobs pack well.
    tasks.sort(key=lambda task: _target_uses_schemes(task[2]))
    return tasks


def _target_stage(build: _Build) -> None:
    if not build.reaches("target"):
        return
    result = build.result
    tasks = _target_tasks(build)
    if build.config.jobs > 1 and len(tasks) > 1:
        finished = _run_in_workers(build, tasks)
    else:
        finished = [_run_target(build, task, None) for task in tasks]
    for (target_name, scheme, *_), path in finished:
        build.targets[(target_name, scheme)] = path
        report = json.loads((path / "target.json").read_text())
        result.gates.extend(check_gates(report.get("checks", {}), f"{target_name}/{scheme}"))


def _run_target(build: _Build, task: tuple, workers) -> tuple[tuple, Path]:
    """Build (or reuse) one target bundle; in a worker process of `workers` (a `_Workers`) when given."""
    target_name, scheme, module, options = task
    source_path, source_key = build.sources[scheme]
    label = f"{target_name}/{scheme}"
    payload = {"source": source_key, "target": target_name, "options": options}
    # The table's values as the config takes them, with the recipe's [evaluation]/[calibration] texts for text
    # fields the table leaves unset; the key holds the content of every text a target reads.
    kwargs = build.recipe.target_options(module, target_name)
    texts = {key: _text_fingerprint(build.recipe, str(value)) for key, value in kwargs.items() if isinstance(value, Path)}
    if texts:
        payload["texts"] = texts

    def produce(out_path):
        if workers is None:
            _build_target(module.__name__, source_path, out_path, kwargs)
        else:
            with workers.memory.reserve(label):
                workers.pool.submit(_build_target, module.__name__, source_path, out_path, kwargs, workers.running, label).result()

    path, _ = build.run_stage(target_declaration(target_name, module.__name__, options), label, payload, produce)
    return task, path


@dataclass
class _Workers:
    """The process pool of `build --jobs N`, and the folder where each worker notes the target it builds."""

    pool: object
    running: Path
    processes: dict  # the pool's own {pid: Process}, kept to read exit codes after the pool broke
    memory: MemoryAdmission


def _run_in_workers(build: _Build, tasks: list[tuple]) -> list[tuple[tuple, Path]]:
    # Worker processes, not threads: the quantizers and converters the targets call are mostly Python and hold
    # the GIL. Caching, locking and renaming stay in this process, one thread per job.
    import tempfile
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with tempfile.TemporaryDirectory(prefix="edgepack-workers-") as running:
        pool = target_workers(build.config.jobs)
        need = int(TARGET_PEAK_PER_WEIGHT_BYTE * model_weight_bytes(build.sources[FP32][0]))
        workers = _Workers(pool, Path(running), pool._processes, MemoryAdmission(build.config.max_memory_bytes or available_memory(), need, build.log))
        try:
            with pool, ThreadPoolExecutor(max_workers=build.config.jobs) as threads:
                try:
                    return list(threads.map(lambda task: _run_target(build, task, workers), tasks))
                except (KeyboardInterrupt, SystemExit):
                    # Interrupted: end the targets in flight now rather than wait for them. (After an ordinary
                    # error they finish, so the rerun finds them in the cache.)
                    kill_workers(pool)
                    raise
        except BrokenProcessPool:
            raise _worker_crash(workers) from None


def _worker_crash(workers: _Workers):
    """The error for a worker process that died: which target it was building and how it ended."""
    import signal

    from edgepack.errors import InternalError

    building = {}
    for note in workers.running.iterdir():
        with contextlib.suppress(OSError, ValueError):
            building[int(note.name)] = note.read_text()
    ended = {pid: process.exitcode for pid, process in list(workers.processes.items())}
    # The pool terminates (SIGTERM) the workers still alive once one died: the one that died ended otherwise.
    dead = [pid for pid, code in ended.items() if pid in building and code not in (None, 0, -signal.SIGTERM)]
    dead = dead or [pid for pid in ended if pid in building]
    if not dead:
        return InternalError("a worker process building targets died; rerun with --jobs 1 to see which target and why")
    pid = dead[0]
    code = ended.get(pid)
    if code is None:
        how = "ended"
    elif code < 0:
        how = f"signal {-code}"
        with contextlib.suppress(ValueError):
            how += f", {signal.Signals(-code).name}"
    else:
        how = f"exit status {code}"
    return InternalError(f"the worker building target {building[pid]} died ({how}); rerun with --jobs 1 to see why")


def _profile_stage(build: _Build) -> None:
    recipe = build.recipe
    if not (build.reaches("profile") and (recipe.devices or recipe.budgets or recipe.profile or recipe.measured)):
        return
    import platform

    from edgepack.profiles.measure import ProfileConfig, profile_in_fresh_process

    prof = recipe.profile
    prompt_lens = prof.get("prompt_len", [128])
    devices = tuple(dict.fromkeys(list(recipe.devices) + [d for d in recipe.budgets if d != "host" and d not in recipe.measured]))
    export = build.sources.get(FP32)
    # devices with `on` measure each bundle there too; their parity is against the fp32 export
    pconfig = ProfileConfig(devices=devices, prompt_lens=tuple(prompt_lens if isinstance(prompt_lens, list) else [prompt_lens]),
                            gen_len=prof.get("gen_len", 64), runs=prof.get("runs", 3), warmup=prof.get("warmup", 1),
                            threads=prof.get("threads"), on=tuple((name, d["on"]) for name, d in recipe.measured.items()),
                            reference=Path(export[0]) if export else None)
    targets = build.targets
    for scheme, (source_path, source_key) in build.sources.items():
        if scheme == FP32 and len(build.sources) > 1:
            continue
        # The ort bundle (or the export), plus every other bundle onnxruntime runs here (ort-mobile's .ort):
        # each measured as shipped, in a fresh process, and projected from its own graph.
        measured = [(scheme, targets.get(("ort", scheme), source_path), "ort" if ("ort", scheme) in targets else "export")]
        measured += [(profile_name(scheme, target), path, target) for (target, s), path in targets.items()
                     if s == scheme and target in PROFILED_TARGETS and target != "ort"]
        for name, model_path, kind in measured:
            payload = {"model": [str(model_path), source_key, kind], "config": repr(pconfig),
                       "host": [platform.node(), platform.processor(), os.cpu_count()]}
            path, _ = build.run_stage(PROFILE, name, payload,
                                      lambda o, m=model_path: (o.mkdir(), profile_in_fresh_process(m, o / "profile.json", pconfig)))
            build.profiles[name] = json.loads((path / "profile.json").read_text())
    _project_artifacts(build, devices, pconfig)


def _project_artifacts(build: _Build, devices: tuple, pconfig) -> None:
    """Core ML and QNN bundles, which nothing here runs at device speed, projected onto the recipe's devices
    whose compute unit runs them (Apple devices' Neural Engine or GPU, Snapdragons' HTP). Arithmetic only: no stage."""
    from edgepack.profiles.artifacts import PROJECTED_TARGETS, project_artifact
    from edgepack.profiles.devices import get_device, load_devices

    known = load_devices([])
    chosen = [get_device(d, known) for d in devices]
    for (target, scheme), path in build.targets.items():
        if target in PROJECTED_TARGETS:
            build.profiles[profile_name(scheme, target)] = project_artifact(path, chosen, pconfig.prompt_lens, pconfig.gen_len)


def _check_stage(build: _Build) -> None:
    if not (build.reaches("check") and build.recipe.budgets):
        return
    from edgepack.profiles.budgets import build_gates, evaluate, parse_budgets

    result = build.result
    budgets = parse_budgets(build.recipe.budgets, where="recipe key budgets")
    for scheme, profile in build.profiles.items():
        # a projected-only artifact (coreml, qnn) answers to the budgets of the devices it runs on
        applicable = budgets if profile.get("host") else [b for b in budgets if b.device in (profile.get("projections") or {})]
        build.verdicts[scheme] = evaluate(profile, applicable)
        result.gates.extend(build_gates(scheme, build.verdicts[scheme]))


def _bundle_stage(build: _Build) -> None:
    """Assemble the bundle in a staging folder next to OUT and rename it into place."""
    from edgepack.bundle import write_manifest
    from edgepack.outputs import replace_dir, staging_dir
    from edgepack.report import build_report, write_reports

    recipe, result, out = build.recipe, build.result, build.result.out
    with staging_dir(out) as tmp:
        for (target_name, scheme), path in build.targets.items():
            shutil.copytree(path, tmp / "targets" / target_name / scheme)
        for scheme, report in build.quality_reports.items():
            (tmp / "quality").mkdir(exist_ok=True)
            (tmp / "quality" / f"{scheme}.json").write_text(json.dumps(report, indent=2) + "\n")
        for scheme, profile in build.profiles.items():
            (tmp / "profiles").mkdir(exist_ok=True)
            (tmp / "profiles" / f"{scheme}.json").write_text(json.dumps(profile, indent=2) + "\n")
        shutil.copy2(recipe.path, tmp / "recipe.toml")
        report = build_report(recipe, build.sources, build.quality_reports, build.targets, build.profiles, build.verdicts, result,
                              time.perf_counter() - build.start)
        result.report = report
        result.rows = report["summary"]
        write_reports(tmp, report, result.gates)
        write_manifest(tmp, {"recipe": recipe.raw, "versions": _versions_fingerprint(),
                             "not_reproducible": not_reproducible(tmp, build.targets, build.available),
                             "stages": [{"stage": r.stage, "name": r.name, "key": r.key, "reused": r.reused, **({"rebuilt": r.rebuilt} if r.rebuilt else {})}
                                        for r in result.records],
                             "figures": report["figures"]})
        replace_dir(tmp, out)


# The build, in order. Each stage reads what the earlier ones left in the shared `_Build` and skips itself
# when `--only` stops before it (the bundle is always written).
BUILD_STAGES = (_convert_stage, _quantize_stage, _target_stage, _profile_stage, _check_stage, _bundle_stage)


def build_recipe(recipe_path: Path | str, out: Path | str, config: BuildConfig = BuildConfig(), on_status=None, on_log=None) -> BuildResult:
    from edgepack.outputs import prepare_output
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
    build = _Build(recipe=recipe, config=config, cache=cache, result=BuildResult(out=out), last_stage=last_stage,
                   status=status, log=log, available=registered_targets())
    for run in BUILD_STAGES:
        run(build)
    if junit is not None:
        from edgepack.outputs import write_output_file

        write_output_file(junit / "junit.xml" if junit.is_dir() else junit, (out / "junit.xml").read_bytes())
    return build.result
