"""Experiment tracking through accelerate's trackers: TensorBoard, W&B, or any other.

``tracking.log_with = ["tensorboard"]`` in a run's config logs, under the out dir's
``tracking/`` folder: per training step the task loss, each loss term, the learning rate
and the gradient norm; per stage the accuracy-matrix row, the world's numeric measures and
the drawn-image grid. Tags are ``<method>/seed<S>/...``; steps count optimizer steps
through the whole sequence. The run's id is kept in ``tracking/run_id``, so a resumed run
logs into the same run (W&B: ``resume="allow"``; offline with ``WANDB_MODE=offline``).
"""

from __future__ import annotations

import importlib.util
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from accelerate.tracking import LOGGER_TYPE_TO_CLASS

from modecl.core.config import ConfigError
from modecl.core.files import write_atomic

PROJECT = "modecl"
_PACKAGES = {"tensorboard": "tensorboard", "comet_ml": "comet_ml", "clearml": "clearml"}


def check_trackers(names: list[str]) -> None:
    """Refuse an unknown tracker, or one whose package is not installed (before any work)."""
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            valid = ", ".join(sorted(LOGGER_TYPE_TO_CLASS))
            raise ConfigError(f"tracking.log_with: unknown tracker {name!r}; valid: {valid}")
        package = _PACKAGES.get(name, name)
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"tracking.log_with: {name!r} needs `pip install {package}`")


class Tracking:
    """The trackers of one run (main process only); a no-op without any."""

    def __init__(self, out: Path, names: list[str], config: dict[str, Any]) -> None:
        folder = Path(out) / "tracking"
        id_file = folder / "run_id"
        new = not id_file.exists()
        run_id = uuid.uuid4().hex[:12] if new else id_file.read_text().strip()
        if new and names:
            write_atomic(id_file, run_id + "\n")
        self.trackers = []
        for name in names:
            cls = LOGGER_TYPE_TO_CLASS[name]
            if cls.requires_logging_directory:
                tracker = cls(PROJECT, logging_dir=folder / run_id)
            elif name == "wandb":
                tracker = cls(PROJECT, id=run_id, resume="allow", dir=str(folder))
            else:
                tracker = cls(PROJECT)
            tracker.start()
            if new:
                tracker.store_init_configuration(_flat(config))
            self.trackers.append(tracker)

    def log(self, values: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def image(self, tag: str, pixels: np.ndarray, step: int) -> None:
        """A drawn-image grid (``[rows, columns, H, W]`` gray 0..16 or ``(..., 3)`` RGB bytes)."""
        strip = np.concatenate(list(pixels.reshape(-1, *pixels.shape[2:])), axis=1)
        if pixels.ndim == 4:  # gray ink 0..16 (dark on white) as RGB bytes
            strip = np.repeat((255 - strip * (255 / 16))[..., None], 3, axis=-1)
        image = strip.astype(np.uint8)
        for tracker in self.trackers:
            if hasattr(tracker, "log_images"):
                tracker.log_images({tag: image[None]}, step=step, dataformats="NHWC")

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as one level of scalar values (``continual/train/lr``)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= _flat(value, f"{name}/")
        else:
            out[name] = value if isinstance(value, bool | int | float | str) else str(value)
    return out
