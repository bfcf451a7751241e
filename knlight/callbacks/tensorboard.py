"""TensorBoard figures for attribution runs: throughput, attribution mass per layer, neurons per language."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from knlight.callbacks.writer import AttributionWriter

log = logging.getLogger(__name__)


def _experiment(trainer: pl.Trainer) -> Any | None:
    """The SummaryWriter of the run's TensorBoard logger on rank 0, else None."""
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def layer_language_counts(records: list[dict[str, Any]], num_layers: int) -> tuple[list[str], np.ndarray]:
    """Selected-neuron counts ``[num_layers, languages]`` summed over items, and the language order."""
    languages = sorted({r["language"] for r in records})
    column = {lang: j for j, lang in enumerate(languages)}
    counts = np.zeros((num_layers, len(languages)), dtype=np.int64)
    for record in records:
        for layer, _, _ in record["neurons"]:
            counts[layer, column[record["language"]]] += 1
    return languages, counts


def heatmap_figure(counts: np.ndarray, languages: list[str], items_per_language: dict[str, int]) -> Any:
    """A layer × language heat map of selected-neuron counts (per item, annotated with the totals)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: nodes have no display
    import matplotlib.pyplot as plt

    per_item = counts / np.maximum([items_per_language.get(lang, 1) for lang in languages], 1)
    fig, ax = plt.subplots(figsize=(2.5 + 0.8 * len(languages), 1.8 + 0.35 * counts.shape[0]))
    image = ax.imshow(per_item, aspect="auto", origin="lower", cmap="viridis")
    ax.set_xticks(range(len(languages)), languages)
    ax.set_yticks(range(counts.shape[0]))
    ax.set_xlabel("language")
    ax.set_ylabel("layer")
    ax.set_title("selected neurons: per item (colour), total (numbers)", fontsize=9)
    if counts.size <= 400:
        for (layer, j), total in np.ndenumerate(counts):
            ax.text(j, layer, str(total), ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def mass_figure(mass: np.ndarray, layers: list[int]) -> Any:
    """Bar chart of the mean share of positive attribution per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(3.0, 0.3 * len(layers) + 1.5), 2.8))
    ax.bar(range(len(layers)), mass)
    ax.set_xticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("share of attribution")
    ax.set_title("attribution mass per layer")
    fig.tight_layout()
    return fig


class AttributionTensorBoard(Callback):
    """Logs an attribution run to the TensorBoard logger (rank 0).

    During predict: ``predict/items_per_s`` (items attributed per second on rank 0, per batch). At the end,
    from the merged results of :class:`AttributionWriter` (all ranks and earlier resumed runs):
    ``attribution/layer_mass`` (histogram and bar chart of the mean share of positive attribution per layer),
    ``attribution/selected_neurons`` (layer × language heat map of selected-neuron counts) and
    ``predict/items_per_s_total``. The run's config is added as text by the CLI (``KnlightCLI``).

    Args:
        log_every_n_batches: Log the throughput scalar every n batches.
    """

    def __init__(self, log_every_n_batches: int = 1) -> None:
        self.log_every_n_batches = max(1, log_every_n_batches)
        self._start = 0.0
        self._items = 0

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()
        self._items = 0

    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._items += len(outputs or [])
        experiment = _experiment(trainer)
        if experiment is None or (batch_idx + 1) % self.log_every_n_batches:
            return
        elapsed = time.perf_counter() - self._start
        if elapsed > 0:
            experiment.add_scalar("predict/items_per_s", self._items / elapsed, batch_idx)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        writer = next((c for c in callbacks if isinstance(c, AttributionWriter)), None)
        if writer is None:
            log.warning("AttributionTensorBoard: no AttributionWriter among the callbacks; no figures")
            return
        records = writer.finalize(trainer)  # collective: every rank takes part
        experiment = _experiment(trainer)
        if experiment is None or not records:
            return
        summary = writer.summary or {}
        if summary.get("items_per_s") is not None:
            experiment.add_scalar("predict/items_per_s_total", summary["items_per_s"], 0)
        layers = summary.get("layers") or list(range(len(records[0]["layer_mass"])))
        num_layers = max(layers) + 1
        mass = np.mean([r["layer_mass"] for r in records], axis=0)
        experiment.add_histogram_raw(
            "attribution/layer_mass",
            min=float(min(layers)),
            max=float(max(layers)),
            num=len(records),
            sum=float(np.dot(layers, mass)),
            sum_squares=float(np.dot(np.square(layers), mass)),
            bucket_limits=[x + 0.5 for x in layers],  # bucket i is (layer_{i-1} + 0.5, layer_i + 0.5]
            bucket_counts=[float(x) for x in mass],
            global_step=0,
        )
        experiment.add_figure("attribution/layer_mass", mass_figure(mass, layers), 0)
        languages, counts = layer_language_counts(records, num_layers)
        per_language: dict[str, int] = defaultdict(int)
        for record in records:
            per_language[record["language"]] += 1
        experiment.add_figure(
            "attribution/selected_neurons", heatmap_figure(counts, languages, per_language), 0
        )
        experiment.flush()
