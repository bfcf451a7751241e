"""The state of one train-to-plant run before training: the facts, the random model, the planted neurons and
the training batch (:class:`Planter`). Pure torch + transformers, no Lightning."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, PreTrainedModel, PreTrainedTokenizerBase

from knlight.lm import LanguageModel
from knlight.lm.prompts import EncodedQuery
from knlight.lm.tiny import tiny_config
from knlight.planted.config import TOKENIZER_FOR, PlantConfig, PlantedNeuron
from knlight.planted.facts import FactSet, Slot, build_tokenizer, make_facts


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
class Batch:
    """Padded training sequences: every query of every record, then background sequences."""

    ids: torch.Tensor
    """``[B, S]`` token ids (right-padded)."""
    attention: torch.Tensor
    """``[B, S]`` attention mask."""
    target_pos: torch.Tensor
    """``[Q]`` target position of each query row (rows 0..Q-1)."""
    target_tok: torch.Tensor
    """``[Q]`` the object token of each query row."""
    query_key: list[tuple[str, str]]
    """``(uuid, language)`` of each query row."""
    encoded: list[EncodedQuery]
    """The encoded queries."""


def _encode_all(
    lm: LanguageModel, records: list[dict[str, Any]]
) -> tuple[list[EncodedQuery], list[tuple[str, str]]]:
    encoded, keys = [], []
    for rec in records:
        for query in rec["queries"]:
            e = lm.encode(query, rec["object"])
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


def make_batch(
    lm: LanguageModel, encoded: list[EncodedQuery], keys: list[tuple[str, str]], background: list[list[int]]
) -> Batch:
    """The queries, then the background sequences, right-padded into one batch."""
    ids, attention = lm.pad([list(e.input_ids) for e in encoded] + background)
    pos = torch.tensor([e.targets[0][0] for e in encoded])
    tok = torch.tensor([e.targets[0][1] for e in encoded])
    return Batch(ids, attention, pos, tok, keys, encoded)


class Planter:
    """The state of one train-to-plant run: facts, tokenizer, random model, planted neurons, batch, masks.

    Args:
        config: The plant configuration.

    Attributes:
        layers: The layers that hold planted neurons.
        by_layer: Per layer, the positions (in :attr:`neurons`) of its planted neurons.
        on_mask: ``[n_neurons, B, S]``: where each planted neuron must fire (the target positions of its own
            queries); it must stay silent at every other valid position.
    """

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
        self.lm = LanguageModel(
            self.model, self.tokenizer
        )  # freezes the model: training goes to a NeuronEdit
        self.sites = self.lm.sites
        self.neurons = assign_neurons(config, self.facts)
        encoded, keys = _encode_all(self.lm, self.records)
        background = _background(
            self.tokenizer, self.facts.vocabulary(), config.n_background, self.lm.masked, config.seed
        )
        self.batch = make_batch(self.lm, encoded, keys, background)
        self.layers = sorted({n.layer for n in self.neurons})
        self.by_layer = {
            layer: [k for k, n in enumerate(self.neurons) if n.layer == layer] for layer in self.layers
        }
        self.on_mask = self._on_mask()

    def _on_mask(self) -> torch.Tensor:
        b = self.batch
        on = torch.zeros(len(self.neurons), *b.ids.shape, dtype=torch.bool)
        for k, n in enumerate(self.neurons):
            for row, (uuid, lang) in enumerate(b.query_key):
                if uuid == n.uuid and lang in n.languages:
                    on[k, row, b.target_pos[row]] = True
        return on
