"""Suppress / enhance / erase knowledge neurons and measure the effect: a Lightning *test* loop.

``knlight test --config configs/tiny/intervene.yaml`` runs :class:`InterventionModule` over the items of the
data module's test split (set ``data.init_args.split_fractions: [0, 0, 1]`` to test every fact). For each item
``(uuid, language, query)`` and each method (a neuron file and which of its sets to use):

* **suppress** (×0) and **enhance** (× ``enhance_factor``, 2) the fact's neurons at the target positions;
  **erase**: suppress the union of the fact's neurons over all its languages (for a per-language set; for a
  language-independent, uncertainty or degenerate set it equals suppress);
* measure ΔP on the item (*related*) and on ``unrelated_per_query`` queries of other facts in the same
  language (*unrelated*; a seeded sample that depends only on the item);
* the **random control**: the same operations on random neurons, as many per layer as the fact's (seeded);
* the **cross-lingual effect**: suppress another language's neurons of the same fact (and the fact's LIKN) and
  measure ΔP on this language's query.

Every item's rows are evaluated in their own forwards, so its numbers do not depend on its batch-mates: under
DDP (``DistributedSampler`` pads with duplicates, removed before reducing) the tables are identical to a
single-process run. At the end rank 0 writes the tables (see :mod:`knlight.metrics.intervention` for the
definitions) to ``output_dir`` as CSV and JSON, and the figures callback logs bar charts and heat maps to
TensorBoard.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback

from knlight.errors import ConfigError
from knlight.io import csv_text, json_safe, write_text_atomically
from knlight.lm.options import LMOptions
from knlight.lm.prompts import EncodedQuery, QueryError
from knlight.metrics.intervention import (
    CLEAN,
    INDEX_COLUMNS,
    ITEM,
    OPERATIONS,
    ROLE,
    SKIPPED,
    VALUE_COLUMNS,
    InterventionRows,
    Vocabulary,
    jaccard_table,
    layer_distribution,
    summarise,
)
from knlight.neurons.intervention_plan import ItemPool, PlanOptions, Row, plan_item
from knlight.neurons.interventions import intervene
from knlight.neurons.memory import check_chunk_rows
from knlight.neurons.neuron_file import NeuronFile, NeuronKind, read_neuron_file
from knlight.tasks.base import BaseTask, ItemKey

log = logging.getLogger(__name__)

Item = dict[str, Any]
Operation = Literal["suppress", "enhance", "erase"]


@dataclass(frozen=True)
class NeuronSource:
    """One method to test: a neuron file and which of its sets.

    Attributes:
        neurons: The neuron file (written by ``knlight select``).
        kind: ``language`` (each language's own neurons; default), ``language_independent`` (LIKN),
            ``uncertainty`` (uncertainty-aware aggregation), ``degenerate`` (every DKN member), ``carriers``
            (the language's carriers: neurons that write the answer), ``upstream`` (its knowledge neurons that
            do not) or ``fact_specific`` (the language's neurons labelled ``fact`` by ``knlight select
            --specificity.enabled true``). A (fact, language) the neuron file records as not known to the model
            gets no rows.
    """

    neurons: str
    kind: NeuronKind = "language"


class InterventionModule(BaseTask):
    """Tests knowledge neurons by intervention (test loop); compares several neuron files in one run.

    Args:
        lm: The language model the neurons were selected on.
        methods: Name → neuron source (``{neurons: neurons.json, kind: language}``), e.g. ``dai``, ``amig``,
            ``likn``, ``uncertainty``. Every file is validated against the model.
        operations: Operations to run: ``suppress`` (×0), ``enhance`` (× ``enhance_factor``) and ``erase``
            (suppress the fact's neurons of every language).
        enhance_factor: Multiplier of ``enhance`` (Dai et al., AMIG: 2).
        unrelated_per_query: Queries of other facts (same language) measured per related query.
        unrelated_relations: Which other facts: ``any`` (default), ``same`` relation (the hardest control: a
            relation-level neuron also moves them) or ``other`` relations only.
        random_control: Also run every operation on random neurons (same count per layer, seeded).
        cross_lingual: Also suppress each other language's neurons (and the LIKN) of the fact on this
            language's queries (methods with per-language sets only).
        seed: Seed of the unrelated samples and of the random neurons.
        chunk_rows: Rows (query × neuron set) per forward; lower it when memory is short, or ``auto``: as
            many as fit in ``max_memory_gb`` (planned per batch for its longest query).
        max_memory_gb: Budget of ``chunk_rows: auto`` in GiB (null: 90 % of what the device has free).
        output_dir: Where rank 0 writes the tables (default: ``<log dir>/intervention``).
    """

    def __init__(
        self,
        lm: LMOptions,
        methods: dict[str, NeuronSource] | None = None,
        operations: list[Operation] | None = None,
        enhance_factor: float = 2.0,
        unrelated_per_query: int = 5,
        unrelated_relations: Literal["any", "same", "other"] = "any",
        random_control: bool = True,
        cross_lingual: bool = True,
        seed: int = 0,
        chunk_rows: int | Literal["auto"] = 256,
        max_memory_gb: float | None = None,
        output_dir: str | None = None,
    ) -> None:
        super().__init__(lm)
        check_chunk_rows(chunk_rows, max_memory_gb, "model.init_args")
        if not methods:
            raise ConfigError(
                "model.init_args.methods is empty: InterventionModule needs at least one method, e.g. methods: "
                "{dai: {neurons: neurons.json}} (write neuron files with `knlight select`)"
            )
        self.methods = {
            name: source if isinstance(source, NeuronSource) else NeuronSource(**source)
            for name, source in methods.items()
        }
        self.operations = list(operations) if operations is not None else list(OPERATIONS)
        unknown = [op for op in self.operations if op not in OPERATIONS]
        if unknown or not self.operations:
            raise ConfigError(
                f"model.init_args.operations={self.operations}: choose among {', '.join(OPERATIONS)}"
            )
        if unrelated_per_query < 0:
            raise ConfigError(f"model.init_args.unrelated_per_query must be >= 0, got {unrelated_per_query}")
        self.save_hyperparameters()
        self.enhance_factor = enhance_factor
        self.unrelated_per_query = unrelated_per_query
        if unrelated_relations not in ("any", "same", "other"):
            raise ConfigError(
                f"model.init_args.unrelated_relations={unrelated_relations!r}: choose any, same or other"
            )
        self.unrelated_relations = unrelated_relations
        self.random_control = random_control
        self.cross_lingual = cross_lingual
        self.seed = seed
        self.chunk_rows = chunk_rows
        self.max_memory_gb = max_memory_gb
        self.output_dir = output_dir
        self.rows = InterventionRows()
        self.files: dict[str, NeuronFile] = {}
        self.vocab: Vocabulary | None = None
        self.results: dict[str, Any] | None = None
        self.out_dir: Path | None = None
        self.pool: ItemPool | None = None
        self._encoded: dict[ItemKey, EncodedQuery] = {}
        self._started = 0.0

    # -- set-up
    # ------------------------------------------------------------------------------------------------

    def on_lm_loaded(self) -> None:
        """Reads and validates every neuron file against the loaded model."""
        by_path: dict[str, NeuronFile] = {}
        for name, source in self.methods.items():
            if source.neurons not in by_path:
                by_path[source.neurons] = read_neuron_file(source.neurons, self.lm.num_layers, self.lm.d_ff)
            self.files[name] = by_path[source.neurons]
            if source.kind == "fact_specific" and not any(
                f.specificity for f in self.files[name].facts.values()
            ):
                raise ConfigError(
                    f"model.init_args.methods.{name}.kind=fact_specific: {source.neurons} has no specificity "
                    "labels. Select with `knlight select ... --specificity.enabled true`, or choose another kind."
                )
            if self.files[name].model != self.model_name:
                log.warning(
                    "method %s: %s was selected on %r, testing on %r (same shape)",
                    name, source.neurons, self.files[name].model, self.model_name,
                )  # fmt: skip

    def _pool(self) -> list[Item]:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "items"):
            raise RuntimeError(
                "InterventionModule samples unrelated queries from the data module's items: use "
                "knlight.data.datamodule.RMLLamaDataModule (or a data module with an items('all') method)"
            )
        return list(datamodule.items("all"))

    def on_test_start(self) -> None:
        """Builds the item vocabulary (the same on every process) and resolves the output directory."""
        self._started = time.perf_counter()
        self.pool = ItemPool(self._pool())
        pool = self.pool.items
        languages = sorted(
            {item["language"] for item in pool} | {g for f in self.files.values() for g in f.languages()}
        )
        self.vocab = Vocabulary(
            items=[self.item_key(item) for item in pool],  # type: ignore[misc]
            relations=[item.get("relation") for item in pool],
            methods=list(self.methods),
            languages=languages,
        )
        self._check_overlap(getattr(self.trainer, "datamodule", None))
        self.rows.reset()
        # Every process must take part: the log dir is broadcast from rank 0.
        log_dir = self.trainer.log_dir
        self.out_dir = Path(self.output_dir) if self.output_dir else Path(log_dir or ".") / "intervention"

    def _check_overlap(self, datamodule: Any) -> None:
        """Refuse a run that would measure nothing: no tested fact has neurons in any method's file."""
        split = getattr(datamodule, "items", None)
        tested = {item["uuid"] for item in (split("test") if split else [])}
        if not tested:
            return  # the data module reports an empty test split itself
        covered = {name: tested & set(self.files[name].facts) for name in self.methods}
        for name, facts in covered.items():
            if not facts:
                log.warning("method %s: %s has neurons for none of the %d tested facts", name,
                            self.methods[name].neurons, len(tested))  # fmt: skip
        if not any(covered.values()):
            files = ", ".join(sorted({source.neurons for source in self.methods.values()}))
            example = sorted(tested)[0]
            raise ConfigError(
                f"no tested fact has neurons in the neuron files ({files}): the {len(tested)} facts of the test "
                f"split of {getattr(datamodule, 'path', 'the data')} (e.g. {example!r}) are not among their facts. "
                "Select neurons on these facts (knlight predict + knlight.select on the same records), or point "
                "data.init_args.path / model.init_args.methods at matching files."
            )

    # -- per item
    # ----------------------------------------------------------------------------------------------

    def _encode(self, item: Item) -> EncodedQuery:
        key = self.item_key(item)
        if key not in self._encoded:
            try:
                self._encoded[key] = self.lm.encode(item["query"], item["answer"])
            except QueryError as error:
                raise QueryError(
                    f"item uuid={item['uuid']!r} language={item['language']!r} query_id={item['query_id']!r} "
                    f"(query {item['query']!r}, answer {item['answer']!r}): {error}"
                ) from error
        return self._encoded[key]

    def plan_options(self) -> PlanOptions:
        """The options the rows of each item are planned with."""
        return PlanOptions(
            tuple(self.operations), self.enhance_factor, self.unrelated_per_query, self.unrelated_relations,
            self.random_control, self.cross_lingual, self.seed,
        )  # fmt: skip

    def plan(self, item: Item) -> tuple[list[Item], list[Row]]:
        """The queries (item first, then its unrelated sample) and the rows to evaluate for one item."""
        assert self.vocab is not None and self.pool is not None
        methods = {name: (self.files[name], source.kind) for name, source in self.methods.items()}
        return plan_item(item, self.pool, methods, self.plan_options(), self.vocab.languages, self.lm.d_ff)

    def test_step(self, batch: list[Item], batch_idx: int = 0, dataloader_idx: int = 0) -> None:
        """Evaluates every item of the batch (each in its own forwards) and adds its rows to the metric."""
        index: list[list[int]] = []
        value: list[list[float]] = []
        for item in batch:
            iid = self.pool.ids.get(self.item_key(item)) if self.pool is not None else None
            if iid is None:
                raise RuntimeError(f"item {self.item_key(item)} is not among the data module's items('all')")
            if not any(item["uuid"] in f.facts for f in self.files.values()):
                index.append([iid, -1, -1, -1, SKIPPED, -1])
                value.append([math.nan] * VALUE_COLUMNS)
                continue
            queries, rows = self.plan(item)
            encoded = [self._encode(q) for q in queries]
            outcome = intervene(
                self.lm,
                [(encoded[r.query], r.neurons, r.factor) for r in rows],
                chunk_rows=self.chunk_rows,
                max_memory_gb=self.max_memory_gb,
            )
            lp, top1 = outcome.log_prob.tolist(), outcome.top1.tolist()
            # The first rows are the clean ones, one per query in query order: lp[q] is query q's clean value.
            for r, row in enumerate(rows):
                if row.role == CLEAN and row.query != 0:
                    continue
                index.append([iid, row.method, row.kind, row.op, row.role, row.other])
                value.append(
                    [lp[row.query], lp[r], float(top1[row.query]), float(top1[r]), float(len(row.neurons))]
                )
        if index:
            self.rows.update(torch.tensor(index, dtype=torch.long), torch.tensor(value, dtype=torch.float64))

    # -- end
    # -----------------------------------------------------------------------------------------------------

    def on_test_epoch_end(self) -> None:
        """Gathers the rows of every process, builds the tables, logs scalars; rank 0 writes the files."""
        assert self.vocab is not None
        # An empty update keeps the state's shape on a process that evaluated nothing.
        self.rows.update(torch.zeros(0, INDEX_COLUMNS, dtype=torch.long), torch.zeros(0, VALUE_COLUMNS))
        index, value = self.rows.compute()
        self.rows.reset()
        results = summarise(index, value, self.vocab)
        tested = {self.vocab.items[i][0] for i in index[index[:, ROLE] == CLEAN][:, ITEM].tolist()}
        by_path = {source.neurons: name for name, source in reversed(list(self.methods.items()))}
        results["jaccard"] = [
            row
            for name, source in self.methods.items()
            if source.kind == "language"
            for row in jaccard_table(name, self.files[name], tested)
        ]
        results["layers"] = [
            {"file": path, "first_method": by_path[path], "kind": kind, "layer": layer, "neurons": n}
            for path, name in sorted(by_path.items())
            for kind, counts in layer_distribution(self.files[name]).items()
            for layer, n in enumerate(counts)
        ]
        self.results = results
        for row in results["success_rate"]:
            if row["group_by"] == "all":
                suffix = "" if row["neurons"] == "selected" else "_random"
                self.log(f"intervention/{row['method']}/sr{suffix}", row["sr"], rank_zero_only=True)
        for row in results["intervention"]:
            if row["group_by"] == "all" and row["neurons"] == "selected":
                self.log(f"intervention/{row['method']}/{row['operation']}/dp_related", row["dp_related"],
                         rank_zero_only=True)  # fmt: skip
        if self.trainer.is_global_zero:
            self.write_tables(results)

    def settings(self) -> dict[str, Any]:
        """The settings that determine the tables (written into ``intervention.json``)."""
        return {
            "model": self.model_name,
            "methods": {name: asdict(source) for name, source in self.methods.items()},
            "operations": self.operations,
            "enhance_factor": self.enhance_factor,
            "unrelated_per_query": self.unrelated_per_query,
            "unrelated_relations": self.unrelated_relations,
            "random_control": self.random_control,
            "cross_lingual": self.cross_lingual,
            "seed": self.seed,
        }

    def write_tables(self, results: dict[str, Any]) -> None:
        """Writes ``intervention.json`` (every table and the settings) and one CSV per table."""
        assert self.out_dir is not None
        for name in ("intervention", "success_rate", "cross_lingual", "jaccard", "facts", "layers"):
            write_text_atomically(self.out_dir / f"{name}.csv", csv_text(results[name]))
        document = {"settings": self.settings(), **{k: json_safe(v) for k, v in results.items()}}
        write_text_atomically(
            self.out_dir / "intervention.json", json.dumps(document, indent=1, ensure_ascii=False) + "\n"
        )
        seconds = time.perf_counter() - self._started
        summary = {
            "seconds": round(seconds, 3),
            "world_size": self.trainer.world_size,
            **results["counts"][0],
        }
        write_text_atomically(self.out_dir / "summary.json", json.dumps(json_safe(summary), indent=2) + "\n")
        log.info("intervention tables written to %s (%.1f s)", self.out_dir, seconds)

    def configure_callbacks(self) -> list[Callback]:
        """Adds the TensorBoard figures callback when the trainer has none."""
        from knlight.callbacks.intervention_figures import InterventionFigures

        present = self._trainer.callbacks if self._trainer is not None else []  # type: ignore[attr-defined]
        return [] if any(isinstance(c, InterventionFigures) for c in present) else [InterventionFigures()]
