"""Runners: measure a bundle on the device it is for, over SSH (Linux boards, Macs) or adb (Android).

`open_runner(url)` takes `ssh://[user@]host[:port]` or `adb:SERIAL`; `edgepack.profiles.on_device`
drives it for `profile --on`, `devices calibrate --on`, `devices prepare` and the build.
"""

from __future__ import annotations

from edgepack.errors import UsageError

SCHEMES = ("ssh://", "adb:")


def open_runner(url: str, timeout: float = 600.0):
    if url.startswith("ssh://"):
        from edgepack.runners.ssh import SshRunner

        return SshRunner(url, timeout)
    if url.startswith("adb:"):
        from edgepack.runners.adb import AdbRunner

        return AdbRunner(url, timeout)
    raise UsageError(f"{url!r} is not a device address: write ssh://[user@]host[:port] or adb:SERIAL")


def parse_on(value: str) -> tuple[str, str]:
    """`NAME=URL` or `URL` -> (name, url); the name defaults to the URL's host (or the adb serial)."""
    name, sep, url = value.partition("=")
    if not sep or name.startswith(SCHEMES):
        url, name = value, ""
    if not url.startswith(SCHEMES):
        raise UsageError(f"--on {value!r}: write ssh://[user@]host[:port] or adb:SERIAL, optionally as NAME=URL")
    if not name:
        if url.startswith("ssh://"):
            from edgepack.runners.ssh import parse_ssh_url

            name = parse_ssh_url(url)[1]
        else:
            name = url[len("adb:"):] or "android"
    return name, url
