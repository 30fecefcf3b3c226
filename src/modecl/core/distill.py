"""Top-K knowledge distillation from the frozen host model (teacher) to the adapted model.

MoDE keeps image generation close to the pre-trained model with a token-wise
KL(teacher || student) on image-generation samples (method.md, step 3). This module holds
the loss and the helper that picks the positions it is averaged over.
"""

from __future__ import annotations

from typing import Literal

import torch

AverageOver = Literal["image", "attended", "all"]


def kd_mask(
    image_mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    average_over: AverageOver = "image",
) -> torch.Tensor:
    """Return the bool ``[batch, seq]`` mask of positions the distillation KL averages over.

    - ``"image"`` (project default): the image-token positions (``image_mask``; begin/end
      of image markers count as image, see the glossary), intersected with
      ``attention_mask`` when one is given.
    - ``"attended"``: every non-padding position (``attention_mask``, required), caption
      included.
    - ``"all"``: every position, padding included. This is what the paper's published code
      does (it applies no attention mask); it is the same as ``topk_kl(..., mask=None)``.

    The mask indexes logit positions. With a causal LM, logits at position ``t`` predict
    token ``t + 1``, so a caller that wants the predictions *of* image tokens passes
    ``image_mask`` shifted left by one.
    """
    if average_over == "image":
        mask = image_mask.bool()
        if attention_mask is not None:
            _check_same_shape(mask, attention_mask)
            mask = mask & attention_mask.bool()
        return mask
    if average_over == "attended":
        if attention_mask is None:
            raise ValueError('average_over="attended" needs an attention_mask')
        _check_same_shape(image_mask, attention_mask)
        return attention_mask.bool()
    if average_over == "all":
        return torch.ones_like(image_mask, dtype=torch.bool)
    raise ValueError(f"average_over must be 'image', 'attended' or 'all', got {average_over!r}")


def topk_kl(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 2.0,
    top_k: int = 256,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Top-K distillation loss ``T^2 * mean_positions KL(p_teacher || p_student)``.

    At each position, let ``S`` be the teacher's top ``K`` tokens (``K = min(top_k,
    vocab)``). Both distributions are renormalised on ``S``::

        p = softmax(teacher[S] / T),  q = softmax(student[S] / T)
        KL = sum_{s in S} p_s * (log p_s - log q_s)

    computed in float32 whatever the logits' dtype, scaled by ``T^2`` (keeps gradient
    magnitudes comparable across temperatures) and averaged over the positions in ``mask``
    (``[batch, seq]``, bool or 0/1; ``None`` = every position). An empty mask gives 0,
    still attached to the student's graph. Tokens where the teacher has probability 0
    (e.g. logits masked to ``-inf``) contribute 0. The teacher is detached.

    ``T`` is applied once. The paper's published code divides the logits by ``T = 2``
    twice (effective temperature 4) but scales by ``T^2 = 4``, and averages over every
    position. Its loss is exactly
    ``topk_kl(teacher_logits / 2, student_logits / 2, temperature=2.0)``, or equally
    ``topk_kl(teacher_logits, student_logits, temperature=4.0) / 4`` (``mask=None``);
    ``temperature=4.0`` alone gives 4x its loss (in a config: temperature 4.0 with
    weight 0.3 / 4 = 0.075). The project averages over image-token positions by default;
    see :func:`kd_mask` for both.

    Memory: masked positions are selected first, so padding costs nothing. The teacher's
    full-vocabulary rows are read ``chunk_size`` positions at a time; only the gathered
    ``[positions, K]`` values are cast to float32. The student's logits are touched by a
    single gather, so its gradient is one full-size buffer in the logits' own dtype.
    """
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher and student logits differ in shape: "
            f"{tuple(teacher_logits.shape)} vs {tuple(student_logits.shape)}"
        )
    if teacher_logits.dim() != 3:
        raise ValueError(f"logits must be [batch, seq, vocab], got {tuple(teacher_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k < 1 or chunk_size < 1:
        raise ValueError(f"top_k and chunk_size must be >= 1, got {top_k} and {chunk_size}")

    vocab = teacher_logits.shape[-1]
    k = min(top_k, vocab)
    teacher = teacher_logits.detach().reshape(-1, vocab)
    if mask is None:
        rows = torch.arange(teacher.shape[0], device=teacher.device)
    else:
        if mask.shape != teacher_logits.shape[:2]:
            raise ValueError(
                f"mask must be [batch, seq] = {tuple(teacher_logits.shape[:2])}, "
                f"got {tuple(mask.shape)}"
            )
        rows = mask.reshape(-1).to(device=teacher.device).ne(0).nonzero().squeeze(1)

    teacher_logp_chunks: list[torch.Tensor] = []
    flat_index_chunks: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, rows.numel(), chunk_size):
            chunk_rows = rows[start : start + chunk_size]
            values, index = teacher.index_select(0, chunk_rows).topk(k, dim=-1, sorted=False)
            teacher_logp_chunks.append(torch.log_softmax(values.float() / temperature, dim=-1))
            flat_index_chunks.append(chunk_rows.unsqueeze(1) * vocab + index)
    if rows.numel() == 0:
        teacher_logp = teacher.new_zeros((0, k), dtype=torch.float32)
        flat_index = rows.new_zeros((0, k))
    else:
        teacher_logp = torch.cat(teacher_logp_chunks)
        flat_index = torch.cat(flat_index_chunks)

    # take() indexes the logical row-major layout, so non-contiguous logits work, and its
    # backward scatters into a single gradient buffer (no per-chunk full-size copies).
    student_logp = torch.log_softmax(
        torch.take(student_logits, flat_index).float() / temperature, dim=-1
    )
    teacher_p = teacher_logp.exp()
    # where() rather than p * (log p - log q): 0 * (-inf) would give NaN on masked tokens.
    pointwise = torch.where(
        teacher_p > 0, teacher_p * (teacher_logp - student_logp), torch.zeros_like(teacher_p)
    )
    return pointwise.sum() * (temperature**2) / max(rows.numel(), 1)


def _check_same_shape(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"image_mask and attention_mask differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}"
        )
