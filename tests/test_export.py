"""peft export: each exportable kind's branch loads in peft.PeftModel with our logits; routed
branches are refused; `modecl export` finds a run's stage."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

from modecl.cli import main
from modecl.core.adapters import (
    AdapterConfig,
    adapter_layers,
    attach_adapters,
    load_adapters,
    pass_kind,
    save_adapters,
)
from modecl.core.export import ExportError, export_peft
from modecl.digits.bench import run_benchmark
from modecl.digits.pretrain import load_or_pretrain
from tests.fixtures import CODES, IMAGE_IDS, tiny_llama, tiny_run

IDS = torch.tensor([[1, 5, 9, IMAGE_IDS[-1], *CODES[:6], IMAGE_IDS[-2], 12, 30, 7]])


def adapted(config: AdapterConfig) -> torch.nn.Module:
    """The tiny Llama with ``config``'s adapters, every matrix random (B too)."""
    model = tiny_llama()
    attach_adapters(model, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_A.normal_(0, 0.3)
            layer.lora_B.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize(
    ("kind", "routing", "branch", "pass_"),
    [
        ("lora", "token", None, None),  # seq-lora, lwf, replay, ewc, a-gem
        ("o-lora", "token", None, None),  # every task's LoRA summed
        ("mode-text-lora", "sample", "text", "understand"),  # every token: the text LoRA
        ("mode-text-lora", "sample", "image", "draw"),  # every token: the image LoRA
        ("mode", "task", "image", "draw"),  # the V-Adapter, drawing
    ],
)
def test_an_exported_branch_loads_in_peft_with_our_logits(tmp_path, kind, routing, branch, pass_):
    tasks = 3 if kind == "o-lora" else 1
    config = AdapterConfig(
        kind=kind, rank=2, alpha=3.0, num_experts=2, routing=routing, tasks=tasks
    )
    model = adapted(config)
    save_adapters(model, tmp_path / "ours")
    written = export_peft(tmp_path / "ours", tmp_path / "peft", branch=branch, base_model="tiny")
    assert written["r"] == (6 if kind == "o-lora" else 2)
    assert written["target_modules"] == ["down_proj", "gate_proj", "up_proj"]
    files = sorted(p.name for p in (tmp_path / "peft").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft").eval()
    with torch.no_grad():
        theirs = loaded(input_ids=IDS).logits
        host = tiny_llama()(input_ids=IDS).logits
        if pass_ is None:
            ours = model(input_ids=IDS).logits
        else:
            with pass_kind(model, pass_):
                ours = model(input_ids=IDS).logits
    assert (theirs - host).abs().max() > 1e-2  # the adapters change the logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kind", "branch", "message"),
    [
        ("moe-lora", None, "moe-lora adapters weigh their experts per token by a router"),
        ("cl-moe", None, "cl-moe adapters weigh their experts per token by a router"),
        ("mode", "text", "mode: branch 'text' does not export as a LoRA"),
        ("lora", "image", "lora: branch 'image' does not export as a LoRA"),
    ],
)
def test_a_routed_branch_is_refused(tmp_path, kind, branch, message):
    save_adapters(adapted(AdapterConfig(kind=kind, rank=2, num_experts=2)), tmp_path / "ours")
    with pytest.raises(ExportError, match=message):
        export_peft(tmp_path / "ours", tmp_path / "peft", branch=branch)
    assert not (tmp_path / "peft").exists()


def test_modecl_export_writes_a_runs_stage(tmp_path, cache, capsys):
    config = tiny_run(methods=["seq-lora", "mode"])
    run_benchmark(config, tmp_path / "run", cache_dir=cache, progress=False)
    out = tmp_path / "peft"
    assert main(["export", str(tmp_path / "run"), "--method", "seq-lora", "--out", str(out)]) == 0
    assert "peft LoRA, r 2" in capsys.readouterr().out
    host = load_or_pretrain(config.host, cache, progress=False).model
    stage = tmp_path / "run" / "checkpoints" / "seed0" / "seq-lora" / "stage2" / "adapters"
    ours = load_adapters(copy.deepcopy(host), stage).eval()
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(host), out).eval()
    ids = torch.tensor([[1, 8, 9, 30, 40, 50, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ours(input_ids=ids).logits)
    argv = ["export", str(tmp_path / "run"), "--method", "mode", "--branch", "text"]
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    assert "branch 'text' does not export as a LoRA" in capsys.readouterr().err
    argv = ["export", str(tmp_path / "run"), "--method", "seq-lora", "--stage", "9"]
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    assert "no finished stage 9; finished: ['stage1', 'stage2']" in capsys.readouterr().err
