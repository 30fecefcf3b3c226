"""Reading the files a user gives, and writing outputs, so that nothing is ever half done.

Reading: :func:`read_text` is the one checked path for text inputs (task, pairs, config and
results files): a missing file, a directory, an unreadable or oversized file, or bytes that
are not UTF-8 give one error naming the file. :func:`read_image` reads an image of any mode
and bit depth as 8-bit RGB (16-bit scaled, alpha composited on a given background).

Writing: every file goes through :func:`atomic_path` (:func:`write_atomic` for text), every
folder through :func:`atomic_dir`: written beside the target under a name holding
:data:`TEMP_MARK` and renamed when complete, so a kill or a full disk leaves the previous
complete file or folder, or none. :func:`replace_dir` keeps the previous folder
aside (:data:`ASIDE_MARK`) until the new one is in place; :func:`remove_leftovers` deletes
what a killed process left and puts back a folder a kill left aside. A write that fails
raises OSError naming its target. :func:`check_writable` refuses a folder that cannot be
written before any work. Outputs honour the umask (files 0644, folders 0755 under 022).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

TEMP_MARK = ".tmp-"  # in the name of every temporary entry this package writes
ASIDE_MARK = ".previous"  # ends the name of a folder kept aside while its successor moves in


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


def _naming(err: OSError, target: Path) -> OSError:
    """``err`` as the failure to write ``target`` (not its temporary name)."""
    return OSError(err.errno, err.strerror or str(err), str(target))


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """A temporary path beside ``target`` for the block to write; renamed to ``target`` when
    the block ends, deleted if it raises. A failure to write (a full disk, a read-only
    folder) raises OSError naming ``target``, whose previous version stays."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}{TEMP_MARK}")
    except OSError as err:
        raise _naming(err, target) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except OSError as err:
        raise _naming(err, target) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` via :func:`atomic_path`, so a reader never sees half a file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def temporary_dir(target: Path) -> Path:
    """An empty folder beside ``target``, to be renamed to it once complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}{TEMP_MARK}"))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def _aside(target: Path) -> Path:
    return target.with_name(f".{target.name}{ASIDE_MARK}")


def replace_dir(tmp: Path, target: Path) -> None:
    """Put the complete folder ``tmp`` in ``target``'s place. The previous ``target`` is
    renamed aside, the new one renamed in, then the previous one deleted: a kill at any
    point leaves the newer or the older complete folder, or it aside, which
    :func:`remove_leftovers` puts back."""
    aside, previous = _aside(target), target.exists()
    if previous:
        if aside.exists():  # of an earlier swap, whose target is complete
            shutil.rmtree(aside)
        os.replace(target, aside)
    os.replace(tmp, target)
    if previous:
        shutil.rmtree(aside)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """An empty folder beside ``target`` for the block to fill; put in ``target``'s place
    (:func:`replace_dir`) when the block ends, deleted if it raises. A failure to write
    raises OSError naming ``target``, whose previous version stays."""
    try:
        tmp = temporary_dir(target)
    except OSError as err:
        raise _naming(err, target) from None
    try:
        yield tmp
        replace_dir(tmp, target)
    except OSError as err:
        raise _naming(err, target) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_leftovers(folder: Path) -> list[Path]:
    """Delete the temporary entries a killed write left under ``folder`` and put back a
    folder a killed :func:`replace_dir` left aside (deleted where its successor is in
    place); returns the temporary entries and the asides."""
    folder = Path(folder)
    asides = sorted(p for p in folder.rglob(f"*{ASIDE_MARK}") if p.name.startswith("."))
    for aside in asides:
        target = aside.with_name(aside.name[1 : -len(ASIDE_MARK)])
        if target.exists():
            shutil.rmtree(aside)
        else:
            os.replace(aside, target)
    found = sorted(p for p in folder.rglob(f"*{TEMP_MARK}*") if p.name.startswith("."))
    for entry in found:
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink(missing_ok=True)
    return [*found, *asides]


def check_writable(folder: Path, error: type[Exception], label: str = "--out") -> None:
    """Raise one ``error`` naming ``folder`` unless it, or the nearest folder above it that
    exists (where it does not yet), can be written into; creates nothing."""
    folder = Path(os.path.abspath(folder))
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise error(f"{label} {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
        why = "a read-only file system" if read_only else "no permission to write there"
        raise error(f"{label} {folder}: cannot write into {existing}: {why}")
