"""LAPE (Tang et al. 2024): activation counts on a tiny model against a hand count, the entropy selection on a
hand-made probability table against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from knlight import load_lm
from knlight.neurons.lape import ActivationCounts, activation_counts, lape, overlap

QUERIES = {
    "en": ["The capital of France is [Y].", "Paris is the capital of [Y]."],
    "de": ["Die Hauptstadt von Frankreich ist [Y].", "Berlin liegt in [Y]."],
}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_activation_counts_equal_a_hand_count(arch: str) -> None:
    torch.manual_seed(0)
    lm = load_lm(f"tiny:{arch}")
    special = set(lm.tokenizer.all_special_ids)
    for language, queries in QUERIES.items():
        encoded = [lm.encode(q, "Paris") for q in queries]
        counted = activation_counts(lm, encoded, batch_size=1 if language == "en" else 8)  # batching is exact
        # By hand: one query at a time, the full model, a hook on every FFN output projection.
        hand = torch.zeros(lm.num_layers, lm.d_ff, dtype=torch.long)
        tokens = 0
        for e in encoded:
            seen: dict[int, torch.Tensor] = {}
            handles = [
                module.register_forward_pre_hook(
                    lambda m, a, layer=layer, seen=seen: seen.__setitem__(layer, a[0][0])
                )
                for layer, module in enumerate(lm.sites.out_projs)
            ]
            with torch.no_grad():
                lm.model(input_ids=torch.tensor([e.input_ids]))
            for h in handles:
                h.remove()
            keep = [p for p, t in enumerate(e.input_ids) if t not in special]
            tokens += len(keep)
            for layer in range(lm.num_layers):
                hand[layer] += (seen[layer][keep] > 0).sum(0)
        assert counted.tokens == tokens
        assert torch.equal(counted.over_zero, hand)
        assert 0 < int(hand.sum()) < tokens * lm.num_layers * lm.d_ff  # neither silent nor always on
        at_targets = activation_counts(lm, encoded, positions="target")
        assert at_targets.tokens == sum(len(e.targets) for e in encoded)


def _counts(prob: list[list[float]], tokens: int = 100) -> ActivationCounts:
    return ActivationCounts(torch.tensor(prob).mul(tokens).round().long(), tokens)


def test_lape_selection_equals_a_hand_computation() -> None:
    # One layer, 4 neurons, 2 languages; P(a > 0) per neuron:
    #   n0: en .9, de .0   -> entropy 0 (only en)          n1: en .1, de .8  -> entropy H(1/9, 8/9)
    #   n2: en .5, de .5   -> entropy ln 2 (both alike)    n3: en .05, de .05 -> entropy ln 2
    counts = {"en": _counts([[0.9, 0.1, 0.5, 0.05]]), "de": _counts([[0.0, 0.8, 0.5, 0.05]])}
    # 8 probabilities sorted: 0, .05, .05, .1, .5, .5, .8, .9; the 0.75 quantile = the 6th smallest = 0.5.
    result = lape(counts, entropy_share=0.5, prob_quantile=0.75)
    assert result.bar == pytest.approx(0.5)
    h1 = -(1 / 9 * math.log(1 / 9) + 8 / 9 * math.log(8 / 9))
    assert result.entropy[0, 0] == pytest.approx(0.0)
    assert result.entropy[0, 1] == pytest.approx(h1)
    # n2 never exceeds 0.5 (it equals it), n3 neither: both dismissed (+inf).
    assert math.isinf(result.entropy[0, 2]) and math.isinf(result.entropy[0, 3])
    # Keep round(4 · 0.5) = 2 lowest entropies: n0 (en > .5) and n1 (de > .5).
    assert result.neurons == {"de": [(0, 1)], "en": [(0, 0)]}
    # The 0.5 quantile = the 4th smallest = 0.1: n2 exceeds it in both languages, n1 only in de (en .1 is not
    # above), n3 in neither; keep round(4 · 0.75) = 3 by entropy: n0 (0), n1 (h1), n2 (ln 2).
    wide = lape(counts, entropy_share=0.75, prob_quantile=0.5)
    assert wide.bar == pytest.approx(0.1)
    assert wide.neurons == {"de": [(0, 1), (0, 2)], "en": [(0, 0), (0, 2)]}


def test_lape_rejects_what_it_cannot_compare() -> None:
    with pytest.raises(ValueError, match="at least two"):
        lape({"en": _counts([[0.5]])})
    with pytest.raises(ValueError, match="no tokens"):
        lape({"en": _counts([[0.5]]), "de": ActivationCounts(torch.zeros(1, 1, dtype=torch.long), 0)})
    with pytest.raises(ValueError, match="entropy_share"):
        lape({"en": _counts([[0.5]]), "de": _counts([[0.2]])}, entropy_share=0)


def test_overlap() -> None:
    assert overlap([(0, 1), (0, 2)], [(0, 2), (1, 0), (1, 1)]) == {"a": 2, "b": 3, "both": 1, "jaccard": 0.25}
    assert overlap([], [])["jaccard"] == 0.0
