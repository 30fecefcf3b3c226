"""Image token ids read from host configs, and the image mask."""

from __future__ import annotations

import pytest
import torch
from transformers import ChameleonConfig, Emu3Config, LlamaConfig

from modecl.core.modality import image_mask, image_token_ids


def chameleon_vocabulary() -> dict[str, int]:
    """A Chameleon-style vocabulary_map: codes named IMGIMG<digits as letters>Z, as in the hub."""
    vocabulary = {f"tok{i}": i for i in range(30)}
    vocabulary.update({"<image>": 30, "<eoss>": 31, "<racm3:break>": 32})
    for i in range(33, 40):
        vocabulary["IMGIMG" + "".join(chr(ord("A") + int(c)) for c in str(i)) + "Z"] = i
    return vocabulary


def emu3_vocabulary() -> dict[str, int]:
    vocabulary = {f"tok{i}": i for i in range(20)}
    vocabulary.update({"<|image start|>": 20, "<|image end|>": 21, "<|image token|>": 22})
    vocabulary.update({"<|extra_200|>": 23, "<|extra_201|>": 24, "<image>": 25})
    vocabulary.update({f"<|visual token {i:06d}|>": 26 + i for i in range(5)})
    return vocabulary


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        # the digits model: the attribute wins, whatever its order
        (LlamaConfig(vocab_size=50, image_token_ids=[44, 40, 41, 42, 43]), [40, 41, 42, 43, 44]),
        # Chameleon: 7 IMGIMG codes plus <image>, <eoss>, <racm3:break>
        (
            ChameleonConfig(vocab_size=40, vocabulary_map=chameleon_vocabulary()),
            list(range(30, 40)),
        ),
        # Emu3: 5 visual tokens plus its six image markers
        (Emu3Config(vocabulary_map=emu3_vocabulary()), list(range(20, 31))),
    ],
    ids=["digits-llama", "chameleon", "emu3"],
)
def test_image_token_ids_from_config(config, expected):
    assert image_token_ids(config) == expected


def test_chameleon_ids_follow_the_map_not_constants():
    vocabulary = {name: token_id + 100 for name, token_id in chameleon_vocabulary().items()}
    config = ChameleonConfig(vocab_size=140, vocabulary_map=vocabulary)
    assert image_token_ids(config) == list(range(130, 140))


@pytest.mark.parametrize(
    ("config", "class_name"),
    [
        (LlamaConfig(vocab_size=50), "LlamaConfig"),
        (ChameleonConfig(vocab_size=30, vocabulary_map={"a": 1, "<image>": 2}), "ChameleonConfig"),
    ],
)
def test_config_without_image_tokens_is_an_error(config, class_name):
    with pytest.raises(ValueError, match=f"{class_name} defines no image tokens"):
        image_token_ids(config)


@pytest.mark.parametrize("ids", [[3, 7, 8], [0], []])
def test_image_mask_matches_membership(ids):
    input_ids = torch.randint(0, 10, (3, 17), generator=torch.Generator().manual_seed(0))
    expected = torch.tensor([[t in ids for t in row] for row in input_ids.tolist()])
    mask = image_mask(input_ids, ids)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, expected)
