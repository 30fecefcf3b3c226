"""Chameleon / Anole's VQGAN decoder as a diffusers `VQModel`: drawn codes back to pixels.

transformers ships Chameleon's VQ encoder only (its converter drops the decoder). The decoder
weights are in the original release's `tokenizer/vqgan.ckpt` (taming-transformers layout:
``{"state_dict": {"decoder.up.N.block.M...", "quantize.embedding.weight",
"post_quant_conv.*", ...}}``) and, in the same layout under ``model.vqmodel.``, in converted
Anole checkpoints (e.g. `leloy/Anole-7b-v0.1-hf`), which transformers reads past. Either loads
strictly into a decoder-only `VQModel` built from the host's `config.vq_config`:

    vqgan = load_vqgan(model, "leloy/Anole-7b-v0.1-hf")  # or ".../tokenizer/vqgan.ckpt"
    pixels = decode_codes(vqgan, code_indices(model, drawn_codes).view(-1, 32, 32))
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from diffusers import VQModel
from huggingface_hub import snapshot_download
from safetensors import safe_open
from torch import nn

__all__ = ["code_indices", "decode_codes", "load_vqgan", "taming_to_diffusers", "vqgan_model"]

PREFIX = "model.vqmodel."  # where a converted checkpoint keeps the VQGAN
PARTS = ("decoder.", "quantize.", "post_quant_conv.")  # what decoding needs of a VQGAN
NORM_GROUPS = 32  # taming's GroupNorm


def vqgan_model(vq_config: Any) -> VQModel:
    """A decoder-only `VQModel` (no encoder, no quant_conv) of a Chameleon `vq_config`."""
    levels = len(vq_config.channel_multiplier)
    attention = vq_config.attn_type == "vanilla"
    attended = set(vq_config.attn_resolutions or []) if attention else set()
    # diffusers' up block k is taming's level levels-1-k, at resolution // 2**level
    up = [
        "AttnUpDecoderBlock2D"
        if vq_config.resolution // 2 ** (levels - 1 - k) in attended
        else "UpDecoderBlock2D"
        for k in range(levels)
    ]
    vqgan = VQModel(
        in_channels=vq_config.in_channels,
        out_channels=getattr(vq_config, "out_channels", vq_config.in_channels),
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=tuple(up),
        block_out_channels=tuple(vq_config.base_channels * m for m in vq_config.channel_multiplier),
        layers_per_block=vq_config.num_res_blocks,
        latent_channels=vq_config.latent_channels,
        sample_size=vq_config.resolution,
        num_vq_embeddings=vq_config.num_embeddings,
        norm_num_groups=NORM_GROUPS,
        vq_embed_dim=vq_config.embed_dim,
        mid_block_add_attention=attention,
        lookup_from_codebook=True,
    )
    vqgan.encoder = vqgan.quant_conv = None  # transformers' own encoder makes the codes
    return vqgan.eval()


_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_UP = re.compile(r"decoder\.up\.(\d+)\.(block|attn|upsample)\.(.+)")


def _block(kind: str, rest: str) -> tuple[str, bool]:
    """A resnet's or attention's parameter name in diffusers, and whether it was a 1x1 conv
    that diffusers holds as a linear layer."""
    if kind == "attn":
        layer, _, param = rest.partition(".")
        return f"{_ATTENTION.get(layer, layer)}.{param}", layer in ("q", "k", "v", "proj_out")
    return re.sub(r"^nin_shortcut\.", "conv_shortcut.", rest), False


def taming_to_diffusers(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """Rename a taming VQGAN's decoder, quantizer and post_quant_conv tensors to diffusers'
    `VQModel` names, for `levels` resolutions (taming's `up.i` is diffusers'
    `up_blocks.{levels-1-i}`). A name matching no rule is kept, for the load to report it."""
    out = {}
    for key, tensor in state.items():
        name, linear = key, False
        if match := _UP.fullmatch(key):
            level, kind, rest = match.groups()
            block = f"decoder.up_blocks.{levels - 1 - int(level)}"
            if kind == "upsample":
                name = f"{block}.upsamplers.0.{rest}"
            else:
                index, _, rest = rest.partition(".")
                rest, linear = _block(kind, rest)
                group = "attentions" if kind == "attn" else "resnets"
                name = f"{block}.{group}.{index}.{rest}"
        elif match := re.fullmatch(r"decoder\.mid\.(block|attn)_(\d)\.(.+)", key):
            kind, number, rest = match.groups()
            rest, linear = _block(kind, rest)
            group = "attentions" if kind == "attn" else "resnets"
            name = f"decoder.mid_block.{group}.{int(number) - 1}.{rest}"
        elif key.startswith("decoder.norm_out."):
            name = key.replace("decoder.norm_out.", "decoder.conv_norm_out.")
        out[name] = tensor.flatten(1) if linear and tensor.ndim == 4 else tensor
    return out


def _checkpoint_tensors(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The VQGAN decoder tensors of a converted checkpoint (local folder or hub id), read from
    its safetensors files, in the taming layout without the ``model.vqmodel.`` prefix."""
    folder = Path(checkpoint)
    if not folder.is_dir():  # a hub id: the files from_pretrained put in the cache
        folder = Path(snapshot_download(str(checkpoint), allow_patterns=["*.safetensors"]))
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as opened:
            for key in opened.keys():  # noqa: SIM118 (safe_open is no mapping)
                if key.startswith(PREFIX) and key[len(PREFIX) :].startswith(PARTS):
                    state[key[len(PREFIX) :]] = opened.get_tensor(key)
    return state


def _ckpt_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The decoder, quantizer and post_quant_conv tensors of a taming `vqgan.ckpt`."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or "state_dict" not in saved:
        raise ValueError(f"{path}: no 'state_dict' in it (a taming-transformers VQGAN checkpoint)")
    return {k: v for k, v in saved["state_dict"].items() if k.startswith(PARTS)}


def load_vqgan(model: nn.Module, source: str | Path) -> VQModel | None:
    """The VQGAN decoder of Chameleon `model` (float32, on the model's device) with the
    weights of `source`: a taming `vqgan.ckpt` file, or a converted checkpoint (a folder or
    hub id, as for `from_pretrained`).

    None when a converted checkpoint has no ``model.vqmodel.decoder.*`` tensors. Raises
    ValueError naming the source and the keys when the weights do not fit
    `model.config.vq_config` (a missing, unexpected or misshapen tensor)."""
    from_ckpt = Path(source).is_file()
    state = _ckpt_tensors(source) if from_ckpt else _checkpoint_tensors(source)
    if not from_ckpt and not any(k.startswith("decoder.") for k in state):
        return None
    decoder = vqgan_model(model.config.vq_config)
    levels = len(model.config.vq_config.channel_multiplier)
    try:
        decoder.load_state_dict(taming_to_diffusers(state, levels), strict=True)
    except RuntimeError as err:
        where = source if from_ckpt else f"{source} ({PREFIX}*)"
        raise ValueError(f"{where}: the VQGAN weights do not fit vq_config: {err}") from None
    return decoder.to(model.device)


def code_indices(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Chameleon image-code token ids -> codebook indices, by transformers' own mapping
    (`vocabulary_mapping.bpe2img`); ValueError on any id that names no code."""
    bpe2img: dict[int, int] = model.model.vocabulary_mapping.bpe2img
    ids, codes = torch.tensor(list(bpe2img)), torch.tensor(list(bpe2img.values()))
    if not torch.isin(tokens.cpu(), ids).all():
        raise ValueError("tokens hold ids that are no Chameleon image code")
    table = torch.zeros(int(ids.max()) + 1, dtype=torch.long)
    table[ids] = codes
    return table[tokens.cpu()].to(tokens.device)


@torch.no_grad()
def decode_codes(vqgan: VQModel, indices: torch.Tensor) -> torch.Tensor:
    """Pixels `[B, 3, H, W]` (about [-1, 1]) of codebook indices `[B, h, w]`: codebook
    vectors, post_quant_conv, decoder."""
    batch, height, width = indices.shape
    shape = (batch, height, width, vqgan.config.vq_embed_dim)
    flat = indices.reshape(-1).to(vqgan.device)
    return vqgan.decode(flat, force_not_quantize=True, shape=shape).sample
