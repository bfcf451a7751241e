"""Editing metrics: running means per (method, role, measure, language), DDP-safe, and their result table.

Names are ``method/role/measure/language`` with ``language = "all"`` for the mean over every language, e.g.
``edited/generality_cross/top1/de``. Roles and measures (see :mod:`knlight.tasks.editing`):

* ``reliability``: the edit queries; ``generality_lang``: the fact's other rephrasings in the edit language;
  ``generality_cross``: its queries in every other language; ``generality``: both;
  measures ``top1`` (first token of the new object is the argmax), ``rank`` (the new object's log-probability
  beats every competitor's; in editing the competitor is the old object), ``p_new``, ``p_old``;
* ``locality``: unrelated facts; ``top1`` (the argmax at the answer position is unchanged), ``kl``
  (KL(edited ‖ unedited) of the next-token distribution there);
* ``facts`` (enhancement): ``top1`` and ``rank`` against the wrong objects (accuracy), ``fixed`` (share of
  queries answered wrongly before that are right after), ``broken`` (right before, wrong after).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torchmetrics import Metric

from knlight.io import write_text_atomically


class MeanCount(Metric):
    """Mean of all values seen (on every process) and their number; ``compute`` returns ``[mean, count]``."""

    full_state_update = False
    total: torch.Tensor
    count: torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor) -> None:
        values = values.detach().reshape(-1)
        self.total += values.to(torch.float64).sum()
        self.count += values.numel()

    def compute(self) -> torch.Tensor:
        mean = self.total / self.count if self.count > 0 else torch.tensor(float("nan"), dtype=torch.float64)
        return torch.stack([mean, self.count.to(torch.float64)])


def metric_name(method: str, role: str, measure: str, language: str) -> str:
    """``method/role/measure/language``."""
    return f"{method}/{role}/{measure}/{language}"


class EditingMetrics(nn.Module):
    """A fixed set of :class:`MeanCount` metrics addressed by name.

    Every process must create the same names (they are synchronised name by name): build them from data that
    all ranks share, before any sharding.

    Args:
        names: Metric names (``method/role/measure/language``); ``language = "all"`` is added for each.
    """

    def __init__(self, names: Iterable[str]) -> None:
        super().__init__()
        full: set[str] = set()
        for name in names:
            method, role, measure, _ = name.split("/")
            full |= {name, metric_name(method, role, measure, "all")}
        self.names = sorted(full)
        # ModuleDict keys may not contain "."; the index keeps names free-form.
        self.metrics = nn.ModuleList(MeanCount() for _ in self.names)
        self._index = {name: k for k, name in enumerate(self.names)}

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def update(self, method: str, role: str, measure: str, language: str, values: torch.Tensor) -> None:
        """Add values to ``method/role/measure/language`` and to its ``all`` aggregate."""
        for lang in (language, "all"):
            cast(MeanCount, self.metrics[self._index[metric_name(method, role, measure, lang)]]).update(
                values
            )

    def compute(self) -> dict[str, tuple[float, int]]:
        """``{name: (mean, count)}`` over every process (NaN mean when nothing was counted)."""
        out = {}
        for name, metric in zip(self.names, self.metrics):
            mean, count = cast(MeanCount, metric).compute().tolist()
            out[name] = (float(mean), int(count))
        return out

    def reset(self) -> None:
        for metric in self.metrics:
            cast(MeanCount, metric).reset()


TABLE_FIELDS = ("method", "role", "measure", "language", "value", "count")


def result_table(values: dict[str, tuple[float, int]]) -> list[dict[str, Any]]:
    """One row per metric with a count: ``method, role, measure, language, value, count``."""
    rows = []
    for name, (value, count) in sorted(values.items()):
        if count == 0:
            continue
        method, role, measure, language = name.split("/")
        rows.append(dict(zip(TABLE_FIELDS, (method, role, measure, language, value, count))))
    return rows


def write_table(rows: list[dict[str, Any]], directory: str | Path, stem: str, extra: dict[str, Any]) -> Path:
    """Write ``<stem>.json`` (``extra`` + ``rows``) and ``<stem>.csv`` in ``directory``; returns the first.

    Each file is written atomically: a crash or a full disk leaves the previous file (or none), never a
    truncated one.
    """
    directory = Path(directory)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=TABLE_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomically(directory / f"{stem}.csv", buffer.getvalue())
    path = directory / f"{stem}.json"
    write_text_atomically(path, json.dumps({**extra, "rows": rows}, indent=1, ensure_ascii=False) + "\n")
    return path
