"""Reading the files a user gives, and writing outputs, so that nothing is ever half done.

Reading: :func:`read_text` is the one checked path for text inputs (task, pairs, config and
results files): a missing file, a directory, an unreadable or oversized file, or bytes that
are not UTF-8 give one error naming the file. :func:`read_image` reads an image of any mode
and bit depth as 8-bit RGB (16-bit scaled, alpha composited on a given background).

Writing: :func:`write_atomic` and :func:`temporary_dir` write beside the target under a
name holding :data:`TEMP_MARK` and rename when complete; :func:`remove_leftovers` deletes
what a killed process left. Outputs honour the umask (files 0644, folders 0755 under 022).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

TEMP_MARK = ".tmp-"  # in the name of every temporary entry this package writes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_text(path: Path, error: type[Exception], limit: int = 64 * 2**20) -> str:
    """The text of a user's file, or one ``error`` naming it and what is wrong."""
    path = Path(path)
    if not path.exists():
        raise error(f"{path}: file not found")
    if path.is_dir():
        raise error(f"{path}: is a directory, expected a file")
    try:
        size = path.stat().st_size
        if size > limit:
            raise error(f"{path}: {size} bytes, over the limit of {limit} bytes for this file")
        data = path.read_bytes()
    except OSError as err:
        raise error(f"{path}: cannot read: {err.strerror or err}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise error(
            f"{path}:{line}: not UTF-8 text (byte {data[err.start]:#04x} at offset {err.start})"
        ) from None


def read_image(path: Path, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """An image file as 8-bit RGB. 16-bit and 32-bit integer images are scaled to 8 bits
    (not clipped); transparency is composited on ``background`` (white by default)."""
    try:
        with Image.open(path) as opened:
            opened.load()
            image = opened
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        image = Image.fromarray(np.rint(np.clip(values, 0, top) * (255 / top)).astype(np.uint8))
    elif image.mode == "F":
        raise ValueError(f"cannot read image {path}: floating-point images are not supported")
    if image.mode == "P" or "A" in image.mode or "transparency" in image.info:
        image = image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, (*background, 255))
        image = Image.alpha_composite(canvas, image)
    return image.convert("RGB")


def finite(tree: Any) -> Any:
    """``tree`` (JSON values) with every NaN or infinity replaced by None: strict JSON."""
    if isinstance(tree, dict):
        return {k: finite(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [finite(v) for v in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    return tree


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TEMP_MARK}")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def honour_umask(path: Path) -> None:
    """Give a file written by a library that ignores the umask the usual permissions."""
    os.chmod(path, 0o666 & ~_umask())


def temporary_dir(target: Path) -> Path:
    """An empty folder beside ``target``, to be renamed to it once complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}{TEMP_MARK}"))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def replace_dir(tmp: Path, target: Path) -> None:
    """Put the complete folder ``tmp`` in ``target``'s place."""
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def remove_leftovers(folder: Path) -> list[Path]:
    """Delete the temporary entries a killed write left under ``folder``; returns them."""
    found = sorted(p for p in Path(folder).rglob(f"*{TEMP_MARK}*") if p.name.startswith("."))
    for entry in found:
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink(missing_ok=True)
    return found
