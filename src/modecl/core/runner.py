"""The one runner: seeds x methods x tasks, each stage written atomically, resumable."""

from __future__ import annotations

import json
import os
import resource
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modecl.core.adapters import load_adapters, save_adapters
from modecl.core.methods.base import Method
from modecl.core.tasks import Task


def peak_memory_mb() -> float:
    """Peak memory so far: the GPU's allocator peak, else this process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save_stage(
    folder: Path, stage: dict, model, method, arrays: dict[str, Any] | None = None
) -> None:
    """Write one finished stage as a whole: a crash leaves it either complete or absent.

    ``arrays`` maps file names to what they hold: ``.npy`` numpy arrays, ``.pt`` tensors.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    save_adapters(model, tmp / "adapters")
    torch.save(method.state_dict(), tmp / "method.pt")
    for name, value in (arrays or {}).items():
        np.save(tmp / name, value) if name.endswith(".npy") else torch.save(value, tmp / name)
    (tmp / "stage.json").write_text(json.dumps(stage))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def load_stage(folder: Path, model, method) -> None:
    """Put a finished stage's adapters and method state back, to resume after it."""
    load_adapters(model, folder / "adapters")
    method.load_state_dict(torch.load(folder / "method.pt", weights_only=False))


def resumable(
    folder: Path, tasks: list[Task], model: torch.nn.Module, method: Method
) -> Iterator[tuple[int, Task, Path, dict[str, Any] | None]]:
    """Each task's (k, task, stage dir, its saved entry, or None when it is to be run).

    Before the first stage to run, the last finished stage's adapters and method state are
    put back into ``model`` and ``method``.
    """
    last = None
    for k, task in enumerate(tasks):
        stage_dir = folder / f"stage{k + 1}"
        if (stage_dir / "stage.json").exists():
            last = stage_dir
            yield k, task, stage_dir, json.loads((stage_dir / "stage.json").read_text())
            continue
        if last is not None:
            load_stage(last, model, method)
            last = None
        yield k, task, stage_dir, None
