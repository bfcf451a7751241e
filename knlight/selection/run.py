"""The selection step: from ``knlight predict`` output (``attributions.jsonl``) to a neuron file.

Run it as ``knlight select --attributions <predict output folder> --output neurons.json`` (``--help``
documents every option), at the end of ``knlight predict`` with the :class:`~knlight.callbacks.SelectNeurons`
callback, or as :func:`run_selection`. For every fact it computes (see :mod:`knlight.selection.facts`):

* **knowledge neurons per language** (Dai et al.): the coarse neurons of each query (``Attr > τ_lang · max``,
  from the predict run, or re-thresholded with :class:`~knlight.selection.options.KnOptions`), refined by
  prompt sharing: neurons coarse in at least a fraction p of the fact's queries in that language, p moved until
  2–5 neurons remain (``adaptive``);
* **language-independent neurons** (LIKN, AMIG): neurons selected in every language, or in at least
  ``min_languages`` of them;
* **uncertainty-aware neurons** (knlight's MATRICE-style formulation, see :mod:`knlight.neurons.selection`): a
  lower confidence bound across queries and languages of the normalised dense scores (needs the predict run's
  ``scores.safetensors``);
* **degenerate neurons** (AMIG Algorithm 1 pairs and greedy larger sets): needs the model, which it loads;
* **carriers** and **upstream** neurons (``--carriers.enabled true``): the candidates whose own write raises the
  answer (necessary or sufficient with later layers held clean; :mod:`knlight.selection.carriers`) and the
  knowledge neurons that only feed them; needs the model.

**Known facts only, by default.** Before any of that, the knowledge filter (:class:`~knlight.selection.options.
KnownOptions`, ``--known.*``) keeps only the queries whose gold answer the model ranks in its top
``max_rank`` = 10 or gives P >= ``min_prob`` = 0.1, and only the (fact, language) with at least ``min_queries``
= 1 passing query: the file records each language's status under ``known`` and takes LIKN over the known
languages (``language_independent_over``). ``--known.enabled false`` turns it off (the status is still recorded).

Pure Python + torch, no Lightning.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import asdict
from typing import Any

from knlight.lm.options import LMOptions, model_dims
from knlight.neurons.neuron_file import FactNeurons, NeuronFile, write_neuron_file
from knlight.runfolder.format import SCORES
from knlight.selection.annotate import annotate_selection, needs_model
from knlight.selection.facts import _coarse, select_fact
from knlight.selection.known import check_known_options, describe
from knlight.selection.options import (
    CarrierOptions,
    ConsistencyOptions,
    DknOptions,
    KnOptions,
    KnownOptions,
    LapeOptions,
    LiknOptions,
    SpecificityOptions,
    UncertaintyOptions,
)
from knlight.selection.reader import (
    SCORES_HINT,
    AttributionRun,
    DenseScores,
    QueryAttribution,
    SelectionError,
    read_attributions,
)

log = logging.getLogger(__name__)


def run_selection(
    attributions: str,
    output: str | None = None,
    scores: str | None = None,
    lm: LMOptions | None = None,
    device: str | None = None,
    num_layers: int | None = None,
    d_ff: int | None = None,
    languages: list[str] | None = None,
    kn: KnOptions = KnOptions(),
    likn: LiknOptions = LiknOptions(),
    uncertainty: UncertaintyOptions = UncertaintyOptions(),
    dkn: DknOptions = DknOptions(),
    known: KnownOptions = KnownOptions(),
    carriers: CarrierOptions = CarrierOptions(),
    specificity: SpecificityOptions = SpecificityOptions(),
    consistency: ConsistencyOptions = ConsistencyOptions(),
    lape: LapeOptions = LapeOptions(),
) -> NeuronFile:
    """Select knowledge neurons from a predict run and write a neuron file.

    Args:
        attributions: The predict output folder (``.../attributions``) or its ``attributions.jsonl``.
        output: Where to write the neuron file (JSON, ``knlight-neurons/1``); None only returns it.
        scores: Dense scores file (default: ``scores.safetensors`` beside ``attributions.jsonl``); needed by
            the uncertainty-aware aggregation and by a coarse τ below the predict run's.
        lm: The model the attributions come from (default: the predict run's, from ``run.json``). Loaded only
            for DKN and the carriers; otherwise only its shape is read.
        device: Where to run the DKN suppressions and direct effects (default CPU; e.g. ``cuda``).
        num_layers: The model's number of layers (skips reading the model's config; give it with ``d_ff``).
        d_ff: The model's neurons per layer.
        languages: Use only these languages (default: every language in the attributions).
        kn: Per-language knowledge neurons (coarse τ, prompt sharing p, adaptive p).
        likn: Language-independent neurons.
        uncertainty: Uncertainty-aware aggregation.
        dkn: Degenerate neurons.
        known: The knowledge filter (on by default): only facts, languages and queries the model knows count.
        carriers: Carriers (neurons whose own write raises the answer) vs upstream neurons.
        specificity: Fact-specific vs relation-level vs generic neurons (labels; fact-specific listed first).
        consistency: Consistency of each fact's neurons across its queries (Jaccard, Otsu split).
        lape: Language-specific neurons by activation statistics (LAPE), beside LIKN and the KN; loads the model.

    Returns:
        The neuron file (also written to ``output`` when given).
    """
    run = read_attributions(attributions, scores)
    if lm is None:
        if run.hparams.get("model") is None:
            raise SelectionError(f"{run.path}: no run.json beside it names the model; pass --lm.model")
        lm = LMOptions(run.hparams["model"], run.hparams.get("tokenizer"), run.hparams.get("dtype"),
                       run.hparams.get("gguf_file"))  # fmt: skip
    check_known_options(known)
    model_needed = dkn.enabled or carriers.enabled or needs_model(specificity, lape)
    loaded = lm.load(device=device) if model_needed else None
    return select_run(run, output, lm.model, loaded, num_layers, d_ff, languages, kn, likn, uncertainty, dkn,
                      known, carriers, specificity, consistency, lape)  # fmt: skip


def select_run(
    run: AttributionRun,
    output: str | None,
    model_name: str,
    lm: Any = None,
    num_layers: int | None = None,
    d_ff: int | None = None,
    languages: list[str] | None = None,
    kn: KnOptions = KnOptions(),
    likn: LiknOptions = LiknOptions(),
    uncertainty: UncertaintyOptions = UncertaintyOptions(),
    dkn: DknOptions = DknOptions(),
    known: KnownOptions = KnownOptions(),
    carriers: CarrierOptions = CarrierOptions(),
    specificity: SpecificityOptions = SpecificityOptions(),
    consistency: ConsistencyOptions = ConsistencyOptions(),
    lape: LapeOptions = LapeOptions(),
) -> NeuronFile:
    """:func:`run_selection` on an already read run, with an already loaded model for DKN and the carriers (or
    None)."""
    started = time.perf_counter()
    check_known_options(known)
    items = [i for i in run.items if languages is None or i.language in languages]
    if not items:
        raise SelectionError(f"{run.path}: no item in languages {languages}")
    all_languages = sorted({i.language for i in items})
    if dkn.enabled and lm is None:
        raise SelectionError("dkn.enabled needs the model: load it (run_selection does)")
    if carriers.enabled and lm is None:
        raise SelectionError("carriers.enabled needs the model: load it (run_selection does)")
    if lm is not None:
        dims = (lm.num_layers, lm.d_ff)
    elif num_layers is not None and d_ff is not None:
        dims = (num_layers, d_ff)
    else:
        dims = model_dims(model_name, run.hparams.get("gguf_file"))
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
        fact = select_fact(
            by_fact[uuid],
            dims,
            all_languages,
            run.hparams,
            kn,
            likn,
            uncertainty,
            dkn,
            dense,
            lm,
            known,
            carriers,
        )
        stats["known"] += [int(status.known) for status in fact.known.values()]
        stats["kn"] += [len(fact.languages[language]) for language in sorted(fact.languages)]
        stats["likn"].append(len(fact.language_independent))
        if uncertainty.enabled:
            stats["uncertainty"].append(len(fact.uncertainty))
        if lm is not None and dkn.enabled:
            stats["dkn pairs"].append(len(fact.degenerate_pairs))
        if carriers.enabled:
            stats["carriers"].append(len(fact.carriers_fact))
        facts[uuid] = fact
    method = {
        "attributions": str(run.source),
        "attribution": run.hparams,
        "languages": all_languages,
        "kn": asdict(kn),
        "likn": asdict(likn),
        "uncertainty": asdict(uncertainty),
        "dkn": asdict(dkn),
        "known": asdict(known),
        "carriers": asdict(carriers),
        "specificity": asdict(specificity),
        "consistency": asdict(consistency),
        "lape": asdict(lape),
    }
    result = NeuronFile(model_name, dims[0], dims[1], method, facts)
    annotate_selection(result, by_fact, lambda q: _coarse(q, kn, run.hparams, dense, dims), lm, specificity,
                       consistency, lape, known.enabled)  # fmt: skip
    known_flags = stats.pop("known", [])
    log.info(
        "knowledge filter (%s, %s): %d of %d (fact, language) known%s",
        describe(known), "on" if known.enabled else "off: recorded only", sum(known_flags), len(known_flags),
        "; the others are left out of every set" if known.enabled else "",
    )  # fmt: skip
    for name, values in stats.items():
        if not values:
            continue
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
