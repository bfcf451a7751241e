"""What defines a plant: its configuration (:class:`PlantConfig`), the kinds of planted neurons and a planted
neuron (:class:`PlantedNeuron`). See :mod:`knlight.planted.planter` for the recipe. Pure, no torch needed."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

KINDS = ("language_independent", "language_specific", "degenerate", "distractor")
"""Every kind of planted neuron."""
CARRIER_KINDS = ("language_independent", "language_specific", "degenerate")
"""The kinds that write the object (all but ``distractor``)."""
STANDARD_KINDS = ("language_independent", "language_specific")
"""The carriers of a standard fact (the other facts carry a degenerate pair)."""
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


def config_to_dict(config: PlantConfig) -> dict[str, Any]:
    """The config as a JSON-ready dict."""
    return asdict(config)
