"""Every shared builder and helper of the tests: tiny random hosts, a toy tokenizer, and the
checkpoints and task files that `modecl train` reads from disk.

The tiny hosts share one 64-id vocabulary, so that an id means the same thing to each:

- text: 0 pad, 1 BOS, 2 EOS; 3..38 the ids that tests write (`TEXT_IDS`, `encode`); 39, 62
  and 63 are text the tests never write;
- image codes: the 16 VQ codes at 40..55 (`CODES`); an 8x8-pixel image is a 4x4 grid of them;
- image markers from 56. Chameleon: `<image>` 56, `<eoss>` 57 (end of image),
  `<racm3:break>` 58 (begin of image); 59..61 are unnamed. Emu3: `<image>` 56,
  `<|image start|>` 57, `<|image end|>` 58, `<|image token|>` 59 (the wrapper after the size
  text), `<|extra_200|>` 60 (row end), `<|extra_201|>` 61 (frame end);
- the tiny Llama (a plain decoder, no image tokenizer) names the Chameleon's image ids,
  codes and markers (`IMAGE_IDS`, 40..58), in its config: both route the same ids to the
  image branch. Emu3's image ids (40..61) hold them all.

The word-level tokenizer of the checkpoints on disk (`tokenizer`) maps `<pad>` 0, `<s>` 1,
`</s>` 2, the words of the tasks (`WORDS`) to 3..21 and `<unk>` to 22. The tiny CLIP
(`write_tiny_clip`) has its own vocabulary of lower-case letters and 16-pixel images.
"""

from __future__ import annotations

import json
import os
import socket
import string
import sys
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from accelerate.utils import DeepSpeedPlugin
from PIL import Image
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from torch import nn
from transformers import (
    ChameleonConfig,
    ChameleonForConditionalGeneration,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    Emu3Config,
    Emu3ForConditionalGeneration,
    Emu3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from modecl.core.adapters import (
    AdapterConfig,
    adapter_layers,
    attach_adapters,
    lm_logits,
    pass_kind,
    routed_weights,
    routing_context,
    training_task,
)
from modecl.core.config import from_dict
from modecl.core.generation import Constraint
from modecl.core.processes import Processes
from modecl.digits.config import RunConfig
from tests.conftest import TINY

# --- the tiny vocabulary ------------------------------------------------------------------

VOCAB_SIZE, PAD_ID, BOS_ID, EOS_ID = 64, 0, 1, 2
TEXT = {
    "vocab_size": VOCAB_SIZE,
    "pad_token_id": PAD_ID,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
}
TEXT_IDS = list(range(3, 39))
CODES = list(range(40, 56))
IMAGE_IDS = list(range(40, 59))  # the Chameleon's codes and markers; the tiny Llama's too
# The markers by role, to check the ones read from the configs.
BEGIN = {"chameleon": 58, "emu3": 57}
END = {"chameleon": 57, "emu3": 58}
ROW_END, FRAME_END, WRAPPER = 60, 61, 59  # Emu3 only
PIXELS, GRID = 8, (4, 4)  # 8x8-pixel images, 4x4 codes

SIZES = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2}
HEADS = {"num_attention_heads": 4, "num_key_value_heads": 2}


def text_vocabulary() -> dict[str, int]:
    return {f"tok{i}": i for i in [*range(40), *range(62, 64)]}


# --- the tiny hosts -----------------------------------------------------------------------


def tiny_llama() -> LlamaForCausalLM:
    """A plain decoder whose config names the image ids (`IMAGE_IDS`), as the digits model."""
    torch.manual_seed(0)
    config = LlamaConfig(**TEXT, **SIZES, **HEADS)
    config.image_token_ids = IMAGE_IDS
    return LlamaForCausalLM(config).eval()


def tiny_chameleon() -> ChameleonForConditionalGeneration:
    vocabulary = text_vocabulary()
    for code, i in enumerate(CODES):  # as on the hub: IMGIMG + the code's digits as letters + Z
        vocabulary["IMGIMG" + "".join(chr(ord("A") + int(c)) for c in str(code)) + "Z"] = i
    vocabulary.update({"<image>": 56, "<eoss>": 57, "<racm3:break>": 58})
    vq = {"embed_dim": 4, "num_embeddings": 16, "latent_channels": 4, "base_channels": 32}
    torch.manual_seed(0)
    config = ChameleonConfig(
        vocabulary_map=vocabulary,
        vq_config={**vq, "in_channels": 3, "channel_multiplier": [1, 2]},
        **TEXT,
        **SIZES,
        **HEADS,
    )
    return ChameleonForConditionalGeneration(config).eval()


def tiny_emu3() -> Emu3ForConditionalGeneration:
    vocabulary = text_vocabulary()
    for code, i in enumerate(CODES):
        vocabulary[f"<|visual token{code:06d}|>"] = i
    names = ["<image>", "<|image start|>", "<|image end|>", "<|image token|>"]
    vocabulary.update({name: 56 + k for k, name in enumerate(names)})
    vocabulary.update({"<|extra_200|>": 60, "<|extra_201|>": 61})
    vq = {"codebook_size": 16, "embed_dim": 4, "latent_channels": 4, "base_channels": 32}
    torch.manual_seed(0)
    config = Emu3Config(
        text_config=Emu3TextConfig(**TEXT, **SIZES, **HEADS),
        # channels stay 32 (the VQ attention's hidden_size) and halve the size once: 8 -> 4
        vq_config={
            **vq,
            "hidden_size": 32,
            "channel_multiplier": [1, 1],
            "temporal_downsample_factor": 1,
            "attn_resolutions": [],
        },
        vocabulary_map=vocabulary,
    )
    return Emu3ForConditionalGeneration(config).eval()


HOSTS = {"llama": tiny_llama, "chameleon": tiny_chameleon, "emu3": tiny_emu3}
ADAPTER_HOSTS = ("llama", "chameleon")  # the adapter layer's: a plain decoder, an early-fusion
IMAGE_HOSTS = ("chameleon", "emu3")  # the hosts with a VQ image tokenizer


# --- inputs and adapters ------------------------------------------------------------------


def encode(text: str) -> list[int]:
    """A toy tokenizer: one text id (3..38) per character."""
    return [3 + ord(c) % 36 for c in text]


def pixels(rows: int = 2) -> torch.Tensor:
    return torch.rand(rows, 3, PIXELS, PIXELS, generator=torch.Generator().manual_seed(3)) * 2 - 1


def batch(kind: str = "mixed", rows: int = 2) -> torch.Tensor:
    """Token ids: a caption, an image span, more text; or text / image tokens only."""
    g = torch.Generator().manual_seed(1)
    text = torch.tensor(TEXT_IDS)[torch.randint(len(TEXT_IDS), (rows, 12), generator=g)]
    image = torch.tensor(IMAGE_IDS)[torch.randint(len(IMAGE_IDS), (rows, 12), generator=g)]
    if kind == "text":
        return text
    if kind == "image":
        return image
    return torch.cat([text[:, :4], image[:, :6], text[:, 4:6]], dim=1)


def randomize(model: nn.Module, std: float = 0.3) -> None:
    """Non-zero B so that every expert changes the output and A gets gradient."""
    torch.manual_seed(2)
    for layer in adapter_layers(model).values():
        nn.init.normal_(layer.lora_B, std=std)


def adapted(host: str, std: float = 0.3, **config) -> nn.Module:
    model = attach_adapters(HOSTS[host](), AdapterConfig(**config))
    randomize(model, std)
    return model


def step_results(
    model: nn.Module,
    fused: bool,
    ids: torch.Tensor,
    kind: str | None,
    task: int | None,
    compiled: bool = False,
) -> list[torch.Tensor]:
    """Logits, routed weights and every gradient (adapters, router, input embeddings) of one
    training step by the fused (`compiled`: compiled) or the reference path, from the same
    random state."""
    routing = routing_context(model)
    routing.fused, routing.compiled = fused, compiled
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same dropout masks
    passing = pass_kind(model, kind) if kind else nullcontext()
    with passing, training_task(model, task) if task is not None else nullcontext():
        logits = lm_logits(model, input_ids=ids)
    F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
    weights = list(routed_weights(model).values())
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    return [logits.detach(), *weights, *(torch.zeros(0) if g is None else g for g in grads)]


# --- decoding, the reference --------------------------------------------------------------


def ids_mask(ids: list[int], vocab: int = VOCAB_SIZE) -> torch.Tensor:
    """``[vocab]``: True at ``ids``."""
    return torch.zeros(vocab, dtype=torch.bool).index_fill(0, torch.tensor(ids), True)


def allowed_mask(
    allowed: Constraint | None, step: int, so_far: torch.Tensor, vocab: int = VOCAB_SIZE
) -> torch.Tensor:
    """``[rows, vocab]``: True where a generated token at ``step`` may go."""
    if callable(allowed):
        allowed = allowed(step, so_far)
    if allowed is None:
        return torch.ones(len(so_far), vocab, dtype=torch.bool)
    allowed = torch.as_tensor(allowed)
    mask = allowed if allowed.dtype == torch.bool else ids_mask(allowed.tolist(), vocab)
    return mask.expand(len(so_far), vocab)


def greedy_without_cache(
    model: nn.Module,
    prompt: torch.Tensor,
    layout: list[int | None],
    allowed: Constraint | None = None,
) -> torch.Tensor:
    """The reference decoding: the whole sequence recomputed for every token (no cache);
    where ``layout`` holds a token it is forced, elsewhere the argmax over the allowed."""
    sequence = prompt
    for step, forced in enumerate(layout):
        if forced is None:
            logits = lm_logits(model, input_ids=sequence, use_cache=False)[:, -1]
            so_far = sequence[:, prompt.shape[1] :]
            mask = allowed_mask(allowed, step, so_far, logits.shape[-1])
            token = logits.masked_fill(~mask, float("-inf")).argmax(-1)
        else:
            token = torch.full((len(prompt),), forced)
        sequence = torch.cat([sequence, token[:, None]], dim=1)
    return sequence[:, prompt.shape[1] :]


# --- checkpoints and task files on disk ---------------------------------------------------

# Text ids 3..: the words of the tasks below ("4 * 4" is Emu3's size text of a 4x4 image).
WORDS = ["what", "color", "is", "it", "?", "red", "blue", "green", "which", "shape", "(", "a"]
WORDS += [")", "b", "circle", "square", "draw", "4", "*"]
COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}

# `modecl train`'s settings for the tiny hosts and tasks.
TRAIN_CONFIG = """
seed = 0
[host]
image_size = 8
[continual.train]
epochs = 4
batch_size = 4
lr = 0.02
[continual.distill]
batch_size = 4
top_k = 16
[eval]
draws = 2
max_new_tokens = 4
"""


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{w: 3 + i for i, w in enumerate(WORDS)}}
    vocab["<unk>"] = len(vocab)
    model = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=model, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def write_host(family: str, folder: Path) -> Path:
    """A tiny `family` checkpoint (model + tokenizer) saved with `save_pretrained`."""
    HOSTS[family]().save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


def _png(path: Path, color: str, square: bool) -> None:
    """An 8x8 black image with a `color` square or (not `square`) a narrow bar."""
    image = Image.new("RGB", (8, 8), (0, 0, 0))
    image.paste(COLORS[color], (1, 1, 7, 7) if square else (3, 1, 5, 7))
    image.save(path)


def write_tasks(folder: Path) -> tuple[list[Path], Path]:
    """Two task files (color: exact match; shape: multiple choice) and a pairs file."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    color, shape, pairs = [], [], []
    for i in range(12):
        name, square = list(COLORS)[i % 3], i % 2 == 0
        image = f"images/{i}.png"
        _png(folder / image, name, square)
        split = "test" if i >= 8 else "train"
        color.append({"image": image, "question": "what color is it ?", "answer": name})
        shape.append(
            {
                "image": image,
                "question": "which shape ? ( a ) circle ( b ) square",
                "answer": "b" if square else "a",
                "options": ["circle", "square"],
            }
        )
        pairs.append({"caption": f"draw {name}", "image": image, "split": split})
        for row in (color[-1], shape[-1]):
            row["split"] = split
    files = []
    for task, rows in (("color", color), ("shape", shape)):
        files.append(folder / f"{task}.jsonl")
        files[-1].write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return files, folder / "pairs.jsonl"


def write_jsonl(path: Path, *rows: dict | str) -> Path:
    """``rows`` as a JSONL file, one a line (a string is written as it is: a broken line)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def train_inputs(root: Path) -> dict:
    """Under ``root``: the task and pairs files (:func:`write_tasks`), a tiny CLIP and a
    `modecl train` config that scores drawings with it."""
    files, pairs = write_tasks(root / "data")
    clip = write_tiny_clip(root / "clip")
    config = root / "train.toml"
    config.write_text(TRAIN_CONFIG.replace("[eval]", f'[eval]\nclip_model = "{clip}"'))
    return {"root": root, "files": files, "pairs": pairs, "clip": clip, "config": config}


def train_command(inputs: dict, host: Path, methods: str, out: Path, *extra: str) -> int:
    """`modecl train` of ``methods`` on ``host`` with :func:`train_inputs`' files and config
    into ``out``; its exit code."""
    from modecl.cli import main  # here: the fixtures' other users need no command line

    argv = ["train", "--model", str(host), "--tasks", *map(str, inputs["files"])]
    argv += ["--methods", methods, "--out", str(out), "--kd-data", str(inputs["pairs"])]
    return main([*argv, "--config", str(inputs["config"]), *extra])


def write_concepts(folder: Path) -> Path:
    """A concepts file: "red" and "blue", two prompts each, three reference PNGs each (drawn
    as `write_tasks` draws its images)."""
    lines = []
    for color, prompts in (
        ("red", ["draw red", "red circle"]),
        ("blue", ["draw blue", "blue square"]),
    ):
        images = folder / "concepts" / color
        images.mkdir(parents=True, exist_ok=True)
        for i in range(3):
            _png(images / f"{i}.png", color, square=i % 2 == 0)
        lines.append({"concept": color, "prompts": prompts, "images": f"concepts/{color}"})
    (folder / "concepts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder / "concepts.jsonl"


CLIP_SIZE = 16  # the tiny CLIP's image side, in pixels


def write_tiny_clip(directory: Path) -> Path:
    """A tiny random CLIP with its processor, saved as a real checkpoint would be."""
    specials = ["<|startoftext|>", "<|endoftext|>"]
    words = [c + suffix for c in string.ascii_lowercase for suffix in ("", "</w>")]
    clip_tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(specials + words)}, merges=[])
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": CLIP_SIZE}, crop_size={"height": CLIP_SIZE, "width": CLIP_SIZE}
        ),
        tokenizer=clip_tokenizer,
    )
    small = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2}
    small |= {"num_attention_heads": 4}
    config = CLIPConfig(
        text_config={**small, "vocab_size": len(clip_tokenizer), "max_position_embeddings": 32},
        vision_config={**small, "image_size": CLIP_SIZE, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


# --- launches -----------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a `modecl` subprocess: one thread, and this checkout's `src` and
    `tests` ahead of the inherited path (a worktree's, not an editable install's elsewhere)."""
    path = [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in path if p),
        **extra,
    }


# DeepSpeed ZeRO-2 on CPU processes, chosen as `accelerate launch` chooses it (README,
# "Scale-out"): the environment of a launch under it.
ZERO2 = {
    "ACCELERATE_USE_DEEPSPEED": "true",
    "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
    "DS_ACCELERATOR": "cpu",
}


def deepspeed_accelerator(processes: int = 2, **plugin: object) -> SimpleNamespace:
    """What the training loop reads of an Accelerator under DeepSpeed: accelerate's own
    plugin (its config as `accelerate launch` builds it from ``plugin``'s options), the
    number of processes and this one's index."""
    state = SimpleNamespace(deepspeed_plugin=DeepSpeedPlugin(**plugin))
    return SimpleNamespace(state=state, num_processes=processes, process_index=0)


def processes_at(rank: int, count: int) -> Processes:
    """Process `rank` of `count`, as the run's :class:`Processes` tells it (what of an
    Accelerator they read), without starting any."""
    return Processes(SimpleNamespace(process_index=rank, num_processes=count))


def torchrun(processes: int = 2) -> list[str]:
    """The start of a command line that runs a script or module in `processes` processes."""
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*run, "--nproc_per_node", str(processes)]


def torchrun_node(node: int, port: int, nodes: int = 2) -> list[str]:
    """The start of node `node`'s command line of a launch over `nodes` nodes of one process
    each, here on one machine: the rendezvous at 127.0.0.1:`port`, node 0's."""
    run = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes)]
    run += ["--node_rank", str(node), "--nproc_per_node", "1"]
    return [*run, "--master_addr", "127.0.0.1", "--master_port", str(port)]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- the tiny digits study ----------------------------------------------------------------

BENCH_TASKS = ["parity", "spatial"]
BENCH_METHODS = ["seq-lora", "mode", "replay"]


def tiny_study(**overrides: object) -> dict:
    """The tiny digits study as config data: the tiny host (gate off), two tasks, three
    methods, one short epoch."""
    host = {k: dict(v) for k, v in TINY.items()} | {"gate": {"captioning": 0.0, "generation": 0.0}}
    data = {
        "host": host,
        "tasks": BENCH_TASKS,
        "methods": BENCH_METHODS,
        "continual": {
            "adapter": {"rank": 2, "num_experts": 2},
            "train": {"epochs": 1, "batch_size": 16, "max_train_samples": 32},
            "distill": {"batch_size": 4},
            "replay": {"buffer_size": 8, "per_batch": 4},
        },
        "eval": {"samples_per_digit": 2, "max_test_samples": 20},
    }
    return data | overrides


def tiny_run(**overrides: object) -> RunConfig:
    return from_dict(RunConfig, tiny_study(**overrides))


def toml(data: dict, section: str = "") -> str:
    """Config data (tables of numbers, strings and lists of them) as TOML text."""
    lines = [f"[{section}]"] if section else []
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    lines += [f"{k} = {json.dumps(v)}" for k, v in data.items() if k not in tables]
    text = "\n".join(lines) + "\n"
    for key, table in tables.items():
        text += toml(table, f"{section}.{key}" if section else key)
    return text
