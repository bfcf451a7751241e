"""The LM head's log P(gold) and its gradient without materialising the logits.

For head inputs ``z`` (after the final norm and any head transform), logits ``l = z Wᵀ + b`` (soft-capped when
the model caps them: ``s = c·tanh(l / c)``), ``log P(a) = s_a − logsumexp(s)`` and

    ∂ log P(a) / ∂z = s'_a W_a − Σ_v p_v s'_v W_v        (s' = 1, or 1 − tanh²(l / c) when capped).

:func:`gold_log_prob_grad` walks the vocabulary in blocks with an online softmax (a running max and rescaled
sums, as flash attention does): per block one matmul for the logits, an in-place exp and one matmul that adds
``p_v s'_v W_v``. The ``[rows, vocab]`` logits never exist at once, which keeps the block in cache (autograd's
``log_softmax`` forward and backward pass over the full logits ~7 times) and the memory at ``rows × block``.
Same two matmuls (the same FLOPs) as autograd's forward and input gradient; the result is autograd's up to
float rounding (tests/test_head_grad.py). Pure torch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

VOCAB_BLOCK = 4096
"""Vocabulary tokens per block: big enough for full-speed matmuls, small enough for the cache."""


class _HeadInput(Exception):
    """Raised by the pre-hook that captures the output embedding's input (stops the head before its matmul)."""

    def __init__(self, z: torch.Tensor) -> None:
        super().__init__("head input captured")
        self.z = z


def output_linear(lm: Any) -> nn.Linear | None:
    """The model's output embedding when it is a plain ``nn.Linear`` (``get_output_embeddings``), else None."""
    getter = getattr(lm.model, "get_output_embeddings", None)
    linear = getter() if callable(getter) else None
    return linear if isinstance(linear, nn.Linear) else None


def head_input(lm: Any, hidden: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """``z``: what ``lm.head(hidden, final_norm=True)`` feeds its output linear (autograd flows through it).

    Runs the head's own modules (final norm, any transform such as BERT's) and stops at the output linear.
    """

    def capture(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        raise _HeadInput(args[0])

    handle = linear.register_forward_pre_hook(capture)
    try:
        lm.head(hidden, final_norm=True)
    except _HeadInput as stop:
        return stop.z
    finally:
        handle.remove()
    raise RuntimeError("the LM head did not call the model's output embedding")  # pragma: no cover


def gold_log_prob_grad(
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tokens: torch.Tensor,
    softcap: float | None = None,
    block: int = VOCAB_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log P(gold) and ∂ log P(gold) / ∂z of every row, the vocabulary in blocks.

    Args:
        z: ``[rows, d]`` head inputs.
        weight: ``[vocab, d]`` output weight.
        bias: ``[vocab]`` output bias or None.
        tokens: ``[rows]`` gold token per row.
        softcap: The logit soft-cap ``c`` (None: none).
        block: Vocabulary tokens per block.

    Returns:
        ``[rows]`` log P(gold) (float32) and ``[rows, d]`` its gradient (float32).
    """
    rows = z.shape[0]
    running_max = torch.full((rows,), -torch.inf, dtype=torch.float32, device=z.device)
    total = torch.zeros(rows, dtype=torch.float32, device=z.device)
    expected = torch.zeros(rows, z.shape[1], dtype=torch.float32, device=z.device)  # Σ e_v s'_v W_v
    gold = torch.empty(rows, dtype=torch.float32, device=z.device)
    gold_slope = torch.ones(rows, dtype=torch.float32, device=z.device)
    for start in range(0, weight.shape[0], block):
        w = weight[start : start + block]
        logits = z @ w.T
        if bias is not None:
            logits += bias[start : start + block]
        logits = logits.float()
        slope = None
        if softcap:
            capped = torch.tanh(logits / softcap)
            logits = capped * softcap
            slope = 1 - capped * capped
        # The gold logit as this matmul rounded it: the same number the normaliser sums (as autograd's
        # log_softmax has it), so their rounding cancels in log P.
        here = ((tokens >= start) & (tokens < start + w.shape[0])).nonzero().flatten()
        if len(here):
            gold[here] = logits[here, tokens[here] - start]
            if slope is not None:
                gold_slope[here] = slope[here, tokens[here] - start]
        new_max = torch.maximum(running_max, logits.amax(1))
        rescale = torch.exp(running_max - new_max)  # 0 at the first block (exp(−inf))
        weights = logits.sub_(new_max[:, None]).exp_()  # in place: e_v = exp(s_v − max)
        total = total * rescale + weights.sum(1)
        if slope is not None:
            weights.mul_(slope)
        expected = expected * rescale[:, None] + (weights.to(w.dtype) @ w).float()
        running_max = new_max
    log_p = gold - running_max - total.log()
    grad = weight[tokens].float() * gold_slope[:, None]
    return log_p, grad - expected / total[:, None]
