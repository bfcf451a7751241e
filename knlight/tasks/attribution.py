"""Integrated-gradient attribution of FFN neurons as a (distributed, resumable) Lightning predict loop."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from lightning.pytorch import Callback

from knlight.errors import ConfigError
from knlight.io import short_hash
from knlight.lm.options import LMOptions
from knlight.lm.prompts import EncodedQuery, QueryError
from knlight.neurons.attribution import Attribution, attribute_batch
from knlight.neurons.ig import IGOptions
from knlight.neurons.selection import coarse_mask, top_k_mask
from knlight.tasks.base import BaseTask, ItemKey

log = logging.getLogger(__name__)

Item = dict[str, Any]


def is_out_of_memory(error: BaseException) -> bool:
    """True for a device out-of-memory error (CUDA's ``OutOfMemoryError`` or a RuntimeError saying so)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
    )


def input_hash(query: str, answer: str) -> str:
    """Short hash of what an item's attribution is computed from besides the model: query and answer text."""
    return short_hash([query, answer])


def select_neurons(
    scores: torch.Tensor, layers: list[int], threshold: float, top_k: int | None
) -> list[tuple[int, int, float]]:
    """Coarse knowledge neurons of one item: ``Attr > threshold · max Attr`` over all layers and neurons.

    Args:
        scores: ``[len(layers), d_ff]`` attribution of one item.
        layers: The model layer of each row of ``scores``.
        threshold: Fraction τ of the item's maximum attribution.
        top_k: Keep at most this many (the highest); None keeps all above the threshold.

    Returns:
        ``(layer, neuron, score)`` sorted by score (descending), ties by (layer, neuron); empty when no
        attribution is positive.

    Raises:
        ValueError: When the scores contain NaN or τ is outside [0, 1].
    """
    mask = coarse_mask(scores, threshold)
    if top_k is not None:
        mask = top_k_mask(scores, top_k, within=mask)
    rows, cols = torch.nonzero(mask, as_tuple=True)
    found = [(layers[int(r)], int(c), float(scores[r, c])) for r, c in zip(rows.tolist(), cols.tolist())]
    found.sort(key=lambda n: (-n[2], n[0], n[1]))
    return found


@torch.no_grad()
def gold_ranks(lm: Any, encoded: list[EncodedQuery]) -> list[int]:
    """Rank (1 = the model's top token) of each query's first answer token at its target position (one clean
    forward; the knowledge filter's "gold rank")."""
    ranks = []
    for query, log_probs in zip(encoded, lm.target_log_probs(encoded)):
        gold = log_probs[0, query.targets[0][1]]
        ranks.append(1 + int((log_probs[0] > gold).sum()))
    return ranks


class AttributionModule(BaseTask):
    """Attributes each (fact, language, query) item to FFN neurons with integrated gradients (predict loop).

    ``predict_step`` returns one dict per item: its ids (``uuid``, ``language``, ``relation``, ``query_id``),
    ``query``, ``answer``, ``prob`` (P(answer) under the clean model), ``rank`` (the rank of the answer's first
    token among the clean model's predictions at its target position, 1 = top; the knowledge filter of
    :mod:`knlight.selection` reads it with ``prob``), ``neurons`` (coarse neurons, see
    :func:`select_neurons`), ``residual`` (completeness residual per attributed layer), ``layer_mass`` (share
    of the item's positive attribution in each attributed layer), ``input_hash`` (of query and answer, see
    :func:`input_hash`), ``model_hash`` (of the model's identity, see :meth:`BaseTask.model_identity`) and,
    when ``return_scores``, the dense ``scores`` ``[len(layers), d_ff]``. Items an earlier run already wrote
    from the same inputs are skipped (see :class:`knlight.callbacks.AttributionWriter`). Run it with
    ``trainer.inference_mode: false``: IG needs gradients.

    Args:
        lm: The language model (``lm.model``: hub id, local folder or ``.gguf`` file, packaged name, or
            ``tiny:<arch>[:seed]``).
        ig: How integrated gradients are computed (method: exact ``ig`` or a labelled approximation recorded in
            ``run.json``; baseline, quadrature, steps, objective, engine, chunk_rows).
        layers: Layers to attribute (default all).
        completeness: Also compute the completeness residual per layer (one extra row per problem).
        micro_batch_size: Items attributed together in one call. 1 (default) makes every item's numbers
            independent of its batch-mates, so outputs are byte-identical whatever the DDP world size or
            resume point; larger values batch prompts together (items then differ by float rounding,
            ~1e-9, between batchings). A micro-batch that runs out of memory is split in halves and retried.
        threshold: Global τ: a neuron is selected when its attribution exceeds τ · the item's maximum.
        language_thresholds: Per-language τ overriding ``threshold`` (AMIG used ``{en: 0.3, zh: 0.2}``).
        top_k: Keep at most this many selected neurons per item (the highest); None keeps all.
        return_scores: Include the dense scores in each prediction (needed by the writer's ``save_scores``).
    """

    def __init__(
        self,
        lm: LMOptions,
        ig: IGOptions = IGOptions(),
        layers: list[int] | None = None,
        completeness: bool = True,
        micro_batch_size: int | None = 1,
        threshold: float = 0.2,
        language_thresholds: dict[str, float] | None = None,
        top_k: int | None = None,
        return_scores: bool = False,
    ) -> None:
        super().__init__(lm)
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ConfigError(
                f"model.init_args.micro_batch_size must be >= 1 or null (whole batch), got {micro_batch_size}"
            )
        for name, tau in {"threshold": threshold, **(language_thresholds or {})}.items():
            if not 0.0 <= tau <= 1.0:
                key = "threshold" if name == "threshold" else f"language_thresholds.{name}"
                raise ConfigError(
                    f"model.init_args.{key}: threshold for {name!r} must be in [0, 1] (fraction of the max), got {tau}"
                )
        if top_k is not None and top_k < 1:
            raise ConfigError(f"model.init_args.top_k must be >= 1 or null (no cap), got {top_k}")
        self.save_hyperparameters()
        self.ig = ig
        self.ig_options: dict[str, Any] = dict(layers=layers, completeness=completeness, **ig.kwargs())
        self.micro_batch_size = micro_batch_size
        self.threshold = threshold
        self.language_thresholds = dict(language_thresholds or {})
        self.top_k = top_k
        self.return_scores = return_scores
        self.items_computed = 0
        self.items_skipped = 0
        # Filled by the writer with done_keys: the input hash each earlier result was computed from.
        self.done_inputs: dict[ItemKey, str] = {}

    @property
    def attributed_layers(self) -> list[int]:
        """The attributed layers, in the order of ``residual``, ``layer_mass`` and ``scores``."""
        layers = self.ig_options["layers"]
        return list(range(self.lm.num_layers)) if layers is None else [int(x) for x in layers]

    @staticmethod
    def input_hash(item: Item) -> str:
        """Short hash of the item's query and answer (see :func:`input_hash`)."""
        return input_hash(item["query"], item["answer"])

    def is_done(self, item: Item) -> bool:
        """True when an earlier run already wrote this item from the same query and answer.

        Raises:
            RunFolderError: When an earlier result of the item's key was computed from another query or answer
                (the writer refuses such a folder before the run starts; this guards data it cannot list).
        """
        key = self.item_key(item)
        if key not in self.done_keys:
            return False
        recorded = self.done_inputs.get(key)
        if recorded is not None and recorded != self.input_hash(item):
            from knlight.runfolder import RunFolderError

            raise RunFolderError(
                f"item uuid={item['uuid']!r} language={item['language']!r} query_id={item['query_id']!r}: the "
                f"output folder holds a result computed from another query or answer than {item['query']!r} -> "
                f"{item['answer']!r}; resuming would mix results of different data. Write to another "
                "output_dir, or delete the folder to recompute everything."
            )
        return True

    def threshold_for(self, language: str) -> float:
        """τ for one language: its entry in ``language_thresholds``, else the global ``threshold``."""
        return self.language_thresholds.get(language, self.threshold)

    def predict_step(
        self, batch: list[Item], batch_idx: int = 0, dataloader_idx: int = 0
    ) -> list[dict[str, Any]]:
        """Attributes the batch's items that are not done yet; returns one result dict per computed item."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "AttributionModule needs gradients but predict runs under torch.inference_mode(); set "
                "`trainer.inference_mode: false` (CLI: --trainer.inference_mode false)."
            )
        todo = [item for item in batch if not self.is_done(item)]
        self.items_skipped += len(batch) - len(todo)
        if not todo:
            return []
        encoded = [self._encode(item) for item in todo]
        size = self.micro_batch_size or len(todo)
        results: list[dict[str, Any]] = []
        with torch.enable_grad():  # Lightning's predict loop runs under no_grad
            for start in range(0, len(todo), size):
                chunk = slice(start, start + size)
                attribution = self._attribute(encoded[chunk], todo[chunk])
                ranks = gold_ranks(self.lm, encoded[chunk])
                results.extend(self._results(todo[chunk], attribution, ranks))
        self.items_computed += len(results)
        return results

    def _encode(self, item: Item) -> EncodedQuery:
        try:
            return self.lm.encode(item["query"], item["answer"])
        except QueryError as error:
            raise QueryError(
                f"item uuid={item['uuid']!r} language={item['language']!r} query_id={item['query_id']!r} "
                f"(query {item['query']!r}, answer {item['answer']!r}): {error}"
            ) from error

    def _attribute(self, encoded: list[EncodedQuery], items: list[Item]) -> Attribution:
        """``attribute_batch``; on out-of-memory, split the items in halves and retry (recursively)."""
        try:
            return attribute_batch(self.lm, encoded, **self.ig_options)
        except (RuntimeError, torch.OutOfMemoryError) as error:
            if not is_out_of_memory(error):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(items) == 1:
                item = items[0]
                raise torch.OutOfMemoryError(
                    f"out of memory attributing a single item (uuid={item['uuid']!r}, "
                    f"language={item['language']!r}, query_id={item['query_id']!r}); lower model.chunk_rows, "
                    "model.steps or the number of model.layers, or use a device with more memory"
                ) from error
            half = len(items) // 2
            log.warning("out of memory on %d items: retrying as %d + %d", len(items), half, len(items) - half)
            first = self._attribute(encoded[:half], items[:half])
            second = self._attribute(encoded[half:], items[half:])
            return Attribution(
                scores=torch.cat([first.scores, second.scores]),
                layers=first.layers,
                prob=torch.cat([first.prob, second.prob]),
                delta=torch.cat([first.delta, second.delta]),
                residual=torch.cat([first.residual, second.residual]),
                method=first.method,
            )

    def _results(self, items: list[Item], attribution: Attribution, ranks: list[int]) -> list[dict[str, Any]]:
        model_hash = self.model_hash()
        out = []
        for i, item in enumerate(items):
            scores = attribution.scores[i].float()
            positive = scores.clamp_min(0).sum(-1)
            total = float(positive.sum())
            result: dict[str, Any] = {
                "uuid": item["uuid"],
                "language": item["language"],
                "relation": item.get("relation"),
                "query_id": item["query_id"],
                "query": item["query"],
                "answer": item["answer"],
                "prob": float(attribution.prob[i]),
                "rank": ranks[i],
                "neurons": select_neurons(
                    scores, attribution.layers, self.threshold_for(item["language"]), self.top_k
                ),
                "residual": [None if math.isnan(r) else r for r in attribution.residual[i].tolist()],
                "layer_mass": (positive / total).tolist() if total > 0 else [0.0] * len(positive),
                "layers": attribution.layers,
                "method": attribution.method,
                "input_hash": self.input_hash(item),
                "model_hash": model_hash,
            }
            if self.return_scores:
                result["scores"] = scores
            out.append(result)
        return out

    def configure_callbacks(self) -> list[Callback]:
        """Adds a default AttributionWriter and AttributionTensorBoard when the trainer has none.

        Without a writer the results would only live in memory (and be lost with ``return_predictions:
        false``); configured ones are kept as they are.
        """
        from knlight.callbacks import AttributionTensorBoard, AttributionWriter

        present = self._trainer.callbacks if self._trainer is not None else []  # type: ignore[attr-defined]
        return [
            cls()
            for cls in (AttributionWriter, AttributionTensorBoard)
            if not any(isinstance(c, cls) for c in present)
        ]

    def on_predict_start(self) -> None:
        self.items_computed = 0
        self.items_skipped = 0

    def on_predict_end(self) -> None:
        log.info(
            "rank %d: attributed %d items, skipped %d already done",
            self.global_rank,
            self.items_computed,
            self.items_skipped,
        )

    def fingerprint(self) -> dict[str, Any]:
        """Settings that determine the results (memory/batching knobs excluded)."""
        skip = ("chunk_rows", "max_memory_gb", "micro_batch_size")
        return {k: v for k, v in self.flat_hparams().items() if k not in skip}
