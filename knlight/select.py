"""Selection step: from ``knlight predict`` output (``attributions.jsonl``) to a neuron file.

Run it as a command::

    python -m knlight.select --attributions runs/tiny-localize/attributions --output neurons.json
    python -m knlight.select --attributions <dir> --output neurons.json --uncertainty.enabled true \\
        --likn.min_languages 2 --dkn.enabled true
    python -m knlight.select --help          # every option, documented

or as a function: :func:`run_selection` (returns the :class:`~knlight.neurons.neuron_file.NeuronFile` and
writes it when ``output`` is given). For every fact of the attribution output it computes:

* **knowledge neurons per language** (Dai et al.): the coarse neurons of each query (``Attr > τ_lang · max``,
  from the predict run, or re-thresholded with :class:`KnOptions`), refined by prompt sharing: neurons coarse
  in at least a fraction p of the fact's queries in that language, p moved until 2–5 neurons remain
  (``adaptive``);
* **language-independent neurons** (LIKN, AMIG): neurons selected in every language, or in at least
  ``min_languages`` of them (:class:`LiknOptions`);
* **uncertainty-aware neurons** (knlight's MATRICE-style formulation, see :mod:`knlight.neurons.selection`): a
  lower confidence bound across queries and languages of the normalised dense scores (needs the predict run's
  ``scores.safetensors``; :class:`UncertaintyOptions`);
* **degenerate neurons** (AMIG Algorithm 1 pairs and greedy larger sets): needs the model, which it loads
  (:class:`DknOptions`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from knlight.errors import DataError, KnlightError
from knlight.io import iter_jsonl, resolved_from
from knlight.lm.prompts import EncodedQuery, QueryError
from knlight.neurons.interventions import Neuron
from knlight.neurons.neuron_file import FactNeurons, NeuronFile, write_neuron_file
from knlight.neurons.selection import (
    adaptive_refine,
    coarse_mask,
    degenerate_neurons,
    language_independent,
    mask_to_neurons,
    refine_by_sharing,
    top_k_mask,
    uncertainty_scores,
)

log = logging.getLogger(__name__)

MERGED = "attributions.jsonl"
SCORES = "scores.safetensors"
SCORES_HINT = (
    "re-run `knlight predict` with `--model.init_args.return_scores true "
    "--trainer.callbacks.init_args.save_scores true` (the AttributionWriter is the last callback of the "
    "shipped configs; leave scores_top_k unset for dense scores), or pass --scores PATH"
)


class SelectionError(KnlightError, ValueError):
    """Attribution output that cannot be turned into neurons (missing files, NaN scores, bad options)."""


@dataclass(frozen=True)
class KnOptions:
    """Knowledge neurons of one fact in one language (Dai et al.): coarse per query, refined by sharing.

    Attributes:
        threshold: Coarse τ: a query's neuron is coarse when its attribution exceeds τ · the query's maximum.
            None keeps the coarse neurons written by the predict run (its
            ``threshold``/``language_thresholds``). A τ below the predict run's needs the dense scores.
        language_thresholds: τ per language overriding ``threshold`` (AMIG: ``{en: 0.3, zh-hans: 0.2}``).
        p: Sharing fraction: a neuron is kept when it is coarse in at least p of the fact's queries in the
            language (Dai: 0.7).
        adaptive: Move p by ``p_step`` until the fact keeps ``min_neurons``..``max_neurons`` (Dai's 2–5).
        min_neurons: Lower end of the adaptive range.
        max_neurons: Upper end of the adaptive range.
        p_step: Step of the adaptive search.
        top_k: Keep at most this many refined neurons per (fact, language), the highest mean normalised score
            (a cap beyond Dai et al.: with few queries no p can separate neurons coarse in every query). None
            keeps them all.
    """

    threshold: float | None = None
    language_thresholds: dict[str, float] | None = None
    p: float = 0.7
    adaptive: bool = True
    min_neurons: int = 2
    max_neurons: int = 5
    p_step: float = 0.05
    top_k: int | None = None


@dataclass(frozen=True)
class LiknOptions:
    """Language-independent knowledge neurons (LIKN): a fact's neurons shared across languages.

    Attributes:
        min_languages: Keep neurons selected in at least this many of the fact's languages. None: in every
            language of the selection (a fact missing a language then has no LIKN), as AMIG's intersection.
    """

    min_languages: int | None = None


@dataclass(frozen=True)
class UncertaintyOptions:
    """Uncertainty-aware aggregation over queries and languages (needs the dense ``scores.safetensors``).

    Attributes:
        enabled: Compute the ``uncertainty`` neurons.
        kappa: Width of the lower confidence bound ``mean − κ·std`` (0: plain mean of normalised scores).
        threshold: Keep neurons whose bound exceeds this fraction of the fact's highest bound.
        top_k: Keep at most this many (the highest); None keeps all above the threshold.
        weight_by_prob: Weight each query by the model's P(answer) (confident queries count more).
        allow_top_k_scores: Accept a scores file saved with ``scores_top_k`` (scores outside each query's top
            k are taken as 0: an approximation).
    """

    enabled: bool = False
    kappa: float = 1.0
    threshold: float = 0.3
    top_k: int | None = 5
    weight_by_prob: bool = False
    allow_top_k_scores: bool = False


@dataclass(frozen=True)
class DknOptions:
    """Degenerate knowledge neurons (AMIG Algorithm 1, plus greedy growth); loads the model.

    Attributes:
        enabled: Compute the ``degenerate`` pairs and sets.
        top_k: Search among the fact's K highest-ranked neurons (mean normalised attribution over all its
            queries; AMIG: 20). Only neurons with a positive score are ranked.
        t_low: A single neuron whose suppression drops P(answer) by at most this (relative) is a candidate.
        t_high: A pair (set) is degenerate when suppressing it drops P(answer) by more than this.
        grow: Also search sets of 3..``max_set_size`` among candidates not in any pair.
        max_set_size: Largest set the greedy growth builds.
        chunk_rows: Rows (query × neuron set) per forward.
    """

    enabled: bool = False
    top_k: int = 20
    t_low: float = 0.2
    t_high: float = 0.25
    grow: bool = True
    max_set_size: int = 4
    chunk_rows: int = 256


@dataclass
class QueryAttribution:
    """One line of ``attributions.jsonl`` (the fields selection needs)."""

    uuid: str
    language: str
    relation: str | None
    query_id: int
    query: str
    answer: str
    prob: float | None
    neurons: list[tuple[int, int, float]]
    where: str = field(default="", repr=False)

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.uuid, self.language, self.query_id)


@dataclass
class AttributionRun:
    """A predict run's output: its items, its settings (``run.json``) and where the dense scores are."""

    path: Path
    items: list[QueryAttribution]
    hparams: dict[str, Any]
    scores: Path | None


def read_attributions(path: str | Path, scores: str | Path | None = None) -> AttributionRun:
    """Read a predict output folder (or its ``attributions.jsonl``).

    Raises:
        SelectionError: Missing file, a malformed line or a NaN attribution score (named by file and line).
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    jsonl = path / MERGED if path.is_dir() else path
    if not jsonl.is_file():
        raise SelectionError(
            f"{jsonl} does not exist{resolved_from(jsonl)}; run `knlight predict --config ...` first (it writes "
            f"<save_dir>/<name>/attributions/{MERGED}) and pass that folder as --attributions"
        )
    items: list[QueryAttribution] = []
    try:
        for line, record in iter_jsonl(jsonl):
            where = f"{jsonl}:{line}"
            try:
                neurons = [(int(n[0]), int(n[1]), n[2]) for n in record["neurons"]]
                item = QueryAttribution(
                    uuid=str(record["uuid"]),
                    language=str(record["language"]),
                    relation=record.get("relation"),
                    query_id=int(record["query_id"]),
                    query=str(record["query"]),
                    answer=str(record["answer"]),
                    prob=record.get("prob"),
                    neurons=[],
                    where=where,
                )
            except (KeyError, TypeError, ValueError, IndexError) as error:
                raise SelectionError(
                    f"{where}: not an attribution line ({type(error).__name__}: {error}); expected the keys "
                    "uuid, language, query_id, query, answer and neurons [[layer, index, score], ...]"
                ) from None
            for layer, index, score in neurons:
                if score is None or not isinstance(score, int | float) or score != score:
                    raise SelectionError(
                        f"{where}: item uuid={item.uuid!r} language={item.language!r} "
                        f"query_id={item.query_id} has a NaN attribution score for neuron [{layer}, "
                        f"{index}]; the attribution failed for this item (typically fp16/bf16 overflow or a "
                        "NaN in the model): re-run knlight predict with --model.init_args.dtype float32, or "
                        "drop the item"
                    )
            item.neurons = [(layer, index, float(score)) for layer, index, score in neurons]
            items.append(item)
    except DataError as error:
        raise SelectionError(str(error)) from None
    if not items:
        raise SelectionError(f"{jsonl} has no attribution lines; the predict run selected no items")
    from knlight.callbacks.run_folder import RunFolderError, check_complete, read_run_file

    try:
        check_complete(jsonl, len(items))
        hparams = (read_run_file(folder) or {}).get("hparams", {})
    except RunFolderError as error:
        raise SelectionError(str(error)) from None
    score_path = Path(scores) if scores is not None else folder / SCORES
    return AttributionRun(jsonl, items, hparams, score_path if score_path.is_file() else None)


class DenseScores:
    """Reads the dense (or top-k) scores of items from a predict run's ``scores.safetensors``."""

    def __init__(self, path: Path, num_layers: int, d_ff: int, allow_top_k: bool) -> None:

        self.path = path
        self.num_layers = num_layers
        self.d_ff = d_ff
        try:
            self._handle = safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as error:
            raise self._damaged(error) from None
        meta = self._handle.metadata() or {}
        self.format = meta.get("format", "dense")
        self.layers = json.loads(meta["layers"]) if "layers" in meta else list(range(num_layers))
        if self.format != "dense" and not allow_top_k:
            raise SelectionError(
                f"{path} holds only each item's {self.format.replace('_', ' ')} scores; the "
                "uncertainty-aware aggregation needs dense scores: "
                + SCORES_HINT.replace(
                    "or pass",
                    "or set --uncertainty.allow_top_k_scores true to treat the other scores as 0, or pass",
                )
            )
        self._names = set(self._handle.keys())

    def _damaged(self, error: Exception) -> SelectionError:
        return SelectionError(
            f"cannot read the scores file {self.path}{resolved_from(self.path)} ({type(error).__name__}: "
            f"{error}): it is damaged (e.g. truncated by a full disk or an interrupted copy). Re-run `knlight "
            "predict` with the same settings into a new output folder (or after deleting this one) to write it "
            "again, or pass the right file with --scores"
        )

    def _tensor(self, name: str) -> torch.Tensor:
        try:
            return self._handle.get_tensor(name)
        except (SafetensorError, OSError) as error:
            raise self._damaged(error) from None

    def get(self, item: QueryAttribution) -> torch.Tensor:
        """``[num_layers, d_ff]`` scores of one item (layers that were not attributed are 0)."""
        from knlight.callbacks.writer import tensor_key

        key = tensor_key(item.key)
        out = torch.zeros(self.num_layers, self.d_ff)
        if self.format == "dense":
            name = f"{key}/scores"
            if name not in self._names:
                raise SelectionError(
                    f"{self.path} has no scores for item {list(item.key)} ({item.where}); " + SCORES_HINT
                )
            dense = self._tensor(name).float()
            if dense.shape[1] != self.d_ff:
                raise SelectionError(
                    f"{self.path}: scores of item {list(item.key)} have {dense.shape[1]} neurons per layer, "
                    f"the model has d_ff={self.d_ff}; the scores come from another model"
                )
            out[self.layers] = dense
        else:
            if f"{key}/index" not in self._names:
                raise SelectionError(
                    f"{self.path} has no scores for item {list(item.key)} ({item.where}); " + SCORES_HINT
                )
            index = self._tensor(f"{key}/index").long()
            out[index[:, 0], index[:, 1]] = self._tensor(f"{key}/score").float()
        if torch.isnan(out).any():
            raise SelectionError(
                f"{self.path}: item {list(item.key)} ({item.where}) has NaN attribution scores; re-run "
                "knlight predict for it in float32"
            )
        return out


def model_dims(model: str, gguf_file: str | None = None) -> tuple[int, int]:
    """``(num_layers, d_ff)`` of a model from its config (tiny ones are built, real ones on ``meta``)."""
    from knlight.lm import load_lm
    from knlight.lm.real import NAMED_MODELS, model_folder
    from knlight.lm.sites import resolve_sites, spec_for

    if model.startswith("tiny:"):
        lm = load_lm(model)
        return lm.num_layers, lm.d_ff
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    source = str(model_folder(model)) if model in NAMED_MODELS else model
    kwargs: dict[str, Any] = {}
    if source.endswith(".gguf") and gguf_file is None:
        source, gguf_file = str(Path(source).parent), Path(source).name
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    config = AutoConfig.from_pretrained(source, **kwargs)
    auto = AutoModelForMaskedLM if spec_for(config.model_type).masked else AutoModelForCausalLM
    with torch.device("meta"):
        skeleton = auto.from_config(config)
    sites = resolve_sites(skeleton)
    return sites.num_layers, sites.d_ff


def _predict_tau(hparams: dict[str, Any], language: str) -> float | None:
    if "threshold" not in hparams:
        return None
    return float((hparams.get("language_thresholds") or {}).get(language, hparams["threshold"]))


def _sparse_scores(item: QueryAttribution, num_layers: int, d_ff: int) -> torch.Tensor:
    dense = torch.zeros(num_layers, d_ff)
    for layer, index, score in item.neurons:
        if not (0 <= layer < num_layers and 0 <= index < d_ff):
            raise SelectionError(
                f"{item.where}: neuron [{layer}, {index}] is outside the model ({num_layers} layers × "
                f"{d_ff}); the attributions come from another model, or pass the right --model / "
                "--num_layers / --d_ff"
            )
        dense[layer, index] = score
    return dense


def _coarse(
    item: QueryAttribution,
    kn: KnOptions,
    hparams: dict[str, Any],
    dense: DenseScores | None,
    dims: tuple[int, int],
) -> torch.Tensor:
    """The coarse mask ``[L, d]`` of one query (stored coarse neurons, or re-thresholded)."""
    tau = (kn.language_thresholds or {}).get(item.language, kn.threshold)
    scores = _sparse_scores(item, *dims)
    if tau is None:
        return scores != 0 if item.neurons else torch.zeros(dims, dtype=torch.bool)
    stored = _predict_tau(hparams, item.language)
    if stored is not None and tau < stored - 1e-12:
        if dense is None or dense.format != "dense":
            raise SelectionError(
                f"coarse τ={tau} for {item.language!r} is below the predict run's τ={stored}: the neurons "
                "between them were not written to attributions.jsonl. Use τ >= the predict run's, or give "
                "dense scores: " + SCORES_HINT
            )
        scores = dense.get(item)
    try:
        return coarse_mask(scores, tau)
    except ValueError as error:
        raise SelectionError(f"{item.where}: {error}") from None


def _encode(lm: Any, item: QueryAttribution) -> EncodedQuery:
    try:
        return lm.encode(item.query, item.answer)
    except QueryError as error:
        raise SelectionError(f"{item.where}: item {list(item.key)}: {error}") from None


def run_selection(
    attributions: str,
    output: str | None = None,
    scores: str | None = None,
    model: str | None = None,
    tokenizer: str | None = None,
    dtype: str | None = None,
    gguf_file: str | None = None,
    device: str | None = None,
    num_layers: int | None = None,
    d_ff: int | None = None,
    languages: list[str] | None = None,
    kn: KnOptions = KnOptions(),
    likn: LiknOptions = LiknOptions(),
    uncertainty: UncertaintyOptions = UncertaintyOptions(),
    dkn: DknOptions = DknOptions(),
) -> NeuronFile:
    """Select knowledge neurons from a predict run and write a neuron file.

    Args:
        attributions: The predict output folder (``.../attributions``) or its ``attributions.jsonl``.
        output: Where to write the neuron file (JSON, ``knlight-neurons/1``); None only returns it.
        scores: Dense scores file (default: ``scores.safetensors`` beside ``attributions.jsonl``); needed by
            the uncertainty-aware aggregation and by a coarse τ below the predict run's.
        model: The model the attributions come from (default: the predict run's, from ``run.json``). Loaded
            only for DKN; otherwise only its shape is read.
        tokenizer: Tokenizer location, for DKN (default: the model's).
        dtype: Weight dtype, for DKN (default float32).
        gguf_file: GGUF file name inside ``model``.
        device: Where to run the DKN suppressions (default CPU; e.g. ``cuda``).
        num_layers: The model's number of layers (skips reading the model's config; give it with ``d_ff``).
        d_ff: The model's neurons per layer.
        languages: Use only these languages (default: every language in the attributions).
        kn: Per-language knowledge neurons (coarse τ, prompt sharing p, adaptive p).
        likn: Language-independent neurons.
        uncertainty: Uncertainty-aware aggregation.
        dkn: Degenerate neurons.

    Returns:
        The neuron file (also written to ``output`` when given).
    """
    started = time.perf_counter()
    run = read_attributions(attributions, scores)
    model_name = model or run.hparams.get("model")
    if model_name is None:
        raise SelectionError(f"{run.path}: no run.json beside it names the model; pass --model")
    items = [i for i in run.items if languages is None or i.language in languages]
    if not items:
        raise SelectionError(f"{run.path}: no item in languages {languages}")
    all_languages = sorted({i.language for i in items})
    lm = None
    if dkn.enabled:
        from knlight.lm import load_lm

        lm = load_lm(
            model_name, tokenizer, dtype, device=device, gguf_file=gguf_file or run.hparams.get("gguf_file")
        )
        dims = (lm.num_layers, lm.d_ff)
    elif num_layers is not None and d_ff is not None:
        dims = (num_layers, d_ff)
    else:
        dims = model_dims(model_name, gguf_file or run.hparams.get("gguf_file"))
    dense = None
    if uncertainty.enabled or kn.threshold is not None or kn.language_thresholds:
        if run.scores is not None:
            dense = DenseScores(
                run.scores, *dims, allow_top_k=uncertainty.allow_top_k_scores or not uncertainty.enabled
            )
        elif uncertainty.enabled:
            raise SelectionError(
                "the uncertainty-aware aggregation needs dense attribution scores, but "
                f"{run.path.parent} has no {SCORES}: " + SCORES_HINT
            )
    if likn.min_languages is not None and not 1 <= likn.min_languages <= len(all_languages):
        raise SelectionError(
            f"likn.min_languages={likn.min_languages}: choose 1..{len(all_languages)} languages"
        )
    if run.hparams.get("top_k") is not None and kn.threshold is not None:
        log.warning("the predict run kept only the top %s coarse neurons per query", run.hparams["top_k"])

    by_fact: dict[str, dict[str, list[QueryAttribution]]] = defaultdict(lambda: defaultdict(list))
    for item in items:
        by_fact[item.uuid][item.language].append(item)
    facts: dict[str, FactNeurons] = {}
    stats: dict[str, list[int]] = defaultdict(list)
    for uuid in sorted(by_fact):
        per_language = by_fact[uuid]
        fact = FactNeurons(relation=next(iter(per_language.values()))[0].relation)
        masks: dict[str, torch.Tensor] = {}
        for language in sorted(per_language):
            queries = sorted(per_language[language], key=lambda i: i.query_id)
            coarse = torch.stack([_coarse(q, kn, run.hparams, dense, dims) for q in queries])
            if kn.adaptive:
                mask, p_used = adaptive_refine(coarse, kn.p, kn.min_neurons, kn.max_neurons, kn.p_step)
            else:
                mask, p_used = refine_by_sharing(coarse, kn.p), kn.p
            rank = torch.stack([_normalised(_sparse_scores(q, *dims)) for q in queries]).mean(0)
            if kn.top_k is not None:
                mask = top_k_mask(rank, kn.top_k, within=mask)
            fact.languages[language] = mask_to_neurons(mask, rank)
            fact.p[language] = p_used
            masks[language] = mask
            stats["kn"].append(int(mask.sum()))
        needed = likn.min_languages or len(all_languages)
        if len(masks) >= needed:
            shared = language_independent(masks, needed)
            counts = torch.stack(list(masks.values())).sum(0).float()
            fact.language_independent = mask_to_neurons(shared, counts)
        stats["likn"].append(len(fact.language_independent))
        fact_items = [
            q for lang in sorted(per_language) for q in sorted(per_language[lang], key=lambda i: i.query_id)
        ]
        if uncertainty.enabled:
            assert dense is not None
            fact.uncertainty = _uncertainty(fact_items, dense, uncertainty)
            stats["uncertainty"].append(len(fact.uncertainty))
        if lm is not None:
            _degenerate(lm, fact, fact_items, dense, dims, dkn)
            stats["dkn pairs"].append(len(fact.degenerate_pairs))
        facts[uuid] = fact
    method = {
        "attributions": str(attributions),
        "attribution": run.hparams,
        "languages": all_languages,
        "kn": asdict(kn),
        "likn": asdict(likn),
        "uncertainty": asdict(uncertainty),
        "dkn": asdict(dkn),
    }
    result = NeuronFile(model_name, dims[0], dims[1], method, facts)
    for name, values in stats.items():
        empty = sum(v == 0 for v in values)
        unit = "(fact, language)" if name == "kn" else "fact"
        log.info(
            "%s: %.2f per %s on average, %d of %d empty",
            name,
            sum(values) / len(values),
            unit,
            empty,
            len(values),
        )
    if output is not None:
        write_neuron_file(output, result)
        result.path = str(output)
        log.info("wrote %d facts to %s in %.1f s", len(facts), output, time.perf_counter() - started)
    return result


def _normalised(scores: torch.Tensor) -> torch.Tensor:
    top = scores.max()
    return scores / top if top > 0 else torch.zeros_like(scores)


def _uncertainty(
    items: Sequence[QueryAttribution], dense: DenseScores, options: UncertaintyOptions
) -> list[Neuron]:
    scores = torch.stack([dense.get(q) for q in items])
    weights = None
    if options.weight_by_prob:
        probs = [q.prob for q in items]
        if any(p is None or p != p for p in probs):
            bad = next(q for q in items if q.prob is None or q.prob != q.prob)
            raise SelectionError(f"{bad.where}: P(answer) is NaN; uncertainty.weight_by_prob needs it")
        weights = torch.tensor(probs, dtype=torch.float64)
        if weights.sum() <= 0:
            weights = None  # the model gives every query P = 0 (underflow): weigh them alike
    lcb = uncertainty_scores(scores, options.kappa, [q.language for q in items], weights)
    mask = coarse_mask(lcb, options.threshold)
    if options.top_k is not None:
        mask = top_k_mask(lcb, options.top_k, within=mask)
    return mask_to_neurons(mask, lcb)


def _degenerate(
    lm: Any,
    fact: FactNeurons,
    items: Sequence[QueryAttribution],
    dense: DenseScores | None,
    dims: tuple[int, int],
    options: DknOptions,
) -> None:
    if dense is not None and dense.format == "dense":
        rank = torch.stack([_normalised(dense.get(q)) for q in items]).mean(0)
    else:
        rank = torch.stack([_normalised(_sparse_scores(q, *dims)) for q in items]).mean(0)
    top = mask_to_neurons(top_k_mask(rank, options.top_k, within=rank > 0), rank)
    if len(top) < 2:
        return
    encoded = [_encode(lm, q) for q in items]
    result = degenerate_neurons(
        lm,
        encoded,
        top,
        options.t_low,
        options.t_high,
        options.grow,
        options.max_set_size,
        options.chunk_rows,
    )
    fact.degenerate_pairs = list(result.pairs)
    fact.degenerate_sets = [list(s) for s in result.sets]


def main(args: Sequence[str] | None = None) -> int:
    """Runs ``python -m knlight.select``.

    Args:
        args: Arguments (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 2 on bad input (the message is logged).
    """
    from jsonargparse import CLI

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        CLI(
            run_selection,
            args=None if args is None else list(args),
            as_positional=False,
            prog="python -m knlight.select",
        )
    except (SelectionError, DataError) as error:
        log.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
