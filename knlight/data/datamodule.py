"""Lightning datamodule over an RML-LAMA records file: one item per (fact, language, query)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import lightning
import torch
from torch.utils.data import DataLoader, Dataset

from knlight.data.records import SLOT, FactRecord, read_records
from knlight.data.splits import SPLIT_NAMES, first_by_hash, split_by_uuid
from knlight.errors import DataError

Item = dict[str, Any]
"""One query of one fact in one language: ``uuid``, ``language``, ``relation``, ``query_id``, ``query``,
``answer``, ``subject``."""

MODEL_KINDS: tuple[str, ...] = ("masked", "causal")

log = logging.getLogger(__name__)


def collate_items(batch: list[Item]) -> list[Item]:
    """Returns the batch of item dicts unchanged: the model owns the tokenizer and tokenises them itself."""
    return list(batch)


class ItemDataset(Dataset):
    """A map-style dataset over a fixed list of items (Lightning adds a DistributedSampler under DDP)."""

    def __init__(self, items: Sequence[Item]) -> None:
        """Keeps the items.

        Args:
            items: The items, in the order they are served.
        """
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Item:
        return self.items[index]


def record_items(record: FactRecord, model_kind: str | None = None) -> list[Item]:
    """Flattens a record into one item per query.

    Args:
        record: The record.
        model_kind: None or "masked" keep every query; "causal" drops queries that start with ``[Y]``
            (nothing before the slot to condition on).

    Returns:
        The items, with ``query_id`` the index of the query within ``record.queries``.
    """
    return [
        {
            "uuid": record.uuid,
            "language": record.language,
            "relation": record.relation,
            "query_id": query_id,
            "query": query,
            "answer": record.object,
            "subject": record.subject,
        }
        for query_id, query in enumerate(record.queries)
        if not (model_kind == "causal" and query.lstrip().startswith(SLOT))
    ]


class RMLLamaDataModule(lightning.LightningDataModule):
    """Serves the queries of an RML-LAMA records file as items for attribution, editing and evaluation.

    Items are dicts ``{"uuid", "language", "relation", "query_id", "query", "answer", "subject"}`` sorted
    by (uuid, language, query_id); batches are plain lists of items (see :func:`collate_items`).
    ``predict_dataloader`` serves every selected fact; ``train/val/test_dataloader`` serve the facts of
    each split, split by uuid (every language of a fact lands in the same split). Any file in the
    record format works, including generated (planted) ones.

    Args:
        path: Records file (JSONL, one record per fact and language), e.g. built with
            ``python -m knlight.data.build``.
        languages: Keep only these language codes; None keeps all languages in the file.
        relations: Keep only these relation ids (e.g. [P36, P37]); None keeps all.
        max_facts: Keep at most this many facts (a seeded choice independent of file order); None keeps all.
        batch_size: Items per batch.
        num_workers: DataLoader worker processes.
        split_fractions: Train, val and test fractions of the facts (hash of uuid and seed; stable when
            facts are added or filtered).
        seed: Seed of the fact subset, the splits and the training shuffle.
        model_kind: None or "masked" keep every query; "causal" drops queries that start with [Y].
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
    ) -> None:
        super().__init__()
        if model_kind is not None and model_kind not in MODEL_KINDS:
            raise DataError(f"model_kind={model_kind!r}: choose None, 'masked' or 'causal'.")
        if max_facts is not None and max_facts < 1:
            raise DataError(f"max_facts={max_facts}: give a positive number, or None to keep every fact.")
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size}: give a positive number.")
        self.save_hyperparameters()
        self.path = path
        self.languages = None if languages is None else list(languages)
        self.relations = None if relations is None else list(relations)
        self.max_facts = max_facts
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.split_fractions = tuple(split_fractions)
        self.seed = seed
        self.model_kind = model_kind
        self._records: list[FactRecord] | None = None
        self._items: dict[str, list[Item]] | None = None

    def records(self) -> list[FactRecord]:
        """Returns the selected records (all their queries, with wrong objects), loading them if needed."""
        if self._records is None:
            self._records = self._select(read_records(self.path))
        return self._records

    def items(self, split: str = "all") -> list[Item]:
        """Returns the items of a split.

        Args:
            split: "all" (every selected fact), "train", "val" or "test".

        Returns:
            The items, sorted by (uuid, language, query_id).
        """
        if self._items is None:
            self._items = self._build_items(self.records())
        if split not in self._items:
            raise DataError(f"split {split!r}: choose one of all, {', '.join(SPLIT_NAMES)}.")
        return self._items[split]

    def setup(self, stage: str | None = None) -> None:
        """Loads and splits the records (on every process; reading is cheap and deterministic)."""
        self.items()

    def predict_dataloader(self) -> DataLoader:
        """Every item of the selected facts, in order."""
        return self._loader(self.items("all"), shuffle=False)

    def train_dataloader(self) -> DataLoader:
        """Items of the training facts, shuffled with the seed."""
        return self._loader(self.split_items("train"), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Items of the validation facts, in order (an empty split is logged: validation is then skipped)."""
        return self._loader(self.split_items("val", required=False), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Items of the test facts, in order."""
        return self._loader(self.split_items("test"), shuffle=False)

    def split_items(self, split: str, required: bool = True) -> list[Item]:
        """The items of a split; an empty split is an error (or a warning when not ``required``).

        Raises:
            DataError: Naming the split fractions to change, when a required split has no item.
        """
        items = self.items(split)
        if not items:
            facts = len({record.uuid for record in self.records()})
            message = (
                f"{self.path}: the {split} split is empty: split_fractions={list(self.split_fractions)} "
                f"(seed {self.seed}) puts none of the {facts} selected facts in it. Set "
                "data.init_args.split_fractions (e.g. [0, 0, 1] to test every fact) or select more facts."
            )
            if required:
                raise DataError(message)
            log.warning("%s", message)
        return items

    def _loader(self, items: list[Item], shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            ItemDataset(items),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate_items,
            generator=generator,
        )

    def _select(self, records: list[FactRecord]) -> list[FactRecord]:
        """Applies the language, relation and max_facts filters, naming the one that empties the selection."""
        for name, key in (("languages", "language"), ("relations", "relation")):
            wanted = getattr(self, name)
            if wanted is None:
                continue
            available = sorted({getattr(record, key) for record in records})
            unknown = [value for value in wanted if value not in available]
            if unknown:
                raise DataError(
                    f"{name}={wanted}: {', '.join(unknown)} not in {self.path}; available: "
                    f"{', '.join(available)}. Fix the {name} argument of the datamodule."
                )
            records = [record for record in records if getattr(record, key) in set(wanted)]
        if self.max_facts is not None:
            kept = set(first_by_hash((record.uuid for record in records), self.max_facts, self.seed))
            records = [record for record in records if record.uuid in kept]
        return sorted(records, key=lambda record: (record.uuid, record.language))

    def _build_items(self, records: list[FactRecord]) -> dict[str, list[Item]]:
        items: dict[str, list[Item]] = {"all": []}
        emptied: list[FactRecord] = []
        for record in records:
            kept = record_items(record, self.model_kind)
            items["all"].extend(kept)
            if record.queries and not kept:
                emptied.append(record)
        dropped = sum(len(r.queries) for r in records) - len(items["all"])
        if dropped:
            example = f" (e.g. uuid={emptied[0].uuid} language={emptied[0].language})" if emptied else ""
            log.warning(
                "%s: %d queries dropped for a causal model (the object slot %s comes first, nothing before it to "
                "condition on); %d records lost every query%s and are not served",
                self.path, dropped, SLOT, len(emptied), example,
            )  # fmt: skip
        if not items["all"]:
            raise DataError(
                f"{self.path}: no query left after model_kind={self.model_kind!r} (every query starts with "
                f"{SLOT}); use model_kind=None or another file."
            )
        for split, split_records in split_by_uuid(records, self.split_fractions, self.seed).items():
            items[split] = [
                item for record in split_records for item in record_items(record, self.model_kind)
            ]
        return items
