"""Plants with *shared* neurons and *unknown* facts: ground truth for specificity labels and fair fact-checking.

On top of the standard recipe (:mod:`knlight.planted.planter`: per fact, language-independent and -specific
carriers or a degenerate pair, plus distractors), :func:`plant_shared` adds

* **relation neurons** (``relation_neurons`` per relation): fire at the target position of every query of every
  (known) fact of the relation, in every language, and write along the mean output embedding of the relation's
  objects ("the answer is one of this relation's objects"). Trained as necessary carriers of each of those
  facts (the necessity term drops them like any carrier), so the truth label is ``relation``;
* **generic neurons** (``generic_neurons``): the same over every query of every fact (mean of all objects):
  truth label ``generic``;
* **shared degenerate pairs** (``shared_pairs``): per relation, a pair that fires on every query of the
  relation's known facts, each member alone sufficient (one member is dropped at random during training, as
  the standard degenerate pairs): the relation's DKN is then *shared* by its facts, which AMIG's fact-checking
  detector (a relation set learned on training facts, applied to new facts) presumes;
* **unknown facts** (``unknown_fraction`` of each relation's facts): records are written for them, but they
  are left out of the training batch and get no planted neurons, so the model does not know them (P(object)
  stays near chance); their claims test whether a detector tells "false" from "not known".

The plant's ``neurons`` list shared neurons once per fact they serve (kind ``language_independent`` for
relation/generic neurons, ``degenerate`` for shared pairs), so the truth file, :func:`load_planted` and every
tool that reads plants work unchanged; ``report["shared_neurons"]`` holds each one's label and facts, and
``report["unknown_facts"]`` the unknown facts. Pure torch, no Lightning.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import torch

from knlight.lm.sites import neuron_columns
from knlight.planted.build import Planter, make_batch
from knlight.planted.config import STANDARD_KINDS, TOKENIZER_FOR, PlantConfig, PlantedNeuron
from knlight.planted.initialisation import initialise
from knlight.planted.model import PlantedModel
from knlight.planted.training import TrainLoop
from knlight.planted.verify import activation_report, answer_probs, verify_plant

log = logging.getLogger(__name__)
SHARED_KINDS = ("relation", "generic", "relation_degenerate")
"""Kinds of shared neurons (labels: ``relation``, ``generic``, ``relation``)."""


@dataclass(frozen=True)
class SharedNeuron(PlantedNeuron):
    """A planted neuron that serves several facts (``uuid`` is the first of them, for the initialisation)."""

    members: tuple[str, ...] = ()
    """The facts it fires on and writes for."""
    group: str = ""
    """Its relation, or ``*`` for a generic neuron."""

    @property
    def carrier(self) -> bool:
        return True

    @property
    def label(self) -> str:
        """The specificity label it must get: ``relation`` or ``generic``."""
        return "generic" if self.kind == "generic" else "relation"


def _unknown_facts(planter: Planter, fraction: float, seed: int) -> set[str]:
    rng = random.Random(seed * 104729 + 3)
    unknown: set[str] = set()
    for relation in planter.facts.relations:
        uuids = [f.uuid for f in planter.facts.facts if f.relation == relation]
        unknown.update(rng.sample(uuids, round(fraction * len(uuids))))
    return unknown


def _add_shared(
    planter: Planter, known: list[str], relation_neurons: int, generic_neurons: int, shared_pairs: bool
) -> list[SharedNeuron]:
    """Shared neurons on free (layer, index) slots of the plant layers (seeded)."""
    relation_of = {f.uuid: f.relation for f in planter.facts.facts}
    used = {(n.layer, n.index) for n in planter.neurons}
    free = [(layer, i) for layer in planter.config.resolved_plant_layers() for i in range(planter.config.ff)]
    rng = random.Random(planter.config.seed * 7919 + 11)
    slots = iter(rng.sample([s for s in free if s not in used], len(free) - len(used)))
    langs = tuple(planter.facts.languages)
    shared: list[SharedNeuron] = []
    pair = 1000  # distinct from the standard plant's pair ids
    for relation in planter.facts.relations:
        members = tuple(u for u in known if relation_of[u] == relation)
        if not members:
            continue
        for _ in range(relation_neurons):
            shared.append(SharedNeuron(members[0], "relation", langs, *next(slots), None, members, relation))
        if shared_pairs:
            for _ in range(2):
                shared.append(SharedNeuron(members[0], "relation_degenerate", langs, *next(slots), pair,
                                           members, relation))  # fmt: skip
            pair += 1
    for _ in range(generic_neurons):
        shared.append(SharedNeuron(known[0], "generic", langs, *next(slots), None, tuple(known), "*"))
    return shared


def _rebuild(planter: Planter, known: set[str], shared: list[SharedNeuron]) -> None:
    """Drop unknown facts from the batch and their neurons; add the shared neurons; recompute the masks."""
    planter.neurons = [n for n in planter.neurons if n.uuid in known] + list(shared)
    encoded, keys = [], []
    for rec in planter.records:
        if rec["uuid"] in known:
            for query in rec["queries"]:
                encoded.append(planter.lm.encode(query, rec["object"]))
                keys.append((rec["uuid"], rec["language"]))
    n_queries = len(planter.batch.target_pos)
    background = zip(planter.batch.ids[n_queries:], planter.batch.attention[n_queries:])
    rows = [[int(t) for t, a in zip(ids, mask) if a] for ids, mask in background]
    planter.batch = make_batch(planter.lm, encoded, keys, rows)
    planter.layers = sorted({n.layer for n in planter.neurons})
    planter.by_layer = {layer: [k for k, n in enumerate(planter.neurons) if n.layer == layer]
                        for layer in planter.layers}  # fmt: skip
    b = planter.batch
    on = torch.zeros(len(planter.neurons), *b.ids.shape, dtype=torch.bool)
    for k, n in enumerate(planter.neurons):
        owners = n.members if isinstance(n, SharedNeuron) else (n.uuid,)
        for row, (uuid, lang) in enumerate(b.query_key):
            if uuid in owners and lang in n.languages:
                on[k, row, b.target_pos[row]] = True
    planter.on_mask = on


@torch.no_grad()
def _shared_directions(planter: Planter) -> None:
    """A shared neuron's W_out column starts along the mean output embedding of its facts' objects."""
    emb = planter.model.get_output_embeddings().weight.detach()  # type: ignore[union-attr]
    object_of = {r["uuid"]: planter.tokenizer.convert_tokens_to_ids(r["object"]) for r in planter.records}
    for layer, members in planter.by_layer.items():
        cols = neuron_columns(planter.sites.out_projs[layer], planter.sites.spec.conv1d)
        typical = cols.norm(dim=0).median()
        for k in members:
            n = planter.neurons[k]
            if isinstance(n, SharedNeuron):
                direction = emb[torch.tensor([object_of[u] for u in n.members])].float().mean(0)
                cols[:, n.index] = direction / direction.norm().clamp_min(1e-6) * typical


def _train(planter: Planter) -> dict[str, float]:
    """:func:`knlight.planted.training.train` with the shared neurons in the necessity term and the shared
    pairs dropped like degenerate pairs (one member, or neither, per query and step)."""
    from knlight.neurons.edits import NeuronEdit, model_layout

    cfg, b, lm = planter.config, planter.batch, planter.lm
    edit = NeuronEdit([(n.layer, n.index) for n in planter.neurons], model_layout(lm), {"method": "plant"})
    carriers = edit.row_mask([(n.layer, n.index) for n in planter.neurons if n.carrier])
    mask_handle = edit.out_weight.register_hook(lambda grad: grad * carriers[:, None].to(grad.dtype))
    opt = torch.optim.Adam(edit.parameters(), lr=cfg.lr)
    rng = torch.Generator().manual_seed(cfg.seed + 99)
    pairs: dict[tuple[str, int | None], list[int]] = {}
    for k, n in enumerate(planter.neurons):
        if n.kind in ("degenerate", "relation_degenerate"):
            pairs.setdefault((n.uuid, n.pair), []).append(k)
    pair_rows = []
    for ks in pairs.values():
        owners = planter.neurons[ks[0]]
        members = owners.members if isinstance(owners, SharedNeuron) else (owners.uuid,)
        pair_rows.append((torch.tensor([r for r, (u, _) in enumerate(b.query_key) if u in members]), ks))
    std_rows, std_carriers = [], []
    for r, (uuid, lang) in enumerate(b.query_key):
        ks = [k for k, n in enumerate(planter.neurons) if lang in n.languages and (
            (n.kind in STANDARD_KINDS and n.uuid == uuid)
            or (n.kind in ("relation", "generic") and uuid in n.members))]  # type: ignore[attr-defined]  # fmt: skip
        if ks:
            std_rows.append(r)
            std_carriers.append(ks)
    shared_pairs = [
        (rows, ks) for rows, ks in pair_rows if planter.neurons[ks[0]].kind == "relation_degenerate"
    ]
    edit.apply(lm)
    loop = TrainLoop(planter, opt, rng, pair_rows, torch.tensor(std_rows, dtype=torch.long), std_carriers)
    terms: dict[str, float] = {}
    try:
        for _ in range(cfg.steps):
            terms = loop.step()
            if shared_pairs and cfg.necessity_drop > 0:
                terms["pair_necessity"] = _pair_necessity_step(loop, opt, shared_pairs, cfg.necessity_drop)
    finally:
        loop.close()
        edit.remove()
        mask_handle.remove()
    edit.merge(lm)
    return terms


def _pair_necessity_step(
    loop: TrainLoop, opt: torch.optim.Optimizer, pairs: list[tuple[torch.Tensor, list[int]]], drop: float
) -> float:
    """One step on ``relu(log P(both members dropped) − log P + drop)`` over each shared pair's rows: each
    member alone suffices (the main step drops one at random), both together are necessary, as a degenerate
    pair of AMIG's definition (the facts' own carriers must not carry the answer without the pair)."""
    b = loop.p.batch
    loss = torch.zeros(())
    for rows, ks in pairs:
        args = (b.ids[rows], b.attention[rows], b.target_pos[rows], b.target_tok[rows])
        full = loop._log_p(*args, torch.ones(len(loop.p.neurons), len(rows)))
        keep = torch.ones(len(loop.p.neurons), len(rows))
        keep[ks] = 0.0
        loss = loss + torch.relu(loop._log_p(*args, keep) - full.detach() + drop).mean() / len(pairs)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def _expanded(neurons: list[PlantedNeuron]) -> list[PlantedNeuron]:
    """Shared neurons once per fact they serve, as the kinds the truth file knows."""
    out: list[PlantedNeuron] = []
    for n in neurons:
        if isinstance(n, SharedNeuron):
            kind = "degenerate" if n.kind == "relation_degenerate" else "language_independent"
            out += [PlantedNeuron(u, kind, n.languages, n.layer, n.index, n.pair) for u in n.members]
        else:
            out.append(n)
    return out


def plant_shared(
    model_type: str = "gpt2",
    seed: int = 0,
    relation_neurons: int = 1,
    generic_neurons: int = 1,
    shared_pairs: bool = False,
    unknown_fraction: float = 0.0,
    **overrides: Any,
) -> PlantedModel:
    """A plant with relation-level and generic neurons, shared degenerate pairs and unknown facts.

    Args:
        model_type: ``gpt2``, ``llama``, ``qwen2`` or ``bert``.
        seed: Seed of everything.
        relation_neurons: Relation neurons per relation.
        generic_neurons: Generic neurons (shared by every known fact).
        shared_pairs: One degenerate pair per relation, shared by its known facts.
        unknown_fraction: Fraction of each relation's facts the model is not taught.
        overrides: Any :class:`~knlight.planted.config.PlantConfig` field.
    """
    if model_type not in TOKENIZER_FOR:
        raise ValueError(f"the planter supports model types {sorted(TOKENIZER_FOR)}, not {model_type!r}")
    if not 0 <= unknown_fraction < 1:
        raise ValueError(f"unknown_fraction={unknown_fraction} must be in [0, 1)")
    config = PlantConfig(model_type=model_type, seed=seed, **overrides)
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    planter = Planter(config)
    unknown = _unknown_facts(planter, unknown_fraction, seed)
    known = [f.uuid for f in planter.facts.facts if f.uuid not in unknown]
    shared = _add_shared(planter, known, relation_neurons, generic_neurons, shared_pairs)
    _rebuild(planter, set(known), shared)
    initialise(planter)
    _shared_directions(planter)
    terms = _train(planter)
    records = planter.records
    planted = PlantedModel(planter.lm, [r for r in records if r["uuid"] in known], _expanded(planter.neurons),
                           config)  # fmt: skip
    report = verify_plant(planted)
    report.update(activation_report(planter))
    planted.records = records  # the unknown facts' records too (claims, knowledge filter)
    unknown_items = [
        planter.lm.encode(q, r["object"]) for r in records if r["uuid"] in unknown for q in r["queries"]
    ]
    report["p_unknown"] = (
        float(answer_probs(planter.lm, unknown_items, [[]]).mean()) if unknown_items else None
    )
    report["final_loss"] = terms
    report["shared_neurons"] = [
        {"layer": n.layer, "index": n.index, "kind": n.kind, "label": n.label, "facts": list(n.members)}
        for n in shared
    ]
    report["unknown_facts"] = sorted(unknown)
    report["seconds"] = round(time.perf_counter() - start, 2)
    planted.report = report
    log.info("planted %s seed %d with %d shared neurons, %d unknown facts: P(object) %.3f, unknown %s, %.1fs",
             model_type, seed, len(shared), len(unknown), report["p_clean"], report["p_unknown"],
             report["seconds"])  # fmt: skip
    return planted


def truth_labels(planted: PlantedModel) -> dict[tuple[str, tuple[int, int]], str]:
    """The specificity label every planted carrier must get, per (fact, neuron): ``relation``/``generic`` for
    the shared neurons, ``fact`` for every other carrier."""
    shared = {(s["layer"], s["index"]): s["label"] for s in planted.report.get("shared_neurons", [])}
    return {
        (n.uuid, (n.layer, n.index)): shared.get((n.layer, n.index), "fact")
        for n in planted.neurons
        if n.carrier
    }
