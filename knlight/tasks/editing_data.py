"""The data module of editing runs: an RML-LAMA records file served as the rows its module plans."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch.utils.data import DataLoader, DistributedSampler

from knlight.data.datamodule import ItemDataset, RMLLamaDataModule, collate_items
from knlight.tasks.schedule import ScheduleLoader, ScheduleSampler

Row = dict[str, Any]


@runtime_checkable
class RowSource(Protocol):
    """A module that plans the rows of each stage (:class:`~knlight.tasks.editing.EditingModule`)."""

    def rows(self, stage: str) -> list[Row]:
        """``train`` (the schedule, in global batches) or ``val`` / ``test`` (the evaluation rows)."""
        ...


class EditingDataModule(RMLLamaDataModule):
    """An RML-LAMA records file served as the rows of an :class:`~knlight.tasks.editing.EditingModule`.

    Same arguments as :class:`~knlight.data.datamodule.RMLLamaDataModule` (which facts, languages and
    relations are selected; ``split_fractions`` and ``seed`` decide the train split that ``edits: derive``
    edits; ``batch_size`` is the per-process batch). The rows themselves come from the module: the training
    schedule and the evaluation rows (identical for validate and test).
    """

    def _task(self) -> RowSource:
        module = self.trainer.lightning_module if self.trainer is not None else None
        if not isinstance(module, RowSource):
            raise RuntimeError("EditingDataModule serves an EditingModule; pair them in the config")
        return module

    def _rows_loader(self, rows: list[Row]) -> DataLoader:
        # Rows are laid out in global batches: shard them in order (Lightning would shuffle a training set).
        dataset = ItemDataset(rows)
        trainer = self.trainer
        sampler: DistributedSampler | None = None
        if trainer is not None and trainer.world_size > 1:
            sampler = DistributedSampler(dataset, shuffle=False, **(trainer.distributed_sampler_kwargs or {}))
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_items,
        )

    def train_dataloader(self) -> DataLoader:
        """The training schedule, in order (global batches are laid out consecutively); resumable mid-epoch."""
        dataset = ItemDataset(self._task().rows("train"))
        trainer = self.trainer
        shard = {"num_replicas": 1, "rank": 0}
        if trainer is not None and trainer.world_size > 1:
            shard = dict(trainer.distributed_sampler_kwargs or shard)
        sampler = ScheduleSampler(dataset, self.batch_size, shard["num_replicas"], shard["rank"])
        return ScheduleLoader(
            dataset,
            sampler,
            self._batches_done,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_items,
        )

    def _batches_done(self) -> int:
        # Lightning's count of the epoch's batches whose step ran (checkpoints are saved after the step).
        assert self.trainer is not None
        return int(self.trainer.fit_loop.epoch_loop.batch_progress.current.processed)  # type: ignore[attr-defined]

    def val_dataloader(self) -> DataLoader:
        """Evaluation rows."""
        return self._rows_loader(self._task().rows("val"))

    def test_dataloader(self) -> DataLoader:
        """Evaluation rows (the same as validation)."""
        return self._rows_loader(self._task().rows("test"))
