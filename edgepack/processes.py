"""Child processes that end with the edgepack process that started them.

A build killed from outside (kill -9, the OOM killer, a CI timeout) runs no cleanup code, so a
model builder or target worker it started would go on running and writing into the cache. Two
mechanisms make them die with it:

* `run_child` (helper programs such as onnxruntime-genai's model builder): the child asks the
  kernel for SIGKILL when its parent dies (Linux `prctl(PR_SET_PDEATHSIG)`), and runs in its own
  process group, which is killed when the wait for it ends with an exception (KeyboardInterrupt
  included). The death signal is tied to the *thread* that started the child; `run_child` waits in
  that same thread, so the thread outlives the child.
* `exit_with_parent` (initializer of the `build --jobs N` worker processes): the pool starts its
  workers from whichever thread submits first, and that thread may end before the worker does, so
  the death signal does not fit; a watcher thread in the worker waits for the parent to end instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

PR_SET_PDEATHSIG = 1
_PRCTL = None


def _prctl():
    """libc's prctl, looked up in the parent: after fork only the already-resolved call is made."""
    global _PRCTL
    if _PRCTL is None and sys.platform.startswith("linux"):
        import ctypes

        function = ctypes.CDLL(None, use_errno=True).prctl
        function.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        function.restype = ctypes.c_int
        _PRCTL = function
    return _PRCTL


def _die_with(parent: int, prctl):
    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the child's process group (it leads one: `start_new_session`) and reap the child."""
    if process.returncode is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    process.wait()


def run_child(command: list[str], *, env: dict | None = None, cwd=None, timeout: float | None = None) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True)` for a child that must not outlive edgepack."""
    prctl = _prctl()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                               start_new_session=True, preexec_fn=_die_with(os.getpid(), prctl) if prctl else None)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except BaseException:
        kill_group(process)
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def exit_with_parent(parent: int) -> None:
    """End this process as soon as process `parent` ends (a daemon thread waits for it)."""

    def watch() -> None:
        try:
            import select

            handle = os.pidfd_open(parent)
            if os.getppid() == parent:  # the handle is our parent's, not a recycled pid's
                select.select([handle], [], [])  # readable once the parent has exited
        except (AttributeError, OSError):  # no pidfd (older kernel, other OS): poll
            import time

            while os.getppid() == parent:
                time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="edgepack-exit-with-parent", daemon=True).start()
