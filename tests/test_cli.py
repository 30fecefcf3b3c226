"""The command line: clear errors with exit status 2, before any work."""

from __future__ import annotations

import pytest

from modecl.cli import main


def test_unknown_method_is_one_clear_error(tmp_path, capsys):
    code = main(
        [
            "bench",
            "--methods",
            "mode,nope",
            "--out",
            str(tmp_path / "out"),
            "--cache",
            str(tmp_path / "cache"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("modecl: error: unknown method(s) ['nope']; valid methods: seq-lora,")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_bad_config_names_file_and_key(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text("[continual.train]\nlr = 'fast'\n")
    assert main(["bench", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "run.toml: continual.train.lr: expected float, got str 'fast'" in err


@pytest.mark.parametrize("value", ["0", "-1"])
@pytest.mark.parametrize(
    "argv", [["train", "--model", "m", "--tasks", "t.jsonl"], ["bench"]], ids=["train", "bench"]
)
def test_seeds_below_one_is_the_one_line_error(tmp_path, capsys, argv, value):
    assert main([*argv, "--out", str(tmp_path / "out"), "--seeds", value]) == 2
    assert capsys.readouterr().err == (
        f"modecl: error: argument --seeds: must be at least 1, got {value} "
        f"(see modecl {argv[0]} --help)\n"
    )
    assert not (tmp_path / "out").exists()
