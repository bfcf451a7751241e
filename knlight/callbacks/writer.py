"""Writes attribution predictions as per-rank JSONL shards and merges them into one file (resumable).

Output directory layout::

    .lock                     held (flock) by the run writing here; names it (see knlight.runfolder)
    run.json                  what produced the results (task hyperparameters, writer settings, model
                              identity) and, after the merge, a record of the complete results
    shards/a003-r0001-b000000042.jsonl        one file per (attempt, rank, dataloader + batch), atomic
    shards/a003-r0001-b000000042.safetensors  dense / top-k scores of the same items (``save_scores``)
    attributions.jsonl        merged: one line per item, sorted by (uuid, language, query_id), no duplicates
    scores.safetensors        merged scores (``save_scores``)
    summary.json              counts per language, items/s, world size, attributed layers, method

A line of ``attributions.jsonl``::

    {"uuid": "...", "language": "fr", "relation": "P36", "query_id": 0, "query": "...", "answer": "Paris",
     "prob": 0.31, "neurons": [[layer, neuron, score], ...], "residual": [...], "layer_mass": [...],
     "method": "ig", "input_hash": "3f0c...", "model_hash": "9a1e..."}

``neurons`` are sorted by score (descending); ``residual`` is the completeness residual and ``layer_mass`` the
share of the item's positive attribution, one entry per attributed layer (all layers by default; the list is
``layers`` in ``summary.json``); ``input_hash`` and ``model_hash`` record what the line was computed from
(query and answer; the model's identity, also in ``run.json``); ``method`` how the scores were computed (``ig``,
exact, or a labelled approximation; also in ``run.json`` and ``summary.json``).
Floats are written as the shortest decimal that round-trips their float32 value.

Resume: at start the writer collects the items already present in ``attributions.jsonl`` and in the shards
and hands them to the module (``done_keys``), which skips those items; at the end everything is merged again.
An item counts as done only when its stored ``input_hash`` and ``model_hash`` equal the current ones.
Shard names carry an attempt number, so a new run never overwrites an earlier run's shards. A run whose
results would differ (other model, steps, thresholds, ...; see ``run.json``), a folder without ``run.json``,
a folder whose results were computed from other query texts, and a folder another run is writing into are
refused instead of mixed in (:mod:`knlight.runfolder`).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from safetensors.torch import save_file

from knlight.errors import DataError
from knlight.io import read_lines, write_atomically, write_lines_atomically, write_text_atomically
from knlight.runfolder.format import (
    MERGED,
    RUN,
    SCORES,
    SHARD,
    SUMMARY,
    RunFolderError,
    item_line,
    line_key,
    shard_files,
    tensor_key,
)
from knlight.runfolder.lock import FolderLock
from knlight.runfolder.records import (
    DoneItem,
    check_inputs,
    check_settings,
    read_done,
    read_run_file,
    results_record,
    run_file_text,
)
from knlight.runfolder.scores import item_tensors, merge_scores, score_format

log = logging.getLogger(__name__)

__all__ = ["MERGED", "RUN", "SCORES", "SUMMARY", "AttributionWriter", "item_line", "tensor_key"]


def _dataset_items(trainer: pl.Trainer) -> Iterator[dict[str, Any]]:
    """Every item of the predict datasets (all ranks' shares), for datasets that can be indexed.

    Items of other datasets are checked one by one as the module meets them (``is_done``).
    """
    loaders = trainer.predict_dataloaders
    for loader in loaders if isinstance(loaders, list | tuple) else [loaders]:
        dataset = getattr(loader, "dataset", None)
        try:
            size = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            continue
        for index in range(size):
            item = dataset[index]  # type: ignore[index]
            if isinstance(item, dict) and {"uuid", "language", "query_id", "query", "answer"} <= set(item):
                yield item


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


class AttributionWriter(BasePredictionWriter):
    """Writes each rank's predictions per batch as JSONL shards; rank 0 merges them when predict ends.

    See the module documentation for the files and their format. The output directory must be visible to
    every process (on several nodes: a shared filesystem).

    Args:
        output_dir: Where results go. Default: ``<logger save_dir>/<logger name>/attributions`` (without the
            version, so re-running the same config resumes), or ``<default_root_dir>/attributions`` without a
            logger.
        save_scores: Also save each item's scores as safetensors (``scores.safetensors``, one entry per item
            named by :func:`tensor_key`). Needs the module's ``return_scores: true``.
        scores_top_k: Save only the k highest scores per item (``<key>/index`` as (layer, neuron) rows and
            ``<key>/score``) instead of the dense ``<key>/scores`` ``[layers, d_ff]`` (dense files are large:
            items × layers × d_ff × 4 bytes).
        keep_shards: Keep the shard files after a successful merge (they are deleted by default).
        resume: Skip items already in ``output_dir`` (default). False refuses to run when it already holds
            results.
    """

    def __init__(
        self,
        output_dir: str | None = None,
        save_scores: bool = False,
        scores_top_k: int | None = None,
        keep_shards: bool = False,
        resume: bool = True,
    ) -> None:
        super().__init__(write_interval="batch")
        if scores_top_k is not None and scores_top_k < 1:
            raise ValueError(f"scores_top_k must be >= 1 or null (dense), got {scores_top_k}")
        self.output_dir = output_dir
        self.save_scores = save_scores
        self.scores_top_k = scores_top_k
        self.keep_shards = keep_shards
        self.resume = resume
        self.dir: Path | None = None
        self.layers: list[int] | None = None
        self.method: str | None = None
        self.attempt = 0
        self.previously_done: set[tuple[Any, ...]] = set()
        self.records: list[dict[str, Any]] | None = None
        self.summary: dict[str, Any] | None = None
        self._started = 0.0
        self._finalized = False
        self._lock: FolderLock | None = None
        self._done_items: dict[tuple[Any, ...], DoneItem] = {}  # rank 0: what the folder held at set-up

    # -- paths -----------------------------------------------------------------------------------------------

    def resolve_dir(self, trainer: pl.Trainer) -> Path:
        """The output directory (see ``output_dir``)."""
        if self.output_dir is not None:
            return Path(self.output_dir)
        logger = trainer.logger
        save_dir = getattr(logger, "save_dir", None)
        if logger is not None and save_dir is not None:
            return Path(save_dir) / (logger.name or "") / "attributions"
        return Path(trainer.default_root_dir) / "attributions"

    @property
    def shard_dir(self) -> Path:
        assert self.dir is not None
        return self.dir / "shards"

    @staticmethod
    def _attempt_of(shard: Path) -> int:
        match = SHARD.match(shard.name)
        assert match is not None
        return int(match[1])

    def shards(self) -> list[Path]:
        """Existing JSONL shards, in name order."""
        assert self.dir is not None
        return shard_files(self.dir)

    # -- set-up (all ranks) ----------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Rank 0 locks the output folder and checks the settings before the model is loaded (fails fast)."""
        super().setup(trainer, pl_module, stage)
        if stage != "predict":
            return
        if self.save_scores and not getattr(pl_module, "return_scores", False):
            raise ValueError(
                "AttributionWriter(save_scores=true) needs the module's scores: set "
                "model.init_args.return_scores: true"
            )
        self._finalized = False
        self.records = self.summary = None
        self.dir = Path(trainer.strategy.broadcast(str(self.resolve_dir(trainer))))

        def lock_and_check() -> None:
            assert self.dir is not None
            if self._lock is None or self._lock.folder != self.dir:
                self._release()
                self._lock = FolderLock(self.dir)
            self._lock.acquire()  # held by rank 0 until teardown (or the process's end)
            self._done_items = read_done(self.dir)  # a damaged line is reported first, naming file and line
            check_settings(self.dir, self._fingerprint(pl_module), ("task", "hparams", "writer"), self.resume)

        self._on_rank_zero(trainer, lock_and_check)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """With the model loaded: checks its identity and the stored inputs, records run.json, hands the done
        items to the module."""
        self.layers = getattr(pl_module, "attributed_layers", None)
        options = getattr(
            pl_module, "ig_options", None
        )  # an attribution task: its method goes in the summary
        self.method = options.get("method") if isinstance(options, dict) else None
        found: dict[str, Any] = {"attempt": 0, "done": {}}

        def check_and_collect() -> None:
            assert self.dir is not None
            current = self._fingerprint(pl_module, with_model=True)
            check_settings(self.dir, current, ("model",), self.resume)
            previous = read_run_file(self.dir)
            write_text_atomically(self.dir / RUN, run_file_text(current, previous))
            done = self._done_items
            task: Any = pl_module  # any task: the attributes it offers are looked up, not its class
            if hasattr(task, "input_hash"):  # a task whose results record their inputs
                check_inputs(
                    self.dir, done, _dataset_items(trainer), task.item_key, task.input_hash,
                    current["model"].get("hash"),
                )  # fmt: skip
            found["attempt"] = 1 + max((self._attempt_of(p) for p in self.shards()), default=0)
            found["done"] = {key: item.input_hash for key, item in done.items()}

        self._on_rank_zero(trainer, check_and_collect)
        self.attempt = trainer.strategy.broadcast(found["attempt"])
        done_inputs: dict[tuple[Any, ...], str | None] = trainer.strategy.broadcast(found["done"])
        self.previously_done = set(done_inputs)
        task: Any = pl_module
        if hasattr(task, "done_keys"):  # a task that skips the items done before
            task.done_keys = set(self.previously_done)
        if hasattr(task, "done_inputs"):
            task.done_inputs = {k: v for k, v in done_inputs.items() if v is not None}
        if self.previously_done and trainer.is_global_zero:
            log.info("resuming in %s: %d items already done", self.dir, len(self.previously_done))
        self._started = time.perf_counter()  # after the model is loaded: items/s measures attribution only

    def _on_rank_zero(self, trainer: pl.Trainer, step: Callable[[], None]) -> None:
        """Runs ``step`` on rank 0 and raises its problem on every rank (a lone failing rank would leave the
        others waiting forever at the next collective)."""
        problem = None
        if trainer.is_global_zero:
            try:
                step()
            except (RunFolderError, DataError) as error:
                problem = str(error)
            except (OSError, ValueError) as error:
                problem = f"cannot resume from {self.dir}: {type(error).__name__}: {error}"
            if problem is not None:
                self._release()
        problem = trainer.strategy.broadcast(problem)
        if problem is not None:
            raise RunFolderError(problem)

    def _fingerprint(self, pl_module: pl.LightningModule, with_model: bool = False) -> dict[str, Any]:
        """This run's ``run.json`` settings; the model group (its identity) needs the loaded model."""
        task = getattr(pl_module, "fingerprint", lambda: dict(pl_module.hparams))()
        fingerprint = {
            "task": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
            "hparams": task,
            "writer": {"save_scores": self.save_scores, "scores_top_k": self.scores_top_k},
        }
        if with_model:
            identity = {}
            module: Any = pl_module
            if hasattr(module, "model_identity"):
                identity = {**module.model_identity(), "hash": module.model_hash()}
            fingerprint["model"] = identity
        return _jsonable(fingerprint)

    # -- lock release (rank 0) -------------------------------------------------------------------------------

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._release()

    # -- per batch (each rank) -------------------------------------------------------------------------------

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if not prediction:  # every item of the batch was done before
            return
        name = f"a{self.attempt:03d}-r{trainer.global_rank:04d}-b{dataloader_idx:02d}{batch_idx:07d}"
        if self.save_scores:
            # Scores first: the JSONL shard is what marks the items done.
            tensors = {}
            for p in prediction:
                tensors.update(self._item_tensors(p))
            meta = {"layers": json.dumps(list(prediction[0]["layers"])), "format": self._score_format()}
            write_atomically(self.shard_dir / f"{name}.safetensors", lambda t: save_file(tensors, t, meta))
        write_lines_atomically(self.shard_dir / f"{name}.jsonl", [item_line(p) for p in prediction])

    def _score_format(self) -> str:
        return score_format(self.scores_top_k)

    def _item_tensors(self, prediction: dict[str, Any]) -> dict[str, torch.Tensor]:
        return item_tensors(prediction, self.scores_top_k)

    # -- end (all ranks; rank 0 merges) ----------------------------------------------------------------------

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.finalize(trainer)

    def finalize(self, trainer: pl.Trainer) -> list[dict[str, Any]] | None:
        """Merges all shards once every rank is done (idempotent); returns the merged records on rank 0."""
        if not self._finalized:
            trainer.strategy.barrier("knlight-writer-merge")
            problem = None
            if trainer.is_global_zero:
                try:
                    self._merge(trainer.world_size)
                except RunFolderError as error:
                    problem = str(error)
                except (OSError, ValueError) as error:
                    problem = f"cannot merge the results in {self.dir}: {type(error).__name__}: {error}"
            # The broadcast is also the barrier: every rank waits for the merge, and learns if it failed.
            problem = trainer.strategy.broadcast(problem)
            self._finalized = True
            if problem is not None:
                raise RunFolderError(problem)
        return self.records

    def _merge(self, world_size: int) -> None:
        assert self.dir is not None
        shards = self.shards()
        seen: dict[tuple[Any, ...], str] = {}
        for line in read_lines(self.dir / MERGED):
            seen.setdefault(line_key(line), line)
        new_keys: set[tuple[Any, ...]] = set()
        for shard in shards:
            for line in read_lines(shard):
                key = line_key(line)
                seen.setdefault(key, line)  # DDP may process an item twice: keep one copy
                if self._attempt_of(shard) == self.attempt:
                    new_keys.add(key)
        order = sorted(seen)
        if self.save_scores:  # first: if a scores file is damaged, the folder stays as it was
            self._merge_scores(shards, {tensor_key(k) for k in order})
        write_lines_atomically(self.dir / MERGED, (seen[k] for k in order))
        self.records = [json.loads(seen[k]) for k in order]
        seconds = time.perf_counter() - self._started
        computed = len(new_keys - self.previously_done)
        self.summary = {
            "items": len(order),
            "computed": computed,
            "resumed": len(self.previously_done),
            "per_language": dict(sorted(Counter(r["language"] for r in self.records).items())),
            "seconds": round(seconds, 3),
            "items_per_s": round(computed / seconds, 3) if seconds > 0 else None,
            "world_size": world_size,
            "layers": self.layers,
            **({"method": self.method} if self.method is not None else {}),
        }
        write_lines_atomically(self.dir / SUMMARY, [json.dumps(self.summary, indent=2)])
        # Last: the record readers check the merged file against (a crash before it leaves the old record,
        # which then disagrees with the new file: readers say to re-run, which merges again).
        run = read_run_file(self.dir) or {}
        run["results"] = results_record(self.dir, len(order))
        write_text_atomically(self.dir / RUN, json.dumps(run, indent=2, sort_keys=True) + "\n")
        if not self.keep_shards:
            for shard in shards:
                shard.unlink(missing_ok=True)
                shard.with_suffix(".safetensors").unlink(missing_ok=True)
            if self.shard_dir.is_dir() and not any(self.shard_dir.iterdir()):
                self.shard_dir.rmdir()
        log.info("merged %d items into %s (%d computed now)", len(order), self.dir / MERGED, computed)

    def _merge_scores(self, shards: list[Path], wanted: set[str]) -> None:
        assert self.dir is not None
        merge_scores(self.dir, [s.with_suffix(".safetensors") for s in shards], wanted)
