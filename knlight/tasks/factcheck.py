"""Fact-checking with degenerate knowledge neurons (AMIG) as a Lightning evaluation loop (validate / test).

``knlight test --config configs/tiny/factcheck.yaml`` (or ``validate``) runs :class:`FactCheckModule` over the
claims served by :class:`FactCheckDataModule` (see :mod:`knlight.factcheck.claims`: one claim per fact,
language, query and candidate; the positive class is "the claim is false").

Before the loop (every process takes part; the work is sharded over processes and gathered):

1. **relation sets** from the *train* split: for each true training claim, IG of every layer → top-K neurons →
   DKN pairs (AMIG Algorithm 1) → per relation, the neurons counted more than ``t · max``
   (:func:`knlight.factcheck.detectors.relation_sets`; or the pairs of a neuron file, train facts only);
2. **logistic regressions** of the fast detectors, fit on the train split's claims (true and false);
3. for ``test``: the validation claims are scored and every detector's threshold is chosen there (maximum
   F1); the test split never chooses a threshold. For ``validate`` the thresholds are chosen on the validation
   claims themselves (in-sample: the run reports it).

Each claim is scored alone (its numbers do not depend on its batch-mates). Under DDP the rows of every process
are gathered and de-duplicated by claim id (``DistributedSampler`` pads with repeats), so the tables equal a
single-process run. Rank 0 writes ``results.csv``, ``results.json`` (settings, thresholds, relation sets, LR
coefficients, table) and ``claims.csv`` (per-claim features, scores and decisions) to
``<output_dir>/<split>/`` and logs PR and ROC curves to TensorBoard.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torchmetrics.utilities.distributed import gather_all_tensors

from knlight.data.datamodule import RMLLamaDataModule
from knlight.data.records import FactRecord
from knlight.errors import ConfigError, DataError
from knlight.factcheck.claims import (
    FALSE_CLAIM,
    POSITIVE_CLASS,
    TRUE_CLAIM,
    Claim,
    build_claims,
    claim_counts,
    split_claims,
)
from knlight.factcheck.detectors import (
    COLUMN,
    DETECTORS,
    FEATURES,
    LR_FEATURES,
    LogisticDetector,
    RelationSet,
    claim_features,
    falseness,
    relation_sets,
)
from knlight.io import write_text_atomically
from knlight.lm.options import LMOptions
from knlight.lm.prompts import EncodedQuery, QueryError
from knlight.metrics.factcheck import ClaimScores, choose_threshold, curve_figures, flagged, results_table
from knlight.neurons.attribution import attribute_batch
from knlight.neurons.ig import IGOptions
from knlight.neurons.interventions import Neuron
from knlight.neurons.selection import degenerate_neurons, mask_to_neurons, top_k_mask
from knlight.tasks.base import BaseTask

log = logging.getLogger(__name__)

Item = dict[str, Any]
Detector = Literal["amig", "prob", "prob_mean", "rank", "fast", "fast_lr", "act_lr"]
NEEDS_SETS = ("amig", "fast", "fast_lr", "act_lr")


class FactCheckDataModule(RMLLamaDataModule):
    """Serves fact-checking claims of an RML-LAMA records file, split by fact uuid.

    Items are claim dicts (:meth:`knlight.factcheck.claims.Claim.to_item`: ``claim_id``, ``uuid``,
    ``relation``, ``language``, ``query_id``, ``query``, ``candidate``, ``label``, ``candidate_index`` and
    ``answer`` = ``candidate``). ``val_dataloader`` / ``test_dataloader`` serve the claims of the validation /
    test facts; the training claims are read by the module (:meth:`claims`).

    Args:
        path: Records file (JSONL) with ``wrong_objects``.
        languages: Keep only these language codes; None keeps all.
        relations: Keep only these relation ids; None keeps all.
        max_facts: Keep at most this many facts (seeded, order-independent); None keeps all.
        batch_size: Claims per batch.
        num_workers: DataLoader worker processes.
        split_fractions: Train, val and test fractions of the facts (hash of uuid and seed).
        seed: Seed of the fact subset and of the splits.
        model_kind: Set by the CLI from the model: ``causal`` drops queries that start with [Y].
        queries_per_fact: Queries per (fact, language) that make claims (the first usable ones; null: all).
        max_wrong: Wrong objects per record used as false claims (the first ones; null: all).
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
        queries_per_fact: int | None = 1,
        max_wrong: int | None = None,
    ) -> None:
        super().__init__(
            path, languages, relations, max_facts, batch_size, num_workers, split_fractions, seed, model_kind
        )
        self.queries_per_fact = queries_per_fact
        self.max_wrong = max_wrong

    def claims(self, split: str = "all") -> list[Claim]:
        """The claims of a split (``all``, ``train``, ``val``, ``test``), in claim-id order."""
        return [Claim.from_item(item) for item in self.items(split)]

    def _build_items(self, records: list[FactRecord]) -> dict[str, list[Item]]:
        claims = build_claims(records, self.model_kind, self.queries_per_fact, self.max_wrong)
        parts = split_claims(claims, records, self.split_fractions, self.seed)
        out = {"all": [c.to_item() for c in claims]}
        out.update({name: [c.to_item() for c in part] for name, part in parts.items()})
        return out


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
        chunk_rows: Rows per forward of the DKN search.
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
        chunk_rows: int = 256,
        output_dir: str | None = None,
    ) -> None:
        super().__init__(lm)
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
        self.top_k, self.t_low, self.t_high, self.t = top_k, t_low, t_high, t
        self.use_sets, self.fallback, self.neurons_path = use_sets, fallback, neurons
        self.ig_options: dict[str, Any] = ig.kwargs()
        self.given_thresholds = dict(thresholds or {})
        self.l2 = l2
        self.chunk_rows = chunk_rows
        self.output_dir = output_dir
        self.scores = ClaimScores(len(FEATURES))
        self.sets: dict[str, RelationSet] = {}
        self.models: dict[str, LogisticDetector] = {}
        self.thresholds: dict[str, float] = {}
        self.threshold_source: dict[str, str] = {}
        self.results: dict[str, Any] | None = None
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
            try:
                self._encoded[key] = self.lm.encode(claim.query, claim.candidate)
            except QueryError as error:
                raise QueryError(
                    f"claim {claim.claim_id} (uuid={claim.uuid!r} language={claim.language!r} query "
                    f"{claim.query!r}, candidate {claim.candidate!r}): {error}"
                ) from error
        return self._encoded[key]

    def _shard(self, claims: Sequence[Claim]) -> list[Claim]:
        """This process's share of a list (round robin, no padding)."""
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
        self._update(metric, mine, [self.score_claim(c, amig) for c in mine])
        return self._compute(metric)

    def _update(self, metric: ClaimScores, claims: Sequence[Claim], rows: list[torch.Tensor]) -> None:
        device = self.device
        metric.update(
            torch.tensor([c.claim_id for c in claims], dtype=torch.long, device=device),
            torch.tensor([c.label for c in claims], dtype=torch.long, device=device),
            (torch.stack(rows) if rows else torch.zeros(0, len(FEATURES), dtype=torch.float64)).to(device),
        )

    # -- preparation (train and validation splits)
    # -------------------------------------------------------------------------------------------

    def _dkn_rows(self, claim: Claim) -> list[list[int]]:
        """``[claim_id, group, member, layer, index]`` rows: group −1 = the top-K, k ≥ 0 = k-th DKN group."""
        encoded = self._encode(claim)
        with torch.enable_grad():
            scores = attribute_batch(self.lm, [encoded], completeness=False, **self.ig_options).scores[0]
        top = mask_to_neurons(top_k_mask(scores, self.top_k), scores)
        result = degenerate_neurons(
            self.lm, [encoded], top, self.t_low, self.t_high, grow=self.use_sets, chunk_rows=self.chunk_rows
        )
        rows = [[claim.claim_id, -1, m, layer, index] for m, (layer, index) in enumerate(top)]
        groups: list[Sequence[Neuron]] = [*result.pairs, *(result.sets if self.use_sets else [])]
        for g, group in enumerate(groups):
            rows.extend([claim.claim_id, g, m, layer, index] for m, (layer, index) in enumerate(group))
        return rows

    def build_relation_sets(self, train: Sequence[Claim], relations: Sequence[str]) -> dict[str, RelationSet]:
        """Each relation's neuron set from the training claims (sharded over processes, then gathered)."""
        groups: dict[str, list[list[tuple[Neuron, ...]]]] = defaultdict(list)
        tops: dict[str, list[list[Neuron]]] = defaultdict(list)
        if self.neurons_path is not None:
            from knlight.neurons.neuron_file import read_neuron_file

            neurons = read_neuron_file(self.neurons_path, self.lm.num_layers, self.lm.d_ff)
            relation_of = {c.uuid: c.relation for c in train}
            used = sorted(uuid for uuid in neurons.facts if uuid in relation_of)
            for uuid in used:
                fact = neurons.facts[uuid]
                fact_groups = [*fact.degenerate_pairs, *(fact.degenerate_sets if self.use_sets else [])]
                groups[relation_of[uuid]].append([tuple(g) for g in fact_groups])
                tops[relation_of[uuid]].append(
                    list(dict.fromkeys(n for lang in sorted(fact.languages) for n in fact.languages[lang]))
                )
            log.info(
                "DKN from %s: %d train facts (of %d in the file)",
                self.neurons_path,
                len(used),
                len(neurons.facts),
            )
        else:
            true_claims = [c for c in train if c.label == TRUE_CLAIM]
            mine = self._shard(true_claims)
            started = time.perf_counter()
            local = [row for claim in mine for row in self._dkn_rows(claim)]
            log.info(
                "rank %d: DKN search on %d training claims in %.1fs", self.global_rank, len(mine),
                time.perf_counter() - started,
            )  # fmt: skip
            rows = self._gather(torch.tensor(local, dtype=torch.long).reshape(-1, 5)).tolist()
            by_claim: dict[int, dict[int, list[tuple[int, Neuron]]]] = defaultdict(lambda: defaultdict(list))
            for claim_id, group, member, layer, index in rows:
                by_claim[claim_id][group].append((member, (layer, index)))
            for claim in true_claims:
                found = by_claim.get(claim.claim_id, {})
                members = {g: [n for _, n in sorted(ms)] for g, ms in found.items()}
                tops[claim.relation].append(members.get(-1, []))
                groups[claim.relation].append([tuple(members[g]) for g in sorted(members) if g >= 0])
        return relation_sets(relations, groups, tops, self.t, self.fallback)

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
                for relation, rset in self.sets.items():
                    log.info(
                        "relation %s: %d neurons (%s, %d pairs)",
                        relation,
                        len(rset.neurons),
                        rset.source,
                        rset.pairs,
                    )
            lr = [d for d in self.detectors if d in LR_FEATURES]
            if lr:
                # The logistic detectors see no IG: the training claims are scored without it.
                _, labels, features = self._score(train, amig=False)
                if len(set(labels.tolist())) < 2:
                    raise DataError(
                        "the train split's claims are all of one class; the logistic detectors need both"
                    )
                for detector in lr:
                    self.models[detector] = LogisticDetector.fit(
                        features, labels, LR_FEATURES[detector], self.l2
                    )
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
            for d in missing:
                self.thresholds[d] = choose_threshold(falseness(d, features, self.models), labels)
                self.threshold_source[d] = "val"

    def _compute(self, metric: ClaimScores) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gathered, de-duplicated rows (every process must call it)."""
        # An empty update keeps the list states non-empty on a process that scored nothing.
        metric.update(torch.zeros(0, dtype=torch.long, device=self.device),
                      torch.zeros(0, dtype=torch.long, device=self.device),
                      torch.zeros(0, len(FEATURES), dtype=torch.float64, device=self.device))  # fmt: skip
        out = metric.compute()
        metric.reset()
        return out

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
        self._update(self.scores, claims, [self.score_claim(c) for c in claims])

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
        ids, labels, features = self._compute(self.scores)
        by_id = {c.claim_id: c for c in self._datamodule().claims("all")}
        claims = [by_id[int(i)] for i in ids]
        scores = {d: falseness(d, features, self.models) for d in self.detectors}
        if split == "val":
            for d in self.detectors:
                if d not in self.thresholds:
                    self.thresholds[d] = choose_threshold(scores[d], labels)
                    self.threshold_source[d] = "val (in-sample)"
        groups = {"language": [c.language for c in claims], "relation": [c.relation for c in claims]}
        table = results_table(split, scores, labels, self.thresholds, groups)
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
        self.results = {
            "split": split,
            "positive_class": POSITIVE_CLASS,
            "counts": {**claim_counts(claims), "rows_received": seen, "world_size": self.trainer.world_size},
            "thresholds": self.thresholds,
            "threshold_source": self.threshold_source,
            "lambda_amig": -self.thresholds["amig"] if "amig" in self.thresholds else None,
            "reference": reference_scores(labels),
            "table": table,
        }
        # Every process takes part in resolving the log dir (it is broadcast from rank 0).
        log_dir = self.trainer.log_dir
        if self.trainer.is_global_zero:
            out = Path(self.output_dir or Path(log_dir or ".") / "factcheck") / split
            self._write(out, claims, labels, features, scores)
            self._figures(split, scores, labels)
            log.info(
                "fact-checking %s: %d claims (%d false), tables in %s (%.1fs)", split, len(claims),
                int((labels == FALSE_CLAIM).sum()), out, time.perf_counter() - self._started,
            )  # fmt: skip

    def settings(self) -> dict[str, Any]:
        """Settings that determine the results (written to ``results.json``)."""
        return self.flat_hparams()

    def _write(
        self,
        out: Path,
        claims: list[Claim],
        labels: torch.Tensor,
        features: torch.Tensor,
        scores: dict[str, torch.Tensor],
    ) -> None:
        assert self.results is not None
        write_text_atomically(out / "results.csv", csv_text(self.results["table"]))
        document = {
            "settings": self.settings(),
            **self.results,
            "relation_sets": [s.to_json() for s in self.sets.values()],
            "logistic": {d: m.to_json() for d, m in self.models.items()},
        }
        write_text_atomically(
            out / "results.json", json.dumps(json_safe(document), indent=1, ensure_ascii=False) + "\n"
        )
        rows = []
        for k, claim in enumerate(claims):
            row: dict[str, Any] = {
                "claim_id": claim.claim_id, "uuid": claim.uuid, "relation": claim.relation,
                "language": claim.language, "query_id": claim.query_id, "candidate": claim.candidate,
                "label": int(labels[k]),
            }  # fmt: skip
            row.update({name: float(features[k, COLUMN[name]]) for name in FEATURES})
            for d, s in scores.items():
                row[f"score_{d}"] = float(s[k])
                row[f"flagged_{d}"] = int(flagged(s[k : k + 1], self.thresholds[d])[0])
            rows.append(row)
        write_text_atomically(out / "claims.csv", csv_text(rows))

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


def reference_scores(labels: torch.Tensor) -> dict[str, float]:
    """What no-skill detectors score: flagging every claim (precision = share of false claims, recall 1) and
    chance AUROC. With mostly false claims, F1 alone says little: compare with ``f1_flag_all``."""
    share = float((labels == FALSE_CLAIM).double().mean()) if labels.numel() else math.nan
    return {"false_share": share, "f1_flag_all": 2 * share / (1 + share), "auroc_chance": 0.5}


def json_safe(value: Any) -> Any:
    """NaN and infinities become null (valid JSON), recursively."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def csv_text(rows: list[dict[str, Any]]) -> str:
    """CSV of flat dict rows (columns of the first row; floats by ``repr``, NaN as ``nan``)."""
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: repr(v) if isinstance(v, float) else v for k, v in row.items()} for row in rows)
    return out.getvalue()
