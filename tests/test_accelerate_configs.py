"""The shipped accelerate configs load with accelerate's own loader and say what they claim."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import launch_command_parser
from accelerate.utils import DistributedType

from modecl.core.config import load_toml
from modecl.core.train import check_engine, size_reduce_bucket
from modecl.hosts.config import TrainConfig
from tests.fixtures import deepspeed_accelerator, tiny_chameleon

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


@pytest.mark.parametrize(
    ("name", "distributed_type", "processes", "machines"),
    [
        ("deepspeed_zero2", DistributedType.DEEPSPEED, 8, 1),
        ("deepspeed_zero2_2nodes", DistributedType.DEEPSPEED, 16, 2),
        ("ddp_1gpu", DistributedType.MULTI_GPU, 1, 1),
        ("ddp_8gpu", DistributedType.MULTI_GPU, 8, 1),
    ],
)
def test_config_loads_with_accelerate(name, distributed_type, processes, machines):
    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type == distributed_type
    assert config.num_processes == processes
    assert config.num_machines == machines
    assert config.mixed_precision == "bf16"
    assert not config.use_cpu
    if distributed_type == DistributedType.DEEPSPEED:
        assert config.deepspeed_config["zero_stage"] == 2
        assert config.deepspeed_config["gradient_clipping"] == 10.0
        assert config.deepspeed_config["offload_optimizer_device"] == "none"
    else:
        assert config.deepspeed_config == {}


@pytest.mark.parametrize("name", ["deepspeed_zero2", "deepspeed_zero2_2nodes"])
def test_deepspeed_fields_are_launch_options(name):
    """`accelerate launch` copies each deepspeed_config key onto its own option of that name."""
    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    options = {action.dest for action in launch_command_parser()._actions}
    assert set(config.deepspeed_config) <= options


def test_the_two_node_config_leaves_each_nodes_rank_and_node_0s_address_to_its_launch():
    """Each node's `accelerate launch` gives --machine_rank and --main_process_ip (the
    config's comments say so); the rendezvous is static, DeepSpeed's launcher torch's own."""
    config = load_config_from_file(str(CONFIGS / "deepspeed_zero2_2nodes.yaml"))
    assert (config.machine_rank, config.main_process_ip, config.main_process_port) == (
        0,
        None,
        29500,
    )
    assert config.rdzv_backend == "static"
    assert config.deepspeed_config["deepspeed_multinode_launcher"] == "standard"


def test_every_shipped_config_is_tested():
    shipped = {"deepspeed_zero2", "deepspeed_zero2_2nodes", "ddp_1gpu", "ddp_8gpu"}
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == shipped
    assert {p.name for p in CONFIGS.glob("*.json")} == {"zero2.json"}


def test_the_deepspeed_config_agrees_with_the_paper_schedule():
    """The training loop's check of DeepSpeed (clipping, accumulation, ZeRO stage) passes for
    the shipped ZeRO-2 config with configs/train-anole.toml, on its 8 processes."""
    options = load_config_from_file(str(CONFIGS / "deepspeed_zero2.yaml")).deepspeed_config
    keys = ("zero_stage", "gradient_clipping", "gradient_accumulation_steps")
    accelerator = deepspeed_accelerator(8, **{k: options[k] for k in keys})
    settings = load_toml(TrainConfig, CONFIGS.parent / "train-anole.toml")
    check_engine(accelerator, settings.continual)
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    assert config["gradient_clipping"] == settings.continual.train.grad_clip == 10.0
    assert config["train_micro_batch_size_per_gpu"] == 1  # the paper's batch of 1 per GPU


def test_the_deepspeed_json_takes_its_auto_values_from_the_paper_schedule_and_the_host():
    """zero2.json leaves batch sizes, clipping, accumulation and the reduce bucket to "auto";
    the loop fills in what accelerate would not (the bucket: the loss module it wraps has no
    model config), from configs/train-anole.toml on 8 processes and the host's width."""
    accelerator = deepspeed_accelerator(8, hf_ds_config=str(CONFIGS / "zero2.json"))
    settings = load_toml(TrainConfig, CONFIGS.parent / "train-anole.toml")
    model = tiny_chameleon()
    check_engine(accelerator, settings.continual)
    size_reduce_bucket(accelerator, model)
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    assert config["zero_optimization"]["stage"] == 2
    assert config["gradient_clipping"] == 10.0
    assert config["train_micro_batch_size_per_gpu"] == 1
    hidden = model.get_input_embeddings().embedding_dim
    assert config["zero_optimization"]["reduce_bucket_size"] == hidden * hidden
