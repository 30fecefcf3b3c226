"""Shared tiny fixtures: the digits study and a tiny pre-trained host, built once per session."""

from __future__ import annotations

import signal

import pytest

from modecl.core.config import from_dict
from modecl.digits.config import DigitsConfig
from modecl.digits.host import Digits

TINY = {
    "codebook": {"codes": 16},
    "model": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2},
    "pretrain": {"epochs": 2, "eval_from_epoch": 1, "eval_every": 1, "preview_per_task": 10},
    "generation": {"samples_per_digit": 2},
}


def tiny_config(**overrides: object) -> DigitsConfig:
    data = {k: dict(v) for k, v in TINY.items()}
    for key, value in overrides.items():  # "section__field" or a top-level field
        section, _, field = key.partition("__")
        if field:
            data.setdefault(section, {})[field] = value
        else:
            data[section] = value
    return from_dict(DigitsConfig, data)


@pytest.fixture(scope="session")
def digits() -> Digits:
    return Digits.build(tiny_config())


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """A cache folder shared by the tests that run the tiny study: its host trains once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def ctrl_c():
    """Ctrl-C raising KeyboardInterrupt in this process, as in a terminal: a process started
    in the background by a shell (``cmd &``, as CI runners may) inherits SIGINT ignored, and
    Python then installs no handler."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
