import pytest
import torch
import torch.nn.functional as F

from modecl.core.distill import kd_mask, topk_kl


def _logits(*shape: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def _reference(teacher, student, mask, temperature, top_k):
    """Explicit per-position loop: gather the teacher's top-K, renormalise both, KL."""
    vocab = teacher.shape[-1]
    k = min(top_k, vocab)
    teacher = teacher.double().reshape(-1, vocab)
    student = student.double().reshape(-1, vocab)
    keep = torch.ones(teacher.shape[0], dtype=torch.bool) if mask is None else mask.reshape(-1)
    terms = []
    for t_row, s_row, kept in zip(teacher, student, keep, strict=True):
        if not kept:
            continue
        support = torch.topk(t_row, k).indices
        p = torch.softmax(t_row[support] / temperature, -1)
        log_q = torch.log_softmax(s_row[support] / temperature, -1)
        terms.append((p * (p.log() - log_q)).sum())
    if not terms:
        return torch.tensor(0.0, dtype=torch.float64)
    return torch.stack(terms).mean() * temperature**2


def test_zero_when_student_equals_teacher():
    logits = _logits(2, 5, 40, seed=0)
    assert topk_kl(logits, logits.clone(), top_k=8).item() == pytest.approx(0.0, abs=1e-7)


def test_full_support_matches_dense_kl_div():
    teacher, student = _logits(2, 4, 12, seed=1), _logits(2, 4, 12, seed=2)
    temperature = 2.0
    dense = (
        F.kl_div(
            F.log_softmax(student / temperature, -1),
            F.log_softmax(teacher / temperature, -1),
            log_target=True,
            reduction="none",
        )
        .sum(-1)
        .mean()
        * temperature**2
    )
    ours = topk_kl(teacher, student, temperature=temperature, top_k=256)  # K capped at 12
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(dense.item(), rel=1e-5)


def test_topk_matches_gather_renormalise_reference():
    teacher, student = _logits(3, 7, 50, seed=3), _logits(3, 7, 50, seed=4)
    for k in (1, 5, 17):
        expected = _reference(teacher, student, None, 2.0, k)
        assert topk_kl(teacher, student, top_k=k).item() == pytest.approx(expected.item(), rel=1e-5)
    # Restricting the support changes the value: the K < vocab path is really exercised.
    assert topk_kl(teacher, student, top_k=5).item() != pytest.approx(
        topk_kl(teacher, student, top_k=50).item(), rel=1e-3
    )


def test_chunked_equals_unchunked_in_value_and_gradient():
    teacher = _logits(2, 9, 30, seed=5).float()
    base = _logits(2, 9, 30, seed=6).float()
    mask = torch.rand(2, 9, generator=torch.Generator().manual_seed(7)) > 0.3
    results = []
    for chunk_size in (1, 3, 10_000):
        student = base.clone().requires_grad_(True)
        loss = topk_kl(teacher, student, mask, top_k=6, chunk_size=chunk_size)
        loss.backward()
        results.append((loss.detach(), student.grad))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
        torch.testing.assert_close(grad, results[0][1])


def test_gradient_matches_reference_gradient():
    teacher, base = _logits(2, 4, 20, seed=8), _logits(2, 4, 20, seed=9)
    mask = torch.tensor([[1, 0, 1, 1], [0, 1, 0, 0]], dtype=torch.bool)
    student = base.float().requires_grad_(True)
    topk_kl(teacher.float(), student, mask, top_k=7, chunk_size=2).backward()
    reference_student = base.clone().requires_grad_(True)
    _reference(teacher, reference_student, mask, 2.0, 7).backward()
    torch.testing.assert_close(student.grad, reference_student.grad.float(), rtol=1e-4, atol=1e-6)
    # Masked-out positions get no gradient.
    assert torch.all(student.grad[~mask] == 0)


def test_masked_out_positions_do_not_matter():
    teacher, student = _logits(2, 6, 25, seed=10), _logits(2, 6, 25, seed=11)
    mask = torch.tensor([[1, 1, 0, 0, 1, 0], [0, 1, 1, 0, 0, 0]])
    wild_teacher, wild_student = teacher.clone(), student.clone()
    wild_teacher[mask == 0] = 1e4 * _logits(int((mask == 0).sum()), 25, seed=12)
    wild_student[mask == 0] = -1e4
    expected = _reference(teacher, student, mask.bool(), 2.0, 9).item()
    assert topk_kl(teacher, student, mask, top_k=9).item() == pytest.approx(expected, rel=1e-5)
    assert topk_kl(wild_teacher, wild_student, mask, top_k=9).item() == pytest.approx(
        expected, rel=1e-5
    )


def test_empty_mask_gives_zero_with_graph():
    teacher, student = _logits(2, 3, 10, seed=13), _logits(2, 3, 10, seed=14).requires_grad_(True)
    loss = topk_kl(teacher, student, torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(student.grad == 0)


def test_temperature_squared_scaling():
    teacher, student = _logits(1, 5, 16, seed=15), _logits(1, 5, 16, seed=16)
    for temperature in (1.0, 2.0, 4.0):
        raw_kl = (
            F.kl_div(
                F.log_softmax(student / temperature, -1),
                F.log_softmax(teacher / temperature, -1),
                log_target=True,
                reduction="none",
            )
            .sum(-1)
            .mean()
        )
        got = topk_kl(teacher, student, temperature=temperature, top_k=16)
        assert got.item() == pytest.approx(temperature**2 * raw_kl.item(), rel=1e-5)


def _published_kd(teacher, student, top_k, temperature=2.0):
    """The paper's code, transcribed: logits / T, then / T again inside its KL, on the
    teacher's top-K support renormalised, scaled by T^2, mean over every position."""
    teacher, student = teacher / temperature, student / temperature  # the training step
    support = teacher.topk(top_k, dim=-1).indices  # the KL function from here on
    p = torch.softmax(teacher.gather(-1, support) / temperature, dim=-1)
    log_q = torch.log_softmax(student.gather(-1, support) / temperature, dim=-1)
    kl = (p * (p.log() - log_q)).sum(-1)
    return kl.mean() * temperature**2


def test_documented_mapping_to_the_papers_code():
    teacher, student = _logits(2, 6, 40, seed=25), _logits(2, 6, 40, seed=26)
    expected = _published_kd(teacher, student, top_k=8).item()
    assert "topk_kl(teacher_logits / 2, student_logits / 2, temperature=2.0)" in topk_kl.__doc__
    halved = topk_kl(teacher / 2, student / 2, temperature=2.0, top_k=8)
    assert halved.item() == pytest.approx(expected, rel=1e-5)
    assert "topk_kl(teacher_logits, student_logits, temperature=4.0) / 4" in topk_kl.__doc__
    at_four = topk_kl(teacher, student, temperature=4.0, top_k=8)
    assert at_four.item() / 4 == pytest.approx(expected, rel=1e-5)


def test_bf16_input_is_computed_in_float32():
    teacher = _logits(2, 8, 64, seed=17).bfloat16()
    student = _logits(2, 8, 64, seed=18).bfloat16().requires_grad_(True)
    loss = topk_kl(teacher, student, top_k=16)
    assert loss.dtype == torch.float32
    # Reference on the same (bf16-rounded) values in float64: only float32 rounding differs.
    expected = _reference(teacher.double(), student.detach().double(), None, 2.0, 16)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert student.grad.dtype == torch.bfloat16


def test_no_gradient_reaches_teacher():
    teacher = _logits(1, 4, 10, seed=19).requires_grad_(True)
    student = _logits(1, 4, 10, seed=20).requires_grad_(True)
    topk_kl(teacher, student, top_k=4).backward()
    assert teacher.grad is None
    assert student.grad is not None


def test_masked_vocabulary_entries_do_not_give_nan():
    # Logits masked to -inf in both models (the published code's mode masking) while the
    # support K covers the whole vocabulary: those tokens must contribute 0, not NaN.
    teacher, base = _logits(1, 3, 10, seed=21), _logits(1, 3, 10, seed=22)
    teacher[..., 6:] = float("-inf")
    base[..., 6:] = float("-inf")
    student = base.clone().requires_grad_(True)
    loss = topk_kl(teacher, student, top_k=256)
    loss.backward()
    expected = _reference(teacher[..., :6], base[..., :6], None, 2.0, 6)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.isfinite(student.grad).all()


def test_non_contiguous_logits():
    teacher, student = _logits(5, 2, 12, seed=23), _logits(5, 2, 12, seed=24)
    t_view, s_view = teacher.transpose(0, 1), student.transpose(0, 1)
    assert not s_view.is_contiguous()
    expected = _reference(t_view.contiguous(), s_view.contiguous(), None, 2.0, 5)
    assert topk_kl(t_view, s_view, top_k=5).item() == pytest.approx(expected.item(), rel=1e-5)


def test_shape_errors():
    logits = _logits(1, 2, 5, seed=25)
    with pytest.raises(ValueError, match="differ in shape"):
        topk_kl(logits, logits[:, :1])
    with pytest.raises(ValueError, match="mask"):
        topk_kl(logits, logits, torch.ones(1, 3))
    with pytest.raises(ValueError, match="temperature"):
        topk_kl(logits, logits, temperature=0.0)


def test_kd_mask_modes():
    image = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    assert torch.equal(kd_mask(image), image)
    assert torch.equal(kd_mask(image, attention), image)
    assert torch.equal(kd_mask(image, attention, average_over="attended"), attention.bool())
    assert torch.equal(kd_mask(image, average_over="all"), torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="attention_mask"):
        kd_mask(image, average_over="attended")
    with pytest.raises(ValueError, match="average_over"):
        kd_mask(image, average_over="tokens")  # type: ignore[arg-type]


def test_kd_mask_all_equals_no_mask():
    teacher, student = _logits(2, 4, 9, seed=26), _logits(2, 4, 9, seed=27)
    all_mask = kd_mask(torch.zeros(2, 4, dtype=torch.bool), average_over="all")
    torch.testing.assert_close(
        topk_kl(teacher, student, all_mask, top_k=4), topk_kl(teacher, student, top_k=4)
    )
