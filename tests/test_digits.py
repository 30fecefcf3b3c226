"""The embedded digits study: split, codebook, vocabulary, tasks, preview, decoding, gate."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from modecl.core.adapters import AdapterConfig, adapter_layers, attach_adapters, pass_kind
from modecl.core.evaluate import answer_log_likelihoods
from modecl.core.generation import generate
from modecl.core.sequences import IGNORE
from modecl.digits import pretrain
from modecl.digits.codebook import Codebook
from modecl.digits.config import DataConfig, DigitsConfig
from modecl.digits.data import DIGIT_WORDS, load_pools
from modecl.digits.format import understand_example
from modecl.digits.model import build_model
from modecl.digits.pretrain import GateError, check_gate, load_or_pretrain
from modecl.digits.tasks import (
    NUMBER_WORDS,
    TASK_RULES,
    builtin_tasks,
    preview_samples,
    statements,
    words,
)
from modecl.digits.vocab import UnknownWordError, Vocabulary
from tests.conftest import tiny_config


def test_split_is_disjoint_stratified_and_fixed():
    pools = load_pools()
    parts = [pools.pretrain, pools.pretrain_val, pools.train, pools.test]
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist())) == len(pools.labels) == 1797
    overall = np.bincount(pools.labels, minlength=10) / len(pools.labels)
    for part in parts:
        share = np.bincount(pools.labels[part], minlength=10) / len(part)
        assert np.abs(share - overall).max() < 0.02
    assert abs(len(pools.test) / 1797 - 0.2) < 0.01
    assert abs((len(pools.pretrain) + len(pools.pretrain_val)) / 1797 - 0.6) < 0.01
    again = load_pools()
    assert np.array_equal(again.test, pools.test)
    assert not np.array_equal(load_pools(DataConfig(seed=1)).test, pools.test)


def test_codebook_round_trip(digits):
    cb = digits.codebook
    codes = np.random.default_rng(0).integers(0, cb.size, size=(5, 16))
    assert np.array_equal(cb.encode(cb.decode(codes)), codes)
    images = digits.pools.images[digits.pools.test[:50]]
    recon = cb.decode(cb.encode(images))
    assert recon.shape == images.shape
    assert np.abs(recon - images).mean() < np.abs(images - images.mean()).mean() / 2


def test_codebook_save_load(digits, tmp_path):
    digits.codebook.save(tmp_path / "cb.npy")
    assert np.array_equal(Codebook.load(tmp_path / "cb.npy").centroids, digits.codebook.centroids)


def test_vocabulary_modality_lookup(digits):
    vocab = digits.vocab
    ids = torch.arange(len(vocab))
    mask = vocab.image_mask(ids)
    assert mask.nonzero().flatten().tolist() == vocab.image_token_ids
    assert mask[vocab.boi_id] and mask[vocab.eoi_id]
    assert not mask[[vocab.pad_id, vocab.bos_id, vocab.eos_id, vocab.sep_id]].any()
    assert not mask[vocab.word_id("seven")]
    assert len(vocab.image_code_ids) == digits.codebook.size
    assert Vocabulary.from_json(vocab.to_json()) == vocab


def test_vocabulary_unknown_word_is_named(digits):
    with pytest.raises(UnknownWordError, match="'zebra'"):
        digits.vocab.encode_words("draw a zebra")


def test_vocabulary_has_every_answer_word_and_text_stream_uses_every_word():
    vocab_words = set(words())
    for rule in TASK_RULES.values():
        assert set(rule.answers) <= vocab_words
    assert set(NUMBER_WORDS) <= vocab_words
    stream = {w for line in statements() for w in line.split()}
    assert stream == vocab_words


@pytest.fixture(scope="module")
def tasks(digits):
    return {t.name: t for t in digits.tasks(list(TASK_RULES))}


def _pixels(digits, sample):
    return digits.pools.images[sample.index]


def test_task_answers_follow_labels_and_pixels(digits, tasks):
    pools = digits.pools
    for name, task in tasks.items():
        assert task.train and task.test
        assert {s.index for s in task.train} <= set(pools.train.tolist())
        assert {s.index for s in task.test} <= set(pools.test.tolist())
        for s in [*task.train, *task.test]:
            label = int(pools.labels[s.index])
            assert s.label == label and s.answer in task.answers
            if name == "parity":
                assert s.answer == ("even" if label % 2 == 0 else "odd")
            elif name == "comparison":
                assert s.answer == ("yes" if label > 4 else "no")
            elif name == "arithmetic":
                assert s.answer == NUMBER_WORDS[label + 3]
            elif name == "mirrored":
                assert s.answer == DIGIT_WORDS[label]


def test_spatial_recomputed_from_pixels_with_margin(digits, tasks):
    margin = digits.config.spatial_margin
    kept = {s.index: s.answer for s in tasks["spatial"].test}
    for i in digits.pools.test:
        img = digits.pools.images[i]
        top, bottom = img[:4].sum(), img[4:].sum()
        if abs(top - bottom) < margin * (top + bottom):
            assert i not in kept
        else:
            assert kept[i] == ("top" if top > bottom else "bottom")
    assert 0 < len(kept) < len(digits.pools.test)


def test_mirrored_image_is_the_flipped_original(digits, tasks):
    for s in tasks["mirrored"].test[:40]:
        flipped = _pixels(digits, s)[:, ::-1]
        assert digits.codebook.encode(flipped[None])[0].tolist() == s.codes.tolist()
    plain = tasks["parity"].test[0]
    assert digits.codebook.encode(_pixels(digits, plain)[None])[0].tolist() == plain.codes.tolist()


def test_preview_uses_only_preview_digits_and_pretrain_pool(digits):
    samples = preview_samples(digits.pools, digits.codebook, [0, 3], digits.config.spatial_margin)
    assert {s.label for s in samples} == {0, 3}
    assert {s.index for s in samples} <= set(digits.pools.pretrain.tolist())
    assert {s.question for s in samples} == {r.question for r in TASK_RULES.values()}
    assert preview_samples(digits.pools, digits.codebook, [], 0.1) == []


def test_unknown_task_lists_valid_ones(digits):
    with pytest.raises(ValueError, match=r"unknown task.*parity"):
        builtin_tasks(digits.pools, digits.codebook, ["parity", "colour"])


def test_constrained_generation_emits_only_image_codes(digits):
    model = build_model(digits.vocab, tiny_config().model, seed=0)
    prompts = torch.tensor([[digits.vocab.bos_id, digits.vocab.boi_id]] * 8)
    gen = torch.Generator().manual_seed(0)
    tokens = generate(
        model,
        prompts,
        16,
        allowed=digits.vocab.image_code_ids,
        temperature=5.0,
        generator=gen,
    )
    assert tokens.shape == (8, 16)
    assert set(tokens.flatten().tolist()) <= set(digits.vocab.image_code_ids)
    free = generate(model, prompts, 16, temperature=5.0, generator=gen)
    assert not set(free.flatten().tolist()) <= set(digits.vocab.image_code_ids)


def test_same_seed_same_pretrained_weights_and_cache(tmp_path):
    config = tiny_config()
    first = load_or_pretrain(config, tmp_path / "a", progress=False)
    second = load_or_pretrain(config, tmp_path / "b", progress=False)
    for (name, p), q in zip(
        first.model.state_dict().items(), second.model.state_dict().values(), strict=True
    ):
        assert torch.equal(p, q), name
    cached = load_or_pretrain(config, tmp_path / "a", progress=False)
    assert cached.log["cached"] and not first.log["cached"]
    for p, q in zip(first.model.parameters(), cached.model.parameters(), strict=True):
        assert torch.equal(p, q)
    other = load_or_pretrain(tiny_config(seed=1), tmp_path / "a", progress=False)
    assert not torch.equal(other.model.lm_head.weight, first.model.lm_head.weight)


def test_checkpoint_selection_keeps_the_widest_margin_to_the_nearer_gate(digits, monkeypatch):
    """Validation from eval_from_epoch, every eval_every epochs and at the last one; the host
    is the EMA weights of the evaluated epoch whose weaker skill clears its gate by most."""
    config = tiny_config(pretrain__epochs=5, pretrain__eval_from_epoch=2, pretrain__eval_every=2)
    # Margins to the 0.95 / 0.90 gate: min(-0.05, 0.09), min(0.02, 0.03), min(0.01, 0.09).
    scores = iter([(0.90, 0.99), (0.97, 0.93), (0.96, 0.99)])
    evaluated = []

    def scripted(digits, model, seed):
        evaluated.append(copy.deepcopy(model.state_dict()))
        return next(scores)

    monkeypatch.setattr(pretrain, "validation_scores", scripted)
    model, log = pretrain.train_host(dataclasses.replace(digits, config=config), progress=False)
    assert [h["epoch"] for h in log["history"] if "val_captioning" in h] == [2, 4, 5]
    assert log["selected_epoch"] == 4
    for name, value in model.state_dict().items():
        assert torch.equal(value, evaluated[1][name]), name
    assert not torch.equal(evaluated[1]["lm_head.weight"], evaluated[2]["lm_head.weight"])


def test_gate_names_each_failing_skill_and_the_shortfall():
    config = DigitsConfig()
    check_gate(config, 0.97, 0.93)
    with pytest.raises(GateError, match=r"captioning accuracy 0\.900 < 0\.930 \(short by 0\.030\)"):
        check_gate(config, 0.90, 0.93)
    with pytest.raises(GateError, match=r"generation.*short by 0\.300") as info:
        check_gate(config, 0.5, 0.6)
    assert "captioning" in str(info.value)


def test_candidate_scores_from_the_cache_equal_whole_sequences(digits):
    """Constrained scoring reuses each prompt's KV cache: the log-likelihoods of scoring
    every (prompt, candidate) sequence whole, questions of different lengths mixed."""
    model = build_model(digits.vocab, tiny_config().model, seed=0)
    attach_adapters(model, AdapterConfig(dropout=0.0))
    for layer in adapter_layers(model).values():  # adapters that change the outputs
        torch.nn.init.normal_(layer.lora_B, std=0.3)
    tasks = digits.tasks(["parity", "mirrored", "spatial"])  # questions of 6, 4 and 5 words
    samples = [s for t in tasks for s in t.test[:4]]
    candidates = ["yes", "no", "seven", "more than five"]  # tails of 2 to 4 tokens
    ours = answer_log_likelihoods(model, digits.format, samples, candidates, batch_size=5)
    for i, sample in enumerate(samples):
        for c, candidate in enumerate(candidates):
            example = understand_example(digits.vocab, sample.codes, sample.question, candidate)
            with pass_kind(model, "understand"):
                logits = model(torch.tensor([example.input_ids])).logits[0, :-1]
            labels = torch.tensor(example.labels[1:])
            kept = labels != IGNORE
            whole = logits.log_softmax(-1)[kept].gather(-1, labels[kept, None]).sum()
            assert ours[i, c].item() == pytest.approx(whole.item(), abs=1e-4)
    assert len({len(s.question.split()) for s in samples}) > 1  # padding was exercised
