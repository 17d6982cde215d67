"""The console every command prints through: tables on stdout, a spinner and errors on stderr.

Stages and targets report progress through an `on_status` callable; the commands pass a `Status` here.
"""

from __future__ import annotations

from edgepack.errors import GateFailedError


def stdout_console():
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:  # logs and pipes: do not squeeze tables into 80 columns
        console = Console(highlight=False, width=160)
    return console


def stderr_console():
    from rich.console import Console

    from edgepack._quiet import user_stderr

    return Console(file=user_stderr(), highlight=False)


class Status:
    """A rich spinner on stderr whose text follows the stage's progress messages."""

    def __init__(self, first: str):
        self.console = stderr_console()
        self.first = first
        self.status = None

    def __enter__(self):
        self.status = self.console.status(self.first)
        self.status.__enter__()
        return self

    def __call__(self, message: str) -> None:
        # On a terminal the spinner shows the stage; elsewhere (CI logs, pipes) stderr stays for errors.
        self.status.update(message)

    def __exit__(self, *exc):
        self.status.__exit__(*exc)
        return False


def report_target(artifact) -> None:
    """Shared ending of every target command: print files, key facts and checks; exit 1 if a check failed."""
    from rich.table import Table

    report = artifact.to_json()
    table = Table(title=f"edgepack target {artifact.target} -> {artifact.out}", show_header=False, title_justify="left")
    table.add_row("files", f"{report['total_bytes'] / 1e6:.1f} MB in {len(report['files'])} files")
    for key in ("graph_route", "graph_route_reason", "nodes", "nodes_on_htp", "nodes_total", "max_context", "weight_bytes_per_token",
                "kv_bytes_per_token", "kv_bytes_at_max_context"):
        if key in artifact.facts:
            table.add_row(key, str(artifact.facts[key]))
    for name, check in artifact.checks.items():
        verdict = {True: "PASS", False: "FAIL", None: "skipped"}[check.get("passed")]
        figures = ", ".join(f"{k}={v:.4g}" for k, v in check.items() if isinstance(v, float))
        table.add_row(f"check {name}", f"{verdict} {figures}".strip())
    table.add_row("seconds", f"{artifact.seconds.get('total', 0):.1f}")
    stdout_console().print(table)
    failure = artifact.failure_message(f"target {artifact.target}: check(s) failed")
    if failure:
        raise GateFailedError(failure)
