"""Configuration loading: the shipped config documents the defaults; errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from modecl.config import ConfigError, DigitsConfig, RunConfig, load_toml, to_dict

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_equals_the_built_in_defaults():
    assert to_dict(load_toml(RunConfig, ROOT / "configs" / "digits.toml")) == to_dict(RunConfig())


def test_missing_file_and_bad_toml_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.toml: config file not found"):
        load_toml(RunConfig, tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[host\n")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load_toml(RunConfig, bad)


def test_cache_key_follows_what_shapes_the_weights():
    base = DigitsConfig()
    assert base.cache_key() == DigitsConfig().cache_key()
    assert DigitsConfig(seed=1).cache_key() != base.cache_key()
    gate_only = DigitsConfig()
    gate_only.gate.captioning = 0.5
    assert gate_only.cache_key() == base.cache_key()
