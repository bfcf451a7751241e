"""Planted knowledge: score localisation, LIKN and DKN detection against a known ground truth.

For each architecture and seed, :func:`knlight.planted.plant` builds a small random model (4 layers, 128/256)
and plants 12 synthetic facts (3 relations x 4 facts) in 3 disjoint-vocabulary languages (4 templates each) in
chosen FFN neurons of layers 1-3 (:data:`DEFAULT_PLANT`; ``--plant '{}'``: the upper half, as before issue 17):
standard facts get 2 language-independent carriers + 1 language-specific carrier per language (each carrier
necessary by its *direct* effect: removing its write alone, later sublayers held at their values, costs >= 0.5
nats, so it writes the object itself), a
third of the facts get one degenerate pair instead (each member alone sufficient), and every fact gets 1
distractor (fires on its queries, writes nothing about the object). Then, per (fact, language) record:

* **dai**: zero-baseline IG, coarse neurons ``Attr > τ·max Attr`` per query (τ = 0.2), refined by prompt
  sharing (coarse in at least p = 0.7 of the record's queries);
* **amig**: the same selection on AMIG-baseline IG (per-word [MASK]/EOS baselines, paper aggregation);
* **uncertainty**: knlight's MATRICE-style lower confidence bound across the record's queries
  (``uncertainty_scores``, κ = 1) on zero-baseline IG, selected by ``LCB > τ·max LCB``;
* **carriers**: ``knlight select --carriers.enabled true``'s set: the record's Dai neurons and its top-20 by
  mean normalised zero-baseline IG, kept when their carrier score — the larger of the direct effect on log
  P(object) (their own write removed, later sublayers clean; exact patched forwards) and the sufficiency (their
  write alone over the state without every candidate's write) — is >= 0.25 · the record's largest and >= 0.005
  nats (the defaults of ``CarrierOptions``);
* **carriers_fact**: those carriers that the shipped specificity labels (counting rule,
  ``knlight.selection.specificity``) call ``fact``-specific.

BERT plants train longer (:data:`ARCH_PLANT`).

Each method is scored **globally** (threshold against the maximum over all layers, compared with the
record's carriers in all layers) and **per layer** (threshold against each layer's own maximum, scored only
in the layers that hold the record's carriers: an oracle-assisted view that asks "does IG rank the carriers
first within their layer?"). Globally selected non-carriers are split into distractors, *upstream* neurons
(not planted, in a layer below the record's deepest carrier: zeroing them destroys the states the carriers
read, so IG credits them), other planted neurons and the rest.

LIKN: per fact, neurons selected in every language (``language_independent``) from each method's per-language
sets; classification accuracy over the planted language-independent and language-specific carriers (LI:
selected in every language; LS: selected in its own language and not in all). Also knlight's cross-lingual LCB
(``uncertainty_scores`` with languages) as a direct LIKN detector. DKN: AMIG Algorithm 1 on the top-20 neurons
of each record (highest mean of per-query normalised AMIG attribution), pair recall against the planted pairs,
precision, and top-20 coverage.

The neurons come from knlight's own selection code, :func:`knlight.selection.select_fact` (what ``knlight
select`` runs), on in-memory attributions: per-language neurons (not adaptive), LIKN, the uncertainty-aware set
and DKN. Only the per-layer view (an oracle-assisted reading that ``knlight select`` does not offer) adds
something: ``select_fact`` on each layer's attributions alone for Dai / AMIG, and the per-layer threshold of
``uncertainty_scores`` for the uncertainty-aware sets.

    python benchmarks/planted.py                                           # 3 archs x 5 seeds
    python benchmarks/planted.py --archs gpt2 --seeds 0 --out /tmp/p.json  # one plant
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from knlight import attribute_batch
from knlight.io import write_text_atomically
from knlight.neurons.neuron_file import FactNeurons
from knlight.neurons.selection import (
    coarse_mask,
    degenerate_neurons,
    language_independent,
    mask_to_neurons,
    normalise_per_query,
    top_k_mask,
    uncertainty_scores,
)
from knlight.planted import CARRIER_KINDS, PlantedModel, plant
from knlight.selection import (
    DknOptions,
    KnOptions,
    LiknOptions,
    QueryAttribution,
    UncertaintyOptions,
    select_fact,
)
from knlight.selection.options import CarrierOptions, SpecificityOptions
from knlight.selection.specificity import label_specificity

log = logging.getLogger("benchmarks.planted")
Neuron = tuple[int, int]
METHODS = ("dai", "amig", "uncertainty", "carriers", "carriers_fact")
DEFAULT_PLANT = {"direct_necessity": True, "plant_layers": [1, 2, 3]}
"""The benchmark's plants: carriers over layers 1-3 of 4, each writing the object itself (see PlantConfig)."""
ARCH_PLANT: dict[str, dict[str, Any]] = {"bert": {"steps": 600}}
"""Per architecture, what its plants add to ``--plant`` (BERT's post-norm plants need longer training)."""
SCOPES = ("global", "per_layer")


# ------------------------------------------------------------------------------------------------------------
# Selection: knlight's own (knlight.selection.select_fact), on in-memory attributions

Record = tuple[str, str]  # (uuid, language)
NO_UNCERTAINTY, NO_DKN = UncertaintyOptions(), DknOptions()


class MemoryScores:
    """The dense scores ``[L, d]`` of the benchmark's queries, as selection's score source (``ScoreSource``)."""

    format = "dense"

    def __init__(self, scores: dict[tuple[str, str, int], torch.Tensor]) -> None:
        self.scores = scores

    def get(self, item: QueryAttribution) -> torch.Tensor:
        return self.scores[item.key]


def query_items(
    planted: PlantedModel, scores: torch.Tensor, owner: torch.Tensor, layer: int | None = None
) -> dict[Record, list[QueryAttribution]]:
    """Per record, its queries as selection items carrying their positive attributions (of ``layer`` only).

    Only positive scores can pass ``Attr > τ·max Attr`` (τ >= 0), so the coarse sets equal the dense ones'.
    """
    out: dict[Record, list[QueryAttribution]] = {}
    for r, rec in enumerate(planted.records):
        items = []
        for q, (query, row) in enumerate(zip(rec["queries"], (owner == r).nonzero().flatten().tolist())):
            keep = scores[row] > 0
            if layer is not None:
                keep[torch.arange(keep.shape[0]) != layer] = False
            neurons = [(a, b, float(scores[row, a, b])) for a, b in keep.nonzero().tolist()]
            items.append(QueryAttribution(rec["uuid"], rec["language"], rec["relation"], q, query,
                                          rec["object"], None, neurons))  # fmt: skip
        out[(rec["uuid"], rec["language"])] = items
    return out


def memory_scores(planted: PlantedModel, scores: torch.Tensor, owner: torch.Tensor) -> MemoryScores:
    """The dense scores keyed like :func:`query_items`' items."""
    table = {}
    for r, rec in enumerate(planted.records):
        for q, row in enumerate((owner == r).nonzero().flatten().tolist()):
            table[(rec["uuid"], rec["language"], q)] = scores[row]
    return MemoryScores(table)


def by_fact(items: dict[Record, list[QueryAttribution]]) -> dict[str, dict[str, list[QueryAttribution]]]:
    """Records grouped by fact, then language."""
    out: dict[str, dict[str, list[QueryAttribution]]] = {}
    for (uuid, language), queries in items.items():
        out.setdefault(uuid, {})[language] = queries
    return out


def select(
    per_language: dict[str, list[QueryAttribution]],
    dims: tuple[int, int],
    kn: KnOptions,
    uncertainty: UncertaintyOptions = NO_UNCERTAINTY,
    dkn: DknOptions = NO_DKN,
    dense: MemoryScores | None = None,
    lm: Any = None,
) -> FactNeurons:
    """``select_fact`` on one fact's items (its languages are all the languages of the selection)."""
    return select_fact(per_language, dims, sorted(per_language), {}, kn, LiknOptions(), uncertainty, dkn,
                       dense, lm)  # fmt: skip


def per_layer_coarse(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """Coarse mask ``[L, d]`` with the threshold taken against each layer's own maximum."""
    return torch.stack([coarse_mask(scores[layer], tau) for layer in range(scores.shape[0])])


def as_set(mask: torch.Tensor) -> set[Neuron]:
    return set(mask_to_neurons(mask))


def likn_of(sets: dict[str, set[Neuron]], dims: tuple[int, int]) -> set[Neuron]:
    """Neurons selected in every language (``language_independent`` of the per-language sets)."""
    masks = {}
    for language, chosen in sets.items():
        mask = torch.zeros(dims, dtype=torch.bool)
        for layer, index in chosen:
            mask[layer, index] = True
        masks[language] = mask
    return as_set(language_independent(masks))


def selections(
    planted: PlantedModel,
    sources: dict[str, torch.Tensor],
    owner: torch.Tensor,
    tau: float,
    p: float,
    kappa: float,
    carrier_options: CarrierOptions = CarrierOptions(enabled=True),
) -> tuple[dict[tuple[str, str], dict[Record, set[Neuron]]], dict[tuple[str, str], dict[str, set[Neuron]]]]:
    """Every method's neurons per record and its LIKN per fact, for both scopes.

    dai / amig: ``select_fact``'s per-language neurons (coarse ``Attr > τ·max``, prompt sharing p, not adaptive)
    and its LIKN; per layer: the same on each layer's attributions alone (the threshold against that layer's
    maximum), united. uncertainty: ``select_fact``'s uncertainty-aware set on one record's queries (one
    language), LIKN over the languages' sets; uncertainty_xling: its set on the fact's queries in every language.
    Per layer, the uncertainty bounds (``uncertainty_scores``) are thresholded against each layer's maximum.
    carriers: ``select_fact``'s ``carriers`` per language (candidates: the Dai neurons and the top-20 by mean
    normalised zero-baseline IG; kept when the larger of their direct effect and sufficiency is >= 0.25 · the
    largest and >= 0.005 nats); it takes no τ·max, so its per-layer view scores the same set in the carrier layers.
    """
    lm = planted.lm
    dims = (lm.num_layers, lm.d_ff)
    kn = KnOptions(threshold=tau, p=p, adaptive=False)
    lcb = UncertaintyOptions(enabled=True, kappa=kappa, threshold=tau, top_k=None)
    chosen: dict[tuple[str, str], dict[Record, set[Neuron]]] = {(m, s): {} for m in METHODS for s in SCOPES}
    likn: dict[tuple[str, str], dict[str, set[Neuron]]] = {
        (m, s): {} for m in (*METHODS, "uncertainty_xling") for s in SCOPES
    }
    for method, source in (("dai", "zero"), ("amig", "amig")):
        facts = by_fact(query_items(planted, sources[source], owner))
        layers = [by_fact(query_items(planted, sources[source], owner, layer)) for layer in range(dims[0])]
        for uuid, per_language in facts.items():
            fact = select(per_language, dims, kn)
            per_layer = [select(layer[uuid], dims, kn) for layer in layers]
            for language in per_language:
                chosen[(method, "global")][(uuid, language)] = set(fact.languages[language])
                chosen[(method, "per_layer")][(uuid, language)] = {
                    n for f in per_layer for n in f.languages[language]
                }
            likn[(method, "global")][uuid] = set(fact.language_independent)
            likn[(method, "per_layer")][uuid] = {n for f in per_layer for n in f.language_independent}
    zero = sources["zero"]
    carrier_facts: dict[str, FactNeurons] = {}
    dense = memory_scores(planted, zero, owner)
    facts = by_fact(query_items(planted, zero, owner))
    for uuid, per_language in facts.items():
        for language, queries in per_language.items():
            record = select({language: queries}, dims, kn, lcb, dense=dense)
            chosen[("uncertainty", "global")][(uuid, language)] = set(record.uncertainty)
            scores = torch.stack([dense.get(q) for q in queries])
            bound = uncertainty_scores(scores, kappa=kappa)
            chosen[("uncertainty", "per_layer")][(uuid, language)] = as_set(per_layer_coarse(bound, tau))
        for scope in SCOPES:
            sets = {language: chosen[("uncertainty", scope)][(uuid, language)] for language in per_language}
            likn[("uncertainty", scope)][uuid] = likn_of(sets, dims)
        likn[("uncertainty_xling", "global")][uuid] = set(
            select(per_language, dims, kn, lcb, dense=dense).uncertainty
        )
        queries = [q for language in sorted(per_language) for q in per_language[language]]
        bound = uncertainty_scores(torch.stack([dense.get(q) for q in queries]), kappa=kappa,
                                   languages=[q.language for q in queries])  # fmt: skip
        likn[("uncertainty_xling", "per_layer")][uuid] = as_set(per_layer_coarse(bound, tau))
        # carriers: select_fact's carrier set (direct effect of the candidates, knlight select --carriers.*).
        fact = select_fact(per_language, dims, sorted(per_language), {}, kn, LiknOptions(), NO_UNCERTAINTY,
                           NO_DKN, dense, lm, carriers=carrier_options)  # fmt: skip
        for language in per_language:
            for scope in SCOPES:  # no threshold against a maximum: the per-layer view scores the same set
                chosen[("carriers", scope)][(uuid, language)] = set((fact.carriers or {})[language])
        for scope in SCOPES:
            sets = {language: chosen[("carriers", scope)][(uuid, language)] for language in per_language}
            likn[("carriers", scope)][uuid] = likn_of(sets, dims)
        carrier_facts[uuid] = fact
    # carriers_fact: the carriers the shipped specificity labels (counting rule) call fact-specific.
    label_specificity(carrier_facts, SpecificityOptions())
    for uuid, fact in carrier_facts.items():
        labels = fact.specificity or {}
        for language, carriers in (fact.carriers or {}).items():
            own = {n for n in carriers if labels[n].label == "fact"}
            for scope in SCOPES:
                chosen[("carriers_fact", scope)][(uuid, language)] = own
        for scope in SCOPES:
            sets = {
                language: chosen[("carriers_fact", scope)][(uuid, language)]
                for language in fact.carriers or {}
            }
            likn[("carriers_fact", scope)][uuid] = likn_of(sets, dims)
    return chosen, likn


# ------------------------------------------------------------------------------------------------------------
# Scoring


def prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Precision, recall and F1 from counts (precision of an empty selection is NaN)."""
    precision = tp / (tp + fp) if tp + fp else math.nan
    recall = tp / (tp + fn) if tp + fn else math.nan
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def evaluate(
    planted: PlantedModel,
    steps: int = 20,
    tau: float = 0.2,
    p: float = 0.7,
    kappa: float = 1.0,
    top_k: int = 20,
    t_low: float = 0.2,
    t_high: float = 0.25,
    dkn_sources: Sequence[str] = ("amig",),
) -> dict[str, Any]:
    """Run every method on one planted model and score it against the planted truth."""
    lm, records = planted.lm, planted.records
    items, owner = [], []
    for r, rec in enumerate(records):
        for query in rec["queries"]:
            items.append(lm.encode(query, rec["object"]))
            owner.append(r)
    t0 = time.perf_counter()
    zero_all = attribute_batch(lm, items, steps=steps, baseline="zero", completeness=False).scores
    t1 = time.perf_counter()
    amig_all = attribute_batch(lm, items, steps=steps, baseline="amig", completeness=False).scores
    t2 = time.perf_counter()
    owner_t = torch.tensor(owner)
    sources = {"amig": amig_all, "zero": zero_all}
    t_sel = time.perf_counter()
    chosen, likn_sets = selections(planted, sources, owner_t, tau, p, kappa)
    t_sel_end = time.perf_counter()
    planted_any = {(n.layer, n.index) for n in planted.neurons}

    counts = {(m, s): [0, 0, 0] for m in METHODS for s in SCOPES}
    composition = {
        m: {"carrier": 0, "distractor": 0, "upstream": 0, "other_planted": 0, "other": 0} for m in METHODS
    }
    distractor_hits = {(m, s): [0, 0] for m in METHODS for s in SCOPES}
    kind_hits: dict[tuple[str, str], dict[str, list[int]]] = {(m, s): {} for m in METHODS for s in SCOPES}
    within_layer = [0, 0]
    for r, rec in enumerate(records):
        key = (rec["uuid"], rec["language"])
        zero = zero_all[(owner_t == r).nonzero().flatten()]
        own = planted.neurons_for(*key, kinds=(*tuple(CARRIER_KINDS), "distractor"))
        carriers = {(n.layer, n.index) for n in own if n.carrier}
        kind_of = {(n.layer, n.index): n.kind for n in own if n.carrier}
        distractors = {(n.layer, n.index) for n in own if not n.carrier}
        carrier_layers = {layer for layer, _ in carriers}
        deepest = max(carrier_layers)
        # Oracle check: each carrier among the top-n of its layer (n = carriers of the record in that layer).
        for q in range(zero.shape[0]):
            for layer in carrier_layers:
                in_layer = {i for lay, i in carriers if lay == layer}
                top = set(torch.topk(zero[q, layer], len(in_layer)).indices.tolist())
                within_layer[0] += len(top & in_layer)
                within_layer[1] += len(in_layer)
        for method in METHODS:
            for scope in SCOPES:
                picked = chosen[(method, scope)][key]
                # The per-layer view is scored in the record's carrier layers (its oracle restriction).
                scored = picked if scope == "global" else {n for n in picked if n[0] in carrier_layers}
                c = counts[(method, scope)]
                c[0] += len(scored & carriers)
                c[1] += len(scored - carriers)
                c[2] += len(carriers - scored)
                for neuron, kind in kind_of.items():
                    kind_hits[(method, scope)].setdefault(kind, [0, 0])
                    kind_hits[(method, scope)][kind][0] += neuron in scored
                    kind_hits[(method, scope)][kind][1] += 1
                distractor_hits[(method, scope)][0] += len(picked & distractors)
                distractor_hits[(method, scope)][1] += len(distractors)
                if scope == "global":
                    comp = composition[method]
                    for sel in picked:
                        if sel in carriers:
                            comp["carrier"] += 1
                        elif sel in distractors:
                            comp["distractor"] += 1
                        elif sel in planted_any:
                            comp["other_planted"] += 1
                        elif sel[0] < deepest:
                            comp["upstream"] += 1
                        else:
                            comp["other"] += 1

    localisation = {}
    for (method, scope), (tp, fp, fn) in counts.items():
        hits, total = distractor_hits[(method, scope)]
        localisation[f"{method}/{scope}"] = {
            **prf(tp, fp, fn),
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "distractor_fpr": hits / total if total else math.nan,
            "recall_by_kind": {k: h / t for k, (h, t) in kind_hits[(method, scope)].items()},
        }
    for method in METHODS:
        total = sum(composition[method].values())
        localisation[f"{method}/global"]["composition"] = {
            k: (v / total if total else math.nan) for k, v in composition[method].items()
        }

    likn = _likn(planted, chosen, likn_sets)
    t3 = time.perf_counter()
    dkn = _dkn(planted, owner_t, {k: sources[k] for k in dkn_sources}, top_k, t_low, t_high)
    t4 = time.perf_counter()
    return {
        "localisation": localisation,
        "within_layer_topn": within_layer[0] / within_layer[1],
        "likn": likn,
        "dkn": dkn,
        "seconds": {"ig_zero": t1 - t0, "ig_amig": t2 - t1, "selection": t_sel_end - t_sel, "dkn": t4 - t3},
    }


def _likn(
    planted: PlantedModel,
    chosen: dict[tuple[str, str], dict[Record, set[Neuron]]],
    likn_sets: dict[tuple[str, str], dict[str, set[Neuron]]],
) -> dict[str, Any]:
    """LIKN classification accuracy and precision/recall per method and scope, plus the cross-lingual LCB.

    Per layer, only the fact's carrier layers count (the oracle restriction of that view; else each carrier-free
    layer would add its maximum).
    """
    facts = sorted({rec["uuid"] for rec in planted.records})
    languages = sorted({rec["language"] for rec in planted.records})
    out: dict[str, Any] = {}
    for (method, scope), per_fact in likn_sets.items():
        correct = total = tp = fp = fn = 0
        for uuid in facts:
            neurons = [n for n in planted.neurons if n.uuid == uuid]
            layers = {n.layer for n in neurons if n.carrier}
            likn = per_fact[uuid] if scope == "global" else {n for n in per_fact[uuid] if n[0] in layers}
            all_language = {
                (n.layer, n.index) for n in neurons if n.carrier and len(n.languages) == len(languages)
            }
            tp, fp, fn = (
                tp + len(likn & all_language),
                fp + len(likn - all_language),
                fn + len(all_language - likn),
            )
            if method == "uncertainty_xling":
                continue
            for n in neurons:
                key = (n.layer, n.index)
                if n.kind == "language_independent":
                    total += 1
                    correct += key in likn
                elif n.kind == "language_specific":
                    total += 1
                    own = chosen[(method, scope)][(uuid, n.languages[0])]
                    own = own if scope == "global" else {m for m in own if m[0] in layers}
                    correct += key in own and key not in likn
        if method == "uncertainty_xling":
            out[f"{method}/{scope}"] = prf(tp, fp, fn)
        else:
            out[f"{method}/{scope}"] = {"accuracy": correct / total if total else math.nan, **prf(tp, fp, fn)}
    return out


def _dkn(
    planted: PlantedModel,
    owner: torch.Tensor,
    sources: dict[str, torch.Tensor],
    top_k: int,
    t_low: float,
    t_high: float,
) -> dict[str, Any]:
    """``select_fact``'s DKN (AMIG Algorithm 1) on each record's top-K; recall/precision against the planted pairs.

    The top-K are the record's neurons of highest mean normalised attribution (``select_fact``'s ranking). False
    pairs are split by membership (both own carriers: functionally redundant carriers of a standard fact;
    carrier + unplanted; both unplanted) and by whether the singles' drops already add up to more than
    ``t_high`` (an additive pair, which Algorithm 1 cannot tell from a degenerate one).
    """
    lm = planted.lm
    dims = (lm.num_layers, lm.d_ff)
    options = DknOptions(enabled=True, top_k=top_k, t_low=t_low, t_high=t_high, grow=False)
    kn = KnOptions(threshold=None, adaptive=False)
    out: dict[str, Any] = {}
    for source, scores_all in sources.items():
        dense = memory_scores(planted, scores_all, owner)
        found_total = found_true = planted_pairs = recalled = covered = false_additive = 0
        false_kinds = {"own_carriers": 0, "carrier+unplanted": 0, "unplanted": 0}
        for (uuid, language), queries in query_items(planted, scores_all, owner).items():
            result = select({language: queries}, dims, kn, dkn=options, dense=dense, lm=lm)
            rank = normalise_per_query(torch.stack([dense.get(q) for q in queries])).mean(0)
            top = set(mask_to_neurons(top_k_mask(rank, top_k, within=rank > 0)))
            found = {frozenset(pq) for pq in result.degenerate_pairs}
            if not all(pq <= top for pq in found):
                raise RuntimeError(
                    f"{uuid}/{language}: a DKN pair outside the top-{top_k} (ranking mismatch)"
                )
            own = planted.neurons_for(uuid, language)
            pairs: dict[int, set[Neuron]] = {}
            for n in own:
                if n.kind == "degenerate":
                    pairs.setdefault(n.pair, set()).add((n.layer, n.index))  # type: ignore[arg-type]
            truth = {frozenset(s) for s in pairs.values()}
            carriers = {(n.layer, n.index) for n in own}
            planted_pairs += len(truth)
            recalled += len(truth & found)
            covered += sum(s <= top for s in truth)
            found_total += len(found)
            found_true += len(found & truth)
            false = found - truth
            single: dict[Neuron, float] = {}
            if false:
                members = sorted({n for pq in false for n in pq})
                # t_low = -inf: no candidate, so only the singles' drops are measured.
                encoded = [lm.encode(q.query, q.answer) for q in queries]
                single = degenerate_neurons(lm, encoded, members, -math.inf, t_high, grow=False).single_drop
            for pq in false:
                n_carriers = sum(n in carriers for n in pq)
                false_kinds[("unplanted", "carrier+unplanted", "own_carriers")[n_carriers]] += 1
                false_additive += sum(single[n] for n in pq) > t_high
        n_false = found_total - found_true
        out[source] = {
            "pair_recall": recalled / planted_pairs if planted_pairs else math.nan,
            "pair_precision": found_true / found_total if found_total else math.nan,
            "top_k_coverage": covered / planted_pairs if planted_pairs else math.nan,
            "found_pairs": found_total,
            "planted_pairs": planted_pairs,
            "false_pairs": {k: (v / n_false if n_false else math.nan) for k, v in false_kinds.items()},
            "false_pairs_additive": false_additive / n_false if n_false else math.nan,
        }
    return out


# ------------------------------------------------------------------------------------------------------------
# Driver and table


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        elif isinstance(v, (int, float)):
            out[name] = float(v)
    return out


def summarise(values: Sequence[float]) -> dict[str, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {
        "mean": statistics.fmean(finite),
        "std": statistics.pstdev(finite) if len(finite) > 1 else 0.0,
        "n": len(finite),
    }


def fmt(summary: dict[str, dict[str, float]], key: str, digits: int = 2) -> str:
    s = summary.get(key)
    if s is None or math.isnan(s["mean"]):
        return "–"
    return f"{s['mean']:.{digits}f}±{s['std']:.{digits}f}"


# fmt: off
Column = tuple[str, str, int]  # header, summary key ({m}: method/detector, {a}: arch), digits


def _rows(summaries: dict[str, dict[str, dict[str, float]]], columns: list[Column],
          groups: Sequence[str] = ("",)) -> list[str]:
    """A header line and one line per (group, arch); a group fills ``{m}`` in the keys."""
    lines = [" | ".join(h for h, _, _ in columns)]
    for group in groups:
        for arch, s in summaries.items():
            cells = []
            for header, key, digits in columns:
                if header == "arch":
                    cells.append(arch)
                elif header in ("method", "detector", "candidates"):
                    cells.append(group)
                else:
                    cells.append(fmt(s, key.format(m=group), digits))
            if any(c != "–" for c in cells[2:]) or not groups[0]:
                lines.append(" | ".join(cells))
    return lines


def table(summaries: dict[str, dict[str, dict[str, float]]], seeds: Sequence[int], seconds: float) -> str:
    """The printed report (mean±std over seeds)."""
    lines = [f"Planted-knowledge benchmark: seeds {list(seeds)}, mean±std over seeds, total {seconds:.0f}s",
             ""]
    lines.append("Plant verification (P(object) over all queries; suppression at the target position; "
                 "'one off' = P after suppressing one neuron / P clean)")
    lines += _rows(summaries, [
        ("arch", "", 0), ("P(obj)", "plant.p_clean", 2), ("P before", "plant.p_before", 3),
        ("P all planted off", "plant.p_suppressed", 3),
        ("std carrier one off", "plant.carrier_single_mean", 2),
        ("deg one off", "plant.degenerate_single_mean", 2), ("deg both off", "plant.degenerate_both_mean", 3),
        ("distractor |ΔP|/P", "plant.distractor_effect", 3), ("plant s", "plant.seconds", 0),
    ])
    lines += ["", "Localisation vs the carriers of each (fact, language) record. "
              "global: τ·max over all layers; "
              "per-layer: τ·max of each layer, scored in the record's carrier layers (oracle-assisted); "
              "carriers: direct effect or sufficiency "
              "(no τ·max; its per-layer view is the same set in the carrier layers)"]
    lines += _rows(summaries, [
        ("method", "", 0), ("arch", "", 0),
        ("global P", "loc.{m}/global.precision", 2), ("global R", "loc.{m}/global.recall", 2),
        ("global F1", "loc.{m}/global.f1", 2),
        ("per-layer P", "loc.{m}/per_layer.precision", 2), ("per-layer R", "loc.{m}/per_layer.recall", 2),
        ("per-layer F1", "loc.{m}/per_layer.f1", 2),
        ("distractor FPR global", "loc.{m}/global.distractor_fpr", 2),
        ("distractor FPR per-layer", "loc.{m}/per_layer.distractor_fpr", 2),
        ("global picks upstream", "loc.{m}/global.composition.upstream", 2),
    ], METHODS)
    lines += ["", "Per-layer recall by kind of carrier"]
    lines += _rows(summaries, [
        ("method", "", 0), ("arch", "", 0),
        ("LI", "loc.{m}/per_layer.recall_by_kind.language_independent", 2),
        ("LS", "loc.{m}/per_layer.recall_by_kind.language_specific", 2),
        ("degenerate", "loc.{m}/per_layer.recall_by_kind.degenerate", 2),
    ], METHODS)
    lines += ["", "Oracle: each carrier in the top-n of its layer (n = the record's carriers there; "
              "zero-baseline IG, "
              "per query): " + ", ".join(f"{a} {fmt(s, 'within_layer_topn')}" for a, s in summaries.items())]
    lines += ["", "LIKN. accuracy: planted LI carriers selected in every language, LS carriers in their own "
              "language only; P/R: LIKN set vs the all-language carriers (LI + degenerate)"]
    detectors = [f"{m}/{scope}" for m in [*METHODS, "uncertainty_xling"] for scope in SCOPES]
    lines += _rows(summaries, [
        ("detector", "", 0), ("arch", "", 0), ("accuracy", "likn.{m}.accuracy", 2),
        ("P", "likn.{m}.precision", 2), ("R", "likn.{m}.recall", 2),
    ], detectors)
    lines += ["", "DKN: AMIG Algorithm 1 on each record's top-20 (T_low 0.2, T_high 0.25) "
              "vs the planted pairs; "
              "false pairs split by membership and additivity"]
    lines += _rows(summaries, [
        ("candidates", "", 0), ("arch", "", 0), ("pair recall", "dkn.{m}.pair_recall", 2),
        ("pair precision", "dkn.{m}.pair_precision", 2), ("top-20 coverage", "dkn.{m}.top_k_coverage", 2),
        ("found pairs", "dkn.{m}.found_pairs", 1), ("planted pairs", "dkn.{m}.planted_pairs", 0),
        ("false: own carriers", "dkn.{m}.false_pairs.own_carriers", 2),
        ("false: carrier+unplanted", "dkn.{m}.false_pairs.carrier+unplanted", 2),
        ("false: unplanted", "dkn.{m}.false_pairs.unplanted", 2),
        ("false: additive", "dkn.{m}.false_pairs_additive", 2),
    ], ("amig", "zero"))
    return "\n".join(lines)


# fmt: on


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--archs", nargs="+", default=["gpt2", "llama", "bert"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/planted.json"))
    parser.add_argument("--steps", type=int, default=20, help="IG quadrature steps")
    parser.add_argument("--tau", type=float, default=0.2)
    parser.add_argument("--p", type=float, default=0.7, help="prompt-sharing fraction")
    parser.add_argument("--kappa", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument(
        "--dkn-sources",
        nargs="+",
        default=["amig"],
        choices=["amig", "zero"],
        help="attributions whose top-K feed the DKN search",
    )
    parser.add_argument("--save-dir", type=Path, default=None, help="also save each plant under this folder")
    parser.add_argument(
        "--plant", type=json.loads, default=DEFAULT_PLANT,
        help=f"PlantConfig overrides as JSON (default {json.dumps(DEFAULT_PLANT)}; '{{}}': the plants before "
        "issue 17, carriers in the upper half and necessary by their total effect)",
    )  # fmt: skip
    parser.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        default=None,
        help="combine these result files (runs of other archs) into --out instead of running",
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    runs = []
    parts: list[dict[str, Any]] = []
    if args.merge:
        parts = [json.loads(path.read_text(encoding="utf-8")) for path in args.merge]
        runs = [run for part in parts for run in part["runs"]]
        args.archs = list(dict.fromkeys(run["arch"] for run in runs))
        args.seeds = sorted({run["seed"] for run in runs})
    for arch in args.archs if not args.merge else []:
        for seed in args.seeds:
            overrides = {**ARCH_PLANT.get(arch, {}), **args.plant}
            planted = plant(arch, seed, **overrides)
            if args.save_dir is not None:
                planted.save(args.save_dir / f"{arch}-{seed}")
            metrics = evaluate(
                planted,
                steps=args.steps,
                tau=args.tau,
                p=args.p,
                kappa=args.kappa,
                top_k=args.top_k,
                dkn_sources=args.dkn_sources,
            )
            runs.append(
                {"arch": arch, "seed": seed, "plant_overrides": overrides, "plant": planted.report, **metrics}
            )
            log.info(
                "%s seed %d: dai global P %.2f R %.2f, carriers global P %.2f R %.2f (fact-specific P %.2f R %.2f), "
                "DKN recall %.2f (%.0fs)",
                arch,
                seed,
                metrics["localisation"]["dai/global"]["precision"],
                metrics["localisation"]["dai/global"]["recall"],
                metrics["localisation"]["carriers/global"]["precision"],
                metrics["localisation"]["carriers/global"]["recall"],
                metrics["localisation"]["carriers_fact/global"]["precision"],
                metrics["localisation"]["carriers_fact/global"]["recall"],
                metrics["dkn"]["amig"]["pair_recall"],
                time.perf_counter() - start,
            )
    summaries: dict[str, dict[str, dict[str, float]]] = {}
    for arch in args.archs:
        flat = [
            flatten(
                {
                    "plant": r["plant"],
                    "loc": r["localisation"],
                    "within_layer_topn": r["within_layer_topn"],
                    "likn": r["likn"],
                    "dkn": r["dkn"],
                }
            )
            for r in runs
            if r["arch"] == arch
        ]
        keys = sorted({k for f in flat for k in f})
        summaries[arch] = {k: summarise([f.get(k, math.nan) for f in flat]) for k in keys}
    # Merged: the parts ran side by side; the wall time is the longest part's, the compute time their sum.
    seconds = max(part["seconds"] for part in parts) if parts else time.perf_counter() - start
    result = {
        "args": {
            k: ([str(x) for x in v] if k == "merge" and v else str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
        },
        "arch_plant": ARCH_PLANT,  # what each architecture's plants add to --plant (recorded: not a flag)
        "seconds": seconds,
        "compute_seconds": sum(part["seconds"] for part in parts) if parts else seconds,
        "parts": [{"args": part["args"], "seconds": part["seconds"]} for part in parts],
        "summary": summaries,
        "runs": runs,
    }
    write_text_atomically(args.out, json.dumps(result, indent=1, default=float) + "\n")
    print(table(summaries, args.seeds, seconds))
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    main()
