"""Option types shared by the commands."""

from __future__ import annotations

import math

import click


class FiniteFloatRange(click.FloatRange):
    """A click.FloatRange that also refuses nan and inf.

    click's range check compares with < and >, which nan passes whatever the bounds: `--max-kl nan`
    would otherwise reach a gate that every value fails (or none), and `--temperature nan` the sampler.
    """

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number
