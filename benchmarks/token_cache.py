"""The memory-mapped token store (`modecl.hosts.token_cache`) against the JSON cache it replaced.

Synthetic Anole-like images: 1,024 codes each, random ids in [4, 4 + 8192). Measured in one
process: write time, bytes per image on disk, open time, lookup time, and the resident memory
(/proc/self/status) the process gains by opening the store and by 10k random lookups,
split into private (RssAnon) and file-backed pages (RssFile: the page cache, shared by every
process that maps the store). The JSON cache (`{path: [ids]}`, read back into tuples as the
old `ImageTokenizer.load` did) is measured at fewer images and extrapolated linearly.

    .venv/bin/python benchmarks/token_cache.py [--images 100000] [--json-images 10000]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from modecl.hosts.token_cache import TokenStore

TOKENS, CODES, OFFSET = 1024, 8192, 4
MIB = 2**20


def memory() -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of this process, in bytes."""
    fields = dict(line.split(":") for line in Path("/proc/self/status").read_text().splitlines())
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon", "RssFile")}


def gained(before: dict[str, int]) -> str:
    now = memory()
    rss, anon, file = (now[k] - before[k] for k in ("VmRSS", "RssAnon", "RssFile"))
    return f"{rss / MIB:.1f} MiB (private {anon / MIB:.1f}, page cache {file / MIB:.1f})"


def images(count: int, seed: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    for start in range(0, count, 1000):
        block = rng.integers(0, CODES, (min(1000, count - start), TOKENS)) + OFFSET
        for i, row in enumerate(block, start):
            yield f"coin/ScienceQA/images/train/{i:07d}.png", row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=100_000, help="images in the store")
    parser.add_argument("--json-images", type=int, default=10_000, help="images in the JSON")
    parser.add_argument("--lookups", type=int, default=10_000, help="random lookups")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="modecl-token-bench-"))
    try:
        start = time.perf_counter()
        TokenStore(folder / "store").write(images(args.images))
        write_s = time.perf_counter() - start
        disk = sum(p.stat().st_size for p in (folder / "store").glob("*.tokens"))
        paths = [f"coin/ScienceQA/images/train/{i:07d}.png" for i in range(args.images)]
        chosen = random.Random(0).choices(paths, k=args.lookups)

        before = memory()
        start = time.perf_counter()
        store = TokenStore(folder / "store")
        open_s = time.perf_counter() - start
        opened = gained(before)
        start = time.perf_counter()
        for path in chosen:
            store[path]
        lookup_s = (time.perf_counter() - start) / args.lookups
        looked = gained(before)
        kept = memory()
        held = [store[p] for p in chosen]  # as Samples hold their codes: tuples of ints
        held_bytes = (memory()["RssAnon"] - kept["RssAnon"]) / args.lookups
        del held

        n = args.json_images
        text = json.dumps({p: row.tolist() for p, row in images(n)})
        (folder / "image_tokens.json").write_text(text)
        json_disk = (folder / "image_tokens.json").stat().st_size
        del text
        before = memory()
        start = time.perf_counter()
        loaded = json.loads((folder / "image_tokens.json").read_text())
        cache = {k: tuple(v) for k, v in loaded.items()}
        del loaded
        json_open_s = time.perf_counter() - start
        json_anon = memory()["RssAnon"] - before["RssAnon"]
        start = time.perf_counter()
        for path in random.Random(0).choices(list(cache), k=args.lookups):
            cache[path]
        json_lookup_s = (time.perf_counter() - start) / args.lookups
    finally:
        shutil.rmtree(folder)

    scale = args.images / n
    print(
        f"{args.images} images x {TOKENS} codes (ids {OFFSET}..{OFFSET + CODES - 1}), "
        f"{args.lookups} random lookups; the JSON cache measured at {n} images, its open time "
        f"and memory x{scale:g} (linear)\n"
    )
    rows = [
        ("", "store (mmap)", "JSON cache"),
        ("---", "---", "---"),
        ("bytes per image on disk", f"{disk / args.images:,.0f}", f"{json_disk / n:,.0f}"),
        ("write, every image", f"{write_s:.1f} s", "–"),
        ("open (JSON: load into tuples)", f"{open_s * 1e3:.1f} ms", f"{json_open_s * scale:.1f} s"),
        ("lookup, one image", f"{lookup_s * 1e6:.1f} us", f"{json_lookup_s * 1e6:.2f} us"),
        ("memory gained by opening", opened, f"{json_anon * scale / MIB:,.0f} MiB (private)"),
        ("after the lookups too", looked, "same"),
    ]
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\ncodes held as a tuple of ints (as a Sample holds them): {held_bytes / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
