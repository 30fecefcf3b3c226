"""Value ranges for configuration fields, checked when a config loads (:mod:`.config`), and
the error a bad configuration raises.

A field annotated ``Annotated[int, Range(low=1)]`` (or one of the aliases below) refuses a
value outside its range with a message naming the key, the value and what is allowed::

    continual.train.epochs: 0 is out of range (allowed: >= 1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated


class ConfigError(ValueError):
    """A configuration file or value is invalid."""


@dataclass(frozen=True)
class Range:
    """``low <= value <= high`` (``<`` where open); floats must also be finite."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def allowed(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return " and ".join(parts) or "a finite number"

    def contains(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (
            self.high is not None and (value >= self.high if self.high_open else value > self.high)
        )


@dataclass(frozen=True)
class NonEmpty:
    """A list or string that must hold at least one element."""


Count = Annotated[int, Range(low=1)]  # a number of things, at least one
Size = Annotated[int, Range(low=0)]  # a number of things, possibly none
Seed = Annotated[int, Range(low=0)]
Positive = Annotated[float, Range(low=0, low_open=True)]  # > 0
NonNegative = Annotated[float, Range(low=0)]  # >= 0
Fraction = Annotated[float, Range(low=0, high=1)]  # [0, 1]
Probability = Annotated[float, Range(low=0, high=1, high_open=True)]  # [0, 1)
