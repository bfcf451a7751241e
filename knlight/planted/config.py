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
    """Everything that defines a planted model (a plant is deterministic for a config)."""

    model_type: str = "gpt2"
    """``gpt2``, ``llama`` (gated, no MLP bias), ``qwen2`` or ``bert`` (masked)."""
    seed: int = 0
    """Seed for the facts, the random model, the neuron choice and the training."""
    hidden: int = 128
    """Hidden size."""
    ff: int = 256
    """FFN width d_ff."""
    layers: int = 4
    """Number of layers."""
    heads: int = 4
    """Attention heads."""
    initializer_range: float = 0.1
    """Init std of the random model (0.1: DESIGN.md's lesson; 0.02 caps P(object))."""
    plant_layers: list[int] | None = None
    """Layers that receive planted neurons (default: the upper half)."""
    n_relations: int = 3
    """Relations of the synthetic fact set."""
    facts_per_relation: int = 4
    """Facts per relation."""
    n_languages: int = 3
    """Languages (disjoint vocabularies)."""
    templates_per_relation: int = 4
    """Cloze templates per relation and language."""
    n_independent: int = 2
    """Language-independent carriers per standard fact."""
    n_specific: int = 1
    """Language-specific carriers per standard fact and language."""
    degenerate_fraction: float = 1 / 3
    """Fraction of facts carried by a degenerate pair instead."""
    n_distractors: int = 1
    """Distractor neurons per fact."""
    steps: int = 150
    """Training steps (full batch)."""
    lr: float = 0.02
    """Adam learning rate."""
    target_prob: float = 0.9
    """The answer loss stops pushing once P(object) reaches this."""
    fire_margin: float = 1.0
    """Required activation at the neuron's own target positions."""
    pre_on: float = 2.0
    """Required pre-activation (gate for gated MLPs) at its own target positions (a hinge on the
    pre-activation keeps a neuron from dying where the activation function is flat)."""
    pre_off: float = 3.0
    """Required negative pre-activation margin everywhere else."""
    fire_cap: float = 30.0
    """Activation above this at its own target positions is penalised (bounded activations)."""
    necessity_drop: float = 0.5
    """Suppressing any one carrier of a standard fact must lower log P(object) by at least this many nats (0
    disables the term)."""
    necessity_weight: float = 1.0
    """Weight of that term."""
    direct_necessity: bool = False
    """Measure that necessity as the carrier's *direct* effect: in the pass with the carrier dropped, every
    later sublayer (each block's attention and FFN output above the carrier's layer) is held at the full pass's
    value, so the carrier must write the object itself (its drop reaches the head only through the residual
    stream and its norms) instead of acting through later layers. Plants for the ``carriers`` selection."""
    carrier_direction: str = "auto"
    """Where a carrier's W_out column starts: ``embedding`` (its object's output embedding), ``head_gradient``
    (the mean over its queries of ∂ log P(object) / ∂ FFN output along the residual stream, later sublayers held
    constant: the direction of the largest direct effect) or ``auto`` (``head_gradient`` when the LM head applies
    a transform before the output embedding, as BERT's does, so the embedding is not the direction that raises
    the object; else ``embedding``). Distractors start orthogonal to every carrier direction."""
    off_weight: float = 3.0
    """Weight of the off-target activation penalty."""
    fire_weight: float = 1.0
    """Weight of the firing hinge."""
    n_background: int = 64
    """Random word sequences added as negatives (no neuron may fire on them)."""

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
    """One planted neuron."""

    uuid: str
    """The fact it belongs to."""
    kind: str
    """One of :data:`KINDS`."""
    languages: tuple[str, ...]
    """Languages in which it fires on the fact."""
    layer: int
    """Layer."""
    index: int
    """Index in the layer's FFN activation."""
    pair: int | None = None
    """Pair id (degenerate neurons only; both members share it)."""

    @property
    def carrier(self) -> bool:
        """True when the neuron writes the object (every kind except ``distractor``)."""
        return self.kind in CARRIER_KINDS


def config_to_dict(config: PlantConfig) -> dict[str, Any]:
    """The config as a JSON-ready dict."""
    return asdict(config)
