"""The data module of fact-checking: the claims of an RML-LAMA records file, split by fact uuid.

Configs name it ``knlight.tasks.factcheck.FactCheckDataModule`` (that module re-exports it).
"""

from __future__ import annotations

from typing import Any, Literal

from knlight.data.datamodule import RMLLamaDataModule
from knlight.data.records import FactRecord
from knlight.factcheck.claims import Claim, build_claims, split_claims

Item = dict[str, Any]


class FactCheckDataModule(RMLLamaDataModule):
    """Serves fact-checking claims of an RML-LAMA records file, split by fact uuid.

    Items are claim dicts (:meth:`knlight.factcheck.claims.Claim.to_item`: ``claim_id``, ``uuid``,
    ``relation``, ``language``, ``query_id``, ``query``, ``candidate``, ``label``, ``candidate_index`` and
    ``answer`` = ``candidate``). ``val_dataloader`` / ``test_dataloader`` serve the claims of the validation /
    test facts; the training claims are read by the module (:meth:`claims`).

    Args:
        path: Records file (JSONL) with ``wrong_objects``.
        languages: Keep only these language codes; None keeps all.
        relations: Keep only these relation ids; None keeps all.
        max_facts: Keep at most this many facts (seeded, order-independent); None keeps all.
        batch_size: Claims per batch.
        num_workers: DataLoader worker processes.
        split_fractions: Train, val and test fractions of the facts (hash of uuid and seed).
        seed: Seed of the fact subset and of the splits.
        model_kind: Set by the CLI from the model: ``causal`` drops queries that start with [Y].
        queries_per_fact: Queries per (fact, language) that make claims (the first usable ones; null: all).
        max_wrong: Wrong objects per record used as false claims (the first ones; null: all).
    """

    def __init__(
        self,
        path: str,
        languages: list[str] | None = None,
        relations: list[str] | None = None,
        max_facts: int | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
        seed: int = 0,
        model_kind: Literal["masked", "causal"] | None = None,
        queries_per_fact: int | None = 1,
        max_wrong: int | None = None,
    ) -> None:
        super().__init__(
            path, languages, relations, max_facts, batch_size, num_workers, split_fractions, seed, model_kind
        )
        self.queries_per_fact = queries_per_fact
        self.max_wrong = max_wrong

    def claims(self, split: str = "all") -> list[Claim]:
        """The claims of a split (``all``, ``train``, ``val``, ``test``), in claim-id order."""
        return [Claim.from_item(item) for item in self.items(split)]

    def _build_items(self, records: list[FactRecord]) -> dict[str, list[Item]]:
        claims = build_claims(records, self.model_kind, self.queries_per_fact, self.max_wrong)
        parts = split_claims(claims, records, self.split_fractions, self.seed)
        out = {"all": [c.to_item() for c in claims]}
        out.update({name: [c.to_item() for c in part] for name, part in parts.items()})
        return out
