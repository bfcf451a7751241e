"""The neuron file: knowledge neurons per fact, the hand-off between selection and every later stage.

Format ``knlight-neurons/1`` (JSON, UTF-8)::

    {"format": "knlight-neurons/1",
     "model": "ai-forever/mGPT", "num_layers": 24, "d_ff": 8192,
     "method": {...the selection options and the attribution settings that produced the file...},
     "facts": {
       "P36:Q142:Q90": {
         "relation": "P36",
         "languages": {"en": [[23, 812], [22, 40]], "fr": [[23, 812]]},     # knowledge neurons per language
         "language_independent": [[23, 812]],                               # LIKN
         "uncertainty": [[23, 812], [21, 7]],                               # uncertainty-aware
         "degenerate": {"pairs": [[[20, 1], [22, 9]]], "sets": [[[1, 2], [3, 4], [5, 6]]]},   # DKN
         "p": {"en": 0.7, "fr": 0.65},                                      # optional: sharing fraction used
         "known": {"en": {"known": true, "passed": 2, "of": 3, "query_ids": [0, 2]}},   # knowledge filter
         "language_independent_over": ["en", "fr"],                         # the languages LIKN was taken over
         "carriers": {"languages": {"en": [[23, 812]]}, "fact": [[23, 812]]},   # write the answer
         "upstream": {"languages": {"en": [[22, 40]]}, "fact": [[22, 40]]},     # selected, low direct effect
         "effects": {"en": [[23, 812, 0.93, 1.7, 2.1], [22, 40, 0.71, 0.01, 0.02]]},  # total, direct, sufficiency
         "specificity": [{"neuron": [23, 812], "label": "fact", "facts": 1, "relations": 1, "languages": 2}],
         "consistency": {"en": {"jaccard": 0.52, "queries": 3, "consistent": true}}
       }},
     "analysis": {...whole-file results: consistency threshold and tables, specificity counts, LAPE...}}

A neuron is ``[layer, index]`` (see DESIGN.md, "The neuron"); lists are ordered by decreasing score (with
specificity labels: fact-specific neurons first, then relation-level, then generic, each by decreasing score).
Every key of a fact except ``languages`` is optional (read as empty), so files written before a key existed
stay readable; ``analysis`` is optional too. ``known`` lists every language of the fact with its filter
status; ``languages`` holds only the languages whose neurons were selected (the known ones when the filter was
on). Files are written atomically and one fact per
line. :func:`read_neuron_file` validates a file, and against a model when ``num_layers``/``d_ff`` are given: a
neuron out of range or a model with another shape is an error naming the file and the fact, never silently
clipped. Pure Python, no Lightning.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from knlight.errors import KnlightError
from knlight.io import write_text_atomically
from knlight.neurons.neuron import Neuron
from knlight.neurons.neuron_annotations import (
    ANNOTATION_KEYS,
    LABELS,
    KnownStatus,
    NeuronSpecificity,
    annotations_json,
    parse_annotations,
)

Effect = tuple[int, int, float, float, float | None]
"""A carrier candidate: ``(layer, index, total, direct, sufficiency)`` (sufficiency None: not measured)."""

FORMAT = "knlight-neurons/1"

NeuronKind = Literal[
    "language", "language_independent", "uncertainty", "degenerate", "carriers", "upstream", "fact_specific"
]
NEURON_KINDS: tuple[str, ...] = (
    "language", "language_independent", "uncertainty", "degenerate", "carriers", "upstream", "fact_specific",
)  # fmt: skip
SPECIFICITY_LABELS = LABELS
__all__ = [
    "FORMAT", "NEURON_KINDS", "SPECIFICITY_LABELS", "FactNeurons", "KnownStatus", "NeuronFile", "NeuronFileError",
    "NeuronSpecificity", "neuron_file_text", "read_neuron_file", "write_neuron_file",
]  # fmt: skip


class NeuronFileError(KnlightError, ValueError):
    """A neuron file that cannot be read, or that does not fit the model."""


@dataclass
class FactNeurons:
    """The neurons of one fact.

    Attributes:
        relation: Relation id of the fact (None when unknown).
        languages: Knowledge neurons per language (Dai et al.'s refined neurons).
        language_independent: Neurons shared by the fact's languages (LIKN).
        uncertainty: Neurons of the uncertainty-aware aggregation over queries and languages.
        degenerate_pairs: DKN pairs (AMIG Algorithm 1).
        degenerate_sets: Larger degenerate sets (greedy growth).
        p: Sharing fraction used per language (adaptive prompt sharing), when recorded.
        known: Knowledge-filter status per language of the fact, when recorded.
        likn_languages: The languages LIKN was taken over (None when not recorded).
        carriers: Carriers (high total and direct effect) per language.
        carriers_fact: Carriers of the fact as a whole (union over its languages).
        upstream: Knowledge neurons with a low direct effect, per language.
        upstream_fact: Upstream neurons of the fact as a whole.
        effects: Per language, the carrier candidates as ``(layer, index, total, direct, sufficiency)``
            (sufficiency None when not measured; files written before it existed have four numbers).
        specificity: Per selected neuron, how shared it is.
        consistency: Per language, ``{"jaccard", "queries", "consistent"}`` across the fact's queries.
    """

    relation: str | None = None
    languages: dict[str, list[Neuron]] = field(default_factory=dict)
    language_independent: list[Neuron] = field(default_factory=list)
    uncertainty: list[Neuron] = field(default_factory=list)
    degenerate_pairs: list[tuple[Neuron, Neuron]] = field(default_factory=list)
    degenerate_sets: list[list[Neuron]] = field(default_factory=list)
    p: dict[str, float] = field(default_factory=dict)
    known: dict[str, KnownStatus] = field(default_factory=dict)
    likn_languages: list[str] | None = None
    carriers: dict[str, list[Neuron]] | None = None
    carriers_fact: list[Neuron] = field(default_factory=list)
    upstream: dict[str, list[Neuron]] = field(default_factory=dict)
    upstream_fact: list[Neuron] = field(default_factory=list)
    effects: dict[str, list[Effect]] = field(default_factory=dict)
    specificity: dict[Neuron, NeuronSpecificity] = field(default_factory=dict)
    consistency: dict[str, dict[str, Any]] = field(default_factory=dict)

    def degenerate(self) -> list[Neuron]:
        """Every neuron of a DKN pair or set, once, in order of appearance."""
        seen: dict[Neuron, None] = {}
        for group in [*self.degenerate_pairs, *self.degenerate_sets]:
            for neuron in group:
                seen.setdefault(neuron)
        return list(seen)

    def is_known(self, language: str, query_id: int | None = None) -> bool:
        """False only when the file records the (fact, language) — or that query — as not known to the model."""
        status = self.known.get(language)
        if status is None:
            return True
        return status.known and (query_id is None or query_id in status.query_ids)

    def known_languages(self) -> list[str]:
        """The languages the file records as known (every language of ``languages`` when nothing is recorded)."""
        if not self.known:
            return sorted(self.languages)
        return sorted(lang for lang, status in self.known.items() if status.known)

    def neurons(self, kind: str, language: str | None = None) -> list[Neuron]:
        """One of the fact's neuron sets.

        Args:
            kind: ``language`` (the language's own neurons; needs ``language``), ``language_independent``,
                ``uncertainty``, ``degenerate`` (all DKN members), ``carriers`` (the language's carriers, or
                the fact's without a language), ``upstream`` (likewise) or ``fact_specific`` (the language's own
                neurons that the specificity analysis labels ``fact``; without a language, every neuron of the
                fact so labelled; empty when the file has no specificity labels).
            language: The language, for ``language`` (and optionally ``carriers`` / ``upstream`` /
                ``fact_specific``).
        """
        if kind == "language":
            if language is None:
                raise ValueError("kind='language' needs a language")
            return list(self.languages.get(language, []))
        if kind == "language_independent":
            return list(self.language_independent)
        if kind == "uncertainty":
            return list(self.uncertainty)
        if kind == "degenerate":
            return self.degenerate()
        if kind == "carriers":
            per_language = self.carriers or {}
            return list(self.carriers_fact if language is None else per_language.get(language, []))
        if kind == "upstream":
            return list(self.upstream_fact if language is None else self.upstream.get(language, []))
        if kind == "fact_specific":
            pool = self.specificity if language is None else self.languages.get(language, [])
            return [n for n in pool if n in self.specificity and self.specificity[n].label == "fact"]
        raise ValueError(f"unknown neuron kind {kind!r}; choose one of {', '.join(NEURON_KINDS)}")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "relation": self.relation,
            "languages": {lang: [list(n) for n in ns] for lang, ns in sorted(self.languages.items())},
            "language_independent": [list(n) for n in self.language_independent],
            "uncertainty": [list(n) for n in self.uncertainty],
            "degenerate": {
                "pairs": [[list(a), list(b)] for a, b in self.degenerate_pairs],
                "sets": [[list(n) for n in s] for s in self.degenerate_sets],
            },
        }
        if self.p:
            out["p"] = {lang: round(v, 10) for lang, v in sorted(self.p.items())}
        out.update(annotations_json(self))
        return out


@dataclass
class NeuronFile:
    """A neuron file in memory (see the module documentation for the format).

    Attributes:
        model: The model the neurons were selected on (as given to knlight).
        num_layers: Its number of layers.
        d_ff: Its number of neurons per layer.
        method: The selection options and attribution settings that produced the neurons.
        facts: Neurons per fact uuid.
        path: Where the file was read from (None for one built in memory).
        analysis: Whole-file results (consistency threshold and tables, specificity counts, LAPE neurons and
            their overlaps); optional.
    """

    model: str
    num_layers: int
    d_ff: int
    method: dict[str, Any] = field(default_factory=dict)
    facts: dict[str, FactNeurons] = field(default_factory=dict)
    path: str | None = None
    analysis: dict[str, Any] = field(default_factory=dict)

    def languages(self) -> list[str]:
        """Every language with neurons in some fact, sorted."""
        return sorted({lang for fact in self.facts.values() for lang in fact.languages})

    def to_json(self) -> dict[str, Any]:
        out = {
            "format": FORMAT,
            "model": self.model,
            "num_layers": self.num_layers,
            "d_ff": self.d_ff,
            "method": self.method,
        }
        if self.analysis:
            out["analysis"] = self.analysis
        out["facts"] = {uuid: self.facts[uuid].to_json() for uuid in sorted(self.facts)}
        return out


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=False)


def neuron_file_text(neurons: NeuronFile) -> str:
    """The file's text: header keys indented, one fact per line (valid JSON, diff-friendly)."""
    data = neurons.to_json()
    head = [f'  "{key}": {json.dumps(data[key], ensure_ascii=False, sort_keys=True)}' for key in
            ("format", "model", "num_layers", "d_ff", "method", "analysis") if key in data]  # fmt: skip
    facts = [f"    {_dump(uuid)}: {_dump(fact)}" for uuid, fact in data["facts"].items()]
    body = "{\n" + ",\n".join(facts) + "\n  }" if facts else "{}"
    return "{\n" + ",\n".join([*head, f'  "facts": {body}']) + "\n}\n"


def write_neuron_file(path: str | Path, neurons: NeuronFile) -> Path:
    """Write a neuron file atomically (readers never see half a file); validates it first.

    Returns:
        The path written.
    """
    path = Path(path)
    _validate(neurons.to_json(), str(path), None, None)
    write_text_atomically(path, neuron_file_text(neurons))
    return path


def read_neuron_file(path: str | Path, num_layers: int | None = None, d_ff: int | None = None) -> NeuronFile:
    """Read and validate a neuron file, optionally against a model.

    Args:
        path: The file.
        num_layers: The model's number of layers: the file must have been selected on a model with as many.
        d_ff: The model's neurons per layer: must equal the file's ``d_ff``.

    Raises:
        NeuronFileError: Missing file, invalid JSON, wrong format, malformed entries, a neuron out of range
            (naming the fact, the set and the neuron) or a model of another shape.
    """
    path = Path(path)
    if not path.is_file():
        raise NeuronFileError(
            f"neuron file {path} does not exist; create it with `python -m knlight.select --attributions "
            "<predict output dir> --output <file>`"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise NeuronFileError(f"neuron file {path} is not valid UTF-8 JSON: {error}") from None
    return _validate(data, str(path), num_layers, d_ff)


def _neuron(value: Any, where: str, num_layers: int, d_ff: int) -> Neuron:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise NeuronFileError(f"{where}: a neuron must be [layer, index] (two integers), got {value!r}")
    layer, index = int(value[0]), int(value[1])
    if not (0 <= layer < num_layers and 0 <= index < d_ff):
        raise NeuronFileError(
            f"{where}: neuron [{layer}, {index}] is out of range for a model with {num_layers} layers × "
            f"{d_ff} neurons per layer; the file is corrupt or was edited by hand"
        )
    return layer, index


def _neuron_list(value: Any, where: str, num_layers: int, d_ff: int) -> list[Neuron]:
    if not isinstance(value, list):
        raise NeuronFileError(f"{where}: expected a list of [layer, index], got {type(value).__name__}")
    return [_neuron(v, where, num_layers, d_ff) for v in value]


def _positive_int(data: Mapping[str, Any], key: str, where: str) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise NeuronFileError(f"{where}: '{key}' must be a positive integer, got {value!r}")
    return value


def _validate(data: Any, where: str, num_layers: int | None, d_ff: int | None) -> NeuronFile:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise NeuronFileError(
            f"{where} is not a knlight neuron file (format {found!r}, expected {FORMAT!r}); write it with "
            "knlight.neurons.neuron_file.write_neuron_file or `python -m knlight.select`"
        )
    layers = _positive_int(data, "num_layers", where)
    width = _positive_int(data, "d_ff", where)
    model = data.get("model")
    if not isinstance(model, str):
        raise NeuronFileError(f"{where}: 'model' must be a string, got {model!r}")
    if d_ff is not None and d_ff != width:
        raise NeuronFileError(
            f"{where} was selected on {model!r} with d_ff={width} neurons per layer, but this model has "
            f"d_ff={d_ff}; neuron indices do not transfer between models: select neurons on this model"
        )
    if num_layers is not None and num_layers != layers:
        raise NeuronFileError(
            f"{where} was selected on {model!r} with {layers} layers, but this model has {num_layers}; "
            "neuron layers do not transfer between models: select neurons on this model"
        )
    method = data.get("method", {})
    if not isinstance(method, dict):
        raise NeuronFileError(f"{where}: 'method' must be an object")
    facts_data = data.get("facts")
    if not isinstance(facts_data, dict):
        raise NeuronFileError(f"{where}: 'facts' must be an object mapping fact uuids to their neurons")
    facts: dict[str, FactNeurons] = {}
    for uuid, entry in facts_data.items():
        at = f"{where}: fact {uuid!r}"
        if not isinstance(entry, dict):
            raise NeuronFileError(f"{at}: expected an object, got {type(entry).__name__}")
        unknown = set(entry) - {
            "relation", "languages", "language_independent", "uncertainty", "degenerate", "p", *ANNOTATION_KEYS,
        }  # fmt: skip
        if unknown:
            raise NeuronFileError(f"{at}: unknown key(s) {', '.join(sorted(unknown))}")
        relation = entry.get("relation")
        if relation is not None and not isinstance(relation, str):
            raise NeuronFileError(f"{at}: 'relation' must be a string or null")
        languages = entry.get("languages", {})
        if not isinstance(languages, dict):
            raise NeuronFileError(f"{at}: 'languages' must map language codes to neuron lists")
        fact = FactNeurons(
            relation=relation,
            languages={
                lang: _neuron_list(ns, f"{at}, languages.{lang}", layers, width)
                for lang, ns in languages.items()
            },
            language_independent=_neuron_list(
                entry.get("language_independent", []), f"{at}, language_independent", layers, width
            ),
            uncertainty=_neuron_list(entry.get("uncertainty", []), f"{at}, uncertainty", layers, width),
        )
        degenerate = entry.get("degenerate", {})
        if not isinstance(degenerate, dict) or set(degenerate) - {"pairs", "sets"}:
            raise NeuronFileError(f"{at}: 'degenerate' must be an object with 'pairs' and 'sets'")
        for k, pair in enumerate(degenerate.get("pairs", [])):
            members = _neuron_list(pair, f"{at}, degenerate.pairs[{k}]", layers, width)
            if len(members) != 2:
                raise NeuronFileError(
                    f"{at}, degenerate.pairs[{k}]: a pair has two neurons, got {len(members)}"
                )
            fact.degenerate_pairs.append((members[0], members[1]))
        for k, group in enumerate(degenerate.get("sets", [])):
            fact.degenerate_sets.append(_neuron_list(group, f"{at}, degenerate.sets[{k}]", layers, width))
        p = entry.get("p", {})
        if not isinstance(p, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in p.values()
        ):
            raise NeuronFileError(f"{at}: 'p' must map languages to numbers")
        fact.p = {lang: float(v) for lang, v in p.items()}
        parse_annotations(
            entry, at, fact, lambda value, at_: _neuron_list(value, at_, layers, width), NeuronFileError
        )
        facts[str(uuid)] = fact
    analysis = data.get("analysis", {})
    if not isinstance(analysis, dict):
        raise NeuronFileError(f"{where}: 'analysis' must be an object")
    for lang, ns in (analysis.get("lape", {}).get("neurons", {}) or {}).items():
        _neuron_list(ns, f"{where}: analysis.lape.neurons.{lang}", layers, width)
    return NeuronFile(model, layers, width, dict(method), facts, where, dict(analysis))
