"""The training schedule of a fit as a loader that resumes mid-epoch.

Resumption: :mod:`knlight.callbacks.fit_resume`.

A schedule is a fixed list of rows laid out in global batches (:func:`knlight.editing.plan.schedule`).
Lightning restores a mid-epoch checkpoint's counters but, for a plain DataLoader, iterates the epoch from its first
batch again, so the resumed run would train on batches it already trained on. :class:`ScheduleLoader` implements
Lightning's stateful-loader protocol: the checkpoint records how many batches were trained, and the resumed
iteration starts at the first batch that was not.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch.utils.data import DataLoader, DistributedSampler

from knlight.callbacks.fit_resume import FitResumeError
from knlight.data.datamodule import ItemDataset


def schedule_digest(rows: Sequence[dict[str, Any]]) -> str:
    """SHA-256 of a training schedule (a resumed fit must continue the schedule it was trained on)."""
    return hashlib.sha256(json.dumps(list(rows), sort_keys=True, default=str).encode()).hexdigest()


class ScheduleSampler(DistributedSampler):
    """This process's rows of the schedule in order, from batch ``skip_batches`` on.

    The length stays the whole schedule's (Lightning counts the batches of a resumed epoch from where it
    stopped); only the iteration skips the batches trained before the checkpoint. Global batch k is the rows
    ``[k·B·W, (k+1)·B·W)`` (B rows per process, W processes), sharded in order: each process's k-th batch.
    """

    def __init__(self, dataset: ItemDataset, batch_size: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.batch_size = batch_size
        self.skip_batches = 0

    def __iter__(self) -> Iterator[int]:
        skip, self.skip_batches = self.skip_batches, 0  # only the resumed epoch starts late
        return iter(list(super().__iter__())[skip * self.batch_size :])


class ScheduleLoader(DataLoader):
    """The training schedule's loader; resumable mid-epoch (Lightning's stateful-loader protocol).

    Lightning stores :meth:`state_dict` in every checkpoint and, when a fit resumes, gives it back to
    :meth:`load_state_dict` before iterating: the iteration then starts at the first batch not yet trained.

    Args:
        dataset: The schedule's rows.
        sampler: Its :class:`ScheduleSampler`.
        batches_done: Batches of the current epoch already trained (read when a checkpoint is saved).
        **kwargs: Passed to :class:`~torch.utils.data.DataLoader`.
    """

    def __init__(
        self, dataset: ItemDataset, sampler: ScheduleSampler, batches_done: Callable[[], int], **kwargs: Any
    ) -> None:
        super().__init__(dataset, sampler=sampler, **kwargs)
        self.batches_done = batches_done
        self.rows = len(dataset)

    def state_dict(self) -> dict[str, int]:
        return {"batches_done": int(self.batches_done()), "rows": self.rows}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if state_dict.get("rows") != self.rows:
            raise FitResumeError(
                f"the checkpoint was saved with a schedule of {state_dict.get('rows')} rows, this run has "
                f"{self.rows}; start a new run instead (--trainer.callbacks.init_args.resume new)"
            )
        assert isinstance(self.sampler, ScheduleSampler)
        self.sampler.skip_batches = int(state_dict["batches_done"])
