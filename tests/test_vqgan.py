"""Chameleon drawings to pixels: a taming VQGAN decoder loaded into diffusers' `VQModel`.

The reference is a small taming-layout VQGAN decoder written here from the architecture's
definition, with random weights; its state dict is what `vqgan.ckpt` and a converted Anole
checkpoint (under ``model.vqmodel.``) hold.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoModelForImageTextToText,
    ChameleonConfig,
    ChameleonForConditionalGeneration,
)

from modecl.cli import main
from modecl.core.results import read_results
from modecl.hosts.host import decode_image, draw_image_tokens, image_tokens
from modecl.hosts.tasks import HostFormat, ImageTokenizer, load_pairs
from modecl.hosts.vqgan import code_indices, load_vqgan
from modecl.hosts.world import load_host
from tests.fixtures import (
    CODES,
    END,
    PIXELS,
    TRAIN_CONFIG,
    tiny_chameleon,
    write_concepts,
    write_host,
    write_tasks,
    write_tiny_clip,
)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class Resnet(nn.Module):
    """norm, swish, 3x3 conv, twice; a 1x1 conv on the skip path when the width changes."""

    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = group_norm(channels_in), group_norm(channels_out)
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, padding=1)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1)
        if channels_in != channels_out:
            self.nin_shortcut = nn.Conv2d(channels_in, channels_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class Attention(nn.Module):
    """Single-head self-attention over the pixels, q, k, v and the output as 1x1 convs."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in "qkvo")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        y = self.norm(x)
        q, k, v = (conv(y).view(batch, channels, -1) for conv in (self.q, self.k, self.v))
        weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(channels), dim=-1)  # [B, n, n]
        out = (v @ weights.transpose(1, 2)).view(batch, channels, height, width)
        return x + self.proj_out(out)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """conv_in; mid (resnet, attention, resnet); `up[level]` from the deepest level to 0,
    each `num_res_blocks + 1` resnets (attention after each at `attn_resolutions`) and an
    upsampling but at level 0; norm, swish, conv_out."""

    def __init__(self, vq: Any) -> None:
        super().__init__()
        widths = [vq.base_channels * m for m in vq.channel_multiplier]
        width = widths[-1]
        self.conv_in = nn.Conv2d(vq.latent_channels, width, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1 = Resnet(width, width), Attention(width)
        self.mid.block_2 = Resnet(width, width)
        levels: dict[int, nn.Module] = {}
        for level in reversed(range(len(widths))):
            up = levels[level] = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(vq.num_res_blocks + 1):
                up.block.append(Resnet(width, widths[level]))
                width = widths[level]
                if vq.resolution // 2**level in (vq.attn_resolutions or []):
                    up.attn.append(Attention(width))
            if level > 0:
                up.upsample = Upsample(width)
        self.up = nn.ModuleList([levels[level] for level in range(len(widths))])
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, vq.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(range(len(self.up))):
            up = self.up[level]
            for i, block in enumerate(up.block):
                h = block(h)
                if len(up.attn):
                    h = up.attn[i](h)
            if level > 0:
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class TamingVQGAN(nn.Module):
    """A VQGAN's decoding half in taming-transformers' names: codebook, post_quant_conv,
    decoder; random weights (every parameter moved off its initial value)."""

    def __init__(self, vq: Any, seed: int = 1) -> None:
        super().__init__()
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(vq.num_embeddings, vq.embed_dim)
        self.post_quant_conv = nn.Conv2d(vq.embed_dim, vq.latent_channels, 1)
        self.decoder = Decoder(vq)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
        self.eval()

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Pixels of codebook indices `[B, h, w]`."""
        z = self.quantize.embedding(indices).permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(z))


def chameleon(**vq: Any) -> ChameleonForConditionalGeneration:
    """test_hf_host's tiny Chameleon with `vq` in its vq_config and its codes' ids reversed
    (code k is id CODES[15 - k]): the ids in sorted order are not the codes."""
    config = tiny_chameleon().config.to_dict()
    config["vq_config"] |= vq
    vocabulary = config["vocabulary_map"]
    for name in [n for n in vocabulary if n.startswith("IMGIMG")]:
        vocabulary[name] = CODES[-1] + CODES[0] - vocabulary[name]
    torch.manual_seed(0)
    return ChameleonForConditionalGeneration(ChameleonConfig.from_dict(config)).eval()


# The tiny host's VQGAN (two levels, 4x4 codes), and one of three levels (2x2 codes) with
# attention in its deepest level's up block, and latents wider than the codebook vectors.
VARIANTS = {
    "two-levels": {},
    "three-levels": {
        "channel_multiplier": [1, 1, 2],
        "attn_resolutions": [128],  # 512 // 2**2
        "latent_channels": 8,
        "num_res_blocks": 1,
    },
}


@pytest.fixture(params=list(VARIANTS))
def host(request) -> tuple[ChameleonForConditionalGeneration, TamingVQGAN, torch.Tensor]:
    """A tiny Chameleon, the reference VQGAN of its vq_config, and two grids of codes."""
    model = chameleon(**VARIANTS[request.param])
    side = PIXELS // 2 ** (len(model.config.vq_config.channel_multiplier) - 1)
    codes = torch.randint(16, (2, side, side), generator=torch.Generator().manual_seed(2))
    return model, TamingVQGAN(model.config.vq_config), codes


def drawn_span(model: nn.Module, codes: torch.Tensor) -> torch.Tensor:
    """The span `draw_image_tokens` returns for these codes: their ids, the end of image."""
    ids = model.model.vocabulary_mapping.convert_img2bpe(codes.flatten(1))
    return torch.cat([ids.long(), torch.full((len(ids), 1), END["chameleon"])], dim=1)


def save_ckpt(reference: TamingVQGAN, path: Path, **extra: torch.Tensor) -> Path:
    torch.save({"state_dict": {**reference.state_dict(), **extra}, "global_step": 7}, path)
    return path


def write_decoder(folder: Path, reference: TamingVQGAN) -> None:
    """Put the reference's tensors into a saved checkpoint as a converted Anole holds them."""
    file = folder / "model.safetensors"
    state = load_file(file) | {
        f"model.vqmodel.{k}": v.contiguous() for k, v in reference.state_dict().items()
    }
    save_file(state, file, metadata={"format": "pt"})


def test_a_taming_vqgan_ckpt_decodes_as_the_reference(host, tmp_path):
    model, reference, codes = host
    # The encoder's, quant_conv's and the GAN loss's tensors are no part of decoding.
    ignored = {k: torch.zeros(2) for k in ("encoder.conv_in.weight", "quant_conv.bias", "loss.w")}
    ckpt = save_ckpt(reference, tmp_path / "vqgan.ckpt", **ignored)
    vqgan = load_vqgan(model, ckpt)
    pixels = decode_image(model, drawn_span(model, codes), vqgan)
    assert pixels.shape == (2, 3, PIXELS, PIXELS)
    torch.testing.assert_close(pixels, reference.decode(codes), atol=1e-5, rtol=1e-5)
    assert pixels.std() > 0.1  # the pixels differ, and so a wrong weight would show
    with pytest.raises(NotImplementedError, match="encoder only"):
        decode_image(model, drawn_span(model, codes))
    with pytest.raises(ValueError, match="image span"):  # 3 codes: no square grid
        decode_image(model, drawn_span(model, codes)[:, -4:], vqgan)


def test_loading_is_strict_and_names_the_key(tmp_path):
    model = chameleon()
    state = TamingVQGAN(model.config.vq_config).state_dict()
    cases = {  # the weights, the error's kind and the key it names
        "missing": (
            {k: v for k, v in state.items() if "up.1.upsample" not in k},
            "Missing",
            "decoder.up_blocks.0.upsamplers.0.conv.weight",
        ),
        "unexpected": (
            state | {"decoder.up.0.block.3.conv1.bias": torch.zeros(32)},
            "Unexpected",
            "decoder.up_blocks.1.resnets.3.conv1.bias",
        ),
        "misshapen": (
            state | {"quantize.embedding.weight": torch.zeros(32, 4)},
            "size mismatch",
            "quantize.embedding.weight",
        ),
    }
    for case, (weights, kind, key) in cases.items():
        path = tmp_path / f"{case}.ckpt"
        torch.save({"state_dict": weights}, path)
        with pytest.raises(ValueError, match=kind) as error:
            load_vqgan(model, path)
        assert str(path) in str(error.value) and key in str(error.value), case
    torch.save(state, tmp_path / "bare.ckpt")
    with pytest.raises(ValueError, match="no 'state_dict'"):
        load_vqgan(model, tmp_path / "bare.ckpt")


def test_a_converted_checkpoints_own_decoder_weights_give_the_same_pixels(host, tmp_path):
    model, reference, codes = host
    folder = tmp_path / "host"
    model.save_pretrained(folder)
    assert load_vqgan(model, folder) is None  # transformers saves no decoder
    write_decoder(folder, reference)
    loaded = AutoModelForImageTextToText.from_pretrained(folder).eval()
    assert torch.equal(
        loaded.model.vqmodel.quantize.embedding.weight, reference.quantize.embedding.weight
    )
    from_checkpoint = load_vqgan(loaded, folder)
    from_ckpt = load_vqgan(model, save_ckpt(reference, tmp_path / "vqgan.ckpt"))
    pixels = decode_image(loaded, drawn_span(loaded, codes), from_checkpoint)
    assert torch.equal(pixels, decode_image(model, drawn_span(model, codes), from_ckpt))
    torch.testing.assert_close(pixels, reference.decode(codes), atol=1e-5, rtol=1e-5)


def test_image_tokens_map_back_to_the_encoders_codebook_indices():
    model = chameleon()
    images = torch.rand(4, 3, PIXELS, PIXELS, generator=torch.Generator().manual_seed(3)) * 2 - 1
    tokens = image_tokens(model, images)
    expected = model.model.vqmodel.encode(images).image_tokens.view(4, -1)
    assert torch.equal(code_indices(model, tokens), expected)
    assert len(expected.unique()) > 2
    assert not torch.equal(tokens - CODES[0], expected)  # the ids' sorted order is not the codes
    with pytest.raises(ValueError, match="no Chameleon image code"):
        code_indices(model, torch.tensor([[CODES[0], END["chameleon"]]]))


def test_modecl_train_writes_and_scores_chameleon_drawings(tmp_path):
    """The pre-trained stage's PNGs are the reference's pixels of the host's greedy drawings;
    the concepts' drawings are decoded and scored too."""
    host = write_host("chameleon", tmp_path / "host")
    reference = TamingVQGAN(tiny_chameleon().config.vq_config)
    write_decoder(host, reference)
    files, pairs = write_tasks(tmp_path / "data")
    clip = write_tiny_clip(tmp_path / "clip")
    config = tmp_path / "train.toml"
    config.write_text(
        TRAIN_CONFIG.replace("[eval]", f'[eval]\nclip_model = "{clip}"\ntemperature = 0.0')
    )
    out = tmp_path / "run"
    argv = ["train", "--model", str(host), "--tasks", *map(str, files), "--methods", "seq-lora"]
    argv += ["--kd-data", str(pairs), "--config", str(config), "--out", str(out)]
    assert main([*argv, "--concepts", str(write_concepts(tmp_path / "data"))]) == 0
    seed = read_results(out / "results.json").per_seed[0]
    stages = [seed.pretrained, *seed.methods["seq-lora"].stages]
    folders = ["pretrained", "seq-lora/stage1", "seq-lora/stage2"]
    for stage, name in zip(stages, folders, strict=True):
        generation, folder = stage.measures["pairs_generation"], out / "images" / "seed0" / name
        assert generation["images"] == [str(folder / f"{i}.png") for i in range(2)]
        assert sorted(folder.glob("*.png")) == [folder / "0.png", folder / "1.png"]
        assert generation["clip"]["status"] == "ok"
        assert -1 <= stage.measures["pairs_clip_image_own"] <= 1
        concepts = stage.measures["concepts_generation"]
        assert concepts["folder"] == str(folder / "concepts")
        assert len(list((folder / "concepts").rglob("*.png"))) == concepts["drawn"] == 8
        assert concepts["clip"]["status"] == "ok"
        assert -1 <= stage.measures["concepts_clip_image_all"] <= 1
    model, tokenizer = load_host(str(host), "float32", torch.device("cpu"))
    fmt = HostFormat.from_model(model, tokenizer)
    for i, pair in enumerate(load_pairs(pairs, ImageTokenizer(model, PIXELS)).test[:2]):
        prompt = torch.tensor([fmt.draw_prompt(pair)])
        drawn = draw_image_tokens(model, prompt, (1, 16), temperature=0)
        pixels = reference.decode(code_indices(model, drawn[:, :-1]).view(1, 4, 4))[0]
        expected = ((pixels.clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy()
        with Image.open(out / "images" / "seed0" / "pretrained" / f"{i}.png") as saved:
            assert np.abs(np.asarray(saved).astype(float) - expected).max() <= 1, i
    report = (out / "report.md").read_text()
    assert "figures/samples_seq-lora.png" in report
    assert (out / "figures" / "samples_seq-lora.png").exists()


def test_host_vqgan_errors(tmp_path, capsys):
    """A missing file is caught before the model loads; a VQGAN for Emu3, or one that does not
    fit the host, once it loaded."""
    files = write_tasks(tmp_path / "data")[0]
    model = tiny_chameleon()
    wrong = TamingVQGAN(model.config.vq_config)
    wrong.quantize.embedding = nn.Embedding(32, 4)
    ckpt = save_ckpt(wrong, tmp_path / "vqgan.ckpt")
    cases = [
        ("chameleon", tmp_path / "nowhere.ckpt", "nowhere.ckpt: file not found"),
        ("emu3", ckpt, "host.vqgan: only a Chameleon / Anole host takes a VQGAN decoder"),
        ("chameleon", ckpt, "quantize.embedding.weight"),
    ]
    for family, vqgan, message in cases:
        host = tmp_path / family
        if not host.exists():
            write_host(family, host)
        config = tmp_path / "train.toml"
        config.write_text(TRAIN_CONFIG.replace("[host]", f'[host]\nvqgan = "{vqgan}"'))
        out = tmp_path / f"out-{family}"
        argv = ["train", "--model", str(host), "--tasks", *map(str, files), "--out", str(out)]
        assert main([*argv, "--method", "seq-lora", "--config", str(config)]) == 2
        assert message in capsys.readouterr().err
        assert not (out / "run.json").exists()
