"""A real OpenSSH server on localhost for the runner tests: a free port, a throwaway host key and client key,
and a second user (`edgepack-device`) as the device's account. Needs root (useradd) and Debian's openssh-server."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = Path("/usr/sbin/sshd")
DEVICE_USER = "edgepack-device"


def unavailable() -> str | None:
    """Why the server cannot run here, or None."""
    if not SSHD.is_file():
        return "no /usr/sbin/sshd (Debian's openssh-server; scripts/setup.sh installs it)"
    if os.geteuid() != 0:
        return "the tests add a second user for the device account: needs root"
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        return "no OpenSSH client"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class SshServer:
    folder: Path
    port: int
    config: Path  # the client's ssh config (EDGEPACK_SSH_CONFIG)
    alias: str
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"ssh://{self.alias}"

    def start(self) -> None:
        log = open(self.folder / "sshd.log", "ab")
        self.process = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(self.folder / "sshd_config")], stdout=log, stderr=log,
                                        start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"sshd did not listen on {self.port}: {(self.folder / 'sshd.log').read_text()[-500:]}")

    def kill(self) -> None:
        """The whole server: the listener and every connection's sshd (its session group)."""
        if self.process is not None and self.process.poll() is None:
            subprocess.run(["pkill", "-KILL", "-f", str(self.folder / "sshd_config")], check=False)
            self.process.wait(timeout=10)
        self.process = None


def ensure_device_user() -> Path:
    try:
        return Path(pwd.getpwnam(DEVICE_USER).pw_dir)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", DEVICE_USER], check=True)
        # no password, but not locked: sshd (without PAM) refuses a locked account even with a key
        subprocess.run(["usermod", "-p", "*", DEVICE_USER], check=True)
        return Path(pwd.getpwnam(DEVICE_USER).pw_dir)


def make_server(folder: Path) -> SshServer:
    folder.mkdir(parents=True, exist_ok=True)
    home = ensure_device_user()
    user = pwd.getpwnam(DEVICE_USER)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "host_key")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "client_key")], check=True)
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    keys = ssh_dir / "authorized_keys"
    existing = keys.read_text() if keys.is_file() else ""
    keys.write_text(existing + (folder / "client_key.pub").read_text())
    for path in (ssh_dir, keys):
        os.chown(path, user.pw_uid, user.pw_gid)
    keys.chmod(0o600)
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation folder
    port = free_port()
    (folder / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\nPidFile {folder / 'sshd.pid'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin no\n"
        f"AllowUsers {DEVICE_USER}\nAuthorizedKeysFile .ssh/authorized_keys\nClientAliveInterval 5\n")
    alias = "edgepack-test-device"
    config = folder / "ssh_config"
    config.write_text(
        f"Host {alias}\n  HostName 127.0.0.1\n  Port {port}\n  User {DEVICE_USER}\n  IdentityFile {folder / 'client_key'}\n"
        f"  IdentitiesOnly yes\n  UserKnownHostsFile {folder / 'known_hosts'}\n  StrictHostKeyChecking accept-new\n  LogLevel ERROR\n")
    return SshServer(folder, port, config, alias)
