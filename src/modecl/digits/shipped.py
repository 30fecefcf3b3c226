"""The pre-trained digits hosts that ship with the package: every machine starts from the same.

A trained model depends on the CPU's floating-point path as well as on its seed (torch's
kernel path, ``ATEN_CPU_CAPABILITY``), so hosts pre-trained on two machines differ, and
so do the findings measured on them. The default hosts of host seeds 0, 1 and 2 are
therefore shipped, each a folder ``hosts/seed<N>/`` laid out as a cache entry
(``codebook.npy``, ``vocab.json``, ``log.json``, ``model/``) plus ``manifest.json``: how it
was made (command, package versions, CPU and kernel path), its gate scores, the cache key
of its config and the SHA-256 of every file. :func:`load_or_pretrain
<modecl.digits.pretrain.load_or_pretrain>` takes the shipped host whose cache key matches
the config, after checking every file against the manifest; any other config pre-trains
and caches as before. ``benchmarks/ship_hosts.py`` makes them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import shutil
from pathlib import Path
from typing import Any

import torch

from modecl.core.files import atomic_dir, read_text, remove_leftovers

SHIPPED = Path(__file__).parent / "hosts"
MANIFEST = "manifest.json"
PACKAGES = ("torch", "numpy", "scikit-learn", "transformers", "safetensors")


class ShippedHostError(RuntimeError):
    """A shipped host's files do not match its manifest (a damaged install)."""


def sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def manifests(root: Path | None = None) -> dict[Path, dict[str, Any]]:
    """Every shipped host's folder and manifest (under ``root``, default :data:`SHIPPED`)."""
    found = {}
    for file in sorted(Path(root or SHIPPED).glob(f"*/{MANIFEST}")):
        found[file.parent] = json.loads(read_text(file, ShippedHostError))
    return found


def find(key: str, root: Path | None = None) -> Path | None:
    """The shipped host folder whose config has cache key ``key``, or None."""
    return next((f for f, m in manifests(root).items() if m["cache_key"] == key), None)


def verify(folder: Path) -> dict[str, Any]:
    """Check every file of a shipped host against its manifest; returns the manifest."""
    manifest = json.loads(read_text(folder / MANIFEST, ShippedHostError))
    for name, digest in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            raise ShippedHostError(f"shipped host {folder}: {name} is missing; reinstall modecl")
        if sha256(file) != digest:
            raise ShippedHostError(
                f"shipped host {folder}: {name} does not match its SHA-256 in {MANIFEST} "
                "(a damaged install); reinstall modecl"
            )
    return manifest


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else the platform's processor."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ship(
    entry: Path, folder: Path, *, key: str, seed: int, gate: dict[str, float], command: str
) -> dict[str, Any]:
    """Copy a pre-trained host's cache ``entry`` to ``folder`` with its manifest, atomically.

    Args:
        entry: the cache folder of a pre-trained host (``load_or_pretrain`` wrote it).
        folder: where the shipped host goes (``hosts/seed<N>``); replaced whole.
        key: the cache key of its config.
        seed: its host seed.
        gate: its gate scores on the test pool (``captioning``, ``generation``).
        command: the command that made it, for the manifest.
    """
    log = json.loads((entry / "log.json").read_text())
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(folder.parent)  # of a ship that was killed while writing
    with atomic_dir(folder) as tmp:
        shutil.copytree(entry, tmp, dirs_exist_ok=True)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        versions = {name: importlib.metadata.version(name) for name in PACKAGES}
        manifest = {
            "cache_key": key,
            "seed": seed,
            "command": command,
            "packages": versions,
            "cpu": cpu_model(),
            "kernel_path": log.get("kernel_path"),
            "pretrain_seconds": round(log["seconds"], 1),
            "selected_epoch": log["selected_epoch"],
            "gate_scores": gate,
            "files": {p.relative_to(tmp).as_posix(): sha256(p) for p in files},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def weights_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between two state dicts of the same shapes."""
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
