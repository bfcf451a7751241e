"""TensorBoard figures and per-group scalars of an intervention run (rank 0, at the end of ``test``).

Images (matplotlib, Agg backend):

* ``intervention/delta_p``: mean ΔP of related (top row) and unrelated (bottom row) queries per operation
  (columns), per language (x) and method (bars; the random control hatched beside each method);
* ``intervention/success_rate``: SR = |SR_enhance| + |SR_suppress| per method, selected vs random neurons;
* ``intervention/layers``: neurons per layer of each neuron file's KN / LIKN / uncertainty / DKN sets;
* ``intervention/jaccard/<method>``: Jaccard overlap of the per-language neuron sets between languages;
* ``intervention/cross_lingual/<method>``: ΔP on the target language's queries when suppressing the source
  language's neurons (rows; last row: the fact's LIKN).

Scalars: ``intervention/<method>/<neurons>/<operation>/{dp_related,dp_unrelated,sr}/<group>`` for every group
(``all``, each language, each relation).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

log = logging.getLogger(__name__)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # headless: nodes have no display
    import matplotlib.pyplot as plt

    return plt


def _finite(x: Any) -> float:
    return 0.0 if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def delta_p_figure(rows: list[dict[str, Any]]) -> Any:
    """Grouped bars of mean ΔP per operation × (related, unrelated), language groups on x, methods as bars."""
    plt = _plt()
    rows = [r for r in rows if r["group_by"] in ("all", "language")]
    operations = list(dict.fromkeys(r["operation"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    groups = list(dict.fromkeys(r["group"] for r in rows))
    value = {(r["method"], r["neurons"], r["operation"], r["group"]): r for r in rows}
    fig, axes = plt.subplots(
        2,
        max(1, len(operations)),
        figsize=(1.5 + 0.9 * len(groups) * max(1, len(operations)), 5.5),
        squeeze=False,
    )
    width = 0.8 / max(1, 2 * len(methods))
    colors = plt.get_cmap("tab10")
    for col, op in enumerate(operations):
        for row, (field, queries) in enumerate((("dp_related", "related"), ("dp_unrelated", "unrelated"))):
            ax = axes[row][col]
            for m, method in enumerate(methods):
                for k, kind in enumerate(("selected", "random")):
                    heights = [_finite(value.get((method, kind, op, g), {}).get(field)) for g in groups]
                    offsets = np.arange(len(groups)) + (2 * m + k - len(methods) + 0.5) * width
                    label = method if k == 0 else f"{method} (random)"
                    alpha, hatch = (1.0, None) if k == 0 else (0.45, "//")
                    ax.bar(offsets, heights, width, color=colors(m), alpha=alpha, hatch=hatch, label=label)
            ax.axhline(0, color="black", linewidth=0.6)
            ax.set_xticks(range(len(groups)), groups)
            ax.set_title(f"{op}: {queries} queries", fontsize=9)
            if max((abs(p.get_height()) for p in ax.patches), default=0.0) > 10:
                ax.set_yscale("symlog", linthresh=1.0)  # enhancement can multiply P many times
            if col == 0:
                ax.set_ylabel("mean ΔP")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def success_rate_figure(rows: list[dict[str, Any]]) -> Any:
    """Bars of SR per method (group ``all``): selected vs random neurons."""
    plt = _plt()
    rows = [r for r in rows if r["group_by"] == "all"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    value = {(r["method"], r["neurons"]): _finite(r["sr"]) for r in rows}
    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(methods), 3.0))
    x = np.arange(len(methods))
    ax.bar(x - 0.2, [value.get((m, "selected"), 0.0) for m in methods], 0.4, label="selected")
    ax.bar(
        x + 0.2, [value.get((m, "random"), 0.0) for m in methods], 0.4, label="random", hatch="//", alpha=0.5
    )
    ax.set_xticks(x, methods)
    ax.set_ylabel("SR = |SR_enh| + |SR_sup|")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def layers_figure(rows: list[dict[str, Any]]) -> Any:
    """Neurons per layer of each file's KN / LIKN / uncertainty / DKN sets (one panel per file)."""
    plt = _plt()
    files = list(dict.fromkeys(r["first_method"] for r in rows))
    counts: dict[tuple[str, str], dict[int, int]] = defaultdict(dict)
    for r in rows:
        counts[(r["first_method"], r["kind"])][r["layer"]] = r["neurons"]
    kinds = ("KN", "LIKN", "uncertainty", "DKN")
    num_layers = 1 + max((r["layer"] for r in rows), default=0)
    panels = max(1, len(files))
    fig, axes = plt.subplots(1, panels, figsize=(3.0 + 0.35 * num_layers * panels, 3.0), squeeze=False)
    width = 0.8 / len(kinds)
    for f, name in enumerate(files):
        ax = axes[0][f]
        for k, kind in enumerate(kinds):
            heights = [counts[(name, kind)].get(layer, 0) for layer in range(num_layers)]
            ax.bar(np.arange(num_layers) + (k - 1.5) * width, heights, width, label=kind)
        ax.set_xticks(range(num_layers))
        ax.set_xlabel("layer")
        ax.set_title(name, fontsize=9)
    axes[0][0].set_ylabel("neurons")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def heatmap(matrix: np.ndarray, rows: list[str], cols: list[str], title: str, cmap: str = "viridis") -> Any:
    """An annotated heat map (NaN cells left blank)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.6 + 0.8 * len(cols), 1.2 + 0.5 * len(rows)))
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    for (i, j), v in np.ndenumerate(matrix):
        if not math.isnan(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w", fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def _matrix(
    rows: list[dict[str, Any]], row_key: str, col_key: str, value_key: str
) -> tuple[np.ndarray, list, list]:
    row_names = list(dict.fromkeys(r[row_key] for r in rows))
    col_names = sorted({r[col_key] for r in rows})
    matrix = np.full((len(row_names), len(col_names)), np.nan)
    for r in rows:
        v = r[value_key]
        matrix[row_names.index(r[row_key]), col_names.index(r[col_key])] = np.nan if v is None else v
    return matrix, row_names, col_names


class InterventionFigures(Callback):
    """Logs the intervention tables of :class:`knlight.tasks.intervention.InterventionModule` to TensorBoard.

    See the module documentation for the images and scalars. Does nothing without a TensorBoard logger.
    """

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        results = getattr(pl_module, "results", None)
        if not trainer.is_global_zero or not results:
            return
        experiment = next(
            (lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None
        )
        if experiment is None:
            return
        for row in results["intervention"]:
            base = f"intervention/{row['method']}/{row['neurons']}/{row['operation']}"
            for field in ("dp_related", "dp_unrelated", "sr"):
                if row[field] is not None and not math.isnan(row[field]):
                    experiment.add_scalar(f"{base}/{field}/{row['group']}", row[field], 0)
        if results["intervention"]:
            experiment.add_figure("intervention/delta_p", delta_p_figure(results["intervention"]), 0)
        if results["success_rate"]:
            experiment.add_figure(
                "intervention/success_rate", success_rate_figure(results["success_rate"]), 0
            )
        if results["layers"]:
            experiment.add_figure("intervention/layers", layers_figure(results["layers"]), 0)
        for method in dict.fromkeys(r["method"] for r in results["jaccard"]):
            rows = [r for r in results["jaccard"] if r["method"] == method]
            matrix, names, cols = _matrix(rows, "language_a", "language_b", "jaccard")
            experiment.add_figure(
                f"intervention/jaccard/{method}", heatmap(matrix, names, cols, f"{method}: Jaccard"), 0
            )
        for method in dict.fromkeys(r["method"] for r in results["cross_lingual"]):
            rows = [r for r in results["cross_lingual"] if r["method"] == method]
            matrix, names, cols = _matrix(rows, "source", "target", "dp")
            title = f"{method}: ΔP (suppress source neurons, target queries)"
            experiment.add_figure(
                f"intervention/cross_lingual/{method}", heatmap(matrix, names, cols, title, "coolwarm"), 0
            )
        experiment.flush()
