"""A binary, memory-mapped store of image tokens: image path -> its codes, written once.

A store is a folder (``image_tokens/`` in a run's out dir) of segment files ``*.tokens``,
each written once and never changed::

    bytes 0-7    b"MDCLTOK1"
    bytes 8-15   byte offset of the header (little-endian uint64), written last
    64 ...       the codes of every image, one after another: uint16 when every id of the
                 segment fits, else uint32
    then         the paths (UTF-8, fixed width, sorted), each path's start and length in the
                 codes (int64, uint32), each 64-byte aligned
    header       JSON: dtype, counts, path width, section offsets, `source`

Every process maps the segments (``mmap``): opening reads the headers only; a lookup
binary-searches the paths and returns a view of one image's codes in the shared page cache
(as stored: uint16 or uint32, never copied into Python ints). :meth:`TokenStore.rows`
locates many paths at once, as :class:`Rows`: a sequence of such views.

Writing (:meth:`TokenStore.write`) adds new segments, one per ``segment_images`` images, so
appending images later (another task file) never rewrites a segment, and a kill loses at
most the segment being written. A segment is written under a temporary name holding
:data:`~modecl.core.files.TEMP_MARK`, renamed when complete (a reader sees whole segments or
none), with the umask's permissions; :meth:`TokenStore.take_segments` moves in the segments
of another store (a run's tokens, staged until its inputs passed every check). Writers hold
a shared lock on the folder's ``.lock``; an open that gets it exclusively (no writer at
work) deletes what a killed writer left.

``source`` (a digest of the tokenizer's settings, in every segment) guards against mixing
codes of different tokenizers: a store opened with a source refuses segments of another.

``image_tokens.json`` beside the folder, the JSON cache of earlier versions, is converted
on first open into the segment ``json.tokens`` (source unknown, accepted by any) and deleted.
"""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import shutil
import uuid
from collections.abc import Container, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from itertools import chain, islice
from pathlib import Path
from typing import BinaryIO

import numpy as np

from modecl.core.config import ConfigError
from modecl.core.files import atomic_path, remove_leftovers
from modecl.core.tasks import Packed

__all__ = ["SEGMENT_IMAGES", "TOKEN_STORE", "Rows", "TokenStore"]

TOKEN_STORE = "image_tokens"  # the store's folder in a run's out dir
MAGIC = b"MDCLTOK1"
DATA = 64  # byte offset of the codes in a segment
ALIGN = 64
SUFFIX = ".tokens"
LOCK = ".lock"
SEGMENT_IMAGES = 50_000
CHUNK = 2**20  # codes per step when a segment's codes are widened to uint32


class Segment:
    """One segment file, memory-mapped (module doc)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with path.open("rb") as f:
                head = f.read(16)
                if head[:8] != MAGIC or len(head) < 16:
                    raise ValueError("no segment header")
                f.seek(int.from_bytes(head[8:], "little"))
                header = json.loads(f.read())
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            buffer = np.frombuffer(self.map, dtype=np.uint8)
            n, width = header["images"], header["width"]

            def section(name: str, dtype: str, count: int) -> np.ndarray:
                start = header[name]
                return buffer[start : start + count * np.dtype(dtype).itemsize].view(dtype)

            self.keys = section("keys", f"S{width}", n)
            self.starts = section("starts", "<i8", n)
            self.lengths = section("lengths", "<u4", n)
            self.data = section("data", header["dtype"], header["tokens"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{path}: not a readable token store segment ({err})") from None
        self.source: str | None = header["source"]
        self.width = width

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, key: bytes) -> int:
        """The index of path `key`, or -1."""
        if len(key) > self.width:
            return -1
        i = int(np.searchsorted(self.keys, key))
        return i if i < len(self.keys) and self.keys[i] == key else -1

    def find_all(self, keys: np.ndarray) -> np.ndarray:
        """The index of each path of `keys` (a bytes array), -1 where absent."""
        if not len(self.keys) or not len(keys):
            return np.full(len(keys), -1)
        at = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return np.where(self.keys[at] == keys, at, -1)

    def release(self) -> None:
        """Unmap the pages read so far from this process (they stay in the page cache):
        after a scan of every image, the process holds no more than before it."""
        self.map.madvise(mmap.MADV_DONTNEED)

    def codes(self, i: int) -> np.ndarray:
        """Image `i`'s codes: a read-only view into the mapped file."""
        start = int(self.starts[i])
        return self.data[start : start + int(self.lengths[i])]


class Rows(Sequence[np.ndarray]):
    """The codes of images located in a store's segments: row i is image ``index[i]`` of
    ``segments[which[i]]``, a view made when asked for (14 bytes a row held)."""

    def __init__(self, segments: Sequence[Segment], which: np.ndarray, index: np.ndarray) -> None:
        self.segments, self.which, self.index = list(segments), which, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        return self.segments[self.which[i]].codes(int(self.index[i]))

    def take(self, positions: Sequence[int] | np.ndarray) -> Rows:
        """The rows at `positions`, in their order."""
        positions = np.asarray(positions, dtype=np.int64)
        return Rows(self.segments, self.which[positions], self.index[positions])

    def release(self) -> None:
        """Unmap the pages of the segments read so far (:meth:`Segment.release`)."""
        for segment in self.segments:
            segment.release()

    def lengths(self) -> np.ndarray:
        """The number of codes of every row, read from the index (no codes touched)."""
        out = np.zeros(len(self), dtype=np.int64)
        for k, segment in enumerate(self.segments):
            mine = self.which == k
            out[mine] = segment.lengths[self.index[mine]]
        return out


class TokenStore(Mapping[str, np.ndarray]):
    """The segments of `folder`: image path -> its codes (empty while the folder is absent).

    `source`: refuse segments written with another (module doc). `segment_images`: images
    per segment that :meth:`write` adds.
    """

    def __init__(
        self, folder: Path, source: str | None = None, segment_images: int = SEGMENT_IMAGES
    ) -> None:
        self.folder, self.source, self.segment_images = Path(folder), source, segment_images
        self.segments: list[Segment] = []
        if self.folder.is_dir():
            _clean(self.folder)
        _convert_json(self.folder)
        self.refresh()

    def refresh(self) -> None:
        """Map the segments written since this store opened (by any process)."""
        if not self.folder.is_dir():
            return
        known = {s.path.name for s in self.segments}
        for path in sorted(self.folder.glob(f"*{SUFFIX}")):
            if path.name in known:
                continue
            segment = Segment(path)
            if None not in (self.source, segment.source) and segment.source != self.source:
                raise ConfigError(
                    f"{self.folder}: holds image tokens made by another host or image "
                    f"size / processor ({path.name}); delete it or use another --out"
                )
            self.segments.append(segment)

    def write(self, items: Iterable[tuple[str, Sequence[int]]]) -> int:
        """Add `(path, codes)` items, of paths not stored yet, as new segments; returns how many."""
        items, total = iter(items), 0
        with _writing(self.folder):
            while True:
                name = f"{uuid.uuid4().hex}{SUFFIX}"
                part = islice(items, self.segment_images)
                count = _write_segment(self.folder / name, part, self.source, self)
                if not count:
                    return total
                total += count
                self.refresh()

    def take_segments(self, folder: Path) -> None:
        """Move every segment of the store at `folder` (of the same source) into this one:
        renamed, or copied where the two lie on different file systems."""
        segments = sorted(Path(folder).glob(f"*{SUFFIX}"))
        if not segments:
            return
        with _writing(self.folder):
            for path in segments:
                target = self.folder / path.name
                try:
                    os.replace(path, target)
                except OSError as err:
                    if err.errno != errno.EXDEV:
                        raise
                    with atomic_path(target) as tmp:
                        shutil.copyfile(path, tmp)
                    path.unlink()
        self.refresh()

    def rows(self, paths: Sequence[str]) -> tuple[Rows, np.ndarray]:
        """Every path's codes as :class:`Rows`, and a mask of the paths found (a row of a
        path not found is not to be read). `paths` may be packed (:class:`Packed`)."""
        if isinstance(paths, Packed):
            keys = paths.fixed_width()
        else:
            keys = np.array([os.fsencode(p) for p in paths] or [b""])[: len(paths)]
        which = np.full(len(paths), -1, dtype=np.int32)
        index = np.zeros(len(paths), dtype=np.int64)
        for k, segment in enumerate(self.segments):
            todo = np.flatnonzero(which < 0)
            if not len(todo):
                break
            found = segment.find_all(keys[todo])
            which[todo[found >= 0]] = k
            index[todo[found >= 0]] = found[found >= 0]
        for segment in self.segments:  # the pages of the paths searched
            segment.release()
        return Rows(self.segments, which, index), which >= 0

    def _find(self, path: object) -> tuple[Segment, int] | None:
        if isinstance(path, str):
            key = os.fsencode(path)
            for segment in self.segments:
                if (i := segment.find(key)) >= 0:
                    return segment, i
        return None

    def __contains__(self, path: object) -> bool:
        return self._find(path) is not None

    def __getitem__(self, path: str) -> np.ndarray:
        found = self._find(path)
        if found is None:
            raise KeyError(path)
        return found[0].codes(found[1])

    def __len__(self) -> int:
        return sum(len(s) for s in self.segments)

    def __iter__(self) -> Iterator[str]:
        for segment in self.segments:
            for key in segment.keys:
                yield os.fsdecode(bytes(key))


@contextmanager
def _writing(folder: Path) -> Iterator[None]:
    """Hold `folder`'s lock shared while writing into it (creating it)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def _clean(folder: Path) -> None:
    """Delete what a killed writer left in `folder`, unless some writer is at work."""
    try:
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:  # a read-only store: nobody writes into it
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pass  # a writer's temporary files are not leftovers
    else:
        remove_leftovers(folder)
    finally:
        os.close(fd)


def _write_segment(
    target: Path,
    items: Iterable[tuple[str, Sequence[int]]],
    source: str | None,
    stored: Container[str],
) -> int:
    """Write `items` as the segment `target` (renamed into place when complete); returns the
    number of images, 0 for none (then nothing is written)."""
    items = iter(items)
    first = next(items, None)
    if first is None:
        return 0
    with atomic_path(target) as tmp, tmp.open("r+b") as f:
        f.write(bytes(DATA))
        keys, starts, lengths, dtype, count = [], [], [], np.dtype("<u2"), 0
        for path, codes in chain([first], items):
            array = np.asarray(codes)
            if path in stored:
                raise ValueError(f"{path}: already in the token store")
            if array.ndim != 1 or not array.size or array.dtype.kind not in "iu":
                raise ValueError(f"{path}: expected a non-empty sequence of token ids")
            low, high = int(array.min()), int(array.max())
            if low < 0 or high >= 2**32:
                raise ValueError(f"{path}: token ids must lie in [0, 2**32)")
            if high > np.iinfo(dtype).max:
                _widen(f, tmp, count)
                dtype = np.dtype("<u4")
            f.write(array.astype(dtype).tobytes())
            keys.append(path)
            starts.append(count)
            lengths.append(array.size)
            count += array.size
        paths = np.array([os.fsencode(k) for k in keys])
        order = np.argsort(paths, kind="stable")
        twice = np.flatnonzero(paths[order][1:] == paths[order][:-1])
        if twice.size:
            raise ValueError(f"{keys[order[twice[0]]]}: twice in one segment")
        header = {"dtype": dtype.str, "images": len(keys), "tokens": count, "data": DATA}
        header |= {"width": paths.dtype.itemsize, "source": source}
        for name, array in (
            ("keys", paths[order]),
            ("starts", np.asarray(starts, "<i8")[order]),
            ("lengths", np.asarray(lengths, "<u4")[order]),
        ):
            f.write(bytes(-f.tell() % ALIGN))
            header[name] = f.tell()
            f.write(array.tobytes())
        at = f.tell()
        f.write(json.dumps(header).encode())
        f.seek(0)
        f.write(MAGIC + at.to_bytes(8, "little"))
        f.flush()
        os.fsync(f.fileno())
    return len(keys)


def _widen(f: BinaryIO, path: Path, count: int) -> None:
    """Rewrite the `count` uint16 codes written so far as uint32, in place, last chunk first
    (a chunk's new bytes only cover old bytes already moved)."""
    f.flush()
    f.truncate(DATA + 4 * count)
    if count:
        narrow = np.memmap(path, dtype="<u2", mode="r+", offset=DATA, shape=(count,))
        wide = np.memmap(path, dtype="<u4", mode="r+", offset=DATA, shape=(count,))
        for stop in range(count, 0, -CHUNK):
            start = max(stop - CHUNK, 0)
            wide[start:stop] = narrow[start:stop].astype("<u4")
        wide.flush()
    f.seek(DATA + 4 * count)


def _convert_json(folder: Path) -> None:
    """Convert the JSON cache of earlier versions, ``<folder>.json``, into a segment."""
    legacy = folder.with_name(f"{folder.name}.json")
    try:
        text = legacy.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return  # none, or another process converted it meanwhile
    try:
        cache = json.loads(text)
        if not isinstance(cache, dict):
            raise ValueError("expected an object of image path -> tokens")
        with _writing(folder):
            _write_segment(folder / f"json{SUFFIX}", cache.items(), None, ())
    except ValueError as err:
        raise ConfigError(f"{legacy}: not an image-token cache ({err})") from None
    legacy.unlink(missing_ok=True)
