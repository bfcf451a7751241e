"""Which neurons of a fact an edit touches: a neuron rule applied to the fact's sets in a neuron file.

Rules: ``language_independent``, ``language:<code>`` (that language's set), ``uncertainty``, ``degenerate``
(every DKN member), ``carriers`` (the fact's neurons that write the answer; ``knlight select
--carriers.enabled true``), ``random`` (as many per layer as the language-independent set, at other indices, seeded per
fact) and ``ffn`` (every neuron of the language-independent set's layers, or of given layers). Pure Python.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from knlight.neurons.neuron import Neuron
from knlight.neurons.neuron_file import read_neuron_file

SET_RULES = ("language_independent", "uncertainty", "degenerate", "carriers")
"""Rules that take one named set of the fact's entry as it is."""


def read_fact_neurons(path: str | Path, num_layers: int, d_ff: int) -> dict[str, dict[str, Any]]:
    """Per-fact neuron sets from a neuron file (format ``knlight-neurons/1``), validated against the model.

    Returns:
        ``{uuid: {"languages": {lang: [(l, i), ...]}, "language_independent": [...], "uncertainty": [...],
        "degenerate": [...], "carriers": [...]}}`` (every DKN member once under ``degenerate``).

    Raises:
        ValueError: Missing or malformed file, a neuron outside the model, a model of another shape.
    """
    facts = read_neuron_file(path, num_layers, d_ff).facts
    return {
        uuid: {
            "languages": dict(fact.languages),
            "language_independent": list(fact.language_independent),
            "uncertainty": list(fact.uncertainty),
            "degenerate": fact.degenerate(),
            "carriers": list(fact.carriers_fact),  # the fact's carriers (knlight select --carriers.enabled)
        }
        for uuid, fact in facts.items()
    }


def parse_rule(rule: str) -> tuple[str, str | None]:
    """Split a neuron rule into its kind and argument: ``language:de`` → ``("language", "de")``.

    Raises:
        ValueError: For an unknown rule.
    """
    if rule in (*SET_RULES, "random", "ffn"):
        return rule, None
    if rule.startswith("language:") and rule.split(":", 1)[1]:
        return "language", rule.split(":", 1)[1]
    raise ValueError(
        f"neuron_rule={rule!r}: choose language_independent, language:<code> (e.g. language:en), "
        "uncertainty, degenerate, carriers, random (same count and layers as the language-independent set) or ffn "
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
    if kind in SET_RULES:
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


@dataclass(frozen=True)
class NeuronRule:
    """A neuron rule bound to a neuron file and a model: the neurons of each fact under it."""

    rule: str
    """The rule (see the module documentation)."""
    facts: Mapping[str, Mapping[str, Any]] | None
    """The neuron file's per-fact sets (:func:`read_fact_neurons`); None without a file (``ffn`` with layers)."""
    d_ff: int
    """Neurons per layer of the model."""
    seed: int = 0
    """Seed of the ``random`` rule."""
    layers: Sequence[int] | None = None
    """Layers of the ``ffn`` rule (default: those of the language-independent set)."""

    @classmethod
    def read(
        cls, rule: str, path: str | Path | None, num_layers: int, d_ff: int, seed: int = 0,
        layers: Sequence[int] | None = None,
    ) -> NeuronRule:  # fmt: skip
        """The rule over the neuron file at ``path`` (validated against the model's shape; None: no file)."""
        facts = None if path is None else read_fact_neurons(path, num_layers, d_ff)
        return cls(rule, facts, d_ff, seed, layers)

    def neurons(self, uuid: str, rule: str | None = None) -> list[Neuron]:
        """The fact's neurons under this rule (or under ``rule``, with the same file and seed).

        A fact the neuron file does not list has none.
        """
        entry = None if self.facts is None else self.facts.get(uuid)
        if self.facts is not None and entry is None:
            return []
        return rule_neurons(
            rule or self.rule, entry, uuid=uuid, d_ff=self.d_ff, seed=self.seed, layers=self.layers
        )
