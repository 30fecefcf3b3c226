"""Shipped digits hosts: taken without pre-training when the config matches, checked against
their manifest, re-created and compared by `modecl pretrain`; any other config pre-trains."""

from __future__ import annotations

import dataclasses
import json

import pytest
from safetensors.torch import load_file, save_file

import modecl.digits.pretrain
from modecl.cli import main
from modecl.core.config import to_dict
from modecl.digits import shipped
from modecl.digits.config import DigitsConfig
from modecl.digits.pretrain import cache_key, load_or_pretrain
from tests.conftest import tiny_config
from tests.fixtures import toml


def ungated(**overrides: object) -> DigitsConfig:
    """The tiny host config with its gate at 0 (the tiny host passes no real gate)."""
    return tiny_config(gate={"captioning": 0.0, "generation": 0.0}, **overrides)


@pytest.fixture
def shipped_root(tmp_path, cache, monkeypatch):
    """A shipped host of the tiny config, seed 0, in its own folder, made as
    `benchmarks/ship_hosts.py` makes one; the package's hosts set aside."""
    config = ungated()
    host = load_or_pretrain(config, cache, progress=False, use_shipped=False)
    root = tmp_path / "hosts"
    scores = dict(zip(("captioning", "generation"), host.gate_scores(), strict=True))
    shipped.ship(
        host.folder, root / "seed0", key=cache_key(config), seed=0, gate=scores, command="x"
    )
    monkeypatch.setattr(shipped, "SHIPPED", root)
    return root


def no_training(*args, **kwargs):
    raise AssertionError("pre-trained although a shipped host matches")


def test_a_matching_config_loads_the_shipped_host_without_training(
    shipped_root, tmp_path, monkeypatch
):
    monkeypatch.setattr(modecl.digits.pretrain, "train_host", no_training)
    host = load_or_pretrain(ungated(), tmp_path / "empty-cache", progress=False)
    assert host.log["source"] == "shipped" and host.folder == shipped_root / "seed0"
    assert not (tmp_path / "empty-cache").exists()
    weights = load_file(shipped_root / "seed0" / "model" / "model.safetensors")
    state = host.model.state_dict()
    assert all((weights[k] == state[k]).all() for k in weights)
    identity = host.identity()
    assert identity["shipped"] and identity["seed"] == 0
    assert identity["config_hash"] == cache_key(ungated())
    manifest = json.loads((shipped_root / "seed0" / "manifest.json").read_text())
    assert identity["weights_sha256"] == manifest["files"]["model/model.safetensors"]
    assert identity["kernel_path"] == manifest["kernel_path"] is not None
    assert set(manifest["files"]) >= {"codebook.npy", "vocab.json", "log.json", "model/config.json"}


def test_a_changed_config_pre_trains_as_before(shipped_root, tmp_path):
    host = load_or_pretrain(ungated(seed=1), tmp_path / "cache", progress=False)
    assert host.log["source"] == "trained" and not host.identity()["shipped"]
    assert host.folder.parent == tmp_path / "cache"


def test_a_changed_gate_is_another_host(shipped_root, tmp_path, monkeypatch):
    """Checkpoints are ranked by their margin to the gate, so the gate keys the host: a
    shipped host selected under one gate is not taken for another (it was, and a re-created
    host then differed from it)."""
    other = tiny_config(gate={"captioning": 0.5, "generation": 0.0})
    assert cache_key(other) != cache_key(ungated())
    host = load_or_pretrain(other, tmp_path / "cache", progress=False)
    assert host.log["source"] == "trained"


@pytest.mark.parametrize("damage", ["changed", "missing"])
def test_a_damaged_shipped_host_is_refused_naming_the_file(shipped_root, tmp_path, damage):
    file = shipped_root / "seed0" / "codebook.npy"
    if damage == "changed":
        data = bytearray(file.read_bytes())
        data[-1] ^= 1
        file.write_bytes(bytes(data))
    else:
        file.unlink()
    with pytest.raises(shipped.ShippedHostError, match=r"seed0: codebook\.npy .*reinstall"):
        load_or_pretrain(ungated(), tmp_path / "cache", progress=False)


def test_pretrain_re_creates_a_shipped_host_and_says_it_matches(shipped_root, tmp_path, capsys):
    config = tmp_path / "host.toml"
    config.write_text(toml(to_dict(ungated())))
    assert main(["pretrain", "--config", str(config), "--cache", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "pre-trained in" in out  # re-created, not loaded
    assert f"matches the shipped host {shipped_root / 'seed0'} bit for bit" in out


def test_pretrain_says_how_a_re_created_host_differs(shipped_root, tmp_path, capsys):
    folder = shipped_root / "seed0"
    weights = load_file(folder / "model" / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 0.25
    save_file(weights, folder / "model" / "model.safetensors", metadata={"format": "pt"})
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["model/model.safetensors"] = shipped.sha256(
        folder / "model" / "model.safetensors"
    )
    (folder / "manifest.json").write_text(json.dumps(manifest))
    config = tmp_path / "host.toml"
    config.write_text(toml(to_dict(ungated())))
    assert main(["pretrain", "--config", str(config), "--cache", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert f"differs from the shipped host {folder}: largest weight difference 0.25" in out


def test_the_package_ships_the_default_hosts_of_seeds_0_1_2():
    """Changing what pre-training learns (the default config, the texts, FORMAT_VERSION)
    without re-shipping (`benchmarks/ship_hosts.py`) fails here."""
    found = shipped.manifests()
    keys = {m["cache_key"]: folder for folder, m in found.items()}
    for seed in (0, 1, 2):
        key = cache_key(dataclasses.replace(DigitsConfig(), seed=seed))
        assert key in keys, f"no shipped host for the default config, host seed {seed}"
        manifest = shipped.verify(keys[key])
        assert manifest["seed"] == seed
        gate = DigitsConfig().gate
        assert manifest["gate_scores"]["captioning"] >= gate.captioning + 0.02
        assert manifest["gate_scores"]["generation"] >= gate.generation + 0.02
