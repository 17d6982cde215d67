"""Errors that reach the user as one line and an exit code (see README, "Exit codes")."""

from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_FAILED = 1  # a budget or quality gate failed: the release gate
EXIT_USAGE = 2  # bad option, bad recipe, output folder in the way
EXIT_BAD_INPUT = 3  # missing/corrupt model, unsupported architecture
EXIT_NOT_ON_HOST = 4  # a target cannot be built or checked on this host
EXIT_INTERNAL = 70  # a bug in edgepack (EX_SOFTWARE); `--debug` shows the traceback


class EdgepackError(Exception):
    """Base class: `message` is printed on one line, the process exits with `exit_code`."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str):
        # One line, always: release pipelines grep stderr.
        super().__init__(" ".join(str(message).split()))

    @property
    def message(self) -> str:
        return str(self)


class UsageError(EdgepackError):
    exit_code = EXIT_USAGE


class OutputExistsError(UsageError):
    pass


class BadInputError(EdgepackError):
    exit_code = EXIT_BAD_INPUT


class UnsupportedModelError(BadInputError):
    pass


class NotOnThisHostError(EdgepackError):
    exit_code = EXIT_NOT_ON_HOST


class GateFailedError(EdgepackError):
    """A parity, quality or budget gate failed; outputs are complete and say why."""

    exit_code = EXIT_GATE_FAILED


class InternalError(EdgepackError):
    """A failure that is edgepack's, not the user's (a worker process died): exit 70, with what was running."""

    exit_code = EXIT_INTERNAL


class OutputError(UsageError):
    """An output cannot be written where the user asked (full or read-only disk, a file in the way, /proc)."""


# ------------------------------------------------------------------------------------------ the mapping
# Every exception that reaches the command line passes through `classify`: edgepack's own errors keep
# their code; OS errors and the model loaders' parse errors, which describe the user's files and disks
# rather than a bug, become one line with the path and exit 2 (an output) or 3 (an input). Anything
# else stays exit 70, a bug.

def _write_only_errnos() -> set[int]:
    import errno

    return {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG, errno.EXDEV, errno.ENOTEMPTY, errno.EEXIST,
            errno.EBUSY, errno.EMLINK, errno.ETXTBSY}


def _reason(exc: OSError) -> str:
    import os

    if exc.errno is not None:
        return os.strerror(exc.errno)
    return " ".join(str(exc).split()) or type(exc).__name__


def _output_for(path: str | None, ancestors: bool = True):
    """The declared output `path` belongs to (itself, inside it, its staging sibling or a parent created for it)."""
    import os
    from pathlib import Path

    from edgepack.outputs import declared_outputs

    outputs = declared_outputs()
    if path is None:
        return None
    target = Path(os.path.abspath(path))
    for out in reversed(outputs):  # the innermost (latest) output first
        out_abs = Path(os.path.abspath(out))
        if target == out_abs or out_abs in target.parents or (ancestors and target in out_abs.parents):
            return out
        for parent in (target, *target.parents):
            if parent.parent == out_abs.parent and parent.name.startswith(f".{out_abs.name}."):
                return out
    return None


def _from_os_error(exc: OSError) -> EdgepackError | None:
    import errno

    from edgepack.outputs import declared_outputs

    paths = [p for p in (exc.filename, getattr(exc, "filename2", None)) if p is not None]
    paths = [p.decode(errors="replace") if isinstance(p, bytes) else str(p) for p in paths]
    reason = _reason(exc)
    for path in paths:
        out = _output_for(path, ancestors=exc.errno != errno.EISDIR)  # reading a parent folder as a file is an input error
        if out is not None:
            return OutputError(f"cannot write {out}: {reason} ({path})" if str(out) != path else f"cannot write {out}: {reason}")
    if exc.errno in _write_only_errnos():
        # No path in the error (a write() on a full disk): the output whose file system is full or read-only.
        outputs = list(reversed(declared_outputs()))
        where = next((o for o in outputs if _filesystem_problem(o)), outputs[0] if outputs else (paths[-1] if paths else None))
        return OutputError(f"cannot write {where}: {reason}" if where is not None else f"cannot write the output: {reason}")
    if paths:
        path = paths[0]
        if _inside_edgepack(path):
            return None  # edgepack's own files: a bug, not the user's input
        if exc.errno == errno.EISDIR:
            return BadInputError(f"cannot read {path}: it is a folder, expected a file")
        if exc.errno == errno.ENOTDIR:
            return BadInputError(f"cannot read {path}: a part of the path is a file, not a folder")
        return BadInputError(f"cannot read {path}: {reason}")
    if exc.errno in (errno.EIO, errno.EACCES, errno.EPERM):
        return BadInputError(f"cannot read an input: {reason}")
    return None


def _inside_edgepack(path: str) -> bool:
    import os

    package = os.path.dirname(os.path.abspath(__file__))
    return os.path.abspath(path).startswith(package + os.sep)


def _from_shutil_error(exc) -> EdgepackError | None:
    """shutil.copytree collects (src, dst, why) per file: report the first, and how many more."""
    entries = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
    if not entries:
        return None
    first = entries[0]
    if not (isinstance(first, tuple) and len(first) == 3):
        return None
    src, dst, why = first
    more = f" (and {len(entries) - 1} more files)" if len(entries) > 1 else ""
    out = _output_for(str(dst))
    why = " ".join(str(why).split())
    if len(why) > 200:
        why = why[:200] + "..."
    if out is not None:
        return OutputError(f"cannot write {out}: copying {src} failed: {why}{more}")
    return BadInputError(f"cannot copy {src} to {dst}: {why}{more}")


def _from_loader_error(exc: BaseException) -> EdgepackError | None:
    """onnxruntime, onnx and protobuf parse errors: the model file is broken or not a model."""
    module = type(exc).__module__ or ""
    name = type(exc).__name__
    message = " ".join(str(exc).split())
    if module.startswith("onnxruntime") and ("Load model from" in message or "INVALID_PROTOBUF" in message
                                             or "Protobuf parsing failed" in message or "NO_SUCHFILE" in message):
        return BadInputError(f"onnxruntime cannot load the model: {message[:300]}")
    if module.startswith("google.protobuf") and name == "DecodeError":
        return BadInputError(f"a model file is not a valid ONNX protobuf (truncated or corrupt): {message[:200]}")
    return None


def _filesystem_problem(out) -> str | None:
    """Why the file system holding `out` cannot take more data (read-only, full), if it cannot."""
    import os
    from pathlib import Path

    folder = Path(os.path.abspath(out))
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        stats = os.statvfs(folder)
    except OSError:
        return None
    if stats.f_flag & os.ST_RDONLY:
        return "Read-only file system"
    if stats.f_bavail * stats.f_frsize < 1 << 20:
        return "No space left on device"
    return None


def _from_library_write_error(exc: BaseException) -> EdgepackError | None:
    """A library (onnxruntime saving external data, a converter) failed to write into an output being staged."""
    import os

    from edgepack.outputs import declared_outputs

    message = " ".join(str(exc).split())
    if "write" not in message.lower() and "save" not in message.lower():
        return None
    for out in reversed(declared_outputs()):
        out_abs = os.path.abspath(out)
        staging = os.path.join(os.path.dirname(out_abs), f".{os.path.basename(out_abs)}.")
        if out_abs in message or staging in message:
            reason = _filesystem_problem(out) or "writing failed"
            return OutputError(f"cannot write {out}: {reason} ({message[-200:]})")
    return None


def classify(exc: BaseException) -> EdgepackError | None:
    """The user-facing error for `exc`, or None when it is a bug (exit 70)."""
    import shutil

    if isinstance(exc, EdgepackError):
        return exc
    if isinstance(exc, shutil.Error):
        return _from_shutil_error(exc)
    if isinstance(exc, OSError) and type(exc).__module__ == "builtins":
        return _from_os_error(exc)
    return _from_loader_error(exc) or _from_library_write_error(exc)
