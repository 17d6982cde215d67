"""Child processes end with the edgepack process that started them: kill -9 of the parent, an interrupt,
the worker pool of `build --jobs N`, and onnxruntime-genai's model builder."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the parent-death signal is Linux's")
SLEEPER = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)"


def _as_from_a_terminal() -> None:
    """SIGINT handled by default and not blocked, as in a process a shell starts. Both are inherited through
    fork and exec, and a library loaded into this test process may have ignored or blocked SIGINT; Python
    then never raises KeyboardInterrupt in the parent, which is not what a user's Ctrl-C meets."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _start(script: str, *args) -> subprocess.Popen:
    """A real parent process running `script` with this checkout's edgepack."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_as_from_a_terminal)


def _wait_for(predicate, what: str, timeout: float = 60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first, then the parent's pid), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"  # an unreaped zombie runs nothing


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _descendants(pid: int) -> list[int]:
    found = _children(pid)
    for child in list(found):
        found += _descendants(child)
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _assert_all_end(pids: list[int], timeout: float = 10.0) -> None:
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.05)
        survivors = [pid for pid in pids if _alive(pid)]
        assert not survivors, f"still running after their parent died: {survivors}"
    finally:
        for pid in pids:  # never leave them behind, even when the assertion fails
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _read_pid(path: Path) -> int | None:
    text = path.read_text() if path.is_file() else ""
    return int(text) if text.strip() else None


def test_a_child_dies_when_its_parent_is_killed_with_sigkill(tmp_path):
    pid_file = tmp_path / "child.pid"
    parent = _start("""
        import sys
        from edgepack.processes import run_child
        run_child([sys.executable, "-c", sys.argv[1], sys.argv[2]])
    """, SLEEPER, pid_file)
    child = _wait_for(lambda: _read_pid(pid_file), "the child to start")
    assert _alive(child)
    parent.kill()  # SIGKILL: no Python cleanup runs in the parent
    parent.wait()
    _assert_all_end([child])


def test_an_interrupted_wait_kills_the_childs_whole_process_group(tmp_path):
    # The child runs in its own process group (a Ctrl-C in the terminal does not reach it), so the
    # parent must end the group, grandchildren included, when the wait is interrupted.
    child_pid, grandchild_pid = tmp_path / "child.pid", tmp_path / "grandchild.pid"
    spawner = ("import subprocess, sys; subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[3]]); "
               "exec(sys.argv[1].replace('sys.argv[1]', 'sys.argv[2]'))")
    parent = _start("""
        import sys
        from edgepack.processes import run_child
        try:
            run_child([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]])
        except KeyboardInterrupt:
            print("interrupted", flush=True)
    """, spawner, SLEEPER, child_pid, grandchild_pid)
    child = _wait_for(lambda: _read_pid(child_pid), "the child to start")
    grandchild = _wait_for(lambda: _read_pid(grandchild_pid), "the grandchild to start")
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{parent.pid}/status").read_text().splitlines() if ":\t" in line)
    sigint = 1 << (signal.SIGINT - 1)
    assert not int(status["SigIgn"], 16) & sigint and not int(status["SigBlk"], 16) & sigint, "the parent cannot receive SIGINT"
    parent.send_signal(signal.SIGINT)
    # Well under the children's 120 s sleep: a parent that waited for them instead of ending them fails.
    stdout, stderr = parent.communicate(timeout=30)
    assert stdout.strip() == "interrupted", stderr
    _assert_all_end([child, grandchild], timeout=2)


def test_build_worker_processes_die_when_the_build_is_killed(tmp_path):
    # The pool is built as `build --jobs N` builds it and, as there, work is submitted from threads.
    parent = _start("""
        import threading, time
        from edgepack.build import target_workers

        if __name__ == "__main__":
            pool = target_workers(2)
            for _ in range(2):
                threading.Thread(target=lambda: pool.submit(time.sleep, 120).result()).start()
            time.sleep(120)
    """)

    def workers():
        found = [pid for pid in _children(parent.pid) if any("spawn_main" in part for part in _cmdline(pid))]
        return found if len(found) == 2 else None

    _wait_for(workers, "two worker processes")
    time.sleep(1.0)  # let them start working
    descendants = _descendants(parent.pid)
    parent.kill()
    parent.wait()
    _assert_all_end(descendants)


def test_the_genai_model_builder_dies_when_its_parent_is_killed(tmp_path, tiny_model_factory):
    from edgepack.targets.genai_builder import builder_python

    if builder_python() is None:
        pytest.skip("onnxruntime-genai's model builder is not installed (scripts/setup.sh installs it)")
    parent = _start("""
        import sys
        from pathlib import Path
        from edgepack.targets.genai_builder import run_builder
        run_builder(Path(sys.argv[1]), Path(sys.argv[2]))
    """, tiny_model_factory("llama"), tmp_path / "out")

    def builder():
        return next((pid for pid in _children(parent.pid) if "onnxruntime_genai.models.builder" in _cmdline(pid)), None)

    pid = _wait_for(builder, "the model builder to start")
    assert _alive(pid)  # still importing torch: the kill lands mid-build
    parent.kill()
    parent.wait()
    _assert_all_end([pid])


def _stop_mid_target(tmp: Path):
    """(note, pid) of a build worker stopped (SIGSTOP) while its note says it builds a target, or None."""
    for note in tmp.glob("edgepack-workers-*/*"):
        pid = int(note.name)
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            continue
        if note.exists():  # the worker removes its note when the target is done: it is mid-target
            return note, pid
        os.kill(pid, signal.SIGCONT)
    return None


def test_a_build_worker_killed_mid_target_is_an_internal_error_naming_the_target(tmp_path, tiny_model_factory, exported_tiny_factory):
    # A worker of `build --jobs 2` that dies (here SIGKILL, as the kernel's OOM killer sends it) is
    # edgepack's failure, not the user's input: exit 70, one line naming the target it was building.
    recipe, out, cache, tmp = tmp_path / "edgepack.toml", tmp_path / "bundle", tmp_path / "cache", tmp_path / "tmp"
    recipe.write_text(f'[model]\nsource = "{tiny_model_factory("llama")}"\n\n'
                      '[targets.ort]\nmax_context = 32\ngraph = "optimum"\n\n[targets.ort-mobile]\n')
    tmp.mkdir()
    # The export is the session's, put in the cache where the build finds it: the build starts at the targets.
    from edgepack.build import CONVERT, StageCache, convert_payload, stage_key

    key = stage_key(CONVERT, convert_payload({"source": str(tiny_model_factory("llama"))}))
    StageCache(cache / "build").run("convert", key, lambda o: shutil.copytree(exported_tiny_factory("llama"), o))
    env = {**os.environ, "EDGEPACK_CACHE": str(cache), "TMPDIR": str(tmp), "HF_HUB_OFFLINE": "1"}
    build = subprocess.Popen([sys.executable, "-m", "edgepack", "build", str(recipe), "-o", str(out), "--jobs", "2"],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Each worker notes the target it builds in the build's worker folder (a file named by its PID).
        note, pid = _wait_for(lambda: _stop_mid_target(tmp), "a worker to start a target", timeout=240)
        label = note.read_text()
        assert _stat(pid)[1] == str(build.pid) and label in ("ort/fp32", "ort-mobile/fp32")
        os.kill(pid, signal.SIGKILL)
        stdout, stderr = build.communicate(timeout=120)
    finally:
        if build.poll() is None:
            build.kill()
            build.wait()
    assert build.returncode == 70, stderr
    assert stderr.strip().splitlines()[-1] == (f"internal error: the worker building target {label} died (signal 9, SIGKILL); "
                                               "rerun with --jobs 1 to see why")
    assert "Traceback" not in stderr and not out.exists()
    assert not list(cache.glob("build/*/*.tmp-*")) and not list(tmp.glob("edgepack-workers-*"))
