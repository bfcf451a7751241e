"""Detectors: gradient × activation == one-step IG, relation-set rule and fallbacks, logistic regression."""

from __future__ import annotations

import math

import pytest
import torch

from knlight import attribute_batch, load_lm
from knlight.factcheck.detectors import COLUMN, FEATURES, LogisticDetector, claim_features, falseness
from knlight.factcheck.readouts import amig_attribution, readout
from knlight.factcheck.relation_sets import frequent, relation_sets
from knlight.lm.hooks import capture_activations

pytestmark = pytest.mark.usefixtures("one_thread")

NEURONS = [(2, 5), (0, 7), (2, 40), (1, 3)]


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
@pytest.mark.parametrize("answer", ["Paris", "Albuquerque"])  # one and several tokens
def test_readout_matches_one_step_ig_and_captured_activations(arch: str, answer: str) -> None:
    lm = load_lm(f"tiny:{arch}")
    encoded = lm.encode("The capital of France is [Y].", answer)
    read = readout(lm, encoded, NEURONS)
    # Riemann-right IG with one step at alpha=1 from a zero baseline is exactly activation x gradient.
    ig = attribute_batch(lm, [encoded], steps=1, objective="log_prob", completeness=False).scores[0]
    expected = torch.stack([ig[layer, index] for layer, index in NEURONS])
    torch.testing.assert_close(read.grad_x_act, expected, rtol=1e-4, atol=1e-7)
    store: dict[int, torch.Tensor] = {}
    with torch.no_grad(), capture_activations(lm.sites.out_projs, store):
        lm.model(input_ids=torch.tensor([encoded.input_ids]))
    positions = [p for p, _ in encoded.targets]
    acts = torch.stack([store[layer][0, positions, index].mean() for layer, index in NEURONS])
    torch.testing.assert_close(read.activation, acts, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([encoded.input_ids])).logits[0].float()
    log_p = sum(torch.log_softmax(logits[p], -1)[t] for p, t in encoded.targets)
    assert read.log_prob == pytest.approx(float(log_p), abs=1e-4)
    first_pos, first_tok = encoded.targets[0]
    assert read.rank == 1 + int((logits[first_pos] > logits[first_pos, first_tok]).sum())


def test_single_token_activations_do_not_depend_on_the_candidate() -> None:
    """Why raw activations cannot tell true from false candidates (documented caveat of ``act_*``)."""
    lm = load_lm("tiny:gpt2")
    rows = [readout(lm, lm.encode("The capital of France is [Y]", w), NEURONS) for w in (" Paris", " Berlin")]
    assert len(lm.encode("The capital of France is [Y]", " Paris").targets) == 1
    torch.testing.assert_close(rows[0].activation, rows[1].activation)
    assert not torch.equal(rows[0].grad_x_act, rows[1].grad_x_act)


def test_amig_attribution_is_the_mean_over_the_set_of_ig_on_its_layers() -> None:
    lm = load_lm("tiny:gpt2")
    encoded = lm.encode("The capital of France is [Y].", "Paris")
    scores = attribute_batch(lm, [encoded], steps=3, completeness=False).scores[0]
    expected = torch.stack([scores[layer, index] for layer, index in NEURONS]).double().mean()
    assert amig_attribution(lm, encoded, NEURONS, steps=3) == pytest.approx(float(expected), rel=1e-5)
    row = claim_features(lm, encoded, NEURONS, amig=False)
    assert row.shape == (len(FEATURES),) and math.isnan(row[COLUMN["amig"]])
    assert row[COLUMN["gxa_min"]] <= row[COLUMN["gxa_mean"]] <= row[COLUMN["gxa_max"]]


def test_relation_set_rule_counts_above_t_times_max() -> None:
    a, b, c, d = (2, 1), (2, 2), (1, 5), (0, 9)
    groups = {"P1": [[(a, b), (a, c)], [(a, b)], [(a, d), (b, c)]]}  # counts a=4, b=3, c=2, d=1
    sets = relation_sets(["P1"], groups, {}, t=0.7)
    assert sets["P1"].neurons == [a, b] and sets["P1"].counts == [4, 3]  # 3 > 2.8, 2 is not
    assert sets["P1"].source == "dkn" and sets["P1"].pairs == 5 and sets["P1"].train_claims == 3
    assert frequent({a: 4, b: 3, c: 2}, 0.0) == [a, b, c]


def test_relation_set_fallbacks() -> None:
    a, b, c = (2, 1), (2, 2), (1, 5)
    groups = {"P1": [[], []], "P2": [[(a, b)]]}
    tops = {"P1": [[c, a], [c, b]], "P2": [[a, b]]}
    sets = relation_sets(["P1", "P2", "P3"], groups, tops, t=0.7)
    assert (sets["P1"].source, sets["P1"].neurons) == ("top", [c])  # no DKN pair: top-K counts
    assert (sets["P2"].source, sets["P2"].neurons) == ("dkn", [a, b])
    assert (sets["P3"].source, sets["P3"].neurons) == ("pooled-dkn", [a, b])  # no training fact
    with pytest.raises(ValueError, match="relation P1: no neuron set"):
        relation_sets(["P1"], groups, tops, fallback="none")


def test_logistic_detector_separates_and_scores_are_falseness() -> None:
    generator = torch.Generator().manual_seed(0)
    n = 40
    labels = torch.arange(n) % 2
    features = torch.full((n, len(FEATURES)), math.nan, dtype=torch.float64)
    signal = torch.randn(n, generator=generator, dtype=torch.float64) * 0.3 - 2.0 * (labels * 2 - 1)
    for name in ("gxa_mean", "gxa_min", "gxa_max"):
        features[:, COLUMN[name]] = signal + 0.1 * torch.randn(n, generator=generator, dtype=torch.float64)
    model = LogisticDetector.fit(features, labels, ("gxa_mean", "gxa_min", "gxa_max"))
    p_false = falseness("fast_lr", features, {"fast_lr": model})
    assert ((p_false > 0.5).long() == labels).float().mean() > 0.95
    # Low gradient x activation is evidence of a false claim: the threshold detector agrees in sign.
    assert ((falseness("fast", features) > 0).long() == labels).float().mean() > 0.95
    features[:, COLUMN["log_prob"]] = torch.where(labels == 1, -9.0, -1.0)
    assert torch.equal(falseness("prob", features) > 5, labels == 1)
    with pytest.raises(ValueError, match="needs a fitted"):
        falseness("act_lr", features)
