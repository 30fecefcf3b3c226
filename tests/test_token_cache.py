"""The memory-mapped image-token store (`modecl.hosts.token_cache`)."""

from __future__ import annotations

import json
import mmap
import multiprocessing
import os
import signal
import stat
from pathlib import Path

import numpy as np
import pytest

from modecl.core.config import ConfigError
from modecl.core.files import TEMP_MARK
from modecl.hosts import token_cache
from modecl.hosts.token_cache import TokenStore


def codes(n: int, seed: int = 0, high: int = 8192 + 4) -> dict[str, tuple[int, ...]]:
    """`n` images of different token counts (Emu3's shapes differ), ids in [4, high)."""
    rng = np.random.default_rng(seed)
    return {
        f"data/img/{i:03d}.png": tuple(rng.integers(4, high, 16 + 5 * (i % 7)).tolist())
        for i in range(n)
    }


def held(store: TokenStore) -> dict[str, tuple[int, ...]]:
    """What `store` holds, its codes (uint16 or uint32 views) as tuples of ints."""
    return {path: tuple(codes.tolist()) for path, codes in store.items()}


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if TEMP_MARK in p.name]


def test_codes_of_mixed_lengths_round_trip(tmp_path):
    written = codes(40)
    store = TokenStore(tmp_path / "tokens")
    assert len(store) == 0 and "data/img/000.png" not in store
    assert store.write(written.items()) == 40
    again = TokenStore(tmp_path / "tokens")
    assert held(again) == written and len(again) == 40
    assert sorted(again) == sorted(written)
    assert {len(v) for v in written.values()} == {16, 21, 26, 31, 36, 41, 46}
    for path in ("data/img/000.pn", "data/img/000.png2", "data/img/100.png", "x" * 300):
        assert path not in again  # a prefix, a longer path, another, one wider than any
        with pytest.raises(KeyError):
            again[path]
    assert tuple(again["data/img/007.png"]) == written["data/img/007.png"]
    assert again["data/img/007.png"].dtype == np.uint16  # a view of the codes as stored


def test_uint16_when_every_id_fits_else_uint32(tmp_path, monkeypatch):
    narrow = codes(10, high=2**16)
    store = TokenStore(tmp_path / "narrow")
    store.write(narrow.items())
    assert [s.data.dtype for s in store.segments] == [np.dtype("<u2")]
    tokens = sum(len(v) for v in narrow.values())
    assert store.segments[0].data.nbytes == 2 * tokens
    # A wide id after 10 narrow images: the codes written so far widen in place, chunk by chunk.
    monkeypatch.setattr(token_cache, "CHUNK", 7)
    wide = {**narrow, "late.png": (3, 2**16, 2**32 - 1)}
    store = TokenStore(tmp_path / "wide")
    store.write(wide.items())
    assert [s.data.dtype for s in store.segments] == [np.dtype("<u4")]
    assert held(TokenStore(tmp_path / "wide")) == wide


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([("a.png", [1, -1])], r"\[0, 2\*\*32\)"),
        ([("a.png", [2**32])], r"\[0, 2\*\*32\)"),
        ([("a.png", [])], "non-empty"),
        ([("a.png", [0.5])], "non-empty sequence of token ids"),
        ([("a.png", [1]), ("b.png", [2]), ("a.png", [1])], "a.png: twice in one segment"),
    ],
)
def test_bad_codes_are_refused_and_nothing_is_written(tmp_path, items, message):
    store = TokenStore(tmp_path / "tokens")
    with pytest.raises(ValueError, match=message):
        store.write(items)
    assert sorted(p.name for p in (tmp_path / "tokens").iterdir()) == [".lock"]
    assert len(TokenStore(tmp_path / "tokens")) == 0


def test_appends_add_segments_and_stored_paths_are_refused(tmp_path):
    first, second = codes(7), codes(12, seed=1)
    second = {k.replace("img", "more"): v for k, v in second.items()}
    store = TokenStore(tmp_path / "tokens", segment_images=3)
    assert store.write(first.items()) == 7
    assert sorted(len(s) for s in store.segments) == [1, 3, 3]
    assert store.write(second.items()) == 12  # another task file, later
    assert len(store.segments) == 7
    assert held(TokenStore(tmp_path / "tokens")) == first | second
    with pytest.raises(ValueError, match=r"data/img/002\.png: already in the token store"):
        store.write([("data/img/002.png", (5,))])


def rchar() -> int:
    """Bytes this process has read with read() and friends (not through memory maps)."""
    return int(Path("/proc/self/io").read_text().split("rchar:")[1].split()[0])


def test_opening_and_lookups_read_no_codes(tmp_path):
    rng = np.random.default_rng(0)
    images = {f"{i}.png": rng.integers(0, 8196, 1024) for i in range(2048)}  # 4 MiB of codes
    TokenStore(tmp_path / "tokens").write(images.items())
    before = rchar()
    store = TokenStore(tmp_path / "tokens")
    found = [store[f"{i}.png"] for i in range(0, 2048, 97)]
    assert rchar() - before < 64 * 1024  # the headers; codes come through the memory map
    assert isinstance(store.segments[0].map, mmap.mmap)
    assert [f.tolist() for f in found] == [images[f"{i}.png"].tolist() for i in range(0, 2048, 97)]


def _killed_writer(folder: Path) -> None:
    def items():
        yield from ((k.replace("img", "new"), v) for k, v in codes(5, seed=2).items())
        os.kill(os.getpid(), signal.SIGKILL)  # mid-segment: the temporary file stays

    TokenStore(folder).write(items())


def test_a_killed_writer_leaves_the_store_intact_and_open_cleans_up(tmp_path):
    folder = tmp_path / "tokens"
    before = codes(4)
    TokenStore(folder).write(before.items())
    child = multiprocessing.get_context("fork").Process(target=_killed_writer, args=(folder,))
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL
    assert len(leftovers(folder)) == 1
    store = TokenStore(folder)
    assert held(store) == before and leftovers(folder) == []


def test_open_leaves_a_live_writers_files_alone(tmp_path):
    folder = tmp_path / "tokens"
    TokenStore(folder).write(codes(2).items())
    temporary = folder / f".x.tokens{TEMP_MARK}abc"
    with token_cache._writing(folder):  # a writer at work (another process, as far as flock is
        temporary.write_bytes(b"half")  # concerned: a lock is per open file)
        TokenStore(folder)
        assert temporary.exists()
    TokenStore(folder)
    assert not temporary.exists()


def test_the_json_cache_of_earlier_versions_is_converted(tmp_path):
    old = {k: list(v) for k, v in codes(9).items()}
    (tmp_path / "image_tokens.json").write_text(json.dumps(old))
    tokenized = TokenStore(tmp_path / "image_tokens")
    assert not (tmp_path / "image_tokens.json").exists()
    assert [s.path.name for s in tokenized.segments] == ["json.tokens"]
    assert {k: list(v) for k, v in tokenized.items()} == old
    # The source of converted codes is unknown: a tokenizer of any settings takes them.
    assert len(TokenStore(tmp_path / "image_tokens", source="settings")) == 9


@pytest.mark.parametrize("text", ["[1, 2]", '{"a.png": "x"}', "{"])
def test_a_broken_json_cache_is_refused_naming_it(tmp_path, text):
    (tmp_path / "image_tokens.json").write_text(text)
    with pytest.raises(ConfigError, match=r"image_tokens.json: not an image-token cache"):
        TokenStore(tmp_path / "image_tokens")


def test_codes_of_other_settings_are_refused(tmp_path):
    TokenStore(tmp_path / "tokens", source="host a, 512 px").write(codes(2).items())
    assert len(TokenStore(tmp_path / "tokens", source="host a, 512 px")) == 2
    assert len(TokenStore(tmp_path / "tokens")) == 2  # a query, not a tokenizer
    with pytest.raises(ConfigError, match="made by another host or image size"):
        TokenStore(tmp_path / "tokens", source="host a, 256 px")


def test_a_corrupt_segment_is_refused_naming_it(tmp_path):
    TokenStore(tmp_path / "tokens").write(codes(2).items())
    (tmp_path / "tokens" / "bad.tokens").write_bytes(b"MDCLTOK1" + bytes(8))
    with pytest.raises(ConfigError, match=r"bad.tokens: not a readable token store segment"):
        TokenStore(tmp_path / "tokens")


def test_the_store_honours_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        TokenStore(tmp_path / "tokens").write(codes(2).items())
    finally:
        os.umask(old)
    folder = tmp_path / "tokens"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert set(modes.values()) == {0o640} and len(modes) == 2  # a segment and the lock
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750


def test_rows_locate_many_paths_at_once_across_segments(tmp_path):
    written = codes(30)
    store = TokenStore(tmp_path / "tokens", segment_images=7)  # five segments
    store.write(written.items())
    paths = [*reversed(written), "absent.png", "data/img/003.png"]
    rows, found = store.rows(paths)
    assert found.tolist() == [True] * 30 + [False, True]
    assert len(store.segments) == 5 and len(set(rows.which[found].tolist())) == 5
    for i, path in enumerate(paths):
        if found[i]:
            assert tuple(rows[i].tolist()) == written[path]
    assert rows.take([0, 31]).lengths().tolist() == [len(written[paths[0]]), 16 + 5 * 3]
    assert store.rows([])[1].tolist() == []
