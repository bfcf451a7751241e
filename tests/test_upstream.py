"""The fast engine does not lean on transformers' keyword names, and fails loudly (never wrongly) when it must.

Each test simulates an upstream change on a tiny real model: a renamed cache keyword (handled), a cache passed
in a form that is not a transformers ``Cache``, an unknown per-position argument, and a block whose replay gives
other numbers than the model (each raises :class:`UpstreamError` naming the block, the version and the range).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import nn
from transformers import Cache

from knlight import attribute_batch, load_lm
from knlight.lm import LanguageModel
from knlight.lm.upstream import TESTED_TRANSFORMERS, RowCache, UpstreamError, cache_parameter
from knlight.neurons.interventions import intervene

ITEMS = [("The capital of France is [Y].", "Paris"), ("Marie Curie was a [Y].", "physicist and chemist")]
REPO = Path(__file__).resolve().parents[1]


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


class RenamedCacheBlock(nn.Module):
    """A GPT-2 block whose forward calls its cache ``kv_memory`` (as a future release might)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.inner = block
        self.mlp = block.mlp  # where knlight finds the neuron site

    def forward(
        self,
        hidden_states: torch.Tensor,
        kv_memory: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        return self.inner(hidden_states, kv_memory, attention_mask, encoder_hidden_states, **kwargs)


def test_a_renamed_cache_keyword_changes_nothing() -> None:
    lm = load_lm("tiny:gpt2")
    expected = attribute_batch(lm, ITEMS, steps=3, engine="reference")
    blocks = lm.model.transformer.h
    for j in range(len(blocks)):
        blocks[j] = RenamedCacheBlock(blocks[j])
    renamed = LanguageModel(lm.model, lm.tokenizer)
    assert cache_parameter(renamed.sites.blocks[0].forward) == "kv_memory"
    got = attribute_batch(renamed, ITEMS, steps=3, engine="fast")
    assert rel_diff(got.scores, expected.scores) <= 1e-5


def test_the_base_models_cache_parameter_is_found_by_its_type() -> None:
    lm = load_lm("tiny:llama")
    name = cache_parameter(lm.model.base_model.forward)
    # Whatever the installed release calls it, it is a parameter of the signature, annotated as a Cache.
    assert name in ("cache", "past_key_values")


class LegacyCache:
    """A cache in a form that is not a transformers ``Cache`` (what an older/newer API could pass)."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache

    def update(self, *args: Any, **kwargs: Any) -> Any:
        return self.cache.update(*args, **kwargs)


def _with_pre_hook(lm: LanguageModel, hook: Any) -> list[Any]:
    return [b.register_forward_pre_hook(hook, with_kwargs=True) for b in lm.sites.blocks]


def _message_checks(error: pytest.ExceptionInfo[UpstreamError], block: str) -> None:
    text = str(error.value)
    assert block in text
    assert transformers.__version__ in text
    assert TESTED_TRANSFORMERS in text
    assert "engine='reference'" in text


def test_a_cache_that_is_not_a_transformers_cache_is_a_clear_error() -> None:
    lm = load_lm("tiny:gpt2")

    def hide_cache(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args = tuple(LegacyCache(a) if isinstance(a, Cache) else a for a in args)
        kwargs = {k: LegacyCache(v) if isinstance(v, Cache) else v for k, v in kwargs.items()}
        return args, kwargs

    handles = _with_pre_hook(lm, hide_cache)
    try:
        with pytest.raises(UpstreamError, match="no transformers Cache among its arguments") as error:
            attribute_batch(lm, ITEMS, steps=2)
    finally:
        for h in handles:
            h.remove()
    _message_checks(error, "GPT2Block")


def test_an_unknown_per_position_argument_is_a_clear_error() -> None:
    lm = load_lm("tiny:llama")

    def add_argument(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        return args, {**kwargs, "segment_embeddings": torch.zeros_like(hidden)}

    handles = _with_pre_hook(lm, add_argument)
    try:
        with pytest.raises(UpstreamError, match="'segment_embeddings' has a sequence axis") as error:
            attribute_batch(lm, ITEMS, steps=2)
    finally:
        for h in handles:
            h.remove()
    _message_checks(error, "LlamaDecoderLayer")


def test_a_replay_that_gives_other_numbers_is_caught_before_any_score() -> None:
    """A block that reads the replayed keys differently (here: zeroes them) must not produce scores."""
    lm = load_lm("tiny:gemma3_text")

    def corrupt_replay(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        def fix(v: Any) -> Any:
            if isinstance(v, RowCache):
                return RowCache(torch.zeros_like(v.clean_keys), v.clean_values)
            return v

        return tuple(fix(a) for a in args), {k: fix(v) for k, v in kwargs.items()}

    handles = _with_pre_hook(lm, corrupt_replay)
    try:
        with pytest.raises(UpstreamError, match="replay of layer") as error:
            attribute_batch(lm, ITEMS, steps=2)
    finally:
        for h in handles:
            h.remove()
    _message_checks(error, "Gemma3DecoderLayer")


def test_sliding_window_rows_use_the_models_own_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """tiny Gemma 3 has a sliding window of 8: a prompt longer than it goes through the windowed mask rows."""
    from knlight.neurons import fast_engine as engines

    lm = load_lm("tiny:gemma3_text")
    window = lm.model.config.sliding_window
    long = ("The capital of France is Paris. " * 3 + "The capital of Germany is [Y].", "Berlin")
    encoded = lm.encode(*long)
    assert len(encoded.input_ids) > 2 * window
    ref = attribute_batch(lm, [long, ITEMS[0]], steps=3, engine="reference")
    fast = attribute_batch(lm, [long, ITEMS[0]], steps=3, engine="fast")
    assert rel_diff(fast.scores, ref.scores) <= 1e-5

    # The window is really in play: the clean mask the rows are cut from hides keys older than the window ...
    engine = engines.FastEngine(lm)
    engine.clean([encoded.input_ids], [encoded.targets], keep=True)
    target = encoded.targets[0][0]
    row = engine._calls[0].kwargs["attention_mask"][0, 0, target]
    assert (
        row.dtype == torch.bool
        and not row[: target - window + 1].any()
        and row[target - window + 1 : target + 1].all()
    )

    # ... and a replay that ignores it (plain causal rows) is caught by the engine's own check, not returned.
    windowed = engines._Rows.mask

    def plain_causal(self: Any, mask: Any, dtype: torch.dtype) -> torch.Tensor:
        return windowed(self, None, dtype)  # what the rows get when transformers builds no mask

    monkeypatch.setattr(engines._Rows, "mask", plain_causal)
    with pytest.raises(UpstreamError, match="replay of layer"):
        attribute_batch(lm, [long], steps=3, engine="fast")


def test_cached_interventions_equal_whole_forwards() -> None:
    """The prefix-cache path of the interventions (cache found by type, prefilled through update) is exact."""
    lm = load_lm("tiny:qwen2")
    query = lm.encode(*ITEMS[1])
    rows = [(query, [(layer, i)], f) for layer in range(lm.num_layers) for i in (0, 5) for f in (0.0, 2.0)]
    cached = intervene(lm, rows, prefix_cache=True)
    whole = intervene(lm, rows, prefix_cache=False)
    assert torch.allclose(cached.log_prob, whole.log_prob, atol=1e-5)
    assert torch.equal(cached.top1, whole.top1)


def test_pyproject_declares_the_tested_transformers_range() -> None:
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    declared = re.search(r'"transformers([^"]*)"', text)
    assert declared is not None and declared.group(1) == TESTED_TRANSFORMERS
