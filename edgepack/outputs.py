"""Output folders are built in a temporary sibling and renamed into place only when complete.

Rules every command that writes a folder follows:
- OUT is replaced only when it is empty, when `--force` names it, or when the caller accepts a kind of
  edgepack output there (`build` replaces a previous bundle: a `manifest.json` of kind
  `edgepack.manifest` listing every file in the folder). A folder that merely contains a file called
  `manifest.json` is never deleted without `--force`.
- The new output is staged in `.OUT.tmp-PID` beside OUT; the old one is moved to `.OUT.old-PID` only
  once the new one is complete. The rename dance runs under a lock on OUT's parent folder, so two
  processes replacing the same OUT take turns instead of failing half-way.
- Leftovers of killed processes (`.OUT.tmp-PID`, `.OUT.old-PID` whose PID is gone) are removed by the
  next run that writes OUT; another live process's staging folder is never touched.
- Every path declared here is remembered, so an OS error raised while writing (full or read-only disk,
  a file in the way) is reported as a problem with that output, not as a bug (see `edgepack.errors`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

from edgepack.errors import OutputExistsError, UsageError

# Outputs being written by this process: the error mapping names them when an OS error has no path.
_declared: list[Path] = []
# Kinds of edgepack output that may be replaced without --force, per output folder.
_replaceable: dict[Path, tuple[bool, tuple[str, ...]]] = {}

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)$")


def declared_outputs() -> list[Path]:
    return list(_declared)


def reset_declared_outputs() -> None:
    _declared.clear()
    _replaceable.clear()


def declare_output(path: Path | str) -> Path:
    path = Path(path)
    if path not in _declared:
        _declared.append(path)
    return path


def _key(out: Path) -> Path:
    return Path(os.path.abspath(out))


def _refuse_current_folder(out: Path) -> None:
    """OUT may not be the current folder, one of its parents or the filesystem root: it cannot be swapped."""
    target = Path(os.path.abspath(out))
    cwd = Path(os.getcwd())
    if target == Path(target.anchor) or target == cwd or target in cwd.parents:
        shown = ("the current folder" if target == cwd else
                 "the filesystem root" if target == Path(target.anchor) else "a parent of the current folder")
        raise UsageError(f"output {out} is {shown}; choose a new folder for -o (e.g. -o build/out)")


def edgepack_kind(out: Path) -> str | None:
    """The kind of edgepack output in folder `out` (e.g. edgepack.manifest), or None if edgepack did not write it."""
    for report in ("manifest.json", "target.json", "quantize.json", "convert.json"):
        path = out / report
        if not path.is_file() or path.is_symlink():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        kind = data.get("kind") if isinstance(data, dict) else None
        if isinstance(kind, str) and kind.startswith("edgepack."):
            if kind == "edgepack.manifest" and not _manifest_covers(out, data):
                return None
            return kind
    return None


def _manifest_covers(out: Path, manifest: dict) -> bool:
    """A bundle is edgepack's only if every file in it is one its manifest lists (nothing of the user's inside)."""
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        return False
    for path in out.rglob("*"):
        if path.is_dir() and not path.is_symlink():
            continue
        name = path.relative_to(out).as_posix()
        if name != "manifest.json" and name not in listed:
            return False
    return True


def _check_replaceable(out: Path, force: bool, kinds: tuple[str, ...]) -> None:
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is a file; choose another -o")
    if force or not any(out.iterdir()):
        return
    if kinds and edgepack_kind(out) in kinds:
        return
    if kinds:
        raise OutputExistsError(f"output {out} exists and is not an edgepack bundle (no manifest.json of kind edgepack.manifest "
                                "listing its files); pass --force to replace it")
    raise OutputExistsError(f"output {out} exists and is not empty; pass --force to replace it")


def prepare_output(out: Path, force: bool, replaceable_kinds: tuple[str, ...] = ()) -> None:
    """Refuse to clobber: `out` may not exist, may be empty, may hold one of `replaceable_kinds`, or --force.

    The decision is taken again by `replace_dir` just before the swap, in case the folder changed meanwhile.
    """
    out = declare_output(out)
    _refuse_current_folder(out)
    parent = out.parent
    for folder in [parent, *parent.parents]:
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                raise UsageError(f"cannot write {out}: {folder} is a file, not a folder")
            break
    # Missing parent folders (build/ on a fresh clone) are created for the checks below and removed again:
    # staging_dir creates them for good once the inputs have been read, so a refused run leaves nothing.
    created = [folder for folder in [parent, *parent.parents] if not (folder.exists() or folder.is_symlink())]
    try:
        if created:
            parent.mkdir(parents=True, exist_ok=True)
        with _parent_lock(parent):  # not while another process swaps OUT: it would look missing or half-moved
            _check_replaceable(out, force, replaceable_kinds)
        # Fail now, not after minutes of work, when nothing can be created there (/proc, read-only, no permission).
        probe = parent / f".{out.name}.tmp-{os.getpid()}"
        if not probe.exists():
            probe.mkdir()
            probe.rmdir()
    finally:
        for folder in created:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()
    _replaceable[_key(out)] = (force, tuple(replaceable_kinds))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_leftovers(out: Path) -> list[Path]:
    """Remove `.OUT.tmp-PID` / `.OUT.old-PID` folders beside `out` left by processes that no longer run."""
    removed = []
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return removed
    for path in siblings:
        match = _LEFTOVER.match(path.name)
        if match is None or match["name"] != out.name or _pid_alive(int(match["pid"])):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        removed.append(path)
    return removed


@contextlib.contextmanager
def _parent_lock(folder: Path):
    """An exclusive lock on the folder itself (flock on its descriptor): nothing is left behind on disk."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out`, replacing an old `out` only after the new one is complete."""
    force, kinds = _replaceable.get(_key(out), (False, ()))
    with _parent_lock(out.parent):
        # Checked again under the lock: another process may have put its output there meanwhile.
        _check_replaceable(out, force, kinds)
        if out.exists() or out.is_symlink():
            trash = out.parent / f".{out.name}.old-{os.getpid()}"
            if trash.exists():
                shutil.rmtree(trash, ignore_errors=True)
            os.rename(out, trash)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(trash, out)  # the previous output stays in place
                raise
            if trash.is_dir() and not trash.is_symlink():
                shutil.rmtree(trash, ignore_errors=True)
            else:
                trash.unlink()
        else:
            os.rename(tmp, out)


@contextlib.contextmanager
def staging_dir(out: Path):
    """A fresh temporary folder beside `out`; removed on exit unless it was renamed to `out`."""
    declare_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_output_file(path: Path | str) -> Path:
    """Fail early (before any work) when `path` cannot be an output file: a folder, or no parent folder."""
    path = declare_output(path)
    if path.is_dir():
        raise UsageError(f"cannot write {path}: it is a folder; name a file")
    for folder in [path.parent, *path.parent.parents]:
        if folder.exists():
            if not folder.is_dir():
                raise UsageError(f"cannot write {path}: {folder} is a file, not a folder")
            break
    if not path.parent.is_dir():
        raise UsageError(f"cannot write {path}: its parent folder {path.parent} does not exist")
    probe = path.parent / f".{path.name}.tmp-{os.getpid()}"  # nothing can be created there: fail before the work
    if not probe.exists():
        probe.touch()
        probe.unlink()
    return path


def write_output_file(path: Path | str, data: str | bytes) -> Path:
    """Write one output file atomically (temporary sibling, then rename): a failure leaves the old file intact."""
    path = check_output_file(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path
