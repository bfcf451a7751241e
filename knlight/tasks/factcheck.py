"""Fact-checking with degenerate knowledge neurons (AMIG) as a Lightning evaluation loop (validate / test).

``knlight test --config configs/tiny/factcheck.yaml`` (or ``validate``) runs :class:`FactCheckModule` over the
claims served by :class:`FactCheckDataModule` (see :mod:`knlight.factcheck.claims`: one claim per fact,
language, query and candidate; the positive class is "the claim is false").

Before the loop (every process takes part; the work is sharded over processes and gathered):

1. **relation sets** from the *train* split: for each true training claim, IG of every layer → top-K neurons →
   DKN pairs (AMIG Algorithm 1) → per relation, the neurons counted more than ``t · max``
   (:func:`knlight.factcheck.relation_sets.search_relation_sets`; or the pairs of a neuron file, train facts
   only);
2. **logistic regressions** of the fast detectors, fit on the train split's claims (true and false);
3. for ``test``: the validation claims are scored and every detector's threshold is chosen there (maximum
   F1); the test split never chooses a threshold. For ``validate`` the thresholds are chosen on the validation
   claims themselves (in-sample: the run reports it).

Each claim is scored alone (its numbers do not depend on its batch-mates). Under DDP the rows of every process
are gathered and de-duplicated by claim id (``DistributedSampler`` pads with repeats), so the tables equal a
single-process run. Rank 0 writes ``results.csv``, ``results.json`` (settings, thresholds, relation sets, LR
coefficients, table) and ``claims.csv`` (per-claim features, scores and decisions) to
``<output_dir>/<split>/`` (:func:`knlight.factcheck.results.write_split`) and logs PR and ROC curves to
TensorBoard. The logic lives in :mod:`knlight.factcheck` (pure torch); this module holds the Lightning hooks,
the sharding over processes and the logging.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torchmetrics.utilities.distributed import gather_all_tensors

from knlight.errors import ConfigError, DataError
from knlight.factcheck.claims import FALSE_CLAIM, Claim
from knlight.factcheck.detectors import (
    DETECTORS,
    FEATURES,
    LR_FEATURES,
    NEEDS_SETS,
    LogisticDetector,
    claim_features,
    falseness,
    fit_logistic_detectors,
)
from knlight.factcheck.readouts import encode_claim
from knlight.factcheck.relation_sets import DKNSearch, RelationSet, search_relation_sets
from knlight.factcheck.results import SplitResults, write_split
from knlight.lm.options import LMOptions
from knlight.lm.prompts import EncodedQuery
from knlight.metrics.factcheck import ClaimScores, complete_thresholds, curve_figures, results_table
from knlight.neurons.ig import IGOptions
from knlight.neurons.memory import check_chunk_rows
from knlight.neurons.neuron import Neuron
from knlight.tasks.base import BaseTask
from knlight.tasks.factcheck_data import FactCheckDataModule

log = logging.getLogger(__name__)

__all__ = ["FactCheckDataModule", "FactCheckModule"]  # the data module's config name stays this module's

Item = dict[str, Any]
Detector = Literal["amig", "prob", "prob_mean", "rank", "fast", "fast_lr", "act_lr"]


class FactCheckModule(BaseTask):
    """Fact-checks claims with a relation's degenerate knowledge neurons (AMIG) and compares detectors.

    Detectors (see :mod:`knlight.factcheck.detectors`): ``amig`` (mean IG attribution of the candidate over
    the relation's DKN set, flagged false below λ), ``prob``, ``prob_mean`` and ``rank`` (the model's own
    probability, per-token probability and rank of the candidate), ``fast`` (gradient × activation at the DKN
    set: one forward, no IG), ``fast_lr`` / ``act_lr`` (logistic regressions on the set's gradient ×
    activation / raw activations, fit on the training split). Thresholds maximise F1 on the validation
    split, never on the test split.

    Args:
        lm: The language model.
        ig: How the ``amig`` detector's integrated gradients are computed (AMIG: zero baseline, prob).
        detectors: Detectors to run (default all: amig, prob, prob_mean, rank, fast, fast_lr, act_lr).
        top_k: Top-K neurons of a training fact searched for DKN pairs (AMIG: 20).
        t_low: A single neuron whose suppression drops P by at most this (relative) is a DKN candidate.
        t_high: A pair is degenerate when suppressing both drops P by more than this.
        t: A relation's set keeps neurons counted in more than ``t · max`` of its DKN pair counts (AMIG: 0.7).
        use_sets: Also count the members of larger degenerate sets (greedy growth beyond pairs).
        fallback: ``top``: a relation whose training facts have no DKN pair uses the counts of their top-K
            neurons (recorded as source ``top``); ``none``: that is an error.
        neurons: Take the DKN pairs from this neuron file (``degenerate`` of each fact; train facts only)
            instead of searching them.
        thresholds: Fixed thresholds per detector (falseness score; a claim is flagged false above it; for
            ``amig`` the threshold is −λ). Detectors without one get theirs from the validation split.
        l2: L2 penalty of the logistic regressions.
        chunk_rows: Rows per forward of the DKN search, or ``auto``: as many as fit in ``max_memory_gb``.
        max_memory_gb: Budget of ``chunk_rows: auto`` in GiB (null: 90 % of what the device has free).
        output_dir: Where rank 0 writes the tables (default ``<log dir>/factcheck``).
    """

    def __init__(
        self,
        lm: LMOptions,
        ig: IGOptions = IGOptions(),
        detectors: list[Detector] | None = None,
        top_k: int = 20,
        t_low: float = 0.2,
        t_high: float = 0.25,
        t: float = 0.7,
        use_sets: bool = False,
        fallback: Literal["top", "none"] = "top",
        neurons: str | None = None,
        thresholds: dict[str, float] | None = None,
        l2: float = 1e-2,
        chunk_rows: int | Literal["auto"] = 256,
        max_memory_gb: float | None = None,
        output_dir: str | None = None,
    ) -> None:
        super().__init__(lm)
        check_chunk_rows(chunk_rows, max_memory_gb, "model.init_args")
        self.detectors = list(detectors) if detectors is not None else list(DETECTORS)
        unknown = [d for d in self.detectors if d not in DETECTORS]
        if unknown or not self.detectors:
            raise ConfigError(
                f"model.init_args.detectors={self.detectors}: choose among {', '.join(DETECTORS)}"
            )
        for name, value in (("t_low", t_low), ("t_high", t_high), ("t", t)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"model.init_args.{name} must be in [0, 1], got {value}")
        if top_k < 2:
            raise ConfigError(
                f"model.init_args.top_k must be >= 2 (pairs are searched among the top-K), got {top_k}"
            )
        unknown = [d for d in (thresholds or {}) if d not in DETECTORS]
        if unknown:
            raise ConfigError(
                f"model.init_args.thresholds for unknown detectors {unknown}; choose among {', '.join(DETECTORS)}"
            )
        self.save_hyperparameters()
        self.search = DKNSearch(ig, top_k, t_low, t_high, t, use_sets, fallback, chunk_rows, max_memory_gb)
        self.neurons_path = neurons
        self.ig_options: dict[str, Any] = ig.kwargs()
        self.given_thresholds = dict(thresholds or {})
        self.l2 = l2
        self.output_dir = output_dir
        self.scores = ClaimScores(len(FEATURES))
        self.sets: dict[str, RelationSet] = {}
        self.models: dict[str, LogisticDetector] = {}
        self.thresholds: dict[str, float] = {}
        self.threshold_source: dict[str, str] = {}
        self.results: SplitResults | None = None
        self._prepared = False
        self._rows_seen = 0
        self._started = 0.0
        self._encoded: dict[tuple[str, str], EncodedQuery] = {}

    # -- helpers
    # ---------------------------------------------------------------------------------------------------

    def _datamodule(self) -> FactCheckDataModule:
        datamodule = getattr(self.trainer, "datamodule", None)
        if not isinstance(datamodule, FactCheckDataModule):
            raise RuntimeError(
                "FactCheckModule reads the train and validation claims from its data module: use "
                "knlight.tasks.factcheck.FactCheckDataModule"
            )
        return datamodule

    def _encode(self, claim: Claim) -> EncodedQuery:
        key = (claim.query, claim.candidate)
        if key not in self._encoded:
            self._encoded[key] = encode_claim(self.lm, claim)
        return self._encoded[key]

    def _shard(self, claims: Sequence[Claim]) -> list[Claim]:
        """This process's share of a list of claims (round robin, no padding)."""
        return list(claims[self.global_rank :: self.trainer.world_size])

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Concatenate ``[n, k]`` rows of every process (uneven n allowed), in rank order."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts = gather_all_tensors(rows.to(self.device))
            return torch.cat([p.cpu() for p in parts])
        return rows

    def _neurons(self, relation: str) -> list[Neuron]:
        if not any(d in NEEDS_SETS for d in self.detectors):
            return []
        return self.sets[relation].neurons

    def score_claim(self, claim: Claim, amig: bool = True) -> torch.Tensor:
        """The :data:`~knlight.factcheck.detectors.FEATURES` row of one claim, scored alone.

        Args:
            claim: The claim.
            amig: Compute the (IG) ``amig`` column when the ``amig`` detector is on; False leaves it NaN.
        """
        return claim_features(
            self.lm, self._encode(claim), self._neurons(claim.relation),
            amig=amig and "amig" in self.detectors, **self.ig_options,
        )  # fmt: skip

    def _score(self, claims: Sequence[Claim], amig: bool = True) -> tuple[torch.Tensor, ...]:
        """Gathered, de-duplicated ``(ids, labels, features)`` of claims scored in shards over processes."""
        metric = ClaimScores(len(FEATURES)).to(self.device)
        mine = self._shard(claims)
        metric.add(
            [c.claim_id for c in mine], [c.label for c in mine], [self.score_claim(c, amig) for c in mine]
        )
        return metric.collect()

    # -- preparation (train and validation splits)
    # -------------------------------------------------------------------------------------------

    def build_relation_sets(self, train: Sequence[Claim], relations: Sequence[str]) -> dict[str, RelationSet]:
        """Each relation's neuron set from the training claims (searched in shards over processes, gathered)."""
        return search_relation_sets(
            self.lm, train, relations, self.search, self.neurons_path,
            encode=self._encode, shard=self._shard, gather=self._gather,
        )  # fmt: skip

    def _prepare(self, split: str) -> None:
        """Relation sets and logistic regressions (once), thresholds from the validation split (``test``)."""
        datamodule = self._datamodule()
        if not self._prepared:
            train = datamodule.claims("train")
            relations = sorted({c.relation for c in datamodule.claims("all")})
            if any(d in NEEDS_SETS for d in self.detectors):
                if not train:
                    raise DataError(
                        f"{datamodule.path}: the train split has no claim, so no DKN set can be built; raise "
                        "the train fraction of data.split_fractions or use more facts"
                    )
                self.sets = self.build_relation_sets(train, relations)
                for rset in self.sets.values():
                    log.info("relation %s: %d neurons (%s, %d pairs)", rset.relation, len(rset.neurons),
                             rset.source, rset.pairs)  # fmt: skip
            lr = [d for d in self.detectors if d in LR_FEATURES]
            if lr:
                # The logistic detectors see no IG: the training claims are scored without it.
                _, labels, features = self._score(train, amig=False)
                self.models = fit_logistic_detectors(lr, features, labels, self.l2)
            self._prepared = True
        self.thresholds = {d: self.given_thresholds[d] for d in self.detectors if d in self.given_thresholds}
        self.threshold_source = {d: "given" for d in self.thresholds}
        missing = [d for d in self.detectors if d not in self.thresholds]
        if split == "test" and missing:
            val = datamodule.claims("val")
            if not val:
                raise DataError(
                    f"{datamodule.path}: the validation split has no claim to choose thresholds for "
                    f"{missing}; give model.thresholds or raise the validation fraction of "
                    "data.split_fractions"
                )
            _, labels, features = self._score(val)
            scores = {d: falseness(d, features, self.models) for d in missing}
            self.thresholds, self.threshold_source = complete_thresholds(
                self.thresholds, self.threshold_source, scores, labels, "val"
            )

    # -- loops
    # -----------------------------------------------------------------------------------------------------

    def _check_grad_mode(self) -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "FactCheckModule needs gradients (IG and gradient × activation) but the loop runs under "
                "torch.inference_mode(); set `trainer.inference_mode: false` (CLI: --trainer.inference_mode "
                "false)"
            )

    def _start(self, split: str) -> None:
        self._check_grad_mode()
        self._started = time.perf_counter()
        self._rows_seen = 0
        self._prepare(split)
        self.scores.reset()

    def _step(self, batch: list[Item]) -> None:
        claims = [Claim.from_item(item) for item in batch]
        self._rows_seen += len(claims)
        self.scores.add(
            [c.claim_id for c in claims], [c.label for c in claims], [self.score_claim(c) for c in claims]
        )

    def on_validation_start(self) -> None:
        """Relation sets and logistic regressions from the train split."""
        self._start("val")

    def validation_step(self, batch: list[Item], batch_idx: int = 0, dataloader_idx: int = 0) -> None:
        """Scores each claim of the batch alone."""
        self._step(batch)

    def on_validation_epoch_end(self) -> None:
        """Gathers the claims, chooses thresholds on them, reports (in-sample) metrics."""
        self._finish("val")

    def on_test_start(self) -> None:
        """Relation sets, logistic regressions (train split) and thresholds (validation split)."""
        self._start("test")

    def test_step(self, batch: list[Item], batch_idx: int = 0, dataloader_idx: int = 0) -> None:
        """Scores each claim of the batch alone."""
        self._step(batch)

    def on_test_epoch_end(self) -> None:
        """Gathers the claims and reports metrics with the validation thresholds."""
        self._finish("test")

    # -- results
    # ---------------------------------------------------------------------------------------------------

    def _finish(self, split: str) -> None:
        seen = int(self._gather(torch.tensor([[self._rows_seen]], dtype=torch.long)).sum())
        ids, labels, features = self.scores.collect()
        by_id = {c.claim_id: c for c in self._datamodule().claims("all")}
        claims = [by_id[int(i)] for i in ids]
        scores = {d: falseness(d, features, self.models) for d in self.detectors}
        if split == "val":
            self.thresholds, self.threshold_source = complete_thresholds(
                self.thresholds, self.threshold_source, scores, labels, "val (in-sample)"
            )
        groups = {"language": [c.language for c in claims], "relation": [c.relation for c in claims]}
        table = results_table(split, scores, labels, self.thresholds, groups)
        self._log_table(split, table)
        self.results = SplitResults(
            split, claims, labels, features, scores, self.thresholds, self.threshold_source, table, seen,
            self.trainer.world_size,
        )  # fmt: skip
        # Every process takes part in resolving the log dir (it is broadcast from rank 0).
        log_dir = self.trainer.log_dir
        if self.trainer.is_global_zero:
            out = Path(self.output_dir or Path(log_dir or ".") / "factcheck") / split
            write_split(out, self.results, self.settings(), list(self.sets.values()), self.models)
            self._figures(split, scores, labels)
            log.info(
                "fact-checking %s: %d claims (%d false), tables in %s (%.1fs)", split, len(claims),
                int((labels == FALSE_CLAIM).sum()), out, time.perf_counter() - self._started,
            )  # fmt: skip

    def _log_table(self, split: str, table: list[dict[str, Any]]) -> None:
        """Logs each detector's metrics (all claims) and F1 per group; warns about undefined metrics."""
        undefined = sorted({f"{r['group_by']}={r['group']}" for r in table if r["undefined"] and r["n"]})
        if undefined:
            log.warning(
                "fact-checking %s: some metrics are undefined (NaN, reason in the 'undefined' column) for %s",
                split, ", ".join(undefined),
            )  # fmt: skip
        for row in table:
            if row["group_by"] == "all":
                for metric in ("precision", "recall", "f1", "accuracy", "auroc"):
                    if not math.isnan(row[metric]):
                        self.log(
                            f"factcheck/{split}/{row['detector']}/{metric}", row[metric], rank_zero_only=True
                        )
            elif not math.isnan(row["f1"]):
                self.log(
                    f"factcheck/{split}/{row['detector']}/f1/{row['group']}", row["f1"], rank_zero_only=True
                )

    def settings(self) -> dict[str, Any]:
        """Settings that determine the results (written to ``results.json``)."""
        return self.flat_hparams()

    def _figures(self, split: str, scores: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers = [lg for lg in self.trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers or labels.numel() == 0:
            return
        import matplotlib.pyplot as plt

        figures = curve_figures(scores, labels, f"fact-checking ({split})")
        for logger in loggers:
            for name, fig in figures.items():
                logger.experiment.add_figure(
                    f"factcheck/{split}/{name}_curve", fig, self.global_step, close=False
                )
            logger.experiment.flush()
        for fig in figures.values():
            plt.close(fig)
