"""The gradient-conflict monitor: first-order predictions, group splits, passivity."""

from __future__ import annotations

import pytest
import torch

from modecl.core.adapters import attach_adapters
from modecl.core.config import ConfigError, ContinualSettings, TrainSettings, from_dict, load_toml
from modecl.core.conflict import ConflictMonitor, summarize_conflict
from modecl.core.methods import get_method
from modecl.core.train import make_optimizer, train_task, understand_loss
from modecl.digits.model import build_model
from tests.conftest import tiny_config


def settings(dropout: float = 0.0, **train: float) -> ContinualSettings:
    return from_dict(
        ContinualSettings,
        {
            "adapter": {"rank": 2, "num_experts": 2, "dropout": dropout},
            "train": {"epochs": 1, "batch_size": 8, "max_train_samples": 24, **train},
            "distill": {"batch_size": 4},
        },
    )


@pytest.fixture(scope="module")
def task(digits):
    return digits.tasks(["parity"])[0]


@pytest.fixture(scope="module")
def monitor(digits):
    return ConflictMonitor(digits.format, digits.draw_pairs(digits.pools.test[:16]), every=1)


def adapted(digits, method: str, config: ContinualSettings | None = None) -> torch.nn.Module:
    """A tiny host with ``method``'s adapters, B != 0 so that every path carries gradient."""
    model = build_model(digits.vocab, tiny_config().model, seed=0)
    torch.manual_seed(0)
    attach_adapters(model, get_method(method).adapter_config(config or settings()))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1)
    return model.train()


@pytest.mark.parametrize(
    ("method", "groups"),
    [
        ("mode", {"text", "image", "router"}),
        ("cl-moe", {"shared", "router"}),
        ("o-lora", {"shared"}),  # every task's LoRA: only the one in training moves
    ],
)
def test_sgd_step_prediction_matches_measured_change(digits, task, monitor, method, groups):
    model = adapted(digits, method)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = 1e-3
    loss = understand_loss(model, digits.format, task.train[:8])
    monitor.before(model, loss, lr)
    loss.backward()
    torch.optim.SGD(params, lr=lr).step()
    step = monitor.after(model)
    assert model.training  # the probe's eval mode was undone
    # Plain SGD on L_T alone: delta theta = -lr grad L_T (up to float32 rounding of theta).
    assert step["predicted_image_loss_change"] == pytest.approx(
        step["sgd_image_loss_change"], rel=1e-4
    )
    assert abs(step["measured_image_loss_change"]) > 1e-5
    assert step["measured_image_loss_change"] == pytest.approx(
        step["predicted_image_loss_change"], rel=0.02
    )
    assert set(step["by_group"]) == groups
    assert sum(
        g["predicted_image_loss_change"] for g in step["by_group"].values()
    ) == pytest.approx(step["predicted_image_loss_change"], rel=1e-9)


def test_adamw_prediction_uses_the_real_update(digits, task, monitor):
    config = settings(lr=1e-4, warmup_fraction=0.0)
    model = adapted(digits, "seq-lora", config)
    log = train_task(
        model, digits.format, get_method("seq-lora"), task, config, progress=False, monitor=monitor
    )
    assert [s["step"] for s in log["conflict"]] == [0, 1, 2]
    for step in log["conflict"]:
        assert abs(step["measured_image_loss_change"]) > 1e-5
        assert step["measured_image_loss_change"] == pytest.approx(
            step["predicted_image_loss_change"], rel=0.01
        )
        # Adam's update is not -lr grad: the SGD formula would predict something else.
        assert step["predicted_image_loss_change"] != pytest.approx(
            step["sgd_image_loss_change"], rel=0.1
        )
    assert set(log["conflict"][0]["by_group"]) == {"shared"}


def test_the_monitor_does_not_change_training(digits, task, monitor):
    config = settings(dropout=0.1, warmup_fraction=0.5)  # mode: dropout and distillation on
    pairs = digits.draw_pairs(digits.pools.train[:20])
    trained = []
    for watch in (None, monitor):
        model, method = adapted(digits, "mode", config), get_method("mode")
        method.configure(config, pairs)
        log = train_task(model, digits.format, method, task, config, progress=False, monitor=watch)
        assert len(log["conflict"]) == (0 if watch is None else 3)
        trained.append([p.detach().clone() for p in model.parameters() if p.requires_grad])
    assert all(torch.equal(a, b) for a, b in zip(*trained, strict=True))


@pytest.mark.parametrize(("method", "reaches_image"), [("mode-sample", False), ("mode", True)])
def test_text_loss_reaches_the_image_branch_only_under_token_routing(
    digits, task, monitor, method, reaches_image
):
    model = adapted(digits, method)
    batch = task.train[:8]  # understanding samples: each holds an image span
    loss = understand_loss(model, digits.format, batch)
    monitor.before(model, loss, 1e-3)
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3).step()
    step = monitor.after(model)
    image = step["by_group"]["image"]
    if reaches_image:
        assert image["inner_product_text"] != 0.0
    else:
        assert image["inner_product_text"] == 0.0 and image["cosine"] is None
        # The probe's draw pass is routed wholly to the image branch too: no conflict at all.
        assert step["inner_product_text"] == 0.0


def test_summary_sums_changes_and_leaves_undefined_figures_empty():
    def step(predicted: float, measured: float, cosine: float | None) -> dict:
        group = {"cosine": cosine, "inner_product_text": 1.0, "predicted_image_loss_change": 1.0}
        return {
            "cosine": cosine,
            "predicted_image_loss_change": predicted,
            "measured_image_loss_change": measured,
            "sgd_image_loss_change": 0.0,
            "by_group": {"shared": group},
        }

    one = summarize_conflict([step(0.1, 0.2, 0.5)])
    assert one["correlation"] is None and one["mean_cosine"] == 0.5
    three = summarize_conflict([step(0.1, 0.2, 0.5), step(0.2, 0.3, None), step(0.4, 0.5, -0.5)])
    assert three["predicted_image_loss_change"] == pytest.approx(0.7)
    assert three["measured_image_loss_change"] == pytest.approx(1.0)
    assert three["correlation"] == pytest.approx(1.0)
    assert three["mean_cosine"] == 0.0
    assert three["by_group"]["shared"]["predicted_image_loss_change"] == 3.0
    assert summarize_conflict([])["correlation"] is None


@pytest.mark.parametrize(
    ("optimizer", "second"),
    [
        # plain SGD: each step -lr * grad
        ("sgd", [0.7 - 0.3, 1.5 - 0.5]),
        # heavy ball: v = 0.5 v + g, step -lr * v
        ("sgd-momentum", [0.7 - 0.1 * (0.5 * 3 + 3), 1.5 - 0.1 * (0.5 * 5 + 5)]),
    ],
)
def test_one_sgd_step_is_lr_times_the_gradient(optimizer, second):
    theta = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    optim = make_optimizer([theta], TrainSettings(optimizer=optimizer, lr=0.1, momentum=0.5))
    for expected in ([0.7, 1.5], second):  # the loss 3 a + 5 b: gradient (3, 5)
        optim.zero_grad()
        (theta @ torch.tensor([3.0, 5.0])).backward()
        optim.step()
        assert theta.detach().tolist() == pytest.approx(expected, rel=1e-6)
    assert isinstance(make_optimizer([theta], TrainSettings()), torch.optim.AdamW)


def test_an_unknown_optimizer_is_refused_at_load(tmp_path):
    file = tmp_path / "c.toml"
    file.write_text('[train]\noptimizer = "adam"\n')
    with pytest.raises(ConfigError, match=r"train\.optimizer: 'adam' is not one of 'adamw', 'sgd'"):
        load_toml(ContinualSettings, file)


def test_under_plain_sgd_the_papers_formula_is_the_real_update_prediction(digits, task, monitor):
    """seq-lora (the CE alone), plain SGD, no clipping: Δθ = -lr ∇L_T, so the SGD formula
    equals the first-order prediction with the real update at every step, and the splits
    by layer and by module add up to it."""
    config = settings(lr=0.05, warmup_fraction=0.0, optimizer="sgd", grad_clip=1e9)
    model = adapted(digits, "seq-lora", config)
    log = train_task(
        model, digits.format, get_method("seq-lora"), task, config, progress=False, monitor=monitor
    )
    assert len(log["conflict"]) == 3
    for step in log["conflict"]:
        predicted = step["predicted_image_loss_change"]
        assert abs(predicted) > 1e-6
        assert step["sgd_image_loss_change"] == pytest.approx(predicted, rel=1e-4)
        assert sorted(step["by_layer"]) == ["0", "1"]
        assert sorted(step["by_module"]) == ["down_proj", "gate_proj", "up_proj"]
        for split in ("by_layer", "by_module"):
            for key in ("predicted_image_loss_change", "inner_product_text"):
                parts = sum(site[key] for site in step[split].values())
                assert parts == pytest.approx(step[key], rel=1e-9)
    summary = summarize_conflict(log["conflict"])
    assert summary["sgd_correlation"] == pytest.approx(summary["correlation"], abs=1e-4)
    assert summary["by_module"]["up_proj"]["predicted_image_loss_change"] == pytest.approx(
        sum(s["by_module"]["up_proj"]["predicted_image_loss_change"] for s in log["conflict"])
    )
