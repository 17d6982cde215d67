"""`ssh://[user@]host[:port]`: Linux boards and Macs through the system's OpenSSH client.

The user's keys, known_hosts and ~/.ssh/config apply as they are (`EDGEPACK_SSH_CONFIG` names another
config file, as `ssh -F`); edgepack stores no password and never answers a prompt (BatchMode). Every
call has a timeout, and ServerAlive probes end a call whose connection died, so a lost device is an
error within seconds, not a hang.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
import threading
from pathlib import Path
from urllib.parse import urlsplit

from edgepack.errors import UsageError
from edgepack.runners.base import DeviceError, Runner, tar_stream

SSH_OPTIONS = ("-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=3", "-o", "ServerAliveCountMax=2")
SSH_LOST = 255  # ssh's own exit status for a connection or authentication failure


def parse_ssh_url(url: str) -> tuple[str | None, str, int | None]:
    """(user, host, port) of ssh://[user@]host[:port]; UsageError otherwise."""
    parts = urlsplit(url)
    if parts.scheme != "ssh" or not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise UsageError(f"{url!r} is not an ssh device: write ssh://[user@]host[:port]")
    try:
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"{url!r}: the port must be a number") from exc
    if parts.password:
        raise UsageError(f"{url!r}: passwords are not taken; use an SSH key (ssh-copy-id)")
    return parts.username, parts.hostname, port


class SshRunner(Runner):
    def __init__(self, url: str, timeout: float = 600.0):
        self.url = url
        self.timeout = timeout
        self.user, self.host, self.port = parse_ssh_url(url)
        self._home: str | None = None

    def ssh_command(self) -> list[str]:
        command = ["ssh", *SSH_OPTIONS]
        config = os.environ.get("EDGEPACK_SSH_CONFIG")
        if config:
            command += ["-F", config]
        if self.port:
            command += ["-p", str(self.port)]
        return command + [f"{self.user}@{self.host}" if self.user else self.host]

    def run(self, argv: list[str], *, stdin: bytes | None = None, timeout: float | None = None, check: bool = True) -> bytes:
        command = self.ssh_command() + ["--", shlex.join(argv)]
        try:
            done = subprocess.run(command, input=stdin if stdin is not None else b"", capture_output=True, timeout=timeout or self.timeout)
        except FileNotFoundError as exc:
            raise DeviceError(f"device {self.url}: no `ssh` client on this host (install OpenSSH)") from exc
        except subprocess.TimeoutExpired as exc:
            raise DeviceError(f"device {self.url}: no answer within {timeout or self.timeout:g} s ({argv[0]})") from exc
        return self._checked(done, argv, check)

    def _checked(self, done, argv, check: bool) -> bytes:
        if done.returncode == SSH_LOST:
            reason = (done.stderr.decode(errors="replace").strip().splitlines() or ["connection lost"])[-1]
            raise DeviceError(f"device {self.url}: connection failed or lost ({reason[:200]})")
        if check and done.returncode != 0:
            reason = (done.stderr.decode(errors="replace").strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            raise DeviceError(f"device {self.url}: `{argv[0]}` failed there ({reason[:200]})")
        return done.stdout

    def home(self) -> str:
        if self._home is None:
            self._home = self.run(["sh", "-c", 'printf %s "$HOME"'], timeout=min(self.timeout, 60)).decode().strip()
            if not self._home.startswith("/"):
                raise DeviceError(f"device {self.url}: no home folder to keep bundles in")
        return self._home

    def upload_tree(self, folder: Path, remote: str) -> None:
        """Stream `folder` as tar into `remote`.tmp-*, then commit it with `.complete` and a rename."""
        tmp = f"{remote}.tmp-{os.getpid()}"
        script = (f"rm -rf {shlex.quote(tmp)} && mkdir -p {shlex.quote(tmp)} && tar -xf - -C {shlex.quote(tmp)} && "
                  f"touch {shlex.quote(tmp)}/.complete && rm -rf {shlex.quote(remote)} && mv {shlex.quote(tmp)} {shlex.quote(remote)}")
        command = self.ssh_command() + ["--", shlex.join(["sh", "-c", script])]
        with tempfile.TemporaryFile() as errors:
            try:
                process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors)
            except FileNotFoundError as exc:
                raise DeviceError(f"device {self.url}: no `ssh` client on this host (install OpenSSH)") from exc
            # the tar stream is written from a thread so that the timeout holds while the device is not reading
            writer = threading.Thread(target=self._write_tar, args=(folder, process), daemon=True)
            writer.start()
            try:
                process.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired as exc:
                process.kill()
                process.wait()
                raise DeviceError(f"device {self.url}: copying {folder.name} did not finish within {self.timeout:g} s") from exc
            writer.join(timeout=10)
            errors.seek(0)
            self._checked(subprocess.CompletedProcess(command, process.returncode, b"", errors.read()), ["tar"], True)

    @staticmethod
    def _write_tar(folder: Path, process) -> None:
        try:
            tar_stream(folder, process.stdin)
            process.stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            pass  # the connection died: ssh's exit status says so
