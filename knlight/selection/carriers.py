"""Carriers vs upstream neurons: which of a fact's candidate neurons *write* the answer.

IG and suppression measure a neuron's *total* effect: what the answer loses when the neuron is gone, including
everything later layers compute from it. A neuron upstream of the real carriers (it builds the state they read)
has a large total effect and a small *direct* effect — its own write to the residual stream barely moves the
answer when the later sublayers are held at their clean values (:mod:`knlight.neurons.direct_effect`).

Per (fact, language), from its queries (the known ones, with the knowledge filter on): the candidates are the
language's knowledge neurons and the ``top_k`` neurons of highest mean normalised attribution; each gets its
mean direct effect over the queries (how *necessary* its write is: removed from the clean state) and, with
``sufficiency`` on (the default), its mean sufficiency (its write alone over the state with every candidate's
write removed: a member of a redundant pair is not necessary, its twin still writes the answer, but it is
sufficient). Its *carrier score* is the larger of the two. **Carriers** are the candidates whose score is at
least ``threshold`` · the largest candidate's and at least ``min_effect`` nats; the language's knowledge neurons
that are not carriers are its **upstream** neurons. The fact's carriers are the union over its languages (by
largest score), its upstream neurons the union of the languages' upstream neurons that carry in no language.
Pure torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from knlight.lm.prompts import EncodedQuery
from knlight.neurons.direct_effect import direct_effects_of, sufficiency_effects
from knlight.neurons.neuron import Neuron
from knlight.neurons.neuron_file import Effect, FactNeurons
from knlight.neurons.selection import mask_to_neurons, top_k_mask
from knlight.selection.options import CarrierOptions


def language_carriers(
    lm: Any,
    encoded: Sequence[EncodedQuery],
    knowledge_neurons: Sequence[Neuron],
    rank: torch.Tensor,
    options: CarrierOptions,
) -> tuple[list[Neuron], list[Neuron], list[Effect]]:
    """One (fact, language)'s carriers, upstream neurons and candidate effects.

    Args:
        lm: The model.
        encoded: The language's queries (encoded with their answers).
        knowledge_neurons: The language's knowledge neurons (always candidates).
        rank: ``[L, d]`` mean normalised attribution over the queries (the total effect).
        options: Candidates and thresholds.

    Returns:
        Carriers (by decreasing carrier score), upstream neurons (in the knowledge neurons' order) and per
        candidate ``(layer, index, total, direct, sufficiency)`` by decreasing total effect (sufficiency None
        when it was not measured).
    """
    top = mask_to_neurons(top_k_mask(rank, options.top_k, within=rank > 0), rank)
    candidates = list(dict.fromkeys([*knowledge_neurons, *top]))
    if not candidates or not encoded:
        return [], list(knowledge_neurons), []
    direct = direct_effects_of(lm, encoded, candidates, options.method, options.chunk_rows).mean(0)
    # A member of a redundant pair is not necessary (its twin still writes the answer) but sufficient.
    sufficient = (
        sufficiency_effects(lm, encoded, candidates, options.chunk_rows).mean(0)
        if options.sufficiency
        else None
    )
    score = direct if sufficient is None else torch.maximum(direct, sufficient)
    bar = max(options.threshold * float(score.max()), options.min_effect)
    order = sorted(range(len(candidates)), key=lambda k: -float(score[k]))
    carriers = [candidates[k] for k in order if float(score[k]) >= bar]
    chosen = set(carriers)
    upstream = [n for n in knowledge_neurons if n not in chosen]
    effects = sorted(
        (
            (a, b, float(rank[a, b]), float(direct[k]), None if sufficient is None else float(sufficient[k]))
            for k, (a, b) in enumerate(candidates)
        ),
        key=lambda row: (-row[2], row[0], row[1]),
    )
    return carriers, upstream, effects


def fact_carriers(fact: FactNeurons) -> None:
    """The fact-level carriers and upstream neurons from the per-language ones (in place)."""
    best: dict[Neuron, float] = {}
    direct_of = {
        lang: {(a, b): max(d, -math.inf if s is None else s) for a, b, _, d, s in rows}
        for lang, rows in fact.effects.items()
    }
    for language, carriers in (fact.carriers or {}).items():
        for neuron in carriers:
            best[neuron] = max(best.get(neuron, -float("inf")), direct_of[language][neuron])
    fact.carriers_fact = sorted(best, key=lambda n: (-best[n], n))
    upstream = dict.fromkeys(n for lang in sorted(fact.upstream) for n in fact.upstream[lang])
    fact.upstream_fact = [n for n in upstream if n not in best]
