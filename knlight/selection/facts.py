"""Selection of one fact's neurons from its items: the knowledge filter, Dai et al.'s per-language neurons, LIKN,
the uncertainty-aware set, the degenerate pairs/sets and the carriers (docs/design.md, "Selection"). Pure torch,
no Lightning."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from knlight.lm.prompts import EncodedQuery, QueryError
from knlight.neurons.neuron import Neuron
from knlight.neurons.neuron_file import FactNeurons
from knlight.neurons.selection import (
    adaptive_refine,
    coarse_mask,
    degenerate_neurons,
    language_independent,
    mask_to_neurons,
    refine_by_sharing,
    top_k_mask,
    uncertainty_scores,
)
from knlight.selection.carriers import fact_carriers, language_carriers
from knlight.selection.known import filter_known
from knlight.selection.options import (
    CarrierOptions,
    DknOptions,
    KnOptions,
    KnownOptions,
    LiknOptions,
    UncertaintyOptions,
)
from knlight.selection.reader import SCORES_HINT, QueryAttribution, SelectionError


class ScoreSource(Protocol):
    """Where dense scores come from (a scores file: :class:`~knlight.selection.reader.DenseScores`)."""

    format: str

    def get(self, item: QueryAttribution) -> torch.Tensor: ...


def _predict_tau(hparams: dict[str, Any], language: str) -> float | None:
    if "threshold" not in hparams:
        return None
    return float((hparams.get("language_thresholds") or {}).get(language, hparams["threshold"]))


def _sparse_scores(item: QueryAttribution, num_layers: int, d_ff: int) -> torch.Tensor:
    dense = torch.zeros(num_layers, d_ff)
    for layer, index, score in item.neurons:
        if not (0 <= layer < num_layers and 0 <= index < d_ff):
            raise SelectionError(
                f"{item.where}: neuron [{layer}, {index}] is outside the model ({num_layers} layers × "
                f"{d_ff}); the attributions come from another model, or pass the right --model / "
                "--num_layers / --d_ff"
            )
        dense[layer, index] = score
    return dense


def _coarse(
    item: QueryAttribution,
    kn: KnOptions,
    hparams: dict[str, Any],
    dense: ScoreSource | None,
    dims: tuple[int, int],
) -> torch.Tensor:
    """The coarse mask ``[L, d]`` of one query (stored coarse neurons, or re-thresholded)."""
    tau = (kn.language_thresholds or {}).get(item.language, kn.threshold)
    scores = _sparse_scores(item, *dims)
    if tau is None:
        return scores != 0 if item.neurons else torch.zeros(dims, dtype=torch.bool)
    stored = _predict_tau(hparams, item.language)
    if stored is not None and tau < stored - 1e-12:
        if dense is None or dense.format != "dense":
            raise SelectionError(
                f"coarse τ={tau} for {item.language!r} is below the predict run's τ={stored}: the neurons "
                "between them were not written to attributions.jsonl. Use τ >= the predict run's, or give "
                "dense scores: " + SCORES_HINT
            )
        scores = dense.get(item)
    try:
        return coarse_mask(scores, tau)
    except ValueError as error:
        raise SelectionError(f"{item.where}: {error}") from None


def _encode(lm: Any, item: QueryAttribution) -> EncodedQuery:
    try:
        return lm.encode(item.query, item.answer)
    except QueryError as error:
        raise SelectionError(f"{item.where}: item {list(item.key)}: {error}") from None


def _normalised(scores: torch.Tensor) -> torch.Tensor:
    top = scores.max()
    return scores / top if top > 0 else torch.zeros_like(scores)


def _uncertainty(
    items: Sequence[QueryAttribution], dense: ScoreSource, options: UncertaintyOptions
) -> list[Neuron]:
    scores = torch.stack([dense.get(q) for q in items])
    weights = None
    if options.weight_by_prob:
        probs = [q.prob for q in items]
        if any(p is None or p != p for p in probs):
            bad = next(q for q in items if q.prob is None or q.prob != q.prob)
            raise SelectionError(f"{bad.where}: P(answer) is NaN; uncertainty.weight_by_prob needs it")
        weights = torch.tensor(probs, dtype=torch.float64)
        if weights.sum() <= 0:
            weights = None  # the model gives every query P = 0 (underflow): weigh them alike
    lcb = uncertainty_scores(scores, options.kappa, [q.language for q in items], weights)
    mask = coarse_mask(lcb, options.threshold)
    if options.top_k is not None:
        mask = top_k_mask(lcb, options.top_k, within=mask)
    return mask_to_neurons(mask, lcb)


def _rank(
    item_list: Sequence[QueryAttribution], dense: ScoreSource | None, dims: tuple[int, int]
) -> torch.Tensor:
    """``[L, d]`` mean normalised attribution over queries (the dense scores when there are any)."""
    if dense is not None and dense.format == "dense":
        return torch.stack([_normalised(dense.get(q)) for q in item_list]).mean(0)
    return torch.stack([_normalised(_sparse_scores(q, *dims)) for q in item_list]).mean(0)


def _carriers(
    lm: Any,
    fact: FactNeurons,
    per_language: dict[str, list[QueryAttribution]],
    dense: ScoreSource | None,
    dims: tuple[int, int],
    options: CarrierOptions,
) -> None:
    fact.carriers = {}
    for language in sorted(per_language):
        queries = per_language[language]
        encoded = [_encode(lm, q) for q in queries]
        carriers, upstream, effects = language_carriers(
            lm, encoded, fact.languages.get(language, []), _rank(queries, dense, dims), options
        )
        fact.carriers[language], fact.upstream[language], fact.effects[language] = carriers, upstream, effects
    fact_carriers(fact)


def _degenerate(
    lm: Any,
    fact: FactNeurons,
    items: Sequence[QueryAttribution],
    dense: ScoreSource | None,
    dims: tuple[int, int],
    options: DknOptions,
) -> None:
    rank = _rank(items, dense, dims)
    top = mask_to_neurons(top_k_mask(rank, options.top_k, within=rank > 0), rank)
    if len(top) < 2:
        return
    encoded = [_encode(lm, q) for q in items]
    result = degenerate_neurons(
        lm,
        encoded,
        top,
        options.t_low,
        options.t_high,
        options.grow,
        options.max_set_size,
        options.chunk_rows,
    )
    fact.degenerate_pairs = list(result.pairs)
    fact.degenerate_sets = [list(s) for s in result.sets]


def select_fact(
    per_language: dict[str, list[QueryAttribution]],
    dims: tuple[int, int],
    all_languages: Sequence[str],
    hparams: dict[str, Any],
    kn: KnOptions,
    likn: LiknOptions,
    uncertainty: UncertaintyOptions,
    dkn: DknOptions,
    dense: ScoreSource | None = None,
    lm: Any = None,
    known: KnownOptions = KnownOptions(),
    carriers: CarrierOptions = CarrierOptions(),
) -> FactNeurons:
    """Every neuron set of one fact from its items, grouped by language.

    Args:
        per_language: The fact's items (its queries' attributions) per language.
        dims: ``(num_layers, d_ff)`` of the model.
        all_languages: Every language of the selection (LIKN needs all of them unless ``likn.min_languages``;
            with the knowledge filter on, all the languages in which the fact is known).
        hparams: The predict run's settings (its coarse τ per language).
        kn: Per-language knowledge neurons.
        likn: Language-independent neurons.
        uncertainty: Uncertainty-aware aggregation (needs ``dense``).
        dkn: Degenerate neurons (needs ``lm``; skipped when it is None).
        dense: Dense scores of the items (for re-thresholding and the uncertainty-aware set).
        lm: The model, for the DKN suppressions and the carriers' direct effects.
        known: The knowledge filter: only the passing queries of the languages where the fact is known enter
            any set; every language's status is recorded in ``known``.
        carriers: Carriers vs upstream neurons (needs ``lm``; skipped when it is None).
    """
    fact = FactNeurons(relation=next(iter(per_language.values()))[0].relation)
    per_language, fact.known = filter_known(per_language, known)
    masks: dict[str, torch.Tensor] = {}
    for language in sorted(per_language):
        queries = sorted(per_language[language], key=lambda i: i.query_id)
        per_language[language] = queries
        coarse = torch.stack([_coarse(q, kn, hparams, dense, dims) for q in queries])
        if kn.adaptive:
            mask, p_used = adaptive_refine(coarse, kn.p, kn.min_neurons, kn.max_neurons, kn.p_step)
        else:
            mask, p_used = refine_by_sharing(coarse, kn.p), kn.p
        rank = torch.stack([_normalised(_sparse_scores(q, *dims)) for q in queries]).mean(0)
        if kn.top_k is not None:
            mask = top_k_mask(rank, kn.top_k, within=mask)
        fact.languages[language] = mask_to_neurons(mask, rank)
        fact.p[language] = p_used
        masks[language] = mask
    # LIKN over the languages that entered selection: without the filter, every language of the run must be
    # there (unless likn.min_languages); with it, the languages where the fact is known, at least two of them
    # (one language alone is independent of nothing) unless the run has only one.
    needed = likn.min_languages or (len(masks) if known.enabled else len(all_languages))
    enough = len(masks) > 1 or len(all_languages) == 1 or not known.enabled
    fact.likn_languages = sorted(masks)
    if masks and len(masks) >= needed and enough:
        shared = language_independent(masks, needed)
        counts = torch.stack(list(masks.values())).sum(0).float()
        fact.language_independent = mask_to_neurons(shared, counts)
    items = [q for lang in sorted(per_language) for q in per_language[lang]]
    if uncertainty.enabled and items:
        if dense is None:
            raise SelectionError(
                "the uncertainty-aware aggregation needs dense attribution scores: " + SCORES_HINT
            )
        fact.uncertainty = _uncertainty(items, dense, uncertainty)
    if lm is not None and dkn.enabled and items:
        _degenerate(lm, fact, items, dense, dims, dkn)
    if lm is not None and carriers.enabled:
        _carriers(lm, fact, per_language, dense, dims, carriers)
    return fact
