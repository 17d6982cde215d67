"""Write docs/cli.md: the `--help` of every edgepack command and subcommand, generated from click.

    python scripts/gen_cli_docs.py            # rewrite docs/cli.md
    python scripts/gen_cli_docs.py --check    # exit 1 if docs/cli.md is stale

Walks the click tree from the top-level group, loading lazily registered groups (`target`, `devices`,
`profile`, `check`) the way the command line does when one of them is invoked, so every option of every
target appears exactly as `edgepack ... --help` prints it. tests/test_docs.py fails when the file differs
from what this script writes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
CLI_MD = ROOT / "docs" / "cli.md"
# A fixed width: the file must not depend on the terminal it was generated in.
WIDTH = 100
REGENERATE = "python scripts/gen_cli_docs.py"

HEADER = f"""# Command reference

Generated from the command line's own `--help` by `{REGENERATE}`; do not edit by hand
(tests/test_docs.py fails when this file is stale). The README explains the concepts; this page lists
every command and option.
"""


def _walk(command: click.Command, ctx: click.Context):
    """Yield (context, command) for `command` and, depth first in listed order, every subcommand."""
    yield ctx, command
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is None or sub.hidden:
                continue
            sub_ctx = click.Context(sub, info_name=name, parent=ctx, terminal_width=WIDTH, max_content_width=WIDTH)
            yield from _walk(sub, sub_ctx)


def render() -> str:
    """The full text of docs/cli.md as the installed command line describes itself now."""
    from edgepack.cli import cli

    # The root's context settings (-h as well as --help), as `edgepack` itself runs: click caches each command's
    # help option with the names of the first context that asks for it, so other names would leak into later runs.
    settings = {k: v for k, v in cli.context_settings.items() if k == "help_option_names"}
    root = click.Context(cli, info_name="edgepack", terminal_width=WIDTH, max_content_width=WIDTH, **settings)
    parts = [HEADER]
    index, sections = [], []
    for ctx, command in _walk(cli, root):
        path = ctx.command_path
        anchor = path.replace(" ", "-").replace("_", "-")
        depth = path.count(" ")
        if depth:
            index.append(f"{'  ' * (depth - 1)}- [`{path}`](#{anchor})")
        help_text = command.get_help(ctx).rstrip()
        sections.append(f"## {path}\n\n```text\n{help_text}\n```\n")
    parts.append("\n".join(index) + "\n")
    parts.extend(sections)
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 when docs/cli.md is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = CLI_MD.read_text(encoding="utf-8") if CLI_MD.is_file() else ""
        if current != text:
            print(f"docs/cli.md is stale: run `{REGENERATE}`", file=sys.stderr)
            return 1
        return 0
    CLI_MD.write_text(text, encoding="utf-8")
    print(f"wrote {CLI_MD.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # document this checkout's edgepack, not another installed copy
    sys.exit(main())
