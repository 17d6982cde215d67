"""Output folders are built in a temporary sibling and renamed into place only when complete."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from edgepack.errors import OutputExistsError, UsageError


def prepare_output(out: Path, force: bool) -> None:
    """Refuse to clobber: `out` may not exist, may be empty, or may be replaced with --force."""
    if out.exists():
        if not out.is_dir():
            raise OutputExistsError(f"output {out} exists and is a file; choose another -o")
        if any(out.iterdir()) and not force:
            raise OutputExistsError(f"output {out} exists and is not empty; pass --force to replace it")
    if out.parent.exists() and not out.parent.is_dir():
        raise UsageError(f"cannot write {out}: {out.parent} is a file")
    # Parent folders are created (build/ on a fresh clone); the output folder itself only appears complete.
    out.parent.mkdir(parents=True, exist_ok=True)


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out`, replacing an old `out` only after the new one is complete."""
    if out.exists():
        trash = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, trash)
        os.rename(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, out)


@contextmanager
def staging_dir(out: Path):
    """A fresh temporary folder beside `out`; removed on exit unless it was renamed to `out`."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
