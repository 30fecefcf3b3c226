"""Samples as packed tables (`modecl.core.tasks.Samples`) and the manifest's hash of them."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from modecl.core.runner import content_digest
from modecl.core.tasks import Packed, Prefixed, Sample, Samples

FIELDS = [
    {"question": "what is it?", "answer": "a cat", "source": "t.jsonl:1"},
    {"question": "¿qué es?\nA. perro\nB. gato", "answer": "B", "options": ("perro", "gato")},
    {"question": "read it", "answer": "stop", "answers": ("stop",) * 9 + ("halt",), "index": 7},
]


def table() -> Samples:
    codes = np.arange(12, dtype=np.uint16).reshape(3, 4)
    return Samples.of(codes, FIELDS)


def test_a_table_gives_back_every_field_and_the_codes_as_views():
    samples = table()
    assert len(samples) == 3
    for sample, fields in zip(samples, FIELDS, strict=True):
        assert isinstance(sample, Sample) and isinstance(sample.codes, np.ndarray)
        for name in ("question", "answer", "options", "answers", "source", "label", "index"):
            assert getattr(sample, name) == fields.get(name), name
    assert samples[-1].codes.tolist() == [8, 9, 10, 11] and samples[-1].codes.dtype == np.uint16
    assert np.shares_memory(samples[1].codes, samples.codes)  # a view, not a copy
    assert [s.answer for s in samples[1:]] == ["B", "stop"]  # a slice: a list of samples
    with pytest.raises(IndexError):
        samples[3]


def test_packed_values_round_trip():
    texts = ["", "é\n\u2028x", "a" * 1000]
    assert list(Packed(texts)) == texts
    values = [None, ("a", "b"), "x", 3]
    assert list(Packed(values, json_values=True)) == values
    assert Packed(texts)[::2] == ["", "a" * 1000]


def test_the_manifest_hash_is_the_json_of_every_sample_fed_one_at_a_time():
    """The same value as hashing json.dumps of every sample at once (earlier versions)."""
    samples = table()
    content = [[s.codes.tolist(), s.question, s.answer, s.options] for s in samples]
    expected = hashlib.sha256(json.dumps(content).encode()).hexdigest()
    assert content_digest(samples) == expected
    as_tuples = [
        Sample(tuple(s.codes.tolist()), s.question, s.answer, options=s.options) for s in samples
    ]
    assert content_digest(as_tuples) == expected
    assert content_digest([]) == hashlib.sha256(b"[]").hexdigest()


def test_sources_hold_each_file_once():
    values = ["a/t.json: record 0", None, "a/t.json: record 1", "b.jsonl:3", "plain"]
    sources = Prefixed(values)
    assert list(sources) == values and sources[-2:] == values[-2:]
    assert sources.prefixes == ["a/t.json:", "b.jsonl:", ""]
