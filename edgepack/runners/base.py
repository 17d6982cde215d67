"""What every runner does the same way: the probe archive, content-addressed copies, one request, one result.

A runner copies a bundle to the device once per content (its files' hashes name the folder there, and a
`.complete` marker written last commits it), copies the measuring program the same way, uploads a
request, runs the program and reads back one JSON result. Every remote step has a timeout; a lost
connection, a timeout or a device without the runtime is a DeviceError (exit 4) naming the device.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import uuid
import zipfile
from pathlib import Path

from edgepack.errors import NotOnThisHostError

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the edgepack package folder
REMOTE_ROOT = ".cache/edgepack-device"  # under the device user's home
PROBE_MAIN = "import sys\nfrom edgepack.runners.probe import main\nsys.exit(main())\n"
# what the measuring program needs on a device, pinned to this host's versions (the bundle was built with them)
DEVICE_PACKAGES = ("numpy", "onnxruntime", "onnx", "onnx-ir", "click")  # onnx-ir, click: what calibrate's quantizers import


class DeviceError(NotOnThisHostError):
    """The device could not be reached, timed out, or lacks what the measurement needs (exit 4)."""


def tree_key(folder: Path) -> str:
    """A name for a folder's content: the hash of its files' relative paths and bytes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def probe_archive(cache: Path) -> Path:
    """The measuring program: the edgepack package as a zip application (pure Python, imports from the zip)."""
    files = sorted(p for p in PACKAGE_ROOT.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")
    digest = hashlib.sha256(PROBE_MAIN.encode())
    for path in files:
        digest.update(str(path.relative_to(PACKAGE_ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    out = cache / f"edgepack-probe-{digest.hexdigest()[:16]}.pyz"
    if out.is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp-{os.getpid()}")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("__main__.py", PROBE_MAIN)
        for path in files:
            archive.write(path, "edgepack/" + str(path.relative_to(PACKAGE_ROOT)))
    tmp.replace(out)
    return out


def tar_stream(folder: Path, handle) -> None:
    """Write `folder`'s files as a tar stream (relative names) to `handle`."""
    with tarfile.open(fileobj=handle, mode="w|") as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.add(path, arcname=str(path.relative_to(folder)), recursive=False)


def package_pins() -> dict[str, str]:
    from importlib import metadata

    return {name: metadata.version(name) for name in DEVICE_PACKAGES}


def pins_key(pins: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(pins, sort_keys=True).encode()).hexdigest()[:12]


class Runner:
    """A device reached by some transport. Subclasses provide `run` (a command there), `upload_tree`, `name`."""

    url: str
    timeout: float

    def run(self, argv: list[str], *, stdin: bytes | None = None, timeout: float | None = None, check: bool = True) -> bytes:
        """Run `argv` on the device; its stdout. A non-zero exit is a DeviceError unless `check` is False."""
        raise NotImplementedError

    def upload_tree(self, folder: Path, remote: str) -> None:
        raise NotImplementedError

    def home(self) -> str:
        raise NotImplementedError

    # ---- built on run/upload_tree ----
    def root(self) -> str:
        return f"{self.home()}/{REMOTE_ROOT}"

    def exists(self, remote: str) -> bool:
        return self.run(["sh", "-c", f"test -e {_quote(remote)} && echo yes || echo no"]).strip() == b"yes"

    def ensure_tree(self, folder: Path, kind: str) -> tuple[str, bool]:
        """(remote folder holding `folder`'s content, whether it was copied now): copied once per content."""
        remote = f"{self.root()}/{kind}/{tree_key(folder)}"
        if self.exists(f"{remote}/.complete"):
            return remote, False
        self.upload_tree(folder, remote)
        return remote, True

    def ensure_probe(self, cache: Path) -> str:
        archive = probe_archive(cache)
        remote = f"{self.root()}/probe/{archive.name}"
        if not self.exists(remote):
            self.run(["sh", "-c", f"mkdir -p {_quote(self.root() + '/probe')} && cat > {_quote(remote + '.tmp')} && mv {_quote(remote + '.tmp')} {_quote(remote)}"],
                     stdin=archive.read_bytes())
        return remote

    def python(self) -> str:
        """The device's Python for the probe: the private venv `edgepack devices prepare` made, else python3."""
        venv = f"{self.root()}/venv-{pins_key(package_pins())}/bin/python"
        return venv if self.exists(venv) else "python3"

    def call_probe(self, cache: Path, command: str, request: dict, *, timeout: float | None = None) -> tuple[dict, str]:
        """Run the probe's `command` on `request`; (its result, the remote run folder)."""
        from edgepack.runners.probe import RESULT_MARK

        probe = self.ensure_probe(cache)
        folder = f"{self.root()}/runs/{uuid.uuid4().hex[:12]}"
        self.run(["sh", "-c", f"mkdir -p {_quote(folder)} && cat > {_quote(folder + '/request.json')}"], stdin=json.dumps(request).encode())
        output = self.run([self.python(), probe, command, f"{folder}/request.json"], timeout=timeout, check=False)
        lines = [line for line in output.decode(errors="replace").splitlines() if line.startswith(RESULT_MARK)]
        if not lines:
            tail = output.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise DeviceError(f"device {self.url}: the measuring program gave no result ({tail[0][:200]}); "
                              f"is Python 3.10+ installed there? `edgepack devices prepare {self.url}`")
        result = json.loads(lines[-1][len(RESULT_MARK):])
        if "error" in result:
            raise DeviceError(f"device {self.url}: {result['error']}")
        return result, folder

    def fetch(self, remote: str) -> bytes:
        return self.run(["cat", remote])

    def remove(self, remote: str) -> None:
        self.run(["rm", "-rf", remote])


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def tar_bytes(folder: Path) -> bytes:
    buffer = io.BytesIO()
    tar_stream(folder, buffer)
    return buffer.getvalue()
