"""A word-level vocabulary that holds text words and discrete image codes in one id space.

Layout: special tokens, then the image codes, then the words::

    0 <pad>  1 <bos>  2 <eos>  3 <sep>  4 <boi>  5 <eoi>  6.. image codes  .. words

The vocabulary is how every later component finds a token's modality: image codes and
the begin/end-of-image markers are ``image``; everything else is ``text``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

SPECIALS = ("<pad>", "<bos>", "<eos>", "<sep>", "<boi>", "<eoi>")


class UnknownWordError(KeyError):
    """A text uses a word the vocabulary does not hold."""

    def __str__(self) -> str:
        return str(self.args[0])


class Vocabulary:
    """Words plus ``codes`` image codes; see the module docstring for the id layout."""

    pad_id, bos_id, eos_id, sep_id, boi_id, eoi_id = range(len(SPECIALS))

    def __init__(self, words: Iterable[str], codes: int):
        self.words = list(dict.fromkeys(words))
        self.codes = codes
        self.code_offset = len(SPECIALS)
        self.word_offset = self.code_offset + codes
        self._word_ids = {w: self.word_offset + i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return self.word_offset + len(self.words)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Vocabulary)
            and self.words == other.words
            and self.codes == other.codes
        )

    @property
    def image_code_ids(self) -> list[int]:
        """Ids of the image codes alone (what may appear inside an image span)."""
        return list(range(self.code_offset, self.word_offset))

    @property
    def image_token_ids(self) -> list[int]:
        """Ids of modality ``image``: the codes and the begin/end-of-image markers."""
        return sorted([self.boi_id, self.eoi_id, *self.image_code_ids])

    def image_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool mask, True where a token is of modality ``image``."""
        is_code = (ids >= self.code_offset) & (ids < self.word_offset)
        return is_code | (ids == self.boi_id) | (ids == self.eoi_id)

    def word_id(self, word: str) -> int:
        try:
            return self._word_ids[word]
        except KeyError:
            raise UnknownWordError(
                f"word '{word}' is not in the vocabulary ({len(self.words)} words)"
            ) from None

    def encode_words(self, text: str) -> list[int]:
        """Whitespace-split, lower-cased words -> ids; an unknown word raises."""
        return [self.word_id(w) for w in text.lower().split()]

    def code_ids(self, codes: Sequence[int]) -> list[int]:
        return [self.code_offset + int(c) for c in codes]

    def image_span(self, codes: Sequence[int]) -> list[int]:
        return [self.boi_id, *self.code_ids(codes), self.eoi_id]

    def decode_words(self, ids: Iterable[int]) -> str:
        """Ids -> text, stopping at ``<eos>``; non-word ids show as their special name."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i >= self.word_offset:
                out.append(self.words[i - self.word_offset])
            elif i >= self.code_offset:
                out.append(f"<img{i - self.code_offset}>")
            else:
                out.append(SPECIALS[i])
        return " ".join(out)

    def to_json(self) -> str:
        return json.dumps({"words": self.words, "codes": self.codes})

    @classmethod
    def from_json(cls, text: str) -> Vocabulary:
        data = json.loads(text)
        return cls(data["words"], data["codes"])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        return cls.from_json(Path(path).read_text())
