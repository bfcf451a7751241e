"""Claims for fact-checking, built from RML-LAMA records; the positive class is defined here, once.

A claim states that a candidate object fills a fact's query in one language: the record's true object gives a
true claim, each of its ``wrong_objects`` a false one. **The positive class is "the claim is false"**
(:data:`FALSE_CLAIM`): a detector flags a claim when it thinks the claim is false, precision is the fraction
of flagged claims that are false, recall the fraction of false claims that are flagged. (The AMIG code swapped
false positives and false negatives; knlight derives every count from :data:`FALSE_CLAIM` alone.)

Claims are split by fact uuid with :func:`knlight.data.split_by_uuid`, so every language and every candidate
of a fact land in the same split. Pure Python, no torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from knlight.data.records import SLOT, FactRecord
from knlight.data.splits import SPLIT_NAMES, split_by_uuid
from knlight.errors import DataError

FALSE_CLAIM = 1
"""Label of a false claim: the positive class of every fact-checking metric."""
TRUE_CLAIM = 0
"""Label of a true claim (the negative class)."""
POSITIVE_CLASS = "false claim"
"""What the positive class means, for tables and figure captions."""


@dataclass(frozen=True)
class Claim:
    """One claim: ``candidate`` fills the object slot of ``query``.

    Attributes:
        claim_id: Position of the claim in the sorted list of every claim of the file (the same on every
            process); used to remove the duplicates that distributed samplers add.
        uuid: The fact.
        relation: Relation id.
        language: Language code.
        query_id: Index of the query within the record's queries.
        query: Cloze query with the object slot ``[Y]``.
        candidate: The object the claim asserts.
        label: :data:`FALSE_CLAIM` (1) when ``candidate`` is a wrong object, :data:`TRUE_CLAIM` (0) when it is
            the record's object.
        candidate_index: 0 for the true object, k for the k-th wrong object.
    """

    claim_id: int
    uuid: str
    relation: str
    language: str
    query_id: int
    query: str
    candidate: str
    label: int
    candidate_index: int

    @property
    def is_false(self) -> bool:
        """True when the claim is false (the positive class)."""
        return self.label == FALSE_CLAIM

    def to_item(self) -> dict[str, Any]:
        """The claim as a data item (a dict; ``answer`` is the candidate, as the neuron code expects)."""
        return {**asdict(self), "answer": self.candidate}

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> Claim:
        """Inverse of :meth:`to_item`."""
        return cls(**{k: item[k] for k in cls.__dataclass_fields__})


def label_of(candidate: str, true_object: str) -> int:
    """:data:`FALSE_CLAIM` when the candidate is not the true object, else :data:`TRUE_CLAIM`."""
    return TRUE_CLAIM if candidate == true_object else FALSE_CLAIM


def usable_queries(record: FactRecord, model_kind: str | None, queries_per_fact: int | None) -> list[int]:
    """Indices of the record's queries that make claims.

    Args:
        record: The record.
        model_kind: ``"causal"`` drops queries that start with the slot (nothing to condition on); None or
            ``"masked"`` keep every query.
        queries_per_fact: Keep the first this many usable queries (None: all).

    Returns:
        Query indices in record order.
    """
    keep = [
        q for q, query in enumerate(record.queries)
        if not (model_kind == "causal" and query.lstrip().startswith(SLOT))
    ]  # fmt: skip
    return keep if queries_per_fact is None else keep[:queries_per_fact]


def build_claims(
    records: Iterable[FactRecord],
    model_kind: str | None = None,
    queries_per_fact: int | None = 1,
    max_wrong: int | None = None,
) -> list[Claim]:
    """Every claim of the records, sorted by (uuid, language, query_id, candidate_index), ids 0..n-1.

    Args:
        records: RML-LAMA records (with ``wrong_objects``).
        model_kind: ``"causal"`` drops queries that start with ``[Y]``.
        queries_per_fact: Queries per (fact, language) that make claims (the first usable ones; None: all).
            AMIG used one template per relation.
        max_wrong: Use at most this many wrong objects per record (the first ones; None: all).

    Returns:
        The claims.

    Raises:
        DataError: If no record has wrong objects (no false claim could be made) or nothing is left.
    """
    if queries_per_fact is not None and queries_per_fact < 1:
        raise DataError(f"queries_per_fact={queries_per_fact}: give a positive number, or None for all.")
    if max_wrong is not None and max_wrong < 1:
        raise DataError(f"max_wrong={max_wrong}: give a positive number, or None for all wrong objects.")
    records = sorted(records, key=lambda r: (r.uuid, r.language))
    if records and not any(r.wrong_objects for r in records):
        raise DataError(
            "no record has wrong_objects, so no false claim can be made; build the records with wrong "
            "objects (the builders add them) or add a 'wrong_objects' list to each record."
        )
    rows: list[tuple[FactRecord, int, str, int]] = []
    for record in records:
        candidates = [record.object, *record.wrong_objects[:max_wrong]]
        for query_id in usable_queries(record, model_kind, queries_per_fact):
            for index, candidate in enumerate(candidates):
                rows.append((record, query_id, candidate, index))
    if not rows:
        raise DataError(
            f"no claim left (model_kind={model_kind!r} drops queries that start with {SLOT}); use another "
            "file or model."
        )
    return [
        Claim(
            claim_id=i,
            uuid=record.uuid,
            relation=record.relation,
            language=record.language,
            query_id=query_id,
            query=record.queries[query_id],
            candidate=candidate,
            label=label_of(candidate, record.object),
            candidate_index=index,
        )
        for i, (record, query_id, candidate, index) in enumerate(rows)
    ]


def split_claims(
    claims: Sequence[Claim], records: Iterable[FactRecord], fractions: Sequence[float], seed: int
) -> dict[str, list[Claim]]:
    """Claims of the train, val and test facts (``split_by_uuid`` of the records), each in claim order."""
    split_of = {
        record.uuid: name for name, part in split_by_uuid(records, fractions, seed).items() for record in part
    }
    out: dict[str, list[Claim]] = {name: [] for name in SPLIT_NAMES}
    for claim in claims:
        out[split_of[claim.uuid]].append(claim)
    return out


def claim_counts(claims: Sequence[Claim]) -> dict[str, int]:
    """Facts, claims, false claims (positives) and true claims of a list of claims."""
    false = sum(c.is_false for c in claims)
    return {
        "facts": len({c.uuid for c in claims}),
        "claims": len(claims),
        "false_claims": false,
        "true_claims": len(claims) - false,
    }
