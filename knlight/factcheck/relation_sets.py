"""Relation sets (AMIG): each relation's neurons, from the degenerate knowledge neurons of its training claims.

**The search** (:func:`search_relation_sets`, no Trainer needed): for each *true* training claim, IG of every
layer → its top-K neurons → their DKN pairs (AMIG Algorithm 1, :func:`knlight.neurons.selection.
degenerate_neurons`), and larger degenerate sets when ``use_sets``; or the pairs (and sets) of a neuron file,
for the training facts only.

**The rule** (:func:`relation_sets`): the groups are counted per relation (each member of a group once); the
relation's set is every neuron whose count is more than ``t · max count`` (AMIG: t = 0.7). When a relation has
training facts but no DKN pair (e.g. a random model), the ``top`` fallback applies the same rule to the counts
of the facts' top-K neurons instead; a relation without any training fact uses the pooled counts of all
relations. The source of each set (``dkn``, ``top``, ``pooled-dkn``, ``pooled-top``) is recorded, never hidden.

The search of one claim yields integer rows (:func:`dkn_rows`, columns :data:`ROW_COLUMNS`), so a caller can
search different claims on different processes, gather the rows and count them as if one process had searched
them all (:func:`search_relation_sets` takes the ``shard`` and ``gather`` steps as arguments).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from knlight.factcheck.claims import TRUE_CLAIM, Claim
from knlight.factcheck.readouts import encode_claim
from knlight.lm.prompts import EncodedQuery
from knlight.neurons.attribution import attribute_batch
from knlight.neurons.ig import IGOptions
from knlight.neurons.neuron import Neuron
from knlight.neurons.neuron_file import read_neuron_file
from knlight.neurons.selection import degenerate_neurons, mask_to_neurons, top_k_mask

log = logging.getLogger(__name__)

SetSource = Literal["dkn", "top", "pooled-dkn", "pooled-top"]
Groups = Mapping[str, Sequence[Sequence[Sequence[Neuron]]]]
"""Per relation, one list per training claim of its degenerate groups (each a sequence of neurons)."""
Tops = Mapping[str, Sequence[Sequence[Neuron]]]
"""Per relation, the top-K neurons of each training claim."""
ROW_COLUMNS: tuple[str, ...] = ("claim_id", "group", "member", "layer", "index")
"""Columns of a search row: ``group`` −1 is the claim's top-K, k ≥ 0 its k-th degenerate group."""
TOP_GROUP = -1
"""The ``group`` of the rows that list a claim's top-K neurons."""


@dataclass(frozen=True)
class DKNSearch:
    """How the DKN of a training claim are searched and counted into a relation's set."""

    ig: IGOptions = field(default_factory=IGOptions)
    """How the integrated gradients that rank a claim's neurons are computed (AMIG: zero baseline, prob)."""
    top_k: int = 20
    """Top-K neurons of a training claim searched for DKN pairs (AMIG: 20; at least 2)."""
    t_low: float = 0.2
    """A single neuron whose suppression drops P by at most this (relative, in [0, 1]) is a DKN candidate."""
    t_high: float = 0.25
    """A pair is degenerate when suppressing both drops P by more than this (in [0, 1])."""
    t: float = 0.7
    """A relation's set keeps the neurons counted in more than ``t · max`` of its groups (AMIG: 0.7)."""
    use_sets: bool = False
    """Also count the members of larger degenerate sets (greedy growth beyond pairs)."""
    fallback: Literal["top", "none"] = "top"
    """``top``: a relation whose training claims have no DKN pair uses their top-K counts; ``none``: error."""
    chunk_rows: int | Literal["auto"] = 256
    """Rows per forward of the DKN search (a memory knob; results do not depend on it), or ``auto``: planned
    from ``max_memory_gb``."""
    max_memory_gb: float | None = None
    """Budget of ``chunk_rows: auto`` in GiB (null: 90 % of what the device has free)."""


@dataclass
class RelationSet:
    """The neuron set of one relation.

    Attributes:
        relation: Relation id.
        neurons: The set, by decreasing count then (layer, index).
        source: ``dkn`` (DKN pair counts), ``top`` (top-K counts: no DKN pair among the relation's training
            facts), ``pooled-dkn`` / ``pooled-top`` (the relation has no training fact: counts of all
            relations).
        train_claims: Training (true) claims of the relation that contributed.
        pairs: DKN groups (pairs, and larger sets when counted) that were counted.
        counts: Count of each neuron of the set.
    """

    relation: str
    neurons: list[Neuron]
    source: SetSource
    train_claims: int
    pairs: int
    counts: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (neurons as ``[layer, index]``)."""
        return {
            "relation": self.relation,
            "source": self.source,
            "train_claims": self.train_claims,
            "pairs": self.pairs,
            "neurons": [list(n) for n in self.neurons],
            "counts": self.counts,
        }


# -- the search
# --------------------------------------------------------------------------------------------------------


def dkn_rows(lm: Any, claim_id: int, encoded: EncodedQuery, search: DKNSearch) -> list[list[int]]:
    """The top-K neurons and degenerate groups of one claim, as :data:`ROW_COLUMNS` rows.

    Args:
        lm: A :class:`knlight.LanguageModel`.
        claim_id: Copied into every row.
        encoded: The claim's query encoded with its candidate as the answer.
        search: The search settings.
    """
    with torch.enable_grad():
        scores = attribute_batch(lm, [encoded], completeness=False, **search.ig.kwargs()).scores[0]
    top = mask_to_neurons(top_k_mask(scores, search.top_k), scores)
    result = degenerate_neurons(
        lm,
        [encoded],
        top,
        search.t_low,
        search.t_high,
        grow=search.use_sets,
        chunk_rows=search.chunk_rows,
        max_memory_gb=search.max_memory_gb,
    )
    rows = [[claim_id, TOP_GROUP, m, layer, index] for m, (layer, index) in enumerate(top)]
    groups: list[Sequence[Neuron]] = [*result.pairs, *(result.sets if search.use_sets else [])]
    for g, group in enumerate(groups):
        rows.extend([claim_id, g, m, layer, index] for m, (layer, index) in enumerate(group))
    return rows


def groups_from_rows(
    claims: Sequence[Claim], rows: Iterable[Sequence[int]]
) -> tuple[dict[str, list[list[tuple[Neuron, ...]]]], dict[str, list[list[Neuron]]]]:
    """Per relation, the degenerate groups and the top-K of each claim, from the search rows of the claims.

    Args:
        claims: The searched claims, in the order their groups are listed (a claim without rows has none).
        rows: :data:`ROW_COLUMNS` rows, in any order.
    """
    by_claim: dict[int, dict[int, list[tuple[int, Neuron]]]] = defaultdict(lambda: defaultdict(list))
    for claim_id, group, member, layer, index in rows:
        by_claim[claim_id][group].append((member, (layer, index)))
    groups: dict[str, list[list[tuple[Neuron, ...]]]] = defaultdict(list)
    tops: dict[str, list[list[Neuron]]] = defaultdict(list)
    for claim in claims:
        found = by_claim.get(claim.claim_id, {})
        members = {g: [n for _, n in sorted(ms)] for g, ms in found.items()}
        tops[claim.relation].append(members.get(TOP_GROUP, []))
        groups[claim.relation].append([tuple(members[g]) for g in sorted(members) if g >= 0])
    return groups, tops


def groups_from_neuron_file(
    path: str | Path, lm: Any, train: Sequence[Claim], use_sets: bool = False
) -> tuple[dict[str, list[list[tuple[Neuron, ...]]]], dict[str, list[list[Neuron]]]]:
    """Per relation, the degenerate groups and the neurons of each training fact found in a neuron file.

    Args:
        path: The neuron file (its ``degenerate`` pairs and sets; facts outside ``train`` are ignored).
        lm: The language model (the file's neurons must fit its layers and width).
        train: The training claims (their uuids and relations).
        use_sets: Also count the file's larger degenerate sets.
    """
    neurons = read_neuron_file(path, lm.num_layers, lm.d_ff)
    relation_of = {c.uuid: c.relation for c in train}
    used = sorted(uuid for uuid in neurons.facts if uuid in relation_of)
    groups: dict[str, list[list[tuple[Neuron, ...]]]] = defaultdict(list)
    tops: dict[str, list[list[Neuron]]] = defaultdict(list)
    for uuid in used:
        fact = neurons.facts[uuid]
        fact_groups = [*fact.degenerate_pairs, *(fact.degenerate_sets if use_sets else [])]
        groups[relation_of[uuid]].append([tuple(g) for g in fact_groups])
        tops[relation_of[uuid]].append(
            list(dict.fromkeys(n for lang in sorted(fact.languages) for n in fact.languages[lang]))
        )
    log.info("DKN from %s: %d train facts (of %d in the file)", path, len(used), len(neurons.facts))
    return groups, tops


def search_relation_sets(
    lm: Any,
    train: Sequence[Claim],
    relations: Iterable[str],
    search: DKNSearch = DKNSearch(),
    neurons: str | Path | None = None,
    encode: Callable[[Claim], EncodedQuery] | None = None,
    shard: Callable[[Sequence[Claim]], Sequence[Claim]] | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, RelationSet]:
    """Each relation's neuron set from the training claims (see the module documentation).

    Args:
        lm: A :class:`knlight.LanguageModel`.
        train: The training claims (the true ones are searched).
        relations: Every relation to be checked (validation and test relations included).
        search: The search settings.
        neurons: Take the degenerate groups from this neuron file (training facts only) instead of searching.
        encode: Encodes a claim (default :func:`knlight.factcheck.readouts.encode_claim`; e.g. a cached one).
        shard: The claims this process searches (default all of them).
        gather: Given this process's ``[n, 5]`` search rows, the rows of every process (default: keep them).

    Raises:
        ValueError: When a relation ends up with no neuron (see :func:`relation_sets`).
    """
    if neurons is not None:
        groups, tops = groups_from_neuron_file(neurons, lm, train, search.use_sets)
        return relation_sets(relations, groups, tops, search.t, search.fallback)
    true_claims = [c for c in train if c.label == TRUE_CLAIM]
    mine = shard(true_claims) if shard is not None else true_claims
    started = time.perf_counter()
    local = [
        row
        for claim in mine
        for row in dkn_rows(lm, claim.claim_id, encode(claim) if encode else encode_claim(lm, claim), search)
    ]
    log.info("DKN search on %d training claims in %.1fs", len(mine), time.perf_counter() - started)
    rows = torch.tensor(local, dtype=torch.long).reshape(-1, len(ROW_COLUMNS))
    if gather is not None:
        rows = gather(rows)
    groups, tops = groups_from_rows(true_claims, rows.tolist())
    return relation_sets(relations, groups, tops, search.t, search.fallback)


# -- the rule
# ----------------------------------------------------------------------------------------------------------


def frequent(counts: Mapping[Neuron, int], t: float) -> list[Neuron]:
    """Neurons whose count is more than ``t · max count`` (AMIG's rule), by decreasing count then position."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1] (a fraction of the largest count), got {t}")
    if not counts:
        return []
    top = max(counts.values())
    return sorted((n for n, c in counts.items() if c > t * top), key=lambda n: (-counts[n], n))


def relation_sets(
    relations: Iterable[str],
    groups: Groups,
    tops: Tops,
    t: float = 0.7,
    fallback: Literal["top", "none"] = "top",
) -> dict[str, RelationSet]:
    """Each relation's neuron set from its training claims' degenerate groups (see the module documentation).

    Args:
        relations: Every relation to be checked (validation and test relations included).
        groups: Per relation, one list per training claim of its degenerate groups (DKN pairs, and larger
            sets when wanted); each member of a group counts once.
        tops: Per relation, the top-K neurons of each training claim (for the ``top`` fallback).
        t: Keep neurons counted more than ``t · max``.
        fallback: ``top``: a relation without DKN pairs uses its top-K counts; ``none``: that is an error.

    Returns:
        ``{relation: RelationSet}``.

    Raises:
        ValueError: When a relation ends up with no neuron (no training data at all, or ``fallback: none``
            and no DKN pair).
    """

    def group_counts(lists: Iterable[Sequence[Sequence[Neuron]]]) -> tuple[Counter[Neuron], int]:
        counts: Counter[Neuron] = Counter()
        n = 0
        for claim_groups in lists:
            for group in claim_groups:
                counts.update(dict.fromkeys(group, 1))
                n += 1
        return counts, n

    def top_counts(lists: Iterable[Sequence[Neuron]]) -> Counter[Neuron]:
        return Counter(n for top in lists for n in dict.fromkeys(top))

    out: dict[str, RelationSet] = {}
    pooled_groups, pooled_n = group_counts(g for r in groups for g in groups[r])
    pooled_top = top_counts(x for r in tops for x in tops[r])
    for relation in sorted(set(relations)):
        n_claims = len(groups.get(relation, ()))
        counts, n_pairs = group_counts(groups.get(relation, ()))
        source: SetSource = "dkn"
        if not n_claims:
            counts, n_pairs, source = pooled_groups, pooled_n, "pooled-dkn"
        if not counts and fallback == "top":
            counts = top_counts(tops.get(relation, ())) if n_claims else pooled_top
            source = "top" if n_claims else "pooled-top"
        neurons = frequent(counts, t)
        if not neurons:
            why = (
                "no DKN pair among its training facts (use fallback: top)" if n_claims
                else "no training fact and no pooled neuron"
            )  # fmt: skip
            raise ValueError(f"relation {relation}: no neuron set ({why})")
        out[relation] = RelationSet(
            relation, neurons, source, n_claims, n_pairs, [counts[n] for n in neurons]
        )
    return out
