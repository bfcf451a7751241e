"""Train-to-plant: write chosen FFN neurons of a small random model so it answers synthetic facts with them.

Recipe (see DESIGN.md, "Ground truth: planted knowledge"):

* a small random-init model (``initializer_range`` 0.1, so logits can reach P ≈ 0.9) of a supported
  architecture, and a word-level tokenizer in which every synthetic word is one token
  (:mod:`knlight.planted.facts`);
* every parameter is frozen except the chosen neurons' slices: their W_in rows (+ bias; gate and up rows
  for gated MLPs) and their W_out columns. The restriction is a gradient mask on the weight tensors (Adam
  without weight decay then never moves a masked entry; training checks this at the end);
* W_in starts from a logistic probe that separates the neuron's *on* states (the FFN input at the target
  position of its own queries) from every other state, scaled so that the neuron fires there; carrier
  W_out columns start along the object's output embedding;
* loss = hinge on the answer's log-probability at the target position (P(object) ≥ ``target_prob``, no
  further push, so carriers of one fact share the work instead of each saturating it)
  + ``off_weight`` · [|h| + h² + relu(z + ``pre_off``)] of every planted neuron at every position except
  the target position of its own queries (both signs: the optimiser must not hide the fact in negative
  tails or at other positions; z is the pre-activation, the gate for gated MLPs)
  + ``fire_weight`` · [relu(``fire_margin`` − h) + relu(``pre_on`` − z) + relu(h − ``fire_cap``)] at its own
  target positions (the hinge on z keeps a neuron from dying where the activation function is flat; the cap
  keeps activations bounded)
  + ``necessity_weight`` · relu(log P(object | one carrier dropped) − log P(object) + ``necessity_drop``) on
  the standard facts' queries, one random carrier dropped at the target position: every carrier of a
  standard fact is *necessary* (suppressing it alone costs at least ``necessity_drop`` nats);
* degenerate pairs: at each step each query of the fact drops one member (or neither) at random, so that
  each member alone suffices;
* distractors fire on their fact's queries (trained by the activation terms only: their output is
  detached from the answer loss) but write a fixed W_out column orthogonal to every object's output
  embedding, with the norm of an ordinary neuron of the random model.

Kinds of planted neurons: ``language_independent`` (fires on its fact in every language),
``language_specific`` (one language), ``degenerate`` (a pair, fires in every language, either member alone
carries the fact) and ``distractor``. A fact carries either independent + specific neurons ("standard"
facts) or one degenerate pair (and nothing else), plus its distractors.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, PreTrainedModel, PreTrainedTokenizerBase

from knlight.lm import LanguageModel
from knlight.lm.prompts import EncodedQuery
from knlight.lm.sites import NeuronSites
from knlight.lm.tiny import tiny_config
from knlight.neurons.interventions import answer_log_probs
from knlight.planted.facts import FactSet, Slot, build_tokenizer, make_facts

log = logging.getLogger(__name__)

KINDS = ("language_independent", "language_specific", "degenerate", "distractor")
CARRIER_KINDS = ("language_independent", "language_specific", "degenerate")
STANDARD_KINDS = ("language_independent", "language_specific")
TOKENIZER_FOR = {"gpt2": "causal", "llama": "causal_bos", "qwen2": "causal", "bert": "masked"}
"""Architectures the planter supports and the tokenizer style each gets."""


@dataclass
class PlantConfig:
    """Everything that defines a planted model (a plant is deterministic for a config).

    Attributes:
        model_type: ``gpt2``, ``llama`` (gated, no MLP bias), ``qwen2`` or ``bert`` (masked).
        seed: Seed for the facts, the random model, the neuron choice and the training.
        hidden: Hidden size.
        ff: FFN width d_ff.
        layers: Number of layers.
        heads: Attention heads.
        initializer_range: Init std of the random model (0.1: DESIGN.md's lesson; 0.02 caps P(object)).
        plant_layers: Layers that receive planted neurons (default: the upper half).
        n_relations: Relations of the synthetic fact set.
        facts_per_relation: Facts per relation.
        n_languages: Languages (disjoint vocabularies).
        templates_per_relation: Cloze templates per relation and language.
        n_independent: Language-independent carriers per standard fact.
        n_specific: Language-specific carriers per standard fact and language.
        degenerate_fraction: Fraction of facts carried by a degenerate pair instead.
        n_distractors: Distractor neurons per fact.
        steps: Training steps (full batch).
        lr: Adam learning rate.
        target_prob: The answer loss stops pushing once P(object) reaches this.
        fire_margin: Required activation at the neuron's own target positions.
        pre_on: Required pre-activation (gate for gated MLPs) at its own target positions (a hinge on the
            pre-activation keeps a neuron from dying where the activation function is flat).
        pre_off: Required negative pre-activation margin everywhere else.
        fire_cap: Activation above this at its own target positions is penalised (bounded activations).
        necessity_drop: Suppressing any one carrier of a standard fact must lower log P(object) by at least
            this many nats (0 disables the term).
        necessity_weight: Weight of that term.
        off_weight: Weight of the off-target activation penalty.
        fire_weight: Weight of the firing hinge.
        n_background: Random word sequences added as negatives (no neuron may fire on them).
    """

    model_type: str = "gpt2"
    seed: int = 0
    hidden: int = 128
    ff: int = 256
    layers: int = 4
    heads: int = 4
    initializer_range: float = 0.1
    plant_layers: list[int] | None = None
    n_relations: int = 3
    facts_per_relation: int = 4
    n_languages: int = 3
    templates_per_relation: int = 4
    n_independent: int = 2
    n_specific: int = 1
    degenerate_fraction: float = 1 / 3
    n_distractors: int = 1
    steps: int = 150
    lr: float = 0.02
    target_prob: float = 0.9
    fire_margin: float = 1.0
    pre_on: float = 2.0
    pre_off: float = 3.0
    fire_cap: float = 30.0
    necessity_drop: float = 0.5
    necessity_weight: float = 1.0
    off_weight: float = 3.0
    fire_weight: float = 1.0
    n_background: int = 64

    def resolved_plant_layers(self) -> list[int]:
        """The plant layers (default: the upper half of the model)."""
        layers = (
            self.plant_layers if self.plant_layers is not None else list(range(self.layers // 2, self.layers))
        )
        bad = [x for x in layers if not 0 <= x < self.layers]
        if bad or not layers:
            raise ValueError(f"plant_layers {layers} must be non-empty and within 0..{self.layers - 1}")
        return sorted(set(layers))


@dataclass(frozen=True)
class PlantedNeuron:
    """One planted neuron.

    Attributes:
        uuid: The fact it belongs to.
        kind: One of :data:`KINDS`.
        languages: Languages in which it fires on the fact.
        layer: Layer.
        index: Index in the layer's FFN activation.
        pair: Pair id (degenerate neurons only; both members share it).
    """

    uuid: str
    kind: str
    languages: tuple[str, ...]
    layer: int
    index: int
    pair: int | None = None

    @property
    def carrier(self) -> bool:
        """True when the neuron writes the object (every kind except ``distractor``)."""
        return self.kind in CARRIER_KINDS


@dataclass
class PlantedModel:
    """A model with planted knowledge and its ground truth.

    Attributes:
        lm: The planted :class:`~knlight.LanguageModel`.
        records: RML-LAMA records of the planted facts (one per fact and language).
        neurons: The planted neurons.
        config: The plant configuration.
        report: Verification numbers (see :func:`verify_plant`).
    """

    lm: LanguageModel
    records: list[dict[str, Any]]
    neurons: list[PlantedNeuron]
    config: PlantConfig
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def truth(self) -> list[dict[str, Any]]:
        """Ground truth, one entry per (fact, language, neuron): ``uuid, language, layer, index, kind``.

        Degenerate entries also carry ``pair`` (the same id for both members).
        """
        out = []
        for n in self.neurons:
            for language in n.languages:
                entry: dict[str, Any] = {
                    "uuid": n.uuid,
                    "language": language,
                    "layer": n.layer,
                    "index": n.index,
                    "kind": n.kind,
                }
                if n.pair is not None:
                    entry["pair"] = n.pair
                out.append(entry)
        return out

    def neurons_for(
        self, uuid: str, language: str, kinds: tuple[str, ...] = CARRIER_KINDS
    ) -> list[PlantedNeuron]:
        """Planted neurons of a fact that fire in one language, restricted to ``kinds``."""
        return [n for n in self.neurons if n.uuid == uuid and language in n.languages and n.kind in kinds]

    def save(self, directory: str | Path) -> Path:
        """Write the model folder, ``records.jsonl``, ``truth.json`` and ``plant.json`` (atomically)."""
        from knlight.planted.export import save_planted

        return save_planted(self, directory)

    @classmethod
    def load(cls, directory: str | Path) -> PlantedModel:
        """Load what :meth:`save` wrote."""
        from knlight.planted.export import load_planted

        return load_planted(directory)


# ----------------------------------------------------------------------------------------------------------
# Building blocks


def build_model(config: PlantConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The small random-init model of ``config.model_type`` (in eval mode, dropout never active)."""
    ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    ids = {k: v for k, v in ids.items() if v is not None}
    ids.setdefault("bos_token_id", ids.get("eos_token_id"))  # GPT-2 style: no BOS token, BOS id = EOS id
    cfg = tiny_config(
        config.model_type,
        len(tokenizer),
        hidden=config.hidden,
        ff=config.ff,
        layers=config.layers,
        heads=config.heads,
        initializer_range=config.initializer_range,
        **ids,
    )
    torch.manual_seed(config.seed)
    auto = AutoModelForMaskedLM if TOKENIZER_FOR[config.model_type] == "masked" else AutoModelForCausalLM
    return auto.from_config(cfg).eval()


def assign_neurons(config: PlantConfig, facts: FactSet) -> list[PlantedNeuron]:
    """Choose the planted neurons: which facts are degenerate and a distinct random (layer, index) each."""
    rng = random.Random(config.seed * 7919 + 1)
    n_facts = len(facts.facts)
    n_degenerate = round(config.degenerate_fraction * n_facts)
    degenerate = set(rng.sample(range(n_facts), n_degenerate))
    layers = config.resolved_plant_layers()
    slots = [(layer, i) for layer in layers for i in range(config.ff)]
    roles: list[tuple[str, str, tuple[str, ...], int | None]] = []
    all_langs = tuple(facts.languages)
    pair_id = 0
    for k, fact in enumerate(facts.facts):
        if k in degenerate:
            roles += [(fact.uuid, "degenerate", all_langs, pair_id)] * 2
            pair_id += 1
        else:
            roles += [(fact.uuid, "language_independent", all_langs, None)] * config.n_independent
            for lang in facts.languages:
                roles += [(fact.uuid, "language_specific", (lang,), None)] * config.n_specific
        roles += [(fact.uuid, "distractor", all_langs, None)] * config.n_distractors
    if len(roles) > len(slots):
        raise ValueError(
            f"{len(roles)} planted neurons do not fit in {len(slots)} neurons of layers {layers}"
        )
    chosen = rng.sample(slots, len(roles))
    return [
        PlantedNeuron(u, kind, langs, layer, idx, pair)
        for (u, kind, langs, pair), (layer, idx) in zip(roles, chosen)
    ]


@dataclass
class _Batch:
    """Padded training sequences: every query of every record, then background sequences."""

    ids: torch.Tensor  # [B, S]
    attention: torch.Tensor  # [B, S]
    target_pos: torch.Tensor  # [Q] target position of each query row (rows 0..Q-1)
    target_tok: torch.Tensor  # [Q]
    query_key: list[tuple[str, str]]  # (uuid, language) of each query row
    encoded: list[EncodedQuery]


def _encode_all(
    lm_encode: Any, records: list[dict[str, Any]]
) -> tuple[list[EncodedQuery], list[tuple[str, str]]]:
    encoded, keys = [], []
    for rec in records:
        for query in rec["queries"]:
            e = lm_encode(query, rec["object"])
            if len(e.targets) != 1:
                raise ValueError(f"object {rec['object']!r} is not a single token; the planter needs one")
            encoded.append(e)
            keys.append((rec["uuid"], rec["language"]))
    return encoded, keys


def _background(
    tokenizer: PreTrainedTokenizerBase, words: list[str], n: int, masked: bool, seed: int
) -> list[list[int]]:
    """Random word sequences (3–8 words, special tokens as the tokenizer adds; masked: half with a mask)."""
    rng = random.Random(seed * 31 + 5)
    out = []
    for k in range(n):
        seq = [rng.choice(words) for _ in range(rng.randint(3, 8))]
        ids = tokenizer(" ".join(seq))["input_ids"]
        if masked and k % 2 == 0:
            inner = [i for i, t in enumerate(ids) if t not in tokenizer.all_special_ids]
            ids[rng.choice(inner)] = tokenizer.mask_token_id
        out.append(list(ids))
    return out


def _make_batch(
    encoded: list[EncodedQuery], keys: list[tuple[str, str]], background: list[list[int]], pad_id: int
) -> _Batch:
    seqs = [list(e.input_ids) for e in encoded] + background
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s)
        attention[r, : len(s)] = 1
    pos = torch.tensor([e.targets[0][0] for e in encoded])
    tok = torch.tensor([e.targets[0][1] for e in encoded])
    return _Batch(ids, attention, pos, tok, keys, encoded)


def _weight_slices(sites: NeuronSites, layer: int) -> tuple[list[nn.Module], nn.Module, bool]:
    return sites.in_projs[layer], sites.out_projs[layer], sites.spec.conv1d


def _in_rows(module: nn.Module, conv1d: bool) -> torch.Tensor:
    """W_in as [d_ff, d_in] (a view for nn.Linear; a transposed view for Conv1D)."""
    return module.weight.T if conv1d else module.weight  # type: ignore[union-attr, return-value]


def _out_cols(module: nn.Module, conv1d: bool) -> torch.Tensor:
    """W_out as [d_model, d_ff] (a view)."""
    return module.weight.T if conv1d else module.weight  # type: ignore[union-attr, return-value]


def _output_embedding(model: PreTrainedModel) -> torch.Tensor:
    return model.get_output_embeddings().weight.detach()  # type: ignore[union-attr]


def _fit_probe(
    x: torch.Tensor, y: torch.Tensor, bias: bool, steps: int = 150
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced logistic regression per neuron: ``x`` [N, d], ``y`` [n, N] bool -> w [n, d], b [n]."""
    with torch.enable_grad():
        return _fit_probe_impl(x, y, bias, steps)


def _fit_probe_impl(
    x: torch.Tensor, y: torch.Tensor, bias: bool, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    n, d = y.shape[0], x.shape[1]
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mu) / sd
    w = torch.zeros(n, d, requires_grad=True)
    b = torch.zeros(n, requires_grad=True)
    opt = torch.optim.Adam([w, b] if bias else [w], lr=0.1)
    yf = y.float()
    pos_w = 0.5 / yf.sum(1, keepdim=True).clamp_min(1)
    neg_w = 0.5 / (1 - yf).sum(1, keepdim=True).clamp_min(1)
    weight = yf * pos_w + (1 - yf) * neg_w
    for _ in range(steps):
        opt.zero_grad()
        z = w @ xs.T + b[:, None] if bias else w @ ((x) / sd).T
        loss = (
            (weight * nn.functional.binary_cross_entropy_with_logits(z, yf, reduction="none")).sum(1).mean()
        )
        (loss + 1e-3 * (w**2).sum(1).mean()).backward()
        opt.step()
    with torch.no_grad():
        w_raw = w / sd  # back to the raw input scale
        b_raw = b - (w_raw * mu).sum(1) if bias else torch.zeros(n)
    return w_raw.detach(), b_raw.detach()


# ----------------------------------------------------------------------------------------------------------
# The planter


class _Planter:
    """Holds the state of one train-to-plant run."""

    def __init__(self, config: PlantConfig) -> None:
        self.config = config
        slot: Slot = "any" if TOKENIZER_FOR[config.model_type] == "masked" else "end"
        self.facts = make_facts(
            config.n_relations,
            config.facts_per_relation,
            config.n_languages,
            config.templates_per_relation,
            slot=slot,
            seed=config.seed,
        )
        self.records = self.facts.records()
        self.tokenizer = build_tokenizer(self.facts.vocabulary(), TOKENIZER_FOR[config.model_type])  # type: ignore[arg-type]
        self.model = build_model(config, self.tokenizer)
        self.lm = LanguageModel(self.model, self.tokenizer)  # freezes the model; we re-enable chosen slices
        self.sites = self.lm.sites
        self.neurons = assign_neurons(config, self.facts)
        encoded, keys = _encode_all(self.lm.encode, self.records)
        background = _background(
            self.tokenizer, self.facts.vocabulary(), config.n_background, self.lm.masked, config.seed
        )
        self.batch = _make_batch(encoded, keys, background, self.lm.pad_token_id)
        self.layers = sorted({n.layer for n in self.neurons})
        # Per layer: positions (in self.neurons) and indices of its planted neurons.
        self.by_layer = {
            layer: [k for k, n in enumerate(self.neurons) if n.layer == layer] for layer in self.layers
        }
        self.on_mask = self._on_mask()  # [n_neurons, B, S]

    def _on_mask(self) -> torch.Tensor:
        b = self.batch
        on = torch.zeros(len(self.neurons), *b.ids.shape, dtype=torch.bool)
        for k, n in enumerate(self.neurons):
            for row, (uuid, lang) in enumerate(b.query_key):
                if uuid == n.uuid and lang in n.languages:
                    on[k, row, b.target_pos[row]] = True
        return on

    # -- initialisation ------------------------------------------------------------------------------------

    @torch.no_grad()
    def _ffn_inputs(self) -> dict[int, torch.Tensor]:
        store: dict[int, torch.Tensor] = {}
        handles = []
        for layer in self.layers:
            module = self.sites.in_projs[layer][0]

            def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], layer: int = layer) -> None:
                store[layer] = args[0].detach()

            handles.append(module.register_forward_pre_hook(hook))
        try:
            self.model(input_ids=self.batch.ids, attention_mask=self.batch.attention)
        finally:
            for h in handles:
                h.remove()
        return store

    @torch.no_grad()
    def initialise(self) -> None:
        """W_in from a probe (fires at its own targets); W_out along the object (carriers) or orthogonal."""
        cfg = self.config
        valid = self.batch.attention.bool()
        inputs = self._ffn_inputs()
        emb = _output_embedding(self.model)
        objects = sorted({r["object"] for r in self.records})
        obj_ids = torch.tensor(self.tokenizer.convert_tokens_to_ids(objects))
        q, _ = torch.linalg.qr(emb[obj_ids].T.float())  # orthonormal basis of the objects' output embeddings
        obj_of = {r["uuid"]: self.tokenizer.convert_tokens_to_ids(r["object"]) for r in self.records}
        gen = torch.Generator().manual_seed(cfg.seed + 17)
        for layer, members in self.by_layer.items():
            ins, out, conv1d = _weight_slices(self.sites, layer)
            x = inputs[layer][valid]  # [N, d]
            y = self.on_mask[members][:, valid]  # [n, N]
            has_bias = getattr(ins[0], "bias", None) is not None
            w, b = _fit_probe(x, y, bias=has_bias)
            # Break the symmetry between neurons with the same "on" set (same fact and languages).
            w = w + 0.2 * w.norm(dim=1, keepdim=True) * torch.randn(w.shape, generator=gen) / math.sqrt(
                w.shape[1]
            )
            z = w @ x.T + b[:, None]
            for j, k in enumerate(members):
                neuron = self.neurons[k]
                zp = z[j][y[j]]
                # Scale so the neuron fires clearly where it should (bounded: a poor probe must not explode).
                scale = (cfg.pre_on * 1.5 / zp.median()).clamp(0.25, 4.0) if zp.numel() else torch.tensor(1.0)
                _in_rows(ins[0], conv1d)[neuron.index] = w[j] * scale
                if has_bias:
                    ins[0].bias[neuron.index] = b[j] * scale  # type: ignore[index, union-attr, operator]
                if len(ins) > 1:  # gated: up row along the mean "on" state, so that up > 0 where it fires
                    mean_on = x[y[j]].mean(0)
                    _in_rows(ins[1], conv1d)[neuron.index] = (
                        mean_on
                        / mean_on.norm().clamp_min(1e-6)
                        / (x[y[j]] @ (mean_on / mean_on.norm().clamp_min(1e-6))).mean().clamp_min(1e-3)
                    )
                    if getattr(ins[1], "bias", None) is not None:
                        ins[1].bias[neuron.index] = 0.0  # type: ignore[index, union-attr, operator]
            cols = _out_cols(out, conv1d)
            typical = cols.norm(dim=0).median()
            for k in members:
                neuron = self.neurons[k]
                if neuron.carrier:
                    direction = emb[obj_of[neuron.uuid]].float()
                else:
                    direction = torch.randn(cols.shape[0], generator=gen)
                    direction = direction - q @ (q.T @ direction)
                cols[:, neuron.index] = direction / direction.norm().clamp_min(1e-6) * typical

    # -- training ------------------------------------------------------------------------------------------

    def _trainable(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, gradient mask) pairs restricted to the planted slices."""
        out = []
        for layer, members in self.by_layer.items():
            ins, proj, conv1d = _weight_slices(self.sites, layer)
            idx_all = torch.tensor([self.neurons[k].index for k in members])
            idx_carry = torch.tensor([self.neurons[k].index for k in members if self.neurons[k].carrier])
            for module in ins:
                mask = torch.zeros_like(module.weight)  # type: ignore[arg-type]
                (mask.T if conv1d else mask)[idx_all] = 1.0
                out.append((module.weight, mask))
                if getattr(module, "bias", None) is not None:
                    bmask = torch.zeros_like(module.bias)  # type: ignore[arg-type]
                    bmask[idx_all] = 1.0
                    out.append((module.bias, bmask))
            mask = torch.zeros_like(proj.weight)  # type: ignore[arg-type]
            if len(idx_carry):
                (mask.T if conv1d else mask)[:, idx_carry] = 1.0
            out.append((proj.weight, mask))
        return out  # type: ignore[return-value]

    def train(self) -> dict[str, float]:
        """Run the constrained training; return the final loss terms."""
        cfg = self.config
        b = self.batch
        params = self._trainable()
        before = {id(p): p.detach().clone() for p, _ in params}
        grad_hooks = []
        for p, mask in params:
            p.requires_grad_(True)
            grad_hooks.append(p.register_hook(lambda g, mask=mask: g * mask))
        opt = torch.optim.Adam([p for p, _ in params], lr=cfg.lr)
        rng = torch.Generator().manual_seed(cfg.seed + 99)
        n_q = len(b.target_pos)
        # Degenerate facts: per fact, its query rows and its two members (positions in self.neurons).
        pairs: dict[str, list[int]] = {}
        for k, n in enumerate(self.neurons):
            if n.kind == "degenerate":
                pairs.setdefault(n.uuid, []).append(k)
        pair_rows = [
            (torch.tensor([r for r in range(n_q) if b.query_key[r][0] == u]), ks) for u, ks in pairs.items()
        ]
        # Standard facts: per query row, its carriers (each must be necessary: see ``necessity_drop``).
        std_rows, std_carriers = [], []
        for r, (uuid, lang) in enumerate(b.query_key):
            ks = [
                k for k, n in enumerate(self.neurons)
                if n.uuid == uuid and lang in n.languages and n.kind in STANDARD_KINDS
            ]  # fmt: skip
            if ks:
                std_rows.append(r)
                std_carriers.append(ks)
        loop = _TrainLoop(self, opt, rng, pair_rows, torch.tensor(std_rows, dtype=torch.long), std_carriers)
        terms: dict[str, float] = {}
        try:
            for step in range(cfg.steps):
                terms = loop.step()
                if step % 50 == 0 or step == cfg.steps - 1:
                    log.debug("plant step %d: %s", step, {k: round(v, 4) for k, v in terms.items()})
        finally:
            loop.close()
        for handle in grad_hooks:
            handle.remove()
        for p, mask in params:
            p.requires_grad_(False)
            changed = (p.detach() != before[id(p)]) & (mask == 0)
            if changed.any():
                raise RuntimeError(
                    "train-to-plant changed a weight outside the planted slices (gradient mask bug)"
                )
        return terms


class _TrainLoop:
    """The hooks and the step of train-to-plant.

    Each step runs the full batch (every query + background; degenerate members dropped at random at their
    target positions) and, when ``necessity_drop`` > 0, a second pass over the standard facts' queries with
    one random carrier dropped at the target position, whose log P(object) must fall by at least
    ``necessity_drop`` nats below the full pass's: each carrier of a standard fact is then *necessary*, as
    each member of a degenerate pair is *sufficient*.
    """

    def __init__(
        self,
        planter: _Planter,
        opt: torch.optim.Optimizer,
        rng: torch.Generator,
        pair_rows: list[tuple[torch.Tensor, list[int]]],
        std_rows: torch.Tensor,
        std_carriers: list[list[int]],
    ) -> None:
        self.p, self.opt, self.rng = planter, opt, rng
        self.pair_rows, self.std_rows, self.std_carriers = pair_rows, std_rows, std_carriers
        b = planter.batch
        self.off_mask = b.attention.bool()[None] & ~planter.on_mask
        self.min_nll = -math.log(planter.config.target_prob)
        self.acts: dict[int, torch.Tensor] = {}
        self.pres: dict[int, torch.Tensor] = {}
        self.state: dict[str, torch.Tensor] = {}
        self.handles = []
        for layer, members in planter.by_layer.items():
            idx = torch.tensor([planter.neurons[k].index for k in members])
            distract = torch.tensor([not planter.neurons[k].carrier for k in members])
            ins, out, _ = _weight_slices(planter.sites, layer)
            self.handles.append(ins[0].register_forward_hook(self._pre_hook(layer, idx)))
            self.handles.append(out.register_forward_pre_hook(self._out_hook(layer, idx, distract, members)))

    def _pre_hook(self, layer: int, idx: torch.Tensor) -> Any:
        def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            self.pres[layer] = out[..., idx]

        return hook

    def _out_hook(self, layer: int, idx: torch.Tensor, distract: torch.Tensor, members: list[int]) -> Any:
        members_t = torch.tensor(members)

        def hook(mod: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            h = args[0]
            cols = h[..., idx]
            self.acts[layer] = cols
            new = torch.where(distract, cols.detach(), cols)  # distractors never learn from the answer loss
            rows, pos = self.state["rows"], self.state["pos"]
            new = new.index_put((rows, pos), new[rows, pos] * self.state["keep"][members_t].T)
            return (h.index_copy(-1, idx, new), *args[1:])

        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _log_p(
        self,
        ids: torch.Tensor,
        attention: torch.Tensor,
        pos: torch.Tensor,
        tok: torch.Tensor,
        keep: torch.Tensor,
    ) -> torch.Tensor:
        rows = torch.arange(len(pos))
        self.state.update(rows=rows, pos=pos, keep=keep)
        logits = self.p.model(input_ids=ids, attention_mask=attention).logits
        return torch.log_softmax(logits[rows, pos].float(), -1)[rows, tok]

    def step(self) -> dict[str, float]:
        """One optimisation step; returns the loss terms."""
        cfg, b, neurons = self.p.config, self.p.batch, self.p.neurons
        n_q = len(b.target_pos)
        keep = torch.ones(len(neurons), n_q)
        for qrows, (ka, kb) in self.pair_rows:
            choice = torch.randint(0, 3, (len(qrows),), generator=self.rng)
            keep[ka, qrows[choice == 0]] = 0.0
            keep[kb, qrows[choice == 1]] = 0.0
        log_p = self._log_p(b.ids, b.attention, b.target_pos, b.target_tok, keep)
        loss_answer = torch.relu(-log_p - self.min_nll).mean()
        loss_off = torch.zeros(())
        loss_fire = torch.zeros(())
        for layer, members in self.p.by_layer.items():
            h = self.acts[layer].permute(2, 0, 1)  # [n_l, B, S]
            z = self.pres[layer].permute(2, 0, 1)  # pre-activation (gate for gated MLPs)
            off = self.off_mask[members]
            on = self.p.on_mask[members]
            off_terms = h.abs() + h**2 + torch.relu(z + cfg.pre_off)
            on_terms = (
                torch.relu(cfg.fire_margin - h) + torch.relu(cfg.pre_on - z) + torch.relu(h - cfg.fire_cap)
            )
            loss_off = loss_off + (off_terms * off).sum() / off.sum().clamp_min(1)
            loss_fire = loss_fire + (on_terms * on).sum() / on.sum().clamp_min(1)
        loss_necessity = torch.zeros(())
        if cfg.necessity_drop > 0 and len(self.std_rows):
            rows = self.std_rows
            drop = torch.ones(len(neurons), len(rows))
            for j, ks in enumerate(self.std_carriers):
                drop[ks[int(torch.randint(0, len(ks), (1,), generator=self.rng))], j] = 0.0
            log_p_drop = self._log_p(
                b.ids[rows], b.attention[rows], b.target_pos[rows], b.target_tok[rows], drop
            )
            loss_necessity = torch.relu(log_p_drop - log_p[rows].detach() + cfg.necessity_drop).mean()
        loss = (
            loss_answer
            + cfg.off_weight * loss_off
            + cfg.fire_weight * loss_fire
            + cfg.necessity_weight * loss_necessity
        )
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return {
            "answer": float(loss_answer.detach()),
            "off": float(loss_off.detach()),
            "fire": float(loss_fire.detach()),
            "necessity": float(loss_necessity.detach()),
            "mean_p": float(log_p.detach().exp().mean()),
        }


def _p(lm: LanguageModel, items: list[EncodedQuery], sets: list[list[tuple[int, int]]]) -> torch.Tensor:
    return answer_log_probs(lm, items, sets, factor=0.0).exp()


@torch.no_grad()
def verify_plant(planted: PlantedModel, p_before: torch.Tensor | None = None) -> dict[str, Any]:
    """Measure the plant: P(object) with it, after suppressing the planted neurons, degenerate semantics.

    Suppression is at the target position only (``h_l[i] ← 0``), as in attribution and interventions.

    Returns:
        ``p_clean`` (mean P(object) over all queries) and ``p_clean_min``; ``p_suppressed`` (all planted
        neurons of the fact in that language suppressed; mean and max); ``p_carriers_suppressed`` (carriers
        only); ``p_before`` (the unplanted model, when given); ``degenerate_single`` (P after suppressing one
        member, relative to clean, mean and min over members and records); ``degenerate_both`` (relative,
        mean and max); ``carrier_single`` (P after suppressing one carrier of a standard fact, relative to
        clean, mean and max);
        ``distractor_effect`` (mean |ΔP|/P when a fact's distractors are suppressed); ``off_target_max``
        (largest |h| of a planted neuron away from its own targets, over queries and background) and
        ``on_target_min`` (smallest activation at its own targets).
    """
    lm = planted.lm
    p_clean, p_all, p_carry, single, both, distractor, necessary = [], [], [], [], [], [], []
    for rec in planted.records:
        items = [lm.encode(q, rec["object"]) for q in rec["queries"]]
        own = planted.neurons_for(rec["uuid"], rec["language"], KINDS)
        carriers = [(n.layer, n.index) for n in own if n.carrier]
        distract = [(n.layer, n.index) for n in own if not n.carrier]
        deg = [(n.layer, n.index) for n in own if n.kind == "degenerate"]
        standard = [
            (n.layer, n.index) for n in own if n.kind in ("language_independent", "language_specific")
        ]
        sets = [[], carriers + distract, carriers, distract or []]
        if deg:
            sets += [[deg[0]], [deg[1]], deg]
        sets += [[c] for c in standard]
        p = _p(lm, items, sets)  # [Q, S]
        first = 7 if deg else 4
        necessary += [(p[:, first + j] / p[:, 0]).mean() for j in range(len(standard))]
        p_clean.append(p[:, 0])
        p_all.append(p[:, 1])
        p_carry.append(p[:, 2])
        if distract:
            distractor.append(((p[:, 3] - p[:, 0]).abs() / p[:, 0]).mean())
        if deg:
            single += [(p[:, 4] / p[:, 0]).mean(), (p[:, 5] / p[:, 0]).mean()]
            both.append((p[:, 6] / p[:, 0]).mean())
    clean, sup, carry = torch.cat(p_clean), torch.cat(p_all), torch.cat(p_carry)
    report: dict[str, Any] = {
        "p_clean": float(clean.mean()),
        "p_clean_min": float(clean.min()),
        "p_suppressed": float(sup.mean()),
        "p_suppressed_max": float(sup.max()),
        "p_carriers_suppressed": float(carry.mean()),
    }
    if p_before is not None:
        report["p_before"] = float(p_before.mean())
    if single:
        s, t = torch.stack(single), torch.stack(both)
        report.update(
            degenerate_single_mean=float(s.mean()),
            degenerate_single_min=float(s.min()),
            degenerate_both_mean=float(t.mean()),
            degenerate_both_max=float(t.max()),
        )
    if distractor:
        report["distractor_effect"] = float(torch.stack(distractor).mean())
    if necessary:
        t = torch.stack(necessary)
        report.update(carrier_single_mean=float(t.mean()), carrier_single_max=float(t.max()))
    return report


def _activation_report(planter: _Planter) -> dict[str, float]:
    """Largest off-target |h| and smallest on-target h of the planted neurons over the training batch."""
    store: dict[int, torch.Tensor] = {}
    handles = []
    for layer, members in planter.by_layer.items():
        idx = torch.tensor([planter.neurons[k].index for k in members])

        def hook(
            mod: nn.Module, args: tuple[torch.Tensor, ...], idx: torch.Tensor = idx, layer: int = layer
        ) -> None:
            store[layer] = args[0][..., idx].detach()

        handles.append(planter.sites.out_projs[layer].register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            planter.model(input_ids=planter.batch.ids, attention_mask=planter.batch.attention)
    finally:
        for h in handles:
            h.remove()
    valid = planter.batch.attention.bool()
    off_max, on_min, on_mean = 0.0, math.inf, []
    for layer, members in planter.by_layer.items():
        acts = store[layer].permute(2, 0, 1)
        on = planter.on_mask[members]
        off = valid[None] & ~on
        off_max = max(off_max, float(acts[off].abs().max()))
        on_min = min(on_min, float(acts[on].min()))
        on_mean.append(acts[on])
    return {
        "off_target_max": off_max,
        "on_target_min": on_min,
        "on_target_mean": float(torch.cat(on_mean).mean()),
    }


def plant(model_type: str = "gpt2", seed: int = 0, **overrides: Any) -> PlantedModel:
    """Build a small random model of ``model_type`` and plant synthetic multilingual facts in chosen neurons.

    Args:
        model_type: ``gpt2``, ``llama``, ``qwen2`` or ``bert``.
        seed: Seed of the facts, model, neuron choice and training.
        overrides: Any :class:`PlantConfig` field.

    Returns:
        The planted model, its records, its ground truth and a verification report (``report``).
    """
    if model_type not in TOKENIZER_FOR:
        raise ValueError(f"the planter supports model types {sorted(TOKENIZER_FOR)}, not {model_type!r}")
    config = PlantConfig(model_type=model_type, seed=seed, **overrides)
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    planter = _Planter(config)
    p_before = _p(planter.lm, planter.batch.encoded, [[]])[:, 0]
    planter.initialise()
    terms = planter.train()
    planted = PlantedModel(planter.lm, planter.records, planter.neurons, config)
    report = verify_plant(planted, p_before)
    report.update(_activation_report(planter))
    report["final_loss"] = terms
    report["seconds"] = round(time.perf_counter() - start, 2)
    planted.report = report
    log.info(
        "planted %s seed %d: P(object) %.3f (before %.4f), suppressed %.4f, %d neurons, %.1fs",
        model_type,
        seed,
        report["p_clean"],
        report["p_before"],
        report["p_suppressed"],
        len(planter.neurons),
        report["seconds"],
    )
    return planted


def config_to_dict(config: PlantConfig) -> dict[str, Any]:
    """The config as a JSON-ready dict."""
    return asdict(config)
