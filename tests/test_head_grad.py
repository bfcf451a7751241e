"""The LM head's blocked log P(gold) and gradient against autograd through the full logits."""

from __future__ import annotations

import pytest
import torch

from knlight import load_lm
from knlight.neurons.head_grad import gold_log_prob_grad, head_input, output_linear


def autograd_reference(
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tokens: torch.Tensor,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.detach().double().requires_grad_(True)
    logits = z @ weight.double().T + (0 if bias is None else bias.double())
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    log_p = torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0]
    (grad,) = torch.autograd.grad(log_p.sum(), z)
    return log_p.detach(), grad


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("block", [7, 64, 1000])
def test_blocked_head_equals_autograd(softcap: float | None, with_bias: bool, block: int) -> None:
    gen = torch.Generator().manual_seed(0)
    rows, d, vocab = 9, 16, 301  # 301: the last block is partial for every block size
    z = torch.randn(rows, d, generator=gen) * 3  # large logits: the running max must rescale correctly
    weight = torch.randn(vocab, d, generator=gen)
    bias = torch.randn(vocab, generator=gen) if with_bias else None
    tokens = torch.randint(0, vocab, (rows,), generator=gen)
    log_p, grad = gold_log_prob_grad(z, weight, bias, tokens, softcap, block=block)
    want_log_p, want_grad = autograd_reference(z, weight, bias, tokens, softcap)
    assert log_p.dtype == grad.dtype == torch.float32
    torch.testing.assert_close(log_p.double(), want_log_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-5)


def test_blocked_head_survives_a_dominant_late_logit() -> None:
    """The gold token's logit dwarfs the others and sits in the last block: P ≈ 1, gradient ≈ 0, no overflow."""
    weight = torch.zeros(50, 4)
    weight[49, 0] = 1.0
    z = torch.tensor([[200.0, 0, 0, 0]])
    log_p, grad = gold_log_prob_grad(z, weight, None, torch.tensor([49]), block=10)
    assert torch.isfinite(log_p).all() and torch.isfinite(grad).all()
    assert abs(float(log_p)) < 1e-6
    assert float(grad.abs().max()) < 1e-6


@pytest.mark.parametrize("model_type", ["gpt2", "bert", "llama", "gemma3_text", "xlm-roberta", "bloom"])
def test_head_input_is_what_the_output_linear_sees(model_type: str) -> None:
    lm = load_lm(f"tiny:{model_type}")
    linear = output_linear(lm)
    assert linear is not None
    hidden = torch.randn(3, lm.model.config.hidden_size)
    z = head_input(lm, hidden, linear)
    torch.testing.assert_close(linear(z), lm.head(hidden, final_norm=True))


def test_large_vocabulary_normaliser_is_accurate() -> None:
    """A 262,144-token vocabulary (Gemma 3): the blocked head and ``gold_log_probs`` (float64 normaliser) stay
    within 1e-6 of a float64 log-softmax; a plain float32 log-softmax is the baseline they must not lose to."""
    from knlight.neurons.ig import gold_log_probs

    gen = torch.Generator().manual_seed(1)
    rows, d, vocab = 3, 8, 262_144
    z = torch.randn(rows, d, generator=gen) * 2
    weight = torch.randn(vocab, d, generator=gen)
    tokens = torch.randint(0, vocab, (rows,), generator=gen)
    want, want_grad = autograd_reference(z, weight, None, tokens, None)
    logits = z @ weight.T
    plain = torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0].double()
    careful = gold_log_probs(logits, tokens).double()
    blocked, grad = gold_log_prob_grad(z, weight, None, tokens)
    logits_error = float((logits.double() - z.double() @ weight.double().T).abs().max())
    assert float((careful - want).abs().max()) <= max(1e-6, 2 * logits_error)
    assert float((blocked.double() - want).abs().max()) <= max(1e-6, 2 * logits_error)
    assert float((careful - want).abs().max()) <= float((plain - want).abs().max()) + 1e-7
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-5)
