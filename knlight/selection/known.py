"""The knowledge filter: which (fact, language, query) the model knows, so that only those enter selection.

A query *passes* when the model ranks the gold answer's first token among its ``max_rank`` most likely tokens
(the ``rank`` ``knlight predict`` records) or gives the answer P >= ``min_prob`` (:class:`KnownOptions`). A query
with neither a rank nor a P (a hand-written attributions file) cannot be judged and passes. A (fact, language)
is *known* when at least ``min_queries`` of its queries pass. Pure Python.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from knlight.neurons.neuron_annotations import KnownStatus
from knlight.selection.options import KnownOptions
from knlight.selection.reader import QueryAttribution, SelectionError


def check_known_options(options: KnownOptions) -> None:
    """Raises:
    SelectionError: A filter that is on but tests nothing, or a bound out of range (naming the option)."""
    if options.enabled and options.max_rank is None and options.min_prob is None:
        raise SelectionError(
            "known.max_rank and known.min_prob are both None: the knowledge filter would test nothing; set one "
            "of them, or turn the filter off with --known.enabled false"
        )
    if options.max_rank is not None and options.max_rank < 1:
        raise SelectionError(f"known.max_rank={options.max_rank}: the gold rank starts at 1; choose >= 1")
    if options.min_prob is not None and not 0.0 <= options.min_prob <= 1.0:
        raise SelectionError(f"known.min_prob={options.min_prob}: choose a probability in [0, 1]")
    if options.min_queries < 1:
        raise SelectionError(f"known.min_queries={options.min_queries}: choose >= 1")


def describe(options: KnownOptions) -> str:
    """The pass rule in words, e.g. ``gold rank <= 10 or P >= 0.1``."""
    parts = []
    if options.max_rank is not None:
        parts.append(f"gold rank <= {options.max_rank}")
    if options.min_prob is not None:
        parts.append(f"P >= {options.min_prob:g}")
    return " or ".join(parts) or "every query"


def query_passes(item: QueryAttribution, options: KnownOptions) -> bool:
    """Whether the model knows the answer of one query (see the module documentation)."""
    checks = []
    if options.max_rank is not None and item.rank is not None:
        checks.append(item.rank <= options.max_rank)
    if options.min_prob is not None and item.prob is not None and item.prob == item.prob:
        checks.append(item.prob >= options.min_prob)
    return any(checks) if checks else True


def known_status(queries: Sequence[QueryAttribution], options: KnownOptions) -> KnownStatus:
    """The filter's verdict on one (fact, language) from its queries."""
    passed = sorted(q.query_id for q in queries if query_passes(q, options))
    return KnownStatus(len(passed) >= options.min_queries, passed, len(queries))


def filter_known(
    per_language: Mapping[str, Sequence[QueryAttribution]], options: KnownOptions
) -> tuple[dict[str, list[QueryAttribution]], dict[str, KnownStatus]]:
    """The queries that enter selection, and every language's status.

    Returns:
        With the filter on, the passing queries of the known languages only; off, every query of every language.
        The status of each language is returned either way (the neuron file records it).
    """
    status = {language: known_status(queries, options) for language, queries in per_language.items()}
    if not options.enabled:
        return {language: list(queries) for language, queries in per_language.items()}, status
    kept = {
        language: [q for q in queries if q.query_id in status[language].query_ids]
        for language, queries in per_language.items()
        if status[language].known
    }
    return kept, status
