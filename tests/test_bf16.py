"""bf16 attribution (the GPU code path's dtype) runs on CPU and stays close to fp32.

Stated tolerance (README, issue 16): per query, ``max |bf16 - fp32| <= 10 %`` of the largest fp32 score
(measured 1-4 % on these tiny models), the top-10 neurons agree in at least 8 of 10, and the rank correlation
over all neurons is at least 0.9. The fast engine in bf16 also matches the reference engine in bf16 as well as
either matches fp32.
"""

from __future__ import annotations

import pytest
import torch

from knlight import attribute_batch, load_lm

ITEMS = [("The capital of France is [Y].", "Paris"), ("Marie Curie was a [Y].", "physicist and chemist")]
TOLERANCE = 0.10
"""Largest |bf16 - fp32| per query, as a share of the query's largest |fp32| score."""


def ranks(x: torch.Tensor) -> torch.Tensor:
    return x.flatten().argsort().argsort().double()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma3_text", "bert"])
def test_bf16_attribution_stays_within_tolerance_of_fp32(kind: str, one_thread: None) -> None:
    fp32 = attribute_batch(load_lm(f"tiny:{kind}"), ITEMS, steps=20).scores
    lm16 = load_lm(f"tiny:{kind}")
    lm16.model.to(torch.bfloat16)
    assert next(lm16.model.parameters()).dtype == torch.bfloat16
    fast = attribute_batch(lm16, ITEMS, steps=20, engine="fast").scores
    reference = attribute_batch(lm16, ITEMS, steps=20, engine="reference").scores
    assert fast.dtype == torch.float32 and torch.isfinite(fast).all()
    for i in range(len(ITEMS)):
        scale = float(fp32[i].abs().max())
        deviation = float((fast[i] - fp32[i]).abs().max()) / scale
        assert 0 < deviation <= TOLERANCE, f"{kind} item {i}: bf16 deviates {deviation:.3g} of the max score"
        top_fp32 = set(fp32[i].flatten().topk(10).indices.tolist())
        top_bf16 = set(fast[i].flatten().topk(10).indices.tolist())
        assert len(top_fp32 & top_bf16) >= 8
        assert spearman(fast[i], fp32[i]) >= 0.9
        # Both engines round differently in bf16, but neither drifts further from the other than from fp32.
        between = float((fast[i] - reference[i]).abs().max()) / scale
        assert between <= 2 * TOLERANCE
