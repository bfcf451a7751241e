"""What the selected neurons are, computed over the whole selection after every fact's neurons are chosen:
specificity labels (:mod:`~knlight.selection.specificity`), consistency across queries
(:mod:`~knlight.selection.consistency`) and LAPE language-specific neurons beside LIKN and the per-language KN
(:mod:`knlight.neurons.lape`). :func:`annotate_selection` is the one call ``knlight select`` makes; results go
into each fact's entry and the neuron file's ``analysis``. Pure torch, no Lightning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch

from knlight.lm.prompts import EncodedQuery, QueryError
from knlight.neurons.lape import activation_counts, lape, overlap
from knlight.neurons.neuron import Neuron
from knlight.neurons.neuron_file import NeuronFile
from knlight.selection.consistency import fact_consistency, split_consistency
from knlight.selection.options import ConsistencyOptions, LapeOptions, SpecificityOptions
from knlight.selection.reader import QueryAttribution, SelectionError
from knlight.selection.specificity import label_specificity, suppression_drops

log = logging.getLogger(__name__)
ByFact = Mapping[str, Mapping[str, Sequence[QueryAttribution]]]


def _encode(lm: Any, item: QueryAttribution) -> EncodedQuery:
    try:
        return lm.encode(item.query, item.answer)
    except QueryError as error:
        raise SelectionError(f"{item.where}: item {list(item.key)}: {error}") from None


def needs_model(specificity: SpecificityOptions, lape_options: LapeOptions) -> bool:
    """Whether the annotations need the model loaded."""
    return (specificity.enabled and specificity.suppression) or lape_options.enabled


def lape_analysis(lm: Any, by_fact: ByFact, result: NeuronFile, options: LapeOptions) -> dict[str, Any]:
    """LAPE neurons over the selection's queries (every query of each language, known or not: LAPE reads the
    language's text), and their overlap with each language's KN (union over facts) and with LIKN."""
    per_language: dict[str, list[EncodedQuery]] = {}
    for uuid in sorted(by_fact):
        for language, items in sorted(by_fact[uuid].items()):
            per_language.setdefault(language, []).extend(_encode(lm, q) for q in items)
    if len(per_language) < 2:
        raise SelectionError(
            f"lape.enabled compares languages, but the selection has {sorted(per_language) or 'none'}; "
            "give attributions in at least two languages or set --lape.enabled false"
        )
    counts = {g: activation_counts(lm, e, options.positions) for g, e in per_language.items()}
    found = lape(counts, options.entropy_share, options.prob_quantile)
    kn = {
        g: sorted({n for f in result.facts.values() for n in f.languages.get(g, [])}) for g in found.languages
    }
    likn = sorted({n for f in result.facts.values() for n in f.language_independent})
    any_lape: list[Neuron] = sorted({n for ns in found.neurons.values() for n in ns})
    log.info("LAPE: %s language-specific neurons (bar P(a>0) > %.3f)",
             {g: len(ns) for g, ns in found.neurons.items()}, found.bar)  # fmt: skip
    return {
        "options": asdict(options),
        "bar": round(found.bar, 6),
        "tokens": {g: counts[g].tokens for g in found.languages},
        "neurons": {g: [list(n) for n in ns] for g, ns in found.neurons.items()},
        "overlap": {
            "kn": {g: overlap(found.neurons[g], kn[g]) for g in found.languages},
            "likn": {g: overlap(found.neurons[g], likn) for g in found.languages},
            "likn_any_language": overlap(any_lape, likn),
        },
    }


def annotate_selection(
    result: NeuronFile,
    by_fact: ByFact,
    coarse: Callable[[QueryAttribution], torch.Tensor],
    lm: Any,
    specificity: SpecificityOptions,
    consistency: ConsistencyOptions,
    lape_options: LapeOptions,
    known_only: bool = True,
) -> None:
    """Label, measure consistency and find LAPE neurons over a finished selection (in place).

    Args:
        result: The selection (its facts' lists are reordered fact-specific first).
        by_fact: The items per fact and language the selection used.
        coarse: A query's coarse mask (the selection's own rule).
        lm: The model (needed for ``specificity.suppression`` and LAPE).
        specificity: Specificity options.
        consistency: Consistency options.
        lape_options: LAPE options.
        known_only: Count only the queries the knowledge filter passed (when it recorded a status).
    """
    if needs_model(specificity, lape_options) and lm is None:
        raise SelectionError(
            "specificity.suppression and lape.enabled need the model: load it (run_selection does)"
        )
    if consistency.enabled:
        for uuid, fact in result.facts.items():
            fact.consistency = fact_consistency(by_fact[uuid], coarse, fact, known_only)
        result.analysis["consistency"] = split_consistency(result.facts)
        c = result.analysis["consistency"]
        log.info("consistency: %d of %d (fact, language) consistent (Otsu threshold %s)",
                 c["consistent"], c["pairs"], c["threshold"])  # fmt: skip
    if specificity.enabled:
        drops = None
        if specificity.suppression:
            queries = {
                uuid: [_encode(lm, q) for lang, items in sorted(by_fact[uuid].items()) for q in items
                       if not known_only or fact.is_known(lang, q.query_id)]
                for uuid, fact in result.facts.items()
            }  # fmt: skip
            drops = suppression_drops(lm, result.facts, queries, specificity)
        result.analysis["specificity"] = label_specificity(result.facts, specificity, drops)
        log.info("specificity labels: %s", result.analysis["specificity"]["labels"])
    if lape_options.enabled:
        result.analysis["lape"] = lape_analysis(lm, by_fact, result, lape_options)
