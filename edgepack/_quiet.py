"""Silence the chatter of heavy libraries (tracer warnings, progress bars) so edgepack's own output stays readable."""

from __future__ import annotations

import contextlib
import os
import warnings


def quiet_libraries() -> None:
    # Never reach for a model hub: edgepack works on local files only.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF loader draws its own bar
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import logging

    # onnxruntime's quantizers log every node at INFO through the root handler.
    for name in ("onnxruntime", "onnxruntime.quantization", "optimum", "transformers", "neural_compressor"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        import torch.jit

        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    except Exception:  # torch missing is reported where torch is needed
        pass
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except Exception:
        pass
    try:
        from optimum.utils import logging as optimum_logging

        optimum_logging.set_verbosity_error()
    except Exception:
        pass


# ----------------------------------------------------------------------------------- third-party output

LOG_KEEP_DAYS = 7
_terminal_stderr = None  # the user's stderr while third_party_output() points fd 2 at the log file


def user_stderr():
    """The stream edgepack's own stderr lines go to: the user's terminal, also while libraries' output is logged."""
    import sys

    return _terminal_stderr or sys.stderr


def log_dir():
    from edgepack.sources import cache_root

    return cache_root() / "logs"


def _open_log(command: str):
    """A new log file under $EDGEPACK_CACHE/logs (old ones pruned), or None when no such file can be made."""
    import time
    from pathlib import Path

    folder = log_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        cutoff = time.time() - LOG_KEEP_DAYS * 86400
        for old in folder.glob("*.log"):
            try:
                if old.stat().st_mtime < cutoff:
                    old.unlink()
            except OSError:  # another run removed it first
                pass
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(folder) / f"{stamp}-{os.getpid()}-{command or 'edgepack'}.log"
        return path, open(path, "a", encoding="utf-8", errors="replace", buffering=1)
    except OSError:
        return None, None


def _flush_c_stdio() -> None:
    """Flush the C library's stdout/stderr buffers, so what native code printed lands where fd 1/2 point now."""
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except Exception:  # no libc to flush (unusual platforms): nothing was buffered there by us either
        pass


def _stream_on_fd(stream, fd: int) -> bool:
    try:
        return stream is not None and stream.fileno() == fd
    except (AttributeError, OSError, ValueError):  # StringIO and the like (tests, embedding hosts)
        return False


def _text_stream(fd: int, like):
    import io

    return io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding=getattr(like, "encoding", None) or "utf-8",
                            errors=getattr(like, "errors", None) or "backslashreplace",
                            line_buffering=bool(getattr(like, "line_buffering", True)), write_through=True)


@contextlib.contextmanager
def third_party_output(command: str = "", enabled: bool = True):
    """Send what libraries write to the process's stdout/stderr into a log file; edgepack's own lines still reach the user.

    onnxruntime's C++ logger, the QNN backend libraries and Python loggers configured by other packages
    (`logging.basicConfig` at import time) write straight to file descriptors 1 and 2, so silencing Python
    loggers alone is not enough: fds 1 and 2 are pointed at the log file for the whole command, which also
    covers worker and child processes, and Python's `sys.stdout` plus `user_stderr()` are re-opened on the
    user's original descriptors. The log is deleted when empty; on a failure (exit 3, 4 or 70) that left
    something in it, the error message names it. `enabled=False` (--debug) leaves everything on the terminal.
    """
    import logging
    import sys

    global _terminal_stderr
    path, log = _open_log(command) if enabled else (None, None)
    if log is None:
        yield None
        return
    sys.stdout.flush()
    sys.stderr.flush()
    _flush_c_stdio()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    old_stdout, old_terminal = sys.stdout, _terminal_stderr
    if _stream_on_fd(sys.stdout, 1):
        sys.stdout = _text_stream(saved[1], old_stdout)
    _terminal_stderr = _text_stream(saved[2], sys.stderr) if _stream_on_fd(sys.stderr, 2) else None
    for fd in (1, 2):
        os.dup2(log.fileno(), fd)
    # A root handler first: packages that call logging.basicConfig() on import (onnxruntime's quantizer sets the
    # root level to INFO and prints to stderr) then leave logging alone, and their records land in the log.
    root = logging.getLogger()
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    root.addHandler(handler)
    logging.captureWarnings(True)
    failed = False
    try:
        yield path
    except BaseException as exc:
        failed = True
        _name_log_in_error(exc, path, log)
        raise
    finally:
        if not failed and sys.exc_info()[1] is not None:  # click hands the command's exception to its resources
            _name_log_in_error(sys.exc_info()[1], path, log)
        logging.captureWarnings(False)
        root.removeHandler(handler)
        for stream in (sys.stdout, _terminal_stderr, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        _flush_c_stdio()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        sys.stdout, _terminal_stderr = old_stdout, old_terminal
        log.close()
        try:
            if path.stat().st_size == 0:
                path.unlink()
        except OSError:
            pass


def _name_log_in_error(exc: BaseException, path, log) -> None:
    """Append the log's path to a failure's one-line message (not to gate failures or usage errors: those explain themselves)."""
    from edgepack.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_NOT_ON_HOST, EdgepackError

    if not isinstance(exc, EdgepackError) or exc.exit_code not in (EXIT_BAD_INPUT, EXIT_NOT_ON_HOST, EXIT_INTERNAL):
        return
    if getattr(exc, "_log_named", False):
        return
    try:
        log.flush()
        empty = path.stat().st_size == 0
    except (OSError, ValueError):
        return
    if not empty and exc.args and isinstance(exc.args[0], str):
        exc.args = (f"{exc.args[0]} (libraries' output: {path})",) + exc.args[1:]
        exc._log_named = True
