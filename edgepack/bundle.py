"""Bundle manifest: every file with its size and sha256, so a bundle can be verified later.

`write_manifest` records the files of a finished bundle (plus whatever context the caller passes:
recipe, versions, host, figures); `verify_bundle` re-hashes and names every file that is missing,
extra or changed. `manifest.json` never lists itself.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

from edgepack.errors import BadInputError

MANIFEST = "manifest.json"
MANIFEST_SCHEMA_VERSION = 1


def file_record(path: Path) -> dict:
    from edgepack.sources import file_sha256

    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _walk(folder: Path) -> tuple[list[Path], list[Path]]:
    """(regular files, everything else: symbolic links, fifos, sockets, devices) under `folder`, never following a link."""
    import os
    import stat

    files, others = [], []
    for parent, dirs, names in os.walk(folder):  # os.walk lists a link to a folder but does not enter it
        for name in dirs + names:
            path = Path(parent) / name
            mode = path.lstat().st_mode
            if stat.S_ISREG(mode):
                files.append(path)
            elif not stat.S_ISDIR(mode):
                others.append(path)
    return sorted(files), sorted(others)


def bundle_files(folder: Path) -> list[Path]:
    """The regular files of a bundle, manifest.json excepted; symbolic links are neither followed nor listed."""
    return [p for p in _walk(folder)[0] if p.relative_to(folder).as_posix() != MANIFEST]


def _describe_other(folder: Path, path: Path) -> str:
    """Why a non-regular file does not belong in a bundle: where a link points, or what the file is."""
    import os

    if not path.is_symlink():
        return "not a regular file"
    target = os.readlink(path)
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):  # a loop of links
        resolved = None
    if resolved is None or not resolved.exists():
        where = "dangling"
    elif resolved.is_relative_to(folder.resolve()):
        where = "inside the bundle"
    else:
        where = "outside the bundle"
    return f"a symbolic link to {target}, {where}"


def host_description() -> dict:
    import os

    return {"system": platform.system(), "machine": platform.machine(), "python": platform.python_version(),
            "processor": platform.processor() or None, "cpus": os.cpu_count()}


def write_manifest(folder: Path, context: dict | None = None) -> dict:
    """Hash every file under `folder` and write `folder/manifest.json`; return the manifest.

    A bundle holds regular files only: a symbolic link (which could point out of the folder) or any
    other special file is refused rather than followed.
    """
    others = _walk(folder)[1]
    if others:
        path = others[0]
        raise BadInputError(f"{path} is {_describe_other(folder, path)}: a bundle holds regular files only")
    manifest = {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "kind": "edgepack.manifest",
        "files": {p.relative_to(folder).as_posix(): file_record(p) for p in bundle_files(folder)},
        "host": host_description(),
        **(context or {}),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


@dataclass
class VerifyResult:
    folder: Path
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    checked: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.changed)

    def problems(self) -> list[str]:
        return ([f"missing: {p}" for p in self.missing] + [f"extra: {p}" for p in self.extra]
                + [f"changed: {p}" for p in self.changed])


def verify_bundle(folder: Path | str) -> VerifyResult:
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not folder.is_dir():
        raise BadInputError(f"{folder} is not a folder")
    if not manifest_path.is_file():
        raise BadInputError(f"{folder} has no {MANIFEST}: it is not a finished edgepack bundle")
    try:
        recorded = json.loads(manifest_path.read_text())["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise BadInputError(f"{manifest_path} is not a valid manifest: {exc}") from exc
    if not isinstance(recorded, dict) or not all(
        isinstance(r, dict) and isinstance(r.get("bytes"), int) and isinstance(r.get("sha256"), str) for r in recorded.values()
    ):
        raise BadInputError(f"{manifest_path} is not a valid manifest: `files` must map each path to its bytes and sha256")
    result = VerifyResult(folder)
    files, others = _walk(folder)
    present = {p.relative_to(folder).as_posix(): p for p in files if p.relative_to(folder).as_posix() != MANIFEST}
    # edgepack writes regular files only: a link in its place (or added) is named with where it points.
    odd = {p.relative_to(folder).as_posix(): _describe_other(folder, p) for p in others}
    for name, record in sorted(recorded.items()):
        path = present.get(name)
        if name in odd:
            result.changed.append(f"{name} ({odd.pop(name)})")
            continue
        if path is None:
            result.missing.append(name)
            continue
        result.checked += 1
        if path.stat().st_size != record["bytes"] or file_record(path)["sha256"] != record["sha256"]:
            result.changed.append(name)
    result.extra = sorted(set(present) - set(recorded)) + [f"{name} ({why})" for name, why in sorted(odd.items())]
    return result
