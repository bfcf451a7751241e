"""Batched interventions (prefix cache == full rows == direct logits), ΔP, random control, rows, tables."""

from __future__ import annotations

import math

import pytest
import torch

from knlight import load_lm
from knlight.lm.hooks import edit_activations
from knlight.metrics.intervention import (
    CLEAN,
    CROSS,
    LIKN_SOURCE,
    RELATED,
    SKIPPED,
    UNRELATED,
    InterventionRows,
    Vocabulary,
    summarise,
)
from knlight.neurons.interventions import (
    answer_log_probs,
    intervene,
    random_like,
    relative_change,
    relative_change_from_log,
)

QUERIES = [("The capital of France is [Y]", "Paris"), ("Die Hauptstadt von Japan ist [Y]", "Tokio"),
           ("The official language of France is [Y]", "French")]  # fmt: skip


def _direct(lm, encoded, neurons, factor) -> tuple[float, bool]:
    """log P(answer) and top-1 of one query with a plain full forward and a hand-written hook (the oracle)."""
    ids = torch.tensor([encoded.input_ids])
    per_layer: dict[int, list[int]] = {}
    for layer, index in neurons:
        per_layer.setdefault(layer, []).append(index)
    hooks = []
    for layer, indices in per_layer.items():

        def edit(h: torch.Tensor, indices: list[int] = indices) -> torch.Tensor:
            h = h.clone()
            for pos, _ in encoded.targets:
                h[0, pos, indices] *= factor
            return h

        hooks.append(edit_activations(lm.sites.out_projs[layer], edit))
    for hook in hooks:
        hook.__enter__()
    try:
        with torch.no_grad():
            logits = lm.model(input_ids=ids).logits[0].float()
    finally:
        for hook in hooks:
            hook.__exit__(None, None, None)
    log_probs = torch.log_softmax(logits, -1)
    total = sum(float(log_probs[p, t]) for p, t in encoded.targets)
    first_pos, first_tok = encoded.targets[0]
    return total, int(logits[first_pos].argmax()) == first_tok


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3_text", "bloom", "bert"])
def test_intervene_matches_a_direct_forward(arch: str) -> None:
    lm = load_lm(f"tiny:{arch}")
    encoded = [lm.encode(q, a) for q, a in QUERIES]
    sets = [[], [(0, 1), (lm.num_layers - 1, 3)], [(lm.num_layers - 1, i) for i in range(8)]]
    rows = [(e, s, f) for e in encoded for s in sets for f in (0.0, 2.0)]
    outcome = intervene(lm, rows, chunk_rows=5)
    for r, (e, s, f) in enumerate(rows):
        expected, top1 = _direct(lm, e, s, f)
        assert float(outcome.log_prob[r]) == pytest.approx(expected, abs=2e-4), (arch, r)
        assert bool(outcome.top1[r]) == top1
    if not lm.masked:  # the KV-cached prefix path and whole rows agree
        plain = intervene(lm, rows, prefix_cache=False)
        torch.testing.assert_close(plain.log_prob, outcome.log_prob, atol=2e-4, rtol=0)


def test_a_rows_numbers_do_not_depend_on_other_queries_in_the_call() -> None:
    lm = load_lm("tiny:gpt2")
    a, b = (lm.encode(q, ans) for q, ans in QUERIES[:2])
    sets = [[(2, i)] for i in range(10)]
    alone = intervene(lm, [(a, s, 0.0) for s in sets]).log_prob
    mixed = intervene(lm, [(e, s, 0.0) for s in sets for e in (b, a)]).log_prob
    assert torch.equal(alone, mixed[1::2])  # bit for bit: what makes DDP tables equal single-process ones


def test_answer_log_probs_shape_and_identity_factor() -> None:
    lm = load_lm("tiny:gpt2")
    encoded = [lm.encode(q, a) for q, a in QUERIES]
    clean = answer_log_probs(lm, encoded)
    same = answer_log_probs(lm, encoded, [[(0, 0)], [(1, 2), (2, 3)]], factor=1.0)
    assert clean.shape == (3, 1) and same.shape == (3, 2)
    torch.testing.assert_close(same, clean.expand(3, 2), atol=1e-5, rtol=0)
    with pytest.raises(
        ValueError, match=r"neuron \(layer=3, index=0\) is outside this model \(3 layers × 64"
    ):
        answer_log_probs(lm, encoded, [[(3, 0)]])


def test_relative_change_from_log_probabilities() -> None:
    before = torch.tensor([math.log(0.5), -math.inf, math.log(1e-30), math.log(0.2), math.nan])
    after = torch.tensor([math.log(0.25), math.log(0.1), math.log(3e-30), -math.inf, math.log(0.1)])
    change = relative_change_from_log(before, after)
    assert change[0] == pytest.approx(-0.5) and change[2] == pytest.approx(2.0, rel=1e-5)
    assert change[3] == -1.0 and math.isnan(change[1]) and math.isnan(change[4])
    direct = relative_change(torch.tensor([0.5, 0.0]), torch.tensor([0.25, 0.1]))
    assert direct[0] == pytest.approx(-0.5) and math.isnan(direct[1])


def test_random_control_keeps_layers_and_counts_and_is_seeded() -> None:
    selected = [(2, 5), (2, 9), (0, 1)]
    first = random_like(selected, 16, "0/F1/en")
    assert sorted(layer for layer, _ in first) == [0, 2, 2]
    assert not set(first) & set(selected) and len(set(first)) == 3
    assert random_like(selected, 16, "0/F1/en") == first
    assert random_like(selected, 16, "1/F1/en") != first
    with pytest.raises(ValueError, match="only 1 of 3"):
        random_like([(0, 0), (0, 1)], 3, 0)


# -- metric rows and tables ---------------------------------------------------------------------------------

VOCAB = Vocabulary(
    items=[("F1", "en", 0), ("F1", "en", 1), ("F2", "en", 0), ("F1", "de", 0), ("F3", "en", 0)],
    relations=["P36", "P36", "P37", "P36", "P36"],
    methods=["m"],
    languages=["de", "en"],
)
SUPPRESS, ENHANCE = 0, 1
LOG = math.log


def _rows() -> tuple[torch.Tensor, torch.Tensor]:
    rows = [
        # item, method, kind, op, role, other | lp_before, lp_after, top1_before, top1_after, neurons
        ([0, -1, -1, -1, CLEAN, -1], [LOG(0.5), LOG(0.5), 1, 1, 0]),
        ([1, -1, -1, -1, CLEAN, -1], [-math.inf, -math.inf, 0, 0, 0]),
        ([3, -1, -1, -1, CLEAN, -1], [LOG(0.2), LOG(0.2), 1, 1, 0]),
        ([4, -1, -1, -1, SKIPPED, -1], [math.nan] * 5),
        ([0, 0, 0, SUPPRESS, RELATED, -1], [LOG(0.5), LOG(0.25), 1, 0, 2]),
        ([1, 0, 0, SUPPRESS, RELATED, -1], [-math.inf, LOG(0.1), 0, 0, 2]),  # P_before = 0: NaN, excluded
        ([3, 0, 0, SUPPRESS, RELATED, -1], [LOG(0.2), LOG(0.1), 1, 1, 3]),
        ([0, 0, 0, SUPPRESS, UNRELATED, 2], [LOG(0.4), LOG(0.44), 1, 1, 2]),
        ([1, 0, 0, SUPPRESS, UNRELATED, 2], [LOG(0.4), LOG(0.44), 1, 1, 2]),
        ([0, 0, 0, ENHANCE, RELATED, -1], [LOG(0.5), LOG(1.0), 1, 1, 2]),
        ([0, 0, 0, ENHANCE, UNRELATED, 2], [LOG(0.4), LOG(0.48), 1, 1, 2]),
        ([3, 0, 0, SUPPRESS, CROSS, 1], [LOG(0.2), LOG(0.15), 1, 1, 2]),  # en neurons on a de query
        ([3, 0, 0, SUPPRESS, CROSS, LIKN_SOURCE], [LOG(0.2), LOG(0.05), 1, 0, 1]),
    ]
    return torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows], dtype=torch.float64)


def _row(table: list[dict], **where) -> dict:
    (found,) = [r for r in table if all(r[k] == v for k, v in where.items())]
    return found


def test_metric_removes_duplicate_rows_and_sorts() -> None:
    index, value = _rows()
    metric = InterventionRows()
    metric.update(index[7:], value[7:])
    metric.update(index, value)  # rows 7.. twice, as DistributedSampler padding would
    got_index, got_value = metric.compute()
    order = sorted(range(len(index)), key=lambda i: index[i].tolist())
    assert torch.equal(got_index, index[order])
    assert torch.equal(got_value.nan_to_num(-7.0), value[order].nan_to_num(-7.0))


def test_group_median_is_robust_to_a_tiny_p_unit_the_mean_is_not() -> None:
    """Enhancing a query with P ≈ 1e-4 gives ΔP ≈ +99: it dominates the mean, not the median (units F1/en,
    F1/de, F2/en, F3/en: ΔP +1, +99, +0.5, +0.25)."""
    rows = [([item, -1, -1, -1, CLEAN, -1], [LOG(0.5), LOG(0.5), 1, 1, 0]) for item in (0, 2, 3, 4)] + [
        ([0, 0, 0, ENHANCE, RELATED, -1], [LOG(0.4), LOG(0.8), 1, 1, 2]),
        ([3, 0, 0, ENHANCE, RELATED, -1], [LOG(1e-4), LOG(1e-2), 0, 0, 2]),
        ([2, 0, 0, ENHANCE, RELATED, -1], [LOG(0.4), LOG(0.6), 1, 1, 2]),
        ([4, 0, 0, ENHANCE, RELATED, -1], [LOG(0.4), LOG(0.5), 1, 1, 2]),
    ]
    index = torch.tensor([r[0] for r in rows])
    value = torch.tensor([r[1] for r in rows], dtype=torch.float64)
    enhance = _row(summarise(index, value, VOCAB)["intervention"], operation="enhance", group_by="all")
    assert enhance["units"] == 4
    assert enhance["dp_related"] == pytest.approx((1 + 99 + 0.5 + 0.25) / 4)
    assert enhance["dp_related_median"] == pytest.approx((0.5 + 1) / 2)
    assert math.isnan(enhance["dp_unrelated_median"])  # no unrelated rows


def test_summarise_excludes_and_counts_nan_and_computes_sr() -> None:
    tables = summarise(*_rows(), VOCAB)
    suppress = _row(tables["intervention"], operation="suppress", group_by="all", neurons="selected")
    assert suppress["units"] == 2 and suppress["related"] == 3 and suppress["nan_related"] == 1
    assert suppress["dp_related"] == pytest.approx(-0.5)  # F1/en: −0.5 (one NaN excluded), F1/de: −0.5
    assert suppress["dp_unrelated"] == pytest.approx(0.1)  # F1/de has no unrelated rows: left out
    assert suppress["sr"] == pytest.approx(-5.0)
    assert suppress["acc_before"] == pytest.approx(2 / 3) and suppress["acc_after"] == pytest.approx(1 / 3)
    enhance = _row(tables["intervention"], operation="enhance", group_by="all")
    assert enhance["units"] == 1 and enhance["units_without_neurons"] == 1
    assert enhance["sr"] == pytest.approx(1.0 / 0.2)
    sr = _row(tables["success_rate"], group_by="all", neurons="selected")
    assert sr["sr"] == pytest.approx(5.0 + 5.0) and math.isnan(sr["sr_erase"])
    de = _row(tables["intervention"], operation="suppress", group_by="language", group="de")
    assert de["units"] == 1 and de["dp_related"] == pytest.approx(-0.5) and math.isnan(de["sr"])
    assert _row(tables["intervention"], operation="suppress", group_by="relation", group="P36")["units"] == 2
    cross = {(r["source"], r["target"]): r["dp"] for r in tables["cross_lingual"]}
    assert cross == pytest.approx({("en", "de"): -0.25, ("LIKN", "de"): -0.75, ("de", "de"): -0.5,
                                   ("en", "en"): -0.5})  # fmt: skip
    assert tables["counts"] == [{"items": 3, "units": 2, "items_skipped_no_neurons": 1, "acc_before": 2 / 3}]
    unit = _row(tables["facts"], operation="suppress", uuid="F1", language="en")
    assert unit["nan_related"] == 1 and unit["queries"] == 2 and unit["num_neurons"] == 2
