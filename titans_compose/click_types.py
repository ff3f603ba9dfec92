"""Click parameter types shared by the command line and the sweep file's ``train`` section."""

from __future__ import annotations

import math
from typing import Any

import click

#: the seeds ``torch.manual_seed`` accepts (its documented inclusive range)
SEED = click.IntRange(-(2**63), 2**64 - 1)


class FiniteFloat(click.FloatRange):
    """A :class:`click.FloatRange` that also refuses NaN and infinities, which compare false against every bound and
    so pass a plain range unnoticed, to fail later inside torch."""

    name = "finite float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number
