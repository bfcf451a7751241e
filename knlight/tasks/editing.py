"""Knowledge editing as a fine-tune restricted to selected neurons (``knlight fit``), and its evaluation.

Three modes of one module (MATRICE's three uses of language-agnostic neurons):

* ``edit``: counterfactual editing. Each request replaces a fact's object by a new one; only the chosen
  neurons' slices (a :class:`~knlight.neurons.edits.NeuronEdit`) are trained on the edit queries of the edit
  language(s).
* ``inject``: new-knowledge injection. The facts the unedited model does not know (its true object does not
  beat the wrong objects) are taught in the edit language(s) and tested in the others.
* ``enhance``: knowledge enhancement, training-free. The neurons are scaled by ``enhance_factor``; accuracy
  per language before and after (``knlight validate`` / ``knlight test``).

Rows. The module turns the records of its datamodule (:class:`EditingDataModule`) into rows:

* training rows: one per edit query (the first ``edit_queries`` rephrasings of the fact in each edit
  language), answer = the new object, each paired with one query of an unrelated fact for the locality term.
  Training is a fixed schedule: for each group of requests (all at once, or ``edits_per_group`` at a time =
  sequential editing), ``steps`` global batches, each a random subset (seeded) of the group's rows padded with
  weight-0 rows to ``batch_size × world_size``. Row weights make the loss the exact mean over each global
  batch, so a DDP run equals a single-process run with the same global batch (to float rounding).
  Checkpoints (:class:`knlight.resume.FitCheckpoint`) hold the deltas, the optimizer and loop state, the
  current group and where the schedule stands: a killed fit resumes exactly (:mod:`knlight.tasks.schedule`).
* evaluation rows (validate and test, identical): every query of every edited fact in every language (roles
  ``reliability``, ``generality_lang``, ``generality_cross``) and every query of the held-out unrelated facts
  (``locality``); in ``enhance`` mode every query of every fact that has neurons (role ``facts``).

Unrelated facts (not edited) are sorted by a hash of their uuid and alternately assigned to the
locality-training pool (KL term) and the locality-evaluation pool, so the evaluation never measures queries
the loss saw.

Loss per training row: ``−log P(new object | edit query) + locality_weight · KL(edited ‖ unedited)`` at
the answer position(s) of its unrelated query; the unedited distribution is computed with the deltas disabled
under ``no_grad``.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch.utils.data import DataLoader, DistributedSampler

from knlight.data.datamodule import ItemDataset, RMLLamaDataModule, collate_items, record_items
from knlight.data.records import FactRecord
from knlight.data.splits import split_by_uuid, stable_fraction
from knlight.editing import RowScore, row_measures
from knlight.editing.options import DirectEdit, EditRequests, EditTraining
from knlight.errors import ConfigError
from knlight.fingerprint import describe_callable
from knlight.lm.options import LMOptions
from knlight.lm.prompts import EncodedQuery, QueryError
from knlight.metrics.editing import EditingMetrics, metric_name, result_table, write_table
from knlight.neurons.edits import NeuronEdit, check_neurons, direct_edit, scale_edit
from knlight.resume import FitResumeError
from knlight.tasks.base import BaseTask
from knlight.tasks.schedule import ScheduleLoader, ScheduleSampler, schedule_digest

log = logging.getLogger(__name__)

Neuron = tuple[int, int]
Row = dict[str, Any]

MODES = ("edit", "inject", "enhance")
BASELINES = ("direct", "suppress", "enhance", "random")
EDIT_ROLES = ("reliability", "generality_lang", "generality_cross")
EDIT_MEASURES = ("top1", "rank", "p_new", "p_old")


# ----------------------------------------------------------------------------------------------------------
# neuron sets


def read_fact_neurons(path: str | Path, num_layers: int, d_ff: int) -> dict[str, dict[str, Any]]:
    """Per-fact neuron sets from a neuron file (format ``knlight-neurons/1``), validated against the model.

    Returns:
        ``{uuid: {"languages": {lang: [(l, i), ...]}, "language_independent": [...], "uncertainty": [...],
        "degenerate": [...]}}`` (every DKN member once under ``degenerate``).

    Raises:
        ValueError: Missing or malformed file, a neuron outside the model, a model of another shape.
    """
    try:
        from knlight.neurons.neuron_file import read_neuron_file
    except ImportError:  # the reader lives in its own module; this fallback reads the same JSON layout
        return _read_neuron_json(Path(path), num_layers, d_ff)
    facts = read_neuron_file(path, num_layers, d_ff).facts
    return {
        uuid: {
            "languages": dict(fact.languages),
            "language_independent": list(fact.language_independent),
            "uncertainty": list(fact.uncertainty),
            "degenerate": fact.degenerate(),
        }
        for uuid, fact in facts.items()
    }


def _read_neuron_json(path: Path, num_layers: int, d_ff: int) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such neuron file; select neurons first (python -m knlight.select)"
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("facts"), dict):
        raise ValueError(f"{path}: a neuron file is a JSON object with a 'facts' mapping uuid -> neuron sets")
    if (data.get("num_layers"), data.get("d_ff")) != (num_layers, d_ff):
        raise ValueError(
            f"{path} was selected on a model of another shape than this one ({num_layers}×{d_ff})"
        )
    out = {}
    for uuid, entry in data["facts"].items():
        degenerate = entry.get("degenerate", {})
        groups = [*degenerate.get("pairs", []), *degenerate.get("sets", [])]
        out[uuid] = {
            "languages": {k: [tuple(n) for n in v] for k, v in entry.get("languages", {}).items()},
            "language_independent": [tuple(n) for n in entry.get("language_independent", [])],
            "uncertainty": [tuple(n) for n in entry.get("uncertainty", [])],
            "degenerate": list(dict.fromkeys(tuple(n) for g in groups for n in g)),
        }
        check_neurons(
            [n for v in out[uuid].values() if isinstance(v, list) for n in v], num_layers, d_ff, str(path)
        )
    return out


def parse_rule(rule: str) -> tuple[str, str | None]:
    """Split a neuron rule into its kind and argument: ``language:de`` → ``("language", "de")``.

    Raises:
        ValueError: For an unknown rule.
    """
    if rule in ("language_independent", "uncertainty", "degenerate", "random", "ffn"):
        return rule, None
    if rule.startswith("language:") and rule.split(":", 1)[1]:
        return "language", rule.split(":", 1)[1]
    raise ValueError(
        f"neuron_rule={rule!r}: choose language_independent, language:<code> (e.g. language:en), "
        "uncertainty, degenerate, random (same count and layers as the language-independent set) or ffn "
        "(every neuron of those layers)"
    )


def rule_neurons(
    rule: str,
    entry: Mapping[str, Any] | None,
    *,
    uuid: str,
    d_ff: int,
    seed: int,
    layers: Sequence[int] | None = None,
) -> list[Neuron]:
    """The neurons one rule selects for one fact.

    Args:
        rule: ``language_independent``, ``language:<code>``, ``uncertainty``, ``degenerate``, ``random`` or
            ``ffn``.
        entry: The fact's entry of the neuron file (None when there is no file: only ``ffn`` with ``layers``).
        uuid: The fact (seeds ``random``).
        d_ff: Neurons per layer.
        seed: Seed of ``random``.
        layers: For ``ffn``: the layers (default: those of the language-independent set).

    Returns:
        Sorted neurons (empty when the fact has none under the rule).
    """
    kind, language = parse_rule(rule)
    independent = sorted((int(a), int(b)) for a, b in (entry or {}).get("language_independent", []))
    if kind == "ffn":
        chosen = layers if layers is not None else sorted({layer for layer, _ in independent})
        return [(layer, index) for layer in chosen for index in range(d_ff)]
    if entry is None:
        raise ValueError(
            f"neuron_rule={rule!r} needs a neuron file (model.neurons); only ffn with layers does not"
        )
    if kind in ("language_independent", "uncertainty", "degenerate"):
        return sorted((int(a), int(b)) for a, b in entry.get(kind, []))
    if kind == "language":
        return sorted((int(a), int(b)) for a, b in entry.get("languages", {}).get(language, []))
    # random: as many per layer as the language-independent set, never one of them
    rng = random.Random(f"{seed}:{uuid}:random")
    taken = set(independent)
    out = []
    for layer in sorted({layer for layer, _ in independent}):
        count = sum(1 for a, _ in independent if a == layer)
        pool = [i for i in range(d_ff) if (layer, i) not in taken]
        out += [(layer, i) for i in rng.sample(pool, count)]
    return sorted(out)


# ----------------------------------------------------------------------------------------------------------
# edit requests


@dataclass
class EditRequest:
    """One fact to edit.

    Attributes:
        uuid: The fact.
        languages: Edit languages (their first rephrasings are trained on).
        new: New object per language.
        old: The fact's current (true) object per language.
        competitors: Per language, the objects the new one must out-rank (``rank`` measure): the old object
            when editing, the wrong objects when injecting.
        neurons: The fact's neurons under the rule.
        group: Training group (sequential editing trains groups one after another).
    """

    uuid: str
    languages: list[str]
    new: dict[str, str]
    old: dict[str, str]
    competitors: dict[str, list[str]]
    neurons: list[Neuron] = field(default_factory=list)
    group: int = 0


def read_edit_requests(edits: str | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]] | None:
    """Explicit edit requests from a list or a JSONL file; None for ``"derive"``.

    Each request: ``{"uuid": ..., "new_object": str | {lang: str} (optional: default the first wrong object),
    "languages": [...] (optional: default the module's edit_languages)}``.

    Raises:
        ValueError: A file line that is not a JSON object with a uuid.
    """
    if isinstance(edits, str):
        if edits == "derive":
            return None
        path = Path(edits)
        if not path.is_file():
            raise FileNotFoundError(
                f"edits={edits!r}: neither 'derive' nor an existing JSONL file of edit requests"
            )
        out = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from error
                if not isinstance(out[-1], dict) or "uuid" not in out[-1]:
                    raise ValueError(f"{path}:{number}: an edit request is a JSON object with a 'uuid'")
        return out
    return [dict(e) for e in edits]


# ----------------------------------------------------------------------------------------------------------
# the module


class EditingModule(BaseTask):
    """Edit, inject or enhance facts through chosen FFN neurons only (``knlight fit``/``validate``/``test``).

    Only the deltas of the chosen neurons' slices (rows of W_in, incl. gate and up, + bias; columns of W_out)
    are parameters the optimizer sees; the base model stays frozen. At the end of ``fit`` the edit is saved as
    ``edit.safetensors`` in the log dir (see :class:`~knlight.neurons.edits.NeuronEdit`). Validation and test
    write ``editing_<stage>.json`` / ``.csv`` (per method, role, measure and language; see
    :mod:`knlight.metrics.editing`) in the log dir and log every value to the logger. Use it with
    :class:`EditingDataModule`.

    Args:
        lm: The language model (the deltas are float32 whatever its dtype).
        mode: ``edit`` (replace objects), ``inject`` (teach facts the model does not know) or ``enhance``
            (training-free: scale the neurons by ``enhance_factor``; run validate/test).
        neurons: Neuron file (per fact: language-independent set and per-language sets); may be omitted only
            for ``neuron_rule: ffn`` with ``layers``.
        neuron_rule: Which neurons of each fact: ``language_independent``, ``language:<code>`` (that
            language's set), ``uncertainty`` (the uncertainty-aware set), ``degenerate`` (every DKN member),
            ``random`` (as many per layer as the language-independent set, other indices, seeded) or
            ``ffn`` (every neuron of the language-independent set's layers, or of ``layers``).
        layers: Layers for ``neuron_rule: ffn`` (default: the language-independent set's layers).
        requests: Which facts are edited, into what, on which queries (and sequential groups).
        training: Steps, trainable slices, W_in learning-rate scale, locality weight.
        optimizer: Optimizer for the deltas (called with the deltas only), e.g. ``torch.optim.Adam`` with
            ``lr: 0.01``. Weight decay is fine: rows a group does not own are restored after every step.
        baselines: Training-free methods evaluated beside the edit: ``direct`` (Dai et al.'s W_out update),
            ``suppress`` / ``enhance`` (the facts' neurons ×0 / ×2 at every position) and, in enhance mode,
            ``random`` (the random-rule neurons scaled by ``enhance_factor``).
        direct: The λs and embedding of the ``direct`` baseline.
        enhance_factor: Scale of the neurons in ``enhance`` mode.
        inject_unknown_in: ``inject``: a fact qualifies when the model does not know it in the edit languages
            (``requests.edit_languages``) or in every language (``all``, so other-language success is transfer).
        load_edit: Evaluate this saved edit (``edit.safetensors``) instead of a fresh zero edit. It must
            have been made on this model (its base weights at the edited neurons are compared).
        allow_other_model: Apply ``load_edit`` even when it was made on another model (a warning instead of
            an error).
        chunk_rows: Sequences per forward in evaluation.
        seed: Seed of the request choice, the random rule and the training schedule.
    """

    def __init__(
        self,
        lm: LMOptions,
        mode: Literal["edit", "inject", "enhance"] = "edit",
        neurons: str | None = None,
        neuron_rule: str = "language_independent",
        layers: list[int] | None = None,
        requests: EditRequests = EditRequests(),
        training: EditTraining = EditTraining(),
        optimizer: OptimizerCallable = torch.optim.Adam,
        baselines: list[str] | None = None,
        direct: DirectEdit = DirectEdit(),
        enhance_factor: float = 2.0,
        inject_unknown_in: Literal["edit_languages", "all"] = "all",
        load_edit: str | None = None,
        allow_other_model: bool = False,
        chunk_rows: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__(lm)
        if mode not in MODES:
            raise ConfigError(f"model.init_args.mode={mode!r}: choose one of {', '.join(MODES)}")
        parse_rule(neuron_rule)
        unknown = sorted(set(baselines or []) - set(BASELINES))
        if unknown:
            raise ConfigError(f"model.init_args.baselines {unknown}: choose among {', '.join(BASELINES)}")
        if chunk_rows < 1:
            raise ConfigError(f"model.init_args.chunk_rows={chunk_rows}: give a positive number")
        if neurons is None and not (neuron_rule == "ffn" and layers):
            raise ConfigError(
                "model.init_args.neurons: give a neuron file (only neuron_rule=ffn with explicit layers needs none)"
            )
        self.save_hyperparameters(ignore=["optimizer"])
        self.mode = mode
        self.neurons_path = neurons
        self.neuron_rule = neuron_rule
        self.layers = layers
        self.edits_arg = requests.edits
        self.edit_languages = requests.edit_languages
        self.edit_queries = requests.edit_queries
        self.max_edits = requests.max_edits
        self.edits_per_group = requests.edits_per_group
        self.steps = training.steps
        self.optimizer_factory = optimizer
        self.trainable = training.trainable
        self.in_lr_scale = training.in_lr_scale
        self.locality_weight = training.locality_weight
        self.baselines = list(baselines or [])
        self.direct_lambdas = (direct.lambda_old, direct.lambda_new)
        self.direct_embedding = direct.embedding
        self.enhance_factor = enhance_factor
        self.inject_unknown_in = inject_unknown_in
        self.load_edit = load_edit
        self.allow_other_model = allow_other_model
        self.chunk_rows = chunk_rows
        self.seed = seed
        self.strict_loading = False  # checkpoints hold the deltas only (see on_save_checkpoint)
        self.edit: NeuronEdit | None = None
        self.metrics: EditingMetrics | None = None
        self.requests: list[EditRequest] = []
        self.eval_rows: list[Row] = []
        self.edit_rows: dict[int, list[Row]] = {}
        self.kl_rows: list[Row] = []
        self._records: list[FactRecord] | None = None
        self._fact_neurons: dict[str, dict[str, Any]] | None = None
        self._methods: dict[str, NeuronEdit | None] | None = None
        self._encoded: dict[tuple[str, str], EncodedQuery] = {}
        self._group: int | None = None
        self._schedule_digest: str | None = None  # of the schedule being trained
        self._resumed_schedule: str | None = None  # of the schedule a checkpoint was trained on
        self.by_fact: dict[str, dict[str, FactRecord]] = {}
        self.languages: list[str] = []
        self.train_languages: list[str] = []
        self.enhance_neurons: dict[str, list[Neuron]] = {}

    # ------------------------------------------------------------------------------------------------------
    # set-up

    def use_records(self, records: Sequence[FactRecord]) -> None:
        """Give the records directly (outside a Trainer); otherwise they come from the datamodule."""
        self._records = list(records)

    def _data(self) -> RMLLamaDataModule | None:
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    def records(self) -> list[FactRecord]:
        """The records the module works on (the datamodule's selection)."""
        if self._records is None:
            data = self._data()
            if data is None or not hasattr(data, "records"):
                raise RuntimeError(
                    "EditingModule needs an RML-LAMA datamodule (data: "
                    "knlight.tasks.editing.EditingDataModule) or records given with use_records()"
                )
            self._records = list(data.records())
        return self._records

    def on_lm_loaded(self) -> None:
        """Plans the edit (requests, neurons, rows), builds the NeuronEdit and the metrics."""
        trainer = self._trainer
        if trainer is not None:  # planning runs forwards (inject): do them on the run's device
            self.lm.model.to(trainer.strategy.root_device)  # type: ignore[arg-type]
        self._plan()
        if self.mode != "enhance":
            if self.load_edit:
                edit = NeuronEdit.load(
                    self.load_edit,
                    self.lm,
                    model_name=self.model_name,
                    allow_other_model=self.allow_other_model,
                )
            else:
                neurons = sorted({n for r in self.requests for n in r.neurons})
                edit = NeuronEdit.for_model(self.lm, neurons, self._provenance())
            self.edit = edit.apply(self.lm)
            # Slices that are not trained are not parameters the optimizer or DDP sees.
            self.edit.out_weight.requires_grad_(self.trainable != "in")
            for param in (self.edit.in_weight, self.edit.in_bias):
                if param is not None:
                    param.requires_grad_(self.trainable != "out")
        self.metrics = EditingMetrics(self._metric_names())

    def _plan(self) -> None:
        records = self.records()
        self.by_fact = {}
        for record in records:
            self.by_fact.setdefault(record.uuid, {})[record.language] = record
        languages = sorted({r.language for r in records})
        self.languages = languages
        self.train_languages = list(self.edit_languages or ["en" if "en" in languages else languages[0]])
        missing = [lang for lang in self.train_languages if lang not in languages]
        if missing:
            raise ValueError(
                f"edit_languages {missing} are not in the data (languages: {', '.join(languages)})"
            )
        if self.neurons_path is not None:
            self._fact_neurons = read_fact_neurons(self.neurons_path, self.lm.num_layers, self.lm.d_ff)
        if self.mode == "enhance":
            self._plan_enhance()
            return
        self.requests = self._requests()
        self._plan_rows()

    def _neurons_of(self, uuid: str, rule: str | None = None) -> list[Neuron]:
        entry = None if self._fact_neurons is None else self._fact_neurons.get(uuid)
        if self._fact_neurons is not None and entry is None:
            return []
        return rule_neurons(
            rule or self.neuron_rule, entry, uuid=uuid, d_ff=self.lm.d_ff, seed=self.seed, layers=self.layers
        )

    def _requests(self) -> list[EditRequest]:
        explicit = read_edit_requests(self.edits_arg)
        if explicit is None:
            data = self._data()
            fractions = getattr(data, "split_fractions", (0.8, 0.1, 0.1))
            split_seed = getattr(data, "seed", 0)
            train = split_by_uuid(self.records(), fractions, split_seed)["train"]
            uuids = sorted({r.uuid for r in train}, key=lambda u: (stable_fraction(u, self.seed, "edits"), u))
            explicit = [{"uuid": u, "derived": True} for u in uuids]
        requests = []
        for spec in explicit:
            request = self._request(spec)
            if request is None:
                continue
            if self.mode == "inject" and spec.get("derived") and not self._unknown(request.uuid):
                continue  # checked lazily: only until max_edits facts are found
            if not request.neurons:
                log.warning(
                    "fact %s has no neurons under rule %s: not edited", request.uuid, self.neuron_rule
                )
                continue
            requests.append(request)
            if self.max_edits is not None and len(requests) == self.max_edits:
                break
        if not requests:
            raise ValueError(
                f"no fact to {self.mode}: check edits={self.edits_arg!r}, the neuron file and neuron_rule="
                f"{self.neuron_rule!r} (facts need neurons, and wrong_objects for a derived new object)"
            )
        size = self.edits_per_group or len(requests)
        for k, request in enumerate(requests):
            request.group = k // size
        return requests

    def _request(self, spec: Mapping[str, Any]) -> EditRequest | None:
        uuid = str(spec["uuid"])
        per_language = self.by_fact.get(uuid)
        if per_language is None:
            raise ValueError(f"edit request for uuid {uuid!r}: no such fact in the data")
        languages = list(spec.get("languages") or self.train_languages)
        absent = [lang for lang in languages if lang not in per_language]
        if absent:
            raise ValueError(f"edit request {uuid}: the fact has no record in {absent}")
        new: dict[str, str] = {}
        for lang, record in per_language.items():
            given = spec.get("new_object")
            if self.mode == "inject":
                new[lang] = record.object
            elif isinstance(given, str):
                new[lang] = given
            elif isinstance(given, Mapping) and lang in given:
                new[lang] = str(given[lang])
            elif given is None and record.wrong_objects:
                new[lang] = record.wrong_objects[0]
        if any(lang not in new for lang in languages):
            log.warning("fact %s: no new object in %s (no wrong_objects?): skipped", uuid, languages)
            return None
        old = {lang: r.object for lang, r in per_language.items()}
        if self.mode == "inject":
            competitors = {lang: list(r.wrong_objects) for lang, r in per_language.items()}
        else:
            competitors = {lang: [old[lang]] for lang in new}
        return EditRequest(uuid, languages, new, old, competitors, self._neurons_of(uuid))

    def _items(self, record: FactRecord) -> list[Row]:
        return record_items(record, self.model_kind)

    @torch.no_grad()
    def _unknown(self, uuid: str) -> bool:
        """inject: True when the true object does not beat the wrong objects in most queries."""
        languages = self.train_languages if self.inject_unknown_in == "edit_languages" else self.languages
        for lang in languages:
            record = self.by_fact[uuid].get(lang)
            if record is None or not record.wrong_objects:
                continue
            rows = [
                {**item, "target": record.object, "competitors": record.wrong_objects}
                for item in self._items(record)
            ]
            scores = self._score(rows)
            right = sum(bool(s["lp_target"] > max(s["lp_comp"])) for s in scores)
            if right * 2 > len(rows):
                return False
        return True

    def _plan_rows(self) -> None:
        edited = {r.uuid for r in self.requests}
        self.eval_rows, self.edit_rows = [], {}
        for request in self.requests:
            for lang in sorted(request.new):
                items = self._items(self.by_fact[request.uuid][lang])
                train_here = lang in request.languages
                cut = len(items) if self.edit_queries is None else self.edit_queries
                for k, item in enumerate(items):
                    role = (
                        ("reliability" if k < cut else "generality_lang")
                        if train_here
                        else "generality_cross"
                    )
                    base = {key: item[key] for key in ("uuid", "language", "query_id", "query")}
                    self.eval_rows.append({**base, "role": role, "target": request.new[lang],
                                           "competitors": request.competitors[lang]})  # fmt: skip
                    if role == "reliability":
                        row = {**base, "answer": request.new[lang], "group": request.group}
                        self.edit_rows.setdefault(request.group, []).append(row)
        unrelated = sorted(
            set(self.by_fact) - edited, key=lambda u: (stable_fraction(u, self.seed, "locality"), u)
        )
        self.kl_rows = []
        for k, uuid in enumerate(unrelated):
            for lang in sorted(self.by_fact[uuid]):
                record = self.by_fact[uuid][lang]
                for item in self._items(record):
                    base = {key: item[key] for key in ("uuid", "language", "query_id", "query")}
                    if k % 2 == 0:
                        self.kl_rows.append({**base, "answer": record.object})
                    else:
                        self.eval_rows.append(
                            {**base, "role": "locality", "target": record.object, "competitors": []}
                        )
        for request in self.requests:
            if not any(r["uuid"] == request.uuid for r in self.edit_rows.get(request.group, [])):
                raise ValueError(
                    f"edit request {request.uuid}: no query to train on in {request.languages} (a causal model "
                    "cannot use queries that start with [Y]); choose other edit languages"
                )
        if not unrelated:
            log.warning("every fact is edited: no unrelated facts for the locality term and metric")
        elif len(unrelated) == 1:
            log.warning(
                "only one unrelated fact: it serves the locality term, none is left for the locality metric"
            )

    def _plan_enhance(self) -> None:
        self.eval_rows = []
        self.enhance_neurons = {}
        for uuid in sorted(self.by_fact):
            neurons = self._neurons_of(uuid)
            if not neurons:
                continue
            self.enhance_neurons[uuid] = neurons
            for lang in sorted(self.by_fact[uuid]):
                record = self.by_fact[uuid][lang]
                for item in self._items(record):
                    base = {key: item[key] for key in ("uuid", "language", "query_id", "query")}
                    self.eval_rows.append({**base, "role": "facts", "target": record.object,
                                           "competitors": list(record.wrong_objects)})  # fmt: skip
        if not self.eval_rows:
            raise ValueError(f"enhance: no fact of the data has neurons under rule {self.neuron_rule!r}")

    def _provenance(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "method": f"finetune:{self.mode}:{self.neuron_rule}",
            "facts": [
                {"uuid": r.uuid, "languages": r.languages, "new": r.new, "old": r.old, "group": r.group}
                for r in self.requests
            ],
            "steps": self.steps,
            "edits_per_group": self.edits_per_group,
            "locality_weight": self.locality_weight,
            "optimizer": describe_callable(self.optimizer_factory),
        }

    def fingerprint(self) -> dict[str, Any]:
        """The hyperparameters and the optimizer (class and arguments): what a resumed fit must share."""
        return {**super().fingerprint(), "optimizer": describe_callable(self.optimizer_factory)}

    # ------------------------------------------------------------------------------------------------------
    # rows served by EditingDataModule

    def rows(self, stage: str) -> list[Row]:
        """Rows of a stage: ``train`` (the schedule) or ``val``/``test`` (evaluation rows, padded)."""
        world = self._trainer.world_size if self._trainer is not None else 1
        if stage == "train":
            if self.mode == "enhance":
                raise RuntimeError("mode=enhance is training-free: run `knlight validate` or `knlight test`")
            data = self._data()
            schedule = self.schedule(getattr(data, "batch_size", 8) * world)
            self._schedule_digest = schedule_digest(schedule)
            if self._resumed_schedule not in (None, self._schedule_digest):
                raise FitResumeError(
                    "the checkpoint this fit resumes from was trained on another schedule of rows (other "
                    "data, requests or global batch); start a new run instead (--trainer.callbacks.init_args."
                    "resume new)"
                )
            return schedule
        rows = [dict(r, row_id=k) for k, r in enumerate(self.eval_rows)]
        rows += [{"pad": True}] * (-len(rows) % world)  # no DistributedSampler duplicates
        return rows

    def schedule(self, global_batch: int) -> list[Row]:
        """The training rows in order: per group, ``steps`` global batches of ``global_batch`` rows.

        Each global batch holds a seeded random subset of the group's edit rows (all of them when they fit),
        each paired with the next unrelated query, padded with weight-0 rows; ``weight`` = 1 / real rows.
        """
        out: list[Row] = []
        cursor = 0
        for group in sorted(self.edit_rows):
            rows = self.edit_rows[group]
            rng = random.Random(f"{self.seed}:{group}:schedule")
            for _ in range(self.steps):
                chosen = rng.sample(rows, min(global_batch, len(rows)))
                batch = []
                for row in chosen:
                    partner = self.kl_rows[cursor % len(self.kl_rows)] if self.kl_rows else None
                    cursor += 1
                    batch.append({**row, "weight": 1.0 / len(chosen),
                                  "loc_query": partner and partner["query"],
                                  "loc_answer": partner and partner["answer"]})  # fmt: skip
                batch += [{**chosen[0], "weight": 0.0, "loc_query": None, "loc_answer": None}] * (
                    global_batch - len(chosen)
                )
                out += batch
        return out

    # ------------------------------------------------------------------------------------------------------
    # forward helpers

    def encode(self, query: str, answer: str) -> EncodedQuery:
        """Encoded (query, answer), cached."""
        key = (query, answer)
        if key not in self._encoded:
            try:
                self._encoded[key] = self.lm.encode(query, answer)
            except QueryError as error:
                raise QueryError(f"query {query!r} with answer {answer!r}: {error}") from error
        return self._encoded[key]

    @staticmethod
    def answer_log_prob(log_probs: torch.Tensor, encoded: EncodedQuery) -> torch.Tensor:
        """log P(answer) = sum over its tokens (gold prefix teacher-forced)."""
        tokens = torch.tensor([t for _, t in encoded.targets], device=log_probs.device)
        return log_probs[torch.arange(len(tokens), device=log_probs.device), tokens].sum()

    def _score(self, rows: Sequence[Row]) -> list[dict[str, Any]]:
        """Per row: ``lp_target``, ``first`` (log-probs at the first answer position), ``first_token``,
        ``lp_comp``."""
        sequences: list[tuple[int, int, EncodedQuery]] = []
        for r, row in enumerate(rows):
            sequences.append((r, -1, self.encode(row["query"], row["target"])))
            sequences += [(r, c, self.encode(row["query"], o)) for c, o in enumerate(row["competitors"])]
        out: list[dict[str, Any]] = [{"lp_comp": [None] * len(row["competitors"])} for row in rows]
        for start in range(0, len(sequences), self.chunk_rows):
            chunk = sequences[start : start + self.chunk_rows]
            for (r, c, encoded), log_probs in zip(chunk, self.lm.target_log_probs([s[2] for s in chunk])):
                value = self.answer_log_prob(log_probs, encoded)
                if c < 0:
                    out[r].update(lp_target=value, first=log_probs[0], first_token=encoded.targets[0][1])
                else:
                    out[r]["lp_comp"][c] = value
        return out

    # ------------------------------------------------------------------------------------------------------
    # training

    def train(self, mode: bool = True) -> EditingModule:
        """Lightning switches modules to train mode; the frozen LM stays in eval mode (no dropout)."""
        super().train(mode)
        if self.net is not None:
            self.net.eval()
        return self

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The injected optimizer over the deltas only."""
        if self.edit is None:
            raise RuntimeError("mode=enhance is training-free: run `knlight validate` or `knlight test`")
        out = [self.edit.out_weight] if self.trainable != "in" else []
        inp = (
            [p for p in (self.edit.in_weight, self.edit.in_bias) if p is not None]
            if self.trainable != "out"
            else []
        )
        if self.in_lr_scale == 1.0 or not inp or not out:
            return self.optimizer_factory(out + inp)
        optimizer = self.optimizer_factory([{"params": out}, {"params": inp}])
        optimizer.param_groups[1]["lr"] = optimizer.defaults["lr"] * self.in_lr_scale
        return optimizer

    def training_step(self, batch: list[Row], batch_idx: int = 0) -> torch.Tensor:
        """Weighted −log P(new) + locality_weight · KL on the batch's rows (exact global mean under DDP)."""
        assert self.edit is not None
        # Every delta takes part in every step (DDP expects gradients for all of them).
        loss = torch.stack([p.sum() for p in self.edit.parameters() if p.requires_grad]).sum() * 0.0
        real = [r for r in batch if r["weight"] > 0]
        if not real:
            return loss
        weights = torch.tensor([r["weight"] for r in real], device=self.device)
        edit_encoded = [self.encode(r["query"], r["answer"]) for r in real]
        with_partner = [k for k, r in enumerate(real) if r["loc_query"] and self.locality_weight > 0]
        loc_encoded = [self.encode(real[k]["loc_query"], real[k]["loc_answer"]) for k in with_partner]
        log_probs = self.lm.target_log_probs(edit_encoded + loc_encoded)
        nll = -torch.stack([self.answer_log_prob(lp, e) for lp, e in zip(log_probs, edit_encoded)])
        kl = torch.zeros_like(nll)
        if loc_encoded:
            with torch.no_grad(), self.edit.disabled():
                base = self.lm.target_log_probs(loc_encoded)
            edited = log_probs[len(edit_encoded) :]
            per_row = torch.stack([(e.exp() * (e - b)).sum(-1).mean() for e, b in zip(edited, base)])
            kl = kl.index_put((torch.tensor(with_partner, device=self.device),), per_row)
        world = self.trainer.world_size if self._trainer is not None else 1
        # DDP averages gradients over ranks: scale so the sum over the global batch is its weighted mean.
        loss = loss + world * (weights * (nll + self.locality_weight * kl)).sum()
        self.log_dict(
            {"train/nll": nll.mean(), "train/kl": kl.mean(), "train/p_new": (-nll).exp().mean()},
            batch_size=len(real),
        )
        return loss

    def on_train_batch_start(self, batch: list[Row], batch_idx: int) -> None:
        """Sequential editing: a new group starts with fresh optimizer state (its own fine-tune)."""
        group = batch[0]["group"]
        if self._group is not None and group != self._group:
            for optimizer in self.trainer.optimizers:
                optimizer.state.clear()
        self._group = group

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        """Steps, then writes back the exact values of rows the current group does not own."""
        saved = [
            (p, dim, idx, p.detach().index_select(dim, idx).clone()) for p, dim, idx in self._frozen_rows()
        ]
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        with torch.no_grad():
            for p, dim, idx, values in saved:
                p.index_copy_(dim, idx, values)

    def _frozen_rows(self) -> list[tuple[torch.nn.Parameter, int, torch.Tensor]]:
        if self.edit is None or len(self.edit_rows) < 2 or self._group is None:
            return []
        owned = {n for r in self.requests if r.group == self._group for n in r.neurons}
        idx = torch.nonzero(~self.edit.row_mask(owned)).flatten()
        if not len(idx):
            return []
        params = [(self.edit.in_weight, 1), (self.edit.out_weight, 0)]
        if self.edit.in_bias is not None:
            params.append((self.edit.in_bias, 1))
        return [(p, dim, idx) for p, dim in params]

    fit_output = "edit.safetensors"
    """What a finished fit writes in its run folder (a run without it is resumed, see knlight.resume)."""

    def on_fit_end(self) -> None:
        """Saves the edit (``edit.safetensors``) in the log dir."""
        if self.edit is None:
            return
        out_dir = self._out_dir()  # collective under DDP: every rank asks
        if not self.trainer.is_global_zero:
            return
        path = self.edit.save(Path(out_dir) / self.fit_output, **self._provenance())
        log.info("edit saved to %s (%d neurons)", path, len(self.edit.neurons))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints keep the deltas, not the frozen language model, and where the schedule stands."""
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("net.")]:
            del state[key]
        checkpoint[CHECKPOINT_KEY] = {"group": self._group, "schedule": self._schedule_digest}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming: the current editing group (its optimizer state is in the checkpoint) and the schedule."""
        state = checkpoint.get(CHECKPOINT_KEY, {})
        self._group = state.get("group")
        self._resumed_schedule = state.get("schedule")

    # ------------------------------------------------------------------------------------------------------
    # evaluation

    def _metric_names(self) -> list[str]:
        methods = self.method_names()
        names = []
        for row in self.eval_rows:
            role, lang = row["role"], row["language"]
            for method in methods:
                if role == "facts":
                    measures = (
                        ("top1", "rank") if method == "unedited" else ("top1", "rank", "fixed", "broken")
                    )
                    names += [metric_name(method, role, m, lang) for m in measures]
                elif role == "locality":
                    if method != "unedited":
                        names += [metric_name(method, role, m, lang) for m in ("top1", "kl")]
                else:
                    for r in (role, "generality") if role.startswith("generality") else (role,):
                        names += [metric_name(method, r, m, lang) for m in EDIT_MEASURES]
        return names

    def method_names(self) -> list[str]:
        """Methods evaluated side by side: ``unedited``, the edit, and the selected baselines."""
        if self.mode == "enhance":
            return ["unedited", "enhanced", *(["enhanced_random"] if "random" in self.baselines else [])]
        return ["unedited", "edited", *[b for b in self.baselines if b != "random"]]

    def _baseline_edits(self) -> dict[str, NeuronEdit | None]:
        """The training-free edits (built once, on the model's device)."""
        if self._methods is not None:
            return self._methods
        methods: dict[str, NeuronEdit | None] = {}
        if self.mode == "enhance":
            union = sorted({n for ns in self.enhance_neurons.values() for n in ns})
            methods["enhanced"] = scale_edit(self.lm, union, self.enhance_factor, {"model": self.model_name})
            if "random" in self.baselines:
                rand = sorted({n for u in self.enhance_neurons for n in self._neurons_of(u, "random")})
                methods["enhanced_random"] = scale_edit(self.lm, rand, self.enhance_factor)
            self._methods = methods
            return methods
        union = sorted({n for r in self.requests for n in r.neurons})
        for name in self.baselines:
            if name == "direct":
                methods[name] = direct_edit(
                    self.lm,
                    self._direct_requests(),
                    *self.direct_lambdas,
                    embedding=self.direct_embedding,
                    metadata={"model": self.model_name},
                )
            elif name in ("suppress", "enhance"):
                methods[name] = scale_edit(self.lm, union, 0.0 if name == "suppress" else 2.0)
        self._methods = methods
        return methods

    def _direct_requests(self) -> list[tuple[list[Neuron], int, int]]:
        out = []
        for request in self.requests:
            for lang in request.languages:
                rows = self.edit_rows.get(request.group, [])
                query = next(r["query"] for r in rows if r["uuid"] == request.uuid and r["language"] == lang)
                new = self.encode(query, request.new[lang]).targets[0][1]
                old = self.encode(query, request.old[lang]).targets[0][1]
                out.append((request.neurons, new, old))
        return out

    @contextmanager
    def method(self, name: str) -> Iterator[None]:
        """Context in which the model computes as ``name`` (``unedited``, ``edited`` or a baseline)."""
        with ExitStack() as stack:
            if self.edit is not None and name != "edited":
                stack.enter_context(self.edit.disabled())
            if name not in ("unedited", "edited"):
                stack.enter_context(self._baseline_edits()[name].applied(self.lm))  # type: ignore[union-attr]
            yield

    def validation_step(self, batch: list[Row], batch_idx: int = 0) -> None:
        self._evaluate(batch)

    def test_step(self, batch: list[Row], batch_idx: int = 0) -> None:
        self._evaluate(batch)

    @torch.no_grad()
    def _evaluate(self, batch: list[Row]) -> None:
        assert self.metrics is not None
        rows = [r for r in batch if not r.get("pad")]
        if not rows:
            return
        scores = {}
        for name in self.method_names():
            with self.method(name):
                scores[name] = self._score(rows)
        for name, per_row in scores.items():
            for k, (row, s) in enumerate(zip(rows, per_row)):
                self._update(name, row, s, scores["unedited"][k])

    def _update(self, method: str, row: Row, s: dict[str, Any], base: dict[str, Any]) -> None:
        assert self.metrics is not None
        for role, measure, value in row_measures(
            method, row["role"], cast(RowScore, s), cast(RowScore, base)
        ):
            self.metrics.update(method, role, measure, row["language"], value)

    def on_validation_epoch_end(self) -> None:
        self._finish("val")

    def on_test_epoch_end(self) -> None:
        self._finish("test")

    def _finish(self, stage: str) -> None:
        assert self.metrics is not None
        if self.trainer.sanity_checking:
            self.metrics.reset()
            return
        values = self.metrics.compute()  # synchronised over processes
        self.metrics.reset()
        for name, (value, count) in values.items():
            if count:
                self.log(f"{stage}/{name}", value, sync_dist=False)
        out_dir = self._out_dir()  # collective under DDP: every rank asks
        if self.trainer.is_global_zero:
            extra = {
                "stage": stage,
                "mode": self.mode,
                "neuron_rule": self.neuron_rule,
                "model": self.model_name,
                "num_neurons": 0 if self.edit is None else len(self.edit.neurons),
                "global_step": self.trainer.global_step,
                "world_size": self.trainer.world_size,
                "requests": [asdict(r) for r in self.requests],
            }
            path = write_table(result_table(values), out_dir, f"editing_{stage}", extra)
            log.info("editing results: %s", path)
            for method in self.method_names():
                headline = [(f"{r}/{m}", values.get(metric_name(method, r, m, "all"))) for r, m in _HEADLINE]
                shown = ", ".join(f"{m}={v[0]:.3f}" for m, v in headline if v and v[1])
                log.info("%s %s: %s", stage, method, shown)

    def _out_dir(self) -> str:
        trainer = self.trainer
        return trainer.log_dir or trainer.default_root_dir


_HEADLINE = (("reliability", "rank"), ("generality_cross", "rank"), ("locality", "top1"), ("facts", "rank"))
CHECKPOINT_KEY = "knlight_editing"


class EditingDataModule(RMLLamaDataModule):
    """An RML-LAMA records file served as the rows of an :class:`EditingModule`.

    Same arguments as :class:`~knlight.data.datamodule.RMLLamaDataModule` (which facts, languages and
    relations are selected; ``split_fractions`` and ``seed`` decide the train split that ``edits: derive``
    edits; ``batch_size`` is the per-process batch). The rows themselves come from the module: the training
    schedule and the evaluation rows (identical for validate and test).
    """

    def _task(self) -> EditingModule:
        module = self.trainer.lightning_module if self.trainer is not None else None
        if not isinstance(module, EditingModule):
            raise RuntimeError("EditingDataModule serves an EditingModule; pair them in the config")
        return module

    def _rows_loader(self, rows: list[Row]) -> DataLoader:
        # Rows are laid out in global batches: shard them in order (Lightning would shuffle a training set).
        dataset = ItemDataset(rows)
        trainer = self.trainer
        sampler: DistributedSampler | None = None
        if trainer is not None and trainer.world_size > 1:
            sampler = DistributedSampler(dataset, shuffle=False, **(trainer.distributed_sampler_kwargs or {}))
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_items,
        )

    def train_dataloader(self) -> DataLoader:
        """The training schedule, in order (global batches are laid out consecutively); resumable mid-epoch."""
        dataset = ItemDataset(self._task().rows("train"))
        trainer = self.trainer
        shard = {"num_replicas": 1, "rank": 0}
        if trainer is not None and trainer.world_size > 1:
            shard = dict(trainer.distributed_sampler_kwargs or shard)
        sampler = ScheduleSampler(dataset, self.batch_size, shard["num_replicas"], shard["rank"])
        return ScheduleLoader(
            dataset,
            sampler,
            self._batches_done,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_items,
        )

    def _batches_done(self) -> int:
        # Lightning's count of the epoch's batches whose step ran (checkpoints are saved after the step).
        assert self.trainer is not None
        return int(self.trainer.fit_loop.epoch_loop.batch_progress.current.processed)  # type: ignore[attr-defined]

    def val_dataloader(self) -> DataLoader:
        """Evaluation rows."""
        return self._rows_loader(self._task().rows("val"))

    def test_dataloader(self) -> DataLoader:
        """Evaluation rows (the same as validation)."""
        return self._rows_loader(self._task().rows("test"))
