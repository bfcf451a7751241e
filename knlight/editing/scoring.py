"""Scoring rows: the target's and the competitors' log-probabilities under the model as it computes now.

A row is a query with a ``target`` object and ``competitors`` (see :mod:`knlight.editing.plan`); its score is a
:class:`~knlight.editing.measures.RowScore`. Forwards go through :meth:`LanguageModel.target_log_probs`, in
chunks of ``chunk_rows`` sequences. Pure torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from knlight.data.records import FactRecord
from knlight.editing.measures import RowScore
from knlight.lm import LanguageModel
from knlight.lm.prompts import EncodedQuery, QueryError
from knlight.neurons.memory import ChunkRows, resolve_chunk_rows

Row = dict[str, Any]


def answer_log_prob(log_probs: torch.Tensor, encoded: EncodedQuery) -> torch.Tensor:
    """log P(answer) = sum over its tokens (gold prefix teacher-forced).

    Args:
        log_probs: ``[answer tokens, vocab]`` log-probabilities at the answer positions.
        encoded: The encoded query and answer.
    """
    tokens = torch.tensor([t for _, t in encoded.targets], device=log_probs.device)
    return log_probs[torch.arange(len(tokens), device=log_probs.device), tokens].sum()


class Scorer:
    """Encodes (query, answer) pairs once and scores rows with the model.

    Args:
        lm: The language model (scored as it computes when called: with or without edits applied).
        chunk_rows: Sequences per forward, or ``"auto"``: as many as fit in ``max_memory_gb`` (planned per call
            for its longest sequence).
        max_memory_gb: Budget of ``chunk_rows="auto"`` in GiB (None: 90 % of the device's free memory).
    """

    def __init__(self, lm: LanguageModel, chunk_rows: ChunkRows, max_memory_gb: float | None = None) -> None:
        self.lm = lm
        self.chunk_rows = chunk_rows
        self.max_memory_gb = max_memory_gb
        self._encoded: dict[tuple[str, str], EncodedQuery] = {}

    def encode(self, query: str, answer: str) -> EncodedQuery:
        """Encoded (query, answer), cached.

        Raises:
            QueryError: The query cannot be encoded with this answer (the message names both).
        """
        key = (query, answer)
        if key not in self._encoded:
            try:
                self._encoded[key] = self.lm.encode(query, answer)
            except QueryError as error:
                raise QueryError(f"query {query!r} with answer {answer!r}: {error}") from error
        return self._encoded[key]

    def score(self, rows: Sequence[Mapping[str, Any]]) -> list[RowScore]:
        """Per row: ``lp_target``, ``first`` (log-probs at the first answer position), ``first_token``,
        ``lp_comp``."""
        sequences: list[tuple[int, int, EncodedQuery]] = []
        for r, row in enumerate(rows):
            sequences.append((r, -1, self.encode(row["query"], row["target"])))
            sequences += [(r, c, self.encode(row["query"], o)) for c, o in enumerate(row["competitors"])]
        out: list[dict[str, Any]] = [{"lp_comp": [None] * len(row["competitors"])} for row in rows]
        longest = max((len(s[2].input_ids) for s in sequences), default=1)
        targets = max((len(s[2].targets) for s in sequences), default=1)
        size = resolve_chunk_rows(self.lm, self.chunk_rows, longest, targets, self.max_memory_gb)
        for start in range(0, len(sequences), size):
            chunk = sequences[start : start + size]
            for (r, c, encoded), log_probs in zip(chunk, self.lm.target_log_probs([s[2] for s in chunk])):
                value = answer_log_prob(log_probs, encoded)
                if c < 0:
                    out[r].update(lp_target=value, first=log_probs[0], first_token=encoded.targets[0][1])
                else:
                    out[r]["lp_comp"][c] = value
        return out  # type: ignore[return-value]  # every key is filled above

    @torch.no_grad()
    def unknown(
        self,
        per_language: Mapping[str, FactRecord],
        languages: Sequence[str],
        items_of: Callable[[FactRecord], list[Row]],
    ) -> bool:
        """True when, in each of ``languages``, the true object does not beat the wrong objects in most of the
        fact's queries (languages without a record or wrong objects do not count).

        Args:
            per_language: The fact's records by language.
            languages: Where the model must not know it.
            items_of: The queries (items) of a record.
        """
        for lang in languages:
            record = per_language.get(lang)
            if record is None or not record.wrong_objects:
                continue
            rows = [
                {**item, "target": record.object, "competitors": record.wrong_objects}
                for item in items_of(record)
            ]
            scores = self.score(rows)
            right = sum(bool(s["lp_target"] > max(s["lp_comp"])) for s in scores)
            if right * 2 > len(rows):
                return False
        return True
