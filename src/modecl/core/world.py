"""What a run trains and measures on (glossary: world): the digits world, or a transformers
host with its task files. The runner (:mod:`modecl.core.runner`) drives either."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from torch import nn

from modecl.core.processes import Processes
from modecl.core.sequences import DrawPair, Format
from modecl.core.tasks import Task


@dataclass(frozen=True)
class Answering:
    """How answers are decoded and scored: greedy length limit and batch size."""

    max_new_tokens: int = 4
    batch_size: int = 256


@dataclass
class Measured:
    """A world's own measures of one stage (JSON numbers), and its drawn-image grid.

    ``pictures`` is ``[rows, columns, H, W]`` gray values on 0..16 (digits) or
    ``[rows, columns, H, W, 3]`` RGB bytes, for the report's sample grids; None when the
    world draws no pixels.
    """

    measures: dict[str, Any] = field(default_factory=dict)
    pictures: np.ndarray | None = None


class World(Protocol):
    """What the runner needs: a host model, its token format, tasks, streams, measures."""

    format: Format
    answering: Answering

    @property
    def host(self) -> nn.Module:
        """The frozen host model that each method's adapters attach to."""

    def tasks(self) -> list[Task]:
        """The task sequence, in training order."""

    def distill_pairs(self) -> Sequence[DrawPair]:
        """The image-generation stream distilling methods train on (may be empty)."""

    def probe_pairs(self, size: int) -> Sequence[DrawPair]:
        """Held-out image-generation pairs for the gradient-conflict monitor (may be empty)."""

    def measure(self, model: nn.Module, seed: int, images: Path, processes: Processes) -> Measured:
        """The world's own measures of ``model`` (generation, captioning, ...). Every one of
        the run's ``processes`` calls it (each may take its share and gather); the main
        process's return value is the complete one. Drawn images may be written under
        ``images``."""

    def describe(self) -> dict[str, Any]:
        """Facts of the world for results.json (judge, host model)."""
