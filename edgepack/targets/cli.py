"""`edgepack target NAME DIR -o OUT`: one subcommand per registered target, imported on use."""

from __future__ import annotations

import importlib
import importlib.util

import click

from edgepack.targets import registered_targets


class TargetGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(name for name, module in registered_targets().items() if importlib.util.find_spec(module) is not None)

    def get_command(self, ctx, name):
        module = registered_targets().get(name)
        if module is None or importlib.util.find_spec(module) is None:
            return None
        return importlib.import_module(module).command


@click.group(cls=TargetGroup)
def target():
    """Emit a deployable target from an export (or a quantized export).

    \b
    Example:
      edgepack target ort build/smollm2-int4 -o build/smollm2-ort
    """
